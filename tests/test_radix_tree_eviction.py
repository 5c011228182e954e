"""The trajectory cache at its bound (issue 12, section 3): a request can never flush the other live trajectories,
removing never-retrieved generated tokens is counted and logged, a retrieval of evicted text says so (and strict
refuses), and the default bound holds a realistic rollout step. Unit tests on TrajectoryCache with the real
tokenizer, and one test end to end through a router and a mock worker, with the cache in the router's process and in
its own (--radix-tree-process)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx
import orjson
import pytest

from slime_router_core import HTTPError, Settings
from slime_router_core.sglang import merge_stream
from slime_router_core.tokenizers import BUILTIN_CHECKPOINT, load_tokenizer
from slime_router_plugins.radix_tree import TrajectoryCache

EOS = 151645
LOGGER = "slime_router.radix_tree"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(BUILTIN_CHECKPOINT)


def turn(cache: TrajectoryCache, tok, prompt: str, reply_text: str, version: str = "1") -> tuple[Any, dict]:
    """A prompt prepared in ``cache`` and the worker's reply to it (``reply_text`` + EOS)."""
    p = cache.prepare_sync(prompt)
    out = tok.encode(reply_text, add_special_tokens=False) + [EOS]
    return p, {"text": reply_text, "output_ids": out, "meta_info": {
        "finish_reason": {"type": "stop", "matched": EOS}, "weight_version": version,
        "output_token_logprobs": [[-0.01 * (i + 1), t, None] for i, t in enumerate(out)]}}


def recorded(cache: TrajectoryCache, tok, prompt: str, reply_text: str, version: str = "1") -> tuple[str, list[int]]:
    """Record one turn; returns its trajectory text and exact ids."""
    p, r = turn(cache, tok, prompt, reply_text, version)
    assert cache.record_sync(p, r, "w") is not False
    return prompt + reply_text, p.input_ids + r["output_ids"]


def messages(caplog, needle: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and needle in r.getMessage()]


# --- 1. one request can never flush the others ------------------------------------------------------------


def test_a_prompt_far_larger_than_the_bound_is_not_recorded_and_flushes_nothing(tok, caplog):
    """The issue's reproduction: bound 10,000 tokens, a few trajectories, then one prompt six times the bound."""
    cache = TrajectoryCache(tok, max_size=10_000)
    convs = dict(recorded(cache, tok, f"<|im_start|>user\nquestion {i}<|im_end|>\n<|im_start|>assistant\n",
                          f" answer number {i}.") for i in range(3))
    size = cache.tree.size
    huge = "lorem ipsum dolor sit amet " * 12_000
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        p, r = turn(cache, tok, huge, " ok")
        assert p.fresh_tokens > 6 * 10_000
        assert cache.tree.size == size  # preparing it inserted nothing
        ok = cache.record_sync(p, r, "w")
        p2, r2 = turn(cache, tok, huge + "once more", " ok")
        ok2 = cache.record_sync(p2, r2, "w")
    for text, ids in convs.items():  # nothing was flushed
        got = cache.retrieve_sync(text, strict=True)
        assert got["tokens"] == ids and got["fresh_tokens"] == 0
    assert cache.tree.size == size and cache.tree.evictions == 0
    assert ok is False and ok2 is False and cache.max_record_tokens == 2_500  # the caller can tell
    assert all(cache.retrieve_sync(text)["evicted"] is False for text in convs)
    s = cache.stats()
    sizes = [x.fresh_tokens + len(y["output_ids"]) for x, y in ((p, r), (p2, r2))]
    assert (s["records_too_large"], s["records_too_large_tokens"]) == (2, sum(sizes))
    assert s["max_record_tokens"] == 2_500 and s["records"] == 3
    (msg,) = messages(caplog, "not recorded")  # one warning per interval
    assert f"{sizes[0]:,}" in msg and "2,500" in msg and "10,000" in msg and "--radix-tree-max-size" in msg


