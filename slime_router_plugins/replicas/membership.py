"""Replica membership: who the replicas are, which are live, and which one owns a session.

Ownership is rendezvous (highest-random-weight) hashing of the session id over the *live* replica URLs: every
replica that sees the same live set computes the same owner without talking to the others; a replica that leaves
moves only the sessions it owned (each to its own successor), and one that joins takes only the sessions for
which it now weighs most. The weight is ``blake2b(url, 0x1f, session id)`` -- stable across processes (never
Python's salted ``hash()``).

Liveness: every ``--replica-check-interval`` seconds each peer's ``GET /health`` is polled; ``FAILURES_TO_LEAVE``
failed checks in a row take a peer out of the live set, one good check brings it back. A replica always counts
itself live. Peers start live (so that replicas started together agree at once). ``on_live(url)`` is called when a
peer turns from dead to live and for each peer newly set (the replica then syncs its state: ``sync.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Callable, Iterable
from typing import Any

import aiohttp

from slime_router_core import HTTPError
from slime_router_core.workers import normalize_worker_url

log = logging.getLogger("slime_router.replicas")

FAILURES_TO_LEAVE = 2  # failed checks in a row that take a peer out of the live set
SUCCESSES_TO_RETURN = 1  # good checks that bring it back


def replica_url(url: Any, flag: str = "--replica-url") -> str:
    """A replica's address normalized (``scheme://host:port``): every replica must hash the same string."""
    try:
        return normalize_worker_url(url)
    except HTTPError as e:
        raise ValueError(f"Invalid value for {flag}: {e.message.replace('worker url', 'replica url')}") from None


def parse_urls(value: Any, flag: str = "--replica-peers") -> tuple[str, ...]:
    """``"http://a:1,http://b:2"`` (or a list) -> normalized, de-duplicated URLs, in order."""
    items = value if isinstance(value, (list, tuple)) else str(value).replace(",", " ").split()
    out: dict[str, None] = {}
    for item in items:
        for part in str(item).replace(",", " ").split():
            out[replica_url(part, flag)] = None
    return tuple(out)


def weight(sid: bytes, url: str) -> int:
    """The weight of replica ``url`` for session ``sid`` (64 bits, the same in every process)."""
    return int.from_bytes(hashlib.blake2b(url.encode() + b"\x1f" + sid, digest_size=8).digest(), "big")


def rendezvous_owner(sid: bytes, urls: Iterable[str]) -> str | None:
    """The URL of highest weight for ``sid`` (ties: the smaller URL), None without URLs."""
    best: tuple[int, str] | None = None
    for url in urls:
        w = weight(sid, url)
        if best is None or w > best[0] or (w == best[0] and url < best[1]):
            best = (w, url)
    return None if best is None else best[1]


class Membership:
    """The replica set as this replica sees it."""

    def __init__(self, self_url: str, peers: Iterable[str], interval: float, timeout: float) -> None:
        self.self_url = self_url
        self.interval = interval
        self.timeout = timeout
        self.peers: tuple[str, ...] = ()
        self.live: frozenset[str] = frozenset()
        self.failures: dict[str, int] = {}
        self.last_error: dict[str, str | None] = {}
        self.changes = 0  # live-set changes (the owner of some sessions moved)
        self.rounds = 0
        self._task: asyncio.Task[None] | None = None
        self.on_live: Callable[[str], None] | None = None  # a peer back from dead, or newly set
        self.set_peers(peers)

    # --- membership ------------------------------------------------------------------------------------

    def set_peers(self, peers: Iterable[str]) -> None:
        """Replace the membership (self is always a member). New peers start live; known ones keep their state."""
        before, old = set(self.peers), self.live
        self.peers = tuple(sorted(dict.fromkeys([self.self_url, *peers])))
        self.failures = {u: self.failures.get(u, 0) for u in self.peers if u != self.self_url}
        self.last_error = {u: self.last_error.get(u) for u in self.failures}
        self.live = frozenset(u for u in self.peers if u == self.self_url or u not in before or u in old)
        if self.live != old:
            self.changes += 1
        if self.on_live is not None:
            for url in self.peers:
                if url not in before and url != self.self_url:
                    self.on_live(url)

    def others(self) -> list[str]:
        """Every member but self (live or not)."""
        return [u for u in self.peers if u != self.self_url]

    def live_others(self) -> list[str]:
        return [u for u in self.peers if u != self.self_url and u in self.live]

    def owner(self, sid: bytes) -> str:
        """The live replica owning session ``sid`` (self when alone)."""
        return rendezvous_owner(sid, self.live) or self.self_url

    def view(self) -> dict[str, Any]:
        return {"self": self.self_url, "peers": list(self.peers), "live": sorted(self.live),
                "check_interval_s": self.interval, "check_rounds": self.rounds, "live_set_changes": self.changes,
                "checks": {u: {"live": u in self.live, "consecutive_failures": self.failures.get(u, 0),
                               "last_error": self.last_error.get(u)} for u in self.others()}}

    # --- liveness ----------------------------------------------------------------------------------------

    def record(self, url: str, error: str | None) -> None:
        """One check's outcome for peer ``url`` (``error`` None: it answered 2xx)."""
        if url not in self.failures:  # removed from the membership meanwhile
            return
        self.last_error[url] = error
        if error is None:
            self.failures[url] = 0
            if url not in self.live:
                self.live = self.live | {url}
                self.changes += 1
                log.warning("replica %s is back: live set %s", url, sorted(self.live))
                if self.on_live is not None:
                    self.on_live(url)
            return
        self.failures[url] += 1
        if url in self.live and self.failures[url] >= FAILURES_TO_LEAVE:
            self.live = self.live - {url}
            self.changes += 1
            log.warning("replica %s failed %d checks in a row (%s): live set %s", url, self.failures[url], error,
                        sorted(self.live))

    async def check(self, session: aiohttp.ClientSession, url: str) -> None:
        try:
            async with session.get(url + "/health", timeout=aiohttp.ClientTimeout(total=self.timeout)) as resp:
                await resp.read()
                self.record(url, None if 200 <= resp.status < 300 else f"GET /health answered {resp.status}")
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            self.record(url, f"{type(e).__name__}: {e}")

    async def check_all(self, session: aiohttp.ClientSession) -> None:
        await asyncio.gather(*(self.check(session, u) for u in self.others()))
        self.rounds += 1

    def start(self, session: aiohttp.ClientSession) -> None:
        if self.interval <= 0 or self._task is not None:
            return

        async def loop() -> None:
            while True:
                await asyncio.sleep(self.interval)
                try:
                    await self.check_all(session)
                except Exception:  # pragma: no cover - keep checking whatever one round did
                    log.exception("replica checks failed")

        self._task = asyncio.create_task(loop())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
