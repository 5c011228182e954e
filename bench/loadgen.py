"""Load generators: wrk (with Lua scripts for POST bodies) where installed, else an asyncio client.

- ``run_load(url, body, connections, duration)``: the same POST body again and again on keep-alive
  connections; requests/s and latency percentiles (wrk's own numbers, or the asyncio client's).
- ``run_multiturn(url, spec, connections, duration)``: multi-turn trajectories. Request ``i`` belongs to
  conversation ``i % C`` (C = ``spec.conversations``, several times the connection count) and is that
  conversation's next turn: its text = the previous turn's text + the worker's reply text + ``<|im_end|>``
  + a new user turn (the fake worker's reply is fixed, so the bodies are known in advance). Requests go out
  turn-major, so a conversation's previous turn has finished (and been recorded by a trajectory cache)
  before its next turn is sent. After ``spec.turns`` turns a conversation starts over with a new system
  prompt (a new trajectory).
- ``multiturn_client(...)``: the asyncio version of the same workload that reads each reply's ``text``
  from the actual response (no assumption about the worker's reply).
- ``ttfb(url, body, n)``: time to the first byte of the response body (the first SSE event) at 1 connection.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

WRK = shutil.which("wrk")

WORDS = ("alpha beta gamma delta river mountain number prime proof lemma integer graph vertex edge cycle sum "
         "product matrix vector field ring group order bound limit series answer check step case think solve "
         "write reason carefully first second third final result value equation variable constant").split()
# Chinese conversations (every other one): text that tokenizes very differently (several characters per token,
# no spaces), as the mixed-language rollouts of real RL runs do
ZH_WORDS = ("证明 定理 整数 素数 图 顶点 边 环 求和 乘积 矩阵 向量 域 群 阶 上界 极限 级数 答案 检查 步骤 情况 思考 "
            "求解 写出 仔细 推理 第一 第二 第三 最终 结果 数值 方程 变量 常数 因此 所以 假设 考虑").split()


@dataclass
class LoadResult:
    tool: str
    connections: int
    duration: float
    requests: int
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    errors: int = 0  # socket errors + non-2xx answers
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def generate_body(prompt_words: int = 100, max_new_tokens: int = 16) -> bytes:
    """A typical RL rollout /generate body (a chat-formatted text prompt)."""
    text = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            + " ".join(WORDS[(i * 7) % len(WORDS)] for i in range(prompt_words))
            + "<|im_end|>\n<|im_start|>assistant\n")
    return json.dumps({"text": text, "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0.0},
                       "return_logprob": False}).encode()


def stream_body(prompt_words: int = 100) -> bytes:
    body = json.loads(generate_body(prompt_words))
    body["stream"] = True
    return json.dumps(body).encode()


# --- multi-turn trajectories ------------------------------------------------------------------------


@dataclass
class MultiTurnSpec:
    conversations: int = 128
    turns: int = 8
    system_words: int = 150
    user_words: int = 30
    max_new_tokens: int = 16
    reply_text: str = ""  # the worker's reply text (fixed reply of the fake worker)
    variants: int = 16  # distinct user turns (odd ones in Chinese)
    tag: str = ""  # makes the trajectories of one run distinct from another run's (no cross-run cache hits)
    # odd conversations have a Chinese system prompt, odd user turns are Chinese: every conversation mixes both


def _user_texts(spec: MultiTurnSpec) -> list[str]:
    out = []
    for k in range(spec.variants):
        if k % 2:
            words = "".join(ZH_WORDS[(k * 13 + j * 5) % len(ZH_WORDS)] for j in range(spec.user_words))
            out.append(f"<|im_start|>user\n问题 {k}：{words}？<|im_end|>\n<|im_start|>assistant\n")
        else:
            words = " ".join(WORDS[(k * 13 + j * 5) % len(WORDS)] for j in range(spec.user_words))
            out.append(f"<|im_start|>user\nQuestion {k}: {words}?<|im_end|>\n<|im_start|>assistant\n")
    return out


def system_text(spec: MultiTurnSpec, epoch: int, conv: int) -> str:
    if conv % 2:
        words = "，".join(ZH_WORDS[(conv + j * 3) % len(ZH_WORDS)] for j in range(spec.system_words))
    else:
        words = " ".join(WORDS[(conv + j * 3) % len(WORDS)] for j in range(spec.system_words))
    return f"<|im_start|>system\nTrajectory {spec.tag}{epoch}-{conv}. {words}<|im_end|>\n"


def user_index(conv: int, turn: int, spec: MultiTurnSpec) -> int:
    return (conv * 7 + turn) % spec.variants


def conversation_text(spec: MultiTurnSpec, epoch: int, conv: int, turn: int, replies: list[str]) -> str:
    """Text of ``turn`` given the replies of the previous turns."""
    users = _user_texts(spec)
    text = system_text(spec, epoch, conv) + users[user_index(conv, 0, spec)]
    for t in range(1, turn + 1):
        text += replies[t - 1] + "<|im_end|>\n" + users[user_index(conv, t, spec)]
    return text


def _esc(s: str) -> str:
    return json.dumps(s)[1:-1]


def _lua_str(s: str) -> str:
    level = "=" * 4
    assert f"]{level}]" not in s
    return f"[{level}[{s}]{level}]"


_LUA_DONE = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCHJSON {\"requests\":%d,\"duration_us\":%d,\"p50\":%d,\"p90\":%d,\"p99\":%d,\"mean\":%f," ..
    "\"connect\":%d,\"read\":%d,\"write\":%d,\"status\":%d,\"timeout\":%d}\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.mean, e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def lua_fixed_body(body: bytes) -> str:
    return ('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
            f"wrk.body = {_lua_str(body.decode())}\n" + _LUA_DONE)


def lua_multiturn(spec: MultiTurnSpec) -> str:
    users = ", ".join(_lua_str(_esc(u)) for u in _user_texts(spec))
    sys_words = [_esc(system_text(spec, 0, c).split(". ", 1)[1]) for c in range(spec.conversations)]
    sys_tbl = ", ".join(_lua_str(w) for w in sys_words)
    reply = _lua_str(_esc(spec.reply_text + "<|im_end|>\n"))
    sp = _lua_str(json.dumps({"max_new_tokens": spec.max_new_tokens, "temperature": 0.0}))
    return f"""
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local C, T, V = {spec.conversations}, {spec.turns}, {spec.variants}
local TAG = {_lua_str(_esc(spec.tag))}
local users = {{ {users} }}
local sys_rest = {{ {sys_tbl} }}
local reply = {reply}
local sp = {sp}
local texts = {{}}
local counter = 0
request = function()
  local i = counter
  counter = counter + 1
  local conv = i % C
  local round = math.floor(i / C)
  local turn = round % T
  local epoch = math.floor(round / T)
  local u = users[((conv * 7 + turn) % V) + 1]
  local text
  if turn == 0 then
    text = "<|im_start|>system\\\\nTrajectory " .. TAG .. epoch .. "-" .. conv .. ". " .. sys_rest[conv + 1] .. u
  else
    text = texts[conv] .. reply .. u
  end
  texts[conv] = text
  return wrk.format(nil, "/generate", nil, '{{"text":"' .. text .. '","sampling_params":' .. sp .. '}}')
