"""Turning SGLang stream chunks into OpenAI deltas.

- ``ChoiceAccumulator``: merges one sequence's chunks into token ids / logprobs whatever the variant
  (cumulative 0.5.10+, incremental ``--incremental-streaming-output``, legacy 0.5.0–0.5.5 with delta ids):
  ``meta_info.completion_tokens`` is always cumulative, so a list whose length equals it is cumulative.
- ``IncrementalDecoder``: text deltas computed from the merged ids (never from the worker's text field).
  A decoded tail ending in U+FFFD (an incomplete UTF-8 character) waits for the next token; the last
  ``holdback`` characters are held while stop strings may still be trimmed; the worker's final text
  (merged with ``merge_stream``) is the truth for the remainder.

The SSE framing (``data: <json>\\n\\n``, ``[DONE]``) is the core's: ``slime_router_core.sse``.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("slime_router.openai_compat")


def _merge_list(prev: list, new: list | None, total: int | None) -> list:
    """``prev`` + the chunk's list ``new`` (which may be cumulative or a delta)."""
    if new is None:
        return prev
    if total is not None:
        if len(prev) + len(new) == total:  # a delta (or the first chunk)
            return prev + list(new)
        if len(new) == total:  # cumulative
            return list(new)
    if prev and len(new) >= len(prev) and new[: len(prev)] == prev:
        return list(new)
    return prev + list(new)


class ChoiceAccumulator:
    def __init__(self) -> None:
        self.ids: list[int] = []
        self.lps: list[float | None] = []
        self.tops: list[Any] = []
        self.chunks: list[dict] = []
        self.meta: dict[str, Any] = {}
        self.finish_reason: dict | None = None

    def update(self, obj: dict) -> tuple[int, int]:
        """Apply one chunk; returns (old number of tokens, new number of tokens)."""
        self.chunks.append(obj)
        meta = obj.get("meta_info") or {}
        self.meta = meta
        total = meta.get("completion_tokens")
        total = total if isinstance(total, int) and not isinstance(total, bool) else None
        before = len(self.ids)
        triples = meta.get("output_token_logprobs")
        if triples is not None:
            merged = _merge_list([[lp, tid] for lp, tid in zip(self.lps, self.ids)],
                                 [[t[0], t[1]] for t in triples], total)
            self.ids = [int(t[1]) for t in merged]
            self.lps = [None if t[0] is None else float(t[0]) for t in merged]
        elif obj.get("output_ids") is not None:
            self.ids = [int(x) for x in _merge_list(self.ids, obj["output_ids"], total)]
            self.lps = (self.lps + [None] * len(self.ids))[: len(self.ids)]
        tops = meta.get("output_top_logprobs")
        if tops is not None:
            self.tops = _merge_list(self.tops, tops, total)
        if meta.get("finish_reason") is not None:
            self.finish_reason = meta["finish_reason"]
        return before, len(self.ids)


class IncrementalDecoder:
    def __init__(self, tokenizer: Any, holdback: int = 0) -> None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            self._decode = lambda ids: backend.decode(ids, skip_special_tokens=True)
        else:  # pragma: no cover - slow tokenizers
            self._decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
        self.holdback = holdback
        self.base = ""  # decoded text of ids[:offset] (ends on a complete character)
        self.offset = 0
        self.emitted = ""

    def text(self, ids: list[int]) -> str:
        """The text of ``ids`` that is safe to show (no incomplete trailing character)."""
        tail = self._decode(ids[self.offset:]) if len(ids) > self.offset else ""
        if tail.endswith("\ufffd"):
            return self.base + tail.rstrip("\ufffd")
        self.base += tail
        self.offset = len(ids)
        return self.base

    def feed(self, ids: list[int]) -> str:
        text = self.text(ids)
        if self.holdback:
            text = text[: max(len(self.emitted), len(text) - self.holdback)]
        if not text.startswith(self.emitted):  # cannot happen for byte-level BPE; be safe
            return ""
        delta = text[len(self.emitted):]
        self.emitted = text
        return delta

    def finish(self, final_text: str | None, ids: list[int]) -> str:
        text = final_text if final_text is not None else self.text(ids)
        if not text.startswith(self.emitted):
            log.warning("streamed text diverged from the worker's final text; %d chars not sent",
                        len(text) - len(self.emitted))
            return ""
        delta = text[len(self.emitted):]
        self.emitted = text
        return delta
