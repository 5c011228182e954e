"""Every hook a slime-router plugin can implement.

A plugin is any object (usually a module) whose functions are decorated with ``@hookimpl``.
It is found through the ``slime_router`` entry-point group, selected with ``--plugin``,
blocked with ``--no-plugin``, or loaded by dotted path with ``--slime-router-middleware-paths``.

Conventions (after pytest and datasette):
- Hook names are plain verbs. Implementations may accept any subset of the arguments.
- Hooks marked "may return an awaitable" are awaited by the caller (pluggy itself is sync).
- ``firstresult`` hooks *decide* something: the first non-``None`` answer wins.
- Request-path hooks are only called when at least one plugin implements them, so an
  unimplemented hook costs nothing per request.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover - typing only
    from fastapi import FastAPI

    from .context import RequestContext
    from .registry import ComponentRegistry
    from .router import Router
    from .settings import OptionRegistry
    from .workers import Worker

PROJECT = "slime_router"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --- configuration and start-up ------------------------------------------------------------


@hookspec
def add_options(options: OptionRegistry) -> None:
    """Declare command-line flags (each also readable from an environment variable).

    Called once, before the command line is parsed, for every loaded plugin.
    Use ``options.add("--radix-tree-max-size", type=int, default=10000, help=...)``.
    Values are read back as attributes of ``router.settings`` (dashes become underscores).
    """


@hookspec
def required_components() -> list[str]:  # type: ignore[empty-body]  # a hookspec: signature only
    """Return the names of registry components this plugin needs (e.g. ``["tokenizer"]``).

    Checked at start-up, after every plugin's ``register_components``: a missing one stops
    start-up with a message naming this plugin, instead of failing at the first request.
    """


@hookspec
def register_components(registry: ComponentRegistry, router: Router) -> None:
    """Register components other plugins may use: ``registry.register(TRAJECTORY_CACHE, cache)``.

    Shared components are registered under the typed keys of ``slime_router_core.contracts`` and must implement
    the key's protocol (checked here). To replace a first-party component (e.g. your own trajectory cache behind
    the radix_tree plugin's routes and hooks), register it from a ``tryfirst=True`` implementation: the
    first-party plugin then uses yours.

    Called once while the app is built, before ``register_routes``. Plugins reach each other
    only through the registry (or hooks), never by importing each other's internals.
    """


@hookspec
def register_routes(app: FastAPI, router: Router) -> None:
    """Add HTTP routes to the FastAPI app (``@app.post("/retrieve_from_text")``...).

    Called once while the app is built. Routes added here go through FastAPI (validation,
    OpenAPI docs: declare request and response models); the ``/generate`` hot path stays a lean raw-ASGI route.
    The core's own routes come from the built-in ``core`` plugin (``slime_router_core/admin.py``) through this
    hook: the admin API first, then, after every other plugin, the worker endpoints no plugin serves itself.
    """


@hookspec
def startup(router: Router) -> Awaitable[None] | None:
    """Called when the server starts serving (inside the event loop). May return an awaitable.

    Start background tasks here (health checkers...).
    """


@hookspec
def shutdown(router: Router) -> Awaitable[None] | None:
    """Called when the server stops. May return an awaitable. Cancel background tasks here."""


# --- worker pool ---------------------------------------------------------------------------


@hookspec
def worker_added(worker: Worker, router: Router) -> None:
    """Called after a worker joins the pool (``/add_worker`` or ``--worker-url``)."""


@hookspec
def worker_removed(worker: Worker, router: Router) -> None:
    """Called after a worker leaves the pool. Its in-flight requests still finish."""


# --- the request path ----------------------------------------------------------------------


@hookspec
def pre_request(ctx: RequestContext) -> Awaitable[None] | None:
    """Called before a request is sent upstream. May return an awaitable.

    ``ctx.body`` is the parsed JSON that **will be sent**: mutate it (or assign a new dict) to
    rewrite the upstream request. Raise ``slime_router_core.HTTPError`` to reject the request.
    Set ``ctx.inspect_stream = True`` to receive ``stream_chunk`` calls for a streaming reply.
    """


@hookspec(firstresult=True)
def select_worker(ctx: RequestContext, workers: list[Worker]) -> Worker | None:
    """Choose the worker for this attempt: the balancing policy. ``firstresult``.

    ``workers`` are the candidates (in the pool, available, not yet tried by this request);
    never empty. Return one of them, or ``None`` to let the next plugin (finally the core's
    round-robin) decide. Must be synchronous: selection and in-flight accounting happen
    without an ``await`` in between, which makes them race-free.
    """


@hookspec
def worker_selected(ctx: RequestContext, worker: Worker) -> None:
    """Called once per attempt after a worker was chosen, before the upstream call."""


@hookspec(firstresult=True)
def should_retry(
    ctx: RequestContext, worker: Worker, status: int | None, error: BaseException | None, attempt: int
) -> bool | float | None:
    """Decide whether a failed attempt is retried on another worker. ``firstresult``.

    Called only while nothing has been sent to the client and fewer than ``--max-attempts``
    attempts were made. ``status`` is the worker's HTTP status (``None`` for connection
    errors, then ``error`` is set). Return ``False`` (give up), ``True`` (retry now), a float
    (retry after that many seconds) or ``None`` (no opinion: the core retries connection
    errors only).
    """


@hookspec
def upstream_failed(ctx: RequestContext, worker: Worker, status: int | None, error: BaseException | None) -> None:
    """Called for every failed upstream attempt (connection error or status >= 500)."""


@hookspec
def stream_chunk(ctx: RequestContext, chunk: dict[str, Any]) -> Awaitable[None] | None:
    """Called for each parsed SSE ``data:`` object of a streaming reply, in order.

    Only when a ``pre_request`` set ``ctx.inspect_stream``. Mutate ``chunk`` in place to change
    what the client receives. The ``[DONE]`` marker is not passed. May return an awaitable, awaited before the
    chunk is relayed (return one only when there is work to wait for: most chunks should cost no coroutine).
    """


@hookspec
def post_response(ctx: RequestContext, response: Any) -> Awaitable[None] | None:
    """Called with the worker's reply. May return an awaitable.

    Non-streaming: ``response`` is the parsed JSON reply (dict, or list for a batch) after a
    successful (2xx) upstream call; mutate it in place, or set ``ctx.response`` to replace it.
    ``ctx.raw_response`` holds the worker's reply bytes as received (e.g. to hand them to another
    process without re-serializing). Streaming: called once after the stream ended normally, with
    ``response`` = the list of chunks passed to ``stream_chunk`` (empty unless ``ctx.inspect_stream``);
    it can no longer change what the client got.
    """


@hookspec
def request_finished(ctx: RequestContext) -> None:
    """Called once per proxied request after the client got its answer (or went away).

    ``ctx.status`` is the status sent (499 for a client disconnect), ``ctx.error`` an error
    message if any, ``ctx.timings`` the per-stage durations, ``ctx.worker`` the last worker.
    """
