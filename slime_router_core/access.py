"""Access control: API keys, checked on the raw ASGI scope before any dispatch.

Two keys, both optional (unset = open, as without them):

- ``--api-key`` (``SLIME_ROUTER_API_KEY``) guards the **data plane**: ``/generate``, ``/v1/*``, ``/retrieve_*``,
  ``/metrics*``, ``/list_workers``, ``/plugins``, forwarded worker GETs, ``/docs``, ``/openapi.json``... -- every
  path that is neither admin nor open.
- ``--admin-api-key`` (``SLIME_ROUTER_ADMIN_API_KEY``) guards the **admin plane**: the paths in ``ADMIN_PATHS``
  (and under ``ADMIN_PREFIXES``), everything that changes the router's or the workers' state. The admin key is
  accepted on data paths too; the data key on an admin path is refused with 403. With only ``--api-key`` set,
  that one key guards both planes (no state-changing route is left open by setting a key).
- ``OPEN_PATHS`` (``/health``) never need a key: load balancers and orchestrators probe it.

The key is read from ``Authorization: Bearer <key>`` only (no ``X-API-Key``, no query parameter: a key in a URL
ends up in access logs), and compared in constant time (``hmac.compare_digest``). The classification is by path,
whatever the method. A plugin whose routes change state declares them, from its ``register_routes`` or at import::

    from slime_router_core.access import declare_admin_paths
    declare_admin_paths("/snapshot", "/my_plugin/reset")          # exact paths
    declare_admin_paths("/my_plugin/admin/", prefix=True)         # every path under it
"""

from __future__ import annotations

import hmac
from typing import Any

import orjson

from .errors import HTTPError

#: State-changing paths: the admin key is required (when one is configured). Mutable: ``declare_admin_paths``.
ADMIN_PATHS: set[str] = {
    "/add_worker", "/remove_worker",                                   # core: the pool
    "/flush_cache", "/pause_generation", "/continue_generation",       # core: broadcast to every worker
    "/update_weights_from_disk", "/update_weight_version",             # balancing: weight updates
    "/pause", "/resume", "/abort_request",                             # balancing: draining, aborts
    "/snapshot",                                                       # reserved: a snapshot/restore API
}
#: Every path under these prefixes is admin too (``declare_admin_paths(..., prefix=True)``).
ADMIN_PREFIXES: set[str] = {"/snapshot/"}
#: Paths that never need a key: probes, and pages that hold no data (``declare_open_paths``: a browser cannot send
#: a Bearer header when it loads a page; the data the page then fetches stays behind the key).
OPEN_PATHS: set[str] = {"/health"}
OPEN_PREFIXES: set[str] = set()

_prefixes: tuple[str, ...] = tuple(sorted(ADMIN_PREFIXES))
_open_prefixes: tuple[str, ...] = ()

API_KEY_ENV = "SLIME_ROUTER_API_KEY"
ADMIN_API_KEY_ENV = "SLIME_ROUTER_ADMIN_API_KEY"


def declare_admin_paths(*paths: str, prefix: bool = False) -> None:
    """Classify ``paths`` (exact, or with ``prefix=True`` every path that starts with them) as admin: they then
    need the admin key. For plugins whose routes change state; takes effect at once, for every app."""
    global _prefixes
    for path in paths:
        if not isinstance(path, str) or not path.startswith("/"):
            raise ValueError(f"An admin path must start with '/': {path!r}")
        if path in OPEN_PATHS:
            raise ValueError(f"{path} is open (never needs a key) and cannot be made admin")
        (ADMIN_PREFIXES if prefix else ADMIN_PATHS).add(path)
    _prefixes = tuple(sorted(ADMIN_PREFIXES))


def declare_open_paths(*paths: str, prefix: bool = False) -> None:
    """Classify ``paths`` (exact, or every path under them with ``prefix=True``) as open: no key. Only for what
    holds no data (a page and its static files); takes effect at once, for every app."""
    global _open_prefixes
    for path in paths:
        if not isinstance(path, str) or not path.startswith("/"):
            raise ValueError(f"An open path must start with '/': {path!r}")
        if path in ADMIN_PATHS or path.startswith(_prefixes):
            raise ValueError(f"{path} is an admin path and cannot be made open")
        (OPEN_PREFIXES if prefix else OPEN_PATHS).add(path)
    _open_prefixes = tuple(sorted(OPEN_PREFIXES))


def classify(path: str) -> str:
    """``"open"``, ``"admin"`` or ``"data"`` for a request path (as the ASGI scope has it: percent-decoded)."""
    if path in OPEN_PATHS or (_open_prefixes and path.startswith(_open_prefixes)):
        return "open"
    if path in ADMIN_PATHS or path.startswith(_prefixes):
        return "admin"
    stripped = path.rstrip("/")  # "/add_worker/" is redirected to "/add_worker": classified the same
    if stripped != path and (stripped in ADMIN_PATHS or (stripped + "/").startswith(_prefixes)):
        return "admin"
    return "data"


