"""The client's exceptions: every error answer of the router becomes a ``SlimeRouterError`` (or a subclass).

The router answers errors as ``{"error": {"message", "type", "param", "code"}}`` (``slime_router_core/errors.py``);
the status, message and code are kept on the exception. Transport failures (connection refused, timeouts) are not
wrapped: they are ``httpx`` exceptions (``httpx.TransportError``).
"""

from __future__ import annotations

import builtins
from typing import Any

import orjson

__all__ = ["SlimeRouterError", "SessionFinished", "SessionNotFound", "error_from_body", "make_error"]


class SlimeRouterError(Exception):
    """An error answer of the router.

    ``status``: the HTTP status (502 for an error event in the middle of a stream), ``message``: the router's
    explanation, ``code``: its machine-readable code when it gave one (e.g. ``"session_finished"``,
    ``"invalid_api_key"``), ``type``/``param``: the rest of the OpenAI-style error object, ``body``: the decoded
    error body (or its text when it was not JSON).
    """

    def __init__(self, status: int, message: str, code: str | int | None = None, *, type: str | None = None,
                 param: str | None = None, body: Any = None) -> None:
        super().__init__(status, message, code)
        self.status = status
        self.message = message
        self.code = code
        self.type = type
        self.param = param
        self.body = body

    def __str__(self) -> str:
        code = f" ({self.code})" if self.code is not None else ""
        return f"HTTP {self.status}{code}: {self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status!r}, message={self.message!r}, code={self.code!r})"


class SessionFinished(SlimeRouterError):
    """409: the session was finished (``DELETE /sessions/{sid}`` or a batch retrieval with ``finish``); its
    trajectories were handed over and freed, and the id cannot be used again."""


class SessionNotFound(SlimeRouterError):
    """404 on a session: it was never opened (``code`` ``"session_not_found"``), or it expired
    (``--session-ttl``; ``"session_expired"``)."""


_FINISHED_CODES = frozenset({"session_finished"})
_NOT_FOUND_CODES = frozenset({"session_not_found", "session_expired"})


def make_error(status: int, message: str, code: str | int | None = None, *, session: bool = False,
               type: str | None = None, param: str | None = None, body: Any = None) -> SlimeRouterError:
    """The exception for an error answer: ``SessionFinished`` for a 409, ``SessionNotFound`` for a 404, when the
    router's code says it is about a session (or, for a request about a session, ``session=True``, when there is
    no code); else ``SlimeRouterError`` (e.g. the 429 ``too_many_sessions`` of ``--session-max``)."""
    cls: builtins.type[SlimeRouterError] = SlimeRouterError
    if status == 409 and (code in _FINISHED_CODES or (session and code is None)):
        cls = SessionFinished
    elif status == 404 and (code in _NOT_FOUND_CODES or (session and code is None)):
        cls = SessionNotFound
    return cls(status, message, code, type=type, param=param, body=body)


def error_from_body(status: int, content: bytes, *, session: bool = False) -> SlimeRouterError:
    """The exception for an error answer with status ``status`` and body ``content`` (the router's JSON error
    object, or anything else a proxy in between may have sent)."""
    try:
        body: Any = orjson.loads(content) if content else None
    except orjson.JSONDecodeError:
        body = content.decode("utf-8", "replace")
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        message = err.get("message")
        code = err.get("code")
        return make_error(status, message if isinstance(message, str) else str(err), code
                          if isinstance(code, (str, int)) and not isinstance(code, bool) else None,
                          session=session, type=_str_or_none(err.get("type")), param=_str_or_none(err.get("param")),
                          body=body)
    if isinstance(err, str):  # {"error": "..."}: e.g. a bare SGLang worker
        return make_error(status, err, session=session, body=body)
    if isinstance(body, dict) and isinstance(body.get("detail"), str):  # a plain FastAPI/Starlette answer
        return make_error(status, body["detail"], session=session, body=body)
    text = body if isinstance(body, str) else (orjson.dumps(body).decode() if body is not None else "")
    return make_error(status, text or f"HTTP {status} with an empty body", session=session, body=body)


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None
