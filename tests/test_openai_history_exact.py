"""Exact history through the OpenAI API when the model writes what real models write (replies that start with
whitespace or newlines, tool-call JSON with unusual spacing, parallel tool calls, empty content with tool calls,
reasoning) and clients send back what they got: verbatim as the SDK gave it, or re-serialized the way LangChain
does (arguments parsed and ``json.dumps``-ed, reasoning dropped). Every history mode, streamed and not, the cache
in the router's process and in its own: ``/retrieve_from_messages`` gives back the worker's exact ids with mask 1
on every generated token. Where a turn cannot be exact, the cause is named."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from openai import OpenAI

from conftest import mock_worker_app, with_engine
from slime_router_core import Settings
from slime_router_core.tokenizers import BUILTIN_CHECKPOINT
from slime_router_testing import ServerThread, start_router
from slime_router_testing.mock_worker import MockWorkerConfig
from test_openai_exact import assert_exact

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"},
                                                    "day": {"type": "string"}}, "required": ["city"]}}}]

# What the model writes in the four-turn conversation (one tool round, then another after a user turn).
TURNS = [
    ' Let me check both cities.\n<tool_call>\n{"name":"get_weather", "arguments": {"city":"Paris",  "unit": "c"}}'
    '\n</tool_call>\n<tool_call>\n{"name": "get_weather","arguments":{"city": "Oslo"}}\n</tool_call>',
    "\n\n It is 21°C in Paris and 5°C in Oslo.  ",
    '<think>\nThe user wants tomorrow.\n</think>\n\n<tool_call>\n{"name":"get_weather","arguments":'
    '{"city":"Paris","day":"tomorrow"}}\n</tool_call>',
    " Tomorrow: sunny, 23°C.",
]


@pytest.fixture(scope="module", params=["sglang", "vllm"])
def engine(request: Any) -> str:
    """Every test against an SGLang and a vLLM mock worker (same generation, same records of truth)."""
    return request.param


@pytest.fixture(scope="module")
def worker(engine: str) -> Iterator[str]:
    w = ServerThread(mock_worker_app(engine, MockWorkerConfig(hf_checkpoint=BUILTIN_CHECKPOINT))).start()
    yield w.url
    w.stop()


@pytest.fixture(scope="module", params=["in_process", "own_process"])
def router_url(worker: str, engine: str, request: Any) -> Iterator[str]:
    r = start_router(plugins=with_engine(engine, ["radix_tree", "openai_compat", "metrics"]), settings=Settings(
        hf_checkpoint=BUILTIN_CHECKPOINT, worker_urls=[worker],
        extra={"radix_tree_process": request.param == "own_process"}))
    yield r.url
    r.stop()


def configure(worker: str, **kw: Any) -> None:
    httpx.post(worker + "/mock/configure", json=kw).raise_for_status()


def records(worker: str) -> list[dict]:
    return httpx.get(worker + "/mock/records").json()


def ask(client: OpenAI, msgs: list, stream: bool, mode: str, tools: list | None = TOOLS) -> dict:
    """One chat turn; the assistant message as the client ends up holding it (the SDK's message object, or the
    message a streaming client assembles from the deltas)."""
    extra = {"history_mode": mode}
    kw: dict[str, Any] = {"tools": tools} if tools else {}
    if not stream:
        r = client.chat.completions.create(model="m", messages=msgs, extra_body=extra, **kw)
        return r.choices[0].message.model_dump(exclude_none=True)
    content, reasoning, calls = "", None, []
    for ch in client.chat.completions.create(model="m", messages=msgs, stream=True, extra_body=extra, **kw):
        if not ch.choices:
            continue
        d = ch.choices[0].delta
        content += d.content or ""
        if (d.model_extra or {}).get("reasoning_content"):
            reasoning = (reasoning or "") + d.model_extra["reasoning_content"]
        for tc in d.tool_calls or []:
            calls.append({"id": tc.id, "type": "function",
                          "function": {"name": tc.function.name, "arguments": tc.function.arguments}})
    msg: dict[str, Any] = {"role": "assistant", "content": content or None}
    if reasoning is not None:
        msg["reasoning_content"] = reasoning
    if calls:
        msg["tool_calls"] = calls
    return msg


def echo(msg: dict, style: str) -> dict:
    if style == "verbatim":  # everything the client got, as it got it
        return msg
    # LangChain / LangGraph: AIMessage(content=str, tool_calls=[{name, args: dict, id}]) serialized back
    out: dict[str, Any] = {"role": "assistant", "content": msg.get("content") or ""}
    if msg.get("tool_calls"):
        out["tool_calls"] = [{"id": c["id"], "type": "function", "function": {
            "name": c["function"]["name"], "arguments": json.dumps(json.loads(c["function"]["arguments"]))}}
            for c in msg["tool_calls"]]
    return out


@pytest.mark.parametrize("style", ["verbatim", "langchain"])
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("mode", ["template", "raw"])
def test_four_turn_tool_chat_with_real_model_text_is_exact(router_url, worker, mode, stream, style):
    client = OpenAI(base_url=router_url + "/v1", api_key="none", max_retries=0)
    httpx.delete(worker + "/mock/records")
    msgs: list[dict] = [{"role": "system", "content": "You are a weather bot."},
                        {"role": "user", "content": f"Weather in Paris and Oslo? ({uuid.uuid4().hex[:6]})"}]
    for k, text in enumerate(TURNS):
        configure(worker, mode="reply_text", reply_text=text)
        got = ask(client, msgs, stream, mode)
        if k == 0:
            assert got["content"] == "Let me check both cities."  # what OpenAI clients expect to see
            assert [json.loads(c["function"]["arguments"]) for c in got["tool_calls"]] == \
                [{"city": "Paris", "unit": "c"}, {"city": "Oslo"}]
            assert got["tool_calls"][0]["function"]["arguments"] == '{"city":"Paris",  "unit": "c"}'
        msgs.append(echo(got, style))
        if got.get("tool_calls"):
            msgs += [{"role": "tool", "tool_call_id": c["id"], "content": f"{20 + i}°C"}
                     for i, c in enumerate(got["tool_calls"])]
        elif k == 1:
            msgs.append({"role": "user", "content": "And tomorrow in Paris?"})
    recs = records(worker)
    assert len(recs) == 4
    res = httpx.post(router_url + "/retrieve_from_messages",
                     json={"messages": msgs, "tools": TOOLS, "history_mode": mode, "strict": True}).json()
    assert sum(len(r["output_ids"]) for r in recs) == sum(res["loss_mask"])
    assert_exact(res, recs)


def test_causes_are_named(router_url, worker):
    """template_rule: Qwen3 drops an earlier turn's reasoning; client_edit: the client changed what it got;
    unknown_origin: an assistant message the router never returned."""
    client = OpenAI(base_url=router_url + "/v1", api_key="none", max_retries=0)
    tag = uuid.uuid4().hex[:6]
    msgs: list[dict] = [{"role": "user", "content": f"Hi ({tag})"}]
    configure(worker, mode="reply_text", reply_text="<think>\nA greeting.\n</think>\n\n Hello!")
    msgs.append(ask(client, msgs, False, "template"))
    msgs.append({"role": "user", "content": "How are you?"})
    configure(worker, mode="reply_text", reply_text=" Fine.")
    msgs.append(ask(client, msgs, False, "template"))
    res = httpx.post(router_url + "/retrieve_from_messages", json={"messages": msgs, "tools": TOOLS}).json()
    assert [(t["message_index"], t["cause"]) for t in res["rewritten_turns"]] == [(1, "template_rule")]
    assert res["mismatch"] == "template_rule" and res["rewritten_turns"][0]["generated_tokens"] > 0
    assert len(res["segments"]) == 1 and res["unverified_turns"] == []

    # strict: a finished conversation is served (the template's closing newline is not generated text) ...
    ok = httpx.post(router_url + "/retrieve_from_messages", json={"messages": msgs, "tools": TOOLS, "strict": True})
    assert ok.status_code == 200 and ok.json()["fresh_tokens"] == 1
    # ... one whose last turn was never generated is refused
    made_up = msgs[:3] + [{"role": "assistant", "content": "Something the model never said."}]
    r = httpx.post(router_url + "/retrieve_from_messages", json={"messages": made_up, "tools": TOOLS, "strict": True})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_recorded"
    edited = msgs[:3] + [dict(msgs[3], content="Fine, thank you.")]
    res = httpx.post(router_url + "/retrieve_from_messages", json={"messages": edited, "tools": TOOLS}).json()
    assert ("client_edit" in [t["cause"] for t in res["rewritten_turns"]]
            and [t["message_index"] for t in res["rewritten_turns"] if t["cause"] == "client_edit"] == [3])

    foreign = [{"role": "user", "content": f"Never asked ({tag})"}, {"role": "assistant", "content": "Made up."}]
    res = httpx.post(router_url + "/retrieve_from_messages", json={"messages": foreign}).json()
    assert res["unverified_turns"] == [1] and res["rewritten_turns"] == []
    stats = httpx.get(router_url + "/openai_compat/stats").json()
    assert stats["rewritten_turns_template_rule"] >= 1 and stats["rewritten_turns_client_edit"] >= 1
    assert stats["rewritten_turns_unknown_origin"] >= 1 and stats["audit_generated_tokens_template_rule"] > 0


@pytest.mark.parametrize("stream", [False, True], ids=["invoke", "stream"])
def test_real_langchain_agent_loop_is_exact(router_url, worker, stream):
    """LangChain itself holds the history (AIMessage with parsed tool-call args) and serializes it back."""
    from langchain_core.messages import HumanMessage, SystemMessage, ToolMessage
    from langchain_openai import ChatOpenAI
    from langchain_openai.chat_models.base import _convert_message_to_dict

    httpx.delete(worker + "/mock/records")
    llm = ChatOpenAI(base_url=router_url + "/v1", api_key="none", model="m", max_retries=0).bind_tools(TOOLS)

    def call(history: list) -> Any:
        if not stream:
            return llm.invoke(history)
        out = None
        for chunk in llm.stream(history):
            out = chunk if out is None else out + chunk
        return out

    history: list = [SystemMessage("You are a weather bot."),
                     HumanMessage(f"Weather in Paris and Oslo? ({uuid.uuid4().hex[:6]})")]
    for k, text in enumerate(TURNS):
        configure(worker, mode="reply_text", reply_text=text)
        msg = call(history)
        history.append(msg)
        for i, tc in enumerate(msg.tool_calls):
            history.append(ToolMessage(f"{20 + i}°C", tool_call_id=tc["id"]))
        if not msg.tool_calls and k == 1:
            history.append(HumanMessage("And tomorrow in Paris?"))
    assert history[2].tool_calls[0]["args"] == {"city": "Paris", "unit": "c"}
    msgs = [_convert_message_to_dict(m) for m in history]
    # what LangChain sends back is not what the model wrote: re-serialized arguments
    assert msgs[2]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris", "unit": "c"}'
    recs = records(worker)
    res = httpx.post(router_url + "/retrieve_from_messages", json={"messages": msgs, "tools": TOOLS}).json()
    assert_exact(res, recs)


def test_audit_counts_where_generated_tokens_went(router_url, worker):
    """/metrics (JSON and Prometheus): generated tokens recorded vs served back exactly vs kept out of a retrieved
    chat's sequence by a template rule, and fresh tokens by cause."""

    def audit() -> dict:
        return httpx.get(router_url + "/metrics").json()["audit"]

    client = OpenAI(base_url=router_url + "/v1", api_key="none", max_retries=0)
    before = audit()
    msgs: list[dict] = [{"role": "user", "content": f"Hi ({uuid.uuid4().hex[:6]})"}]
    configure(worker, mode="reply_text", reply_text="<think>\nA greeting.\n</think>\n\n Hello!")
    msgs.append(ask(client, msgs, False, "template"))
    msgs.append({"role": "user", "content": "How are you?"})
    configure(worker, mode="reply_text", reply_text=" Fine.")
    msgs.append(ask(client, msgs, False, "template"))
    recs = records(worker)[-2:]
    n1, n2 = (len(r["output_ids"]) for r in recs)
    res = httpx.post(router_url + "/retrieve_from_messages", json={"messages": msgs, "tools": TOOLS}).json()
    assert res["rewritten_turns"][0]["cause"] == "template_rule"
    after = audit()
    gen = {k: after["generated_tokens"].get(k, 0) - before["generated_tokens"].get(k, 0)
           for k in after["generated_tokens"]}
    assert gen["recorded"] == n1 + n2
    # the sequence holds turn 2's tokens; turn 1's are in its segment (a second retrieval, served exactly too)
    assert gen["served_exact"] == n2 + n1
    assert gen["chat_turn_not_in_sequence_template_rule"] == n1
    fresh = after["fresh_tokens_served"]["never_recorded"] - before["fresh_tokens_served"]["never_recorded"]
    assert fresh == len(res["tokens"]) - res["exact_tokens"] + sum(len(s["tokens"]) - s["exact_tokens"]
                                                                   for s in res["segments"])
    prom = httpx.get(router_url + "/metrics/prometheus").text
    recorded = float(after["generated_tokens"]["recorded"])
    assert f'slime_router_audit_generated_tokens_total{{outcome="recorded"}} {recorded}' in prom
    assert 'slime_router_audit_fresh_tokens_served_total{cause="evicted"}' in prom


