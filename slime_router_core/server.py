"""uvicorn's httptools protocol with one socket write per complete response.

uvicorn writes a response's head and body with two ``transport.write`` calls: two ``send`` syscalls
for the router and two reads for the client, on every request. When the head announces a
``content-length`` (the whole body follows right away), it is held and leaves together with the body
in one write. Streaming responses (no content-length) are not held: their head goes out at once.
"""

from __future__ import annotations

from typing import Any

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
except ImportError:  # pragma: no cover - httptools is a dependency; uvicorn then picks its own protocol
    HttpToolsProtocol = RequestResponseCycle = None  # type: ignore[assignment,misc]


class _Collect:
    """Stands in for the transport while uvicorn writes a held response: collects what it writes."""

    __slots__ = ("real", "chunks", "close_requested")

    def __init__(self, real: Any, chunks: list[bytes]) -> None:
        self.real = real
        self.chunks = chunks
        self.close_requested = False

    def write(self, data: bytes) -> None:
        self.chunks.append(data)

    def close(self) -> None:
        self.close_requested = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


if RequestResponseCycle is not None:

    class OneWriteCycle(RequestResponseCycle):  # type: ignore[misc,valid-type]
        _held: list[bytes] | None = None

        async def send(self, message: Any) -> None:
            if self._held is None:
                if (message["type"] != "http.response.start" or self.response_started
                        or not any(k.lower() == b"content-length" for k, _ in message.get("headers", ()))):
                    return await super().send(message)
                self._held = []  # the head: written with the body
            real, out = self.transport, _Collect(self.transport, self._held)
            self.transport = out
            try:
                await super().send(message)
            finally:
                self.transport = real
            if message["type"] == "http.response.start":
                return
            self._held = None
            if out.chunks and not self.disconnected:
                real.write(b"".join(out.chunks))
            if out.close_requested:
                real.close()

    class OneWriteProtocol(HttpToolsProtocol):  # type: ignore[misc,valid-type]
        """``http=`` protocol for uvicorn: httptools, one write per complete response."""

        def _start_asgi_task(self, cycle: Any, app: Any) -> None:
            cycle.__class__ = OneWriteCycle
            super()._start_asgi_task(cycle, app)


def http_protocol() -> Any:
    """What to pass as uvicorn's ``http``: the one-write protocol, or "auto" without httptools."""
    return OneWriteProtocol if RequestResponseCycle is not None else "auto"
