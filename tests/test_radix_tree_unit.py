"""StringRadixTrie and TrajectoryCache units, plus hypothesis property tests against a reference model."""

from __future__ import annotations

import asyncio
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slime_router_core import HTTPError
from slime_router_core.tokenizers import BUILTIN_CHECKPOINT, load_tokenizer
from slime_router_plugins.radix_tree import StringRadixTrie, TrajectoryCache

EOS = 151645


def assert_walks_agree(t: StringRadixTrie, q: str) -> None:
    """The one-pass walk (no optional span skipped) answers exactly like the general walk wherever it answers."""
    with t.lock:
        a = t._match_plain(q, touch=False)
        b = t._match_skipping(q, touch=False)
    if a is None:
        return
    for attr in ("canonical", "query_pos", "markers", "worker", "skipped", "chain_end", "raw_mv", "raw_widths"):
        assert getattr(a, attr) == getattr(b, attr), attr
    assert a.raw_ids.tolist() == b.raw_ids.tolist() and a.raw_logp.tobytes() == b.raw_logp.tobytes()
    assert (a.anchor is None) == (b.anchor is None)
    if a.anchor is not None:
        assert [(id(n), g) for n, g in a.anchor.nodes] == [(id(n), g) for n, g in b.anchor.nodes]
        assert (a.anchor.carry, a.anchor.chain_end, a.anchor.pos) == (b.anchor.carry, b.anchor.chain_end, b.anchor.pos)


# --- the trie ------------------------------------------------------------------------------------


def test_shared_prefix_stored_once_and_split_on_divergence():
    t = StringRadixTrie(1000)
    t.insert("Hello world", [1, 2], [5, 11], versions="v")
    t.insert("Hello there", [1, 3], [5, 11], versions="v")
    t.check()
    assert t.size == 3 and set(t.root.children) == {"H"}  # "Hello" stored once
    top = t.root.children["H"]
    assert top.text == "Hello " and set(top.children) == {"w", "t"}  # dict keyed by first char
    assert t.match("Hello world").ids == [1, 2]
    assert t.match("Hello there").ids == [1, 3]


def test_lookup_stops_at_any_token_boundary_inside_a_node():
    t = StringRadixTrie(1000)
    t.insert("abcdefghij", [1, 2, 3, 4], [2, 5, 7, 10])
    for q, ids, pos in [("abcdefghij", [1, 2, 3, 4], 10), ("abcdefgXX", [1, 2, 3], 7), ("abcdef", [1, 2], 5),
                        ("abc", [1], 2), ("a", [], 0), ("zzz", [], 0)]:
        m = t.match(q)
        assert (m.ids, m.query_pos) == (ids, pos), q
        assert m.canonical == q[:pos]


def test_divergent_chains_over_the_same_text_both_stay_exact():
    t = StringRadixTrie(1000)
    t.insert("X there", [1, 2], [1, 7], loss_mask=[0, 1])  # " there"
    t.insert("X the end", [1, 3, 4], [1, 5, 9], loss_mask=[0, 1, 1])  # " the" + " end"
    t.insert("X the", [1, 5, 6], [1, 3, 5], loss_mask=[0, 1, 1])  # " t" + "he": a third chain ending mid-way
    t.check()
    assert t.match("X there").ids == [1, 2]
    assert t.match("X the end").ids == [1, 3, 4]
    assert t.match("X the").ids == [1, 5, 6]  # the terminal ("") child
    assert t.match("X th").ids == [1]  # no chain boundary there that all agree on: back off


def test_same_text_newest_chain_wins_and_generated_mask_is_kept():
    t = StringRadixTrie(1000)
    t.insert("ab cd", [1, 2], [2, 5], loss_mask=[0, 0], versions="1")
    t.insert("ab cd", [1, 2], [2, 5], logprobs=[-0.5, -0.25], loss_mask=[0, 1], versions="2")
    t.insert("ab cd", [1, 2], [2, 5], loss_mask=[0, 0], versions="3")  # a prompt-only record of the same ids
    m = t.match("ab cd")
    assert m.loss_mask == [0, 1] and m.logprobs[1] == -0.25 and m.versions == ["2", "2"]
    t.insert("ab cd", [7, 8, 9], [1, 2, 5])
    assert t.match("ab cd").ids == [7, 8, 9]
    t.check()


