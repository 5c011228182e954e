"""Rendezvous (highest-random-weight) hashing of session keys over worker URLs.

Every URL gets a weight per key, ``blake2b(key, url)``; the key's owner is the URL of highest weight among the
candidates, and its successors are the others in decreasing weight. So:

- the choice is a pure function of the key and the set of candidate URLs: router replicas that see the same
  healthy workers pick the same worker for a session without talking to each other, and a session that moves to
  another replica keeps its worker (and its KV cache);
- removing or losing one worker moves only the keys it owned, each to its own successor (spread over the rest);
  adding one moves only the keys for which it now weighs most (about 1/N of them), all to it;
- the successor order is the bounded-load escape: a busy owner's session goes to its next worker, the same one on
  every replica.

Hashes are stable across processes (no ``hash()`` salt). Ranking a key costs one blake2b per known worker, so the
ranking of recent keys is cached until the set of known URLs changes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from slime_router_core.workers import Worker

CACHED_KEYS = 65_536  # rankings kept (a session's ranking is reused by each of its turns)


def weight(key: str, url: str) -> int:
    """The weight of ``url`` for ``key`` (64 bits, the same in every process)."""
    data = f"{url}\x1f{key}".encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class Rendezvous:
    def __init__(self) -> None:
        self.urls: set[str] = set()
        self._ranks: dict[str, tuple[str, ...]] = {}

    def set_urls(self, urls: Iterable[str]) -> None:
        urls = set(urls)
        if urls != self.urls:
            self.urls = urls
            self._ranks.clear()

    def add(self, url: str) -> None:
        if url not in self.urls:
            self.urls.add(url)
            self._ranks.clear()

    def remove(self, url: str) -> None:
        if url in self.urls:
            self.urls.discard(url)
            self._ranks.clear()

    def rank(self, key: str) -> tuple[str, ...]:
        """Every known URL, the key's owner first, then its successors (decreasing weight; ties by URL)."""
        ranked = self._ranks.get(key)
        if ranked is None:
            ranked = tuple(sorted(self.urls, key=lambda u: (-weight(key, u), u)))
            if len(self._ranks) >= CACHED_KEYS:
                self._ranks.clear()
            self._ranks[key] = ranked
        return ranked

    def owner(self, key: str, allowed: set[str] | None = None) -> str | None:
        """The URL owning ``key`` (the first in its ranking that is in ``allowed``, if given)."""
        for url in self.rank(key):
            if allowed is None or url in allowed:
                return url
        return None

    def successors(self, key: str, allowed: set[str]) -> list[str]:
        """The URLs of ``allowed`` in the key's ranking order (the owner first): where a session goes, in turn,
        when the ones before are overloaded."""
        return [u for u in self.rank(key) if u in allowed]

    def lookup(self, key: str, workers: list[Worker]) -> Worker | None:
        """The candidate worker owning ``key`` (candidates not known yet are added first)."""
        by_url = {w.url: w for w in workers}
        if not self.urls.issuperset(by_url):
            self.urls.update(by_url)
            self._ranks.clear()
        url = self.owner(key, set(by_url))
        return by_url.get(url) if url is not None else None
