"""Branch families: sibling trajectories from one prompt (GRPO samples, retries, a weight update in between) that
generate the same first tokens with different logprobs / weight versions each retrieve their own values, while a
prefix whose values agree is still stored once (issue 12, section 2)."""

from __future__ import annotations

from array import array
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from slime_router_core.tokenizers import BUILTIN_CHECKPOINT, load_tokenizer
from slime_router_plugins.radix_tree import StringRadixTrie, TrajectoryCache

EOS = 151645
PROMPT = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nSay something.<|im_end|>\n<|im_start|>assistant\n"


def f32(x: float) -> float:
    """``x`` as the trie stores it (float32)."""
    return array("f", [x])[0]


# --- the trie ------------------------------------------------------------------------------------------


def _sibling(t: StringRadixTrie, gen: str, gen_ids: list[int], lps: list[float], version: str) -> None:
    """Prompt "Q:" (ids 1, 2; mask 0) + generated words (mask 1)."""
    text = "Q:" + gen
    ends = [1, 2]
    for w in gen.split(" ")[1:]:
        ends.append(ends[-1] + 1 + len(w))
    t.insert(text, [1, 2] + gen_ids, ends, [None, None] + lps, [0, 0] + [1] * len(gen_ids), version)


def _assert_own(t: StringRadixTrie, gen: str, gen_ids: list[int], lps: list[float], version: str) -> None:
    m = t.match("Q:" + gen)
    assert m.ids == [1, 2] + gen_ids and m.query_pos == len("Q:" + gen)
    assert m.loss_mask == [0, 0] + [1] * len(gen_ids)
    assert m.logprobs[2:] == [f32(x) for x in lps]
    assert m.versions[2:] == [version] * len(gen_ids)


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_siblings_sharing_their_first_tokens_keep_their_own_logprobs_and_versions(order):
    """The issue's reproduction at trie level: the same prompt, the first 3 generated tokens equal, other logprobs
    and another weight version (a weight update between the two samples)."""
    sibs = [(" a b c d", [10, 11, 12, 13], [-0.1, -0.2, -0.3, -0.4], "v1"),
            (" a b c e", [10, 11, 12, 14], [-0.5, -0.6, -0.7, -0.8], "v2")]
    t = StringRadixTrie(1000)
    for i in order:
        _sibling(t, *sibs[i])
        t.check()
    for s in sibs:
        _assert_own(t, *s)
    assert t.size == 2 + 4 + 4  # the prompt once, each sibling its own generated tokens


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_a_sibling_whose_text_is_a_prefix_of_anothers_keeps_its_values(order):
    sibs = [(" a b", [10, 11], [-0.1, -0.2], "v1"), (" a b c", [10, 11, 12], [-0.5, -0.6, -0.7], "v2")]
    t = StringRadixTrie(1000)
    for i in order:
        _sibling(t, *sibs[i])
        t.check()
    for s in sibs:
        _assert_own(t, *s)


def test_equal_values_are_shared_and_a_later_difference_splits_there():
    t = StringRadixTrie(1000)
    _sibling(t, " a b c d", [10, 11, 12, 13], [-0.1, -0.2, -0.3, -0.4], "v1")
    _sibling(t, " a b c e", [10, 11, 12, 14], [-0.1, -0.2, -0.9, -0.8], "v1")  # agrees on " a b" only
    t.check()
    assert t.size == 2 + 2 + 2 + 2  # prompt and " a b" once, " c d" and " c e" each
    _assert_own(t, " a b c d", [10, 11, 12, 13], [-0.1, -0.2, -0.3, -0.4], "v1")
    _assert_own(t, " a b c e", [10, 11, 12, 14], [-0.1, -0.2, -0.9, -0.8], "v1")
    _sibling(t, " a b x", [10, 11, 15], [-0.1, -0.2, -0.3], "v2")  # same logprobs, another version
    t.check()
    assert t.size == 8 + 3
    _assert_own(t, " a b x", [10, 11, 15], [-0.1, -0.2, -0.3], "v2")
    _assert_own(t, " a b c d", [10, 11, 12, 13], [-0.1, -0.2, -0.3, -0.4], "v1")