def _extended(t: StringRadixTrie) -> None:
    """"abc" recorded as [1 "ab", 2 "c"], then continued in place by "def" as [3 "de", 4 "f"]."""
    t.insert("abc", [1, 2], [2, 3], loss_mask=[0, 1], versions="v")
    m = t.match("abcdef")
    assert m.anchor is not None and m.anchor.pos == 3
    assert t.insert_after(m.anchor, "abcdef", [3, 4], [5, 6], loss_mask=[0, 1], versions="v")


def test_a_continued_leaf_is_extended_in_place_and_keeps_the_earlier_chain_end():
    t = StringRadixTrie(1000)
    _extended(t)
    t.check()
    leaf = t.root.children["a"]
    assert (t.node_count, leaf.text, leaf.children, leaf.stops) == (1, "abcdef", None, {3})
    assert t.match("abcdef").ids == [1, 2, 3, 4] and t.match("abcdef").loss_mask == [0, 1, 0, 1]
    assert t.match("abc").ids == [1, 2] and t.match("abcd").ids == [1, 2]


@pytest.mark.parametrize("other", [("abcxyz", [5, 6, 7], [1, 4, 6]),  # diverges at the earlier chain end
                                   ("abcdefgh", [5, 6, 7], [1, 4, 8])])  # passes through it, other tokens
def test_a_chain_end_inside_an_extended_leaf_survives_a_differently_tokenized_record(other):
    t = StringRadixTrie(1000)
    _extended(t)
    t.insert(*other)
    t.check()
    assert t.match("abc").ids == [1, 2] and t.match("abc").loss_mask == [0, 1]  # the "" child, as before
    assert t.match(other[0]).ids == other[1]


def test_optional_span_written_or_skipped_gives_one_eos():
    t = StringRadixTrie(1000)
    text = "Q: hi\nA: yo<|im_end|>"
    t.insert(text, [10, 11, 12, EOS], [6, 9, 11, len(text)], loss_mask=[0, 0, 1, 1], markers=[(11, "<|im_end|>")])
    for q, pos in [("Q: hi\nA: yo", 11), ("Q: hi\nA: yo<|im_end|>", len(text))]:
        m = t.match(q)
        assert m.ids == [10, 11, 12, EOS] and m.query_pos == pos
    m = t.match("Q: hi\nA: yo\nQ: more")  # plain-text continuation without the EOS written
    assert m.ids == [10, 11, 12, EOS] and m.query_pos == 11 and m.canonical == text
    m = t.match("Q: hi\nA: yo<|im_end|>\n<|im_start|>")
    assert m.ids == [10, 11, 12, EOS] and m.query_pos == len(text)
    m = t.match("Q: hi\nA: y")
    assert m.ids == [10, 11] and m.query_pos == 9


def test_partial_character_tokens_never_end_a_match():
    t = StringRadixTrie(1000)
    # "a我" where 我 is split over two byte-level tokens: the first covers no complete character
    t.insert("a我b", [1, 2, 3, 4], [1, 1, 2, 3])
    assert t.match("a我b").ids == [1, 2, 3, 4]
    m = t.match("a你")
    assert m.ids == [1] and m.query_pos == 1


def test_lru_eviction_keeps_the_bound_and_recent_records():
    t = StringRadixTrie(max_tokens=10)
    for i in range(6):
        t.insert(f"r{i} abc", [i, 100, 101], [2, 4, 6])
        assert t.size <= 10
        t.check()
    assert t.evictions > 0 and t.evicted_tokens > 0
    assert t.match("r5 abc").ids == [5, 100, 101]
    assert t.match("r0 abc").ids == []
    t.match("r3 abc")  # a lookup refreshes recency
    t.insert("r9 abc", [9, 100, 101], [2, 4, 6])
    assert t.match("r3 abc").ids == [3, 100, 101]
    assert t.evict(100) > 0 and t.size == 0
    t.check()


def test_gc_keeps_newest_k_string_versions_by_first_observation():
    t = StringRadixTrie(10_000, gc_k=2)
    for v in ["default", "7", "10", "step-3"]:  # "10" after "7": never compared as ints, "default" is oldest
        t.insert(f"version {v} text", [1, 2], [8, 8 + len(v) + 5], versions=v)
        t.check()
    assert t.gc_runs == 2
    assert t.match("version default text").ids == [1] and t.match("version 7 text").ids == [1]
    assert t.match("version 10 text").ids == [1, 2] and t.match("version step-3 text").ids == [1, 2]
    assert t.versions() == ["default", "10", "step-3"]  # "default": the shared "version " token
    assert t.newer("step-3", "10") and t.newer("10", "7") and not t.newer("default", "7")


