"""``https://`` workers: the generation client speaks TLS to them (issue 13, defect 2).

Before, the control plane (aiohttp) reached an https worker and its health checks passed, but every generation
failed: the lean upstream client opened plain TCP to a TLS port. Real TLS servers here: uvicorn with a
certificate issued by a throw-away CA that the test makes with the ``openssl`` command.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from slime_router_core.tokenizers import BUILTIN_CHECKPOINT
from slime_router_core.upstream import UpstreamConnectionError, UpstreamPool
from slime_router_testing import ServerThread, free_port, wait_http

CA_CONFIG = """[req]
distinguished_name = dn
prompt = no
x509_extensions = ca_ext
[dn]
CN = slime-router test CA
[ca_ext]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
"""

LEAF_EXT = """basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = {san}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""
EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


class Certs:
    """A throw-away CA and the certificates it issues (``openssl`` command)."""

    def __init__(self, openssl: str, root: Path) -> None:
        self.openssl = openssl
        self.root = root
        self.ca = root / "ca.pem"
        (root / "ca.cnf").write_text(CA_CONFIG)
        self._run("req", "-x509", *EC_KEY, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-config", "ca.cnf")
        self.cert, self.key = self.issue("server", "IP:127.0.0.1, DNS:localhost")

    def _run(self, *args: str) -> None:
        subprocess.run([self.openssl, *args], cwd=self.root, check=True, capture_output=True, timeout=60)

    def issue(self, name: str, san: str) -> tuple[Path, Path]:
        (self.root / f"{name}.ext").write_text(LEAF_EXT.format(san=san))
        self._run("req", "-new", *EC_KEY, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        self._run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                  "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")
        return self.root / f"{name}.pem", self.root / f"{name}.key"

    def client_context(self) -> ssl.SSLContext:
        """What a deployment that trusts this CA gets (verification on, as by default)."""
        return ssl.create_default_context(cafile=str(self.ca))


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("needs the openssl command to issue a test certificate")
    return Certs(openssl, tmp_path_factory.mktemp("tls"))


class TLSServerThread(ServerThread):
    """``ServerThread`` with TLS: uvicorn serving ``app`` on https://127.0.0.1:<port>."""

    def __init__(self, app: Any, certs: Certs, cert: Path | None = None, key: Path | None = None) -> None:
        import uvicorn

        super().__init__(app)
        config = uvicorn.Config(app, host=self.host, port=self.port, log_level="warning", lifespan="on",
                                loop="asyncio", ssl_certfile=str(cert or certs.cert),
                                ssl_keyfile=str(key or certs.key))
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True, name=f"uvicorn-tls-{self.port}")
        self.url = f"https://{self.host}:{self.port}"


def echo_app(stream_ended: threading.Event | None = None) -> Starlette:
    """POST /generate: the body back, with the client's port (same port: same kept-alive connection).
    POST /stream: three SSE events. POST /endless: events until the client goes (then ``stream_ended``)."""

    async def generate(request: Request) -> JSONResponse:
        port = request.client.port if request.client else None
        return JSONResponse({"got": json.loads(await request.body()), "client_port": port})

    async def stream(request: Request) -> StreamingResponse:
        await request.body()

        async def events() -> Any:
            for i in range(3):
                yield f"data: {i}\n\n".encode()

        return StreamingResponse(events(), media_type="text/event-stream")

    async def endless(request: Request) -> StreamingResponse:
        await request.body()

        async def events() -> Any:
            try:
                while True:
                    yield b"data: {}\n\n"
                    await asyncio.sleep(0.01)
            finally:
                if stream_ended is not None:
                    stream_ended.set()

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[Route("/generate", generate, methods=["POST"]),
                             Route("/stream", stream, methods=["POST"]),
                             Route("/endless", endless, methods=["POST"])])


@pytest.fixture
def tls_echo(certs: Certs, servers_to_stop: list) -> Iterator[ServerThread]:
    server = TLSServerThread(echo_app(), certs).start()
    servers_to_stop.append(server)  # stopped after the test
    yield server


def test_post_and_stream_over_tls_on_one_kept_alive_connection(certs, tls_echo):
    async def main() -> None:
        pool = UpstreamPool(ssl_context=certs.client_context())
        ports = set()
        for i in range(3):
            status, body = await pool.post(tls_echo.url, "/generate", b'{"i": %d}' % i)
            reply = json.loads(body)
            assert status == 200 and reply["got"] == {"i": i}
            ports.add(reply["client_port"])
        assert len(ports) == 1  # keep-alive over TLS: one connection for all three
        stream = await pool.stream(tls_echo.url, "/stream", b"{}")
        try:
            assert stream.status == 200 and stream.content_type.startswith("text/event-stream")
            assert await stream.read() == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
        finally:
            stream.release()
        assert len(pool._idle[tls_echo.url]) == 1  # back in the pool, keyed by the https URL
        pool.close()

    asyncio.run(main())


