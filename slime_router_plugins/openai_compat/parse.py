"""Split generated text into reasoning, content and tool calls (Qwen3 ``<think>``, Qwen/Hermes ``<tool_call>``).

One streaming state machine serves both paths: the non-streaming answer is ``feed(all text)`` +
``finish()``, so a streamed answer concatenates to exactly the non-streamed message.

Rules (documented in README.md):
- ``<think>…</think>``: the text inside is ``reasoning_content`` with leading/trailing newlines removed;
  the newlines right after ``</think>`` are dropped. When the prompt already ends inside a think block
  (templates that open ``<think>`` in the generation prompt), parsing starts in reasoning.
- ``<tool_call>{json}</tool_call>`` (only when the request has tools): the JSON must hold ``name`` and
  ``arguments``; ``arguments`` is passed on as the model's exact JSON text (so a client sending it back
  lets the template re-render the same characters). Whitespace between content and a call, and between
  calls, is dropped. A block that does not parse (or is unclosed at the end) is returned as content.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

THINK_START, THINK_END = "<think>", "</think>"
TOOL_START, TOOL_END = "<tool_call>", "</tool_call>"

_ARGS_KEY = re.compile(r'"arguments"\s*:\s*')
_PARAMS_KEY = re.compile(r'"parameters"\s*:\s*')


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON text
    id: str = field(default_factory=new_call_id)
    raw: str = ""  # the whole <tool_call>…</tool_call> block as generated

    def to_openai(self, index: int | None = None) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "type": "function",
                             "function": {"name": self.name, "arguments": self.arguments}}
        if index is not None:
            d["index"] = index
        return d


def parse_tool_call_body(body: str) -> ToolCall | None:
    """``{"name": ..., "arguments": {...}}`` → ToolCall with the arguments' exact JSON text, else None."""
    text = body.strip()
    try:
        obj = json.loads(text)
    except (ValueError, TypeError):
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    key = "arguments" if "arguments" in obj else ("parameters" if "parameters" in obj else None)
    if key is None:
        return ToolCall(name=obj["name"], arguments="{}")
    value = obj[key]
    if isinstance(value, str):  # the model wrote the arguments as a JSON string
        return ToolCall(name=obj["name"], arguments=value)
    raw = None
    m = (_ARGS_KEY if key == "arguments" else _PARAMS_KEY).search(text)
    if m is not None:
        try:
            parsed, end = json.JSONDecoder().raw_decode(text, m.end())
            if parsed == value:
                raw = text[m.end():end]
        except ValueError:
            raw = None
    if raw is None:
        raw = json.dumps(value, ensure_ascii=False)
    return ToolCall(name=obj["name"], arguments=raw)