def test_the_per_record_limit_counts_the_tokens_a_record_adds(tok):
    """A quarter of the bound, counted on what the record adds (unrecorded prompt tokens + generated ones): a
    conversation may outgrow it turn by turn, a single request may not."""
    cache = TrajectoryCache(tok, max_size=400)
    x = tok.encode(" x", add_special_tokens=False)
    out = tok.encode(" done", add_special_tokens=False) + [EOS]
    reply = {"text": " done", "output_ids": out, "meta_info": {"finish_reason": {"type": "stop", "matched": EOS}}}
    first = x * (100 - len(out))
    assert cache.record_sync(cache.prepare_ids_sync(first), reply, None) is True  # exactly at the limit
    # the next turn: 200 tokens in all, but only its new 100 are added
    nxt = cache.prepare_ids_sync(first + out + x * (100 - len(out)))
    assert (nxt.cached_tokens, nxt.fresh_tokens) == (100, 100 - len(out))
    assert cache.record_sync(nxt, reply, None) is True
    too_many = cache.prepare_ids_sync(tok.encode(" z", add_special_tokens=False) * (101 - len(out)))
    assert cache.record_sync(too_many, reply, None) is False
    unfinished = dict(reply, meta_info={"finish_reason": {"type": "abort"}})  # adds its prompt only
    assert cache.record_sync(cache.prepare_ids_sync(tok.encode(" w", add_special_tokens=False) * 100), unfinished, None)
    assert cache.stats()["records_too_large"] == 1


# --- 2. removing never-retrieved generated tokens is counted and logged ------------------------------------


def test_evicting_never_retrieved_generated_tokens_is_counted_and_logged_once_per_interval(tok, caplog):
    cache = TrajectoryCache(tok, max_size=100_000)
    texts, gen = {}, {}
    for name in ("read", "unread", "prepared"):
        texts[name], _ = recorded(cache, tok, f"Q {name}:", f" the reply for {name}.")
        gen[name] = len(tok.encode(f" the reply for {name}.", add_special_tokens=False)) + 1
    cache.retrieve_sync(texts["read"])
    cache.prepare_sync(texts["prepared"] + " and more")  # a prepare returns nothing to a trainer: no flag
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        cache.tree.evict(cache.tree.size)
        s = cache.stats()
        assert (s["evicted_unretrieved"], s["evicted_unretrieved_generated_tokens"]) == \
            (2, gen["unread"] + gen["prepared"])
        assert (s["gc_removed_unretrieved"], s["gc_removed_unretrieved_generated_tokens"]) == (0, 0)
        (msg,) = messages(caplog, "before any retrieval")
        assert f"2 entries holding {gen['unread'] + gen['prepared']:,} generated tokens evicted" in msg
        assert "100,000 tokens" in msg and "MB" in msg and "--radix-tree-max-size" in msg
        recorded(cache, tok, "Q later:", " another reply.")
        cache.tree.evict(cache.tree.size)  # within the interval: counted, not logged
        assert len(messages(caplog, "before any retrieval")) == 1
        assert cache.stats()["evicted_unretrieved"] == 3
        cache.tree._loss_warning.interval = 0  # the interval has passed: the next warning sums what was not logged
        recorded(cache, tok, "Q last:", " a last reply.")
        cache.tree.evict(cache.tree.size)
    assert messages(caplog, "before any retrieval")[-1].startswith("radix_tree: trajectories were removed") and \
        "2 entries holding" in messages(caplog, "before any retrieval")[-1]


def test_a_retrieval_covers_what_it_returned_not_the_next_turn(tok):
    cache = TrajectoryCache(tok, max_size=100_000)
    prompt = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    text, _ = recorded(cache, tok, prompt, " hello there.")
    cache.retrieve_sync(text)
    nxt = text + "<|im_end|>\n<|im_start|>user\nmore<|im_end|>\n<|im_start|>assistant\n"
    recorded(cache, tok, nxt, " the second answer.")
    assert cache.tree.node_count == 1  # the next turn extended the very leaf that was retrieved
    cache.tree.evict(cache.tree.size)
    s = cache.stats()
    assert (s["evicted_unretrieved"], s["evicted_unretrieved_generated_tokens"]) == \
        (1, len(tok.encode(" the second answer.", add_special_tokens=False)) + 1)