def test_nan_logprobs_agree_and_logprobs_compare_as_stored():
    t = StringRadixTrie(1000)
    _sibling(t, " a b", [10, 11], [float("nan"), -0.1], "v1")
    _sibling(t, " a c", [10, 12], [float("nan"), f32(-0.1)], "v1")  # -0.1 and its float32 rounding: equal
    t.check()
    assert t.size == 2 + 1 + 2


def test_the_same_text_recorded_twice_the_latest_record_wins():
    """Text is the only key: two records of the very same text (a retry that produced the same reply) cannot both
    be kept; the latest one is retrieved, whole (never a mix of the two)."""
    t = StringRadixTrie(1000)
    _sibling(t, " a b", [10, 11], [-0.1, -0.2], "v1")
    _sibling(t, " a b", [10, 11], [-0.5, -0.6], "v2")
    t.check()
    _assert_own(t, " a b", [10, 11], [-0.5, -0.6], "v2")
    assert t.size == 4
    # ... also where the text ends at an inner node (the chain lives in a "" child)
    _sibling(t, " a b c", [10, 11, 12], [-0.5, -0.6, -0.7], "v2")
    _sibling(t, " a b", [10, 11], [-0.3, -0.4], "v3")
    t.check()
    _assert_own(t, " a b", [10, 11], [-0.3, -0.4], "v3")
    _assert_own(t, " a b c", [10, 11, 12], [-0.5, -0.6, -0.7], "v2")


def test_generated_and_prompt_records_of_the_same_tokens():
    """Mask 0 on either side agrees: a prompt record never hides generated tokens, and a generated record of tokens
    first recorded as prompt (its turn recorded after the next turn's prompt) upgrades them."""
    t = StringRadixTrie(1000)
    _sibling(t, " a b", [10, 11], [-0.1, -0.2], "v1")
    t.insert("Q: a b", [1, 2, 10, 11], [1, 2, 4, 6], None, [0, 0, 0, 0], "v9")  # a prompt record
    _assert_own(t, " a b", [10, 11], [-0.1, -0.2], "v1")
    t.insert("Q: x y", [1, 2, 20, 21], [1, 2, 4, 6], None, [0, 0, 0, 0], "v9")
    _sibling(t, " x y", [20, 21], [-0.1, -0.2], "v1")
    _assert_own(t, " x y", [20, 21], [-0.1, -0.2], "v1")
    # a chain in a "" child (the text ends at an inner node, its last token starts in the parent) keeps its
    # generated tokens too
    t.insert("R: ab cd", [3, 30, 31], [2, 5, 8], [None, -0.1, -0.2], [0, 1, 1], "v1")  # " ab" + " cd"
    t.insert("R: ab", [3, 32, 33], [2, 3, 5], [None, -0.3, -0.4], [0, 1, 1], "v2")  # " " + "ab"
    t.insert("R: ab", [3, 32, 33], [2, 3, 5], None, [0, 0, 0], "v3")
    t.check()
    m = t.match("R: ab")
    assert m.ids == [3, 32, 33] and m.loss_mask == [0, 1, 1] and m.versions[1:] == ["v2", "v2"]
    assert m.logprobs[1:] == [f32(-0.3), f32(-0.4)]


def test_a_leaf_extended_in_place_then_a_sibling_with_the_same_first_tokens():
    t = StringRadixTrie(1000)
    _sibling(t, " a b", [10, 11], [-0.1, -0.2], "v1")
    m = t.match("Q: a b c")
    assert m.anchor is not None
    assert t.insert_after(m.anchor, "Q: a b c", [12], [8], [None], [0], "v1")  # the leaf grows
    assert t.node_count == 1
    _sibling(t, " a b c d", [10, 11, 12, 13], [-0.5, -0.6, -0.7, -0.8], "v2")
    t.check()
    m = t.match("Q: a b c")
    assert m.ids == [1, 2, 10, 11, 12] and m.loss_mask == [0, 0, 1, 1, 0]
    assert m.logprobs[2:4] == [f32(-0.1), f32(-0.2)] and m.versions[2:4] == ["v1", "v1"]
    _assert_own(t, " a b", [10, 11], [-0.1, -0.2], "v1")
    _assert_own(t, " a b c d", [10, 11, 12, 13], [-0.5, -0.6, -0.7, -0.8], "v2")


