"""openai_compat end to end: the real ``openai`` SDK (sync + async) and LangChain's ChatOpenAI against a router
on a real port in front of mock SGLang workers. No trajectory cache here (plugins=["openai_compat"]);
the cache path and /retrieve_from_messages are in test_openai_exact.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest
from openai import AsyncOpenAI, OpenAI

from conftest import mock_worker_app, with_engine
from slime_router_core.contracts import OPENAI_COMPAT, SESSION_KEY, HistoryTransfer
from slime_router_core.tokenizers import BUILTIN_CHECKPOINT, load_tokenizer
from slime_router_testing import ServerThread, start_router
from slime_router_testing.mock_worker import MockWorkerConfig, create_mock_worker_app

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
USER = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module", params=["sglang", "vllm"])
def engine(request) -> str:
    """The module's tests against an SGLang and a vLLM mock worker (same generation, same records of truth)."""
    return request.param


@pytest.fixture(scope="module")
def env(engine) -> Iterator[dict[str, Any]]:
    worker = ServerThread(mock_worker_app(engine, MockWorkerConfig(hf_checkpoint=BUILTIN_CHECKPOINT))).start()
    router = start_router(plugins=with_engine(engine, ["openai_compat"]), hf_checkpoint=BUILTIN_CHECKPOINT,
                          worker_urls=[worker.url], extra=[])
    yield {"worker": worker.url, "router": router.url, "app": router.app}
    router.stop()
    worker.stop()


@pytest.fixture
def w(env) -> str:
    """The worker URL, reset to defaults and empty records."""
    httpx.post(env["worker"] + "/mock/configure", json={"mode": "random", "reply_text": None, "think_text": None,
                                                        "stream_mode": "cumulative", "token_latency": 0.0,
                                                        "max_random_tokens": 48, "stop_at_eos": 1.0,
                                                        "fail_first_n": 0}).raise_for_status()
    httpx.delete(env["worker"] + "/mock/records")
    return env["worker"]


def configure(worker: str, **kw: Any) -> None:
    httpx.post(worker + "/mock/configure", json=kw).raise_for_status()


def records(worker: str) -> list[dict]:
    return httpx.get(worker + "/mock/records").json()


@pytest.fixture(scope="module")
def client(env) -> OpenAI:
    return OpenAI(base_url=env["router"] + "/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(BUILTIN_CHECKPOINT)


def test_chat_basic_shape_usage_and_upstream_body(env, w, client, tok):
    r = client.chat.completions.create(model="my-model", messages=USER, temperature=0.5, top_p=0.9, max_tokens=30,
                                       seed=7, presence_penalty=0.1, frequency_penalty=0.2, stop=["zzz"], user="u1",
                                       extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.1,
                                                   "stop_token_ids": [151643]})
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == "my-model"
    assert r.system_fingerprint == "slime-router" and r.created > 0
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    rec = records(w)[-1]
    expected_prompt = tok.apply_chat_template(USER, tokenize=False, add_generation_prompt=True)
    assert rec["input_ids"] == tok.encode(expected_prompt, add_special_tokens=False)
    assert r.usage.prompt_tokens == len(rec["input_ids"])
    assert r.usage.completion_tokens == len(rec["output_ids"])
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details.cached_tokens == rec["cached_tokens"]
    assert r.to_dict()["metadata"]["weight_version"] == "default"
    assert choice.message.content == rec["text"]