def test_insert_validates_its_input():
    t = StringRadixTrie()
    with pytest.raises(ValueError):
        t.insert("abc", [1, 2], [2, 2])
    with pytest.raises(ValueError):
        t.insert("abc", [1, 2], [2, 3], loss_mask=[1])
    t.insert("", [], [])
    assert t.size == 0


# --- property tests --------------------------------------------------------------------------------

ALPHABET = "ab c"


@st.composite
def records(draw):
    text = draw(st.text(alphabet=ALPHABET, min_size=1, max_size=14))
    cuts = sorted(draw(st.sets(st.integers(1, len(text) - 1), max_size=len(text) - 1))) if len(text) > 1 else []
    bounds = cuts + [len(text)]
    starts = [0] + cuts
    variant = draw(st.integers(0, 1))  # the same text piece may get a different id (non-injective decode)
    ids = [hash((text[a:b], variant)) % 1000 for a, b in zip(starts, bounds)]
    mask = draw(st.lists(st.integers(0, 1), min_size=len(ids), max_size=len(ids)))
    return text, ids, bounds, mask


ops = st.lists(st.one_of(
    st.tuples(st.just("insert"), records(), st.sampled_from(["default", "1", "2", "3", "10"])),
    # continue the last inserted text through its match's anchor (an in-place leaf extension when it is a leaf)
    st.tuples(st.just("continue"), records(), st.sampled_from(["default", "1", "2", "3", "10"])),
    st.tuples(st.just("lookup"), st.text(alphabet=ALPHABET, max_size=16)),
    st.tuples(st.just("evict"), st.integers(0, 20)),
    st.tuples(st.just("gc"), st.integers(1, 3)),
), max_size=40)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops, max_tokens=st.integers(3, 60))
def test_property_against_reference_model(ops, max_tokens):
    t = StringRadixTrie(max_tokens=max_tokens, gc_k=3)
    recorded: set[tuple[str, int, int, int]] = set()  # (text up to the token's end, id, start, end)
    recorded_meta: set[tuple] = set()  # ... + (loss mask, version)

    def check_match(q: str) -> None:
        assert_walks_agree(t, q)
        m = t.match(q)
        assert m.canonical == q[:m.query_pos]  # no optional spans in this model
        prev = 0
        for tid, end, mk, ver in zip(m.ids, m.ends, m.loss_mask, m.versions):
            assert (q[:end], tid, prev, end) in recorded, "returned a token never recorded for this text"
            assert (q[:end], tid, prev, end, mk, ver) in recorded_meta, "metadata never recorded for this token"
            prev = end
        assert prev == m.query_pos

    last_text = ""
    for op in ops:
        if op[0] == "continue":
            (more, more_ids, more_ends, more_mask), version = op[1], op[2]
            text = last_text + more
            m = t.match(text)
            if last_text and m.anchor is not None and m.query_pos == len(last_text) and m.canonical == last_text:
                k = m.anchor.carry
                ends = m.ends + [len(last_text) + e for e in more_ends]
                ids = m.ids + more_ids
                mask = m.loss_mask + more_mask
                versions = m.versions + [version] * len(more_ids)
                assert t.insert_after(m.anchor, text, ids[k:], ends[k:], loss_mask=mask[k:], versions=versions[k:])
                prev = 0
                for tid, end, mk, ver in zip(ids, ends, mask, versions):
                    recorded.add((text[:end], tid, prev, end))
                    recorded_meta.add((text[:end], tid, prev, end, mk, ver))
                    prev = end
                last_text = text
                check_match(text)
        elif op[0] == "insert":
            (text, ids, ends, mask), version = op[1], op[2]
            t.insert(text, ids, ends, loss_mask=mask, versions=version)
            last_text = text
            prev = 0
            for tid, end, mk in zip(ids, ends, mask):
                recorded.add((text[:end], tid, prev, end))
                recorded_meta.add((text[:end], tid, prev, end, mk, version))
                prev = end
            if len(ids) <= max_tokens:  # the newest record's ids are exact right after its insert
                m = t.match(text)
                assert m.ids == ids and m.ends == ends
            check_match(text)
        elif op[0] == "lookup":
            check_match(op[1])
        elif op[0] == "evict":
            t.evict(op[1])
        else:
            t.gc(op[1])
        t.check()
        assert t.size <= max_tokens


# --- the cache with the real tokenizer ------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(BUILTIN_CHECKPOINT)


