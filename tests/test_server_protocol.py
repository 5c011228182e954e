"""The one-write uvicorn protocol: complete responses leave in one socket write, streams are not held."""

from __future__ import annotations

import threading
import time

import httpx
import uvicorn

from slime_router_core.server import OneWriteProtocol
from slime_router_testing import free_port

WRITES: list[bytes] = []


class _Counting:
    def __init__(self, real):
        self.real = real

    def write(self, data):
        WRITES.append(bytes(data))
        self.real.write(data)

    def __getattr__(self, name):
        return getattr(self.real, name)


class CountingProtocol(OneWriteProtocol):
    def connection_made(self, transport):
        super().connection_made(transport)
        self.transport = _Counting(self.transport)


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    if scope["path"] == "/json":
        body = b'{"ok": true}'
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
    elif scope["path"] == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        for part in (b"a", b"b"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    else:
        raise RuntimeError("boom")  # uvicorn answers 500 through the same send


def test_complete_responses_leave_in_one_write_and_streams_are_not_held():
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical",
                                           loop="asyncio", http=CountingProtocol))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.01)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            WRITES.clear()
            r = client.get("/json")
            assert r.status_code == 200 and r.json() == {"ok": True}
            assert len(WRITES) == 1 and WRITES[0].startswith(b"HTTP/1.1 200") and WRITES[0].endswith(b'{"ok": true}')
            WRITES.clear()
            r = client.get("/stream")
            assert r.text == "ab"
            assert WRITES[0].startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in WRITES[0]
            assert len(WRITES) >= 3  # the head went out before the first chunk
            WRITES.clear()
            r = client.get("/fail")
            assert r.status_code == 500 and r.text == "Internal Server Error" and len(WRITES) == 1
            r = client.get("/json")  # keep-alive connection still serves
            assert r.status_code == 200
    finally:
        server.should_exit = True
        thread.join(timeout=10)
