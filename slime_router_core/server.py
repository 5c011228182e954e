"""The router's uvicorn wrapper: a one-write HTTP protocol and a bounded graceful shutdown.

``GracefulServer``: the first SIGTERM/SIGINT stops accepting and lets running requests finish for at
most ``--shutdown-grace-seconds``; then the connections still open are closed (a ``/generate``
stream sees its client gone, so the worker's generation is aborted) and the process exits 0. A
second signal stops draining at once and exits 128+signal (within ``FORCE_EXIT_SECONDS`` whatever
the clean-up does); a third exits on the spot. No tracebacks on the way.

One write per response: uvicorn writes a response's head and body with two ``transport.write``
calls: two ``send`` syscalls for the router and two reads for the client, on every request. When the head announces a
``content-length`` (the whole body follows right away), it is held and leaves together with the body
in one write. Streaming responses (no content-length) are not held: their head goes out at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

import uvicorn

from .memory import release_free_heap

try:
    from uvicorn.protocols.http.httptools_impl import (
        HttpToolsProtocol,
        RequestResponseCycle,
    )
except ImportError:  # pragma: no cover - httptools is a dependency; uvicorn then picks its own protocol
    HttpToolsProtocol = RequestResponseCycle = None  # type: ignore[assignment,misc]


class _Collect:
    """Stands in for the transport while uvicorn writes a held response: collects what it writes."""

    __slots__ = ("chunks", "close_requested", "real")

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

    class OneWriteCycle(RequestResponseCycle):
        _held: list[bytes] | None = None

        async def send(self, message: Any) -> None:
            if self._held is None:
                if (message["type"] != "http.response.start" or self.response_started
                        or not any(k.lower() == b"content-length" for k, _ in message.get("headers", ()))):
                    return await super().send(message)
                self._held = []  # the head: written with the body
            real, out = self.transport, _Collect(self.transport, self._held)
            self.transport = out  # type: ignore[assignment]  # a duck-typed stand-in (write/close kept, rest forwarded)
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

    class OneWriteProtocol(HttpToolsProtocol):
        """``http=`` protocol for uvicorn: httptools, one write per complete response."""

        def _start_asgi_task(self, cycle: Any, app: Any) -> None:
            cycle.__class__ = OneWriteCycle
            super()._start_asgi_task(cycle, app)


def http_protocol() -> Any:
    """What to pass as uvicorn's ``http``: the one-write protocol, or "auto" without httptools."""
    return OneWriteProtocol if RequestResponseCycle is not None else "auto"


# --- bounded graceful shutdown -------------------------------------------------------------------

DEFAULT_SHUTDOWN_GRACE_SECONDS = 30.0
FORCE_EXIT_SECONDS = 5.0  # after a second signal the process is gone within this, clean-up finished or not
APP_SHUTDOWN_SECONDS = 15.0  # bound on the app's own clean-up (plugin shutdown hooks, closing pools)

log = logging.getLogger("slime_router")


