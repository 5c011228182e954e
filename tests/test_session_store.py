"""Write-behind of sessions to a real redis-server (``--session-store-url``, issue 19): replica B continues a session
replica A served, exactly.

Two routers on real sockets share one redis-server and one mock worker (realistic mode: replies that start with
whitespace, tokens that are not their text's canonical encoding). Exactness is checked against the mock worker's
record of the ids it received, and against what A answers.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest
from openai import OpenAI

from slime_router_core import Settings
from slime_router_core.tokenizers import BUILTIN_CHECKPOINT
from slime_router_testing import ServerThread, start_router
from slime_router_testing.mock_worker import MockWorkerConfig, create_mock_worker_app
from slime_router_testing.redis_server import RedisServer

# Skipped only on a developer's machine without Redis: CI installs it (.ci/run), and there a missing server fails
pytestmark = pytest.mark.skipif(not RedisServer.available() and not os.environ.get("CI"),
                                reason="redis-server is not installed (apt-get install redis-server)")

TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
KEY = "slime-router:session:{}"


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server on a free port (no persistence), stopped after the test."""
    with RedisServer() as r:
        yield r


@pytest.fixture(scope="module")
def worker() -> Iterator[str]:
    w = ServerThread(create_mock_worker_app(MockWorkerConfig(
        hf_checkpoint=BUILTIN_CHECKPOINT, realistic=True, realistic_seed=11, leading_whitespace_rate=0.7,
        max_random_tokens=24))).start()
    yield w.url
    w.stop()


@pytest.fixture
def replica(worker: str, redis_server: RedisServer, servers_to_stop: list[Any]) -> Callable[..., ServerThread]:
    """Start a router replica sharing the redis-server and the worker (``store=False``: without the feature)."""
    httpx.delete(worker + "/mock/records")

    def start(store: bool = True, **extra: Any) -> ServerThread:
        if store:
            extra.setdefault("session_store_url", redis_server.url)
        r = start_router(plugins=["radix_tree", "openai_compat", "sessions"], settings=Settings(
            hf_checkpoint=BUILTIN_CHECKPOINT, worker_urls=[worker], extra=extra))
        servers_to_stop.append(r)
        return r

    return start


def records(worker: str) -> list[dict]:
    return httpx.get(worker + "/mock/records").json()


def store_stats(url: str) -> dict[str, Any]:
    return httpx.get(url + "/sessions").json()["stats"].get("store", {})


def wait_until(what: Callable[[], Any], timeout: float = 30.0) -> Any:
    """Poll until ``what()`` is truthy (events, not timings: the bound only keeps a broken run from hanging)."""
    deadline = time.monotonic() + timeout
    while True:
        v = what()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout}s: {what}")
        time.sleep(0.02)


def written(url: str, n: int) -> None:
    """Wait until replica ``url`` has written at least ``n`` entries to the store."""
    wait_until(lambda: store_stats(url).get("entries_written", 0) >= n)


def entries(redis_server: RedisServer, sid: str) -> list[bytes]:
    import redis

    with redis.Redis.from_url(redis_server.url) as c:
        return list(c.lrange(KEY.format(sid), 0, -1))


def generate(c: httpx.Client, sid: str, text: str, **sp: Any) -> Any:
    r = c.post("/generate", headers={"X-Session-ID": sid},
               json={"text": text, "sampling_params": {"max_new_tokens": 24, **sp}})
    assert r.status_code == 200, r.text
    return r.json()


def get(c: httpx.Client, sid: str) -> dict:
    r = c.get(f"/sessions/{sid}")
    assert r.status_code == 200, r.text
    return r.json()


def next_turn(text: str, t: int) -> str:
    return text + "<|im_end|>\n" + TEMPLATE.format(f"and turn {t}: go on")


