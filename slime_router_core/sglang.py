"""Reading SGLang /generate replies the same way everywhere.

SGLang has three streaming behaviours (text / ids / logprobs each cumulative or delta depending on
the version and a server flag) and a few reply quirks; these helpers hide them.
"""

from __future__ import annotations

from typing import Any

from .speedups import ids_problem


def output_ids_and_logprobs(obj: dict[str, Any]) -> tuple[list[int], list[float | None]]:
    """The generated ids and their logprobs of one reply object.

    ``meta_info.output_token_logprobs`` is preferred: 0.5.1–0.5.4 could prefix ``output_ids`` with
    prompt tokens (SGLang #10896), and 0.4.x has no ``output_ids`` at all.
    """
    meta = obj.get("meta_info") or {}
    triples = meta.get("output_token_logprobs")
    if triples:
        return [int(t[1]) for t in triples], [None if t[0] is None else float(t[0]) for t in triples]
    ids = [int(x) for x in obj.get("output_ids") or []]
    return ids, [None] * len(ids)


def weight_version_spans(obj: dict[str, Any], n_tokens: int) -> list[str]:
    """Per generated token, the weight version that produced it (always strings)."""
    meta = obj.get("meta_info") or {}
    default = str(meta.get("weight_version", "default"))
    out = [default] * n_tokens
    for span in meta.get("weight_versions") or []:
        try:
            start, end, version = int(span["start"]), int(span["end"]), str(span["version"])
        except (KeyError, TypeError, ValueError):
            continue
        for i in range(max(0, start), min(n_tokens, end)):
            out[i] = version
    return out


def split_by_index(chunks: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    """Group the interleaved chunks of a batch (or n > 1) stream by their ``index``."""
    groups: dict[int, list[dict[str, Any]]] = {}
    for c in chunks:
        groups.setdefault(int(c.get("index", 0) or 0), []).append(c)
    return groups


def _is_cumulative(seqs: list[list[Any]], total: int | None) -> bool:
    """Are these per-chunk lists cumulative (each a prefix of the next) rather than deltas?"""
    seqs = [s for s in seqs if s is not None]
    if not seqs:
        return True
    if total is not None:
        last = len(seqs[-1])
        if last == total and sum(len(s) for s in seqs) != total:
            return True
        if sum(len(s) for s in seqs) == total and last != total:
            return False
    return all(len(b) >= len(a) and b[: len(a)] == a for a, b in zip(seqs, seqs[1:]))


def _text_cumulative(texts: list[str]) -> bool:
    grew = False
    for a, b in zip(texts, texts[1:]):
        if not b.startswith(a):
            return False
        if len(b) > len(a) > 0:
            grew = True
    return grew or len(texts) <= 1


def merge_stream(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """The non-streaming reply equivalent to the chunks of ONE SGLang stream (any variant)."""
    chunks = [c for c in chunks if isinstance(c, dict) and "error" not in c]
    if not chunks:
        return {"text": "", "output_ids": [], "meta_info": {}}
    last = chunks[-1]
    meta = dict(last.get("meta_info") or {})
    total = meta.get("completion_tokens")
    total = int(total) if isinstance(total, int) else None

    id_lists: list[Any] = [c.get("output_ids") for c in chunks if c.get("output_ids") is not None]
    ids_cum = _is_cumulative(id_lists, total)
    output_ids = list(id_lists[-1]) if ids_cum and id_lists else [x for s in id_lists for x in s]

    lp_lists: list[Any] = [(c.get("meta_info") or {}).get("output_token_logprobs") for c in chunks]
    lp_lists = [x for x in lp_lists if x is not None]
    lps_cum: bool | None = None
    if lp_lists:
        lps_cum = _is_cumulative(lp_lists, total)
        meta["output_token_logprobs"] = list(lp_lists[-1]) if lps_cum else [t for s in lp_lists for t in s]
    top_lists: list[Any] = [(c.get("meta_info") or {}).get("output_top_logprobs") for c in chunks]
    top_lists = [x for x in top_lists if x is not None]
    if top_lists:
        top_cum = _is_cumulative(top_lists, total)
        meta["output_top_logprobs"] = list(top_lists[-1]) if top_cum else [t for s in top_lists for t in s]

    texts = [c.get("text") or "" for c in chunks]
    if ids_cum and id_lists:
        text_cum = True  # 0.5.6+: cumulative ids come with cumulative text
    elif lps_cum is not None and len(lp_lists) > 1:
        text_cum = lps_cum  # legacy: cumulative logprobs and text; incremental: both deltas
    else:
        text_cum = _text_cumulative(texts)
    text = texts[-1] if text_cum else "".join(texts)

    out: dict[str, Any] = {"text": text, "output_ids": output_ids, "meta_info": meta}
    if "index" in last:
        out["index"] = last["index"]
    return out


def reply_problem(obj: Any, vocab_size: int | None = None) -> str | None:
    """What makes a /generate reply (one object, or a batch list) unusable, or None: not a JSON object, an
    ``error`` instead of a generation, output ids that disagree with their logprobs, ids outside the vocabulary.

    ``output_ids`` may carry prompt tokens before the generated ones (SGLang 0.5.1-0.5.4, #10896): it must *end*
    with the ids of ``output_token_logprobs``.
    """
    for k, one in enumerate(obj if isinstance(obj, list) and obj else [obj]):
        problem = _sequence_problem(one, f"reply[{k}]" if isinstance(obj, list) else "the reply", vocab_size)
        if problem is not None:
            return problem
    return None


def chunk_problem(chunk: Any, vocab_size: int | None = None) -> str | None:
    """What makes one chunk of a /generate stream unusable, or None: the checks of ``reply_problem``, for the
    chunk on its own (a stream's chunks carry cumulative or delta lists, see ``merge_stream``).

    Cumulative (0.5.10+) and incremental chunks carry as many ids as logprobs, like a reply. Legacy chunks
    (0.5.0-0.5.5) carry the new ids only with *all* the logprobs so far: there ``output_token_logprobs`` must end
    with ``output_ids``.
    """
    return _sequence_problem(chunk, "the chunk", vocab_size, stream=True)


def _sequence_problem(one: Any, where: str, vocab_size: int | None, stream: bool = False) -> str | None:
    """The checks of ``reply_problem`` / ``chunk_problem`` on one sequence's object."""
    if not isinstance(one, dict):
        return f"{where} is not a JSON object"
    if "error" in one and "text" not in one and "output_ids" not in one:
        err = one["error"]
        return f"{where} is an error: {err.get('message', err) if isinstance(err, dict) else err}"
    meta = one.get("meta_info")
    if meta is not None and not isinstance(meta, dict):
        return f"{where}: meta_info is not an object"
    ids = one.get("output_ids")
    triples = (meta or {}).get("output_token_logprobs")
    found = ids_problem(ids, triples, vocab_size, stream)  # one pass over the tokens (speedups.py)
    if found is None:
        return None
    code, bad = found
    if code == 1:
        return f"{where}: output_ids is not a list of integers"
    if code == 2:
        return f"{where}: output_token_logprobs is not a list of [logprob, token id, ...] entries"
    if code == 3:
        return (f"{where}: output_ids ({len(ids or ())} tokens) and output_token_logprobs ({len(triples or ())} "
                f"entries) disagree")
    return f"{where}: token id {bad} is outside the vocabulary (0 to {vocab_size - 1 if vocab_size else -1})"
