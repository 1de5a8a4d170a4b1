"""The served process's heap: freed pages handed back (glibc only; a no-op elsewhere)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

GLIBC = platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="malloc_trim is glibc's")
def test_trim_gives_freed_pages_back():
    script = """
import threading
from geomap.serve import heap
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * 4096
kept = []
def churn():  # blocks under the mmap threshold, one in ten kept: the freed ones are holes the heap cannot shrink past
    blocks = [bytearray(64 * 1024) for _ in range(3000)]
    kept.extend(blocks[::10])
    del blocks
threads = [threading.Thread(target=churn) for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join()
before = rss()
heap.trim()
print(before - rss())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert int(out.stdout.strip()) > 50 * 2**20, out.stdout  # most of the ~700 MB freed comes back


def test_settle_freezes_what_lives_and_a_full_settle_collects_its_cycles():
    script = """
import gc, weakref
from geomap.serve import heap
class Node: pass
def cycle():
    node = Node(); node.me = node
    return node
dropped = cycle(); gone = weakref.ref(dropped); del dropped  # garbage before settle: collected by it
kept = cycle(); held = weakref.ref(kept)
heap.settle(full=True)
assert gone() is None and held() is not None and gc.get_freeze_count() > 1000
del kept
gc.collect()  # a full collection no longer walks the frozen objects: the cycle outlives it
heap.settle()  # nor does a light settle
assert held() is not None
heap.settle(full=True)  # unfreezes, collects, freezes again
assert held() is None
young = cycle(); fresh = weakref.ref(young); del young
heap.settle()  # a light settle collects what was made since the last one
assert fresh() is None
with heap.paused():
    assert not gc.isenabled()
    loaded = [cycle() for _ in range(1000)]
assert gc.isenabled() and gc.get_count()[0] < 100  # collection back on, the load's objects settled
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr
