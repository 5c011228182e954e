"""Token exactness through the OpenAI API: multi-turn chats (tool calls, tool results, reasoning) made with the
real ``openai`` SDK through the router with the trajectory cache (radix_tree) in front of a mock worker;
``/retrieve_from_messages`` must give back exactly the worker-recorded ids, with mask 1 on generated tokens."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from openai import OpenAI

from conftest import mock_worker_app, with_engine
from slime_router_core import Settings
from slime_router_core.tokenizers import BUILTIN_CHECKPOINT, load_tokenizer
from slime_router_testing import ServerThread, start_router
from slime_router_testing.mock_worker import MockWorkerConfig

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
NL = 198  # "\n" after the final <|im_end|> of a rendered conversation
EOS = 151645


def _router(worker_url: str, own_process: bool = False, engine: str = "sglang") -> ServerThread:
    return start_router(plugins=with_engine(engine, ["radix_tree", "openai_compat"]), settings=Settings(
        hf_checkpoint=BUILTIN_CHECKPOINT, worker_urls=[worker_url], extra={"radix_tree_process": own_process}))


@pytest.fixture(scope="module", params=["sglang", "vllm"])
def engine(request) -> str:
    """Every test against an SGLang and a vLLM mock worker (same generation, same records of truth)."""
    return request.param


@pytest.fixture(scope="module")
def worker(engine) -> Iterator[str]:
    w = ServerThread(mock_worker_app(engine, MockWorkerConfig(hf_checkpoint=BUILTIN_CHECKPOINT))).start()
    yield w.url
    w.stop()


@pytest.fixture(params=["in_process", "own_process"])
def env(worker, engine, request, servers_to_stop) -> Iterator[dict[str, Any]]:
    """A fresh router (empty cache) per test, the cache in the router's process or in its own; the worker reset."""
    httpx.post(worker + "/mock/configure", json={"mode": "random", "reply_text": None, "think_text": None,
                                                 "stream_mode": "cumulative", "token_latency": 0.0,
                                                 "stop_at_eos": 1.0}).raise_for_status()
    httpx.delete(worker + "/mock/records")
    router = _router(worker, own_process=request.param == "own_process", engine=engine)
    yield {"worker": worker, "url": router.url, "router": router.app.router,
           "client": OpenAI(base_url=router.url + "/v1", api_key="none", max_retries=0)}
    servers_to_stop.append(router)


def configure(worker: str, **kw: Any) -> None:
    httpx.post(worker + "/mock/configure", json=kw).raise_for_status()


def records(worker: str) -> list[dict]:
    return httpx.get(worker + "/mock/records").json()


def as_history(message: Any, keep_reasoning: bool = False) -> dict:
    """An assistant message the way agent code sends it back (reasoning dropped, as most clients do)."""
    d = message.model_dump(exclude_none=True)
    d = {k: v for k, v in d.items() if k in ("role", "content", "tool_calls", "reasoning_content")}
    if not keep_reasoning:
        d.pop("reasoning_content", None)
    return d