def test_generate_session_continues_exactly_on_another_replica(replica, worker):
    a, b = replica(), replica()
    ca, cb = httpx.Client(base_url=a.url, timeout=30), httpx.Client(base_url=b.url, timeout=30)
    sid = "gen-1"
    text = TEMPLATE.format("Hello, tell me a story")
    for t in range(3):
        if t:
            text = next_turn(text, t)
        text += generate(ca, sid, text)["text"]
    text = next_turn(text, 9)
    samples = generate(ca, sid, text, n=2)  # two samples of one prompt: a branch, a record continuing another's
    text += samples[0]["text"]
    ca.patch(f"/sessions/{sid}", json={"metadata": {"reward": 0.5}})
    written(a.url, 5)
    on_a = get(ca, sid)
    assert get(cb, sid) == on_a  # B never saw it: read from the store, rebuilt exactly
    for strict in (False, True):
        body = {"text": text, "strict": strict}
        assert cb.post("/retrieve_from_text", json=body).json() == ca.post("/retrieve_from_text", json=body).json()
    # the next turn as text: the control is what A sends; then A dies and B sends it
    prompt = next_turn(text, 3)
    generate(ca, "control", prompt)
    sent_by_a = records(worker)[-1]["input_ids"]
    a.stop()
    generate(cb, sid, prompt)
    assert records(worker)[-1]["input_ids"] == sent_by_a
    on_b = get(cb, sid)
    assert on_b["metadata"] == {"reward": 0.5} and on_b["requests"] == on_a["requests"] + 1
    assert on_b["gaps"] == on_a["gaps"] == []
    old = {t["index"]: t for t in on_a["trajectories"]}
    grown = [t for t in on_b["trajectories"] if t != old.get(t["index"])]
    assert len(on_b["trajectories"]) == len(on_a["trajectories"]) and len(grown) == 1
    (g,) = grown
    before = old[g["index"]]
    assert g["turns"][:-1] == before["turns"] and len(g["turns"]) == len(before["turns"]) + 1
    n = before["token_length"]
    for k in ("tokens", "loss_mask", "rollout_logp", "weight_versions"):
        assert g[k][:n] == before[k]
    assert g["tokens"][:len(sent_by_a)] == sent_by_a  # the new turn's prompt is what A would have sent
    # retrieval of the whole conversation on B equals the session's trajectory
    full = cb.post("/retrieve_from_text", json={"text": prompt + records(worker)[-1]["text"]}).json()
    assert full["fresh_tokens"] == 0
    assert full["tokens"] == g["tokens"] and full["loss_mask"] == g["loss_mask"]


def test_chat_session_continues_exactly_on_another_replica(replica, worker):
    a, b = replica(), replica()
    ca, cb = httpx.Client(base_url=a.url, timeout=30), httpx.Client(base_url=b.url, timeout=30)
    sid = "chat-1"

    def client(url: str) -> OpenAI:
        return OpenAI(base_url=f"{url}/sessions/{sid}/v1", api_key="none", max_retries=0)

    messages: list[dict] = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}]
    for turn in range(3):
        reply = client(a.url).chat.completions.create(model="m", messages=messages,  # type: ignore[arg-type]
                                                      max_tokens=24)
        messages += [{"role": "assistant", "content": reply.choices[0].message.content or ""},
                     {"role": "user", "content": f"more, {turn}"}]
    written(a.url, 3)
    on_a = get(ca, sid)
    history = messages[:-1]
    # the next request of the session on B: rendered and tokenized exactly as A would (control: A itself)
    OpenAI(base_url=f"{a.url}/v1", api_key="none", max_retries=0).chat.completions.create(
        model="m", messages=messages, max_tokens=24)  # type: ignore[arg-type]
    sent_by_a = records(worker)[-1]["input_ids"]
    a.stop()
    client(b.url).chat.completions.create(model="m", messages=messages, max_tokens=24)  # type: ignore[arg-type]
    assert records(worker)[-1]["input_ids"] == sent_by_a
    on_b = get(cb, sid)
    assert on_b["requests"] == on_a["requests"] + 1 and on_b["gaps"] == []
    (ta,), (tb,) = on_a["trajectories"], on_b["trajectories"]
    assert tb["turns"][:-1] == ta["turns"]
    for k in ("tokens", "loss_mask", "rollout_logp", "weight_versions"):
        assert tb[k][:ta["token_length"]] == ta[k]
    r = cb.post("/retrieve_from_messages", json={"messages": history, "strict": True})
    assert r.status_code == 200, r.text
    assert r.json()["tokens"][:ta["token_length"]] == ta["tokens"]
    assert r.json()["rollout_logp"][:ta["token_length"]] == ta["rollout_logp"]


