"""Per-token work on a /generate reply in one pass: the C module ``_speedups`` when it was built, else the
pure-Python references below (the same results; ``tests/test_speedups.py`` checks both on generated inputs).

``pip install`` compiles ``_speedups.c`` with the machine's C compiler (setuptools; nothing is downloaded); where
that fails the install still succeeds and these references are used (``COMPILED`` says which; ``serve`` warns
when the C module is missing).
"""

from __future__ import annotations

import codecs
from array import array
from collections.abc import Callable
from typing import Any

NAN = float("nan")


def ids_problem_py(ids: Any, triples: Any, vocab_size: int | None, stream: bool) -> tuple[int, Any] | None:
    """None, or (code, detail) for what is wrong with a reply's ``output_ids`` / ``output_token_logprobs``:
    1 ids not a list of ints, 2 logprob entries not ``[logprob, id, ...]`` lists, 3 the ids disagree (``ids``
    must end with the logprob ids; in a stream chunk either may end with the other), 4 an id outside
    ``[0, vocab_size)`` (detail: that id, the first in ``ids``, else in the logprob ids)."""
    if ids is not None and not (isinstance(ids, list) and all(type(t) is int for t in ids)):
        return 1, None
    lp_ids: list[int] = []
    if triples is not None:
        if not isinstance(triples, list) or not all(isinstance(t, list) and len(t) >= 2 and type(t[1]) is int
                                                    for t in triples):
            return 2, None
        lp_ids = [t[1] for t in triples]
        if ids is not None and not (_ends_with(ids, lp_ids) or (stream and _ends_with(lp_ids, ids))):
            return 3, None
    if vocab_size is not None:
        for seq in (ids, lp_ids):
            if seq and (min(seq) < 0 or max(seq) >= vocab_size):  # min/max: C loops
                return 4, next(t for t in seq if not 0 <= t < vocab_size)
    return None


def _ends_with(seq: list[int], tail: list[int]) -> bool:
    return len(tail) <= len(seq) and (not tail or seq[len(seq) - len(tail):] == tail)


def split_logprobs_py(triples: Any) -> tuple[list[int], list[Any]] | None:
    """``[[logprob, id, ...], ...]`` -> (ids, logprobs), None logprobs as NaN; None unless every entry is a list of
    at least 2 items with an int id and a logprob that is a float, an int or None (the caller's general path
    handles the rest)."""
    if type(triples) is not list and not isinstance(triples, list):
        return None
    ids: list[int] = []
    lps: list[Any] = []
    for t in triples:
        if not isinstance(t, list) or len(t) < 2 or type(t[1]) is not int:
            return None
        lp = t[0]
        if lp is None:
            lp = NAN
        elif type(lp) is not float and type(lp) is not int:
            return None
        ids.append(t[1])
        lps.append(lp)
    return ids, lps


def token_pieces_py(ids: list[Any], piece_of: dict[Any, Any], whole_piece: Callable[[Any], Any],
                    token_bytes: Callable[[Any], bytes]) -> tuple[list[str], str, list[int]]:
    """(pieces, their concatenation, their lengths): the text of each token of a byte-level tokenizer, such that
    the pieces concatenate to the exact decoding. ``piece_of`` maps an id to its text when its bytes are whole
    UTF-8 characters, else to False (a miss is filled by ``whole_piece(id)``). From a token that is not whole,
    the bytes are decoded incrementally (UTF-8, "replace") until no character is pending: a token after which
    bytes of a character are still pending is no place to cut the text (b" \\xf0\\x9f" holds a whole " " but
    also half an emoji), so it gets "" and its text goes to the token that completes the character; every token
    end with a width is then a character boundary of the byte stream too."""
    out: list[Any] = [piece_of[t] if t in piece_of else whole_piece(t) for t in ids]
    n, i = len(out), 0
    while i < n:
        try:
            i = out.index(False, i)  # the next token that is not whole characters alone
        except ValueError:
            break
        dec = codecs.getincrementaldecoder("utf-8")("replace")
        carry = ""
        while i < n:
            carry += dec.decode(token_bytes(ids[i]))
            if dec.getstate()[0]:
                out[i] = ""
                i += 1
                continue
            out[i], carry = carry, ""
            i += 1
            break
        else:
            out[-1] = carry + dec.decode(b"", final=True)
    return out, "".join(out), list(map(len, out))


def pack_py(values: list[Any] | tuple[Any, ...], typecode: str) -> bytes:
    """The machine representation of ``array(typecode, values)`` ("i", "f", "B", "H" or "I"): ``array(typecode,
    pack(values, typecode))`` equals ``array(typecode, values)``, with its errors (OverflowError out of range,
    TypeError for a value that is not a number of the kind)."""
    if typecode not in ("i", "f", "B", "H", "I"):
        raise ValueError(f"pack: unsupported typecode {typecode}")
    return array(typecode, values).tobytes()


def typed_array(typecode: str, values: Any) -> array:
    """``array(typecode, values)``, through ``pack`` for a list or tuple (array's own conversion parses each item's
    type from a format string: ~3x slower). Allocated to its exact size like ``array(typecode, a_list)`` (one built
    from bytes keeps ~6 % of slack, which the trie's nodes would keep for their lifetime)."""
    if type(values) is list or type(values) is tuple:
        return array(typecode, pack(values, typecode))[:]
    return array(typecode, values)


try:
    from ._speedups import ids_problem, pack, split_logprobs, token_pieces

    COMPILED = True
except ImportError:  # not built (no C compiler at install time): the references
    ids_problem = ids_problem_py
    split_logprobs = split_logprobs_py
    token_pieces = token_pieces_py
    pack = pack_py
    COMPILED = False
