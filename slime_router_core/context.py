"""RequestContext: what the request-path hooks see and change."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

if TYPE_CHECKING:  # pragma: no cover
    from .workers import Worker

T = TypeVar("T")
D = TypeVar("D")


class StashKey(Generic[T]):
    """A typed key into ``RequestContext.stash`` (after pytest's ``StashKey``): keys are compared by identity, so
    two plugins cannot collide by choosing the same string, and ``ctx.stash[KEY]`` has ``KEY``'s value type.

    A plugin's private values use a key the plugin module creates; values shared between plugins use the keys in
    ``slime_router_core.contracts``. ``name`` is for error messages and debugging only."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"StashKey({self.name!r})"


if TYPE_CHECKING:
    class Stash:
        """Per-request values keyed by ``StashKey``: ``stash[KEY] = v``, ``stash[KEY]``, ``stash.get(KEY)``,
        ``KEY in stash``, ``stash.pop(KEY, default)`` -- each typed by its key."""

        def __setitem__(self, key: StashKey[T], value: T) -> None: ...

        def __getitem__(self, key: StashKey[T]) -> T: ...

        @overload
        def get(self, key: StashKey[T]) -> T | None: ...

        @overload
        def get(self, key: StashKey[T], default: D) -> T | D: ...

        def get(self, key: StashKey[Any], default: Any = None) -> Any: ...

        @overload
        def pop(self, key: StashKey[T]) -> T | None: ...

        @overload
        def pop(self, key: StashKey[T], default: D) -> T | D: ...

        def pop(self, key: StashKey[Any], default: Any = None) -> Any: ...

        def __contains__(self, key: StashKey[Any]) -> bool: ...
else:
    class Stash(dict):
        """At run time a plain dict keyed by ``StashKey`` objects (its methods are C code: several plugins touch
        the stash on every request); the typed view above is what mypy checks."""

        __slots__ = ()


class RequestContext:
    """One client request on its way through the router.

    ``body`` is the JSON object that will be sent upstream; ``pre_request`` hooks may mutate or
    replace it. ``stash`` holds per-request values plugins set, under typed ``StashKey``s.
    """

    __slots__ = (
        "route", "upstream_path", "body", "raw_body", "_headers", "_raw_headers", "stream", "stash", "worker",
        "tried", "attempts", "status", "error", "response", "raw_response", "inspect_stream", "started",
        "timings", "sent_to_client", "request_id", "router",
    )

    def __init__(self, route: str, body: Any, raw_body: bytes | None = None,
                 headers: dict[str, str] | None = None, upstream_path: str | None = None,
                 router: Any = None) -> None:
        self.route = route
        self.upstream_path = upstream_path or route
        self.body = body
        self.raw_body = raw_body
        self._headers = headers
        self._raw_headers: list[tuple[bytes, bytes]] | None = None
        self.stream = bool(body.get("stream")) if isinstance(body, dict) else False
        self.stash = Stash()
        self.worker: Worker | None = None
        self.tried: list[Worker] = []
        self.attempts = 0
        self.status = 0
        self.error: str | None = None
        self.response: Any = None
        self.raw_response: bytes | None = None  # the worker's reply as received (non-streaming replies)
        self.inspect_stream = False
        self.started = time.perf_counter()
        self.timings: dict[str, float] = {}
        self.sent_to_client = False
        self.request_id: str | None = None
        self.router = router  # the Router serving this request (set by the core when not given)

    @property
    def headers(self) -> dict[str, str]:
        """Request headers, lower-case names (decoded on first use: most requests never need them)."""
        if self._headers is None:
            raw = self._raw_headers or []
            self._headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in raw}
        return self._headers

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"<RequestContext {self.route} status={self.status} worker={getattr(self.worker, 'url', None)}>"