# --- the cache with the real tokenizer -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(BUILTIN_CHECKPOINT)


def reply(tok, text: str, lps: list[float], version: str, spans: list[dict] | None = None,
          ids: list[int] | None = None) -> dict:
    """A finished SGLang reply: ``ids`` (default: ``text`` tokenized) + EOS; the text omits the EOS, as SGLang's."""
    ids = (tok.encode(text, add_special_tokens=False) if ids is None else list(ids)) + [EOS]
    assert len(lps) == len(ids)
    meta: dict[str, Any] = {"finish_reason": {"type": "stop", "matched": EOS}, "weight_version": version,
                            "output_token_logprobs": [[lp, t, None] for lp, t in zip(lps, ids)]}
    if spans:
        meta["weight_versions"] = spans
    return {"text": text, "output_ids": ids, "meta_info": meta}


def _check_generated(got: dict, start: int, ids: list[int], lps: list[float], versions: list[str]) -> None:
    n = len(ids)
    assert got["tokens"][start:start + n] == ids
    assert got["loss_mask"][start:start + n] == [1] * n
    assert got["rollout_logp"][start:start + n] == [f32(x) for x in lps]
    assert got["weight_versions"][start:start + n] == versions


@pytest.mark.parametrize("first", [0, 1])
def test_issue_reproduction_two_requests_same_prompt_same_first_tokens(tok, first):
    """Two /generate replies for one prompt whose first 4 generated tokens are equal but whose logprobs and weight
    versions differ: retrieving each gives its own values for every generated token."""
    cache = TrajectoryCache(tok, max_size=100_000, gc_k=100)
    texts = [" The answer is forty two.", " The answer is forty three."]
    n_out = [len(tok.encode(x, add_special_tokens=False)) + 1 for x in texts]
    assert tok.encode(texts[0], add_special_tokens=False)[:4] == tok.encode(texts[1], add_special_tokens=False)[:4]
    replies = [reply(tok, texts[0], [-0.01 * (i + 1) for i in range(n_out[0])], "step-1"),
               reply(tok, texts[1], [-0.5 - 0.01 * i for i in range(n_out[1])], "step-2")]
    prepared = [cache.prepare_sync(PROMPT), cache.prepare_sync(PROMPT)]  # concurrent samples
    for i in (first, 1 - first):
        cache.record_sync(prepared[i], replies[i], "w")
        cache.tree.check()
    plen = len(tok.encode(PROMPT, add_special_tokens=False))
    for i in (0, 1):
        r = replies[i]
        for q in (PROMPT + texts[i], PROMPT + texts[i] + "<|im_end|>"):
            got = cache.retrieve_sync(q, strict=True)
            assert got["tokens"] == prepared[i].input_ids + r["output_ids"] and got["fresh_tokens"] == 0
            assert got["loss_mask"] == [0] * plen + [1] * n_out[i]
            _check_generated(got, plen, r["output_ids"], [x[0] for x in r["meta_info"]["output_token_logprobs"]],
                             [r["meta_info"]["weight_version"]] * n_out[i])
    # the prompt is stored once, each reply's tokens once
    assert cache.tree.size == plen + sum(n_out)