end
""" + _LUA_DONE


def _run_wrk(url: str, script: str, connections: int, duration: float, threads: int = 1) -> LoadResult:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script)
        path = f.name
    try:
        threads = max(1, min(threads, connections))
        cmd = [WRK, f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration))}s", "--timeout", "10s",
               "-s", path, url]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
        m = re.search(r"BENCHJSON (\{.*\})", out.stdout)
        if not m:
            raise RuntimeError(f"wrk failed: {out.stdout[-500:]} {out.stderr[-500:]}")
        d = json.loads(m.group(1))
        secs = d["duration_us"] / 1e6
        errors = d["connect"] + d["read"] + d["write"] + d["status"] + d["timeout"]
        return LoadResult("wrk", connections, secs, d["requests"], d["requests"] / secs, d["p50"] / 1000,
                          d["p90"] / 1000, d["p99"] / 1000, d["mean"] / 1000, errors,
                          {"non2xx": d["status"], "socket_errors": errors - d["status"]})
    finally:
        os.unlink(path)


# --- the asyncio client ---------------------------------------------------------------------------


class _Conn:
    """One keep-alive HTTP/1.1 connection (raw streams; parses Content-Length and chunked replies)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    async def post(self, path: str, body: bytes) -> tuple[int, bytes, float]:
        """Returns (status, body, perf_counter time of the first body byte)."""
        if self.writer is None:
            await self.open()
        self.writer.write(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: " + self.host.encode()
                          + b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode()
                          + b"\r\n\r\n" + body)
        r = self.reader
        head = await r.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        low = head.lower()
        i = low.find(b"content-length:")
        if i >= 0:
            j = low.find(b"\r\n", i)
            n = int(low[i + 15:j])
            t_first = time.perf_counter()
            data = await r.readexactly(n) if n else b""
            if b"connection: close" in low:
                self.close()
                self.writer = None
            return status, data, t_first
        if b"transfer-encoding: chunked" in low:
            parts = []
            t_first = 0.0
            while True:
                line = await r.readuntil(b"\r\n")
                if not t_first:
                    t_first = time.perf_counter()
                size = int(line.split(b";")[0], 16)
                if size == 0:
                    await r.readuntil(b"\r\n")
                    break
                parts.append(await r.readexactly(size))
                await r.readexactly(2)
            return status, b"".join(parts), t_first
        t_first = time.perf_counter()
        data = await r.read()  # until close
        self.close()
        self.writer = None
        return status, data, t_first


