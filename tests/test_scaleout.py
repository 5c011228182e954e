"""Scale-out: router replicas that own sessions, behind a real load balancer (issue 19; docs/scale-out.md).

(a) the shipped HAProxy configuration (deploy/haproxy/haproxy.cfg) in a real HAProxy, in front of three small
    servers that say who they are: a session's requests (header, session-scoped URL, POST /sessions with an id)
    always reach one replica, sessions spread over all, requests without a session spread too, streams are not
    buffered, and a replica that stops moves only its own sessions (and gets them back when it returns);
(b) ``slime-router serve --replicas 2``: one port, every session served by one owner, a killed child restarted;
(c) the Ray launcher with a local Ray: replicas as named actors, membership set, a killed actor restarted and
    announced again;
(d) (slow) the issue's done-when: 3 router replicas (lb routing, sessions written behind to a real Redis) + 2 mock
    workers + the real HAProxy, 300 sessions x 8 turns concurrently: each session on one replica and one worker,
    every trajectory exact; one replica SIGKILLed mid-run: only its sessions move, and they continue exactly;
    an admin call reaches every replica.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest

from slime_router_core.tokenizers import BUILTIN_CHECKPOINT
from slime_router_testing import ServerThread
from slime_router_testing.haproxy import HAProxy, haproxy_binary, start_haproxy
from slime_router_testing.servers import free_port, stop_process_group, wait_http

needs_haproxy = pytest.mark.skipif(haproxy_binary() is None, reason="haproxy is not installed (apt-get install "
                                                                     "haproxy)")


def wait_until(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    """Wait for an event (``cond()`` truthy); the timeout only bounds a hang."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.05)


# --- (a) the HAProxy configuration, with servers that say who they are --------------------------------------


def identity_app(name: str, release: threading.Event) -> Any:
    """An ASGI app answering every request with ``{"replica": name, "session": <X-Session-ID>, "path": ...}``;
    ``GET /stream`` sends one SSE event, then the second only once ``release`` is set."""

    async def app(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        while (await receive()).get("more_body"):
            pass
        if scope["path"] == "/stream":
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})
            await send({"type": "http.response.body", "body": b"data: first\n\n", "more_body": True})
            while not release.is_set():
                await asyncio.sleep(0.02)
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
            return
        body = orjson.dumps({"replica": name, "session": headers.get("x-session-id"), "path": scope["path"]})
        head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": head})
        await send({"type": "http.response.body", "body": body})

    return app


@pytest.fixture
def identity_fleet() -> Iterator[dict[str, Any]]:
    release = threading.Event()
    servers = [ServerThread(identity_app(f"r{i}", release)).start() for i in range(3)]
    lb = start_haproxy([s.url for s in servers])
    try:
        yield {"servers": servers, "lb": lb, "release": release}
    finally:
        release.set()
        lb.stop()
        for s in servers:
            s.stop()


def who(c: httpx.Client, sid: str | None, path: str = "/generate", method: str = "POST", **kw: Any) -> str:
    headers = {"X-Session-ID": sid} if sid else {}
    r = c.request(method, path, headers=headers, **kw)
    assert r.status_code == 200, r.text
    return str(r.json()["replica"])


