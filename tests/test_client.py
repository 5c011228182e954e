"""slime_router_client end to end: the sync and async clients against a real router (radix_tree, openai_compat,
sessions) and a mock SGLang worker on real sockets, the real tokenizer, the OpenAI SDK.

Every trajectory the client returns is checked against ``GET /sessions/{sid}`` read with plain httpx and against
the mock worker's record of the exact ids it received and produced (and the logprobs it drew).
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from openai import AsyncOpenAI, OpenAI
from openai.types.chat import ChatCompletion

from slime_router_client import (
    AsyncClient,
    AsyncGenerateStream,
    AsyncSession,
    Client,
    GenerateStream,
    Session,
    SessionData,
    SessionFinished,
    SessionNotFound,
    SlimeRouterError,
    Trajectory,
    Turn,
)
from slime_router_client.errors import error_from_body, make_error
from slime_router_core import Settings
from slime_router_core.tokenizers import BUILTIN_CHECKPOINT
from slime_router_testing import ServerThread, start_router
from slime_router_testing.mock_worker import MockWorkerConfig, create_mock_worker_app

TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
SP = {"max_new_tokens": 12}


@pytest.fixture(scope="module")
def worker() -> Iterator[str]:
    w = ServerThread(create_mock_worker_app(MockWorkerConfig(hf_checkpoint=BUILTIN_CHECKPOINT,
                                                             max_random_tokens=12))).start()
    yield w.url
    w.stop()


def _router(worker: str, **settings: Any) -> ServerThread:
    return start_router(plugins=["radix_tree", "openai_compat", "sessions"], settings=Settings(
        hf_checkpoint=BUILTIN_CHECKPOINT, worker_urls=[worker], **settings))


@pytest.fixture
def url(worker: str, servers_to_stop: list[Any]) -> str:
    """A fresh router (no sessions yet); the worker's records cleared."""
    httpx.delete(worker + "/mock/records")
    router = _router(worker)
    servers_to_stop.append(router)
    return router.url


@pytest.fixture
def client(url: str) -> Iterator[Client]:
    with Client(url) as c:
        yield c


def records(worker: str) -> list[dict[str, Any]]:
    return httpx.get(worker + "/mock/records").json()


def raw_session(url: str, sid: str) -> dict[str, Any]:
    r = httpx.get(f"{url}/sessions/{sid}")
    assert r.status_code == 200, r.text
    return r.json()


def truth(recs: list[dict[str, Any]]) -> tuple[list[int], list[int], list[float]]:
    """One chain of generations as the worker saw it: the last prompt + output, the mask (every output 1) and the
    logprobs (each output's, as float32; 0.0 elsewhere)."""
    last = recs[-1]
    seq = last["input_ids"] + last["output_ids"]
    mask = [0] * len(seq)
    logp = [0.0] * len(seq)
    for rec in recs:
        a = len(rec["input_ids"])
        assert seq[:a + len(rec["output_ids"])] == rec["input_ids"] + rec["output_ids"]
        for k, lp in enumerate(rec["output_logprobs"]):
            mask[a + k] = 1
            logp[a + k] = lp
    return seq, mask, array("f", logp).tolist()


def same_as_json(t: Trajectory, j: dict[str, Any]) -> None:
    """A client Trajectory (lists) equals the router's JSON trajectory, field by field."""
    assert (t.index, t.reason, t.parent, t.diverges_at) == (j["index"], j["reason"], j["parent"], j["diverges_at"])
    assert (t.token_length, t.generated_tokens) == (j["token_length"], j["generated_tokens"])
    assert t.tokens == j["tokens"] and t.loss_mask == j["loss_mask"]
    assert t.logprobs == j["rollout_logp"] and t.weight_versions == j["weight_versions"]
    assert [Turn.from_json(x) for x in j["turns"]] == t.turns


def same_arrays(n: Trajectory, t: Trajectory) -> None:
    """A numpy Trajectory equals a list one, with the documented dtypes."""
    assert n.tokens.dtype == np.int32 and n.loss_mask.dtype == np.uint8 and n.logprobs.dtype == np.float32  # type: ignore[union-attr]
    assert n.tokens.tolist() == t.tokens and n.loss_mask.tolist() == t.loss_mask  # type: ignore[union-attr]
    assert n.logprobs.tolist() == t.logprobs and n.weight_versions == t.weight_versions  # type: ignore[union-attr]
    assert (n.index, n.reason, n.parent, n.diverges_at, n.turns) == (t.index, t.reason, t.parent, t.diverges_at,
                                                                     t.turns)
    assert n.prompt_length == t.prompt_length and n.response_length == t.response_length
    assert n.response_tokens.tolist() == t.response_tokens  # type: ignore[union-attr]


