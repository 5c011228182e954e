"""Unit tests of the openai_compat plugin's pieces: parsing, rendering, stream merging, decoding."""

from __future__ import annotations

import json

import pytest

from slime_router_core.tokenizers import BUILTIN_CHECKPOINT, load_tokenizer
from slime_router_plugins.openai_compat.parse import (
    OutputParser,
    ParsedOutput,
    collect,
    parse_output,
    parse_tool_call_body,
)
from slime_router_plugins.openai_compat.render import HistoryEntry, HistoryStore, Renderer, history_key
from slime_router_plugins.openai_compat.stream import ChoiceAccumulator, IncrementalDecoder


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(BUILTIN_CHECKPOINT)


def _stream_parse(text: str, step: int, **kw) -> ParsedOutput:
    p = OutputParser(**kw)
    out = ParsedOutput()
    for i in range(0, len(text), step):
        collect(p.feed(text[i:i + step]), out)
    collect(p.finish(), out)
    return out


def _same(a: ParsedOutput, b: ParsedOutput) -> bool:
    return (a.content, a.reasoning, [(c.name, c.arguments) for c in a.tool_calls]) == \
        (b.content, b.reasoning, [(c.name, c.arguments) for c in b.tool_calls])


CASES = [
    ("<think>\nLet me think.\n</think>\n\nHello world", "Hello world", "Let me think.", []),
    ("no tags at all", "no tags at all", None, []),
    ("<think>\n\n</think>\n\nAnswer", "Answer", "", []),
    ("Sure.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\":  \"Paris\"}}\n</tool_call>",
     "Sure.", None, [("get_weather", '{"city":  "Paris"}')]),
    ("<tool_call>\n{\"name\": \"a\", \"arguments\": {}}\n</tool_call>\n<tool_call>\n{\"name\": \"b\", "
     "\"arguments\": \"{\\\"x\\\": 1}\"}\n</tool_call>", "", None, [("a", "{}"), ("b", '{"x": 1}')]),
    ("<think>\nplan\n</think>\n\n<tool_call>\n{\"name\": \"f\", \"arguments\": {\"q\": [1, 2]}}\n</tool_call>",
     "", "plan", [("f", '{"q": [1, 2]}')]),
    ("<tool_call>\n{not json}\n</tool_call> tail", "<tool_call>\n{not json}\n</tool_call> tail", None, []),
    ("cut <tool_call>\n{\"name\": \"f\", \"argu", "cut <tool_call>\n{\"name\": \"f\", \"argu", None, []),
    ("a < b and <thin", "a < b and <thin", None, []),
    ("<think>\nunfinished reasoning", "", "unfinished reasoning", []),
    ("trailing spaces   ", "trailing spaces   ", None, []),
]


@pytest.mark.parametrize("text,content,reasoning,calls", CASES)
def test_parse_output_and_streaming_equivalence(text, content, reasoning, calls):
    whole = parse_output(text, reasoning=True, tools=True)
    assert whole.content == content
    assert whole.reasoning == reasoning
    assert [(c.name, c.arguments) for c in whole.tool_calls] == calls
    for c in whole.tool_calls:
        assert c.id.startswith("call_") and len(c.id) > 10
        json.loads(c.arguments)
    for step in (1, 2, 3, 7):
        assert _same(_stream_parse(text, step, reasoning=True, tools=True), whole), step


def test_parse_without_tools_or_reasoning_keeps_text():
    text = "<think>\nx\n</think>\n\n<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>"
    out = parse_output(text, reasoning=False, tools=False)
    assert out.content == text and out.reasoning is None and not out.tool_calls
    out = parse_output(text, reasoning=True, tools=False)
    assert out.reasoning == "x" and out.content.startswith("<tool_call>")


def test_parse_prompt_opened_think():
    out = parse_output("step one\n</think>\n\nDone.", in_reasoning=True)
    assert out.reasoning == "step one" and out.content == "Done."


def test_tool_call_body_variants():
    assert parse_tool_call_body('{"name": "f", "parameters": {"a":1}}').arguments == '{"a":1}'
    assert parse_tool_call_body('{"name": "f"}').arguments == "{}"
    assert parse_tool_call_body('["f"]') is None
    assert parse_tool_call_body('{"arguments": {}}') is None


MESSAGES = [
    {"role": "developer", "content": "Be brief."},
    {"role": "user", "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Paris?"}]},
]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def test_render_matches_apply_chat_template(tok):
    r = Renderer(tok, HistoryStore())
    text = r.render(MESSAGES, TOOLS, None)
    expected = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "Weather in Paris?"}],
                                       tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert text == expected
    assert text.endswith("<|im_start|>assistant\n")
    no_think = r.render(MESSAGES, None, {"enable_thinking": False})
    assert no_think.endswith("<think>\n\n</think>\n\n")