def reply(text: str, ids: list[int], version="default", finish=None, spans=None) -> dict:
    meta = {"finish_reason": finish or {"type": "stop", "matched": EOS}, "weight_version": version,
            "output_token_logprobs": [[-0.1 * (i + 1), t, None] for i, t in enumerate(ids)]}
    if spans:
        meta["weight_versions"] = spans
    return {"text": text, "output_ids": ids, "meta_info": meta}


def test_cache_turns_with_bpe_boundaries_and_spans(tok):
    cache = TrajectoryCache(tok, max_size=100_000)
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    p1 = asyncio.run(cache.prepare("Assistant:"))
    assert p1.cached_tokens == 0 and p1.input_ids == enc("Assistant:")
    out = enc(" 我 remember.") + [EOS]
    cache.record_sync(p1, reply(" 我 remember.", out, spans=[{"version": "a", "start": 0, "end": 2},
                                                         {"version": "b", "start": 2, "end": len(out)}]), "w1")
    # the next turn appends text that BPE would merge with the last generated token (".memory")
    p2 = asyncio.run(cache.prepare("Assistant: 我 remember.memory"))
    assert p2.input_ids[:len(p1.input_ids) + len(out)] == p1.input_ids + out
    assert p2.input_ids[len(p1.input_ids) + len(out):] == enc("memory")
    assert p2.worker_url == "w1" and p2.fresh_tokens == len(enc("memory"))
    got = cache.retrieve_sync("Assistant: 我 remember.")
    assert got["tokens"] == p1.input_ids + out
    assert got["loss_mask"] == [0] * len(p1.input_ids) + [1] * len(out)
    assert got["weight_versions"][len(p1.input_ids):] == ["a", "a"] + ["b"] * (len(out) - 2)
    assert all(math.isclose(a, b, rel_tol=1e-6) for a, b in
               zip(got["rollout_logp"][len(p1.input_ids):], [-0.1 * (i + 1) for i in range(len(out))]))
    with pytest.raises(HTTPError) as e:
        cache.retrieve_sync("Assistant: 我 remember. unseen", strict=True)
    assert e.value.status == 404
    for bad in ("", None, 3):
        with pytest.raises(HTTPError) as e:
            cache.retrieve_sync(bad)  # type: ignore[arg-type]
        assert e.value.status == 400


def test_cache_stop_string_trimmed_inside_a_token(tok):
    cache = TrajectoryCache(tok)
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    p = cache.prepare_sync("Q:")
    out = enc(" fine.\n\nUser")  # stop "\n\nUser" trimmed by the worker; ".\n\n" may be one token
    cache.record_sync(p, reply(" fine.", out, finish={"type": "stop", "matched": "\n\nUser"}), None)
    for q in ("Q: fine.", "Q: fine.\n\nUser"):
        got = cache.retrieve_sync(q)
        assert got["tokens"] == p.input_ids + out and got["fresh_tokens"] == 0
    nxt = cache.prepare_sync("Q: fine.\n\nUser: next")
    assert nxt.input_ids[:len(p.input_ids) + len(out)] == p.input_ids + out
    assert nxt.input_ids[len(p.input_ids) + len(out):] == enc(": next")


def test_cache_aborted_generation_records_only_the_prompt(tok):
    cache = TrajectoryCache(tok)
    p = cache.prepare_sync("Abort me:")
    cache.record_sync(p, reply(" partial", tok.encode(" partial"), finish={"type": "abort", "message": "x"}), None)
    got = cache.retrieve_sync("Abort me: partial")
    assert got["exact_tokens"] == len(p.input_ids) and sum(got["loss_mask"]) == 0
    s = cache.stats()
    for key in ("total_entries", "cache_hits", "cache_misses", "hit_rate", "hit_tokens", "lookup_tokens",
                "cur_cache_size", "max_cache_size", "cache_size_bytes", "evictions", "gc_runs", "gc_threshold_k",
                "versions"):
        assert key in s
    assert s["cache_misses"] == 1 and s["cur_cache_size"] == len(p.input_ids) and s["cache_size_bytes"] > 0


def test_detokenizer_pieces_match_decode(tok):
    cache = TrajectoryCache(tok)
    text = "Hello 世界 🤖 <think>\nx</think> done<|im_end|>"
    ids = tok.encode(text, add_special_tokens=False)
    pcs = cache.detok.pieces(ids)
    assert "".join(pcs) == text == tok.decode(ids, skip_special_tokens=False)
    assert "" in pcs  # the emoji spans two byte-level tokens: the first carries no complete character
    assert cache.detok.widths_for(ids, text) == [len(p) for p in pcs]


