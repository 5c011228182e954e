"""Property: whatever the model writes and however the client echoes it, every generated token of every turn of
a chat is served back by ``/retrieve_from_messages`` with mask 1 and its own logprob -- in the returned sequence,
or (template mode only, where the chat template rewrites an earlier turn) in that turn's segment, said so with
the cause ``template_rule``.

Hypothesis draws the conversation: 1-4 model turns, each reply with or without reasoning, leading/trailing
whitespace and newlines, content or none, 0-2 tool calls with arbitrary JSON spacing and key order; tool results
after tool calls, user turns otherwise; streaming or not; history mode; verbatim or LangChain-style echo."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai import OpenAI

from slime_router_core import Settings
from slime_router_core.tokenizers import BUILTIN_CHECKPOINT
from slime_router_testing import ServerThread, start_router
from slime_router_testing.mock_worker import MockWorkerConfig, create_mock_worker_app
from test_openai_history_exact import TOOLS, ask, configure, echo, records

WORDS = st.sampled_from(["The", "sun", "is", "out", "21°C", "东京", "晴れ", "🙂", "ok", "Paris", "rain", "—", "x=1;"])
SPACE = st.sampled_from(["", " ", "\n", "\n\n", "  ", "\n \n", "\t"])


@st.composite
def tool_call(draw: Any) -> str:
    args: dict[str, Any] = {"city": draw(st.sampled_from(["Paris", "Oslo", "東京"]))}
    if draw(st.booleans()):
        args["unit"] = draw(st.sampled_from(["c", "f"]))
    if draw(st.booleans()):
        args["day"] = draw(st.integers(0, 7))
    keys = draw(st.permutations(list(args)))
    sep = draw(st.sampled_from([(", ", ": "), (",", ":"), (",  ", ": "), (" , ", " :  ")]))
    body = "{" + sep[0].join(json.dumps(k) + sep[1] + json.dumps(args[k], ensure_ascii=False) for k in keys) + "}"
    name_first = draw(st.booleans())
    parts = ['"name"' + sep[1] + '"get_weather"', '"arguments"' + sep[1] + body]
    return "<tool_call>\n{" + sep[0].join(parts if name_first else parts[::-1]) + "}\n</tool_call>"


@st.composite
def reply(draw: Any) -> tuple[str, bool, bool]:
    """(the text the model writes, has tool calls, has reasoning)."""
    text = ""
    reasoning = draw(st.booleans())
    if reasoning:
        text += "<think>\n" + " ".join(draw(st.lists(WORDS, min_size=0, max_size=5))) + "\n</think>\n\n"
    content = " ".join(draw(st.lists(WORDS, min_size=0, max_size=6)))
    calls = draw(st.lists(tool_call(), min_size=0, max_size=2))
    if not content and not calls:
        content = "ok"
    text += draw(SPACE) + content + draw(SPACE)
    if calls:
        text += "\n" + "\n".join(calls)
    return text, bool(calls), reasoning


def check_served_back(res: dict, recs: list[dict], msgs: list[dict], user_after: list[bool], mode: str,
                      reasoned: list[bool]) -> None:
    """Every record's generated tokens: in the sequence (mask 1, its logprobs), or -- template mode, a turn
    the template rewrites because a user message followed a reasoning turn -- in its template_rule segment."""
    assert len(recs) == len(user_after)
    seq = recs[-1]["input_ids"] + recs[-1]["output_ids"]
    assert res["tokens"][:len(seq)] == seq
    assistant_idx = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    rewritten = {t["message_index"]: t for t in res["rewritten_turns"]}
    assert res["unverified_turns"] == []
    segments = {s["message_indices"][-1]: s for s in res.get("segments", [])}
    expected_mask = [0] * len(res["tokens"])
    for k, rec in enumerate(recs):
        traj = rec["input_ids"] + rec["output_ids"]
        start = len(rec["input_ids"])
        if res["tokens"][:len(traj)] == traj:
            got = res
            assert assistant_idx[k] not in rewritten
            expected_mask[len(rec["input_ids"]):len(traj)] = [1] * len(rec["output_ids"])
        else:  # only a chat template's own rule may keep a turn out of the sequence, and it is said
            assert mode == "template" and user_after[k] and any(reasoned[:k + 1])
            t = rewritten[assistant_idx[k]]
            assert t["cause"] == "template_rule"
            seg = segments[assistant_idx[k]]
            assert seg["tokens"][:len(traj)] == traj
            got = seg
        n = len(rec["output_ids"])
        assert got["loss_mask"][start:start + n] == [1] * n
        assert got["rollout_logp"][start:start + n] == pytest.approx(rec["output_logprobs"], abs=1e-5)
        versions = [rec["weight_version"]] * n
        for span in rec["weight_versions"]:
            versions[span["start"]:span["end"]] = [span["version"]] * (span["end"] - span["start"])
        assert got["weight_versions"][start:start + n] == versions
    assert res["loss_mask"] == expected_mask[:len(res["loss_mask"])]  # prompt tokens: mask 0
    if mode == "raw" or not any(reasoned):
        assert res["rewritten_turns"] == []


@pytest.fixture(scope="module")
def env() -> Iterator[dict[str, Any]]:
    w = ServerThread(create_mock_worker_app(MockWorkerConfig(hf_checkpoint=BUILTIN_CHECKPOINT))).start()
    r = start_router(plugins=["radix_tree", "openai_compat"],
                     settings=Settings(hf_checkpoint=BUILTIN_CHECKPOINT, worker_urls=[w.url]))
    yield {"worker": w.url, "url": r.url, "client": OpenAI(base_url=r.url + "/v1", api_key="none", max_retries=0)}
    r.stop()
    w.stop()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(turns=st.lists(reply(), min_size=1, max_size=4), stream=st.booleans(), with_tools=st.booleans(),
       mode=st.sampled_from(["template", "raw"]), style=st.sampled_from(["verbatim", "langchain"]))
def test_every_generated_token_comes_back(env, turns, stream, with_tools, mode, style):
    w, url = env["worker"], env["url"]
    httpx.delete(w + "/mock/records")
    msgs: list[dict] = [{"role": "user", "content": f"Weather? {uuid.uuid4().hex[:8]}"}]
    user_after: list[bool] = []  # per model turn: does a user message come later in the conversation
    for k, (text, _, _) in enumerate(turns):
        configure(w, mode="reply_text", reply_text=text)
        got = ask(env["client"], msgs, stream, mode, TOOLS if with_tools else None)
        msgs.append(echo(got, style))
        user_after = [u or False for u in user_after] + [False]
        if got.get("tool_calls"):
            msgs += [{"role": "tool", "tool_call_id": c["id"], "content": "sunny"} for c in got["tool_calls"]]
        elif k < len(turns) - 1:
            msgs.append({"role": "user", "content": "And then?"})
            user_after = [True] * len(user_after)
    recs = records(w)
    res = httpx.post(url + "/retrieve_from_messages",
                     json={"messages": msgs, "tools": TOOLS if with_tools else None, "history_mode": mode}).json()
    check_served_back(res, recs, msgs, user_after, mode, [r for _, _, r in turns])


@pytest.fixture(scope="module", params=["in_process", "own_process"])
def realistic_env(request: Any) -> Iterator[dict[str, Any]]:
    w = ServerThread(create_mock_worker_app(MockWorkerConfig(hf_checkpoint=BUILTIN_CHECKPOINT, realistic=True,
                                                             realistic_seed=0, max_random_tokens=24))).start()
    r = start_router(plugins=["radix_tree", "openai_compat"], settings=Settings(
        hf_checkpoint=BUILTIN_CHECKPOINT, worker_urls=[w.url],
        extra={"radix_tree_process": request.param == "own_process"}))
    yield {"worker": w.url, "url": r.url, "client": OpenAI(base_url=r.url + "/v1", api_key="none", max_retries=0)}
    r.stop()
    w.stop()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(n_turns=st.integers(1, 4), seed=st.integers(0, 10 ** 6), think=st.lists(st.booleans(), min_size=4, max_size=4),
       stream=st.booleans(), mode=st.sampled_from(["template", "raw"]),
       style=st.sampled_from(["verbatim", "langchain"]))
def test_realistic_worker_every_generated_token_comes_back(realistic_env, n_turns, seed, think, stream, mode, style):
    """The same property with the realistic worker deciding what to write (its whitespace, non-canonical splits,
    tool calls to the offered tool, per-request logprobs, a weight version bump every other sequence)."""
    env = realistic_env
    w, url = env["worker"], env["url"]
    httpx.delete(w + "/mock/records")
    configure(w, realistic_seed=seed, version_every=2)
    msgs: list[dict] = [{"role": "user", "content": f"Weather? {uuid.uuid4().hex[:8]}"}]
    user_after: list[bool] = []
    for k in range(n_turns):
        configure(w, mode="think" if think[k] else "random")
        got = ask(env["client"], msgs, stream, mode)
        msgs.append(echo(got, style))
        user_after.append(False)
        if got.get("tool_calls"):
            msgs += [{"role": "tool", "tool_call_id": c["id"], "content": "sunny"} for c in got["tool_calls"]]
        elif k < n_turns - 1:
            msgs.append({"role": "user", "content": "And then?"})
            user_after = [True] * len(user_after)
    recs = records(w)
    res = httpx.post(url + "/retrieve_from_messages",
                     json={"messages": msgs, "tools": TOOLS, "history_mode": mode}).json()
    check_served_back(res, recs, msgs, user_after, mode, [bool(t) for t in think[:n_turns]])
