"""The C module slime_router_core._speedups against its pure-Python references (slime_router_core/speedups.py):
the same answer on generated replies, well-formed and broken, and the module is built by the install."""

from __future__ import annotations

import math
import os
import sys
from array import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slime_router_core import speedups

if speedups.COMPILED:
    from slime_router_core import _speedups as C
else:
    C = None  # test_the_install_built_the_c_module says why

# ids as a worker sends them, and the values a broken or hostile worker could put in their place
ID = st.one_of(st.integers(-3, 200), st.integers(-2**70, 2**70), st.booleans(), st.floats(allow_nan=False),
               st.none(), st.text(max_size=2))
GOOD_ID = st.integers(0, 200)
LOGPROB = st.one_of(st.floats(allow_nan=True), st.integers(-5, 0), st.none(), st.text(max_size=2), st.booleans())
ENTRY = st.one_of(
    st.lists(st.one_of(LOGPROB, ID), min_size=0, max_size=4),  # any shape
    st.tuples(LOGPROB, GOOD_ID, st.none()).map(list),  # the usual [logprob, id, None]
    st.tuples(LOGPROB, GOOD_ID, st.none()),  # a tuple: not a JSON array
    ID,
)


def _same(a, b) -> bool:
    """Equal, with NaN equal to NaN and 1 != 1.0 != True (the types must match too)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def test_the_install_built_the_c_module() -> None:
    """pip install compiles _speedups.c (optional in the build: an install without a compiler still works, slower);
    CI's machines have one, so a missing module here is a broken build, not a choice."""
    if os.environ.get("SLIME_ROUTER_ALLOW_PURE") == "1":
        pytest.skip("SLIME_ROUTER_ALLOW_PURE=1")
    assert speedups.COMPILED, "slime_router_core._speedups was not built: reinstall with a C compiler (gcc) present"


@settings(max_examples=600, deadline=None)
@given(ids=st.one_of(st.none(), st.lists(st.one_of(GOOD_ID, GOOD_ID, GOOD_ID, ID), max_size=8), ID),
       triples=st.one_of(st.none(), st.lists(ENTRY, max_size=8), st.just([]), ID),
       vocab=st.one_of(st.none(), st.integers(0, 300)), stream=st.booleans(), tail=st.booleans())
