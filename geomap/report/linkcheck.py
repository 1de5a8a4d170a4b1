"""Check that every link of a set of report pages resolves.

Each href must name a page that is there and each ``#anchor`` an element id of its page. Works on a folder (as
``file://`` reads it) and on a served store (over HTTP).
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit


class _Refs(HTMLParser):
    """A page's element ids and the targets of its ``href``/``src`` attributes."""

    def __init__(self):
        super().__init__()
        self.ids: set[str] = set()
        self.refs: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if attrs.get("id"):
            self.ids.add(attrs["id"])
        if tag == "a" and attrs.get("name"):
            self.ids.add(attrs["name"])
        for key in ("href", "src"):
            if attrs.get(key) is not None and tag in ("a", "link", "script", "img", "area", "iframe"):
                self.refs.append(attrs[key])


def _parse(text: str) -> _Refs:
    page = _Refs()
    page.feed(text)
    page.close()
    return page


def dangling(fetch: Callable[[str], str | None], starts: list[str]) -> list[str]:
    """Walk every page reachable from ``starts`` and list each link that does not resolve.

    Args:
        fetch: A page's text by its address, or None when there is no page at that address.
        starts: The first pages' addresses (absolute: ``file://`` or ``http://`` URLs, one site).

    Returns:
        ``"<page>: <href> (<why>)"`` for each dangling link, in the order found (empty: every link resolves).
    """
    pages: dict[str, _Refs | None] = {}
    todo: list[str] = []
    problems: list[str] = []

    def page(url: str) -> _Refs | None:
        if url not in pages:
            text = fetch(url)
            pages[url] = None if text is None else _parse(text)
            if text is not None:
                todo.append(url)
        return pages[url]

    for start in starts:
        page(start)
    seen = set()
    site = urlsplit(starts[0]).netloc
    while todo:
        url = todo.pop()
        if url in seen:
            continue
        seen.add(url)
        for href in pages[url].refs:
            target = urljoin(url, href)
            parts = urlsplit(target)
            if parts.scheme not in ("file", "http", "https") or parts.netloc != site:
                problems.append(f"{url}: {href} (leaves the reports)")
                continue
            address = target.split("#")[0]
            found = page(address) if address.endswith(".html") else _exists(fetch, address)
            if not found:
                problems.append(f"{url}: {href} (no such page)")
            elif parts.fragment and isinstance(found, _Refs) and unquote(parts.fragment) not in found.ids:
                problems.append(f"{url}: {href} (no element #{parts.fragment})")
    return problems


def _exists(fetch, address: str) -> bool:
    return fetch(address) is not None


def check_folder(folder: str | Path, start: str = "index.html") -> list[str]:
    """The dangling links of the pages in ``folder`` reachable from ``start``, and of every other page there."""
    folder = Path(folder).resolve()

    def fetch(url: str) -> str | None:
        path = Path(unquote(urlsplit(url).path))
        return path.read_text(encoding="utf-8", errors="replace") if path.is_file() else None

    pages = [folder / start, *sorted(p for p in folder.glob("*.html") if p.name != start)]
    return dangling(fetch, [p.as_uri() for p in pages])


def check_served(base_url: str, start: str = "index.html", timeout: float = 120) -> list[str]:
    """The dangling links of a served store's report pages, walked from ``<base_url>/reports/<start>``."""

    def fetch(url: str) -> str | None:
        end = time.monotonic() + timeout
        while True:  # a page whose map the server is still fitting answers 202: it resolves, once fitted
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (the caller's own server)
                    if resp.status == 200:
                        return resp.read().decode("utf-8", errors="replace")
                    if resp.status != 202 or time.monotonic() > end:
                        return None
            except urllib.error.HTTPError:
                return None
            time.sleep(0.5)

    return dangling(fetch, [urljoin(base_url.rstrip("/") + "/reports/", start)])
