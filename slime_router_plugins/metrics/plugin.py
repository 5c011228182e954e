"""The metrics plugin: ``GET /metrics`` (the seed guide's JSON, or Prometheus text when asked).

Routes:
- ``GET /metrics`` — JSON ``{"router": {...}, "cache": {...}, ...}``; Prometheus text exposition
  instead when the ``Accept`` header asks for ``text/plain`` or ``application/openmetrics-text``
  (as Prometheus' scraper does) or with ``?format=prometheus``.
- ``GET /metrics/prometheus`` — always the Prometheus exposition (OpenMetrics if accepted).
- ``GET /metrics/requests`` — the per-request timing breakdowns of the last N requests.

Options: ``--metrics-max-weight-versions`` (label bound), ``--metrics-recent-requests`` (N).
With the core's ``--verbose`` every request's breakdown (queueing, retrying, tokenization,
upstream, time to first token, recording, total) is logged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import FastAPI, Query, Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client.exposition import choose_encoder

from slime_router_core import hookimpl
from slime_router_core.contracts import METRICS, TRAJECTORY_CACHE
from slime_router_core.settings import PluginConfig, at_least, option

from .collector import MetricsState
from .models import MetricsSnapshot, RecentRequests

if TYPE_CHECKING:  # pragma: no cover
    from slime_router_core.context import RequestContext
    from slime_router_core.router import Router
    from slime_router_core.workers import Worker

COMPONENT = "metrics"

# Request-path hooks receive only ``ctx``; these find the app's MetricsState from it. Keyed per
# app (one entry per worker / per serving event loop), never shared between apps.
def _state(ctx: RequestContext) -> MetricsState | None:
    """This app's metrics (every context carries the router that serves it)."""
    router = ctx.router
    if router is None or not router.registry.has(COMPONENT):
        return None
    return router.registry.get(COMPONENT)


# --- configuration and start-up ----------------------------------------------------------------


@dataclass(frozen=True)
class MetricsConfig(PluginConfig):
    flag_prefix = "--metrics-"
    max_weight_versions: int = option(
        20, check=at_least(1),
        help="Distinct weight versions kept as Prometheus label values; older ones are counted as 'other'.")
    recent_requests: int = option(
        100, check=at_least(0),
        help="How many recent per-request timing breakdowns GET /metrics/requests keeps (0: off).")


@hookimpl
def add_options(options: Any) -> None:
    options.add_config(MetricsConfig)


@hookimpl
def register_components(registry: Any, router: Router) -> None:
    config = router.settings.config(MetricsConfig)
    registry.register(METRICS, MetricsState(router, max_versions=config.max_weight_versions,
                                            recent=config.recent_requests), owner="metrics")


@hookimpl
def register_routes(app: FastAPI, router: Router) -> None:
    state: MetricsState = router.registry.get(COMPONENT)
    state.app = app  # type: ignore[attr-defined]  # read at startup for the route label set

    async def refresh() -> None:
        """Components that live in another process (the trajectory cache with --radix-tree-process) fetch
        their statistics before a scrape reads them."""
        cache = router.registry.find(TRAJECTORY_CACHE)
        if cache is not None:
            await cache.refresh()

    # Prometheus' text exposition, or OpenMetrics when the Accept header asks for it.
    exposition = {"text/plain": {"schema": {"type": "string", "description": "Prometheus text exposition 0.0.4"}},
                  "application/openmetrics-text": {"schema": {"type": "string", "description": "OpenMetrics 1.0"}}}

    @app.get("/metrics", response_model=MetricsSnapshot, responses={200: {"content": exposition}})
    async def metrics(request: Request, fmt: str | None = Query(
            None, alias="format", description="prometheus or openmetrics: the text exposition, whatever the Accept "
                                              "header says")) -> Response:
        """Router, worker and trajectory-cache metrics as JSON; Prometheus text when the Accept
        header asks for ``text/plain`` / ``application/openmetrics-text`` or with ``?format=prometheus``."""
        await refresh()
        accept = request.headers.get("accept", "")
        if fmt in ("prometheus", "openmetrics") or (fmt is None and wants_prometheus(accept)):
            if fmt == "openmetrics" and "openmetrics" not in accept:
                accept = "application/openmetrics-text; version=1.0.0"
            return prometheus_response(state, accept)
        return Response(orjson.dumps(state.snapshot(), option=orjson.OPT_NON_STR_KEYS),
                        media_type="application/json")

    @app.get("/metrics/prometheus", response_class=PlainTextResponse, responses={200: {"content": exposition}})
    async def metrics_prometheus(request: Request) -> Response:
        """Prometheus text exposition (OpenMetrics when the Accept header asks for it)."""
        await refresh()
        return prometheus_response(state, request.headers.get("accept", ""))

    @app.get("/metrics/requests", response_model=RecentRequests, response_model_exclude_unset=True)
    async def metrics_requests(limit: int | None = None) -> dict:
        """The per-request timing breakdowns (milliseconds) of the most recent requests, newest last."""
        capacity = state.recent.maxlen if state.recent is not None else 0
        return {"capacity": capacity, "requests": state.recent_requests(limit)}


def wants_prometheus(accept: str) -> bool:
    """True when the Accept header prefers Prometheus text over JSON (``*/*`` alone means JSON)."""
    best: tuple[float, int, bool] | None = None
    for i, part in enumerate(accept.split(",")):
        fields = [f.strip() for f in part.split(";")]
        media = fields[0].lower()
        if media in ("text/plain", "application/openmetrics-text"):
            prom = True
        elif media == "application/json":
            prom = False
        else:
            continue
        q = 1.0
        for f in fields[1:]:
            if f.startswith("q="):
                try:
                    q = float(f[2:])
                except ValueError:
                    pass
        if best is None or q > best[0]:
            best = (q, i, prom)
    return best is not None and best[2]


def prometheus_response(state: MetricsState, accept: str) -> Response:
    encoder, content_type = choose_encoder(accept)
    return Response(encoder(state.registry), media_type=None, headers={"Content-Type": content_type})


@hookimpl
def startup(router: Router) -> None:
    state: MetricsState = router.registry.get(COMPONENT)
    app = getattr(state, "app", None)
    if app is not None:
        state.set_known_routes(getattr(r, "path", None) for r in app.routes)


# --- the request path (each hook: a few dict updates) ----------------------------------------------


@hookimpl
def worker_selected(ctx: RequestContext, worker: Worker) -> None:
    state = _state(ctx)
    if state is not None:
        state.on_worker_selected(ctx)


@hookimpl
def upstream_failed(ctx: RequestContext, worker: Worker, status: int | None, error: BaseException | None) -> None:
    state = _state(ctx)
    if state is not None:
        state.on_upstream_failed(status, error)


@hookimpl
def post_response(ctx: RequestContext, response: Any) -> None:
    state = _state(ctx)
    if state is not None:
        state.on_response(ctx, response)


@hookimpl
def request_finished(ctx: RequestContext) -> None:
    state = _state(ctx)
    if state is not None:
        state.on_finished(ctx)
