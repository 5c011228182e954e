"""OpenAI messages → chat-template text, and the exact-history machinery.

- ``template_messages``: OpenAI messages (already validated) → the dicts HF chat templates expect
  (``developer`` → ``system``, content parts joined, tool-call arguments kept as the client's JSON text).
- ``HistoryStore``: remembers, for every answer the router produced, the exact completion text the model
  generated (``reply["text"]``) and its reasoning, keyed by the conversation before it plus the assistant
  message as the client will send it back (content + tool calls, ids and reasoning ignored).
- ``Renderer.prompt``: the text sent for a chat request. History modes (``--openai-history``):
  ``template`` (default): the template renders the history as the client sent it; an assistant message the
  router produced gets its ``reasoning_content`` restored when the client dropped it (Qwen3's template keeps
  reasoning inside the current tool-calling loop only, so this matches what the model wrote there).
  ``raw``: every assistant message the router produced is replaced by the exact text the model generated
  (spliced into the template's rendering), so no generated token is ever lost from the history.
- Splicing: assistant message i is rendered as a unique sentinel; the text up to the end of the template's
  generation prompt for ``messages[:i]`` is kept, then the recorded text, then what follows the sentinel
  (``<|im_end|>\\n``...). This is exactly the text the trajectory cache recorded for that turn.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

HISTORY_MODES = ("template", "raw")


def content_text(content: Any) -> str | None:
    """OpenAI content (str, None, or a list of parts) → text."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if isinstance(p, str):
                parts.append(p)
            elif isinstance(p, dict) and p.get("type") in ("text", "input_text", "output_text"):
                parts.append(str(p.get("text", "")))
            elif isinstance(p, dict) and p.get("type") == "refusal":
                parts.append(str(p.get("refusal", "")))
        return "".join(parts)
    return str(content)


def canonical_arguments(args: Any) -> str:
    if isinstance(args, str):
        try:
            return json.dumps(json.loads(args), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        except ValueError:
            return args
    return json.dumps(args, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _canon_calls(calls: Any) -> list:
    out = []
    for c in calls or []:
        f = c.get("function", c) if isinstance(c, dict) else {}
        out.append([f.get("name"), canonical_arguments(f.get("arguments", {}))])
    return out


def canonical_message(m: dict[str, Any]) -> list:
    """What identifies a message for the history store (not ids, not reasoning)."""
    role = m.get("role")
    if role == "developer":
        role = "system"
    return [role, content_text(m.get("content")) or "", _canon_calls(m.get("tool_calls")), m.get("name")]


def history_key(context: list[dict[str, Any]], assistant: dict[str, Any]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for m in context:
        h.update(json.dumps(canonical_message(m), ensure_ascii=False).encode())
        h.update(b"\x1e")
    h.update(b"\x1d")
    h.update(json.dumps(canonical_message(assistant), ensure_ascii=False).encode())
    return h.hexdigest()


@dataclass
class HistoryEntry:
    raw: str  # the exact completion text the model generated (stop trimmed, special tokens skipped)
    reasoning: str | None


class HistoryStore:
    """LRU map: (conversation before, assistant message) → HistoryEntry."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        self._d: OrderedDict[str, HistoryEntry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._d)

    def put(self, context: list[dict[str, Any]], assistant: dict[str, Any], entry: HistoryEntry) -> None:
        if self.max_entries <= 0:
            return
        key = history_key(context, assistant)
        self._d[key] = entry
        self._d.move_to_end(key)
        while len(self._d) > self.max_entries:
            self._d.popitem(last=False)

    def get(self, context: list[dict[str, Any]], assistant: dict[str, Any]) -> HistoryEntry | None:
        key = history_key(context, assistant)
        e = self._d.get(key)
        if e is not None:
            self._d.move_to_end(key)
        return e


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Validated OpenAI messages → the dicts a HF chat template expects."""
    out = []
    for m in messages:
        role = "system" if m["role"] == "developer" else m["role"]
        d: dict[str, Any] = {"role": role, "content": content_text(m.get("content"))}
        if role == "assistant":
            if d["content"] is None:
                d["content"] = ""
            if m.get("reasoning_content") is not None:
                d["reasoning_content"] = m["reasoning_content"]
            if m.get("tool_calls"):
                calls = []
                for c in m["tool_calls"]:
                    f = c.get("function") or {}
                    calls.append({"id": c.get("id"), "type": "function",
                                  "function": {"name": f.get("name"), "arguments": f.get("arguments", "{}")}})
                d["tool_calls"] = calls
        if m.get("name") is not None:
            d["name"] = m["name"]
        if role == "tool" and m.get("tool_call_id") is not None:
            d["tool_call_id"] = m["tool_call_id"]
        out.append(d)
    return out


class SpliceError(RuntimeError):
    pass


class Renderer:
    def __init__(self, tokenizer: Any, store: HistoryStore, mode: str = "template") -> None:
        self.tokenizer = tokenizer
        self.store = store
        self.mode = mode

    def template(self, msgs: list[dict[str, Any]], tools: list | None, kwargs: dict | None,
                 add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(msgs, tools=tools or None, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt, **(kwargs or {}))

    def entries(self, messages: list[dict[str, Any]]) -> dict[int, HistoryEntry]:
        out = {}
        for i, m in enumerate(messages):
            if m.get("role") == "assistant":
                e = self.store.get(messages[:i], m)
                if e is not None:
                    out[i] = e
        return out

    def _prepared(self, messages: list[dict[str, Any]], mode: str, splice_last: bool
                  ) -> tuple[list[dict[str, Any]], dict[int, str]]:
        msgs = template_messages(messages)
        entries = self.entries(messages)
        splice: dict[int, str] = {}
        for i, e in entries.items():
            if mode == "raw" or (splice_last and i == len(messages) - 1):
                splice[i] = e.raw
            elif e.reasoning and msgs[i].get("reasoning_content") is None and "</think>" not in (msgs[i]["content"] or ""):
                msgs[i] = dict(msgs[i], reasoning_content=e.reasoning)
        return msgs, splice

    def render(self, messages: list[dict[str, Any]], tools: list | None = None, kwargs: dict | None = None,
               add_generation_prompt: bool = True, mode: str | None = None, splice_last: bool = False) -> str:
        mode = mode or self.mode
        msgs, splice = self._prepared(messages, mode, splice_last)
        return self.splice(msgs, splice, tools, kwargs, add_generation_prompt)

    def splice(self, msgs: list[dict[str, Any]], splice: dict[int, str], tools: list | None, kwargs: dict | None,
               add_generation_prompt: bool) -> str:
        if not splice:
            return self.template(msgs, tools, kwargs, add_generation_prompt)
        nonce = uuid.uuid4().hex[:12]
        sent = {i: f"@@slime-splice-{nonce}-{i}@@" for i in splice}
        sub = list(msgs)
        for i in splice:
            sub[i] = {"role": "assistant", "content": sent[i]}
        full = self.template(sub, tools, kwargs, add_generation_prompt)
        out: list[str] = []
        cursor = 0
        for i in sorted(splice):
            head = self.template(sub[:i], tools, kwargs, True)
            p = full.find(sent[i])
            if p < 0 or not full.startswith(head) or len(head) > p or cursor > len(head):
                raise SpliceError(f"the chat template does not render assistant message {i} after its "
                                  f"generation prompt; cannot substitute the recorded text")
            out.append(full[cursor:len(head)])
            out.append(splice[i])
            cursor = p + len(sent[i])
        out.append(full[cursor:])
        return "".join(out)