def conversation(s: Session, turns: int, tag: str) -> str:
    text = TEMPLATE.format(f"{tag}: hello")
    for t in range(turns):
        if t:
            text += "<|im_end|>\n" + TEMPLATE.format(f"turn {t} of {tag}")
        reply = s.generate(text, sampling_params=SP)
        assert isinstance(reply, dict) and reply["meta_info"]["finish_reason"]["type"] in ("stop", "length")
        text += reply["text"]
    return text


# --- sync -----------------------------------------------------------------------------------------------------


def test_session_generate_trajectories_equal_the_router_and_the_worker(client, url, worker):
    s = client.session(metadata={"episode": 3})
    assert isinstance(s, Session) and s.opened is True and s.metadata == {"episode": 3}
    assert len(s.id) == 32 and s.base_url == f"{url}/sessions/{s.id}"
    text = conversation(s, 3, "sync")
    trajs = s.trajectories()
    (t,) = trajs
    raw = raw_session(url, s.id)
    same_as_json(t, raw["trajectories"][0])
    seq, mask, logp = truth(records(worker))
    assert t.tokens == seq and t.loss_mask == mask and t.logprobs == logp
    assert t.reason == "new" and t.parent is None and len(t.turns) == 3 and t.token_length == len(seq)
    assert t.generated_tokens == sum(mask) > 0 and t.weight_versions == ["default"] * len(seq)
    first = records(worker)[0]
    assert t.prompt_length == len(first["input_ids"]) and t.prompt_tokens == first["input_ids"]
    assert t.response_tokens == seq[t.prompt_length:] and t.response_length == len(seq) - t.prompt_length
    assert t.response_loss_mask == mask[t.prompt_length:] and t.response_loss_mask[0] == 1
    assert t.response_logprobs == logp[t.prompt_length:]
    assert [x.prompt_tokens for x in t.turns] == [len(r["input_ids"]) for r in records(worker)]
    assert [x.output_tokens for x in t.turns] == [len(r["output_ids"]) for r in records(worker)]
    data = s.data()
    assert isinstance(data, SessionData) and data.session_id == s.id and data.metadata == {"episode": 3}
    assert (data.requests, data.segments, data.tokens, data.gaps) == (3, 1, len(seq), [])
    assert data.created == raw["created"]
    # the same conversation retrieved by text / by id equal the session's
    by_text = client.retrieve_text(text)
    assert by_text["tokens"] == t.tokens and by_text["loss_mask"] == t.loss_mask
    assert by_text["rollout_logp"] == t.logprobs
    listing = client.list_sessions()
    assert [x["session_id"] for x in listing["sessions"]] == [s.id] and listing["stats"]["created"] == 1


def test_input_ids_stream_and_a_grpo_group(client, url, worker):
    s = client.session("grpo-1")
    assert s.id == "grpo-1" and s.base_url.endswith("/sessions/grpo-1")
    ids = httpx.post(url + "/retrieve_from_text", json={"text": TEMPLATE.format("count")}).json()["tokens"]
    group = s.generate(input_ids=ids, sampling_params={**SP, "n": 3})
    assert isinstance(group, list) and len(group) == 3
    stream = s.generate(TEMPLATE.format("stream please"), sampling_params=SP, stream=True)
    assert isinstance(stream, GenerateStream)
    chunks = list(stream)
    assert len(chunks) >= 2 and chunks[-1]["meta_info"]["finish_reason"]["type"] in ("stop", "length")
    trajs = s.trajectories()
    # the stream's prompt shares only the chat template's first tokens with the group's: a new trajectory
    assert [t.reason for t in trajs] == ["new", "branch", "branch", "new"]
    assert [t.parent for t in trajs] == [None, 0, 0, None]
    assert trajs[1].diverges_at == trajs[2].diverges_at == len(ids) and trajs[3].diverges_at is None
    assert len({t.turns[0].group for t in trajs[:3]}) == 1 and trajs[0].turns[0].group is not None
    recs = records(worker)
    assert len(recs) == 4
    recs[:3] = sorted(recs[:3], key=lambda r: r["index"])  # the siblings finish in any order
    for t, rec in zip(trajs, recs):  # in the order the worker generated them: n siblings, then the stream
        seq, mask, logp = truth([rec])
        assert (t.tokens, t.loss_mask, t.logprobs) == (seq, mask, logp)
        assert t.prompt_tokens == rec["input_ids"] and t.response_tokens == rec["output_ids"]
    assert recs[-1]["stream"] is True and trajs[3].response_tokens == chunks[-1]["output_ids"]
    for t, j in zip(trajs, raw_session(url, s.id)["trajectories"]):
        same_as_json(t, j)