def test_raw_history_splice_reproduces_recorded_trajectories(tok):
    """Raw mode: turn k's prompt = turn k-1's prompt + its exact output + the template's bridge."""
    store = HistoryStore()
    r = Renderer(tok, store, mode="raw")
    msgs = [{"role": "user", "content": "hi"}]
    p1 = r.render(msgs, None, None)
    raw1 = "<think>\nThe user greets.\n</think>\n\nHello!"
    a1 = {"role": "assistant", "content": "Hello!", "reasoning_content": "The user greets."}
    store.put(msgs, a1, HistoryEntry(raw=raw1, reasoning="The user greets."))
    msgs2 = msgs + [{"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "bye"}]
    p2 = r.render(msgs2, None, None)
    assert p2.startswith(p1 + raw1 + "<|im_end|>\n<|im_start|>user\nbye")
    # template mode drops the earlier reasoning (Qwen3): the recorded trajectory is not a prefix
    t2 = r.render(msgs2, None, None, mode="template")
    assert not t2.startswith(p1 + raw1)
    # the final assistant turn of a finished conversation: exact text + end of turn
    full = r.render(msgs[:1] + [{"role": "assistant", "content": "Hello!"}], None, None,
                    add_generation_prompt=False, mode="template", splice_last=True)
    assert full == p1 + raw1 + "<|im_end|>\n"


def test_template_mode_restores_reasoning_in_tool_loop(tok):
    store = HistoryStore()
    r = Renderer(tok, store)
    msgs = [{"role": "user", "content": "weather?"}]
    p1 = r.render(msgs, TOOLS, None)
    raw = ('<think>\nCall the tool.\n</think>\n\n'
           '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')
    a1 = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}
    store.put(msgs, a1, HistoryEntry(raw=raw, reasoning="Call the tool."))
    msgs2 = msgs + [a1, {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    p2 = r.render(msgs2, TOOLS, None)
    assert p2.startswith(p1 + raw + "<|im_end|>\n<|im_start|>user\n<tool_response>\nsunny")


def test_history_key_ignores_ids_reasoning_and_argument_spacing():
    ctx = [{"role": "user", "content": "x"}]
    a = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "function": {"name": "f", "arguments": '{"a": 1, "b": 2}'}}]}
    b = {"role": "assistant", "content": "", "reasoning_content": "r", "tool_calls": [
        {"id": "call_2", "type": "function", "function": {"name": "f", "arguments": {"b": 2, "a": 1}}}]}
    assert history_key(ctx, a) == history_key(ctx, b)
    assert history_key(ctx, a) != history_key([{"role": "user", "content": "y"}], a)
    store = HistoryStore(max_entries=2)
    for i in range(3):
        store.put([{"role": "user", "content": str(i)}], a, HistoryEntry(raw=str(i), reasoning=None))
    assert len(store) == 2 and store.get([{"role": "user", "content": "0"}], a) is None


def _chunks(mode: str, ids: list[int], texts: list[str], step: int) -> list[dict]:
    out, sent = [], 0
    for end in range(step, len(ids) + step, step):
        end = min(end, len(ids))
        lps = [[-0.1 * k, t, None] for k, t in enumerate(ids)]
        meta = {"completion_tokens": end, "finish_reason": {"type": "stop"} if end == len(ids) else None}
        if mode == "cumulative":
            out.append({"text": texts[end - 1], "output_ids": ids[:end],
                        "meta_info": {**meta, "output_token_logprobs": lps[:end]}})
        elif mode == "incremental":
            out.append({"text": texts[end - 1][len(texts[sent - 1]) if sent else 0:], "output_ids": ids[sent:end],
                        "meta_info": {**meta, "output_token_logprobs": lps[sent:end]}})
        else:  # legacy: cumulative text and logprobs, delta ids
            out.append({"text": texts[end - 1], "output_ids": ids[sent:end],
                        "meta_info": {**meta, "output_token_logprobs": lps[:end]}})
        sent = end
        if end == len(ids):
            break
    return out


@pytest.mark.parametrize("mode", ["cumulative", "incremental", "legacy"])
@pytest.mark.parametrize("step", [1, 3])
def test_accumulator_and_decoder_all_stream_variants(tok, mode, step):
    text = "Hé 你好 🎉 done"
    ids = tok.encode(text, add_special_tokens=False) + [151645]
    texts = [tok.decode(ids[:k + 1], skip_special_tokens=True) for k in range(len(ids))]
    acc, dec = ChoiceAccumulator(), IncrementalDecoder(tok)
    pieces = []
    for c in _chunks(mode, ids, texts, step):
        acc.update(c)
        d = dec.feed(acc.ids)
        assert "\ufffd" not in d
        pieces.append(d)
    pieces.append(dec.finish(None, acc.ids))
    assert acc.ids == ids
    assert acc.lps == [pytest.approx(-0.1 * k) for k in range(len(ids))]
    assert "".join(pieces) == text
    assert acc.finish_reason == {"type": "stop"}


def test_decoder_holdback_and_final_text(tok):
    """With stop strings the tail is held back; the worker's stop-trimmed final text decides the rest."""
    ids = tok.encode("Hello world STOP", add_special_tokens=False)
    dec = IncrementalDecoder(tok, holdback=len("STOP") - 1)
    out = ""
    for k in range(1, len(ids)):  # every chunk but the final one (the stop string is not complete yet)
        out += dec.feed(ids[:k])
        assert "STOP" not in out
    assert "Hello world STOP".startswith(out) and len(out) <= len("Hello world STOP") - 3
    out += dec.finish("Hello world ", ids)
    assert out == "Hello world "