def test_weight_version_gc_of_never_retrieved_tokens_is_counted_separately(tok):
    cache = TrajectoryCache(tok, max_size=100_000, gc_k=1)
    read, _ = recorded(cache, tok, "Old read:", " first.", version="v1")
    unread, _ = recorded(cache, tok, "Old unread:", " second one.", version="v1")
    cache.retrieve_sync(read)
    recorded(cache, tok, "New:", " third.", version="v2")  # a new version: v1's trajectories are GC'd
    s = cache.stats()
    n_unread = len(tok.encode(" second one.", add_special_tokens=False)) + 1
    assert (s["gc_removed_unretrieved"], s["gc_removed_unretrieved_generated_tokens"]) == (1, n_unread)
    assert s["evicted_unretrieved"] == 0
    got = cache.retrieve_sync(unread)
    assert got["evicted"] is True and got["evicted_generated_tokens"] == n_unread
    assert "weight-version GC" in got["warning"] and "--radix-tree-gc-k" in got["warning"]


# --- 3. a retrieval of evicted text says so; strict refuses -------------------------------------------------


def test_retrieving_evicted_text_is_flagged_and_strict_answers_410(tok):
    cache = TrajectoryCache(tok, max_size=100_000)
    prompt = "System: be brief.\nUser: name a colour.\nAssistant:"
    a, a_ids = recorded(cache, tok, prompt, "Blue, like the sky.")
    b, b_ids = recorded(cache, tok, prompt, "Red.")
    gen_a = len(a_ids) - len(cache.detok.encode(prompt))
    cache.retrieve_sync(b)  # b is more recent: the next eviction takes a's own part only
    freed = cache.tree.evict(gen_a)
    assert freed == gen_a
    got = cache.retrieve_sync(a)
    assert got["evicted"] is True and got["evicted_at_char"] == len(prompt) == got["recorded_chars"]
    assert got["evicted_generated_tokens"] == gen_a and sum(got["loss_mask"]) == 0
    assert "evicted" in got["warning"] and "100,000 tokens" in got["warning"] and "--radix-tree-max-size" in \
        got["warning"]
    with pytest.raises(HTTPError) as e:
        cache.retrieve_sync(a, strict=True)
    assert (e.value.status, e.value.code) == (410, "evicted") and "--radix-tree-max-size" in e.value.message
    assert cache.retrieve_sync(b, strict=True)["tokens"] == b_ids  # what is still there is exact
    # text never recorded, or diverging from what is recorded: not "evicted" (404 when strict, as before)
    for text in ("Something never seen", prompt + "Green."):
        assert cache.retrieve_sync(text)["evicted"] is False
        with pytest.raises(HTTPError) as e:
            cache.retrieve_sync(text, strict=True)
        assert (e.value.status, e.value.code) == (404, "not_recorded")
    # everything evicted, node by node (b's reply, then the shared prompt): found through the chain of removals
    cache.tree.evict(cache.tree.size)
    got = cache.retrieve_sync(a + " and a continuation never generated")
    assert got["evicted"] is True and got["evicted_at_char"] == 0 and got["evicted_generated_tokens"] == gen_a
    got = cache.retrieve_sync(prompt + "Green.")  # its prompt was recorded: evicted, though no generated token was
    assert got["evicted"] is True and got["evicted_at_char"] == 0 and got["evicted_generated_tokens"] == 0
    s = cache.stats()
    assert s["retrievals_after_eviction"] == 4 and s["retrievals_after_eviction_generated_tokens"] == 3 * gen_a


