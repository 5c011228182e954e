"""A consistent-hash ring (virtual nodes, blake2b) over worker URLs.

Adding or removing one of N workers moves only about 1/N of the keys. ``lookup`` walks clockwise from the
key's point to the first worker that is currently a candidate, so an unhealthy worker's sessions move to
their ring successors while every other session stays where it was. Hashes are stable across processes
(no ``hash()`` salt), so sessions land on the same workers after a router restart.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from slime_router_core.workers import Worker


def _hash(s: str) -> int:
    return int.from_bytes(hashlib.blake2b(s.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


class HashRing:
    def __init__(self, vnodes: int = 160) -> None:
        self.vnodes = vnodes
        self.urls: set[str] = set()
        self._points: list[int] = []
        self._owners: list[str] = []

    def set_urls(self, urls: Iterable[str]) -> None:
        urls = set(urls)
        if urls != self.urls:
            self.urls = urls
            self._rebuild()

    def add(self, url: str) -> None:
        if url not in self.urls:
            self.urls.add(url)
            self._rebuild()

    def remove(self, url: str) -> None:
        if url in self.urls:
            self.urls.discard(url)
            self._rebuild()

    def _rebuild(self) -> None:
        pts = sorted((_hash(f"{url}#{i}"), url) for url in self.urls for i in range(self.vnodes))
        self._points = [p for p, _ in pts]
        self._owners = [u for _, u in pts]

    def owner(self, key: str, allowed: set[str] | None = None) -> str | None:
        """The URL owning ``key`` (the first clockwise whose URL is in ``allowed``, if given)."""
        n = len(self._points)
        if not n:
            return None
        i = bisect.bisect(self._points, _hash(key))
        for k in range(n):
            url = self._owners[(i + k) % n]
            if allowed is None or url in allowed:
                return url
        return None

    def successors(self, key: str, allowed: set[str]) -> list[str]:
        """Every URL of ``allowed`` on the ring, in the order a walk clockwise from ``key`` meets them (the owner
        first): where a session goes, in turn, when the ones before are overloaded."""
        n = len(self._points)
        i = bisect.bisect(self._points, _hash(key)) if n else 0
        out: list[str] = []
        for k in range(n):
            url = self._owners[(i + k) % n]
            if url in allowed and url not in out:
                out.append(url)
                if len(out) == len(allowed):
                    break
        return out

    def lookup(self, key: str, workers: list[Worker]) -> Worker | None:
        """The candidate worker owning ``key`` (candidates unknown to the ring are added first)."""
        by_url = {w.url: w for w in workers}
        if not self.urls.issuperset(by_url):
            self.urls.update(by_url)
            self._rebuild()
        url = self.owner(key, set(by_url))
        return by_url.get(url) if url is not None else None
