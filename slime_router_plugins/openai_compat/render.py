"""OpenAI messages → chat-template text, and the exact-history machinery.

- ``template_messages``: OpenAI messages (already validated) → the dicts HF chat templates expect
  (``developer`` → ``system``, content parts joined, tool-call arguments kept as the client's JSON text).
- ``HistoryStore``: remembers, for every answer the router produced, the exact completion text the model
  generated (``reply["text"]``), its reasoning and the prompt it was generated for, keyed by the conversation
  before it plus the assistant message as the client sends it back: content without outer whitespace, tool calls
  by name and parsed arguments (so ``json.dumps`` of parsed arguments matches), no ids, no reasoning.
- ``Renderer.render_turns``: the text sent for a chat request. Every assistant turn the router produced is put
  back as the exact text the model generated (the API's own normalisation of what it returned never reaches the
  worker): in ``raw`` mode (``--openai-history raw``) always, so no generated token is ever lost from the
  history; in ``template`` mode (default, what SGLang would send) wherever the chat template keeps the turn as
  it was generated, and rendered by the template where the template rewrites it (Qwen3 drops reasoning before
  the last user message).
- Splicing: the recognised assistant turns are rendered as unique sentinels; a turn's text from the start of
  its generation prompt to the sentinel is replaced by the generation prompt + the recorded text, what follows
  the sentinel (``<|im_end|>\\n``...) is kept. This is exactly the text the trajectory cache recorded for it.
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
    """What identifies a message for the history store: role, content (outer whitespace ignored: the API returns
    content without the whitespace the model wrote around it, and clients may strip it again), tool calls by name
    and parsed arguments (clients re-serialize them, e.g. ``json.dumps`` of a parsed dict), and ``name``. Not ids,
    not reasoning (most clients drop it)."""
    role = m.get("role")
    if role == "developer":
        role = "system"
    return [role, (content_text(m.get("content")) or "").strip(), _canon_calls(m.get("tool_calls")), m.get("name")]


def _digest(obj: Any) -> bytes:
    return hashlib.blake2b(json.dumps(obj, ensure_ascii=False).encode(), digest_size=16).digest()


def context_keys(messages: list[dict[str, Any]]) -> list[str]:
    """``keys[i]`` identifies the conversation ``messages[:i]`` (one running hash: O(n) for all prefixes)."""
    h = hashlib.blake2b(digest_size=16)
    keys = [h.hexdigest()]
    for m in messages:
        h.update(_digest(canonical_message(m)))
        keys.append(h.hexdigest())
    return keys


def message_key(m: dict[str, Any]) -> str:
    return _digest(canonical_message(m)).hex()


def history_key(context: list[dict[str, Any]], assistant: dict[str, Any]) -> str:
    return context_keys(context)[-1] + message_key(assistant)


def text_digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


@dataclass
class HistoryEntry:
    raw: str  # the exact completion text the model generated (stop trimmed, special tokens skipped)
    reasoning: str | None
    prompt_len: int = -1  # the prompt the turn was generated for: its length and digest (-1: unknown) ...
    prompt_digest: bytes = b""  # ... so a retrieval can check that turn's trajectory is in the conversation
    generated_tokens: int = 0  # how many tokens the model generated for it (the audit counts what is lost)


class HistoryStore:
    """LRU map: conversation before → {assistant message as returned → HistoryEntry}.

    Grouped by conversation so that a message the router did not return for a conversation it did answer is
    known as a client edit (several answers per conversation: ``n`` > 1, GRPO branches)."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        self._d: OrderedDict[str, dict[str, HistoryEntry]] = OrderedDict()
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def put(self, context: list[dict[str, Any]], assistant: dict[str, Any], entry: HistoryEntry
            ) -> tuple[str, str] | None:
        """Remember ``entry`` for ``assistant`` answering ``context``; its keys (conversation, message), or None
        when the store is off (``max_entries`` 0)."""
        if self.max_entries <= 0:
            return None
        ck, mk = context_keys(context)[-1], message_key(assistant)
        self.insert(ck, mk, entry)
        return ck, mk

    def insert(self, ck: str, mk: str, entry: HistoryEntry) -> None:
        """``put`` by keys (``context_keys(context)[-1]``, ``message_key(assistant)``), e.g. for an entry remembered
        by another router: it becomes the most recently used; the least recently used are evicted beyond the bound."""
        if self.max_entries <= 0:
            return
        group = self._d.get(ck)
        if group is None:
            group = self._d[ck] = {}
        else:
            self._d.move_to_end(ck)
        if mk not in group:
            self._n += 1
        group[mk] = entry
        while self._n > self.max_entries and self._d:
            _, old = self._d.popitem(last=False)
            self._n -= len(old)

    def lookup(self, context_key: str, assistant: dict[str, Any]) -> tuple[bool, HistoryEntry | None]:
        """(the router answered this conversation, the entry of this very answer or None)."""
        group = self._d.get(context_key)
        if group is None:
            return False, None
        self._d.move_to_end(context_key)
        return True, group.get(message_key(assistant))

    def get(self, context: list[dict[str, Any]], assistant: dict[str, Any]) -> HistoryEntry | None:
        return self.lookup(context_keys(context)[-1], assistant)[1]


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