def test_numpy_views(client, url):
    s = client.session()
    conversation(s, 2, "np")
    lists = s.trajectories()
    same_as_json(lists[0], raw_session(url, s.id)["trajectories"][0])
    (n,) = s.trajectories(numpy=True)
    same_arrays(n, lists[0])
    assert n.tokens.flags.writeable is True  # arrays made from JSON: the caller's
    b = client.retrieve_batch([s.id], numpy=True)[s.id]
    assert isinstance(b, SessionData)
    (v,) = b.trajectories
    same_arrays(v, lists[0])
    assert v.tokens.flags.writeable is False  # views of the columnar payload
    (j,) = client.retrieve_batch([s.id], numpy=True, format="jsonl")[s.id].trajectories
    same_arrays(j, lists[0])


def test_batch_retrieval_columnar_equals_jsonl_and_finish(client, url):
    sessions = [client.session(f"b{k}", metadata={"k": k}) for k in range(3)]
    for k, s in enumerate(sessions):
        conversation(s, 2, f"batch {k}")
    asked = ["b0", "missing", "b1", "b2", "b0"]
    col = client.retrieve_batch(asked)
    jsonl = client.retrieve_batch(asked, format="jsonl")
    assert list(col) == list(jsonl) == ["b0", "missing", "b1", "b2"]
    assert isinstance(col["missing"], SessionNotFound)
    assert col["missing"].status == 404 and isinstance(jsonl["missing"], SessionNotFound)
    for sid in ("b0", "b1", "b2"):
        a, b = col[sid], jsonl[sid]
        assert isinstance(a, SessionData) and isinstance(b, SessionData)
        assert a.trajectories == b.trajectories and a.metadata == b.metadata == {"k": int(sid[1])}
        assert a.trajectories == client.get_session(sid).trajectories()
        for t, j in zip(a.trajectories, raw_session(url, sid)["trajectories"]):
            same_as_json(t, j)
    done = client.retrieve_batch(["b0", "b1"], finish=True)
    assert all(isinstance(x, SessionData) for x in done.values())
    again = client.retrieve_batch(["b0", "b1", "b2"], format="jsonl")
    assert isinstance(again["b0"], SessionFinished) and again["b0"].status == 409
    assert isinstance(again["b2"], SessionData)
    with pytest.raises(SessionFinished):
        client.get_session("b1").data()
    with pytest.raises(TypeError):
        client.retrieve_batch("b2")
    with pytest.raises(ValueError):
        client.retrieve_batch(["b2"], format="csv")