def check_key(name: str, value: str | None) -> bytes | None:
    """A configured key as bytes (None: not configured); ValueError for one no client could send. Never puts
    the value in the message."""
    if value is None:
        return None
    if not value:
        raise ValueError(f"Invalid value for {name}: empty (leave it unset for no key)")
    if not all(33 <= ord(c) <= 126 for c in value):
        raise ValueError(f"Invalid value for {name}: a key must be printable ASCII without spaces "
                         f"(it is sent as 'Authorization: Bearer <key>')")
    return value.encode("ascii")


class AccessControl:
    """The configured keys and the check made on every request's scope (only built when a key is set)."""

    __slots__ = ("data_key", "admin_key")

    def __init__(self, api_key: str | None, admin_api_key: str | None) -> None:
        self.data_key = check_key("--api-key", api_key)
        self.admin_key = check_key("--admin-api-key", admin_api_key)
        if self.data_key is not None and self.admin_key is not None and \
                hmac.compare_digest(self.data_key, self.admin_key):
            raise ValueError("Invalid value for --admin-api-key: it must differ from --api-key (data clients "
                             "would be admins)")

    @classmethod
    def from_settings(cls, settings: Any) -> AccessControl | None:
        """The check for these settings, or None when no key is configured (then nothing is checked)."""
        api_key, admin_api_key = getattr(settings, "api_key", None), getattr(settings, "admin_api_key", None)
        if api_key is None and admin_api_key is None:
            return None
        return cls(api_key, admin_api_key)

    def describe(self) -> str:
        """What is configured, for the start-up banner (never the keys)."""
        if self.admin_key is None:
            return "access: --api-key required on every route but /health (no --admin-api-key: it is the admin key)"
        data = "--api-key or --admin-api-key" if self.data_key is not None else "no key"
        return f"access: data routes: {data}; admin routes: --admin-api-key; /health: open"

    def check(self, scope: dict[str, Any]) -> HTTPError | None:
        """None when the request may go on, else the 401/403 error to answer."""
        path = scope["path"]
        kind = classify(path)
        if kind == "open":
            return None
        admin = kind == "admin"
        data_key, admin_key = self.data_key, self.admin_key
        if admin:
            needed = admin_key if admin_key is not None else data_key
        else:
            needed = data_key
        if needed is None:
            return None
        token, problem = _bearer(scope["headers"])
        if token is not None:
            # both comparisons always made, in constant time: the answer's timing says nothing about the key
            is_data = hmac.compare_digest(token, data_key) if data_key is not None else False
            is_admin = hmac.compare_digest(token, admin_key) if admin_key is not None else False
            if is_admin or (is_data and (not admin or admin_key is None)):
                return None
            if is_data:  # the data key on an admin route: authenticated, not allowed
                return HTTPError(
                    403, f"{scope['method']} {path} changes the router's state and needs the admin key: the key sent "
                         f"is the data-plane key (--api-key). Send 'Authorization: Bearer <admin key>' with the "
                         f"--admin-api-key ({ADMIN_API_KEY_ENV}) value.",
                    type="permission_error", code="admin_key_required")
            problem = "the key sent is not valid"
        which = (f"the admin key (--admin-api-key / {ADMIN_API_KEY_ENV}): {scope['method']} {path} changes the "
                 f"router's state" if admin and admin_key is not None else
                 f"an API key (--api-key / {API_KEY_ENV}{'; the admin key works too' if admin_key else ''})")
        return HTTPError(401, f"Unauthorized: {problem}. This router needs {which}. Send it as "
                              f"'Authorization: Bearer <key>' (X-API-Key and query parameters are not read).",
                         type="authentication_error", code="invalid_api_key" if token is not None
                         else "missing_api_key")


def _bearer(headers: list[tuple[bytes, bytes]]) -> tuple[bytes | None, str]:
    """(the Bearer token, None) or (None, why there is none) from the raw ASGI headers."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() != b"bearer":
                return None, "the Authorization header is not 'Bearer <key>'"
            token = token.strip()
            return (token, "") if token else (None, "the Authorization header has no key after 'Bearer'")
    for name, _ in headers:
        if name == b"x-api-key":
            return None, "no Authorization header (an X-API-Key header is not read)"
    return None, "no API key was sent"


async def deny(send: Any, error: HTTPError) -> None:
    """Answer ``error`` (401/403) on the raw ASGI ``send``, with ``WWW-Authenticate: Bearer`` (RFC 6750)."""
    body = orjson.dumps(error.to_dict())
    if error.status == 403:
        challenge = b'Bearer realm="slime-router", error="insufficient_scope"'
    elif error.code == "invalid_api_key":
        challenge = b'Bearer realm="slime-router", error="invalid_token"'
    else:
        challenge = b'Bearer realm="slime-router"'
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"www-authenticate", challenge)]})
    await send({"type": "http.response.body", "body": body})
