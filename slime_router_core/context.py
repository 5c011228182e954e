"""RequestContext: what the request-path hooks see and change."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .workers import Worker


class RequestContext:
    """One client request on its way through the router.

    ``body`` is the JSON object that will be sent upstream; ``pre_request`` hooks may mutate or
    replace it. ``state`` is scratch space for plugins (use your plugin's name as key prefix).
    """

    __slots__ = (
        "route", "upstream_path", "body", "raw_body", "_headers", "_raw_headers", "stream", "state", "worker",
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
        self.state: dict[str, Any] = {}
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