def test_metadata_finish_then_409_everywhere(client, url):
    s = client.session("ep-1", metadata={"episode": 1})
    conversation(s, 2, "fin")
    assert s.set_metadata(reward=0.5, group="g") == {"episode": 1, "reward": 0.5, "group": "g"}
    assert raw_session(url, "ep-1")["metadata"] == {"episode": 1, "reward": 0.5, "group": "g"}
    again = client.session("ep-1", metadata={"more": True})  # an open id: reused, metadata merged
    assert again.opened is False and again.metadata["more"] is True and again.metadata["reward"] == 0.5
    before = s.trajectories()
    final = s.finish_data()
    assert final.trajectories == before and final.metadata["reward"] == 0.5
    for call in (s.trajectories, s.finish, lambda: s.set_metadata(x=1),
                 lambda: s.generate("late", sampling_params=SP),
                 lambda: s.generate("late", sampling_params=SP, stream=True),
                 lambda: s.chat([{"role": "user", "content": "late"}]),
                 lambda: client.session("ep-1")):
        with pytest.raises(SessionFinished) as e:
            call()
        assert e.value.status == 409 and e.value.code == "session_finished" and "finished" in e.value.message
    unknown = client.get_session("never")
    assert unknown.opened is None
    with pytest.raises(SessionNotFound) as nf:
        unknown.trajectories()
    assert nf.value.status == 404 and nf.value.code == "session_not_found"
    with pytest.raises(SessionNotFound):
        unknown.finish()
    # context manager: left open by default, finished on exit with finish_on_exit
    with client.session("kept") as k:
        k.generate(TEMPLATE.format("keep"), sampling_params=SP)
    assert len(client.get_session("kept").trajectories()) == 1
    with client.session("dropped", finish_on_exit=True) as d:
        d.generate(TEMPLATE.format("drop"), sampling_params=SP)
    with pytest.raises(SessionFinished):
        d.data()
    with client.session("twice", finish_on_exit=True) as tw:
        assert tw.finish() == []  # finished inside the block: the exit does not raise
    stats = client.list_sessions()["stats"]
    assert stats["finished"] == 3 and stats["sessions"] == 1


def test_chat_and_openai_sdk_multi_turn_land_in_the_session(client, url, worker):
    s = client.session()
    reply = s.chat([{"role": "user", "content": "Hi"}], max_tokens=12)
    assert isinstance(reply, ChatCompletion) and reply.choices[0].message.role == "assistant"
    (t,) = s.trajectories()
    seq, mask, logp = truth(records(worker))
    assert (t.tokens, t.loss_mask, t.logprobs) == (seq, mask, logp)
    with pytest.raises(ValueError):
        s.chat([{"role": "user", "content": "Hi"}], stream=True)

    httpx.delete(worker + "/mock/records")
    agent = client.session()
    oai = agent.openai()
    assert isinstance(oai, OpenAI) and str(oai.base_url).rstrip("/") == agent.base_url + "/v1"
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Hello agent"}]
    for turn in range(3):
        r = oai.chat.completions.create(model="m", messages=messages, max_tokens=12)
        messages += [{"role": "assistant", "content": r.choices[0].message.content or ""},
                     {"role": "user", "content": f"go on {turn}"}]
    (t,) = agent.trajectories()
    seq, mask, logp = truth(records(worker))
    assert len(t.turns) == 3 and (t.tokens, t.loss_mask, t.logprobs) == (seq, mask, logp)
    same_as_json(t, raw_session(url, agent.id)["trajectories"][0])
    by_messages = client.retrieve_messages(messages[:-1])
    assert by_messages["tokens"][:len(seq)] == seq
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    r2 = client.retrieve_messages(messages[:-1], tools=tools)
    assert r2["tokens"] != by_messages["tokens"]  # kw reach the router: the tools are rendered into the prompt


def test_api_key_is_sent_and_a_wrong_one_raises_401(worker, servers_to_stop):
    router = _router(worker, api_key="k")
    servers_to_stop.append(router)
    with Client(router.url, api_key="k") as c:
        s = c.session()
        conversation(s, 1, "keyed")
        assert len(s.trajectories()) == 1
        oai = s.openai()
        oai.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=8)
        assert len(s.trajectories()) == 2
    for key, code in (("wrong", "invalid_api_key"), (None, "missing_api_key")):
        with Client(router.url, api_key=key) as bad:
            with pytest.raises(SlimeRouterError) as e:
                bad.session()
            assert e.value.status == 401 and e.value.code == code
            assert not isinstance(e.value, (SessionFinished, SessionNotFound))
            with pytest.raises(SlimeRouterError) as e2:
                bad.get_session(s.id).trajectories()
            assert e2.value.status == 401