def test_sampling_params_sent_upstream(servers_to_stop):
    """The exact /generate body: stream top level, every mapped sampling parameter, logprobs on (what the OpenAI
    layer builds, before any engine: one run, in front of an SGLang mock)."""
    worker = ServerThread(create_mock_worker_app(MockWorkerConfig(hf_checkpoint=BUILTIN_CHECKPOINT))).start()
    servers_to_stop.append(worker)
    w = worker.url
    seen: list[dict] = []
    from slime_router_core import hookimpl

    class Spy:
        @hookimpl
        def pre_request(self, ctx):
            seen.append({"body": ctx.body, "session": ctx.stash.get(SESSION_KEY), "route": ctx.route,
                         "up": ctx.upstream_path})

    router = start_router(plugins=["openai_compat"], hf_checkpoint=BUILTIN_CHECKPOINT, worker_urls=[w],
                          extra=[("spy", Spy())])
    try:
        c = OpenAI(base_url=router.url + "/v1", api_key="none", max_retries=0)
        c.chat.completions.create(
            model="m", messages=USER, temperature=0.3, top_p=0.8, max_completion_tokens=12, max_tokens=99, stop="zz",
            seed=3, n=2, presence_penalty=-1, frequency_penalty=1, logprobs=True, top_logprobs=3, user="sess-9",
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
            extra_body={"top_k": 4, "min_p": 0.1, "repetition_penalty": 1.2, "stop_token_ids": [7],
                        "chat_template_kwargs": {"enable_thinking": False}})
        s = c.chat.completions.create(model="m", messages=USER, stream=True, max_tokens=3)
        list(s)
    finally:
        router.stop()
    body, session = seen[0]["body"], seen[0]["session"]
    assert seen[0]["route"] == "/v1/chat/completions" and seen[0]["up"] == "/generate"
    assert body["return_logprob"] is True and body["top_logprobs_num"] == 3 and "stream" not in body
    assert body["rid"].startswith("chatcmpl-")
    sp = body["sampling_params"]
    assert sp == {"temperature": 0.3, "top_p": 0.8, "max_new_tokens": 12, "stop": ["zz"], "sampling_seed": 3,
                  "n": 2, "presence_penalty": -1, "frequency_penalty": 1, "top_k": 4, "min_p": 0.1,
                  "repetition_penalty": 1.2, "stop_token_ids": [7], "json_schema": '{"type": "object"}'}
    assert session == "sess-9"
    # chat_template_kwargs reach the template: enable_thinking=False adds the empty think block
    assert load_tokenizer(BUILTIN_CHECKPOINT).decode(body["input_ids"]).endswith("<think>\n\n</think>\n\n")
    assert seen[1]["body"]["stream"] is True and "stream" not in seen[1]["body"]["sampling_params"]


def test_logprobs_and_n(env, w, client, tok):
    r = client.chat.completions.create(model="m", messages=USER, n=3, logprobs=True, top_logprobs=2, max_tokens=20)
    assert [c.index for c in r.choices] == [0, 1, 2]
    recs = sorted(records(w), key=lambda x: x["index"])
    assert len(recs) == 3
    total = 0
    for c, rec in zip(r.choices, recs):
        lp = c.logprobs.content
        assert [e.logprob for e in lp] == pytest.approx(rec["output_logprobs"])
        assert [bytes(e.bytes) for e in lp] == [tok.convert_tokens_to_string([tok.convert_ids_to_tokens(t)]).encode()
                                                if t < 151643 else tok.convert_ids_to_tokens(t).encode()
                                                for t in rec["output_ids"]]
        assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob for e in lp)
        assert c.message.content == rec["text"]
        total += len(rec["output_ids"])
    assert r.usage.completion_tokens == total
    assert r.usage.prompt_tokens == len(recs[0]["input_ids"])


