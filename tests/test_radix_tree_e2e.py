"""radix_tree end to end: router + mock SGLang workers on real sockets, the real Qwen3 tokenizer.

Every claim is checked against the mock worker's own record (GET /mock/records) of the exact ids it
received and produced.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import httpx
import orjson
import pytest

from slime_router_core import Settings
from slime_router_core.sglang import merge_stream
from slime_router_core.tokenizers import BUILTIN_CHECKPOINT, load_tokenizer

EOS = 151645
ENGINES = ("sglang", "vllm")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(BUILTIN_CHECKPOINT)


_CACHE_MODE = {"own_process": False}


@pytest.fixture(params=["in_process", "own_process"], autouse=True)
def cache_mode(request):
    """Every test here runs with the cache in the router's process and in its own (--radix-tree-process)."""
    _CACHE_MODE["own_process"] = request.param == "own_process"
    yield request.param
    _CACHE_MODE["own_process"] = False


def check_tree(r) -> None:
    """The trie's structural self-check, wherever the cache lives."""
    cache = r.app.router.registry.get("radix_tree")
    if _CACHE_MODE["own_process"]:
        asyncio.run_coroutine_threadsafe(cache.check_tree(), cache.loop).result(30)
    else:
        cache.tree.check()


def start(router, mock_worker, n_workers: int = 1, extra: dict | None = None, **worker_cfg: Any):
    workers = [mock_worker(seed=i, **worker_cfg) for i in range(n_workers)]
    extra = {**(extra or {}), "radix_tree_process": _CACHE_MODE["own_process"]}
    settings = Settings(hf_checkpoint=BUILTIN_CHECKPOINT, worker_urls=[w.url for w in workers], extra=extra)
    r = router(plugins=["radix_tree"], settings=settings)
    return r, workers


def generate(client: httpx.Client, url: str, body: dict) -> dict:
    if not body.get("stream"):
        r = client.post(url + "/generate", json=body)
        assert r.status_code == 200, r.text
        return r.json()
    chunks = []
    with client.stream("POST", url + "/generate", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data:"):
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                chunks.append(orjson.loads(payload))
    assert chunks and all("error" not in c for c in chunks), chunks
    reply = merge_stream(chunks)
    reply["_chunks"] = chunks
    return reply


def records(client: httpx.Client, worker_url: str) -> list[dict]:
    return client.get(worker_url + "/mock/records").json()


def retrieve(client: httpx.Client, url: str, text: Any, strict: bool | None = None) -> httpx.Response:
    body: dict = {"text": text}
    if strict is not None:
        body["strict"] = strict
    return client.post(url + "/retrieve_from_text", json=body)


def check_conversation(recs: list[dict], final: dict, eos_turns: int | None = None) -> None:
    """Continuity across turns + exact retrieval of the whole trajectory."""
    for prev, cur in zip(recs, recs[1:]):
        head = prev["input_ids"] + prev["output_ids"]
        assert cur["input_ids"][:len(head)] == head, "a later turn did not start with the previous exact ids"
    last = recs[-1]
    truth = last["input_ids"] + last["output_ids"]
    assert final["tokens"] == truth
    assert final["exact_tokens"] == len(truth) and final["fresh_tokens"] == 0
    mask = [0] * len(truth)
    lps = [0.0] * len(truth)
    vers: list[Any] = [None] * len(truth)
    for rec in recs:
        a = len(rec["input_ids"])
        for i, (lp) in enumerate(rec["output_logprobs"]):
            mask[a + i] = 1
            lps[a + i] = lp
        for span in rec["weight_versions"]:
            for i in range(span["start"], span["end"]):
                vers[a + i] = span["version"]
    assert final["loss_mask"] == mask
    assert final["token_length"] == final["loss_mask_length"] == len(truth)
    for got, want, m in zip(final["rollout_logp"], lps, mask):
        if m:
            assert math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-6)
    for got, want, m in zip(final["weight_versions"], vers, mask):
        if m:
            assert got == want
    if eos_turns is not None:
        assert final["tokens"].count(EOS) == truth.count(EOS)
        assert sum(rec["output_ids"].count(EOS) for rec in recs) == eos_turns
        # exactly one EOS between turns: none re-tokenized from a written-out "<|im_end|>"
        assert truth.count(EOS) == eos_turns + sum(
            rec["input_ids"].count(EOS) for rec in recs[:1]) + sum(
            tail.count(EOS) for tail in _new_prompt_parts(recs))