def test_errors_and_arguments():
    e = error_from_body(502, b"<html>bad gateway</html>")
    assert type(e) is SlimeRouterError and e.status == 502 and "bad gateway" in e.message and e.code is None
    e = error_from_body(400, b'{"error": {"message": "no", "type": "invalid_request_error", "param": "x"}}')
    assert (e.message, e.type, e.param) == ("no", "invalid_request_error", "x") and str(e) == "HTTP 400: no"
    assert isinstance(error_from_body(404, b'{"error": {"message": "m", "code": "session_expired"}}'), SessionNotFound)
    assert isinstance(error_from_body(409, b'{"error": {"message": "m"}}', session=True), SessionFinished)
    assert type(error_from_body(404, b'{"detail": "Not Found"}')) is SlimeRouterError
    assert type(make_error(404, "m", session=True)) is SessionNotFound
    assert type(make_error(429, "too many sessions", "too_many_sessions")) is SlimeRouterError  # --session-max
    assert type(make_error(404, "no route", "x", session=True)) is SlimeRouterError
    with Client("http://127.0.0.1:9") as c:
        s = c.get_session("x")
        with pytest.raises(ValueError):
            s.generate()
        with pytest.raises(ValueError):
            s.generate("a", input_ids=[1])
    t = Trajectory(index=0, reason="new", parent=None, diverges_at=None, tokens=[1, 2], loss_mask=[0, 0],
                   logprobs=[0.0, 0.0], weight_versions=["v", "v"])
    assert t.prompt_length == 2 and t.response_tokens == [] and t.response_length == 0


def test_a_router_error_in_generate_is_raised_with_its_message(client):
    s = client.session()
    with pytest.raises(SlimeRouterError) as e:
        s.generate("hi", sampling_params={"max_new_tokens": -5})
    assert e.value.status == 400 and e.value.message


# --- async ----------------------------------------------------------------------------------------------------


async def test_async_client_end_to_end(url, worker):
    async with AsyncClient(url) as c:
        async with c.session(metadata={"a": 1}) as s:
            assert isinstance(s, AsyncSession) and s.opened is True and s.base_url == f"{url}/sessions/{s.id}"
            text = TEMPLATE.format("async hello")
            for turn in range(2):
                if turn:
                    text += "<|im_end|>\n" + TEMPLATE.format("more")
                reply = await s.generate(text, sampling_params=SP)
                text += reply["text"]
            stream = await s.generate(text + "<|im_end|>\n" + TEMPLATE.format("stream"), sampling_params=SP,
                                      stream=True)
            assert isinstance(stream, AsyncGenerateStream)
            chunks = [ch async for ch in stream]
            assert chunks[-1]["meta_info"]["finish_reason"]["type"] in ("stop", "length")
            (t,) = await s.trajectories()
            seq, mask, logp = truth(records(worker))
            assert len(t.turns) == 3 and (t.tokens, t.loss_mask, t.logprobs) == (seq, mask, logp)
            same_as_json(t, raw_session(url, s.id)["trajectories"][0])
            (n,) = await s.trajectories(numpy=True)
            same_arrays(n, t)
            assert await s.set_metadata(reward=1.0) == {"a": 1, "reward": 1.0}
            assert (await s.data()).metadata == {"a": 1, "reward": 1.0}
            by_text = await c.retrieve_text(text)  # the conversation before the stream
            assert by_text["tokens"] == records(worker)[1]["input_ids"] + records(worker)[1]["output_ids"]

        other = await c.session("async-2")
        assert other.id == "async-2" and (await c.list_sessions())["stats"]["sessions"] == 2
        reply2 = await other.chat([{"role": "user", "content": "Hi"}], max_tokens=8)
        assert isinstance(reply2, ChatCompletion)
        oai = other.openai()
        assert isinstance(oai, AsyncOpenAI)
        messages: list[dict[str, Any]] = [{"role": "user", "content": "Hi"},
                                          {"role": "assistant", "content": reply2.choices[0].message.content or ""},
                                          {"role": "user", "content": "again"}]
        r = await oai.chat.completions.create(model="m", messages=messages, max_tokens=8)
        await oai.close()
        (ct,) = await other.trajectories()
        assert len(ct.turns) == 2
        seq, mask, logp = truth(records(worker)[-2:])
        assert (ct.tokens, ct.loss_mask, ct.logprobs) == (seq, mask, logp)
        msgs = await c.retrieve_messages(messages + [{"role": "assistant", "content": r.choices[0].message.content}])
        assert msgs["tokens"][:len(seq)] == seq

        col = await c.retrieve_batch([s.id, "async-2", "nope"])
        jl = await c.retrieve_batch([s.id, "async-2", "nope"], format="jsonl", numpy=True)
        assert isinstance(col["nope"], SessionNotFound) and isinstance(jl["nope"], SessionNotFound)
        a, b = col["async-2"], jl["async-2"]
        assert isinstance(a, SessionData) and isinstance(b, SessionData)
        same_arrays(b.trajectories[0], a.trajectories[0])

        final = await other.finish()
        assert final == [ct]
        with pytest.raises(SessionFinished):
            await other.generate("late", sampling_params=SP)
        with pytest.raises(SessionFinished):
            await other.generate("late", sampling_params=SP, stream=True)
        with pytest.raises(SessionFinished):
            await other.finish_data()
        with pytest.raises(SessionNotFound):
            await c.get_session("never").data()
        async with c.session("async-3", finish_on_exit=True) as s3:
            await s3.generate(TEMPLATE.format("bye"), sampling_params=SP)
        with pytest.raises(SessionFinished):
            await s3.trajectories()
    async with AsyncClient(url, api_key="unused") as keyed:  # a key the router does not ask for is ignored
        assert (await keyed.get_session(s.id).data()).session_id == s.id