def test_a_sibling_of_an_eos_only_reply_is_sent_its_prompt_only(tok):
    """A GRPO sample that answered nothing but EOS must not make the next samples' prompt ``prompt + EOS``: a
    prompt is the query's text (an optional span past its end is not taken); a retrieval still gets the EOS."""
    cache = TrajectoryCache(tok, max_size=100_000, gc_k=100)
    first = cache.prepare_sync(PROMPT)
    cache.record_sync(first, reply(tok, "", [-0.3], "v1"), "w")
    again = cache.prepare_sync(PROMPT)
    assert again.input_ids == first.input_ids and again.fresh_tokens == 0
    import asyncio
    assert asyncio.run(cache.prepare(PROMPT)).input_ids == first.input_ids
    got = cache.retrieve_sync(PROMPT, strict=True)
    assert got["tokens"] == first.input_ids + [EOS] and got["loss_mask"][-1] == 1
    # a longer prompt that continues after the omitted EOS still reads it as that reply's EOS
    cont = cache.prepare_sync(PROMPT + "\n<|im_start|>user")
    assert cont.input_ids[:len(first.input_ids) + 1] == first.input_ids + [EOS]

def test_shared_prefix_with_agreeing_values_is_stored_once(tok):
    """8 siblings that sampled the same first tokens with the same values (same weights, deterministic kernels)
    share them; 8 that did not each keep their own: the tree grows by exactly the non-shared tokens."""
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    plen = len(enc(PROMPT))
    head = " Sure, here is"
    k = len(enc(head))
    tails = [f" answer number {i}." for i in range(8)]
    for agree in (True, False):
        cache = TrajectoryCache(tok, max_size=100_000, gc_k=100)
        total = 0
        for i, tail in enumerate(tails):
            n = len(enc(head + tail)) + 1
            assert enc(head + tail)[:k] == enc(head)
            lps = [-0.1 * (j + 1) if (agree and j < k) else -0.001 * (i * 100 + j + 1) for j in range(n)]
            cache.record_sync(cache.prepare_sync(PROMPT), reply(tok, head + tail, lps, "v1" if agree else f"v{i}"), "w")
            total += n - (k if agree and i else 0)
            cache.tree.check()
            assert cache.tree.size == plen + total, (agree, i)
        for i, tail in enumerate(tails):
            got = cache.retrieve_sync(PROMPT + head + tail, strict=True)
            n = len(enc(head + tail)) + 1
            lps = [-0.1 * (j + 1) if (agree and j < k) else -0.001 * (i * 100 + j + 1) for j in range(n)]
            _check_generated(got, plen, enc(head + tail) + [EOS], lps, ["v1" if agree else f"v{i}"] * n)


# --- property: branch families ---------------------------------------------------------------------------

# Generated text is built from these pieces (one token each, " " and "你好" included): every piece but " " and
# "你好" starts with a space and holds no other, so different id sequences never spell the same text.
PIECES = [" the", " a", " cat", " dog", " run", " blue", " red", " sun", " ", "你好"]


@st.composite
def families(draw):
    k = draw(st.integers(2, 8))
    root = draw(st.lists(st.integers(0, len(PIECES) - 1), min_size=1, max_size=6))
    sibs = []
    for _ in range(k):
        shared = draw(st.integers(0, len(root)))
        # not empty: a reply that is only the EOS makes the prompt itself read as "prompt + optional EOS"
        tail = draw(st.lists(st.integers(0, len(PIECES) - 1), min_size=0 if shared else 1, max_size=3))
        sibs.append({
            "gen": root[:shared] + tail,
            "version": draw(st.sampled_from(["v1", "v2", "v3"])),
            "agree": draw(st.booleans()),  # logprobs a function of the position only: may agree with a sibling's
            "switch": draw(st.integers(0, 3)),  # > 0: the first tokens come from the previous weight version
            "cont": draw(st.one_of(st.none(), st.lists(st.integers(0, len(PIECES) - 1), max_size=4))),
        })
    assume(len({tuple(s["gen"]) for s in sibs}) == k)  # the same text twice: the latest record wins (tested above)
    labels = [i for i, s in enumerate(sibs) for _ in range(4 if s["cont"] is not None else 2)]
    order = draw(st.permutations(labels))  # the n-th occurrence of i is sibling i's n-th step
    return sibs, order