def test_store_answers_the_same_as_the_replica_that_wrote_it(replica, worker):
    """Before B sends anything: GET, retrieval by text and by messages on B equal A's (read on GET)."""
    a, b = replica(), replica()
    ca, cb = httpx.Client(base_url=a.url, timeout=30), httpx.Client(base_url=b.url, timeout=30)
    sid = "chat-2"
    oa = OpenAI(base_url=f"{a.url}/sessions/{sid}/v1", api_key="none", max_retries=0)
    messages: list[dict] = [{"role": "user", "content": "Count with me"}]
    for turn in range(3):
        reply = oa.chat.completions.create(model="m", messages=messages, max_tokens=24)  # type: ignore[arg-type]
        messages += [{"role": "assistant", "content": reply.choices[0].message.content or ""},
                     {"role": "user", "content": f"next {turn}"}]
    written(a.url, 3)
    assert get(cb, sid) == get(ca, sid)
    c = replica()  # a batch retrieval also reads sessions the replica does not hold
    lines = httpx.post(c.url + "/retrieve_batch", json={"sessions": [sid]}, timeout=30).text.splitlines()
    assert [orjson.loads(x) for x in lines] == [get(ca, sid)]
    body = {"messages": messages[:-1], "strict": True}
    ra, rb = ca.post("/retrieve_from_messages", json=body), cb.post("/retrieve_from_messages", json=body)
    assert ra.status_code == rb.status_code == 200 and ra.json() == rb.json()


