"""A zero-cost fake SGLang worker for router-overhead benchmarks.

With nginx installed: one nginx process (1 worker process, access log off) whose ``server`` blocks answer
``POST /generate`` with a fixed SGLang-shaped JSON reply (``return 200 '...'``) or, on the SSE ports, with a
fixed ``text/event-stream`` reply (two chunks + ``[DONE]``). Health / info endpoints answer too, so that
sglang-router accepts the workers.

Without nginx: the fastest Python stand-in, a raw ``asyncio.Protocol`` HTTP/1.1 server (uvloop when available)
that sends the same fixed bytes (SSE when the body says ``"stream": true`` or on the SSE ports).

The fixed reply is built with the bundled real Qwen3 tokenizer so that ``text`` and ``output_ids`` agree (the
trajectory cache lines them up), with the ``<|im_end|>`` EOS id in ``output_ids`` but not in ``text``, exactly
like SGLang with ``skip_special_tokens``.

    python -m bench.fake_worker --ports 18001 18002            # serve until Ctrl-C
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPLY_TEXT = " The answer is 42, because six times seven is forty-two."
EOS_ID = 151645  # <|im_end|>
# Used only when the tokenizer cannot be loaded (the ids then do not line up with the text).
_FALLBACK_IDS = [576, 4226, 374, 220, 19, 17, 11, 1576, 4743, 3039, 8094, 374, 35398, 34429, 13]


def reply_ids(text: str = REPLY_TEXT) -> list[int]:
    try:
        from slime_router_core.tokenizers import BUILTIN_CHECKPOINT, load_tokenizer

        tok = load_tokenizer(BUILTIN_CHECKPOINT)
        backend = getattr(tok, "backend_tokenizer", None)
        ids = (backend.encode(text, add_special_tokens=False).ids if backend
               else tok.encode(text, add_special_tokens=False))
        return list(ids) + [EOS_ID]
    except Exception:  # pragma: no cover - the bench still measures proxies without it
        return _FALLBACK_IDS + [EOS_ID]


def _dumps(obj: object) -> str:
    # Compact and ASCII: the same bytes Starlette's JSONResponse would produce, so a proxy that
    # re-serializes the reply (the baseline) keeps the Content-Length it copies from upstream.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def generate_reply(text: str = REPLY_TEXT) -> dict:
    ids = reply_ids(text)
    return {
        "text": text,
        "output_ids": ids,
        "meta_info": {
            "id": "0123456789abcdef0123456789abcdef",
            "finish_reason": {"type": "stop", "matched": EOS_ID},
            "prompt_tokens": 128,
            "completion_tokens": len(ids),
            "cached_tokens": 0,
            "weight_version": "default",
            "e2e_latency": 0.001,
            "output_token_logprobs": [[-0.125, t, None] for t in ids],
        },
    }


def sse_reply(text: str = REPLY_TEXT) -> str:
    """Two cumulative chunks (SGLang 0.5.10+ default) then [DONE]."""
    full = generate_reply(text)
    half = len(full["output_ids"]) // 2
    first = json.loads(_dumps(full))
    first["text"] = text[: len(text) // 2]
    first["output_ids"] = full["output_ids"][:half]
    first["meta_info"]["completion_tokens"] = half
    first["meta_info"]["finish_reason"] = None
    first["meta_info"]["output_token_logprobs"] = full["meta_info"]["output_token_logprobs"][:half]
    del first["meta_info"]["e2e_latency"]
    # Keep the chunk's text consistent with its ids is not needed for TTFB; the final chunk is exact.
    return f"data: {_dumps(first)}\n\ndata: {_dumps(full)}\n\ndata: [DONE]\n\n"


def vllm_generate_reply(text: str = REPLY_TEXT) -> dict:
    """The same generation as ``generate_reply``, as vLLM's ``/inference/v1/generate`` answers it (token ids and
    chat-shaped logprobs; no text, no weight version)."""
    ids = reply_ids(text)
    return {"request_id": "0123456789abcdef0123456789abcdef", "model": "fake/Qwen3", "created": 0,
            "choices": [{"index": 0, "token_ids": ids, "finish_reason": "stop", "logprobs": {"content": [
                {"token": f"token_id:{t}", "logprob": -0.125, "bytes": None, "top_logprobs": []} for t in ids]}}],
            "usage": {"prompt_tokens": 128, "completion_tokens": len(ids), "total_tokens": 128 + len(ids)},
            "prompt_logprobs": None, "kv_transfer_params": None}


# what a vLLM worker's /openapi.json lists (the router reads it to tell the engine) and its weight version
VLLM_INFO = {
    "/openapi.json": ("application/json", _dumps({"paths": {"/inference/v1/generate": {}, "/v1/completions": {},
                                                            "/weight_info": {}, "/health": {}}})),
    "/weight_info": ("application/json", _dumps({"weight_version": "default"})),
    "/health": ("text/plain", ""),
}

INFO = {
    "/health": ("text/plain", ""),
    "/health_generate": ("text/plain", ""),
    "/get_model_info": ("application/json", _dumps({"model_path": "fake/Qwen3", "tokenizer_path": "fake/Qwen3",
                                                     "is_generation": True, "weight_version": "default"})),
    "/model_info": ("application/json", _dumps({"model_path": "fake/Qwen3", "tokenizer_path": "fake/Qwen3",
                                                 "is_generation": True, "weight_version": "default"})),
    "/get_server_info": ("application/json", _dumps({"dp_size": 1, "tp_size": 1, "version": "0.5.4"})),
    "/server_info": ("application/json", _dumps({"dp_size": 1, "tp_size": 1, "version": "0.5.4"})),
    "/get_load": ("application/json", _dumps([{"dp_rank": 0, "num_reqs": 0, "num_waiting_reqs": 0,
                                                "num_tokens": 0}])),
    "/v1/models": ("application/json", _dumps({"object": "list", "data": [{"id": "fake/Qwen3",
                                                                            "object": "model"}]})),
}


def _nginx_str(s: str) -> str:
    if "$" in s:
        raise ValueError("nginx return text must not contain '$' (variables)")
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def nginx_config(prefix: Path, json_ports: list[int], sse_ports: list[int], workers: int = 1,
                 vllm_ports: list[int] | None = None) -> str:
    gen = _dumps(generate_reply())
    sse = sse_reply()
    servers = []
    for port in vllm_ports or []:
        info = "\n".join(f"        location = {path} {{ default_type {ct}; return 200 {_nginx_str(txt)}; }}"
                         for path, (ct, txt) in VLLM_INFO.items())
        servers.append(f"""
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        location = /inference/v1/generate {{ default_type application/json;
            return 200 {_nginx_str(_dumps(vllm_generate_reply()))}; }}
{info}
        location / {{ return 404; }}
    }}""")
    for port, body, ctype in [(p, gen, "application/json") for p in json_ports] + \
                             [(p, sse, "text/event-stream") for p in sse_ports]:
        info = "\n".join(f"        location = {path} {{ default_type {ct}; return 200 {_nginx_str(txt)}; }}"
                         for path, (ct, txt) in INFO.items())
        servers.append(f"""
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        location = /generate {{ default_type {ctype}; return 200 {_nginx_str(body)}; }}
{info}
        location / {{ default_type application/json; return 200 '{{}}'; }}
    }}""")
    return f"""
