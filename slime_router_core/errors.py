"""Errors that map to HTTP answers."""

from __future__ import annotations


class HTTPError(Exception):
    """Raise from a hook or route to answer the client with ``status`` and a JSON error.

    The body is ``{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}``: the
    OpenAI error shape, which SGLang clients also understand (they read ``error.message``).
    """

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _default_type(status)
        self.param = param
        self.code = code

    def to_dict(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _default_type(status: int) -> str:
    if status == 404:
        return "not_found_error"
    if status == 413:
        return "request_too_large"
    if status == 503:
        return "service_unavailable"
    if status < 500:
        return "invalid_request_error"
    return "upstream_error"


class PluginLoadError(RuntimeError):
    """A plugin failed to import, register or start; the message names the plugin and cause."""