def test_long_prompts_are_tokenized_off_the_event_loop(tok, caplog):
    cache = TrajectoryCache(tok, verbose=True)
    long_text = "word " * 3000  # above the offload threshold
    p = asyncio.run(cache.prepare(long_text))
    assert p.input_ids == tok.encode(long_text, add_special_tokens=False) and p.cached_tokens == 0
    out = tok.encode(" done", add_special_tokens=False) + [EOS]
    asyncio.run(cache.record(p, reply(" done", out), "w"))
    with caplog.at_level("INFO", logger="slime_router.radix_tree"):
        p2 = asyncio.run(cache.prepare(long_text + " done more"))
    assert p2.cached_tokens == len(p.input_ids) + len(out) and p2.worker_url == "w"
    assert any("from records" in r.message for r in caplog.records)  # --verbose: hits per request


# --- fast paths: tiktoken encoder, incremental records ---------------------------------------------


SPECIAL_TEXTS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>", "<tool_call>", "\n", "\n\n",
                 " ", "  ", "\t", "\r\n", "你好", "🤖", "👨‍👩‍👧", "é", "e\u0301", "\u0338", "'s", "123", "<|im_end"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(parts=st.lists(st.one_of(st.text(max_size=30), st.sampled_from(SPECIAL_TEXTS)), max_size=12))
def test_tiktoken_fast_path_equals_hf_on_random_unicode(tok, parts):
    from slime_router_plugins.radix_tree.cache import Detokenizer

    fast = Detokenizer(tok)
    assert fast.fast is not None, "the builtin Qwen3 tokenizer must get the tiktoken fast path"
    text = "".join(parts)
    assert fast.encode(text) == tok.backend_tokenizer.encode(text, add_special_tokens=False).ids


def test_tiktoken_fast_path_only_for_the_same_tokenizer(tok):
    from tokenizers import Tokenizer, normalizers
    from transformers import PreTrainedTokenizerFast

    from slime_router_plugins.radix_tree.cache import Detokenizer, fast_encoder

    d = Detokenizer(tok)
    assert d.fast is not None and "tiktoken" in d.encoder_name
    # HF extracts added tokens before NFC: "<|im_end|>" + U+0338 must not become "<|im_end|≯"
    for text in ("<|im_end|>\u0338", "a<\u0338b", "cafe\u0301 <think>"):
        assert d.encode(text) == tok.backend_tokenizer.encode(text, add_special_tokens=False).ids
    backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    backend.normalizer = normalizers.NFKC()  # another normalizer: not provably the same tokenizer
    other = PreTrainedTokenizerFast(tokenizer_object=backend)
    assert fast_encoder(other) is None and Detokenizer(other).encoder_name == "hf tokenizers"
    assert fast_encoder(object()) is None


def _turn(cache: TrajectoryCache, tok, prompt: str, reply_text: str, worker: str = "w", version: str = "1"):
    p = cache.prepare_sync(prompt)
    out = tok.encode(reply_text, add_special_tokens=False) + [EOS]
    return p, {"text": reply_text, "output_ids": out, "meta_info": {
        "finish_reason": {"type": "stop", "matched": EOS}, "weight_version": version,
        "output_token_logprobs": [[-0.01 * (i + 1), t, None] for i, t in enumerate(out)]}}


def test_incremental_record_walks_only_new_tokens_and_falls_back_when_the_tree_changed(tok):
    cache = TrajectoryCache(tok, max_size=100_000)
    prompt = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    for i in range(4):
        p, r = _turn(cache, tok, prompt, f" reply {i} 你好 🤖.")
        cache.record_sync(p, r, "w")
        prompt += r["text"] + f"<|im_end|>\n<|im_start|>user\nmore {i}<|im_end|>\n<|im_start|>assistant\n"
    assert cache.records_incremental == 3  # turn 1 has no anchor; turns 2-4 continue the recorded chain
    # the tree changes under a prepared prompt (its anchor node is evicted): the full insert is used
    p, r = _turn(cache, tok, prompt, " last")
    cache.tree.evict(cache.tree.size)
    cache.record_sync(p, r, "w")
    assert cache.records_incremental == 3
    got = cache.retrieve_sync(prompt + " last")
    assert got["tokens"] == p.input_ids + r["output_ids"] and got["fresh_tokens"] == 0
    cache.tree.check()