@needs_haproxy
def test_haproxy_keeps_each_session_on_one_replica_and_moves_only_a_stopped_replicas_sessions(identity_fleet):
    lb: HAProxy = identity_fleet["lb"]
    sids = [f"ep-{i}" for i in range(60)]
    with httpx.Client(base_url=lb.url, timeout=30) as c:
        owner = {sid: who(c, sid) for sid in sids}
        assert set(owner.values()) == {"r0", "r1", "r2"}, Counter(owner.values())  # spread over every replica
        for _ in range(3):  # every later request of a session, whatever its route, reaches the same replica
            for sid in sids:
                assert who(c, sid) == owner[sid]
                assert who(c, None, f"/sessions/{sid}/v1/chat/completions") == owner[sid]  # the URL's id
                assert who(c, None, f"/sessions/{sid}", method="GET") == owner[sid]
        for sid in sids[:10]:  # POST /sessions {"session_id": ...} opens it where it will be served
            assert who(c, None, "/sessions", json={"session_id": sid, "metadata": {"k": 1}}) == owner[sid]
        # requests without a session (admin calls, plain generations) spread over the replicas
        assert len({who(c, None, "/generate") for _ in range(30)}) >= 2

        # r1 stops: HAProxy's health checks take it out; only its sessions move (to the others), nothing else
        identity_fleet["servers"][1].stop()
        lb.wait_states({"r1": "DOWN"})
        moved = {sid: who(c, sid) for sid in sids}
        for sid in sids:
            if owner[sid] == "r1":
                assert moved[sid] in ("r0", "r2")
            else:
                assert moved[sid] == owner[sid], sid
        assert {moved[s] for s in sids if owner[s] == "r1"} == {"r0", "r2"}  # spread over both, not piled on one

        # r1 comes back on its address: its sessions return to it (the ring is keyed by the server, not by load)
        port = identity_fleet["servers"][1].port
        identity_fleet["servers"][1] = ServerThread(identity_app("r1", identity_fleet["release"]), port=port).start()
        lb.wait_states({"r1": "UP"})
        assert {sid: who(c, sid) for sid in sids} == owner