class _DropCancelled(logging.Filter):
    """Drops uvicorn's "Exception in ASGI application" records for requests the shutdown cancelled."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[0] if record.exc_info else None
        return not (exc is not None and issubclass(exc, asyncio.CancelledError))


class GracefulServer(uvicorn.Server):
    """``uvicorn.Server`` whose shutdown is bounded and whose second signal exits now.

    uvicorn alone waits for every open connection without limit (``timeout_graceful_shutdown``
    defaults to none), only a second SIGINT (not SIGTERM) skips the wait, and the requests it then
    abandons are cancelled with tracebacks.

    ``exit_code`` after ``run``: 0 for a shutdown asked for once (drained, or cut at the end of the
    grace period), 128+signal when a second signal cut it short (``run`` then raises SystemExit).
    """

    def __init__(self, config: uvicorn.Config,
                 shutdown_grace_seconds: float = DEFAULT_SHUTDOWN_GRACE_SECONDS) -> None:
        super().__init__(config)
        if shutdown_grace_seconds < 0:
            raise ValueError(f"shutdown grace period must be >= 0 seconds, got {shutdown_grace_seconds}")
        self.shutdown_grace_seconds = shutdown_grace_seconds
        self.signals: list[int] = []
        self.cut = 0  # requests still running when the drain ended (closed, then cancelled if need be)
        self.exit_code = 0

    # signals: called by uvicorn's handler in the main thread; only flags here, no logging
    def handle_exit(self, sig: int, frame: Any) -> None:
        self.signals.append(sig)
        if not self.should_exit:
            self.should_exit = True  # uvicorn's main loop notices within 0.1 s and calls shutdown()
            return
        code = 128 + int(sig)
        if self.force_exit:  # a third signal: clean-up is taking too long for the operator
            _hard_exit(code, f"signal {_signame(sig)} again: exiting now\n")
        self.force_exit = True
        self.exit_code = code
        message = f"clean-up unfinished {FORCE_EXIT_SECONDS:g}s after the second signal: exiting now\n"
        timer = threading.Timer(FORCE_EXIT_SECONDS, _hard_exit, (code, message))
        timer.daemon = True
        timer.start()

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets=sockets)
        release_free_heap()  # after the app's start-up: what loading the tokenizer and the plugins left free

    def run(self, sockets: Any = None) -> None:
        super().run(sockets=sockets)
        if self.exit_code:
            raise SystemExit(self.exit_code)

    async def shutdown(self, sockets: Any = None) -> None:
        state = self.server_state
        loop = asyncio.get_running_loop()
        for server in self.servers:  # stop accepting
            server.close()
        for sock in sockets or []:
            sock.close()
        for connection in list(state.connections):
            connection.shutdown()  # idle keep-alive connections close now, busy ones after their response

        def busy() -> bool:
            return bool(state.connections or state.tasks)

        if busy() and not self.force_exit:
            log.warning("shutting down: waiting up to %gs for %d running request(s) "
                        "(send the signal again to stop now)", self.shutdown_grace_seconds, len(state.tasks))
            deadline = loop.time() + self.shutdown_grace_seconds
            while busy() and not self.force_exit and loop.time() < deadline:
                await asyncio.sleep(0.05)
        if busy():
            self.cut = len(state.tasks)
            log.warning("shutting down: %s; closing %d connection(s), %d request(s) unfinished",
                        "second signal" if self.force_exit else
                        f"grace period of {self.shutdown_grace_seconds:g}s over",
                        len(state.connections), len(state.tasks))
            await self._close_connections()
        for server in self.servers:
            await _wait_for(server.wait_closed(), 1.0)
        # the app's clean-up (plugin shutdown hooks, worker pools, the demo's workers), bounded
        timeout = 3.0 if self.force_exit else APP_SHUTDOWN_SECONDS
        if not await _wait_for(self.lifespan.shutdown(), timeout):
            log.error("shutting down: the application's clean-up did not finish within %gs", timeout)

    async def _close_connections(self) -> None:
        """Close every client connection: handlers see a disconnect (``/generate`` streams stop and their
        upstream connections close, which aborts the generation in the worker). What still runs a
        moment later is cancelled."""
        state = self.server_state
        for connection in list(state.connections):
            transport = getattr(connection, "transport", None)
            if transport is not None and not transport.is_closing():
                transport.close()
        await _until(lambda: not state.tasks, 1.0)
        if state.tasks:
            logging.getLogger("uvicorn.error").addFilter(_DropCancelled())
            for task in list(state.tasks):
                task.cancel()
            await _until(lambda: not state.tasks, 2.0)


async def _until(condition: Callable[[], bool], timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def _wait_for(awaitable: Any, timeout: float) -> bool:
    try:
        await asyncio.wait_for(awaitable, timeout)
        return True
    except asyncio.TimeoutError:
        return False


def _signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:  # pragma: no cover
        return str(sig)


def _hard_exit(code: int, message: str) -> None:
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        os.write(2, message.encode())
    finally:
        os._exit(code)
