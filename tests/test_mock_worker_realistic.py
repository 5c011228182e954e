"""The mock worker's realistic mode: as unkind as real models, and still a faithful SGLang /generate.

Every reply is checked against the SGLang contract (text = decode of output_ids, logprob triples match the ids)
and against ``GET /mock/records``, the ground truth other tests compare the router with.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from itertools import combinations
from typing import Any

import httpx
import pytest
import typer
from typer.testing import CliRunner

from slime_router_core.tokenizers import BUILTIN_CHECKPOINT, load_tokenizer
from slime_router_testing.mock_worker import EOS_TOKEN_ID, MockWorkerConfig
from slime_router_testing.mock_worker import cli as mock_worker_cli

TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                        "unit": {"type": "string", "enum": ["c", "f"]}},
                       "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "search", "description": "Search the web",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}, "filters": {"type": "object"},
                                                        "limit": {"type": "integer"}}}}},
]
TOOL_NAMES = {t["function"]["name"] for t in TOOLS}
CALL = re.compile(r"<tool_call>\n(.*?)\n</tool_call>", re.DOTALL)


@pytest.fixture(scope="module")
def tok() -> Any:
    return load_tokenizer(BUILTIN_CHECKPOINT)


@pytest.fixture
def worker(mock_worker: Callable[..., Any]) -> Any:
    """Factory: a realistic mock worker (extra MockWorkerConfig fields as kwargs) → an httpx client on it."""
    clients: list[httpx.Client] = []

    def make(**config: Any) -> httpx.Client:
        config.setdefault("realistic", True)
        client = httpx.Client(base_url=mock_worker(**config).url, timeout=30)
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.close()


def gen(c: httpx.Client, **body: Any) -> Any:
    r = c.post("/generate", json={"return_logprob": True, **body})
    assert r.status_code == 200, r.text
    return r.json()


def chat_prompt(tok: Any, question: str, tools: list | None = None) -> str:
    return tok.apply_chat_template([{"role": "user", "content": question}], tools=tools, tokenize=False,
                                   add_generation_prompt=True)


def faithful(tok: Any, out: dict) -> list[int]:
    """Assert the SGLang contract for one reply; returns the ids the text decodes (EOS trimmed)."""
    ids, m = out["output_ids"], out["meta_info"]
    body = ids[:-1] if m["finish_reason"] == {"type": "stop", "matched": EOS_TOKEN_ID} else ids
    assert out["text"] == tok.decode(body, skip_special_tokens=True)
    assert [t[1] for t in m["output_token_logprobs"]] == ids and all(t[0] < 0 for t in m["output_token_logprobs"])
    assert m["completion_tokens"] == len(ids)
    return body


def matches_records(c: httpx.Client, outs: list[dict]) -> dict[str, dict]:
    """Every reply is recorded exactly as returned; returns the records by rid."""
    recs = {r["rid"]: r for r in c.get("/mock/records").json()}
    for out in outs:
        m, rec = out["meta_info"], recs[out["meta_info"]["id"]]
        assert rec["output_ids"] == out["output_ids"] and rec["text"] == out["text"]
        assert rec["output_logprobs"] == [t[0] for t in m["output_token_logprobs"]]
        assert rec["finish_reason"] == m["finish_reason"] and rec["weight_version"] == m["weight_version"]
        spans = rec["weight_versions"]
        assert m.get("weight_versions", spans[:1]) == spans  # the reply lists the spans when there are several
    return recs


def canonical(tok: Any, text: str, ids: list[int]) -> bool:
    return tok.encode(text, add_special_tokens=False) == ids


# ------------------------------------------------------------------ whitespace and token splits


def test_replies_start_and_end_with_whitespace_and_split_words(worker, tok):
    w = worker(realistic_seed=1)
    outs = [gen(w, text=chat_prompt(tok, f"Question number {i}?"), sampling_params={"max_new_tokens": 200})
            for i in range(60)]
    matches_records(w, outs)
    space = newline = trailing = split = plain = 0
    for out in outs:
        body, text = faithful(tok, out), out["text"]
        if text.startswith(" "):
            space += 1
            first = tok.decode(body[:1])
            assert len(first) > 1 and first[1:].isalpha()  # a ' The' word token, not a bare space
        newline += text.startswith("\n")
        trailing += text != text.rstrip()
        if text == text.strip():  # no whitespace variant: a non-canonical reply was split inside a word
            split += not canonical(tok, text, body)
            plain += canonical(tok, text, body)
    assert space and newline and trailing and split and plain, (space, newline, trailing, split, plain)


def test_think_and_reply_text_modes_vary_the_whitespace(worker, tok):
    w = worker(mode="think", realistic_seed=2)
    outs = [gen(w, text=chat_prompt(tok, f"Think about {i}"), sampling_params={"max_new_tokens": 300})
            for i in range(40)]
    texts = [o["text"] for o in outs]
    assert all(t.startswith("<think>\n") and "\n</think>\n\n" in t for t in texts)
    assert any("</think>\n\n " in t for t in texts) and any("</think>\n\n\n" in t for t in texts)
    assert any(re.search(r"</think>\n\n\w", t) for t in texts)
    w.post("/mock/configure", json={"mode": "reply_text", "reply_text": "Sure. The answer is 42.", "split_rate": 0.2})
    outs += [gen(w, text=f"q{i}") for i in range(40)]
    texts = [o["text"] for o in outs[40:]]
    assert {t.strip() for t in texts} == {"Sure. The answer is 42."}
    assert {t[0] for t in texts} == {" ", "\n", "S"}
    assert any(not canonical(tok, o["text"], faithful(tok, o)) and o["text"] == o["text"].strip()
               for o in outs[40:])
    for o in outs:
        faithful(tok, o)
    matches_records(w, outs)


# ------------------------------------------------------------------ tool calls


def test_tool_calls_follow_the_prompts_tools_with_irregular_json(worker, tok):
    w = worker(realistic_seed=3)
    outs = [gen(w, text=chat_prompt(tok, f"Help me with task {i}", TOOLS), sampling_params={"max_new_tokens": 400})
            for i in range(60)]
    matches_records(w, outs)
    with_calls = parallel = irregular = dumps_like = nested = content_first = empty_content = 0
    for out in outs:
        faithful(tok, out)
        text = out["text"]
        blocks = CALL.findall(text)
        assert len(blocks) == text.count("<tool_call>")  # every call is a complete block
        if not blocks:
            continue
        with_calls += 1
        parallel += len(blocks) > 1
        before = text[: text.index("<tool_call>")]
        empty_content += before == ""
        content_first += before.strip() != ""
        for body in blocks:
            call = json.loads(body)
            assert set(call) == {"name", "arguments"} and call["name"] in TOOL_NAMES
            assert isinstance(call["arguments"], dict)
            if call["name"] == "get_weather":
                assert "city" in call["arguments"] and call["arguments"].get("unit", "c") in ("c", "f")
            irregular += body != json.dumps(call, ensure_ascii=False)
            dumps_like += body == json.dumps(call, ensure_ascii=False)
            nested += isinstance(call["arguments"].get("filters"), dict)
    assert 0 < with_calls < len(outs)
    assert parallel and irregular and dumps_like and nested and content_first and empty_content, \
        (parallel, irregular, dumps_like, nested, content_first, empty_content)


def test_no_tool_call_without_tools_except_in_tool_call_mode(worker, tok):
    w = worker(realistic_seed=4, tool_call_rate=1.0)
    outs = [gen(w, text=chat_prompt(tok, f"Chat {i}"), sampling_params={"max_new_tokens": 200}) for i in range(30)]
    w.post("/mock/configure", json={"mode": "think"})
    outs += [gen(w, text=chat_prompt(tok, f"Chat {i}"), sampling_params={"max_new_tokens": 200}) for i in range(30)]
    assert not any("<tool_call>" in o["text"] for o in outs)
    w.post("/mock/configure", json={"mode": "tool_call", "tool_name": "lookup", "tool_arguments": {"id": 7, "x": "y"}})
    calls = [gen(w, text=f"call {i}") for i in range(30)]
    for out in calls + outs:
        faithful(tok, out)
    bodies = [b for o in calls for b in CALL.findall(o["text"])]
    assert len(bodies) >= 30 and all(json.loads(b) == {"name": "lookup", "arguments": {"id": 7, "x": "y"}}
                                     for b in bodies)
    assert any(b != json.dumps(json.loads(b)) for b in bodies)
    matches_records(w, outs + calls)


# ------------------------------------------------------------------ logprobs and branch families


def test_identical_requests_get_different_logprobs(worker, tok):
    w = worker(shared_prefix_min=10_000, shared_prefix_max=10_000)  # every token from the prompt's source
    body = {"text": chat_prompt(tok, "Same question"), "sampling_params": {"max_new_tokens": 64}}
    a, b = gen(w, **body), gen(w, **body)
    assert a["output_ids"] == b["output_ids"]
    assert a["meta_info"]["output_token_logprobs"] != b["meta_info"]["output_token_logprobs"]
    samples = gen(w, **{**body, "sampling_params": {"max_new_tokens": 64, "n": 4}})
    assert len({tuple(s["output_ids"]) for s in samples}) == 1
    lps = [tuple(t[0] for t in s["meta_info"]["output_token_logprobs"]) for s in samples]
    assert len(set(lps)) == 4
    matches_records(w, [a, b, *samples])


def test_siblings_share_a_prefix_then_diverge(worker, tok):
    w = worker(realistic_seed=5, shared_prefix_min=4, shared_prefix_max=8)
    body = {"text": chat_prompt(tok, "Branch me"), "sampling_params": {"max_new_tokens": 64, "n": 8}}
    outs = gen(w, **body) + [gen(w, **{**body, "sampling_params": {"max_new_tokens": 64}}) for _ in range(2)]
    recs = matches_records(w, outs)
    pairs = list(combinations(outs, 2))
    diverged = 0
    for a, b in pairs:
        ka, kb = (recs[o["meta_info"]["id"]]["shared_prefix_tokens"] for o in (a, b))
        assert 4 <= min(ka, kb) <= 8
        shared = next((i for i, (x, y) in enumerate(zip(a["output_ids"], b["output_ids"])) if x != y),
                      min(len(a["output_ids"]), len(b["output_ids"])))
        assert shared >= min(ka, kb)
        diverged += a["output_ids"] != b["output_ids"]
        k = min(ka, kb)  # same tokens there, but each sibling has its own logprobs
        assert a["meta_info"]["output_token_logprobs"][:k] != b["meta_info"]["output_token_logprobs"][:k]
    assert diverged > len(pairs) // 2  # most pairs go their own way after the shared prefix
    for out in outs:
        faithful(tok, out)


# ------------------------------------------------------------------ weight versions


def test_version_every_changes_versions_between_branches(worker, tok):
    w = worker(version_every=1)
    body = {"text": chat_prompt(tok, "Versioned"), "sampling_params": {"max_new_tokens": 16}}
    outs = [gen(w, **body) for _ in range(3)]
    assert [o["meta_info"]["weight_version"] for o in outs] == ["default", "v1", "v2"]
    samples = gen(w, **{**body, "sampling_params": {"max_new_tokens": 16, "n": 3}})
    assert [o["meta_info"]["weight_version"] for o in samples] == ["v3", "v4", "v5"]
    assert w.get("/get_model_info").json()["weight_version"] == "v5"
    w.post("/mock/configure", json={"version_every": 2, "weight_version": "ckpt-9"})
    more = [gen(w, **body)["meta_info"]["weight_version"] for _ in range(4)]
    assert more == ["ckpt-9", "ckpt-9", "ckpt-10", "ckpt-10"]
    matches_records(w, outs + samples)


def test_version_change_mid_sequence_is_reported_in_spans(worker, tok):
    # concurrent samples: each one that starts bumps the version while the earlier ones are still generating
    w = worker(version_every=1, token_latency=0.001)
    outs = gen(w, text="hi", sampling_params={"max_new_tokens": 12, "ignore_eos": True, "n": 3})
    matches_records(w, outs)
    mixed = [o for o in outs if "weight_versions" in o["meta_info"]]
    assert mixed
    for o in outs:
        faithful(tok, o)
        spans = o["meta_info"].get("weight_versions") or [{"version": o["meta_info"]["weight_version"], "start": 0,
                                                          "end": 12}]
        assert spans[0]["start"] == 0 and spans[-1]["end"] == 12
        assert all(a["end"] == b["start"] and a["version"] != b["version"] for a, b in zip(spans, spans[1:]))
        assert spans[-1]["version"] == o["meta_info"]["weight_version"]


# ------------------------------------------------------------------ streaming, batches, configuration


def sse(c: httpx.Client, body: dict) -> list[dict]:
    with c.stream("POST", "/generate", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        raw = r.read().decode()
    assert raw.endswith("data: [DONE]\n\n")
    return [json.loads(b[6:]) for b in raw.split("\n\n") if b and b != "data: [DONE]"]


@pytest.mark.parametrize("stream_mode", ["cumulative", "incremental", "legacy"])
def test_streams_and_batches_match_the_records(worker, tok, stream_mode):
    w = worker(stream_mode=stream_mode, tool_call_rate=1.0, mode="think")
    prompt = chat_prompt(tok, "Stream it", TOOLS)
    chunks = sse(w, {"text": prompt, "rid": "s", "return_logprob": True,
                     "sampling_params": {"max_new_tokens": 300, "n": 2}})
    recs = {r["rid"]: r for r in w.get("/mock/records").json()}
    for i in (0, 1):
        mine = [c for c in chunks if c["index"] == i]
        rec = recs[f"s_{i}"]
        if stream_mode == "incremental":
            text = "".join(c["text"] for c in mine)
            lps = [t for c in mine for t in c["meta_info"]["output_token_logprobs"]]
        else:
            text, lps = mine[-1]["text"], mine[-1]["meta_info"]["output_token_logprobs"]
        ids = mine[-1]["output_ids"] if stream_mode == "cumulative" else [t for c in mine for t in c["output_ids"]]
        final = {"text": text, "output_ids": ids, "meta_info": {**mine[-1]["meta_info"], "output_token_logprobs": lps,
                                                                "completion_tokens": len(ids)}}
        faithful(tok, final)
        assert "<tool_call>" in text and ids == rec["output_ids"] and text == rec["text"]
        assert [t[0] for t in lps] == rec["output_logprobs"]
        assert mine[-1]["meta_info"]["finish_reason"] == rec["finish_reason"]
    batch = gen(w, text=[prompt, chat_prompt(tok, "Another")], sampling_params={"max_new_tokens": 300})
    for out in batch:
        faithful(tok, out)
    matches_records(w, batch)


def test_configure_validates_and_cli_flags_enable_realistic(mock_worker, monkeypatch):
    c = httpx.Client(base_url=mock_worker().url, timeout=30)
    assert gen(c, text="x")["text"] == gen(c, text="x")["text"]  # the default worker is deterministic
    assert "shared_prefix_tokens" not in c.get("/mock/records").json()[0]
    assert c.post("/mock/configure", json={"realistic": True, "split_rate": 0.5}).json()["realistic"] is True
    gen(c, text="x")
    assert "shared_prefix_tokens" in c.get("/mock/records").json()[-1]
    assert c.post("/mock/configure", json={"split_rate": 2}).status_code == 400
    assert c.post("/mock/configure", json={"shared_prefix_min": 5, "shared_prefix_max": 2}).status_code == 400
    assert c.post("/mock/configure", json={"version_every": -1}).status_code == 400
    c.close()

    # slime-router mock-worker (typer): the flags reach the config it serves
    served: list[MockWorkerConfig] = []
    monkeypatch.setattr(mock_worker_cli, "serve_mock_worker", lambda host, port, cfg: served.append(cfg))
    app = typer.Typer()
    app.command()(mock_worker_cli.mock_worker_command)
    res = CliRunner().invoke(app, ["--port", "1", "--realistic", "--version-every", "3", "--split-rate", "0.25",
                                   "--shared-prefix-max", "2", "--realistic-seed", "11"])
    assert res.exit_code == 0, res.output
    cfg = served[0]
    assert cfg.realistic and cfg.version_every == 3 and cfg.split_rate == 0.25 and cfg.shared_prefix_max == 2
    assert cfg.realistic_seed == 11 and cfg.tool_call_rate == MockWorkerConfig().tool_call_rate


def test_cli_flags_enable_realistic_in_a_worker_process(mock_worker_process, tok):
    # python -m slime_router_testing.mock_worker (argparse)
    proc = mock_worker_process(realistic=True, version_every=1, realistic_seed=7, tool_call_rate=1.0)
    shown = httpx.get(proc.url + "/get_server_info").json()["mock_config"]
    assert shown["realistic"] is True and shown["version_every"] == 1 and shown["realistic_seed"] == 7
    assert shown["tool_call_rate"] == 1.0
    outs = [httpx.post(proc.url + "/generate", json={"text": chat_prompt(tok, "w", TOOLS)}, timeout=30).json()
            for _ in range(2)]
    assert [o["meta_info"]["weight_version"] for o in outs] == ["default", "v1"]
    assert all("<tool_call>" in o["text"] for o in outs)