TURN_TEXTS = [" ok", " yes.", " 你好", " 🤖!", "\n\nsure", " the end", " a b c", " ok ok", " 你", " 🤖🤖 x", "🤖",
              " 好的"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(script=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3), st.sampled_from(TURN_TEXTS),
                                 st.sampled_from(["1", "2"]), st.booleans()), min_size=1, max_size=14),
       max_size=st.sampled_from([60, 100_000]))
def test_property_incremental_record_equals_full_insert(tok, script, max_size):
    """Conversations recorded with anchors (incremental, leaves extended in place) and without (full inserts)
    give identical lookups, including interleaved turns (anchors invalidated by other records) and branches.
    Under eviction (max_size 60) the two trees have different shapes, so they evict different things and later
    turns are recorded from different knowledge: then each cache must still give tokens that spell the text (up to
    where EOS ids stand, see below)."""
    evicting = max_size < 1000
    caches = [TrajectoryCache(tok, max_size=max_size, gc_k=5) for _ in range(2)]
    convs = ["<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"] * 2 + ["Q: x\nA:", "Q: y\nA:"]
    pending: list = []
    texts: set[str] = set()
    for conv, branch, reply_text, version, delay in script:
        base = convs[conv] + ("" if branch == 0 else f"<|im_end|>\n<|im_start|>user\nbranch {branch}\n")
        pair = [_turn(c, tok, base, reply_text, version=version) for c in caches]
        pair[1][0].match.anchor = None  # the reference cache: full inserts only
        if not evicting:
            assert pair[0][0].input_ids == pair[1][0].input_ids
        pending.append((pair, base + reply_text))
        if not delay:  # record now, or later (interleaved with other conversations' records)
            for (p, r), c in zip(pending.pop()[0], caches):
                c.record_sync(p, r, "w")
        convs[conv] = base + reply_text + "<|im_end|>\n<|im_start|>user\nnext<|im_end|>\n<|im_start|>assistant\n"
        texts.update([base + reply_text, convs[conv]])
    for pair, _ in pending:
        for (p, r), c in zip(pair, caches):
            c.record_sync(p, r, "w")
    for c in caches:
        c.tree.check()
    for text in sorted(texts):
        a, b = (c.retrieve_sync(text) for c in caches)
        if evicting:
            # After its own records were evicted, a text can be matched against a sibling's shorter reply and get
            # that reply's EOS (the optional-span rule reads the text as that reply continued without writing its
            # EOS): the EOS count may then differ, every other character must be the text's.
            for got in (a, b):
                assert tok.decode(got["tokens"]).replace("<|im_end|>", "") == text.replace("<|im_end|>", ""), text
        else:
            assert a == b, text
        for c in caches:  # whole texts, texts ending inside or right before an optional EOS, and a divergence
            for q in (text, text + "<|im_", text + "<|im_end|>", text + "<|im_end|>\n", text[:-3], text + "x"):
                assert_walks_agree(c.tree, q)


# --- per-token work avoided on the record path ------------------------------------------------------

_LP = st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False, width=32), st.integers(-5, 0))


@settings(max_examples=200, deadline=None)
@given(triples=st.one_of(st.none(), st.lists(st.tuples(_LP, st.integers(0, 151000), st.none()).map(list),
                                             max_size=20)),
       output_ids=st.one_of(st.none(), st.lists(st.integers(0, 151000), max_size=20)),
       version=st.one_of(st.none(), st.sampled_from(["v1", "7"]), st.integers(0, 3)),
       spans=st.one_of(st.none(), st.lists(st.fixed_dictionaries({"start": st.integers(-2, 25),
                                                                  "end": st.integers(-2, 25),
                                                                  "version": st.sampled_from(["a", "b", 3])}),
                                           max_size=4)))
def test_fast_reply_readers_equal_the_sglang_helpers(triples, output_ids, version, spans):
    from slime_router_core.sglang import output_ids_and_logprobs, weight_version_spans
    from slime_router_plugins.radix_tree.cache import _output_ids_and_logprobs, _version_runs

    meta: dict = {}
    if triples is not None:
        meta["output_token_logprobs"] = triples
    if version is not None:
        meta["weight_version"] = version
    if spans is not None:
        meta["weight_versions"] = spans
    obj = {"text": "x", "meta_info": meta}
    if output_ids is not None:
        obj["output_ids"] = output_ids
    ids, lps = output_ids_and_logprobs(obj)
    f_ids, f_lps = _output_ids_and_logprobs(obj, meta)
    assert f_ids == ids and all(type(x) is int for x in f_ids)
    assert [None if x != x else float(x) for x in f_lps] == lps  # NaN stands for unknown
    per = weight_version_spans(obj, len(ids))
    first, runs = _version_runs(obj, meta, len(ids))
    assert [v for cnt, v, m in runs for _ in range(cnt)] == per and all(m == 1 for _, _, m in runs)
    assert first == (per[0] if per else str(meta.get("weight_version", "default")))