def _new_prompt_parts(recs: list[dict]) -> list[list[int]]:
    """The ids each later turn added after the previous turn's prompt + output (template text, user text)."""
    out = []
    for prev, cur in zip(recs, recs[1:]):
        out.append(cur["input_ids"][len(prev["input_ids"]) + len(prev["output_ids"]):])
    return out


# --- multi-turn conversations --------------------------------------------------------------------


@pytest.mark.parametrize("stream_mode", [None, "cumulative", "incremental", "legacy"])
def test_plain_text_turns_eos_stops(router, mock_worker, stream_mode):
    r, (w,) = start(router, mock_worker, stream_mode=stream_mode or "cumulative", max_random_tokens=10)
    with httpx.Client(timeout=30) as c:
        prompt = "User: Tell me something.\nAssistant:"
        turns = 6
        for k in range(turns):
            reply = generate(c, r.url, {"text": prompt, "sampling_params": {"max_new_tokens": 64},
                                        "stream": stream_mode is not None})
            assert reply["meta_info"]["finish_reason"]["matched"] == EOS
            assert "output_token_logprobs" not in reply["meta_info"]  # the client did not ask
            for ch in reply.get("_chunks", []):
                assert "output_token_logprobs" not in ch["meta_info"]
            full = prompt + reply["text"]
            if k < turns - 1:  # plain text: the client never writes the EOS
                prompt = full + f"\nUser: And number {k}?\nAssistant:"
        recs = records(c, w.url)
        assert len(recs) == turns and all(not rec["aborted"] for rec in recs)
        final = retrieve(c, r.url, full).json()
        check_conversation(recs, final, eos_turns=turns)
        # the same text with the EOS written out: the same ids, one EOS
        again = retrieve(c, r.url, full + "<|im_end|>").json()
        assert again["tokens"] == final["tokens"] and again["fresh_tokens"] == 0
        stats = c.get(r.url + "/radix_tree/stats").json()
        assert stats["cache_hits"] == turns - 1 and stats["cache_misses"] == 1


@pytest.mark.parametrize("stream_mode", [None, "incremental"])
def test_chat_template_turns(router, mock_worker, tok, stream_mode):
    r, (w,) = start(router, mock_worker, stream_mode=stream_mode or "cumulative", max_random_tokens=12)
    with httpx.Client(timeout=30) as c:
        messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"}]
        turns = 5
        for k in range(turns):
            prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            reply = generate(c, r.url, {"text": prompt, "sampling_params": {"max_new_tokens": 64},
                                        "return_logprob": True, "stream": stream_mode is not None})
            assert "output_token_logprobs" in reply["meta_info"]  # asked for: kept
            messages += [{"role": "assistant", "content": reply["text"]}, {"role": "user", "content": f"more {k}"}]
        recs = records(c, w.url)
        full = prompt + reply["text"]
        check_conversation(recs, retrieve(c, r.url, full).json(), eos_turns=turns)
        # the rendered conversation (EOS written out by the template) maps to the same ids
        rendered = tok.apply_chat_template(messages, tokenize=False)  # ends with the new user message
        got = retrieve(c, r.url, rendered).json()
        truth = recs[-1]["input_ids"] + recs[-1]["output_ids"]
        assert got["tokens"][:len(truth)] == truth
        assert got["tokens"].count(EOS) == truth.count(EOS) + 1  # + the new user message's own
        assert got["exact_tokens"] == len(truth) and got["fresh_tokens"] == len(got["tokens"]) - len(truth)
        assert retrieve(c, r.url, rendered, strict=True).status_code == 404


