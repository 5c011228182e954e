"""Session-scoped base URLs: ``/sessions/{sid}/<route>`` is ``/<route>`` with ``X-Session-ID: sid``.

An OpenAI SDK or agent framework only knows a base URL; giving it ``http://router/sessions/{sid}/v1`` puts every
call it makes into session ``sid`` with no code change. The dispatcher rewrites the ASGI scope before anything
else sees it (access control, the /generate hot path, FastAPI), so the route behaves exactly as without the prefix
plus the header. The URL's id wins over an ``X-Session-ID`` header. ``/sessions/{sid}`` itself (no route after
it) is left alone: it is the session resource (the sessions plugin's routes).
"""

from __future__ import annotations

from typing import Any

PREFIX = "/sessions/"
HEADER = b"x-session-id"


def unscope(scope: dict[str, Any]) -> dict[str, Any]:
    """The scope of a ``/sessions/{sid}/<route>`` request as ``/<route>`` with the session header; any other
    scope unchanged."""
    path: str = scope["path"]
    cut = path.find("/", len(PREFIX))
    if cut < 0 or cut == len(PREFIX) or cut == len(path) - 1:
        return scope
    sid, rest = path[len(PREFIX):cut], path[cut:]
    headers = [(k, v) for k, v in scope.get("headers", ()) if k != HEADER]
    headers.append((HEADER, sid.encode("utf-8", "surrogateescape")))
    return dict(scope, path=rest, raw_path=rest.encode("utf-8", "surrogateescape"), headers=headers)