def test_insert_raw_runs_equal_per_token_insert():
    a, b = StringRadixTrie(max_tokens=1000), StringRadixTrie(max_tokens=1000)
    text, ids, ends = "ab cd ef", [1, 2, 3, 4], [2, 5, 6, 8]
    a.insert(text, ids, ends, [None, -0.5, -0.25, None], [0, 1, 1, 0], ["x", "y", "y", "x"], markers=[(6, " e")])
    nan = float("nan")
    widths = [2, 3, 1, 2]
    assert b.insert_raw(None, text, ids, widths, [nan, -0.5, -0.25, nan], (), [(1, "x", 0), (2, "y", 1), (1, "x", 0),
                                                                               (0, "z", 1)], [(6, " e")], None)
    for q in (text, "ab cd f", "ab cd"):
        ma, mb = a.match(q), b.match(q)
        assert (ma.ids, ma.loss_mask, ma.versions, ma.ends, ma.markers) == (mb.ids, mb.loss_mask, mb.versions, mb.ends,
                                                                           mb.markers)
        assert [x if x == x else None for x in ma.raw_logp] == [x if x == x else None for x in mb.raw_logp]
    assert a.vtable == b.vtable == ["x", "y"]  # a run of 0 tokens observes no version
    with pytest.raises(ValueError):
        b.insert_raw(None, "abc", [1, 2], [2, 1], [nan, nan], (), [(1, "x", 0)], (), None)  # runs cover 1 of 2
    with pytest.raises(ValueError):
        b.insert_raw(None, "abc", [1, 2], [4, -1], [nan, nan], (), [(2, "x", 0)], (), None)  # a negative width
    with pytest.raises(ValueError):
        b.insert_raw(None, "abc", [1, 2], [1, 1], [nan, nan], (), [(2, "x", 0)], (), None)  # does not cover the text
    a.check()
    b.check()


def test_record_honours_weight_version_spans_and_logprob_ids(tok):
    cache = TrajectoryCache(tok)
    p = cache.prepare_sync("Q:")
    out = tok.encode(" one two three", add_special_tokens=False) + [EOS]
    r = {"text": " one two three", "output_ids": [0] * 3,  # logprob ids win over (SGLang #10896) output_ids
         "meta_info": {"finish_reason": {"type": "stop", "matched": EOS}, "weight_version": "v2",
                       "weight_versions": [{"start": 0, "end": 2, "version": "v1"}],
                       "output_token_logprobs": [[-0.5, t, None] for t in out]}}
    asyncio.run(cache.record(p, r, "w"))
    got = cache.retrieve_sync("Q: one two three")
    assert got["tokens"] == p.input_ids + out
    assert got["weight_versions"] == ["v1"] * len(p.input_ids) + ["v1", "v1"] + ["v2"] * (len(out) - 2)
    assert got["rollout_logp"] == [0.0] * len(p.input_ids) + [-0.5] * len(out)
    assert got["loss_mask"] == [0] * len(p.input_ids) + [1] * len(out)


def test_leaves_grow_to_a_quarter_of_the_bound_so_eviction_keeps_a_long_trajectorys_prefix(tok):
    cache = TrajectoryCache(tok, max_size=400)
    prompt = "<|im_start|>user\nstart<|im_end|>\n<|im_start|>assistant\n"
    for i in range(30):  # ~30 tokens a turn: the trajectory outgrows the bound
        p, r = _turn(cache, tok, prompt, f" reply number {i}, with a few more words to make it longer.")
        cache.record_sync(p, r, "w")
        prompt += r["text"] + f"<|im_end|>\n<|im_start|>user\nquestion {i} and some more text<|im_end|>\n" \
                              f"<|im_start|>assistant\n"
        cache.tree.check()
    assert all(len(n.ids) <= 100 for n in cache.tree._iter_nodes())  # no leaf holds more than a quarter
    assert cache.tree.size <= 400 and cache.tree.evictions > 0
    got = cache.retrieve_sync(prompt)
    assert got["exact_tokens"] > 0  # the newest turns were evicted, not the whole trajectory
    assert got["tokens"][:got["exact_tokens"]] == p.input_ids[:got["exact_tokens"]]


