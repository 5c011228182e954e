"""The lean upstream client against a raw asyncio HTTP server (precise control of the wire)."""

from __future__ import annotations

import asyncio

import pytest

from slime_router_core.upstream import UpstreamConnectionError, UpstreamPool
from slime_router_testing import free_port


class RawServer:
    """Answers each request per ``mode``; counts connections and EOFs."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.connections = 0
        self.eofs = 0
        self.bodies: list[bytes] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                self.bodies.append(await reader.readexactly(length))
                if self.mode == "hang":
                    await reader.read()  # until the client closes
                    self.eofs += 1
                    return
                if self.mode in ("json", "close_after"):
                    body = b'{"text": "ok"}'
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                                 + str(len(body)).encode() + b"\r\n\r\n" + body)
                    await writer.drain()
                    if self.mode == "close_after":  # like a keep-alive timeout, without saying so
                        writer.close()
                        return
                    continue
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n")
                for i in range(3):
                    data = f"data: {i}\n\n".encode()
                    writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                    await writer.drain()
                    await asyncio.sleep(0.05)
                    if self.mode == "drop_mid_stream" and i == 1:
                        writer.close()
                        return
                writer.write(b"0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            self.eofs += 1


async def serve(mode: str) -> tuple[RawServer, asyncio.AbstractServer, str]:
    raw = RawServer(mode)
    port = free_port()
    server = await asyncio.start_server(raw.handle, "127.0.0.1", port)
    return raw, server, f"http://127.0.0.1:{port}"


def test_keep_alive_reuses_one_connection_and_sends_content_length():
    async def main() -> None:
        raw, server, url = await serve("json")
        pool = UpstreamPool()
        for i in range(5):
            assert await pool.post(url, "/generate", b'{"i": %d}' % i) == (200, b'{"text": "ok"}')
        assert raw.connections == 1 and raw.bodies[-1] == b'{"i": 4}'
        pool.close()
        server.close()
    asyncio.run(main())


def test_a_connection_the_worker_closed_while_idle_is_replaced_transparently():
    async def main() -> None:
        raw, server, url = await serve("close_after")
        pool = UpstreamPool()
        for _ in range(3):
            assert (await pool.post(url, "/generate", b"{}"))[0] == 200
            await asyncio.sleep(0)  # the close may or may not have been seen yet: both must work
        assert raw.connections == 3
        pool.close()
        server.close()
    asyncio.run(main())


def test_chunked_stream_arrives_incrementally_and_the_connection_is_reused():
    async def main() -> None:
        raw, server, url = await serve("stream")
        pool = UpstreamPool()
        for _ in range(2):
            reply = await pool.stream(url, "/generate", b"{}")
            assert reply.status == 200 and reply.content_type == "text/event-stream"
            loop = asyncio.get_running_loop()
            times, chunks = [], []
            async for chunk in reply.iter_chunks():
                times.append(loop.time())
                chunks.append(chunk)
            reply.release()
            assert b"".join(chunks) == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
            assert times[-1] - times[0] > 0.08
        assert raw.connections == 1
        pool.close()
        server.close()
    asyncio.run(main())


def test_a_worker_dropping_mid_stream_is_an_error_not_a_silent_end():
    async def main() -> None:
        _, server, url = await serve("drop_mid_stream")
        pool = UpstreamPool()
        reply = await pool.stream(url, "/generate", b"{}")
        with pytest.raises(UpstreamConnectionError):
            async for _ in reply.iter_chunks():
                pass
        server.close()
    asyncio.run(main())


def test_unreachable_worker_is_a_connection_error():
    async def main() -> None:
        with pytest.raises(UpstreamConnectionError, match="cannot connect"):
            await UpstreamPool().post(f"http://127.0.0.1:{free_port()}", "/generate", b"{}")
    asyncio.run(main())


def test_cancelling_a_request_closes_its_connection_so_the_worker_can_abort():
    async def main() -> None:
        raw, server, url = await serve("hang")
        pool = UpstreamPool()
        task = asyncio.create_task(pool.post(url, "/generate", b"{}"))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(50):
            if raw.eofs:
                break
            await asyncio.sleep(0.01)
        assert raw.eofs == 1
        server.close()
    asyncio.run(main())
