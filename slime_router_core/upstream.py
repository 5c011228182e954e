"""A lean keep-alive HTTP/1.1 client for the generation path (asyncio.Protocol + httptools).

Profiling showed aiohttp's per-request machinery (request objects, payload wrappers, header
processing) as ~40 % of the router's CPU on pass-through ``/generate``; this client writes a
pre-built request head and the body in one call and parses replies with httptools (already
installed with ``uvicorn[standard]``). It does only what the hot path needs: POST a JSON body to a
worker, read the whole reply or stream it. Control-plane calls (health checks, broadcasts) use the
router's aiohttp session.

``https://`` workers are spoken to over TLS: the pool's ``ssl.SSLContext`` (by default the system's, as
``ssl.create_default_context()`` builds it, like aiohttp's verified default for the control plane, so both
honour ``SSL_CERT_FILE`` / ``SSL_CERT_DIR``) wraps new connections, with the URL's host as the SNI and
hostname to verify. Only connecting differs: the request path over an open connection is the same for both.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator

import httptools


class UpstreamConnectionError(ConnectionError):
    """The worker could not be reached, or dropped the connection before answering."""


class _Reply:
    """What one request collects. ``queue`` is set for streaming replies."""

    __slots__ = ("status", "content_type", "body", "headers_done", "done", "queue", "got_bytes")

    def __init__(self, loop: asyncio.AbstractEventLoop, stream: bool) -> None:
        self.status = 0
        self.content_type = b""
        self.body: list[bytes] = []
        self.headers_done = loop.create_future()  # status + headers arrived
        self.done = loop.create_future()  # whole message arrived
        self.queue: asyncio.Queue[bytes | None] | None = asyncio.Queue() if stream else None
        self.got_bytes = False


class _Connection(asyncio.Protocol):
    def __init__(self, pool: UpstreamPool, key: str) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.reply: _Reply | None = None
        self.closed = False
        self._header_name = b""

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.reply is not None:
            self.reply.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # pragma: no cover - workers don't upgrade
            self._fail(UpstreamConnectionError("unexpected protocol upgrade"))
        except httptools.HttpParserError as e:
            self._fail(UpstreamConnectionError(f"malformed HTTP reply: {e}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(UpstreamConnectionError(f"connection closed by the worker{f': {exc}' if exc else ''}"))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        if self.reply is not None and name.lower() == b"content-type":
            self.reply.content_type = value

    def on_headers_complete(self) -> None:
        reply = self.reply
        if reply is not None:
            reply.status = self.parser.get_status_code()
            if not reply.headers_done.done():
                reply.headers_done.set_result(None)

    def on_body(self, body: bytes) -> None:
        reply = self.reply
        if reply is not None:
            if reply.queue is not None:
                reply.queue.put_nowait(body)
            else:
                reply.body.append(body)

    def on_message_complete(self) -> None:
        reply, self.reply = self.reply, None
        if reply is None:
            return
        if reply.queue is not None:
            reply.queue.put_nowait(None)
        if not reply.done.done():
            reply.done.set_result(None)
        if self.parser.should_keep_alive() and not self.closed:
            self.pool._idle.setdefault(self.key, deque()).append(self)
        else:
            self.close()

    # ours
    def _fail(self, exc: Exception) -> None:
        self.closed = True
        reply, self.reply = self.reply, None
        if reply is not None:
            for fut in (reply.headers_done, reply.done):
                if not fut.done():
                    fut.set_exception(exc)
                    fut.exception()  # mark retrieved: the caller may only await one of them
            if reply.queue is not None:
                reply.queue.put_nowait(None)
        idle = self.pool._idle.get(self.key)
        if idle is not None and self in idle:
            idle.remove(self)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class StreamReply:
    """An open streaming reply: ``status``, ``content_type``, ``iter_chunks()``, then ``release()``."""

    def __init__(self, conn: _Connection, reply: _Reply) -> None:
        self._conn = conn
        self._reply = reply
        self.status = reply.status
        self.content_type = reply.content_type.decode("latin-1")

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        queue = self._reply.queue
        assert queue is not None
        while True:
            chunk = await queue.get()
            if chunk is None:
                break
            yield chunk
        if self._reply.done.done() and self._reply.done.exception() is not None:
            raise self._reply.done.exception()  # type: ignore[misc]
        if not self._reply.done.done():  # pragma: no cover - defensive
            raise UpstreamConnectionError("stream ended early")

    async def read(self) -> bytes:
        return b"".join([c async for c in self.iter_chunks()])

    def release(self) -> None:
        """Done with the reply: an unfinished one closes the connection (the worker aborts).

        A finished one's connection is already back in the pool (maybe serving another request).
        """
        if not self._reply.done.done():
            self._conn.close()


def default_ssl_context() -> ssl.SSLContext:
    """The client context for ``https://`` workers: system CAs (``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` honoured),
    certificate and hostname verified, HTTP/1.1 offered by ALPN (what aiohttp's verified default does)."""
    context = ssl.create_default_context()
    context.set_alpn_protocols(["http/1.1"])
    return context


class UpstreamPool:
    """Keep-alive connections per worker URL (``http://host:port`` or ``https://host:port``).

    The pool key is the normalized URL, so scheme, host and port all separate connections. ``ssl_context``
    is used for ``https://`` workers; ``None``: :func:`default_ssl_context`, built on the first one.
    """

    def __init__(self, connect_timeout: float = 5.0, ssl_context: ssl.SSLContext | None = None) -> None:
        self.connect_timeout = connect_timeout
        self.ssl_context = ssl_context
        self._idle: dict[str, deque[_Connection]] = {}
        self._heads: dict[tuple[str, str], bytes] = {}

    async def _connect(self, url: str) -> _Connection:
        scheme, _, hostport = url.partition("://")
        host, _, port = hostport.rpartition(":")
        host = host.strip("[]")
        tls: ssl.SSLContext | None = None
        if scheme == "https":
            if self.ssl_context is None:  # loading the CA store reads files: not on the event loop
                self.ssl_context = await asyncio.to_thread(default_ssl_context)
            tls = self.ssl_context
        elif scheme != "http":
            raise UpstreamConnectionError(f"cannot connect to {url}: unsupported scheme {scheme!r} (http or https)")
        loop = asyncio.get_running_loop()
        try:
            # the timeout covers the TLS handshake too
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(self, url), host, int(port), ssl=tls,
                                       server_hostname=host if tls is not None else None),
                self.connect_timeout)
        except asyncio.TimeoutError:
            raise UpstreamConnectionError(f"connect to {url} timed out after {self.connect_timeout}s") from None
        except ssl.SSLCertVerificationError as e:
            if e.verify_code in (62, 64):  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
                fix = "register the worker under a host name or IP address that its certificate lists"
            else:
                fix = ("certificates are verified against the system CA store: point SSL_CERT_FILE at a CA bundle "
                       "that includes the worker's certificate authority")
            raise UpstreamConnectionError(f"cannot connect to {url}: the worker's TLS certificate was not accepted "
                                          f"({e.verify_message or e}); {fix}") from None
        except OSError as e:  # ssl.SSLError included (e.g. an https:// URL on a plain-HTTP port)
            raise UpstreamConnectionError(f"cannot connect to {url}: {e}") from None
        return conn

    def _head(self, url: str, path: str) -> bytes:
        head = self._heads.get((url, path))
        if head is None:
            hostport = url.split("://", 1)[1]
            head = (f"POST {path} HTTP/1.1\r\nHost: {hostport}\r\nContent-Type: application/json\r\n"
                    f"Accept: */*\r\nContent-Length: ").encode()
            self._heads[(url, path)] = head
        return head

    async def _send(self, url: str, path: str, payload: bytes, stream: bool) -> tuple[_Connection, _Reply]:
        """Write the request; wait for the reply's headers. A reused connection that the worker had
        already closed (keep-alive timeout) is retried once on a fresh connection."""
        loop = asyncio.get_running_loop()
        idle = self._idle.get(url)
        for attempt in range(2):
            reused = False
            conn = None
            while idle:
                c = idle.pop()
                if not c.closed:
                    conn, reused = c, True
                    break
            if conn is None:
                conn = await self._connect(url)
            reply = _Reply(loop, stream)
            conn.reply = reply
            assert conn.transport is not None
            conn.transport.write(b"".join((self._head(url, path), str(len(payload)).encode(), b"\r\n\r\n", payload)))
            try:
                await reply.headers_done
            except UpstreamConnectionError:
                if reused and not reply.got_bytes and attempt == 0:
                    continue  # stale keep-alive connection: nothing was processed, try a new one
                raise
            except BaseException:
                conn.close()  # cancelled (client gone): drop the connection so the worker aborts
                raise
            return conn, reply
        raise AssertionError("unreachable")  # pragma: no cover

    async def post(self, url: str, path: str, payload: bytes) -> tuple[int, bytes]:
        """POST and read the whole reply: (status, body)."""
        conn, reply = await self._send(url, path, payload, stream=False)
        try:
            await reply.done
        except UpstreamConnectionError:
            raise
        except BaseException:
            conn.close()
            raise
        body = reply.body
        return reply.status, (body[0] if len(body) == 1 else b"".join(body))

    async def stream(self, url: str, path: str, payload: bytes) -> StreamReply:
        """POST and return as soon as the headers arrived; the body is read with ``iter_chunks``."""
        conn, reply = await self._send(url, path, payload, stream=True)
        return StreamReply(conn, reply)

    def close(self) -> None:
        for conns in self._idle.values():
            for c in list(conns):
                c.close()
        self._idle.clear()