def test_a_token_holding_a_space_and_half_an_emoji_is_no_place_to_cut(tok):
    """Byte-level BPE merges " " with the first bytes of "🤖": a text that shares only the space with a recorded
    reply must not reuse that token (it would decode as " \\ufffd")."""
    cache = TrajectoryCache(tok, max_size=10_000)
    base = "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"
    p, r = _turn(cache, tok, base, " 🤖!")
    cache.record_sync(p, r, "w")
    ids = tok.encode(" 🤖!", add_special_tokens=False)
    assert tok.decode(ids[:1]) != " "  # the premise: the first token holds the space and bytes of the emoji
    pieces = cache.detok.pieces(ids)
    assert pieces[0] == "" and "".join(pieces) == " 🤖!"
    for text in (base + " ok", base + " ok<|im_end|>\n<|im_start|>user\nnext"):
        prepared = cache.prepare_sync(text)
        assert tok.decode(prepared.input_ids) == text
        assert tok.decode(cache.retrieve_sync(text)["tokens"]) == text


_PIECES = st.sampled_from(list(" ab\n你好🤖!é1") + ["  ", "e\u0301", "👍🏽", "\u200d", "x", "<think>", "</think>",
                                                   "<tool_call>", "\r\n", "'s", "12", " 🤖", " 你", " ok"])
_SNIPPET = st.lists(_PIECES, min_size=1, max_size=6).map("".join)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(script=st.lists(st.tuples(st.integers(0, 2), _SNIPPET, st.booleans(), _SNIPPET,
                                 st.sampled_from(["stop", "length", "cut"])), min_size=1, max_size=10),
       max_size=st.sampled_from([40, 100_000]))
def test_property_prompts_and_retrievals_spell_the_text(tok, script, max_size):
    """Conversations with CJK, emoji (multi-token characters), non-NFC text, special tokens, stop / length
    finishes (a length cut may end inside a character), records of other conversations delayed, a tight
    bound: the ids sent upstream decode to the prompt text and retrieval decodes to the trajectory text (NFC, as
    the tokenizer normalizes; under eviction up to where EOS ids stand, see the incremental test above). A
    conversation's next turn comes after its previous record, as through the router."""
    import unicodedata

    def same(ids: list[int], text: str) -> bool:
        a, b = (unicodedata.normalize("NFC", x) for x in (tok.decode(ids), text))
        if max_size < 1000:
            a, b = a.replace("<|im_end|>", ""), b.replace("<|im_end|>", "")
        return a == b or a == b + ("" if max_size < 1000 else "<|im_end|>")

    cache = TrajectoryCache(tok, max_size=max_size, gc_k=5)
    convs = ["<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"] * 2 + ["Q:"]
    pending: list = []
    texts: list[str] = []
    for conv, reply_text, delay, user, finish in script:
        for item in [x for x in pending if x[2] == conv]:
            cache.record_sync(item[0], item[1], "w")
            pending.remove(item)
        base = convs[conv]
        p, r = _turn(cache, tok, base, reply_text)
        assert same(p.input_ids, base), (base, tok.decode(p.input_ids))
        ids = r["output_ids"][:-1]
        if finish != "stop":  # a length cutoff: no EOS; "cut" also drops the last token (maybe inside a character)
            ids = ids[:-1] if finish == "cut" and len(ids) > 1 else ids
            r["output_ids"] = ids
            r["meta_info"]["finish_reason"] = {"type": "length", "length": len(ids)}
            r["meta_info"]["output_token_logprobs"] = r["meta_info"]["output_token_logprobs"][:len(ids)]
        r["text"] = tok.decode(ids, skip_special_tokens=True)  # what a worker returns: the decoding of its ids
        pending.append((p, r, conv))
        if not delay:
            item = pending.pop()
            cache.record_sync(item[0], item[1], "w")
        convs[conv] = base + r["text"] + "<|im_end|>\n<|im_start|>user\n" + user + "<|im_end|>\n<|im_start|>assistant\n"
        texts += [base + r["text"], convs[conv]]
    for item in pending:
        cache.record_sync(item[0], item[1], "w")
    cache.tree.check()
    for text in texts:
        assert same(cache.retrieve_sync(text)["tokens"], text), text