def test_finished_session_is_refused_on_another_replica(replica):
    a, b = replica(), replica()
    ca, cb = httpx.Client(base_url=a.url, timeout=30), httpx.Client(base_url=b.url, timeout=30)
    generate(ca, "done-1", TEMPLATE.format("hi"))
    written(a.url, 1)
    assert ca.delete("/sessions/done-1").status_code == 200
    written(a.url, 2)
    r = cb.post("/generate", headers={"X-Session-ID": "done-1"}, json={"text": "x"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "session_finished"
    assert cb.get("/sessions/done-1").status_code == 409


def test_redis_down_requests_still_succeed_and_failures_are_counted(replica, redis_server):
    a, b = replica(), replica()
    ca, cb = httpx.Client(base_url=a.url, timeout=30), httpx.Client(base_url=b.url, timeout=30)
    text = TEMPLATE.format("hello")
    text += generate(ca, "down-1", text)["text"]
    written(a.url, 1)
    redis_server.stop()
    generate(ca, "down-1", next_turn(text, 1))  # written behind: the request does not wait for the store
    wait_until(lambda: store_stats(a.url)["write_errors"] >= 1)
    # B: a session it does not hold, the store down: served as a new session, flagged, counted
    generate(cb, "down-2", TEMPLATE.format("anyone?"))
    assert store_stats(b.url)["load_errors"] == 1
    assert [g["reason"] for g in get(cb, "down-2")["gaps"]] == ["history_unavailable"]
    r = OpenAI(base_url=f"{b.url}/sessions/down-3/v1", api_key="none", max_retries=0).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=8)  # type: ignore[arg-type]
    assert r.choices[0].message is not None
    assert [g["reason"] for g in get(cb, "down-3")["gaps"]] == ["history_unavailable"]
    # back up (empty): the queued entry is retried until it lands
    redis_server.start()
    wait_until(lambda: store_stats(a.url)["entries_written"] >= 2)


def test_concurrent_first_requests_on_another_replica_load_once(replica, worker):
    a, b = replica(), replica()
    ca = httpx.Client(base_url=a.url, timeout=30)
    text = TEMPLATE.format("parallel")
    text += generate(ca, "par-1", text)["text"]
    written(a.url, 1)
    prompt = next_turn(text, 1)
    results: list[int] = []

    async def burst() -> None:
        async with httpx.AsyncClient(base_url=b.url, timeout=30) as c:
            rs = await asyncio.gather(*[c.post("/generate", headers={"X-Session-ID": "par-1"}, json={
                "text": prompt, "sampling_params": {"max_new_tokens": 4}}) for _ in range(8)])
            results.extend(r.status_code for r in rs)

    asyncio.run(burst())
    assert results == [200] * 8
    stats = store_stats(b.url)
    assert stats["loads"] == 1 and stats["loaded"] == 1
    s = get(httpx.Client(base_url=b.url), "par-1")
    assert s["requests"] == 9 and sum(len(t["turns"]) for t in s["trajectories"]) == 9


def test_bytes_written_per_turn_follow_the_new_tokens(replica, redis_server, worker):
    """A long session: each entry holds its turn's new tokens, not the conversation again."""
    from slime_router_plugins.sessions.write_behind import unpack

    a = replica()
    ca = httpx.Client(base_url=a.url, timeout=30)
    sid = "long-1"
    text = TEMPLATE.format("A long task. " * 20)
    turns = 30
    for t in range(turns):
        if t:
            text = next_turn(text, t)
        text += generate(ca, sid, text)["text"]
    written(a.url, turns)
    raw = entries(redis_server, sid)
    assert len(raw) == turns
    total = get(ca, sid)["tokens"]
    assert total > 800
    for data in raw[1:]:
        e = unpack(data)
        (turn,) = e["turns"]
        new = len(turn[6]) + len(turn[7])  # prompt ids after what it shares with the session, output ids
        assert len(data) < 1024 + 64 * new, (len(data), new)
    assert sum(map(len, raw)) < 64 * total + 1024 * turns


def test_radix_tree_process_is_refused_with_the_store(redis_server, worker):
    from slime_router_core.app import build_app
    from slime_router_core.plugins import PluginLoadError, load_plugins

    settings = Settings(hf_checkpoint=BUILTIN_CHECKPOINT, worker_urls=[worker],
                        extra={"session_store_url": redis_server.url, "radix_tree_process": True})
    with pytest.raises(PluginLoadError, match="radix-tree-process"):
        build_app(settings, load_plugins(["radix_tree", "sessions"]))


def test_missing_redis_package_is_a_clear_start_up_error(redis_server, worker, monkeypatch):
    import sys

    from slime_router_core.app import build_app
    from slime_router_core.plugins import PluginLoadError, load_plugins

    monkeypatch.setitem(sys.modules, "redis.asyncio", None)
    settings = Settings(hf_checkpoint=BUILTIN_CHECKPOINT, worker_urls=[worker],
                        extra={"session_store_url": redis_server.url})
    with pytest.raises(PluginLoadError, match=r"pip install 'slime-router\[redis\]'"):
        build_app(settings, load_plugins(["radix_tree", "sessions"]))


def test_off_by_default_nothing_is_written(replica, redis_server):
    a = replica(store=False)
    ca = httpx.Client(base_url=a.url, timeout=30)
    generate(ca, "off-1", TEMPLATE.format("hi"))
    assert "store" not in ca.get("/sessions").json()["stats"]
    assert entries(redis_server, "off-1") == []



def test_streamed_turns_continue_exactly_on_another_replica(replica, worker):
    """Streams record at their end (another task than the request's start): their records are written all the
    same."""
    a, b = replica(), replica()
    ca, cb = httpx.Client(base_url=a.url, timeout=30), httpx.Client(base_url=b.url, timeout=30)
    text = TEMPLATE.format("stream it")
    for t in range(2):
        if t:
            text = next_turn(text, t)
        out = ""
        with ca.stream("POST", "/generate", headers={"X-Session-ID": "st-gen"},
                       json={"text": text, "stream": True, "sampling_params": {"max_new_tokens": 24}}) as r:
            for line in r.iter_lines():
                if line.startswith("data:") and line[5:].strip() != "[DONE]":
                    out = orjson.loads(line[5:])["text"]
        text += out
    messages: list[dict] = [{"role": "user", "content": "stream a chat"}]
    oa = OpenAI(base_url=f"{a.url}/sessions/st-chat/v1", api_key="none", max_retries=0)
    for turn in range(2):
        parts = oa.chat.completions.create(model="m", messages=messages, max_tokens=24,  # type: ignore[arg-type]
                                           stream=True)
        content = "".join(p.choices[0].delta.content or "" for p in parts if p.choices)
        messages += [{"role": "assistant", "content": content}, {"role": "user", "content": f"again {turn}"}]
    written(a.url, 4)
    for sid in ("st-gen", "st-chat"):
        assert get(cb, sid) == get(ca, sid)
    prompt = next_turn(text, 2)
    generate(ca, "control-1", prompt)
    OpenAI(base_url=f"{a.url}/v1", api_key="none", max_retries=0).chat.completions.create(
        model="m", messages=messages, max_tokens=8)  # type: ignore[arg-type]
    want = [r["input_ids"] for r in records(worker)[-2:]]
    generate(cb, "st-gen", prompt)
    OpenAI(base_url=f"{b.url}/sessions/st-chat/v1", api_key="none", max_retries=0).chat.completions.create(
        model="m", messages=messages, max_tokens=8)  # type: ignore[arg-type]
    assert [r["input_ids"] for r in records(worker)[-2:]] == want


def test_a_store_that_does_not_answer_delays_nothing_but_the_first_read(replica, servers_to_stop):
    """A server that accepts connections and never answers: the first request of a session this replica does not
    hold waits --session-store-timeout, then goes on as a new session, flagged; writes fail and are counted."""
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = silent.accept()
            except OSError:
                return
            held.append(conn)

    threading.Thread(target=accept, daemon=True).start()
    try:
        b = replica(session_store_url=f"redis://127.0.0.1:{silent.getsockname()[1]}/0", session_store_timeout=0.3)
        cb = httpx.Client(base_url=b.url, timeout=30)
        generate(cb, "slow-1", TEMPLATE.format("hello?"))
        generate(cb, "slow-1", TEMPLATE.format("hello again?"))  # held now: no read
        stats = store_stats(b.url)
        assert stats["loads"] == 1 and stats["load_errors"] == 1
        assert [g["reason"] for g in get(cb, "slow-1")["gaps"]] == ["history_unavailable"]
        wait_until(lambda: store_stats(b.url)["write_errors"] >= 1)
    finally:
        silent.close()
        for conn in held:
            conn.close()


def test_a_full_queue_drops_entries_and_readers_know(replica, redis_server, monkeypatch):
    """The store down, the queue (2 entries here) full: later entries are dropped and counted, requests still
    served; another replica then loads the session up to the first missing entry, with a gap saying so."""
    import slime_router_plugins.sessions.write_behind as wb

    monkeypatch.setattr(wb, "QUEUE_MAX", 2)
    a, b = replica(), replica()
    ca, cb = httpx.Client(base_url=a.url, timeout=30), httpx.Client(base_url=b.url, timeout=30)
    redis_server.stop()
    text = TEMPLATE.format("queue")
    for t in range(5):  # entry 0 is being retried by the writer, entry 1 waits, the others are dropped
        if t:
            text = next_turn(text, t)
        text += generate(ca, "q-1", text)["text"]
    assert store_stats(a.url)["entries_dropped"] >= 1
    redis_server.start()
    wait_until(lambda: (st := store_stats(a.url))["queued"] == 0 and st["entries_written"] >= 1)
    kept = store_stats(a.url)["entries_written"]
    assert kept < 5
    generate(ca, "q-1", next_turn(text, 5))  # now the session tells readers its history is incomplete
    written(a.url, kept + 1)
    s = get(cb, "q-1")
    assert sum(len(t["turns"]) for t in s["trajectories"]) == kept
    # (A could not read the store either when the session began there: the first gap is A's)
    assert [g["reason"] for g in s["gaps"]] == ["history_unavailable", "history_incomplete"]
    assert store_stats(b.url)["load_incomplete"] == 1