# Why an assistant turn of a conversation is not the exact text its model generated (reported by
# /retrieve_from_messages and counted in the metrics).
TEMPLATE_RULE = "template_rule"  # the chat template renders the turn differently later (Qwen3: earlier <think> dropped)
CLIENT_EDIT = "client_edit"  # the client sent back something other than what the router returned
ROUTER_NORMALISATION = "router_normalisation"  # the router could not put the generated text back in
UNKNOWN_ORIGIN = "unknown_origin"  # not an answer of this router (another model, a hand-written turn, forgotten)
CAUSES = (TEMPLATE_RULE, CLIENT_EDIT, ROUTER_NORMALISATION, UNKNOWN_ORIGIN)


class SpliceError(RuntimeError):
    pass


@dataclass
class Rendered:
    text: str
    entries: dict[int, HistoryEntry]  # assistant turns the router produced, recognised as sent back
    answered: set[int]  # assistant turns whose conversation before them the router answered
    spliced: set[int]  # rendered as the exact generated text
    not_spliced: dict[int, str]  # recognised turns the template renders its own way, and why
    body_end: int = -1  # where the template's closing text after a final generated turn starts (else len(text))


class Renderer:
    def __init__(self, tokenizer: Any, store: HistoryStore, mode: str = "template") -> None:
        self.tokenizer = tokenizer
        self.store = store
        self.mode = mode
        self._gen_prompts: OrderedDict[str, str | None] = OrderedDict()

    def template(self, msgs: list[dict[str, Any]], tools: list | None, kwargs: dict | None,
                 add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(msgs, tools=tools or None, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt, **(kwargs or {}))

    def generation_prompt(self, tools: list | None, kwargs: dict | None) -> str | None:
        """What ``add_generation_prompt`` appends (``<|im_start|>assistant\\n``, plus an empty think block when
        thinking is off), probed once per tools/kwargs; None when the template does not simply append one."""
        key = json.dumps([tools, kwargs], sort_keys=True, default=str)
        if key in self._gen_prompts:
            return self._gen_prompts[key]
        probe = [{"role": "user", "content": "x"}]
        without = self.template(probe, tools, kwargs, False)
        with_gen = self.template(probe, tools, kwargs, True)
        gen = with_gen[len(without):] if with_gen.startswith(without) and len(with_gen) > len(without) else None
        self._gen_prompts[key] = gen
        if len(self._gen_prompts) > 64:
            self._gen_prompts.popitem(last=False)
        return gen

    def lookup(self, messages: list[dict[str, Any]]) -> tuple[dict[int, HistoryEntry], set[int]]:
        keys = context_keys(messages)
        entries: dict[int, HistoryEntry] = {}
        answered: set[int] = set()
        for i, m in enumerate(messages):
            if m.get("role") == "assistant":
                seen, e = self.store.lookup(keys[i], m)
                if seen:
                    answered.add(i)
                if e is not None:
                    entries[i] = e
        return entries, answered

    def render(self, messages: list[dict[str, Any]], tools: list | None = None, kwargs: dict | None = None,
               add_generation_prompt: bool = True, mode: str | None = None, splice_last: bool = False) -> str:
        return self.render_turns(messages, tools, kwargs, add_generation_prompt, mode, splice_last).text

    def render_turns(self, messages: list[dict[str, Any]], tools: list | None = None, kwargs: dict | None = None,
                     add_generation_prompt: bool = True, mode: str | None = None,
                     splice_last: bool = False) -> Rendered:
        """The conversation as text, every assistant turn the router produced put back as the exact text the
        model generated -- in ``raw`` mode always, in ``template`` mode wherever the chat template keeps that
        turn as it was generated (it renders the turn's generation prompt and, if the model reasoned, the
        reasoning); where the template rewrites the turn (Qwen3 drops reasoning before the last user message) the
        template renders it. The API's normalisation of what it returned (content without outer whitespace,
        tool-call JSON as parsed) is thus never what the worker sees as history."""
        mode = mode or self.mode
        msgs = template_messages(messages)
        entries, answered = self.lookup(messages)
        for i, e in entries.items():  # a reasoning the client dropped (the template may keep it) is restored
            m = msgs[i]
            if e.reasoning and m.get("reasoning_content") is None and "</think>" not in (m["content"] or ""):
                msgs[i] = dict(m, reasoning_content=e.reasoning)
        if not entries:
            text = self.template(msgs, tools, kwargs, add_generation_prompt)
            return Rendered(text, entries, answered, set(), {}, len(text))
        last = len(messages) - 1
        force = set(entries) if mode == "raw" else ({last} & set(entries) if splice_last else set())
        gen = self.generation_prompt(tools, kwargs)
        todo = set(entries)
        not_spliced: dict[int, str] = {}
        nonce = uuid.uuid4().hex[:12]
        while True:
            text, rejected, tail = self._splice(msgs, entries, todo, force, gen, nonce, tools, kwargs,
                                                add_generation_prompt)
            if not rejected:
                body_end = tail if last in todo else len(text)
                return Rendered(text, entries, answered, todo, not_spliced, body_end)
            not_spliced.update(rejected)  # rendered as themselves in the next pass
            todo -= set(rejected)

    def _splice(self, msgs: list[dict[str, Any]], entries: dict[int, HistoryEntry], todo: set[int], force: set[int],
                gen: str | None, nonce: str, tools: list | None, kwargs: dict | None, add_gen: bool
                ) -> tuple[str, dict[int, str], int]:
        """Render with sentinels for the turns in ``todo`` and put their generated text in. Returns the text, the
        turns (not forced) the template does not keep as generated with the reason, and where the text after the
        last spliced turn starts."""
        if not todo:
            text = self.template(msgs, tools, kwargs, add_gen)
            return text, {}, len(text)
        sub = list(msgs)
        content: dict[int, str] = {}
        reasoning: dict[int, str] = {}
        for i in todo:
            content[i] = f"@@slime-splice-{nonce}-{i}@@"
            sub[i] = {"role": "assistant", "content": content[i]}
            if entries[i].reasoning is not None and i not in force:  # does the template keep this turn's reasoning?
                reasoning[i] = f"@@slime-reasoning-{nonce}-{i}@@"
                sub[i]["reasoning_content"] = reasoning[i]
        full = self.template(sub, tools, kwargs, add_gen)
        out: list[str] = []
        rejected: dict[int, str] = {}
        cursor = 0
        for i in sorted(todo):
            p = full.find(content[i], cursor)
            if p < 0:  # the template does not write an assistant turn's content verbatim
                if i in force:
                    raise SpliceError(f"the chat template does not render assistant message {i}'s content "
                                      f"verbatim; cannot substitute the recorded text")
                rejected[i] = ROUTER_NORMALISATION
                continue
            start = full.rfind(gen, cursor, p) if gen else -1
            if i in force:
                if start < 0 and gen and "\n" in gen:  # the template drops part of the generation prompt in
                    start = full.rfind(gen[:gen.index("\n") + 1], cursor, p)  # history: put it back in raw mode
                if start < 0:
                    raise SpliceError(f"the chat template does not render assistant message {i} after its "
                                      f"generation prompt; cannot substitute the recorded text")
            else:
                opening = full[start + len(gen):p] if start >= 0 and gen else None
                kept = opening is not None and (opening == "" if i not in reasoning else reasoning[i] in opening)
                if not kept:
                    rejected[i] = TEMPLATE_RULE
                    continue
            out.append(full[cursor:start])
            out.append(gen or "")
            out.append(entries[i].raw)
            cursor = p + len(content[i])
        if rejected:
            return "", rejected, 0
        tail = sum(map(len, out))
        out.append(full[cursor:])
        return "".join(out), {}, tail