def test_stop_strings_written_or_not(router, mock_worker):
    r, (w,) = start(router, mock_worker, max_random_tokens=40, stop_at_eos=0.0)
    with httpx.Client(timeout=30) as c:
        prompt = "Q: say words\nA:"
        turns = 6
        matched_stops = 0
        for k in range(turns):
            reply = generate(c, r.url, {"text": prompt, "sampling_params": {"max_new_tokens": 48,
                                                                              "stop": [" the", " and", ","]}})
            fr = reply["meta_info"]["finish_reason"]
            full = prompt + reply["text"]
            if fr["type"] == "stop":
                matched_stops += 1
                assert isinstance(fr["matched"], str) and not reply["text"].endswith(fr["matched"])
                # with the stop string written out, the ids are the same
                a = retrieve(c, r.url, full).json()
                b = retrieve(c, r.url, full + fr["matched"]).json()
                assert a["tokens"] == b["tokens"] and a["fresh_tokens"] == b["fresh_tokens"] == 0
                if k % 2 == 0:
                    full += fr["matched"]
            prompt = full + f"\nQ: again {k}\nA:"
        assert matched_stops >= 3
        recs = records(c, w.url)
        check_conversation(recs, retrieve(c, r.url, full).json(), eos_turns=0)


def test_length_cutoffs(router, mock_worker):
    r, (w,) = start(router, mock_worker, stop_at_eos=0.0)
    with httpx.Client(timeout=30) as c:
        prompt = "Continue:"
        for k in range(4):
            reply = generate(c, r.url, {"text": prompt, "sampling_params": {"max_new_tokens": 7},
                                        "stream": k % 2 == 1})
            assert reply["meta_info"]["finish_reason"]["type"] == "length"
            full = prompt + reply["text"]
            prompt = full + (" ok." if k % 2 else "")
        recs = records(c, w.url)
        check_conversation(recs, retrieve(c, r.url, full).json(), eos_turns=0)


@pytest.mark.parametrize("stream_mode", [None, "legacy"])
def test_think_blocks_chat_by_concatenation(router, mock_worker, tok, stream_mode):
    r, (w,) = start(router, mock_worker, mode="think", stream_mode=stream_mode or "cumulative")
    with httpx.Client(timeout=30) as c:
        prompt = tok.apply_chat_template([{"role": "user", "content": "Think, then answer."}], tokenize=False,
                                         add_generation_prompt=True)
        turns = 4
        for k in range(turns):
            reply = generate(c, r.url, {"text": prompt, "stream": stream_mode is not None})
            assert reply["text"].startswith("<think>")
            full = prompt + reply["text"]
            prompt = full + f"<|im_end|>\n<|im_start|>user\nwhy {k}?<|im_end|>\n<|im_start|>assistant\n"
        recs = records(c, w.url)
        check_conversation(recs, retrieve(c, r.url, full).json(), eos_turns=turns)


def test_think_history_rewritten_by_template_is_honest(router, mock_worker, tok):
    """Qwen3's template drops earlier <think> blocks (table row 5): reuse stops there, the rest is fresh."""
    r, (w,) = start(router, mock_worker, mode="think")
    with httpx.Client(timeout=30) as c:
        messages = [{"role": "user", "content": "Think first."}]
        p1 = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        r1 = generate(c, r.url, {"text": p1})
        messages += [{"role": "assistant", "content": r1["text"]}, {"role": "user", "content": "Again."}]
        p2 = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert not p2.startswith(p1 + r1["text"])
        generate(c, r.url, {"text": p2})
        rec1, rec2 = records(c, w.url)
        got = retrieve(c, r.url, p2).json()
        assert got["tokens"] == rec2["input_ids"]
        assert 0 < got["exact_tokens"] == len(got["tokens"]) and got["fresh_tokens"] == 0
        # what turn 2 reused from turn 1 is a true prefix of turn 1's ids, and mask 1 only where generated
        head = rec1["input_ids"] + rec1["output_ids"]
        common = 0
        while common < min(len(head), len(rec2["input_ids"])) and head[common] == rec2["input_ids"][common]:
            common += 1
        assert common >= len(rec1["input_ids"])  # at least the whole first prompt
        assert sum(got["loss_mask"]) == sum(1 for i in range(len(rec1["input_ids"]), common))