async def test_async_api_key(worker, servers_to_stop):
    router = _router(worker, api_key="k")
    servers_to_stop.append(router)
    async with AsyncClient(router.url, api_key="k") as c:
        s = await c.session()
        await s.generate(TEMPLATE.format("k"), sampling_params=SP)
        oai = s.openai()
        await oai.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=8)
        await oai.close()
        assert len(await s.trajectories()) == 2
    async with AsyncClient(router.url, api_key="nope") as bad:
        with pytest.raises(SlimeRouterError) as e:
            await bad.session()
        assert e.value.status == 401 and e.value.code == "invalid_api_key"


def test_closing_a_stream_early_aborts_it_and_versions_are_per_token(mock_worker, router):
    w = mock_worker(token_latency=0.05, min_random_tokens=30, max_random_tokens=40, stop_at_eos=0.0,
                    version_every=1)
    r = router(plugins=["radix_tree", "openai_compat", "sessions"],
               settings=Settings(hf_checkpoint=BUILTIN_CHECKPOINT, worker_urls=[w.url], extra={"session_max": 2}))
    with Client(r.url) as c:
        s = c.session()
        with s.generate(TEMPLATE.format("long"), sampling_params={"max_new_tokens": 40}, stream=True) as stream:
            first = next(stream)
            assert first["meta_info"].get("finish_reason") is None  # still generating
        assert stream.response.is_closed and list(stream) == []
        deadline = time.monotonic() + 10
        while not any(x["aborted"] for x in records(w.url)):  # the worker saw the connection go
            assert time.monotonic() < deadline, "the generation was not aborted"
            time.sleep(0.02)
        data = s.finish_data()
        assert data.trajectories == [] and data.requests == 1  # the aborted generation was not recorded
        with pytest.raises(SessionFinished):
            c.session(s.id)
        # weight versions: the worker bumps its version after every sequence
        s2 = c.session()
        text = TEMPLATE.format("versions")
        for k in range(2):
            if k:
                text += "<|im_end|>\n" + TEMPLATE.format("again")
            text += s2.generate(text, sampling_params={"max_new_tokens": 3})["text"]
        (t,) = s2.trajectories()
        recs = [x for x in records(w.url) if not x["aborted"]]
        assert len(recs) == 2 and recs[0]["weight_version"] != recs[1]["weight_version"]
        for rec in recs:
            a = len(rec["input_ids"])
            assert set(t.weight_versions[a:a + len(rec["output_ids"])]) == {rec["weight_version"]}
        c.session()
        with pytest.raises(SlimeRouterError) as e:  # --session-max 2: a 429, not a session error
            c.session()
        assert e.value.status == 429 and type(e.value) is SlimeRouterError


def test_an_error_event_mid_stream_raises():
    from slime_router_client import _core

    assert _core.sse_event("data: {\"text\": \"a\"}") == {"text": "a"} and _core.sse_event(": ping") is None
    assert _core.is_done(_core.sse_event("data: [DONE]"))
    with pytest.raises(SlimeRouterError) as e:
        _core.sse_event('data: {"error": {"message": "Worker failed mid-stream", "type": "upstream_error"}}')
    assert e.value.status == 502 and e.value.message == "Worker failed mid-stream"
