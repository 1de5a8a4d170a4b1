"""The reader gate: slots are served first come first served, waits end at their deadline, `alone` has priority."""

from __future__ import annotations

import threading
import time

from geomap.store.sql_budget import ReaderGate


def _until(condition, seconds: float = 10.0) -> None:
    end = time.perf_counter() + seconds
    while not condition():
        assert time.perf_counter() < end, "timed out waiting"
        time.sleep(0.001)


def test_waiting_readers_enter_in_the_order_they_came():
    gate = ReaderGate(size=1)
    assert gate.enter(time.perf_counter() + 1)
    order: list[int] = []
    threads = []
    for i in range(6):
        def reader(i=i):
            assert gate.enter(time.perf_counter() + 30)
            order.append(i)
            gate.leave()
        t = threading.Thread(target=reader)
        t.start()
        threads.append(t)
        _until(lambda i=i: gate.waiting() == i + 1)  # queued before the next one arrives
    gate.leave()
    for t in threads:
        t.join(30)
    assert order == list(range(6))
    assert gate.busy() == 0 and gate.waiting() == 0


def test_a_wait_ends_at_its_deadline_and_leaves_the_queue():
    gate = ReaderGate(size=1)
    assert gate.enter(time.perf_counter() + 1)
    start = time.perf_counter()
    assert not gate.enter(start + 0.05)
    assert time.perf_counter() - start >= 0.05
    assert gate.waiting() == 0  # a reader that gave up does not block the ones behind it
    gate.leave()
    assert gate.enter(time.perf_counter() + 1)
    gate.leave()


def test_free_slots_are_taken_at_once_and_alone_waits_for_the_readers_inside():
    gate = ReaderGate(size=3)
    for _ in range(3):
        assert gate.enter(time.perf_counter() + 1)
    assert not gate.enter(time.perf_counter() + 0.01)
    assert not gate.alone(time.perf_counter() + 0.01)
    for _ in range(3):
        gate.leave()
    assert gate.alone(time.perf_counter() + 1)
    assert not gate.enter(time.perf_counter() + 0.01)  # nobody else while one has the pool to itself
    gate.leave_alone()
    assert gate.enter(time.perf_counter() + 1)
    gate.leave()


def test_many_readers_never_exceed_the_slots_and_none_is_left_waiting():
    """32 threads taking and giving back 3 slots, with `alone` now and then: no lost wake-up, never a 4th inside."""
    gate = ReaderGate(size=3)
    most, errors, lock = [0], [], threading.Lock()

    def reader(i: int) -> None:
        for n in range(60):
            if n % 20 == i % 20:
                if gate.alone(time.perf_counter() + 30):
                    with lock:
                        if gate.busy():
                            errors.append("a reader inside beside alone")
                    gate.leave_alone()
                continue
            if not gate.enter(time.perf_counter() + 30):
                errors.append("a reader waited 30 s")
                continue
            with lock:
                most[0] = max(most[0], gate.busy())
            time.sleep(0.0002)
            gate.leave()

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads) and not errors
    assert most[0] <= 3 and gate.busy() == 0 and gate.waiting() == 0
