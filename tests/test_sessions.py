"""Sessions end to end: router + mock SGLang worker on real sockets, the real tokenizer, the OpenAI SDK.

Every session's trajectories are checked against the mock worker's record of the exact ids it received and
produced, and against retrieval by text / by messages of the same conversation.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from openai import OpenAI

from slime_router_core import Settings
from slime_router_core.tokenizers import BUILTIN_CHECKPOINT
from slime_router_testing import ServerThread, start_router
from slime_router_testing.mock_worker import MockWorkerConfig, create_mock_worker_app

KEYS = ("tokens", "loss_mask", "rollout_logp", "weight_versions")
TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def worker() -> Iterator[str]:
    w = ServerThread(create_mock_worker_app(MockWorkerConfig(hf_checkpoint=BUILTIN_CHECKPOINT,
                                                             max_random_tokens=12))).start()
    yield w.url
    w.stop()


def _router(worker: str, **extra: Any) -> ServerThread:
    return start_router(plugins=["radix_tree", "openai_compat", "sessions"], settings=Settings(
        hf_checkpoint=BUILTIN_CHECKPOINT, worker_urls=[worker], extra=extra))


@pytest.fixture
def env(worker, servers_to_stop) -> Iterator[dict[str, Any]]:
    httpx.delete(worker + "/mock/records")
    router = _router(worker)
    with httpx.Client(base_url=router.url, timeout=30) as c:
        yield {"worker": worker, "url": router.url, "c": c}
    servers_to_stop.append(router)


def records(worker: str) -> list[dict]:
    return httpx.get(worker + "/mock/records").json()


def session(c: httpx.Client, sid: str) -> dict:
    r = c.get(f"/sessions/{sid}")
    assert r.status_code == 200, r.text
    return r.json()


def by_text(c: httpx.Client, text: str) -> dict:
    r = c.post("/retrieve_from_text", json={"text": text})
    assert r.status_code == 200, r.text
    return r.json()


def same(a: dict, b: dict) -> None:
    for k in KEYS:
        assert a[k] == b[k], k


def conversation(c: httpx.Client, path: str, turns: int, tag: str, headers: dict | None = None,
                 stream: bool = False) -> str:
    text = TEMPLATE.format(f"Session {tag}: hello")
    for t in range(turns):
        if t:
            text += "<|im_end|>\n" + TEMPLATE.format(f"and turn {t} of {tag}")
        body = {"text": text, "sampling_params": {"max_new_tokens": 16}, "stream": stream}
        if stream:
            out = ""
            with c.stream("POST", path, json=body, headers=headers) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line.startswith("data:") and line[5:].strip() != "[DONE]":
                        out = orjson.loads(line[5:])["text"]  # cumulative text
        else:
            r = c.post(path, json=body, headers=headers)
            assert r.status_code == 200, r.text
            out = r.json()["text"]
        text += out
    return text


def truth(recs: list[dict]) -> tuple[list[int], list[int]]:
    """The last record's prompt + output, and the mask: every record's output 1."""
    last = recs[-1]
    seq = last["input_ids"] + last["output_ids"]
    mask = [0] * len(seq)
    for rec in recs:
        a = len(rec["input_ids"])
        assert seq[:a + len(rec["output_ids"])] == rec["input_ids"] + rec["output_ids"]
        for k in range(len(rec["output_ids"])):
            mask[a + k] = 1
    return seq, mask


@pytest.mark.parametrize("how", ["header", "scoped_url", "stream"])
def test_generate_turns_are_one_exact_trajectory(env, how):
    c, sid = env["c"], f"s-{how}"
    if how == "header":
        text = conversation(c, "/generate", 3, how, headers={"X-Session-ID": sid})
    elif how == "scoped_url":
        text = conversation(c, f"/sessions/{sid}/generate", 3, how)
    else:
        text = conversation(c, "/generate", 3, how, headers={"X-Session-ID": sid}, stream=True)
    s = session(c, sid)
    assert s["requests"] == 3 and s["gaps"] == []
    (traj,) = s["trajectories"]
    assert traj["reason"] == "new" and len(traj["turns"]) == 3
    seq, mask = truth(records(env["worker"]))
    assert traj["tokens"] == seq and traj["loss_mask"] == mask
    same(traj, by_text(c, text))  # retrieval by session == retrieval by text


def test_requests_without_a_session_create_none(env):
    c = env["c"]
    conversation(c, "/generate", 2, "plain")
    listing = c.get("/sessions").json()
    assert listing["sessions"] == [] and listing["stats"]["created"] == 0


def test_openai_sdk_with_only_a_base_url(env):
    c, sid = env["c"], "sdk-agent"
    client = OpenAI(base_url=f"{env['url']}/sessions/{sid}/v1", api_key="none", max_retries=0)
    messages: list[dict] = [{"role": "user", "content": "Hi there"}]
    for turn in range(3):
        reply = client.chat.completions.create(model="m", messages=messages, max_tokens=16)  # type: ignore[arg-type]
        messages += [{"role": "assistant", "content": reply.choices[0].message.content or ""},
                     {"role": "user", "content": f"more {turn}"}]
    s = session(c, sid)
    (traj,) = s["trajectories"]
    assert len(traj["turns"]) == 3
    seq, mask = truth(records(env["worker"]))
    assert traj["tokens"] == seq and traj["loss_mask"] == mask
    r = c.post("/retrieve_from_messages", json={"messages": messages[:-1]})
    assert r.status_code == 200, r.text
    assert r.json()["tokens"][:len(seq)] == seq  # (+ the template's trailing newline, fresh)


def test_grpo_group_is_separate_branches_of_one_group(env):
    c, sid = env["c"], "grpo"
    prompt = TEMPLATE.format("Solve 2+2")
    r = c.post("/generate", headers={"X-Session-ID": sid},
               json={"text": prompt, "sampling_params": {"max_new_tokens": 12, "n": 4}})
    assert r.status_code == 200, r.text
    replies = r.json()
    s = session(c, sid)
    trajs = s["trajectories"]
    assert len(trajs) == 4
    assert trajs[0]["reason"] == "new" and all(t["reason"] == "branch" and t["parent"] == 0 for t in trajs[1:])
    groups = {t["turns"][0]["group"] for t in trajs}
    assert len(groups) == 1 and None not in groups  # one group: the request
    plen = trajs[0]["turns"][0]["prompt_tokens"]
    assert all(t["diverges_at"] == plen for t in trajs[1:])
    for t, reply in zip(trajs, replies):
        same(t, by_text(c, prompt + reply["text"]))


def test_changed_history_is_a_rewrite_segment(env):
    c, sid = env["c"], "rewrite"
    h = {"X-Session-ID": sid}
    text = conversation(c, "/generate", 2, "rw", headers=h)
    edited = TEMPLATE.format("Session rw: hello") + " I changed my answer.<|im_end|>\n" + TEMPLATE.format("ok?")
    r = c.post("/generate", headers=h, json={"text": edited, "sampling_params": {"max_new_tokens": 8}})
    assert r.status_code == 200
    s = session(c, sid)
    assert [t["reason"] for t in s["trajectories"]] == ["new", "rewrite"]
    rw = s["trajectories"][1]
    assert rw["parent"] == 0 and 0 < rw["diverges_at"] < s["trajectories"][0]["token_length"]
    same(s["trajectories"][0], by_text(c, text))
    same(rw, by_text(c, edited + r.json()["text"]))


def test_metadata_finish_and_late_requests(env):
    c = env["c"]
    r = c.post("/sessions", json={"session_id": "ep-1", "metadata": {"episode": 1}})
    assert r.status_code == 201 and r.json()["base_url"] == "/sessions/ep-1"
    conversation(c, "/generate", 2, "fin", headers={"X-Session-ID": "ep-1",
                                                    "X-Session-Metadata": '{"group": "g7"}'})
    assert c.patch("/sessions/ep-1", json={"metadata": {"reward": 0.5}}).status_code == 200
    held = c.get("/sessions").json()["stats"]
    assert held["sessions"] == 1 and held["bytes"] > 0 and held["tokens"] > 0
    done = c.delete("/sessions/ep-1")
    assert done.status_code == 200
    assert done.json()["metadata"] == {"episode": 1, "group": "g7", "reward": 0.5}
    assert len(done.json()["trajectories"][0]["tokens"]) == held["tokens"]
    after = c.get("/sessions").json()["stats"]
    assert after["sessions"] == 0 and after["tokens"] == 0 and after["finished"] == 1
    late = c.post("/generate", headers={"X-Session-ID": "ep-1"}, json={"text": "late", "sampling_params": {}})
    assert late.status_code == 409 and "finished" in late.json()["error"]["message"]
    assert c.get("/sessions/ep-1").status_code == 409
    assert c.delete("/sessions/ep-1").status_code == 409
    assert c.get("/sessions/never").status_code == 404


@pytest.mark.parametrize("bad", ["a b", "x" * 129, "semi;colon"])
def test_bad_session_id_and_metadata_are_400(env, bad):
    c = env["c"]
    r = c.post("/generate", headers={"X-Session-ID": bad}, json={"text": "hi", "sampling_params": {}})
    assert r.status_code == 400 and "Session id" in r.json()["error"]["message"]
    r = c.post("/generate", headers={"X-Session-ID": "ok", "X-Session-Metadata": "[1]"},
               json={"text": "hi", "sampling_params": {}})
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]


def test_ttl_expires_abandoned_sessions(worker, servers_to_stop):
    router = _router(worker, session_ttl=0.3)
    servers_to_stop.append(router)
    with httpx.Client(base_url=router.url, timeout=30) as c:
        conversation(c, "/generate", 1, "ttl", headers={"X-Session-ID": "old"})
        assert c.get("/sessions/old").status_code == 200
        deadline = time.monotonic() + 30
        while c.get("/sessions/old").status_code != 404:
            assert time.monotonic() < deadline, "the session never expired"
            time.sleep(0.1)
        assert "expired" in c.get("/sessions/old").json()["error"]["message"]
        stats = c.get("/sessions").json()["stats"]
        assert stats["expired"] == 1 and stats["tokens"] == 0


def test_batch_retrieval_equals_single_retrievals(env):
    c = env["c"]
    texts = [conversation(c, "/generate", 2, f"b{k}", headers={"X-Session-ID": f"b{k}"}) for k in range(4)]
    sids = ["b0", "b1", "missing", "b2", "b3"]
    r = c.post("/retrieve_batch", json={"sessions": sids})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    lines = [orjson.loads(x) for x in r.text.splitlines()]
    assert [x["session_id"] for x in lines] == sids
    assert lines[2]["error"]["status"] == 404
    for line, sid in zip(lines, sids):
        if sid != "missing":
            assert line == session(c, sid)
    r = c.post("/retrieve_batch", json={"texts": texts})
    got = [orjson.loads(x) for x in r.text.splitlines()]
    assert [g["index"] for g in got] == [0, 1, 2, 3]
    for g, t in zip(got, texts):
        g.pop("index")
        assert g == by_text(c, t)
    r = c.post("/retrieve_batch", json={"sessions": ["b0"], "texts": texts})
    assert r.status_code == 400
    r = c.post("/retrieve_batch", json={"sessions": ["b0", "b1"], "finish": True})
    assert len(r.text.splitlines()) == 2
    assert c.get("/sessions/b0").status_code == 409


def test_columnar_batch_equals_json_lines(env):
    from slime_router_plugins.sessions.columnar import decode

    c = env["c"]
    for k in range(3):
        conversation(c, "/generate", 2, f"col{k}", headers={"X-Session-ID": f"col{k}"})
    r = c.post("/retrieve_batch", json={"sessions": ["col0", "col1", "nope", "col2"], "format": "columnar"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/vnd.slime-router.columnar"
    items = decode(r.content)
    lines = [orjson.loads(x) for x in c.post("/retrieve_batch", json={
        "sessions": ["col0", "col1", "nope", "col2"]}).text.splitlines()]
    assert items[2]["error"]["status"] == 404
    for item, line in zip(items, lines):
        if "error" in line:
            continue
        for a, b in zip(item["trajectories"], line["trajectories"]):
            assert a == b
    numpy_items = decode(r.content, numpy=True)
    assert numpy_items[0]["trajectories"][0]["tokens"].tolist() == lines[0]["trajectories"][0]["tokens"]
    r = c.post("/retrieve_batch", json={"texts": ["x"], "format": "columnar"})
    assert r.status_code == 400


@pytest.mark.parametrize("route", ["chat", "chat_stream", "completions", "completions_stream", "generate_ids"])
def test_every_entry_point_lands_in_the_session(env, route):
    c, sid = env["c"], f"ep-{route}"
    base = f"/sessions/{sid}"
    stream = route.endswith("_stream")
    if route.startswith("chat"):
        client = OpenAI(base_url=env["url"] + base + "/v1", api_key="none", max_retries=0)
        messages: list[dict] = [{"role": "user", "content": "Hello"}]
        for turn in range(2):
            if stream:
                parts = client.chat.completions.create(model="m", messages=messages, max_tokens=12,  # type: ignore
                                                       stream=True)
                content = "".join((p.choices[0].delta.content or "") for p in parts if p.choices)
            else:
                reply = client.chat.completions.create(model="m", messages=messages, max_tokens=12)  # type: ignore
                content = reply.choices[0].message.content or ""
            messages += [{"role": "assistant", "content": content}, {"role": "user", "content": f"and {turn}"}]
    elif route.startswith("completions"):
        client = OpenAI(base_url=env["url"] + base + "/v1", api_key="none", max_retries=0)
        prompt = "Once upon a time"
        for _ in range(2):
            if stream:
                parts = client.completions.create(model="m", prompt=prompt, max_tokens=12, stream=True)
                prompt += "".join(p.choices[0].text for p in parts if p.choices)
            else:
                prompt += client.completions.create(model="m", prompt=prompt, max_tokens=12).choices[0].text
            prompt += " Then"
    else:
        ids = [9707, 11, 1879, 0]
        for _ in range(2):
            r = c.post(base + "/generate", json={"input_ids": ids, "sampling_params": {"max_new_tokens": 8}})
            assert r.status_code == 200, r.text
            ids = ids + r.json()["output_ids"] + [1221]
    s = session(c, sid)
    assert s["gaps"] == [] and s["requests"] == 2
    (traj,) = s["trajectories"]
    assert len(traj["turns"]) == 2
    seq, mask = truth(records(env["worker"]))
    assert traj["tokens"] == seq and traj["loss_mask"] == mask


def test_finish_and_ttl_free_the_memory():
    """The store's memory, measured with tracemalloc: a finished or expired session's tokens are freed."""
    import gc
    import random
    import tracemalloc

    from slime_router_plugins.sessions.store import SessionStore

    rng = random.Random(0)
    store = SessionStore(ttl=60, max_sessions=0)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for k in range(20):
        s, _ = store.open(f"m{k}")
        for turn in range(5):  # 5 turns of 2,000 tokens
            prompt = list(s.segments[0].ids) if s.segments else []
            s.add_turn(prompt + [rng.randrange(1000) for _ in range(1000)], [rng.randrange(1000) for _ in range(1000)],
                       [-0.5] * 1000, ["v1"] * 1000, "v1", f"r{turn}", {"type": "stop"}, None)
    del s, prompt  # the test's own references
    held = tracemalloc.get_traced_memory()[0] - base
    assert store.stats()["tokens"] == 20 * 10_000
    assert held > 9 * 200_000  # ~9 bytes per token
    for k in range(10):
        store.finish(f"m{k}")
    assert store.expire(now=time.monotonic() + 120) == 10
    gc.collect()
    left = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert store.stats()["sessions"] == 0
    assert left < 0.05 * held, (left, held)  # what is left: the tombstones of 20 ids


def test_a_client_that_leaves_mid_stream_is_a_gap_and_a_shared_system_prompt_is_new(env):
    c, sid = env["c"], "gaps"
    h = {"X-Session-ID": sid}
    first = conversation(c, "/generate", 1, "g1", headers=h)
    # an unrelated conversation in the same session: shares the template's first tokens, no generated token
    conversation(c, "/generate", 1, "g2", headers=h)
    httpx.post(env["worker"] + "/mock/configure", json={"token_latency": 0.5}).raise_for_status()
    try:
        with c.stream("POST", "/generate", headers=h, json={
                "text": first + "<|im_end|>\n" + TEMPLATE.format("go on"), "stream": True,
                "sampling_params": {"max_new_tokens": 12}}) as r:
            assert r.status_code == 200
            next(r.iter_lines())  # one chunk (of ~6 s of them), then the client goes away
    finally:
        httpx.post(env["worker"] + "/mock/configure", json={"token_latency": 0.0}).raise_for_status()
    deadline = time.monotonic() + 30
    while not session(c, sid)["gaps"]:
        assert time.monotonic() < deadline, "the abandoned stream never showed up in the gaps"
        time.sleep(0.05)
    s = session(c, sid)
    assert [g["reason"] for g in s["gaps"]] == ["not_finished"]
    assert [t["reason"] for t in s["trajectories"]] == ["new", "new"] and s["requests"] == 3


def test_scoped_urls_are_behind_the_data_key(worker, servers_to_stop):
    router = start_router(plugins=["radix_tree", "sessions"], settings=Settings(
        hf_checkpoint=BUILTIN_CHECKPOINT, worker_urls=[worker], api_key="data", admin_api_key="admin"))
    servers_to_stop.append(router)
    body = {"text": "hi", "sampling_params": {"max_new_tokens": 4}}
    with httpx.Client(base_url=router.url, timeout=30) as c:
        assert c.post("/sessions/k1/generate", json=body).status_code == 401
        assert c.post("/sessions/k1/generate", json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
        ok = c.post("/sessions/k1/generate", json=body, headers={"Authorization": "Bearer data"})
        assert ok.status_code == 200, ok.text
        assert c.get("/sessions/k1").status_code == 401
        got = c.get("/sessions/k1", headers={"Authorization": "Bearer data"})
        assert got.status_code == 200 and got.json()["requests"] == 1


def test_batch_of_bad_message_lists_answers_400_items(env):
    c = env["c"]
    r = c.post("/retrieve_batch", json={"messages": [[{"content": "no role"}], [{"role": "user", "content": "hi"}]]})
    assert r.status_code == 200
    lines = [orjson.loads(x) for x in r.text.splitlines()]
    assert lines[0]["index"] == 0 and lines[0]["error"]["status"] == 400 and "role" in lines[0]["error"]["message"]
    assert lines[1]["index"] == 1 and "tokens" in lines[1]


@pytest.mark.parametrize("ids", [[-1, 5], [5, 10**9]])
def test_generate_with_ids_outside_the_vocabulary_is_400(env, ids):
    r = env["c"].post("/generate", json={"input_ids": ids, "sampling_params": {"max_new_tokens": 2}})
    assert r.status_code == 400 and "outside the vocabulary" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "input_ids"


def test_without_a_trajectory_cache_the_plugin_stands_down(worker, servers_to_stop):
    """No cache (radix_tree blocked): the sessions plugin leaves the request path (no hook of it is called, so a
    pass-through router stays a byte relay) and its routes are not there."""
    router = start_router(plugins=["sessions"], settings=Settings(worker_urls=[worker]))
    servers_to_stop.append(router)
    hooks = router.app.router.hooks
    assert hooks.pre_request is None and hooks.post_response is None and hooks.stream_chunk is None
    with httpx.Client(base_url=router.url, timeout=30) as c:
        r = c.post("/generate", headers={"X-Session-ID": "s"}, json={"text": "hi", "sampling_params": {}})
        assert r.status_code == 200
        assert c.get("/sessions").status_code == 404
