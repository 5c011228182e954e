"""What the sync and async clients share: URLs, request bodies, answer parsing. No I/O here."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal
from urllib.parse import quote

import httpx
import orjson

from .errors import SlimeRouterError, error_from_body, make_error
from .types import SessionData

DEFAULT_TIMEOUT = httpx.Timeout(600.0, connect=10.0)
JSON_HEADERS = {"content-type": "application/json"}
BatchFormat = Literal["columnar", "jsonl"]
_DONE = object()


def timeout_of(timeout: float | httpx.Timeout | None) -> httpx.Timeout:
    """An ``httpx.Timeout`` for the ``timeout`` argument of the clients (None: no timeout)."""
    return timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)


def headers_of(api_key: str | None, headers: Mapping[str, str] | None) -> dict[str, str]:
    """The headers every request sends: the caller's, and ``Authorization: Bearer <api_key>``."""
    out = dict(headers or {})
    if api_key is not None:
        out["Authorization"] = f"Bearer {api_key}"
    return out


def session_path(sid: str, route: str = "") -> str:
    """``/sessions/{sid}`` (the session resource) or ``/sessions/{sid}{route}`` (a route scoped to the session)."""
    return f"/sessions/{quote(sid, safe='')}{route}"


def dumps(body: Any) -> bytes:
    """A request body (orjson: the numbers of long token lists are serialized fast)."""
    return orjson.dumps(body)


def check(response: httpx.Response, *, session: bool = False) -> None:
    """Raise the ``SlimeRouterError`` for an error answer (the body must have been read)."""
    if response.status_code >= 400:
        raise error_from_body(response.status_code, response.content, session=session)


def loads(response: httpx.Response, *, session: bool = False) -> Any:
    """The JSON of a successful answer; raises ``SlimeRouterError`` for an error answer."""
    check(response, session=session)
    return orjson.loads(response.content)


def open_body(session_id: str | None, metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``POST /sessions`` body."""
    body: dict[str, Any] = {}
    if session_id is not None:
        body["session_id"] = session_id
    if metadata:
        body["metadata"] = dict(metadata)
    return body


def generate_body(text: str | list[str] | None, input_ids: list[int] | list[list[int]] | None,
                  sampling_params: Mapping[str, Any] | list[Mapping[str, Any]] | None, stream: bool,
                  extra: Mapping[str, Any]) -> dict[str, Any]:
    """The ``/generate`` body (SGLang's): one of ``text``/``input_ids``, ``sampling_params``, ``stream``, extra
    fields as given (``return_logprob``, ``rid``...)."""
    if (text is None) == (input_ids is None):
        raise ValueError("give exactly one of text and input_ids")
    body: dict[str, Any] = {"text": text} if text is not None else {"input_ids": input_ids}
    if isinstance(sampling_params, list):
        body["sampling_params"] = [dict(p) for p in sampling_params]
    else:
        body["sampling_params"] = dict(sampling_params or {})
    if stream:
        body["stream"] = True
    body.update(extra)
    return body


def chat_body(messages: list[Mapping[str, Any]] | list[dict[str, Any]], tools: list[Any] | None,
              params: Mapping[str, Any]) -> dict[str, Any]:
    """The ``/v1/chat/completions`` body (non-streaming)."""
    if params.get("stream"):
        raise ValueError("chat() does not stream: use session.openai() (the OpenAI SDK) for streamed chat")
    body: dict[str, Any] = {"messages": list(messages)}
    if tools is not None:
        body["tools"] = tools
    body.update(params)
    return body


def chat_reply(data: Any) -> Any:
    """The chat answer as the OpenAI SDK's ``ChatCompletion`` when ``openai`` is installed, else the dict."""
    try:
        from openai.types.chat import ChatCompletion
    except ImportError:
        return data
    return ChatCompletion.model_validate(data)


def batch_body(session_ids: Iterable[str], finish: bool, format: BatchFormat) -> tuple[list[str], dict[str, Any]]:
    """The ids asked (duplicates dropped, order kept) and the ``POST /retrieve_batch`` body."""
    if isinstance(session_ids, str):
        raise TypeError("session_ids must be a list of ids, not one string")
    if format not in ("columnar", "jsonl"):
        raise ValueError(f"format must be 'columnar' or 'jsonl', not {format!r}")
    ids = list(dict.fromkeys(session_ids))
    return ids, {"sessions": ids, "finish": finish, "format": format}


def batch_items(content: bytes, format: BatchFormat, numpy: bool = False) -> list[dict[str, Any]]:
    """The items of a ``/retrieve_batch`` answer, in order. Columnar answers are read by
    ``slime_router_plugins.sessions.columnar.decode`` (with ``numpy``: arrays that are views of ``content``)."""
    if format == "columnar":
        from slime_router_plugins.sessions.columnar import decode

        return decode(content, numpy=numpy)
    return [orjson.loads(line) for line in content.splitlines() if line.strip()]


def batch_result(ids: list[str], items: list[dict[str, Any]],
                 numpy: bool) -> dict[str, SessionData | SlimeRouterError]:
    """Id -> ``SessionData``, or the ``SlimeRouterError`` (``SessionNotFound``/``SessionFinished``...) of an item
    the router could not answer; in the order asked."""
    out: dict[str, SessionData | SlimeRouterError] = {}
    for item in items:
        sid = item.get("session_id")
        if not isinstance(sid, str):
            raise SlimeRouterError(502, f"unexpected /retrieve_batch item without a session_id: {item!r:.200}")
        err = item.get("error")
        if isinstance(err, dict):
            status = err.get("status")
            code = err.get("code")
            out[sid] = make_error(status if isinstance(status, int) else 500, str(err.get("message", "")),
                                  code if isinstance(code, str) else None, session=True, body=item)
        else:
            out[sid] = SessionData.from_json(item, numpy=numpy)
    missing = [sid for sid in ids if sid not in out]
    if missing:
        raise SlimeRouterError(502, f"/retrieve_batch answered no item for {missing[:5]!r}")
    return {sid: out[sid] for sid in ids}


def sse_event(line: str) -> Any:
    """One SSE line of a ``/generate`` stream: the chunk dict, ``_DONE`` at ``data: [DONE]``, None for anything
    else (blank lines, comments). An error event raises ``SlimeRouterError`` (status 502)."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return _DONE
    if not data:
        return None
    obj = orjson.loads(data)
    if isinstance(obj, dict) and "error" in obj:
        raise error_from_body(502, data.encode())
    return obj


def is_done(event: Any) -> bool:
    """True for the ``data: [DONE]`` event."""
    return event is _DONE