@needs_haproxy
def test_haproxy_passes_a_stream_through_as_it_arrives(identity_fleet):
    lb: HAProxy = identity_fleet["lb"]
    with httpx.Client(base_url=lb.url, timeout=30) as c:
        with c.stream("GET", "/stream", headers={"X-Session-ID": "streamer"}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(lines) == "data: first"  # arrives while the server still holds the rest of the stream
            identity_fleet["release"].set()
            rest = [x for x in lines if x]
        assert rest == ["data: [DONE]"]


def test_rendered_config_is_the_shipped_one_with_our_servers():
    from slime_router_testing.haproxy import REPO_CONFIG, render_config

    shipped = REPO_CONFIG.read_text()
    text = render_config(shipped, ["http://127.0.0.1:7001", "http://127.0.0.1:7002"], 9999, "/tmp/x.sock",
                         {"hash-balance-factor": "150"})
    for line in ("balance hdr(X-Session-ID)", "hash-type consistent", "option httpchk GET /health",
                 "balance leastconn"):
        assert line in shipped and line in text
    assert "\n    hash-balance-factor 0\n" in shipped and "\n    hash-balance-factor 150\n" in text
    assert text.count("server r0 127.0.0.1:7001") == 2 and text.count("server r1 127.0.0.1:7002") == 2
    assert "server r2" not in text and "bind 127.0.0.1:9999" in text and "bind :30000" not in text
    if haproxy_binary():
        check = subprocess.run([haproxy_binary(), "-c", "-f", str(REPO_CONFIG)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr


# --- real routers in subprocesses -------------------------------------------------------------------------


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("SLIME_ROUTER_")}


def cli() -> list[str]:
    return [sys.executable, "-m", "slime_router_core.cli"]


class Output:
    """A subprocess's output lines, read as they come (a thread)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))

    def text(self) -> str:
        return "\n".join(self.lines)


def sessions_held(url: str) -> dict[str, int]:
    """The sessions a replica holds (its own GET /sessions listing), with their request counts."""
    r = httpx.get(url + "/sessions", timeout=30)
    assert r.status_code == 200, r.text
    return {s["session_id"]: s.get("requests", 0) for s in r.json()["sessions"]}


TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


# --- (b) serve --replicas N ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_worker(tokenizer_dir: str) -> Iterator[str]:
    from slime_router_testing.mock_worker import MockWorkerConfig, create_mock_worker_app

    w = ServerThread(create_mock_worker_app(MockWorkerConfig(hf_checkpoint=BUILTIN_CHECKPOINT,
                                                             max_random_tokens=8))).start()
    yield w.url
    w.stop()


REPLICA_LINE = re.compile(r"^replica (\d+) \(pid (\d+), (http://[\d.]+:\d+)\)")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT: Linux only")
def test_serve_replicas_shares_one_port_keeps_sessions_on_their_owner_and_restarts_a_killed_child(shared_worker):
    port = free_port()
    proc = subprocess.Popen([*cli(), "serve", "--replicas", "2", "--host", "127.0.0.1", "--port", str(port),
                             "--worker-url", shared_worker, "--hf-checkpoint", BUILTIN_CHECKPOINT,
                             "--plugin", "balancing,radix_tree,sessions,replicas"],
                            env=clean_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    out = Output(proc)
    try:
        wait_until(lambda: proc.poll() is not None or "replicas serving on" in out.text(), 120,
                   "the replicas serving")
        assert proc.poll() is None, out.text()
        children = {int(m[1]): (int(m[2]), m[3]) for m in map(REPLICA_LINE.match, out.lines) if m}
        assert len(children) == 2, out.text()
        public = f"http://127.0.0.1:{port}"
        sids = [f"rep-{i}" for i in range(16)]
        for turn in range(3):
            for sid in sids:  # a new connection each time: the kernel picks the child
                text = TEMPLATE.format(f"{sid} turn {turn}")
                r = httpx.post(public + "/generate", headers={"X-Session-ID": sid},
                               json={"text": text, "sampling_params": {"max_new_tokens": 4}}, timeout=30)
                assert r.status_code == 200, r.text
        held = [sessions_held(url) for _, url in children.values()]
        for sid in sids:  # each session on exactly one child, all its turns there
            assert [h.get(sid, 0) for h in held].count(3) == 1 and sum(h.get(sid, 0) for h in held) == 3, held
        assert all(held), "every child owns some of the sessions"
        # both children accept on the public port: each got requests of sessions the other owns, and proxied them
        assert all(httpx.get(url + "/replicas", timeout=10).json()["proxied"] > 0 for _, url in children.values())

        pid, url = children[0]
        os.kill(pid, signal.SIGKILL)  # the parent restarts it, same private port
        wait_until(lambda: any(m and int(m[1]) == 0 and int(m[2]) != pid for m in map(REPLICA_LINE.match, out.lines)),
                   60, "replica 0 restarted")
        wait_http(url + "/health", timeout=120)
        assert proc.poll() is None
        r = httpx.post(public + "/generate", headers={"X-Session-ID": "after-restart"},
                       json={"text": TEMPLATE.format("hi"), "sampling_params": {"max_new_tokens": 4}}, timeout=30)
        assert r.status_code == 200, r.text

        # SIGTERM is forwarded: the children drain (a running request finishes) and exit, then the parent
        httpx.post(shared_worker + "/mock/configure", json={"latency": 1.0}, timeout=10).raise_for_status()
        try:
            running: list[httpx.Response] = []
            slow = threading.Thread(target=lambda: running.append(httpx.post(
                public + "/generate", json={"text": TEMPLATE.format("slow"), "sampling_params": {"max_new_tokens": 4}},
                headers={"X-Session-ID": "draining"}, timeout=60)))
            slow.start()
            wait_until(lambda: httpx.get(shared_worker + "/mock/stats", timeout=10).json()["in_flight"] > 0, 30,
                       "the request running on the worker")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0, out.text()
            slow.join(timeout=60)
            assert running and running[0].status_code == 200, running
        finally:
            httpx.post(shared_worker + "/mock/configure", json={"latency": 0.0}, timeout=10)
        for p, _ in children.values():
            wait_until(lambda p=p: not os.path.exists(f"/proc/{p}") or _zombie(p), 30, f"child {p} gone")
    finally:
        stop_process_group(proc, timeout=10)
        for line in out.lines:
            m = REPLICA_LINE.match(line)
            if m:
                try:
                    os.killpg(int(m[2]), signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_serve_replicas_refuses_lb_routing_and_a_missing_plugin():
    base = [*cli(), "serve", "--replicas", "2", "--port", "0", "--worker-url", "http://127.0.0.1:9"]
    r = subprocess.run([*base, "--replica-routing", "lb"], env=clean_env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "--replica-routing lb" in r.stderr, r.stderr
    r = subprocess.run([*base, "--plugin", "balancing"], env=clean_env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "needs the replicas plugin" in r.stderr, r.stderr


# --- (c) the Ray launcher ------------------------------------------------------------------------------------


@pytest.fixture
def local_ray() -> Iterator[Any]:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, namespace="slime-router-test", log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def test_ray_launcher_names_actors_sets_membership_and_reannounces_a_restarted_replica(local_ray, shared_worker):
    from slime_router_plugins.replicas import ray_launcher as rl

    ray = local_ray
    base = rl.free_port_range(2)
    urls = rl.launch_replicas(2, ["--worker-url", shared_worker, "--plugin", "balancing,replicas"],
                              name="t-router", namespace="slime-router-test", port=base, num_cpus=1,
                              startup_timeout=120)
    try:
        assert len(urls) == 2 and all(u.endswith(f":{base + i}") for i, u in enumerate(urls))
        assert rl.replica_names("t-router", "slime-router-test") == ["t-router-0", "t-router-1"]
        for u in urls:  # each replica was started knowing only itself: the launcher told it the others
            assert sorted(httpx.get(u + "/replicas", timeout=10).json()["peers"]) == sorted(urls)
        actor = ray.get_actor("t-router-1", namespace="slime-router-test")
        before = ray.get(actor.info.remote(), timeout=30)
        ray.kill(actor, no_restart=False)  # Ray restarts it (max_restarts=-1): same name, same port

        def restarted() -> bool:
            try:
                info = ray.get(ray.get_actor("t-router-1", namespace="slime-router-test").info.remote(), timeout=5)
            except Exception:  # noqa: BLE001 - restarting
                return False
            return bool(info["alive"] and info["pid"] != before["pid"])

        wait_until(restarted, 120, "the killed replica actor restarted")
        # the new router was started with only itself as a peer: it announced itself and learned the membership
        wait_until(lambda: sorted(httpx.get(urls[1] + "/replicas", timeout=10).json()["peers"]) == sorted(urls), 60,
                   "the restarted replica re-registered")
        assert rl.membership("t-router", "slime-router-test") == urls
    finally:
        rl.stop_replicas("t-router", "slime-router-test")


# --- (d) the done-when test: 3 replicas + HAProxy + Redis, 300 sessions x 8 turns, one replica killed ----------

SESSIONS = 300
TURNS = 8
KILL_AT = 4  # turns 0..3 before the kill, 4..7 around and after it
CONCURRENCY = 16  # requests in flight at most (2 cores: the routers, workers, HAProxy and Redis share them)
CHAT_EVERY = 5  # every 5th session talks through /v1/chat/completions, the others /generate with text


class Replica:
    """One router replica: the real CLI in its own process group (``kill()`` is SIGKILL, as a crash)."""

    def __init__(self, index: int, port: int, args: list[str]) -> None:
        self.index = index
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.args = args
        self.proc: subprocess.Popen | None = None

    def start(self) -> Replica:
        self.proc = subprocess.Popen([*cli(), "serve", *self.args], env=clean_env(), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        return self

    def wait(self) -> None:
        wait_http(self.url + "/health", timeout=180, proc=self.proc)

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc, timeout=20)


def store_flushed(url: str) -> bool:
    """Every session entry this replica queued for the store is written (GET /sessions stats)."""
    st = httpx.get(url + "/sessions", timeout=30).json()["stats"]["store"]
    assert st["entries_dropped"] == 0 and st["write_errors"] == 0, st
    return bool(st["queued"] == 0 and st["entries_written"] >= st["entries_queued"])


def check_exact(session: dict, records: dict[tuple, tuple[int, dict]]) -> int:
    """The session is one trajectory of TURNS turns, every turn exactly a record of truth of the workers (prompt ids,
    output ids, their logprobs, loss mask 1 on exactly the generated tokens); the index of the worker of them all."""
    assert session["gaps"] == [], session["gaps"]
    (traj,) = session["trajectories"]
    tokens, mask, logp = traj["tokens"], traj["loss_mask"], traj["rollout_logp"]
    assert len(traj["turns"]) == TURNS
    want_mask = [0] * len(tokens)
    workers = set()
    end = 0
    for turn in traj["turns"]:
        p, o = turn["prompt_tokens"], turn["output_tokens"]
        hit = records.get((tuple(tokens[:p]), tuple(tokens[p:p + o])))
        assert hit is not None, f"turn {turn['request_id']} of {session['session_id']}: no worker received and " \
                                f"generated exactly these ids"
        worker, rec = hit
        workers.add(worker)
        assert logp[p:p + o] == array("f", rec["output_logprobs"]).tolist()  # sessions keep float32 logprobs
        want_mask[p:p + o] = [1] * o
        end = p + o
    assert end == len(tokens) and mask == want_mask
    assert len(workers) == 1, f"{session['session_id']} ran on workers {workers}"
    return workers.pop()


@pytest.mark.slow
@needs_haproxy
def test_done_when_300_sessions_on_3_replicas_behind_haproxy_with_redis_and_a_replica_killed(tokenizer_dir):
    from slime_router_testing.mock_worker import MockWorkerConfig, create_mock_worker_app
    from slime_router_testing.redis_server import RedisServer
    from slime_router_testing.servers import start_mock_worker_process

    if not RedisServer.available():
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    redis = RedisServer().start()
    workers = [start_mock_worker_process(hf_checkpoint=BUILTIN_CHECKPOINT, wait=False, seed=i, max_random_tokens=12)
               for i in range(2)]
    ports = [free_port() for _ in range(3)]
    peers = ",".join(f"http://127.0.0.1:{p}" for p in ports)
    replicas = [Replica(i, p, ["--host", "127.0.0.1", "--port", str(p), "--hf-checkpoint", BUILTIN_CHECKPOINT,
                               *(a for w in workers for a in ("--worker-url", w.url)),
                               "--replica-url", f"http://127.0.0.1:{p}", "--replica-peers", peers,
                               "--replica-routing", "lb", "--session-store-url", redis.url,
                               # the session's worker is never traded for load here: one engine per session
                               "--cache-aware-abs-threshold", "1000000"])
                for i, p in enumerate(ports)]
    lb: HAProxy | None = None
    extra_worker: ServerThread | None = None
    try:
        for r in replicas:
            r.start()
        for w in workers:
            wait_http(w.url + "/get_model_info", timeout=120, proc=w.proc)
        for r in replicas:
            r.wait()
        lb = start_haproxy([r.url for r in replicas])  # the shipped configuration as it is
        victim = replicas[1]
        holder: dict[str, str] = {}  # session -> the replica that held it after the first turns
        inflight: Counter[str] = Counter()
        failures: list[str] = []
        state: dict[str, Any] = {}
        limits: list[asyncio.Semaphore] = []  # one per event loop (asyncio.run)

        async def turn(c: httpx.AsyncClient, sid: str, t: int) -> None:
            s = state[sid]
            chat = s["chat"]
            if chat:
                s["messages"].append({"role": "user", "content": f"Session {sid}, question {t}?"})
                path, body = "/v1/chat/completions", {"model": "m", "messages": s["messages"], "max_tokens": 12}
            else:
                s["text"] += ("<|im_end|>\n" if t else "") + TEMPLATE.format(f"Session {sid}: turn {t}")
                path, body = "/generate", {"text": s["text"], "sampling_params": {"max_new_tokens": 12}}
            for _attempt in range(100):
                async with limits[-1]:
                    inflight[holder.get(sid, "")] += 1
                    try:
                        r = await c.post(path, json=body, headers={"X-Session-ID": sid})
                    except httpx.TransportError as e:
                        r, err = None, f"{type(e).__name__}"
                    finally:
                        inflight[holder.get(sid, "")] -= 1
                if r is not None and r.status_code == 200:
                    break
                if r is not None:
                    assert r.status_code in (502, 503, 504), r.text  # the replica died under it: try again
                    err = str(r.status_code)
                failures.append(f"{sid} turn {t}: {err}")
                await asyncio.sleep(0.2)
            else:
                raise AssertionError(f"{sid} turn {t}: no answer after 100 attempts")
            if chat:
                s["messages"].append({"role": "assistant", "content": r.json()["choices"][0]["message"]["content"]})
            else:
                s["text"] += r.json()["text"]

        async def run(turns: range) -> None:
            limits.append(asyncio.Semaphore(CONCURRENCY))
            async with httpx.AsyncClient(base_url=lb.url, timeout=120,
                                         limits=httpx.Limits(max_connections=CONCURRENCY)) as c:
                async def one(sid: str) -> None:
                    for t in turns:
                        await turn(c, sid, t)

                await asyncio.gather(*(one(sid) for sid in state))

        sids = [f"done-{i}" for i in range(SESSIONS)]
        for i, sid in enumerate(sids):
            state[sid] = {"chat": i % CHAT_EVERY == 0, "text": "", "messages": []}
        asyncio.run(run(range(KILL_AT)))

        # every session is held by exactly one replica, and every replica holds some
        held = [sessions_held(r.url) for r in replicas]
        for sid in sids:
            (where,) = [r.url for r, h in zip(replicas, held) if sid in h]
            holder[sid] = where
        assert all(held), [len(h) for h in held]
        victims = {sid for sid in sids if holder[sid] == victim.url}

        # the kill comes while the victim runs requests; every reply a client got before it is written behind
        # (a reply delivered in the very last milliseconds before a crash may not be: docs/scale-out.md)
        wait_until(lambda: all(store_flushed(r.url) for r in replicas), 60, "the write-behind flushed")
        for w in workers:
            httpx.post(w.url + "/mock/configure", json={"latency": 1.5}, timeout=10).raise_for_status()

        async def second_half() -> None:
            task = asyncio.ensure_future(run(range(KILL_AT, TURNS)))
            while inflight[victim.url] < 3:
                assert not task.done()
                await asyncio.sleep(0.01)
            victim.kill()
            for w in workers:
                async with httpx.AsyncClient(timeout=10) as c:
                    (await c.post(w.url + "/mock/configure", json={"latency": 0.0})).raise_for_status()
            await task

        asyncio.run(second_half())
        assert failures, "the kill hit requests in flight"
        lb.wait_states({"r1": "DOWN"})

        # only the victim's sessions moved, each to one survivor, spread over both; the others stayed put
        survivors = [r for r in replicas if r is not victim]
        now = {r.url: sessions_held(r.url) for r in survivors}
        for sid in sids:
            where = [u for u, h in now.items() if sid in h]
            if sid in victims:
                assert len(where) == 1, (sid, where)
            else:
                assert where == [holder[sid]] and now[holder[sid]][sid] == TURNS, (sid, where)
        moved_to = Counter(u for u, h in now.items() for sid in victims if sid in h)
        assert len(moved_to) == 2 and sum(moved_to.values()) == len(victims), moved_to

        # every session exact, on one worker: the moved ones continued exactly from what was written behind
        records: dict[tuple, tuple[int, dict]] = {}
        for i, w in enumerate(workers):
            for rec in httpx.get(w.url + "/mock/records", timeout=60).json():
                records[(tuple(rec["input_ids"]), tuple(rec["output_ids"]))] = (i, rec)
        per_worker: Counter[int] = Counter()
        with httpx.Client(base_url=lb.url, timeout=60) as c:
            for sid in sids:
                r = c.get(f"/sessions/{sid}")
                assert r.status_code == 200, r.text
                per_worker[check_exact(r.json(), records)] += 1
        assert len(per_worker) == 2, per_worker

        # the victim comes back; an admin call sent once through HAProxy reaches every replica
        victim.start()
        victim.wait()
        lb.wait_states({"r1": "UP"})
        extra_worker = ServerThread(create_mock_worker_app(MockWorkerConfig(hf_checkpoint=BUILTIN_CHECKPOINT)))
        extra_worker.start()
        r = httpx.post(lb.url + "/add_worker", params={"url": extra_worker.url}, timeout=60)
        assert r.status_code == 200, r.text
        for rep in replicas:
            assert extra_worker.url in httpx.get(rep.url + "/list_workers", timeout=30).json()["urls"], rep.url
    finally:
        if lb is not None:
            lb.stop()
        for r in replicas:
            r.stop()
        for w in workers:
            w.kill()
        if extra_worker is not None:
            extra_worker.stop()
        redis.stop()
