"""The worker pool: URLs, in-flight counts and availability.

Everything here runs on the event loop thread with no ``await`` inside a state change, so
counts are exact under any concurrency without locks.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from .errors import HTTPError


def normalize_worker_url(url: Any) -> str:
    """Validate a worker URL (http/https, host, port) and return it without a trailing slash."""
    if not isinstance(url, str) or not url.strip():
        raise HTTPError(400, "Worker url must be a non-empty string like 'http://127.0.0.1:30001'", param="url")
    url = url.strip()
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise HTTPError(400, f"Invalid worker url {url!r}: {e}", param="url") from None
    if parts.scheme not in ("http", "https"):
        raise HTTPError(400, f"Invalid worker url {url!r}: scheme must be http or https", param="url")
    if not parts.hostname:
        raise HTTPError(400, f"Invalid worker url {url!r}: missing host", param="url")
    if port is None:
        raise HTTPError(400, f"Invalid worker url {url!r}: missing port (e.g. http://{parts.hostname}:30001)",
                        param="url")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise HTTPError(400, f"Invalid worker url {url!r}: give only scheme://host:port", param="url")
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    return f"{parts.scheme}://{host}:{port}"


class Worker:
    """One upstream SGLang worker. ``state`` is for plugins (health, circuit, latency...)."""

    __slots__ = ("url", "inflight", "requests", "failures", "healthy", "removed", "added_at", "state")

    def __init__(self, url: str) -> None:
        self.url = url
        self.inflight = 0
        self.requests = 0
        self.failures = 0
        self.healthy = True  # flipped by a health checker plugin
        self.removed = False
        self.added_at = time.time()
        self.state: dict[str, Any] = {}

    @property
    def available(self) -> bool:
        return self.healthy and not self.removed and not self.state.get("circuit_open", False)

    def acquire(self) -> None:
        self.inflight += 1
        self.requests += 1

    def release(self) -> None:
        if self.inflight <= 0:  # would be a bug in the caller; never go negative
            raise AssertionError(f"in-flight count of {self.url} would go negative")
        self.inflight -= 1

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url, "in_flight": self.inflight, "requests": self.requests, "failures": self.failures,
                "healthy": self.healthy, "available": self.available}

    def __repr__(self) -> str:  # pragma: no cover
        return f"<Worker {self.url} inflight={self.inflight}>"


class WorkerPool:
    def __init__(self) -> None:
        self._workers: dict[str, Worker] = {}
        self._rr = 0

    def add(self, url: str) -> tuple[Worker, bool]:
        """Add a worker; returns ``(worker, created)``. Adding a known URL is a no-op."""
        url = normalize_worker_url(url)
        existing = self._workers.get(url)
        if existing is not None:
            return existing, False
        w = Worker(url)
        self._workers[url] = w
        return w, True

    def remove(self, url: str) -> Worker:
        url = normalize_worker_url(url)
        w = self._workers.pop(url, None)
        if w is None:
            raise HTTPError(404, f"Worker {url} is not registered. Registered workers: {self.urls()}", param="url")
        w.removed = True
        return w

    def get(self, url: str) -> Worker | None:
        return self._workers.get(url)

    def urls(self) -> list[str]:
        return list(self._workers)

    def workers(self) -> list[Worker]:
        return list(self._workers.values())

    def available(self) -> list[Worker]:
        return [w for w in self._workers.values() if w.available]

    def round_robin(self, candidates: list[Worker]) -> Worker:
        """The core's default policy when no plugin selects a worker."""
        w = candidates[self._rr % len(candidates)]
        self._rr += 1
        return w

    def total_inflight(self) -> int:
        return sum(w.inflight for w in self._workers.values())

    def __len__(self) -> int:
        return len(self._workers)

    def __iter__(self) -> Iterator[Worker]:
        return iter(list(self._workers.values()))
