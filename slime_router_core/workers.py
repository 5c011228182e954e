"""The worker pool: URLs, in-flight counts and availability.

Everything here runs on the event loop thread with no ``await`` inside a state change, so
counts are exact under any concurrency without locks.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterable, Iterator
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


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _ip(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


class WorkerAllowlist:
    """``--worker-allowlist``: the hosts (``gpu-node-1``, ``10.0.0.5``, ``[::1]``), ``host:port``s and CIDRs
    (``10.0.0.0/8``) workers may be at. Empty: any worker.

    An open (or leaked) admin API that adds any URL as a worker makes the router send requests wherever it is told
    (SSRF); with an allowlist, ``/add_worker`` and ``--worker-url`` refuse other addresses. Health checks,
    broadcasts and generations only ever target workers of the pool, so checking what enters the pool suffices.

    Nothing is resolved: a hostname entry matches the URL's host literally (case-insensitively), a CIDR or IP
    entry matches only URLs whose host is an IP literal. A check through DNS would hold only for the answer of
    the moment: the name's next answer (the connection's own lookup, a re-resolution, a rebinding attack) can
    point elsewhere.
    """

    def __init__(self, entries: Iterable[str] = ()) -> None:
        self.entries: list[str] = []  # as given, for messages
        self.networks: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, int | None]] = []
        self.hosts: list[tuple[str, int | None]] = []
        for entry in entries:
            self.add(entry)

    @classmethod
    def parse(cls, entries: Iterable[str] | None) -> WorkerAllowlist:
        """From the flag's values (repeated or comma-separated); ValueError naming a bad entry."""
        return cls(x.strip() for v in entries or [] for x in v.split(",") if x.strip())

    def add(self, entry: str) -> None:
        bad = f"Invalid value for --worker-allowlist: {entry!r}"
        text = entry.strip()
        if "://" in text:
            raise ValueError(f"{bad}: give a host, host:port or CIDR, not a URL (e.g. 10.0.0.0/8, gpu-node-1:30001)")
        if "/" in text:
            try:
                self.networks.append((ipaddress.ip_network(text, strict=False), None))
            except ValueError as e:
                raise ValueError(f"{bad}: not a CIDR ({e})") from None
        else:
            port: int | None = None
            host = text
            if text.startswith("["):  # [v6] or [v6]:port
                host, _, rest = text[1:].partition("]")
                if rest:
                    if not rest.startswith(":"):
                        raise ValueError(f"{bad}: expected [IPv6]:port")
                    port = self._port(rest[1:], bad)
            elif text.count(":") == 1:  # host:port (a bare IPv6 address has several colons)
                host, _, p = text.partition(":")
                port = self._port(p, bad)
            ip = _ip(host)
            if ip is not None:
                self.networks.append((ipaddress.ip_network(ip), port))
            elif not host or any(c in host for c in " []@?#:"):
                raise ValueError(f"{bad}: not a host, host:port or CIDR")
            else:
                self.hosts.append((host.lower(), port))
        self.entries.append(text)

    @staticmethod
    def _port(text: str, bad: str) -> int:
        if not text.isdigit() or not 0 < int(text) < 65536:
            raise ValueError(f"{bad}: bad port {text!r}")
        return int(text)

    def __bool__(self) -> bool:
        return bool(self.entries)

    def allows(self, url: str) -> bool:
        """Whether a normalized worker URL (``normalize_worker_url``) is at an allowed address."""
        if not self.entries:
            return True
        parts = urlsplit(url)
        host, port = (parts.hostname or "").lower(), parts.port
        ip = _ip(host)
        if ip is not None:
            return any(ip in net and (p is None or p == port) for net, p in self.networks)
        return any(host == h and (p is None or p == port) for h, p in self.hosts)

    def refusal(self, url: str) -> str:
        return (f"Worker {url} is not in the worker allowlist (--worker-allowlist {','.join(self.entries)}): "
                f"only workers at those hosts, host:ports or networks may be added. Hostnames match literally and "
                f"networks match IP addresses (nothing is resolved); add its address to the allowlist to use it.")

    def check(self, url: str) -> None:
        """HTTPError 403 when the (normalized) URL is not allowed."""
        if not self.allows(url):
            raise HTTPError(403, self.refusal(url), type="permission_error", param="url",
                            code="worker_not_allowed")

    def check_startup(self, url: str) -> None:
        """ValueError (start-up's error) naming ``--worker-url`` when the URL is not allowed."""
        if not self.entries:
            return
        try:
            normalized = normalize_worker_url(url)
        except HTTPError as e:
            raise ValueError(f"--worker-url: {e.message}") from None
        if not self.allows(normalized):
            raise ValueError(f"--worker-url {normalized}: {self.refusal(normalized)}")


class Worker:
    """One upstream SGLang worker. ``state`` is for plugins (health, circuit, latency...)."""

    __slots__ = ("url", "inflight", "requests", "failures", "healthy", "removed", "added_at", "state", "engine")

    def __init__(self, url: str) -> None:
        self.url = url
        self.inflight = 0
        self.requests = 0
        self.failures = 0
        self.healthy = True  # flipped by a health checker plugin
        self.removed = False
        self.added_at = time.time()
        self.state: dict[str, Any] = {}
        self.engine: Any = None  # a contracts.Engine adapter; None: SGLang, the router's own wire format

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
        return {"url": self.url, "engine": self.engine.name if self.engine is not None else "sglang",
                "in_flight": self.inflight, "requests": self.requests, "failures": self.failures,
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