def _pct(sorted_lat: list[float], q: float) -> float:
    if not sorted_lat:
        return float("nan")
    k = min(len(sorted_lat) - 1, max(0, int(round(q / 100 * (len(sorted_lat) - 1)))))
    return sorted_lat[k]


def _result(tool: str, connections: int, secs: float, lat: list[float], errors: int, extra: dict | None = None
            ) -> LoadResult:
    lat.sort()
    return LoadResult(tool, connections, secs, len(lat), len(lat) / secs if secs else 0.0, _pct(lat, 50) * 1e3,
                      _pct(lat, 90) * 1e3, _pct(lat, 99) * 1e3, (statistics.fmean(lat) * 1e3) if lat else 0.0,
                      errors, extra or {})


async def _asyncio_load(url: str, bodies, connections: int, duration: float) -> LoadResult:
    """``bodies``: a callable i -> bytes (request number i)."""
    u = urlsplit(url)
    path = u.path or "/generate"
    lat: list[float] = []
    errors = 0
    counter = 0
    deadline = time.perf_counter() + duration

    async def one() -> None:
        nonlocal errors, counter
        c = _Conn(u.hostname, u.port)
        try:
            while time.perf_counter() < deadline:
                i = counter
                counter += 1
                t = time.perf_counter()
                try:
                    status, _, _ = await c.post(path, bodies(i))
                except (OSError, asyncio.IncompleteReadError):
                    errors += 1
                    c.close()
                    c = _Conn(u.hostname, u.port)
                    continue
                lat.append(time.perf_counter() - t)
                if status >= 400:
                    errors += 1
        finally:
            c.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(connections)))
    return _result("asyncio", connections, time.perf_counter() - t0, lat, errors)


def _new_loop_run(coro):
    try:
        import uvloop  # type: ignore

        return uvloop.run(coro) if hasattr(uvloop, "run") else asyncio.run(coro)
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)


def run_load(url: str, body: bytes, connections: int, duration: float, tool: str = "auto",
             threads: int = 1) -> LoadResult:
    """POST ``body`` to ``url`` (full URL of the endpoint) for ``duration`` seconds."""
    if tool in ("auto", "wrk") and WRK:
        return _run_wrk(url, lua_fixed_body(body), connections, duration, threads)
    return _new_loop_run(_asyncio_load(url, lambda i: body, connections, duration))