def retrieve(url: str, messages: list, **kw: Any) -> dict:
    r = httpx.post(url + "/retrieve_from_messages", json={"messages": messages, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def assert_exact(res: dict, recs: list[dict]) -> None:
    """The retrieved sequence is the last record's prompt + output (+ the template's trailing newline), every
    record's output has mask 1 and its rollout logprobs, everything else mask 0."""
    last = recs[-1]
    seq = last["input_ids"] + last["output_ids"]
    assert res["tokens"][:len(seq)] == seq
    # what the template writes after the last turn: "\n" after the generated EOS (or "<|im_end|>\n" when the
    # generation stopped at the length limit), fresh, mask 0
    assert res["tokens"][len(seq):] == ([NL] if last["output_ids"][-1] == EOS else [EOS, NL])
    mask = [0] * len(res["tokens"])
    logp: dict[int, float] = {}
    for rec in recs:
        start = len(rec["input_ids"])
        assert seq[:start + len(rec["output_ids"])] == rec["input_ids"] + rec["output_ids"], \
            "a later turn's prompt does not continue an earlier turn's exact ids"
        for k, lp in enumerate(rec["output_logprobs"]):
            mask[start + k] = 1
            logp[start + k] = lp
    assert res["loss_mask"] == mask[:len(res["loss_mask"])]
    assert len(res["loss_mask"]) in (len(res["tokens"]), len(res["tokens"]) - 1)
    for pos, lp in logp.items():
        assert res["rollout_logp"][pos] == pytest.approx(lp, abs=1e-5)
    assert res["history_rewritten"] is False and res["mismatch"] is None and res["unverified_turns"] == []


def test_multi_turn_tools_exact(env):
    c, w = env["client"], env["worker"]
    msgs: list[dict] = [{"role": "system", "content": "You are helpful."},
                        {"role": "user", "content": "What's the weather in Paris?"}]
    configure(w, mode="tool_call", tool_name="get_weather", tool_arguments={"city": "Paris"})
    r1 = c.chat.completions.create(model="m", messages=msgs, tools=TOOLS)
    assert r1.choices[0].finish_reason == "tool_calls"
    call = r1.choices[0].message.tool_calls[0]
    msgs += [as_history(r1.choices[0].message),
             {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21, "sky": "clear"}'}]
    configure(w, mode="reply_text", reply_text="It is 21°C and clear in Paris.")
    r2 = c.chat.completions.create(model="m", messages=msgs, tools=TOOLS)
    msgs += [as_history(r2.choices[0].message), {"role": "user", "content": "Thanks! And tomorrow?"}]
    configure(w, mode="random")
    r3 = c.chat.completions.create(model="m", messages=msgs, tools=TOOLS, max_tokens=40)
    msgs.append(as_history(r3.choices[0].message))
    recs = records(w)
    assert len(recs) == 3
    # the trajectory cache fed each later turn the earlier turns' exact ids
    assert r2.model_extra["trajectory"]["cached_tokens"] == len(recs[0]["input_ids"]) + len(recs[0]["output_ids"])
    res = retrieve(env["url"], msgs, tools=TOOLS)
    assert_exact(res, recs)


def test_streamed_multi_turn_exact_and_parallel_tool_results(env):
    c, w = env["client"], env["worker"]
    msgs: list[dict] = [{"role": "user", "content": "Weather in Paris and Oslo?"}]
    configure(w, mode="tool_call", tool_name="get_weather", tool_arguments={"city": "Paris"})
    chunks = list(c.chat.completions.create(model="m", messages=msgs, tools=TOOLS, stream=True))
    deltas = [d for ch in chunks if ch.choices for d in (ch.choices[0].delta.tool_calls or [])]
    tool_calls = [{"id": d.id, "type": "function", "function": {"name": d.function.name,
                                                                 "arguments": d.function.arguments}} for d in deltas]
    msgs += [{"role": "assistant", "content": None, "tool_calls": tool_calls},
             {"role": "tool", "tool_call_id": tool_calls[0]["id"], "content": "sunny"},
             {"role": "tool", "tool_call_id": tool_calls[0]["id"], "content": "rainy"}]
    configure(w, mode="reply_text", reply_text="Paris is sunny; Oslo is rainy.", stream_mode="incremental")
    parts = [ch.choices[0].delta.content or "" for ch in
             c.chat.completions.create(model="m", messages=msgs, tools=TOOLS, stream=True) if ch.choices]
    msgs.append({"role": "assistant", "content": "".join(parts)})
    res = retrieve(env["url"], msgs, tools=TOOLS)
    assert_exact(res, records(w))


def test_reasoning_in_tool_loop_exact_in_template_mode(env):
    """Qwen3 keeps reasoning inside the current tool loop: the router restores reasoning_content the client
    dropped, so the next prompt continues the recorded trajectory exactly."""
    c, w = env["client"], env["worker"]
    msgs: list[dict] = [{"role": "user", "content": "Weather in Rome?"}]
    configure(w, mode="reply_text", reply_text='<think>\nI should call the weather tool.\n</think>\n\n<tool_call>\n'
                                               '{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>')
    r1 = c.chat.completions.create(model="m", messages=msgs, tools=TOOLS)
    assert r1.choices[0].message.model_extra["reasoning_content"] == "I should call the weather tool."
    assert r1.choices[0].message.tool_calls[0].function.arguments == '{"city": "Rome"}'
    msgs += [as_history(r1.choices[0].message), {"role": "tool", "content": "hot"}]
    configure(w, mode="think", think_text="The tool says hot.", reply_text="It is hot in Rome.")
    r2 = c.chat.completions.create(model="m", messages=msgs, tools=TOOLS)
    assert r2.choices[0].message.content == "It is hot in Rome."
    assert r2.choices[0].message.model_extra["reasoning_content"] == "The tool says hot."
    msgs.append(as_history(r2.choices[0].message))
    res = retrieve(env["url"], msgs, tools=TOOLS)
    assert_exact(res, records(w))


def test_template_rewriting_history_is_reported_and_raw_mode_keeps_tokens(env):
    c, w, url = env["client"], env["worker"], env["url"]
    configure(w, mode="think", think_text="Greeting detected.", reply_text="Hello!")
    msgs: list[dict] = [{"role": "user", "content": "Hi"}]
    r1 = c.chat.completions.create(model="m", messages=msgs)
    msgs += [as_history(r1.choices[0].message), {"role": "user", "content": "How are you?"}]
    configure(w, mode="think", think_text="Small talk.", reply_text="Fine, thanks.")
    r2 = c.chat.completions.create(model="m", messages=msgs)
    msgs.append(as_history(r2.choices[0].message))
    recs = records(w)
    res = retrieve(url, msgs)
    # Qwen3's template dropped turn 1's <think> block from turn 2's prompt: said, not hidden
    assert res["history_rewritten"] is True and res["mismatch"] == "template_rule"
    assert [t["message_index"] for t in res["rewritten_turns"]] == [1]
    assert "<think>" in res["rewritten_turns"][0]["generated"]
    # the final sequence is turn 2's exact trajectory; turn 1's own exact trajectory is a separate segment
    seq2 = recs[1]["input_ids"] + recs[1]["output_ids"]
    assert res["tokens"][:len(seq2)] == seq2
    seg = res["segments"][0]
    seq1 = recs[0]["input_ids"] + recs[0]["output_ids"]
    assert seg["tokens"][:len(seq1)] == seq1 and sum(seg["loss_mask"]) == len(recs[0]["output_ids"])
    stats = httpx.get(url + "/openai_compat/stats").json()
    assert stats["history_rewritten"] == 1 and stats["rewritten_turns"] == 1

    # raw mode: the same conversation keeps every generated token in one exact sequence
    httpx.delete(w + "/mock/records")
    configure(w, mode="think", think_text="Greeting detected.", reply_text="Hello!")
    msgs = [{"role": "user", "content": "Hi again"}]
    r1 = c.chat.completions.create(model="m", messages=msgs, extra_body={"history_mode": "raw"})
    msgs += [as_history(r1.choices[0].message), {"role": "user", "content": "How are you?"}]
    configure(w, mode="think", think_text="Small talk.", reply_text="Fine, thanks.")
    r2 = c.chat.completions.create(model="m", messages=msgs, extra_body={"history_mode": "raw"})
    msgs.append(as_history(r2.choices[0].message))
    res = retrieve(url, msgs, history_mode="raw")
    assert_exact(res, records(w))


def test_n_choices_each_recorded(env):
    c, w, url = env["client"], env["worker"], env["url"]
    msgs = [{"role": "user", "content": "Pick a word."}]
    r = c.chat.completions.create(model="m", messages=msgs, n=3, max_tokens=12, seed=1)
    recs = sorted(records(w), key=lambda x: x["index"])
    for choice, rec in zip(r.choices, recs):
        res = retrieve(url, msgs + [as_history(choice.message)])
        assert_exact(res, [rec])


def test_disconnect_records_nothing_and_cache_stays_consistent(env):
    c, w, url = env["client"], env["worker"], env["url"]
    configure(w, mode="random", token_latency=0.02, stop_at_eos=0.0)
    svc = env["router"].registry.get("openai_compat")
    before = svc.stats()["recorded"]
    msgs = [{"role": "user", "content": "Tell me a long story."}]
    with httpx.stream("POST", url + "/v1/chat/completions",
                      json={"model": "m", "messages": msgs, "stream": True, "max_tokens": 300}) as r:
        n = 0
        for ln in r.iter_lines():
            n += bool(ln)
            if n >= 3:
                break
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not (records(w) and svc.stats()["client_disconnects"]):
        time.sleep(0.02)
    rec = records(w)[-1]
    assert rec["aborted"] is True
    assert svc.stats()["recorded"] == before and svc.stats()["client_disconnects"] == 1
    # a complete answer afterwards is recorded and retrieved exactly
    configure(w, mode="reply_text", reply_text="Once upon a time.", token_latency=0.0)
    r = c.chat.completions.create(model="m", messages=msgs)
    res = retrieve(url, msgs + [as_history(r.choices[0].message)])
    assert_exact(res, [records(w)[-1]])


def test_completions_through_cache(env):
    c, w, url = env["client"], env["worker"], env["url"]
    configure(w, mode="reply_text", reply_text=" world.")
    c.completions.create(model="m", prompt="Hello", max_tokens=8)
    r = c.completions.create(model="m", prompt="Hello world.<|im_end|> Again", max_tokens=8)
    recs = records(w)
    assert recs[1]["input_ids"][:len(recs[0]["input_ids"]) + len(recs[0]["output_ids"])] == \
        recs[0]["input_ids"] + recs[0]["output_ids"]
    assert r.model_extra["trajectory"]["cached_tokens"] > 0
    # a prompt given as token ids is sent unchanged and recorded too
    ids = recs[1]["input_ids"] + recs[1]["output_ids"]
    c.completions.create(model="m", prompt=ids, max_tokens=8)
    assert records(w)[-1]["input_ids"] == ids
    res = httpx.post(url + "/retrieve_from_text", json={"text": "Hello world.<|im_end|> Again world."}).json()
    assert res["tokens"][:len(ids)] == ids


def test_strict_retrieval_of_unknown_conversation(env):
    r = httpx.post(env["url"] + "/retrieve_from_messages",
                   json={"messages": [{"role": "user", "content": "never seen"},
                                      {"role": "assistant", "content": "nope"}], "strict": True})
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    res = retrieve(env["url"], [{"role": "user", "content": "never seen"}, {"role": "assistant", "content": "nope"}])
    assert res["unverified_turns"] == [1] and sum(res["loss_mask"]) == 0
    tok = load_tokenizer(BUILTIN_CHECKPOINT)
    assert tok.decode(res["tokens"]).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nnope<|im_end|>\n")