def test_releasing_an_unfinished_tls_stream_ends_it_in_the_worker(certs):
    """A client gone mid-stream closes the upstream connection, so the worker stops generating (over TLS too)."""
    ended = threading.Event()
    server = TLSServerThread(echo_app(stream_ended=ended), certs).start()
    try:
        async def main() -> None:
            pool = UpstreamPool(ssl_context=certs.client_context())
            reply = await pool.stream(server.url, "/endless", b"{}")
            chunks = reply.iter_chunks()
            assert (await chunks.__anext__()).startswith(b"data: ")
            reply.release()
            assert not pool._idle.get(server.url)  # an unfinished reply's connection is not reused
            assert await asyncio.to_thread(ended.wait, 30), "the worker kept streaming after the release"
            pool.close()

        asyncio.run(main())
    finally:
        server.stop()


def test_untrusted_worker_certificate_is_a_clear_error(certs, tls_echo):
    async def main() -> None:
        pool = UpstreamPool()  # the system CA store, which does not hold the test CA
        with pytest.raises(UpstreamConnectionError) as e:
            await pool.post(tls_echo.url, "/generate", b"{}")
        assert tls_echo.url in str(e.value) and "certificate" in str(e.value) and "SSL_CERT_FILE" in str(e.value)

    asyncio.run(main())


def test_certificate_for_another_host_is_refused(certs):
    """Verification includes the hostname: a trusted certificate issued for another name is refused."""
    cert, key = certs.issue("elsewhere", "DNS:worker.elsewhere.test")
    server = TLSServerThread(echo_app(), certs, cert=cert, key=key).start()
    try:
        async def main() -> None:
            pool = UpstreamPool(ssl_context=certs.client_context())
            with pytest.raises(UpstreamConnectionError, match="certificate was not accepted") as e:
                await pool.post(server.url, "/generate", b"{}")
            assert "127.0.0.1" in str(e.value) and "certificate lists" in str(e.value)

        asyncio.run(main())
    finally:
        server.stop()


def test_https_url_on_a_plain_http_port_fails_fast(certs):
    plain = ServerThread(echo_app()).start()
    try:
        async def main() -> None:
            pool = UpstreamPool(ssl_context=certs.client_context())
            with pytest.raises(UpstreamConnectionError, match="cannot connect to https://"):
                await pool.post(plain.url.replace("http://", "https://"), "/generate", b"{}")

        asyncio.run(main())
    finally:
        plain.stop()


def _slime_router() -> list[str]:
    exe = shutil.which("slime-router", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "slime_router_core.cli"]


@pytest.mark.slow  # the router in its own process (the real CLI)
def test_router_generates_on_an_https_worker_end_to_end(certs, tokenizer_dir):
    """The real CLI with ``--worker-url https://...``: /generate (whole and streamed), the OpenAI route and the
    trajectory cache work, and the health checks (aiohttp) keep the worker in rotation. The router trusts the
    test CA the way a deployment would: SSL_CERT_FILE."""
    from slime_router_testing.mock_worker import MockWorkerConfig, create_mock_worker_app

    health_checks: list[int] = []
    second_health_check = threading.Event()  # rounds run one after another: the first one is then complete
    inner = create_mock_worker_app(MockWorkerConfig(hf_checkpoint=BUILTIN_CHECKPOINT))

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/health":
            health_checks.append(1)
            if len(health_checks) >= 2:
                second_health_check.set()
        await inner(scope, receive, send)

    worker = TLSServerThread(app, certs).start()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, SSL_CERT_FILE=str(certs.ca))
    cmd = _slime_router() + ["serve", "--host", "127.0.0.1", "--port", str(port), "--worker-url", worker.url,
                             "--hf-checkpoint", BUILTIN_CHECKPOINT, "--health-check-interval", "0.2",
                             "--health-failure-threshold", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        wait_http(url + "/health", timeout=120, proc=proc)
        assert second_health_check.wait(timeout=60), "the router did not health-check the https worker"

        prompt = "Hello, my name is"
        r = httpx.post(url + "/generate", json={"text": prompt, "sampling_params": {"max_new_tokens": 8}},
                       timeout=60)
        assert r.status_code == 200, r.text
        gen = r.json()
        assert gen["output_ids"]
        got = httpx.post(url + "/retrieve_from_text", json={"text": prompt + gen["text"], "strict": True},
                         timeout=60).json()
        assert got["exact_tokens"] > 0 and got["tokens"][-len(gen["output_ids"]):] == gen["output_ids"]

        with httpx.stream("POST", url + "/generate", timeout=60, json={
                "text": "Streaming over TLS", "stream": True, "sampling_params": {"max_new_tokens": 8}}) as s:
            assert s.status_code == 200
            events = [line for line in s.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and len(events) >= 2

        chat = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8})
        assert chat.status_code == 200, chat.text
        assert chat.json()["choices"][0]["message"]["role"] == "assistant"

        # a health check ran and, with one failure enough to take it out, the worker is still in rotation
        listed = httpx.get(url + "/list_workers", timeout=30).json()
        assert listed["urls"] == [worker.url]
        metrics = httpx.get(url + "/metrics", timeout=30).json()
        assert metrics["router"]["active_workers"] == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        worker.stop()
    assert "unreachable" not in out, out