def test_the_hot_paths_never_look_at_removed_text(tok, monkeypatch):
    cache = TrajectoryCache(tok, max_size=100_000)
    text, _ = recorded(cache, tok, "Q: hot path", " answer.")
    cache.tree.evict(cache.tree.size)

    def boom(*a: Any) -> None:
        raise AssertionError("removed_at on a hot path")

    monkeypatch.setattr(cache.tree, "removed_at", boom)
    recorded(cache, tok, text + " next", " again.")  # prepare + record of text that was evicted
    assert cache.retrieve_sync(text + " next again.")["evicted"] is False  # fully recorded: nothing to look up


# --- 4. the default -------------------------------------------------------------------------------------


def test_the_default_bound_holds_a_rollout_step_and_is_defined_once(tok):
    assert TrajectoryCache(tok).tree.max_tokens == 2**26  # ~1 GiB; the original guide's 10,000 is one long prompt

    from slime_router_plugins.radix_tree.process import CacheProcessClient
    from slime_router_plugins.radix_tree.trie import BYTES_PER_TOKEN, DEFAULT_MAX_TOKENS, StringRadixTrie, bound_mb

    assert DEFAULT_MAX_TOKENS == 2**26 and BYTES_PER_TOKEN * DEFAULT_MAX_TOKENS == 2**30  # ~1 GiB
    assert bound_mb(DEFAULT_MAX_TOKENS) == "1,024 MB" and bound_mb(10_000) == "0.15 MB"
    assert StringRadixTrie().max_tokens == TrajectoryCache(tok).tree.max_tokens == DEFAULT_MAX_TOKENS
    client = CacheProcessClient(BUILTIN_CHECKPOINT)
    assert client.max_record_tokens == TrajectoryCache(tok).max_record_tokens == DEFAULT_MAX_TOKENS // 4
    assert client.args[client.args.index("--max-size") + 1] == str(DEFAULT_MAX_TOKENS)


# --- end to end: router + mock worker, the cache in process and in its own ----------------------------------


@pytest.fixture(params=["in_process", "own_process"])
def cache_mode(request):
    return request.param


def _generate(c: httpx.Client, url: str, body: dict) -> dict:
    if not body.get("stream"):
        r = c.post(url + "/generate", json=body)
        assert r.status_code == 200, r.text
        return r.json()
    with c.stream("POST", url + "/generate", json=body) as r:
        assert r.status_code == 200
        chunks = [orjson.loads(line[5:]) for line in r.iter_lines()
                  if line.startswith("data:") and line[5:].strip() != "[DONE]"]
    reply = merge_stream(chunks)
    reply["_last_chunk"] = chunks[-1]
    return reply


def _exact(got: dict, rec: dict) -> None:
    truth = rec["input_ids"] + rec["output_ids"]
    assert got["tokens"] == truth and got["fresh_tokens"] == 0 and got["evicted"] is False
    assert got["loss_mask"][len(rec["input_ids"]):] == [1] * len(rec["output_ids"])


