"""Server-sent events as SGLang (and OpenAI) streams frame them: one ``data: <json>\\n\\n`` event per chunk, the
stream ending with ``data: [DONE]\\n\\n``. The one place that writes and reads this framing:

- ``encode_event(obj)``: the bytes of one event; ``DONE``: the end-of-stream event.
- ``EventSplitter``: cuts a byte stream, fed in whatever chunks it arrives in, into complete events.
- ``parse_event(event)``: what one event carries: its JSON, ``END`` for ``[DONE]``, or ``OPAQUE``.

An event is *parsed* only when every one of its lines is a ``data:`` line (SGLang sends exactly one); anything
else (comments, ``event:``/``id:`` fields, data that is not JSON) is ``OPAQUE``, so a relay passes it on
untouched rather than dropping its other fields.
"""

from __future__ import annotations

from typing import Any, Final

import orjson

__all__ = ["DONE", "END", "OPAQUE", "EventSplitter", "encode_event", "parse_event"]

DONE: Final = b"data: [DONE]\n\n"


def encode_event(obj: Any) -> bytes:
    """``data: <json>\\n\\n``."""
    return b"data: " + orjson.dumps(obj) + b"\n\n"


class _Marker:
    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


END: Final = _Marker("sse.END")  # parse_event: the event was ``data: [DONE]``
OPAQUE: Final = _Marker("sse.OPAQUE")  # parse_event: no data, other fields, or data that is not JSON


class EventSplitter:
    """Incremental splitter: ``feed`` each chunk as it arrives, get the events it completed.

    An event is returned without its blank-line terminator (``b"\\n\\n"``); a partial event waits in ``rest``
    for the next chunk. Splitting does not depend on how the stream was chunked.
    """

    __slots__ = ("rest",)

    def __init__(self) -> None:
        self.rest = b""  # the incomplete event received so far

    def feed(self, data: bytes) -> list[bytes]:
        buf = self.rest + data if self.rest else data
        if b"\n\n" not in buf:
            self.rest = buf
            return []
        *events, self.rest = buf.split(b"\n\n")
        return events


def parse_event(event: bytes) -> Any:
    """The value ``event`` (as ``EventSplitter`` returns it) carries: its ``data:`` parsed as JSON, ``END`` for
    ``[DONE]``, or ``OPAQUE``. Several ``data:`` lines are one value, joined with newlines (the SSE rule)."""
    if not event.startswith(b"data:"):
        return OPAQUE
    if b"\n" not in event:  # the common case: one data line
        payload = event[5:].strip()
    else:
        lines = event.split(b"\n")
        if not all(line.startswith(b"data:") for line in lines):
            return OPAQUE
        payload = b"\n".join(line[5:].strip() for line in lines)
    if payload == b"[DONE]":
        return END
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        return OPAQUE