def _gen(tok, pieces: list[int], idx: int, turn: int, agree: bool, version: str, switch: int
         ) -> tuple[dict, list[int], list[float], list[str]]:
    text = "".join(PIECES[p] for p in pieces)
    ids = [tok.encode(PIECES[p], add_special_tokens=False)[-1] for p in pieces] + [EOS]
    n = len(ids)
    lps = [-(j + 1) / 64 if agree else -(j + 1) / 64 - (idx * 3 + turn + 1) / 4 for j in range(n)]
    old = {"v1": "v0", "v2": "v1", "v3": "v2"}[version]
    spans = [{"start": 0, "end": min(switch, n), "version": old}] if switch else None
    r = reply(tok, text, lps, version, spans, ids=ids[:-1])  # not necessarily how the text would be tokenized
    versions = [old if j < switch else version for j in range(n)]
    return r, ids, lps, versions


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fam=families())
def test_property_branch_families_each_retrieve_their_own_values(tok, fam):
    """K siblings (2..8) from one prompt with shared generated prefixes and distinct (or agreeing) logprobs and weight
    versions, recorded in random order, some continued by a next turn (prepared and recorded through the cache,
    interleaved with the other siblings' records): every trajectory retrieves exactly its ids, loss mask and, for
    every generated token, its own logprob and weight version; the tree's invariants hold after every step."""
    sibs, order = fam
    cache = TrajectoryCache(tok, max_size=1_000_000, gc_k=100)
    plen = len(tok.encode(PROMPT, add_special_tokens=False))
    step = [0] * len(sibs)
    state: list[dict] = [{} for _ in sibs]
    all_versions = {"v0", "v1", "v2", "v3"}
    for i in order:
        s, st_i = sibs[i], state[i]
        n = step[i]
        step[i] += 1
        if n == 0:
            st_i["p1"] = cache.prepare_sync(PROMPT)
            assert st_i["p1"].input_ids == tok.encode(PROMPT, add_special_tokens=False)
        elif n == 1:
            r, ids, lps, vs = _gen(tok, s["gen"], i, 0, s["agree"], s["version"], s["switch"])
            cache.record_sync(st_i["p1"], r, "w")
            st_i["t1"] = (PROMPT + r["text"], st_i["p1"].input_ids + ids, lps, vs)
        elif n == 2:
            text1 = st_i["t1"][0]
            st_i["prompt2"] = text1 + f"<|im_end|>\n<|im_start|>user\nmore {i}<|im_end|>\n<|im_start|>assistant\n"
            p2 = st_i["p2"] = cache.prepare_sync(st_i["prompt2"])
            assert p2.cached_tokens == len(st_i["t1"][1]) and p2.input_ids[:p2.cached_tokens] == st_i["t1"][1]
        else:
            r, ids, lps, vs = _gen(tok, s["cont"], i, 1, s["agree"], s["version"], 0)
            cache.record_sync(st_i["p2"], r, "w")
            st_i["t2"] = (st_i["prompt2"] + r["text"], st_i["p2"].input_ids + ids, lps, vs)
        cache.tree.check()

    for i, _s in enumerate(sibs):
        text1, ids1, lps1, vs1 = state[i]["t1"]
        n1 = len(ids1) - plen
        for q in (text1, text1 + "<|im_end|>"):
            got = cache.retrieve_sync(q, strict=True)
            assert got["tokens"] == ids1 and got["fresh_tokens"] == 0, (i, q)
            assert got["loss_mask"] == [0] * plen + [1] * n1
            _check_generated(got, plen, ids1[plen:], lps1, vs1)
            assert got["rollout_logp"][:plen] == [0.0] * plen and set(got["weight_versions"][:plen]) <= all_versions
        if "t2" in state[i]:
            text2, ids2, lps2, vs2 = state[i]["t2"]
            got = cache.retrieve_sync(text2 + "<|im_end|>", strict=True)
            assert got["tokens"] == ids2 and got["fresh_tokens"] == 0
            n2 = len(lps2)
            fresh = len(ids2) - len(ids1) - n2
            assert got["loss_mask"] == [0] * plen + [1] * n1 + [0] * fresh + [1] * n2
            _check_generated(got, plen, ids1[plen:], lps1, vs1)  # the first turn, inside the second
            _check_generated(got, len(ids2) - n2, ids2[-n2:], lps2, vs2)