def test_end_to_end_bound_10000(router, mock_worker, cache_mode, caplog):
    w = mock_worker(max_random_tokens=8)
    settings = Settings(hf_checkpoint=BUILTIN_CHECKPOINT, worker_urls=[w.url],
                        extra={"radix_tree_max_size": 10_000, "radix_tree_process": cache_mode == "own_process"})
    with caplog.at_level(logging.INFO, logger=LOGGER):
        r = router(plugins=["radix_tree", "metrics"], settings=settings)
    with httpx.Client(timeout=60) as c:

        def conversation(name: str) -> str:  # two turns
            prompt = f"Conversation {name}:\nUser: hello\nBot:"
            for k in range(2):
                text = _generate(c, r.url, {"text": prompt, "rid": f"{name}-{k}"})["text"]
                prompt = prompt + text + ("\nUser: go on\nBot:" if k == 0 else "")
            return prompt

        def retrieve(text: str, **kw: Any) -> httpx.Response:
            return c.post(r.url + "/retrieve_from_text", json={"text": text, **kw})

        # the issue: a few trajectories, then one prompt far larger than the bound (non-streamed and streamed)
        finals = {name: conversation(name) for name in ("c0", "c1", "c2")}
        huge = "lorem ipsum dolor sit amet " * 12_000
        replies = [_generate(c, r.url, {"text": huge + str(stream), "stream": stream}) for stream in (False, True)]
        recs = {rec["rid"]: rec for rec in c.get(w.url + "/mock/records").json() if rec.get("rid")}
        for name, text in finals.items():  # nothing was flushed
            _exact(retrieve(text).json(), recs[f"{name}-1"])
        for reply in replies:  # and the client is told its trajectory was not recorded
            meta = reply.get("_last_chunk", reply)["meta_info"]
            assert meta["trajectory"]["recorded"] is False and meta["trajectory"]["reason"] == "too_large"
            assert meta["trajectory"]["tokens"] > 60_000 and meta["trajectory"]["max_record_tokens"] == 2_500
            assert "--radix-tree-max-size" in meta["trajectory"]["message"]
        stats = c.get(r.url + "/radix_tree/stats").json()
        assert stats["records_too_large"] == 2 and stats["evictions"] == 0

        # trajectories nobody retrieves, then retrieved ones that fill the cache: the older ones are evicted
        unread = {name: conversation(name) for name in ("u1", "u2")}
        small = _generate(c, r.url, {"text": "A small one:", "rid": "small"})
        assert "trajectory" not in small["meta_info"]  # the common reply is left as it was
        for i in range(8):
            text = f"Filler {i}: " + f"word{i} " * 1_000
            text += _generate(c, r.url, {"text": text})["text"]
            assert retrieve(text).json()["fresh_tokens"] == 0
        recs = {rec["rid"]: rec for rec in c.get(w.url + "/mock/records").json() if rec.get("rid")}
        gen = {name: sum(len(recs[f"{name}-{k}"]["output_ids"]) for k in range(2)) for name in unread}
        gen_unread = gen["u1"] + gen["u2"] + len(recs["small"]["output_ids"])
        m = c.get(r.url + "/metrics").json()["cache_stats"]
        assert m["evictions"] > 0 and m["cur_cache_size"] <= 10_000
        assert (m["evicted_unretrieved"], m["evicted_unretrieved_generated_tokens"]) == (3, gen_unread)

        # a retrieval of an evicted conversation says so; strict refuses with 410
        got = retrieve(unread["u1"]).json()
        assert got["evicted"] is True and got["evicted_at_char"] == 0 and sum(got["loss_mask"]) == 0
        assert got["evicted_generated_tokens"] == gen["u1"] and "--radix-tree-max-size" in got["warning"]
        strict = retrieve(unread["u1"], strict=True)
        assert strict.status_code == 410 and strict.json()["error"]["code"] == "evicted"
        assert "evicted" in strict.json()["error"]["message"]

        fams = {f.name: f for f in _prometheus(c, r.url)}
        prom = {name: fams[f"slime_router_cache_{name}"].samples[0].value for name in (
            "records_too_large", "evicted_unretrieved", "evicted_unretrieved_generated_tokens",
            "retrievals_after_eviction", "max_record_tokens")}
        assert prom == {"records_too_large": 2, "evicted_unretrieved": 3,
                        "evicted_unretrieved_generated_tokens": gen_unread, "retrievals_after_eviction": 2,
                        "max_record_tokens": 2_500}
    (start,) = [m.getMessage() for m in caplog.records if "trajectory cache bound" in m.getMessage()]
    assert "10,000 tokens" in start and "0.15 MB" in start and "2,500" in start
    if cache_mode == "in_process":  # the child's log goes to its own stderr
        assert messages(caplog, "before any retrieval")
    else:
        cache = r.app.router.registry.get("radix_tree")
        asyncio.run_coroutine_threadsafe(cache.check_tree(), cache.loop).result(30)


def _prometheus(c: httpx.Client, url: str) -> list:
    from prometheus_client.parser import text_string_to_metric_families

    resp = c.get(url + "/metrics/prometheus")
    assert resp.status_code == 200
    return list(text_string_to_metric_families(resp.text))