def test_ids_problem_matches_the_reference(ids, triples, vocab, stream, tail) -> None:
    if tail and isinstance(ids, list) and isinstance(triples, list):  # make the agreeing case common
        triples = [[-0.5, t, None] for t in ids[len(ids) // 2:]] if all(type(t) is int for t in ids) else triples
    want = speedups.ids_problem_py(ids, triples, vocab, stream)
    assert _same(speedups.ids_problem(ids, triples, vocab, stream), want)
    if C is not None:
        assert _same(C.ids_problem(ids, triples, vocab, stream), want)


@settings(max_examples=600, deadline=None)
@given(triples=st.one_of(st.lists(ENTRY, max_size=8), st.lists(st.tuples(LOGPROB, GOOD_ID, st.none()).map(list)),
                         ID))
def test_split_logprobs_matches_the_reference(triples) -> None:
    want = speedups.split_logprobs_py(triples)
    assert _same(speedups.split_logprobs(triples), want)
    if C is not None:
        assert _same(C.split_logprobs(triples), want)


def test_the_usual_reply() -> None:
    triples = [[-0.25, 7, None], [None, 9, "x"], [0, 11]]
    for split in (speedups.split_logprobs_py, speedups.split_logprobs):
        ids, lps = split(triples)
        assert ids == [7, 9, 11] and lps[0] == -0.25 and math.isnan(lps[1]) and lps[2] == 0
    for check in (speedups.ids_problem_py, speedups.ids_problem):
        assert check([1, 7, 9, 11], triples, 12, False) is None
        assert check([1, 7, 9, 11], triples, 11, False) == (4, 11)
        assert check([9, 11], triples, None, False) == (3, None)
        assert check([9, 11], triples, None, True) is None  # a legacy stream chunk: new ids, all logprobs
        assert check([7, 9], triples, None, True) == (3, None)
        assert check([7, True], None, None, False) == (1, None)
        assert check(None, [[0.0, 1.0]], None, False) == (2, None)


# a byte-level vocabulary with the hard cases: whole characters, halves of 2-, 3- and 4-byte characters, bytes that
# are never valid UTF-8, a token holding the end of one character and the start of the next, the empty token
VOCAB = [b"a", b" the", b"\n", "你".encode(), "好".encode()[:2], "好".encode()[2:], "🤖".encode()[:1],
         "🤖".encode()[1:3], "🤖".encode()[3:], b" \xf0\x9f", b"\xa4\x96!", b"\x80", b"\xff", b"\xc3", b"\xa9",
         b"", "é".encode(), b"<|im_end|>"]


def _pieces_both(ids: list[int]):
    results = []
    for fn in ([speedups.token_pieces_py] + ([C.token_pieces] if C is not None else [])):
        piece_of: dict[int, object] = {}

        def whole(t: int, piece_of=piece_of) -> object:
            try:
                p: object = VOCAB[t].decode("utf-8")
            except UnicodeDecodeError:
                p = False
            piece_of[t] = p
            return p

        results.append(fn(list(ids), piece_of, whole, VOCAB.__getitem__))
    return results


@settings(max_examples=1500, deadline=None)
@given(ids=st.lists(st.integers(0, len(VOCAB) - 1), max_size=12))
def test_token_pieces_matches_the_reference(ids) -> None:
    want, *others = _pieces_both(ids)
    pieces, text, widths = want
    assert text == b"".join(VOCAB[t] for t in ids).decode("utf-8", "replace")  # the exact decoding
    assert widths == [len(p) for p in pieces] and "".join(pieces) == text
    for got in others:
        assert got == want


def test_token_pieces_defers_a_split_character() -> None:
    pieces, text, _ = _pieces_both([1, 9, 10, 0])[-1]  # " the", b" \xf0\x9f", b"\xa4\x96!", "a"
    assert pieces == [" the", "", " 🤖!", "a"] and text == " the 🤖!a"
    pieces, _, _ = _pieces_both([0, 6])[-1]  # ends inside a character: the last token gets it, replaced
    assert pieces == ["a", "\ufffd"]


# every typecode's limits and one past them
BOUNDS = [0, -1, 255, 256, 65_535, 65_536, 2**31 - 1, 2**31, -2**31, -2**31 - 1, 2**32 - 1, 2**32, 2**63,
          3.4e38, 3.5e38]


def _pack_outcome(fn, values, typecode):
    try:
        return fn(values, typecode)
    except (TypeError, OverflowError) as e:
        return type(e)


@settings(max_examples=1500, deadline=None)
@given(values=st.lists(st.one_of(st.sampled_from(BOUNDS), st.integers(-3, 300), st.integers(-300, 70_000),
                                 st.integers(-2**40, 2**40), st.integers(-2**70, 2**70),
                                 st.floats(), st.booleans(), st.none(), st.text(max_size=1)), max_size=6),
       typecode=st.sampled_from(["i", "f", "B", "H", "I"]), as_tuple=st.booleans())
def test_pack_matches_array(values, typecode, as_tuple) -> None:
    """array(typecode, pack(values, typecode)) is array(typecode, values), with array's errors."""
    seq = tuple(values) if as_tuple else values
    want = _pack_outcome(speedups.pack_py, seq, typecode)
    for fn in [speedups.pack] + ([C.pack] if C is not None else []):
        got = _pack_outcome(fn, seq, typecode)
        assert got == want, (fn, got, want)
    if isinstance(want, bytes):
        got_array, want_array = speedups.typed_array(typecode, seq), array(typecode, values)
        assert got_array.tobytes() == want_array.tobytes()
        # the same allocation: the trie keeps these arrays for its lifetime (bytes per cached token)
        assert sys.getsizeof(got_array) == sys.getsizeof(want_array)