def test_tool_call_turns(router, mock_worker, tok):
    r, (w,) = start(router, mock_worker, mode="tool_call", stream_mode="incremental")
    with httpx.Client(timeout=30) as c:
        messages = [{"role": "user", "content": "Weather in Paris?"}]
        for k in range(3):
            prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            reply = generate(c, r.url, {"text": prompt, "stream": k != 1})
            assert reply["text"].startswith("<tool_call>")
            messages += [{"role": "assistant", "content": reply["text"]},
                         {"role": "tool", "content": '{"temp": ' + str(20 + k) + "}"}]
        recs = records(c, w.url)
        check_conversation(recs, retrieve(c, r.url, prompt + reply["text"]).json(), eos_turns=3)


# --- batches, ids, retrieval errors ----------------------------------------------------------------


def test_batch_n_and_input_ids_passthrough(router, mock_worker, tok):
    r, (w,) = start(router, mock_worker, max_random_tokens=8)
    with httpx.Client(timeout=30) as c:
        texts = ["Alpha prompt:", "Beta prompt:"]
        replies = generate(c, r.url, {"text": texts, "sampling_params": {"max_new_tokens": 32, "n": 2}})
        assert isinstance(replies, list) and len(replies) == 4
        recs = records(c, w.url)
        for i, (rep, rec) in enumerate(zip(replies, recs)):
            assert rec["input_ids"] == tok.encode(texts[i // 2], add_special_tokens=False)
            got = retrieve(c, r.url, texts[i // 2] + rep["text"]).json()
            if replies[i ^ 1]["text"] != rep["text"]:
                assert got["tokens"] == rec["input_ids"] + rec["output_ids"]
                assert got["fresh_tokens"] == 0
        # a client that speaks ids: passed through unchanged, recorded under the decoded text
        c.delete(w.url + "/mock/records")
        base = retrieve(c, r.url, texts[0] + replies[0]["text"]).json()["tokens"]
        ids = base + tok.encode("\nNext:", add_special_tokens=False)
        rep = generate(c, r.url, {"input_ids": ids, "return_logprob": False, "stream": True})
        (rec,) = records(c, w.url)
        assert rec["input_ids"] == ids
        text = tok.decode(ids, skip_special_tokens=False) + rep["text"]
        got = retrieve(c, r.url, text).json()
        assert got["tokens"] == ids + rec["output_ids"] and got["fresh_tokens"] == 0
        assert got["loss_mask"][:len(base)] == retrieve(c, r.url, texts[0] + replies[0]["text"]).json()["loss_mask"]
        assert got["loss_mask"][len(ids):] == [1] * len(rec["output_ids"])


def test_retrieve_errors_and_honest_counts(router, mock_worker, tok):
    r, (w,) = start(router, mock_worker, max_random_tokens=8)
    with httpx.Client(timeout=30) as c:
        for bad in ("", 5, None, ["a"]):
            resp = retrieve(c, r.url, bad)
            assert resp.status_code == 400 and "text" in resp.json()["error"]["message"]
        assert c.post(r.url + "/retrieve_from_text", content=b"{").status_code == 400
        unseen = retrieve(c, r.url, "never seen")
        assert unseen.status_code == 200
        body = unseen.json()
        assert body["exact_tokens"] == 0 and body["fresh_tokens"] == body["token_length"] > 0
        assert body["loss_mask"] == [0] * body["token_length"]
        assert retrieve(c, r.url, "never seen", strict=True).status_code == 404
        rep = generate(c, r.url, {"text": "Known prompt:"})
        (rec,) = records(c, w.url)
        extra = retrieve(c, r.url, "Known prompt:" + rep["text"] + " plus more").json()
        n = len(rec["input_ids"]) + len(rec["output_ids"])
        assert extra["tokens"][:n] == rec["input_ids"] + rec["output_ids"]
        assert extra["exact_tokens"] == n and extra["fresh_tokens"] == len(extra["tokens"]) - n > 0
        assert retrieve(c, r.url, "Known prompt:" + rep["text"], strict=True).status_code == 200


# --- GC, eviction, concurrency -------------------------------------------------------------------


@pytest.mark.engines("sglang", reason="the versions are changed on the worker behind the router's back: vLLM does "
                                       "not stamp replies, the router only knows versions set through it")
def test_gc_by_string_weight_versions(router, mock_worker):
    r, (w,) = start(router, mock_worker, max_random_tokens=6, extra={"radix_tree_gc_k": 2})
    with httpx.Client(timeout=30) as c:
        texts = {}
        for v in ["default", "step-1", "10", "9"]:
            c.post(w.url + "/mock/configure", json={"weight_version": v})
            p = f"Conversation under {v}:"
            texts[v] = p + generate(c, r.url, {"text": p})["text"]
            got = retrieve(c, r.url, texts[v]).json()
            assert got["fresh_tokens"] == 0
            assert {x for x, m in zip(got["weight_versions"], got["loss_mask"]) if m} == {v}
        stats = c.get(r.url + "/radix_tree/stats").json()
        # first-observation order, never int(); "default" only survives on the shared prompt prefix
        assert stats["versions"] == ["default", "10", "9"]
        assert stats["gc_runs"] >= 2 and stats["gc_threshold_k"] == 2
        for v in ["default", "step-1"]:  # only the shared "Conversation under " prefix survives
            old = retrieve(c, r.url, texts[v]).json()
            assert sum(old["loss_mask"]) == 0 and old["fresh_tokens"] > 0
        for v in ["10", "9"]:
            assert retrieve(c, r.url, texts[v]).json()["fresh_tokens"] == 0
        check_tree(r)


def test_lru_eviction_bound(router, mock_worker):
    r, (w,) = start(router, mock_worker, max_random_tokens=20, extra={"radix_tree_max_size": 150})
    with httpx.Client(timeout=30) as c:
        texts = []
        for i in range(12):
            p = f"Distinct conversation number {i} begins here:"
            texts.append(p + generate(c, r.url, {"text": p})["text"])
            stats = c.get(r.url + "/radix_tree/stats").json()
            assert stats["cur_cache_size"] <= 150
        assert stats["evictions"] > 0 and stats["max_cache_size"] == 150
        oldest = retrieve(c, r.url, texts[0]).json()  # least recently used: gone but the shared prefix
        assert sum(oldest["loss_mask"]) == 0 and oldest["fresh_tokens"] > oldest["exact_tokens"]
        assert retrieve(c, r.url, texts[-1]).json()["fresh_tokens"] == 0  # most recent: exact
        check_tree(r)


def test_fifty_concurrent_conversations(router, mock_worker):
    r, workers = start(router, mock_worker, n_workers=2, max_random_tokens=10,
                       extra={"radix_tree_max_size": 1_000_000})
    turns = 3

    async def conversation(client: httpx.AsyncClient, i: int) -> str:
        prompt = f"Session {i}: hello\nBot:"
        for k in range(turns):
            resp = await client.post(r.url + "/generate", json={"text": prompt, "rid": f"c{i}-t{k}",
                                                               "stream": (i + k) % 3 == 0})
            assert resp.status_code == 200
            if (i + k) % 3 == 0:
                chunks = [orjson.loads(line[5:]) for line in resp.text.split("\n\n")
                          if line.startswith("data:") and "[DONE]" not in line]
                text = merge_stream(chunks)["text"]
            else:
                text = resp.json()["text"]
            full = prompt + text
            prompt = full + f"\nUser {i}: turn {k}\nBot:"
        return full

    async def main() -> list[str]:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=100)) as client:
            return await asyncio.gather(*(conversation(client, i) for i in range(50)))

    finals = asyncio.run(main())
    with httpx.Client(timeout=30) as c:
        by_rid = {rec["rid"]: rec for w in workers for rec in records(c, w.url)}
        for i, full in enumerate(finals):
            recs = [by_rid[f"c{i}-t{k}"] for k in range(turns)]
            check_conversation(recs, retrieve(c, r.url, full).json(), eos_turns=turns)
    check_tree(r)