def _partial_suffix(buf: str, tags: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``buf`` that is a proper prefix of one of ``tags``."""
    best = 0
    for tag in tags:
        for k in range(min(len(tag) - 1, len(buf)), best, -1):
            if buf.endswith(tag[:k]):
                best = k
                break
    return best


class OutputParser:
    """Incremental parser. ``feed(text)`` / ``finish()`` return a list of events:
    ``("reasoning", str)``, ``("content", str)``, ``("tool_call", ToolCall)``.
    """

    def __init__(self, reasoning: bool = True, tools: bool = False, in_reasoning: bool = False) -> None:
        self.reasoning = reasoning
        self.tools = tools
        self.state = "reasoning" if (reasoning and in_reasoning) else "content"
        self.buf = ""
        self.pending_ws = ""  # trailing whitespace held back (dropped before a tag / at the end of reasoning)
        self.at_start = True  # strip leading newlines of the current section
        self.seen_think = in_reasoning
        self.n_calls = 0
        self.ws_before_tool = ""

    # -- helpers
    def _tags(self) -> tuple[str, ...]:
        if self.state == "reasoning":
            return (THINK_END,)
        tags: list[str] = []
        if self.reasoning and not self.seen_think:
            tags.append(THINK_START)
        if self.tools:
            tags.append(TOOL_START)
        return tuple(tags)

    def _emit_text(self, kind: str, text: str, events: list, final: bool = False) -> None:
        if not text:
            return
        if self.at_start:
            text = text.lstrip("\n") if kind == "reasoning" else text.lstrip()
            if not text:
                return
            self.at_start = False
        body = text.rstrip() if not final else text
        ws = text[len(body):]
        if body:
            events.append((kind, self.pending_ws + body))
            self.pending_ws = ""
        self.pending_ws += ws

    def _flush_ws(self, kind: str, events: list) -> None:
        if self.pending_ws and kind == "content" and not self.n_calls:
            events.append((kind, self.pending_ws))
        self.pending_ws = ""

    # -- API
    def feed(self, text: str) -> list:
        events: list = []
        self.buf += text
        while self.buf:
            if self.state == "tool":
                end = self.buf.find(TOOL_END)
                if end < 0:
                    return events
                body, self.buf = self.buf[:end], self.buf[end + len(TOOL_END):]
                call = parse_tool_call_body(body)
                self.state = "content"
                if call is None:  # not a parsable call: hand the block back as text
                    self.pending_ws = self.ws_before_tool
                    self._emit_text("content", TOOL_START + body + TOOL_END, events)
                else:
                    call.raw = TOOL_START + body + TOOL_END
                    self.pending_ws = ""
                    self.n_calls += 1
                    events.append(("tool_call", call))
                self.at_start = self.n_calls > 0
                continue
            tags = self._tags()
            pos, tag = -1, None
            for t in tags:
                p = self.buf.find(t)
                if p >= 0 and (pos < 0 or p < pos):
                    pos, tag = p, t
            kind = "reasoning" if self.state == "reasoning" else "content"
            if tag is None:
                keep = _partial_suffix(self.buf, tags)
                emit, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
                self._emit_text(kind, emit, events)
                return events
            self._emit_text(kind, self.buf[:pos], events)
            self.buf = self.buf[pos + len(tag):]
            if tag == THINK_START:
                if self.pending_ws:  # whitespace before <think> is not content
                    self.pending_ws = ""
                self.state, self.seen_think, self.at_start = "reasoning", True, True
                events.append(("reasoning", ""))  # marks that there is a (maybe empty) reasoning block
            elif tag == THINK_END:
                self.pending_ws = ""
                self.state, self.at_start = "content", True
            elif tag == TOOL_START:
                self.ws_before_tool, self.pending_ws = self.pending_ws, ""
                self.state = "tool"
        return events

    def finish(self) -> list:
        events: list = []
        if self.state == "tool":  # unclosed call (length limit): plain text
            self.state = "content"
            rest = TOOL_START + self.buf
            self.buf = ""
            self.pending_ws = self.ws_before_tool
            self._emit_text("content", rest, events, final=True)
        elif self.buf:
            kind = "reasoning" if self.state == "reasoning" else "content"
            rest, self.buf = self.buf, ""
            self._emit_text(kind, rest, events, final=True)
        if self.state != "reasoning":
            self._flush_ws("content", events)
        self.pending_ws = ""
        return events


@dataclass
class ParsedOutput:
    content: str = ""
    reasoning: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)


def collect(events: list, out: ParsedOutput | None = None) -> ParsedOutput:
    out = out or ParsedOutput()
    for kind, value in events:
        if kind == "content":
            out.content += value
        elif kind == "reasoning":
            out.reasoning = (out.reasoning or "") + value
        else:
            out.tool_calls.append(value)
    return out


def parse_output(text: str, reasoning: bool = True, tools: bool = False, in_reasoning: bool = False) -> ParsedOutput:
    p = OutputParser(reasoning=reasoning, tools=tools, in_reasoning=in_reasoning)
    out = collect(p.feed(text))
    collect(p.finish(), out)
    if in_reasoning and out.reasoning is None:
        out.reasoning = ""
    return out