@pytest.mark.parametrize("stream_mode", ["cumulative", "incremental", "legacy"])
def test_streaming_equals_non_streaming(env, w, client, stream_mode):
    configure(w, stream_mode=stream_mode, mode="reply_text", reply_text="Hé, 你好 🎉! Streaming works — ok.")
    full = client.chat.completions.create(model="m", messages=USER, logprobs=True)
    chunks = list(client.chat.completions.create(model="m", messages=USER, stream=True, logprobs=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "\ufffd" not in text
    assert text == full.choices[0].message.content == "Hé, 你好 🎉! Streaming works — ok."
    lps = [e.logprob for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert lps == [e.logprob for e in full.choices[0].logprobs.content]
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_raw_sse_sequence(env, w):
    configure(w, mode="reply_text", reply_text="One two three.")
    with httpx.stream("POST", env["router"] + "/v1/chat/completions",
                      json={"model": "m", "messages": USER, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines)
    assert lines[-1] == "data: [DONE]"
    import json

    objs = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert objs[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert objs[-1]["choices"][0]["delta"] == {} and objs[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(o["object"] == "chat.completion.chunk" and "usage" not in o for o in objs)


def test_stop_string_trimmed_in_stream_and_not(env, w, client):
    configure(w, mode="reply_text", reply_text="Alpha beta END gamma delta")
    full = client.chat.completions.create(model="m", messages=USER, stop=["END"])
    chunks = list(client.chat.completions.create(model="m", messages=USER, stop=["END"], stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert full.choices[0].message.content == text == "Alpha beta "
    assert full.choices[0].finish_reason == "stop" and full.choices[0].model_extra["matched_stop"] == "END"


def test_length_finish(env, w, client):
    r = client.chat.completions.create(model="m", messages=USER, max_tokens=2)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 2


def test_reasoning_content(env, w, client):
    configure(w, mode="think", think_text="The user says hello.", reply_text="Hi! How can I help?")
    r = client.chat.completions.create(model="m", messages=USER)
    m = r.choices[0].message
    assert m.content == "Hi! How can I help?" and m.model_extra["reasoning_content"] == "The user says hello."
    chunks = list(client.chat.completions.create(model="m", messages=USER, stream=True))
    reasoning = "".join(c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in chunks if c.choices)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert reasoning == "The user says hello." and content == "Hi! How can I help?"
    r2 = client.chat.completions.create(model="m", messages=USER, extra_body={"separate_reasoning": False})
    assert r2.choices[0].message.content.startswith("<think>")


def test_tool_calls(env, w, client):
    configure(w, mode="tool_call", tool_name="get_weather", tool_arguments={"city": "Paris"})
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Weather in Paris?"}],
                                       tools=TOOLS)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    call = c.message.tool_calls[0]
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather" and call.function.arguments == '{"city": "Paris"}'
    # streamed: one complete tool-call delta
    chunks = list(client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Weather?"}],
                                                 tools=TOOLS, stream=True))
    deltas = [d for ch in chunks if ch.choices for d in (ch.choices[0].delta.tool_calls or [])]
    assert len(deltas) == 1 and deltas[0].index == 0 and deltas[0].function.name == "get_weather"
    assert deltas[0].function.arguments == '{"city": "Paris"}' and deltas[0].id.startswith("call_")
    finish_reasons = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finish_reasons == ["tool_calls"]
    # tool_choice none: tools left out of the prompt, no parsing
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Weather?"}], tools=TOOLS,
                                       tool_choice="none")
    assert r.choices[0].message.tool_calls is None and "<tool_call>" in r.choices[0].message.content
    assert "# Tools" not in load_tokenizer(BUILTIN_CHECKPOINT).decode(records(w)[-1]["input_ids"])
    # without tools, nothing is parsed either
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Weather?"}])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.tool_calls is None


def test_async_client_stream_and_not(env, w):
    configure(w, mode="reply_text", reply_text="Async hello.")

    async def main() -> tuple[str, str]:
        c = AsyncOpenAI(base_url=env["router"] + "/v1", api_key="none", max_retries=0)
        r = await c.chat.completions.create(model="m", messages=USER)
        parts = []
        stream = await c.chat.completions.create(model="m", messages=USER, stream=True)
        async for ch in stream:
            if ch.choices and ch.choices[0].delta.content:
                parts.append(ch.choices[0].delta.content)
        many = await asyncio.gather(*(c.chat.completions.create(model="m", messages=USER) for _ in range(8)))
        assert all(m.choices[0].message.content == "Async hello." for m in many)
        await c.close()
        return r.choices[0].message.content, "".join(parts)

    a, b = asyncio.run(main())
    assert a == b == "Async hello."


def test_streaming_n_choices(env, w, client):
    configure(w, mode="random")
    chunks = list(client.chat.completions.create(model="m", messages=USER, n=2, stream=True, seed=5, max_tokens=15))
    texts = {0: "", 1: ""}
    for ch in chunks:
        for c in ch.choices:
            texts[c.index] += c.delta.content or ""
    full = client.chat.completions.create(model="m", messages=USER, n=2, seed=5, max_tokens=15)
    assert texts == {0: full.choices[0].message.content, 1: full.choices[1].message.content}
    assert texts[0] != texts[1]


def test_client_disconnect_aborts_worker_request(env, w):
    configure(w, mode="random", token_latency=0.02, stop_at_eos=0.0)
    svc = env["app"].router.registry.get("openai_compat")
    before = svc.stats()["client_disconnects"]
    with httpx.stream("POST", env["router"] + "/v1/chat/completions",
                      json={"model": "m", "messages": USER, "stream": True, "max_tokens": 400,
                            "extra": "ignored"}) as r:
        n = 0
        for ln in r.iter_lines():
            n += bool(ln)
            if n >= 4:
                break
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        recs = records(w)
        if recs and svc.stats()["client_disconnects"] > before:
            break
        time.sleep(0.02)
    assert recs[-1]["aborted"] is True and len(recs[-1]["output_ids"]) < 100, recs[-1]
    assert svc.stats()["client_disconnects"] == before + 1
    assert env["app"].router.pool.total_inflight() == 0


def test_completions_endpoint(env, w, client, tok):
    configure(w, mode="reply_text", reply_text="four")
    r = client.completions.create(model="m", prompt="2+2=", max_tokens=5, logprobs=2)
    assert r.object == "text_completion" and r.choices[0].text == "four" and r.id.startswith("cmpl-")
    rec = records(w)[-1]
    assert rec["input_ids"] == tok.encode("2+2=", add_special_tokens=False)
    assert r.choices[0].logprobs.token_logprobs == pytest.approx(rec["output_logprobs"])
    assert r.usage.prompt_tokens == len(rec["input_ids"])
    text = "".join(c.choices[0].text for c in client.completions.create(model="m", prompt="2+2=", stream=True)
                   if c.choices)
    assert text == "four"
    r = client.completions.create(model="m", prompt=[17, 10, 17, 28], max_tokens=5)
    assert records(w)[-1]["input_ids"] == [17, 10, 17, 28] and r.choices[0].text == "four"


def test_models_endpoint(env, client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["builtin:qwen3"]


def test_served_model_name_and_default_model(w, engine):
    from slime_router_core import Settings

    s = Settings(hf_checkpoint=BUILTIN_CHECKPOINT, worker_urls=[w], extra={"served_model_name": "qwen-rl"})
    router = start_router(settings=s, plugins=with_engine(engine, ["openai_compat"]))
    try:
        assert httpx.get(router.url + "/v1/models").json()["data"][0]["id"] == "qwen-rl"
        r = httpx.post(router.url + "/v1/chat/completions", json={"messages": USER}).json()
        assert r["model"] == "qwen-rl"
    finally:
        router.stop()


def test_upstream_errors_are_openai_errors(env, w, client):
    configure(w, fail_first_n=0)
    with pytest.raises(openai.BadRequestError) as e:  # an out-of-vocabulary id (refused before the worker sees it)
        client.completions.create(model="m", prompt=[10 ** 7], max_tokens=2)
    assert e.value.status_code == 400 and "vocabulary" in e.value.message


def test_langchain_chat_openai(env, w):
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI

    configure(w, mode="reply_text", reply_text="LangChain says hi.")
    llm = ChatOpenAI(base_url=env["router"] + "/v1", api_key="none", model="m", max_retries=0)
    out = llm.invoke([HumanMessage("Hello")])
    assert out.content == "LangChain says hi."
    assert "".join(ch.content for ch in llm.stream([HumanMessage("Hello")])) == "LangChain says hi."
    configure(w, mode="tool_call", tool_name="get_weather", tool_arguments={"city": "Oslo"})
    bound = llm.bind_tools(TOOLS)
    msg = bound.invoke([HumanMessage("Weather in Oslo?")])
    assert msg.tool_calls[0]["name"] == "get_weather" and msg.tool_calls[0]["args"] == {"city": "Oslo"}
    configure(w, mode="reply_text", reply_text="It is sunny in Oslo.")
    final = bound.invoke([HumanMessage("Weather in Oslo?"), msg,
                          ToolMessage("sunny", tool_call_id=msg.tool_calls[0]["id"])])
    assert isinstance(final, AIMessage) and final.content == "It is sunny in Oslo."
    assert "<tool_response>\nsunny\n</tool_response>" in load_tokenizer(BUILTIN_CHECKPOINT).decode(
        records(w)[-1]["input_ids"])


def test_history_transfer_round_trip_renders_the_next_turn_as_the_first_router(servers_to_stop):
    """openai_compat's component implements ``contracts.HistoryTransfer``: its listener hands over each history
    entry remembered, and another router that imports them renders the next turn of the chat exactly as the first
    (the text the model generated: replies that begin with whitespace, which the API's message does not keep)."""
    worker = ServerThread(create_mock_worker_app(MockWorkerConfig(
        hf_checkpoint=BUILTIN_CHECKPOINT, realistic=True, realistic_seed=3, leading_whitespace_rate=1.0,
        max_random_tokens=16))).start()
    servers_to_stop.append(worker)

    def router() -> Any:
        r = start_router(plugins=["openai_compat"], hf_checkpoint=BUILTIN_CHECKPOINT, worker_urls=[worker.url],
                         extra=[])
        servers_to_stop.append(r)
        return r

    a, b, c = router(), router(), router()
    svc_a, svc_b = (r.app.router.registry.get(OPENAI_COMPAT) for r in (a, b))
    assert isinstance(svc_a, HistoryTransfer) and isinstance(svc_b, HistoryTransfer)
    items: list[list[Any]] = []
    svc_a.add_history_listener(items.append)
    messages: list[dict] = [{"role": "user", "content": "Hi"}]
    for turn in range(3):
        r = httpx.post(a.url + "/v1/chat/completions", json={"model": "m", "messages": messages, "max_tokens": 16},
                       timeout=30).json()
        messages += [{"role": "assistant", "content": r["choices"][0]["message"]["content"]},
                     {"role": "user", "content": f"more, {turn}"}]
    assert len(items) == 3  # one per answer, in the stored form: JSON-able, digest in hex
    for ck, mk, raw, reasoning, prompt_len, digest, generated in items:
        assert isinstance(ck, str) and isinstance(mk, str) and isinstance(raw, str) and raw[:1].isspace()
        assert reasoning is None and prompt_len > 0 and bytes.fromhex(digest) and generated > 0
    assert orjson.loads(orjson.dumps(items)) == items

    def next_prompt(url: str) -> list[int]:
        httpx.post(url + "/v1/chat/completions", json={"model": "m", "messages": messages, "max_tokens": 4},
                   timeout=30).raise_for_status()
        return records(worker.url)[-1]["input_ids"]

    on_a = next_prompt(a.url)
    assert next_prompt(c.url) != on_a  # without the history: the API's messages render otherwise
    assert len(items) == 4
    assert svc_b.import_history(items[:3]) == 3
    assert next_prompt(b.url) == on_a  # imported: rendered as A rendered it
    # an import calls no listener, and keeps the history store's bound (least recently used out)
    seen: list[list[Any]] = []
    svc_b.add_history_listener(seen.append)
    svc_b.store.max_entries = 2
    assert svc_b.import_history([items[0], ["x", "y", " z", None, 1, "00", 1], ["bad"]]) == 2
    assert len(svc_b.store) == 2 and seen == []