def test_chat_too_large_for_the_cache_says_it_was_not_recorded(worker, engine):
    r = start_router(plugins=with_engine(engine, ["radix_tree", "openai_compat"]), settings=Settings(
        hf_checkpoint=BUILTIN_CHECKPOINT, worker_urls=[worker], extra={"radix_tree_max_size": 400}))
    try:
        client = OpenAI(base_url=r.url + "/v1", api_key="none", max_retries=0)
        configure(worker, mode="reply_text", reply_text="Short.")
        small = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}])
        assert small.model_extra["trajectory"]["recorded"] is True
        big = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "word " * 300}])
        assert big.model_extra["trajectory"]["recorded"] is False
        assert httpx.get(r.url + "/openai_compat/stats").json()["not_recorded_too_large"] == 1
        chunks = list(client.chat.completions.create(model="m", messages=[{"role": "user", "content": "word " * 300}],
                                                     stream=True))
        assert chunks[-1].choices == [] and chunks[-1].model_extra["trajectory"]["recorded"] is False
        small_stream = list(client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Yo"}],
                                                           stream=True))
        assert all("trajectory" not in (ch.model_extra or {}) for ch in small_stream)
        # the earlier conversation is still there
        res = httpx.post(r.url + "/retrieve_from_messages", json={"messages": [
            {"role": "user", "content": "Hi"}, small.choices[0].message.model_dump(exclude_none=True)]}).json()
        first = next(rec for rec in records(worker) if rec["text"] == "Short." and len(rec["input_ids"]) < 50)
        assert res["fresh_tokens"] <= 1 and sum(res["loss_mask"]) == len(first["output_ids"])
    finally:
        r.stop()