def multiturn_bodies(spec: MultiTurnSpec):
    """i -> body of request i, the same sequence the wrk Lua script sends."""
    texts: dict[int, str] = {}
    users = _user_texts(spec)
    sp = {"max_new_tokens": spec.max_new_tokens, "temperature": 0.0}

    def body(i: int) -> bytes:
        conv = i % spec.conversations
        rnd = i // spec.conversations
        turn = rnd % spec.turns
        epoch = rnd // spec.turns
        u = users[user_index(conv, turn, spec)]
        if turn == 0:
            text = system_text(spec, epoch, conv) + u
        else:
            text = texts[conv] + spec.reply_text + "<|im_end|>\n" + u
        texts[conv] = text
        return json.dumps({"text": text, "sampling_params": sp}, separators=(",", ":")).encode()

    return body


def run_multiturn(url: str, spec: MultiTurnSpec, connections: int, duration: float, tool: str = "auto"
                  ) -> LoadResult:
    if spec.conversations < 2 * connections:
        spec.conversations = 4 * connections
    if tool in ("auto", "wrk") and WRK:
        return _run_wrk(url, lua_multiturn(spec), connections, duration)
    return _new_loop_run(_asyncio_load(url, multiturn_bodies(spec), connections, duration))


async def _multiturn_client(url: str, spec: MultiTurnSpec, concurrency: int, duration: float) -> LoadResult:
    """Each conversation sequential; the next turn uses the reply text actually received."""
    u = urlsplit(url)
    path = u.path or "/generate"
    users = _user_texts(spec)
    sp = {"max_new_tokens": spec.max_new_tokens, "temperature": 0.0}
    lat: list[float] = []
    errors = 0
    deadline = time.perf_counter() + duration
    next_conv = 0

    async def one() -> None:
        nonlocal errors, next_conv
        c = _Conn(u.hostname, u.port)
        try:
            while time.perf_counter() < deadline:
                conv = next_conv
                next_conv += 1
                text = system_text(spec, conv // spec.conversations, conv % spec.conversations)
                for turn in range(spec.turns):
                    if time.perf_counter() >= deadline:
                        return
                    text += users[user_index(conv, turn, spec)]
                    body = json.dumps({"text": text, "sampling_params": sp}, separators=(",", ":")).encode()
                    t = time.perf_counter()
                    status, data, _ = await c.post(path, body)
                    lat.append(time.perf_counter() - t)
                    if status >= 400:
                        errors += 1
                        break
                    text += json.loads(data)["text"] + "<|im_end|>\n"
        finally:
            c.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(concurrency)))
    return _result("asyncio-multiturn", concurrency, time.perf_counter() - t0, lat, errors)


def multiturn_client(url: str, spec: MultiTurnSpec, concurrency: int, duration: float) -> LoadResult:
    return _new_loop_run(_multiturn_client(url, spec, concurrency, duration))


async def _ttfb(url: str, body: bytes, n: int, warmup: int = 50) -> dict:
    u = urlsplit(url)
    c = _Conn(u.hostname, u.port)
    firsts, totals = [], []
    try:
        for i in range(n + warmup):
            t = time.perf_counter()
            status, data, t_first = await c.post(u.path or "/generate", body)
            t_end = time.perf_counter()
            if status != 200 or b"data:" not in data:
                raise RuntimeError(f"streaming request to {url} answered {status}: {data[:300]!r}")
            if i >= warmup:
                firsts.append(t_first - t)
                totals.append(t_end - t)
    finally:
        c.close()
    firsts.sort()
    totals.sort()
    return {"n": n, "ttfb_p50_ms": _pct(firsts, 50) * 1e3, "ttfb_p99_ms": _pct(firsts, 99) * 1e3,
            "total_p50_ms": _pct(totals, 50) * 1e3}


def ttfb(url: str, body: bytes, n: int = 500) -> dict:
    """Time to the first body byte (first SSE event) at 1 connection, keep-alive."""
    return _new_loop_run(_ttfb(url, body, n))