worker_processes {workers};
daemon off;
master_process on;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 8192; multi_accept on; }}
http {{
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 600s;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    client_max_body_size 0;
    tcp_nodelay on;
{''.join(servers)}
}}
"""


def _wait_port(port: int, timeout: float = 10.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"fake worker exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"port {port} not listening after {timeout}s")


@dataclass
class FakeWorkers:
    """Running fake worker process(es): ``urls`` (JSON /generate) and ``sse_urls`` (SSE /generate)."""

    kind: str  # "nginx" or "python"
    procs: list[subprocess.Popen]
    json_ports: list[int]
    sse_ports: list[int]
    tmpdir: str | None = None
    vllm_ports: list[int] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.json_ports]

    @property
    def sse_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.sse_ports]

    @property
    def vllm_urls(self) -> list[str]:
        """Ports answering like vLLM (nginx only; empty with the Python fallback)."""
        return [f"http://127.0.0.1:{p}" for p in self.vllm_ports]

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGQUIT if self.kind == "nginx" else signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)


def start_fake_workers(json_ports: list[int], sse_ports: list[int], prefer: str = "nginx",
                       vllm_ports: list[int] | None = None) -> FakeWorkers:
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if prefer == "nginx" and nginx:
        tmp = Path(tempfile.mkdtemp(prefix="bench-nginx-"))
        (tmp / "nginx.conf").write_text(nginx_config(tmp, json_ports, sse_ports, vllm_ports=vllm_ports))
        proc = subprocess.Popen([nginx, "-p", str(tmp), "-c", str(tmp / "nginx.conf")],
                                stdout=subprocess.DEVNULL, stderr=open(tmp / "stderr.log", "wb"))
        try:
            for p in json_ports + sse_ports + list(vllm_ports or []):
                _wait_port(p, proc=proc)
        except Exception as e:
            err = (tmp / "stderr.log").read_text(errors="replace") + (tmp / "error.log").read_text(errors="replace") \
                if (tmp / "error.log").exists() else (tmp / "stderr.log").read_text(errors="replace")
            proc.kill()
            raise RuntimeError(f"nginx failed to start: {err.strip()[-800:]}") from e
        return FakeWorkers("nginx", [proc], json_ports, sse_ports, str(tmp), list(vllm_ports or []))
    # Python fallback: one process serving every port.
    args = [sys.executable, "-m", "bench.fake_worker", "--python", "--ports", *map(str, json_ports)]
    if sse_ports:
        args += ["--sse-ports", *map(str, sse_ports)]
    proc = subprocess.Popen(args, cwd=str(Path(__file__).resolve().parent.parent))
    for p in json_ports + sse_ports:
        _wait_port(p, proc=proc)
    return FakeWorkers("python", [proc], json_ports, sse_ports)


# --- the Python fallback: raw asyncio HTTP/1.1 ------------------------------------------------------


def _response(body: bytes, ctype: str) -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: " + ctype.encode() + b"\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\nConnection: keep-alive\r\n\r\n" + body)


class _FixedReplyProtocol(asyncio.Protocol):
    def __init__(self, gen: bytes, sse: bytes, info: dict[bytes, bytes], default_sse: bool) -> None:
        self.gen, self.sse, self.info, self.default_sse = gen, sse, info, default_sse
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        out = []
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = self.buf[:end]
            length = 0
            i = head.lower().find(b"content-length:")
            if i >= 0:
                j = head.find(b"\r\n", i)
                length = int(head[i + 15: j if j >= 0 else len(head)])
            if len(self.buf) < end + 4 + length:
                break
            body = self.buf[end + 4: end + 4 + length]
            self.buf = self.buf[end + 4 + length:]
            path = head.split(b" ", 2)[1] if b" " in head else b"/"
            if path == b"/generate":
                stream = self.default_sse or b'"stream":true' in body.replace(b" ", b"")
                out.append(self.sse if stream else self.gen)
            else:
                out.append(self.info.get(path, _response(b"{}", "application/json")))
        if out:
            self.transport.write(b"".join(out))  # type: ignore[union-attr]


async def _serve_python(json_ports: list[int], sse_ports: list[int]) -> None:
    gen = _response(_dumps(generate_reply()).encode(), "application/json")
    sse = _response(sse_reply().encode(), "text/event-stream")
    info = {k.encode(): _response(v.encode(), ct) for k, (ct, v) in INFO.items()}
    loop = asyncio.get_running_loop()
    servers = []
    for port in json_ports + sse_ports:
        servers.append(await loop.create_server(lambda s=port in sse_ports: _FixedReplyProtocol(gen, sse, info, s),
                                                "127.0.0.1", port, backlog=4096, reuse_address=True))
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for s in servers:
        s.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ports", type=int, nargs="+", required=True, help="ports answering JSON /generate")
    ap.add_argument("--sse-ports", type=int, nargs="*", default=[], help="ports answering SSE /generate")
    ap.add_argument("--python", action="store_true", help="use the Python fallback even if nginx is installed")
    ap.add_argument("--print-config", action="store_true", help="print the nginx config and exit")
    a = ap.parse_args(argv)
    if a.print_config:
        print(nginx_config(Path("/tmp/bench-nginx"), a.ports, a.sse_ports))
        return
    if a.python:
        try:
            import uvloop  # type: ignore

            uvloop.install()
        except ImportError:  # pragma: no cover
            pass
        asyncio.run(_serve_python(a.ports, a.sse_ports))
        return
    fw = start_fake_workers(a.ports, a.sse_ports)
    print(f"{fw.kind} fake workers: {fw.urls} sse: {fw.sse_urls}", flush=True)
    try:
        fw.procs[0].wait()
    except KeyboardInterrupt:
        pass
    finally:
        fw.stop()


if __name__ == "__main__":
    main()
