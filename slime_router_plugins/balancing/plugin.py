"""The balancing plugin: policies, health checks, circuit breaker, retries, rid tracking, drain, RL routes.

Shape: this module declares the flags (``add_options``) and, in ``register_components``, builds one
``Balancer`` per router app, registered as component ``"balancing"`` (read by the metrics plugin:
``worker_stats()``, ``retries``, ``policy``). The module's hooks find their app's Balancer through
``ctx.router`` / ``router``, so nothing is shared between two apps built in one process.

Hooks:
- ``pre_request`` (tryfirst): the pause/drain gate (waits, or 503 with ``--drain-mode reject``).
- ``select_worker`` (trylast, so a third-party policy plugin can override it): the ``--policy``.
- ``worker_selected``: rid -> worker tracking (for ``/abort_request``), circuit half-open probe.
- ``upstream_failed``: circuit breaker failures. ``should_retry`` (trylast): retry codes + backoff.
- ``request_finished``: successes (closes circuits, latency EMA), rid clean-up, drain accounting.
- ``startup`` / ``shutdown``: the health checker task. ``worker_added`` / ``worker_removed``.
- ``register_routes``: ``POST /abort_request``, ``/update_weights_from_disk``, ``/update_weight_version``,
  ``/pause``, ``/resume``, ``GET /workers/state``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import orjson
from fastapi import Body
from fastapi.responses import Response
from pydantic import BaseModel

from slime_router_core import HTTPError, hookimpl
from slime_router_core.admin import ErrorResponse
from slime_router_core.context import StashKey
from slime_router_core.contracts import BALANCER
from slime_router_core.settings import PluginConfig, at_least, option

from . import POLICIES
from .base import Policy
from .health import CircuitBreaker, HealthChecker, init_worker_state
from .models import (
    AbortReport,
    AbortRequest,
    BalancingState,
    BroadcastReport,
    PauseReport,
    PauseRequest,
    ResumeReport,
    UpdateWeightsFromDiskRequest,
    UpdateWeightVersionRequest,
)

if TYPE_CHECKING:  # pragma: no cover
    from fastapi import FastAPI

    from slime_router_core.context import RequestContext
    from slime_router_core.registry import ComponentRegistry
    from slime_router_core.router import Router
    from slime_router_core.settings import OptionRegistry
    from slime_router_core.workers import Worker

log = logging.getLogger("slime_router.balancing")

DEFAULT_POLICY = "cache_aware"
MAX_TRACKED_RIDS = 200_000
LATENCY_EMA_ALPHA = 0.2

# per-request values owned by this plugin
_ADMITTED: StashKey[bool] = StashKey("balancing.admitted")  # counted in ``active`` (released when finished)
_RIDS: StashKey[list[str]] = StashKey("balancing.rids")  # the request's rids, tracked for /abort_request


# --- options -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BalancingConfig(PluginConfig):
    policy: str = option(
        DEFAULT_POLICY, flag="--policy", aliases=("--balancing-policy",), choices=tuple(sorted(POLICIES)),
        help="Worker-selection policy. cache_aware keeps multi-turn trajectories on the worker holding their KV "
             "prefix (via the radix_tree plugin or an X-Session-ID header / OpenAI 'user') and falls back to least "
             "in-flight.")
    cache_aware_abs_threshold: float = option(
        32, flag="--cache-aware-abs-threshold", aliases=("--balance-abs-threshold",), check=at_least(0),
        help="cache_aware: the preferred worker is overloaded (request goes to the least loaded one) when its "
             "in-flight count exceeds the least loaded worker's by more than this ...")
    cache_aware_rel_threshold: float = option(
        1.5, flag="--cache-aware-rel-threshold", aliases=("--balance-rel-threshold",), check=at_least(1),
        help="... and is more than this many times the least loaded worker's in-flight count.")
    cache_aware_min_match: float = option(
        0.3, flag="--cache-aware-min-match", aliases=("--cache-threshold",),
        check=lambda v: None if 0 <= v <= 1 else "must be within [0, 1]",
        help="cache_aware: use the trajectory affinity only when the recorded prefix covers at least this fraction "
             "of the prompt.")
    health_check_path: str = option("/health", flag="--health-check-path", aliases=("--health-check-endpoint",),
                                    help="Path probed on every worker by the background health checker.")
    health_check_interval: float = option(
        5.0, flag="--health-check-interval", aliases=("--health-check-interval-secs",), check=at_least(0),
        help="Seconds between health-check rounds (0 disables active health checks).")
    health_check_timeout: float = option(
        5.0, flag="--health-check-timeout", aliases=("--health-check-timeout-secs",), check=at_least(0),
        help="Timeout of one health probe, in seconds.")
    health_failure_threshold: int = option(3, flag="--health-failure-threshold", check=at_least(1),
                                           help="Consecutive failed probes that take a worker out of rotation.")
    health_success_threshold: int = option(
        2, flag="--health-success-threshold", check=at_least(1),
        help="Consecutive good probes that put an unhealthy worker back into rotation.")
    circuit_failure_threshold: int = option(
        5, flag="--circuit-failure-threshold", aliases=("--cb-failure-threshold",), check=at_least(0),
        help="Consecutive failed requests (connection error or 5xx) that open a worker's circuit (0 disables the "
             "circuit breaker).")
    circuit_cooldown: float = option(
        10.0, flag="--circuit-cooldown", aliases=("--cb-timeout-duration-secs",), check=at_least(0),
        help="Seconds an open circuit waits before letting one probe request through (half-open).")
    retry_status_codes: frozenset[int] = option(
        frozenset({502, 503, 504}), flag="--retry-status-codes", parse=lambda v: parse_status_codes(v),
        help="Comma-separated 5xx worker statuses retried on another worker (connection errors always are), while "
             "nothing was streamed. The attempt bound is the core's --max-attempts.")
    retry_backoff_base: float = option(
        0.05, flag="--retry-backoff-base", check=at_least(0),
        help="First retry delay in seconds; doubles per attempt (with jitter), capped by --retry-backoff-max.")
    retry_backoff_max: float = option(2.0, flag="--retry-backoff-max", check=at_least(0),
                                      help="Largest retry delay in seconds.")
    seed: int | None = option(
        None, flag="--balancing-seed",
        help="Seed for power_of_two's sampling and the retry jitter, for reproducible runs (default: random).")
    drain_mode: str = option(
        "wait", flag="--drain-mode", choices=("wait", "reject"),
        help="While paused (POST /pause): 'wait' holds new requests until POST /resume; 'reject' answers them 503.")
    drain_timeout: float = option(
        60.0, flag="--drain-timeout", check=at_least(0),
        help="POST /pause answers when in-flight requests reach 0 or after this many seconds.")


@hookimpl
def add_options(options: OptionRegistry) -> None:
    options.add_config(BalancingConfig)


def parse_status_codes(value: Any) -> frozenset:
    """``"502,503 504"`` or ``[502, "503"]`` -> ``frozenset({502, 503, 504})``; only 5xx can be retried."""
    items = value if isinstance(value, (list, tuple, set, frozenset)) else str(value).replace(",", " ").split()
    codes = set()
    for item in items:
        for part in str(item).replace(",", " ").split():
            try:
                code = int(part)
            except ValueError:
                raise ValueError(f"--retry-status-codes: {part!r} is not an HTTP status code") from None
            if not 500 <= code <= 599:
                raise ValueError(f"--retry-status-codes: {code} cannot be retried: only 5xx worker answers are "
                                 "(the core passes 4xx answers straight to the client)")
            codes.add(code)
    return frozenset(codes)


@hookimpl
def register_components(registry: ComponentRegistry, router: Router) -> None:
    balancer = Balancer(router, router.settings.config(BalancingConfig))
    registry.register(BALANCER, balancer, owner="balancing")


def _balancer(router: Router) -> Balancer:
    return router.registry.get("balancing")


@hookimpl
def startup(router: Router) -> Any:
    return _balancer(router).startup(router)


@hookimpl
def shutdown(router: Router) -> Any:
    return _balancer(router).shutdown(router)


@hookimpl
def worker_added(worker: Worker, router: Router) -> None:
    _balancer(router).worker_added(worker, router)


@hookimpl
def worker_removed(worker: Worker, router: Router) -> None:
    _balancer(router).worker_removed(worker, router)


@hookimpl
def register_routes(app: FastAPI, router: Router) -> None:
    _balancer(router).register_routes(app, router)


@hookimpl(tryfirst=True)  # the drain gate comes before anything else
def pre_request(ctx: RequestContext) -> Any:
    return _balancer(ctx.router).pre_request(ctx)


@hookimpl(trylast=True)  # a third-party policy plugin can override the --policy
def select_worker(ctx: RequestContext, workers: list[Worker]) -> Worker | None:
    return _balancer(ctx.router).select_worker(ctx, workers)


@hookimpl
def worker_selected(ctx: RequestContext, worker: Worker) -> None:
    _balancer(ctx.router).worker_selected(ctx, worker)


@hookimpl
def upstream_failed(ctx: RequestContext, worker: Worker, status: int | None, error: BaseException | None) -> None:
    _balancer(ctx.router).upstream_failed(ctx, worker, status, error)


@hookimpl(trylast=True)
def should_retry(ctx: RequestContext, worker: Worker, status: int | None, error: BaseException | None,
                 attempt: int) -> bool | float | None:
    return _balancer(ctx.router).should_retry(ctx, worker, status, error, attempt)


@hookimpl
def request_finished(ctx: RequestContext) -> None:
    _balancer(ctx.router).request_finished(ctx)


# --- the runtime ---------------------------------------------------------------------------------


class Balancer:
    """Per-app state and hook methods. Component ``"balancing"``.

    Public: ``policy`` (name), ``retries`` (count of retries granted), ``worker_stats()``, ``state()``,
    ``paused``, ``active`` (admitted requests not finished), ``workers_for_rid(rid)``.
    """

    def __init__(self, router: Router, config: BalancingConfig) -> None:
        self.router = router
        self.config = config
        self.policy: str = config.policy
        self.policy_impl: Policy = POLICIES[config.policy](config)
        self.retries = 0
        self.health = HealthChecker(router, path=config.health_check_path, interval=config.health_check_interval,
                                    timeout=config.health_check_timeout,
                                    failure_threshold=config.health_failure_threshold,
                                    success_threshold=config.health_success_threshold)
        self.breaker = CircuitBreaker(config.circuit_failure_threshold, config.circuit_cooldown)
        self.rids: dict[str, Worker] = {}
        self.random = random.Random(config.seed)
        # drain
        self.paused = False
        self.drain_mode = config.drain_mode
        self.active = 0  # requests admitted by the gate and not finished yet
        self.waiting = 0  # requests held at the gate
        self._resumed: asyncio.Event | None = None
        self.paused_at: float | None = None

    # --- lifecycle -------------------------------------------------------------------------------

    def _known(self, worker: Worker) -> None:
        if "circuit" not in worker.state:
            init_worker_state(worker)
            self.policy_impl.worker_added(worker)

    def startup(self, router: Router) -> None:
        if router is not self.router:
            return
        self._resumed = asyncio.Event()
        self._resumed.set()
        for w in router.pool:
            self._known(w)
        self.health.start()

    async def shutdown(self, router: Router) -> None:
        if router is not self.router:
            return
        self.breaker.close()
        self.paused = False  # release held requests (they fail or finish as the server stops)
        if self._resumed is not None:
            self._resumed.set()
        await self.health.stop()

    def worker_added(self, worker: Worker, router: Router) -> None:
        if router is self.router:
            self._known(worker)

    def worker_removed(self, worker: Worker, router: Router) -> None:
        if router is self.router:
            self.policy_impl.worker_removed(worker)
            self.breaker.forget(worker)

    # --- request path ----------------------------------------------------------------------------

    def pre_request(self, ctx: RequestContext) -> Any:
        if not self.paused:  # fast path: no coroutine per request
            self.active += 1
            ctx.stash[_ADMITTED] = True
            return None
        if self.drain_mode == "reject":
            raise HTTPError(503, "The router is paused (draining for a weight update); retry after POST /resume.",
                            type="service_unavailable", code="router_paused")
        return self._wait_until_resumed(ctx)

    async def _wait_until_resumed(self, ctx: RequestContext) -> None:
        self.waiting += 1
        try:
            while self.paused and self._resumed is not None:
                await self._resumed.wait()
        finally:
            self.waiting -= 1
        self.active += 1
        ctx.stash[_ADMITTED] = True

    def select_worker(self, ctx: RequestContext, workers: list[Worker]) -> Worker | None:
        return self.policy_impl.select(ctx, workers)

    def worker_selected(self, ctx: RequestContext, worker: Worker) -> None:
        body = ctx.body
        if isinstance(body, dict):  # a generation (not the core's GET forwarding, which has no body)
            self.breaker.on_selected(worker)
            rid = body.get("rid")
            if rid:
                rids = ctx.stash.get(_RIDS)
                if rids is None:
                    rids = [rid] if isinstance(rid, str) else [r for r in rid if isinstance(r, str)]
                    ctx.stash[_RIDS] = rids
                for r in rids:
                    self.rids.pop(r, None)  # re-insert: keeps insertion order = age
                    self.rids[r] = worker
                if len(self.rids) > MAX_TRACKED_RIDS:  # a caller that never finishes its contexts
                    for r in list(self.rids)[: len(self.rids) - MAX_TRACKED_RIDS]:
                        del self.rids[r]

    def upstream_failed(self, ctx: RequestContext, worker: Worker, status: int | None,
                        error: BaseException | None) -> None:
        worker.state["last_failure"] = status if status is not None else type(error).__name__
        self.breaker.on_failure(worker)

    def should_retry(self, ctx: RequestContext, worker: Worker, status: int | None, error: BaseException | None,
                     attempt: int) -> bool | float:
        if ctx.sent_to_client:
            return False
        if error is None and status not in self.config.retry_status_codes:
            return False
        if attempt >= self.router.settings.max_attempts:
            return False
        if not any(w.available and w not in ctx.tried for w in self.router.pool):
            return False  # nowhere else to go: the worker's own answer reaches the client now
        self.retries += 1
        delay = min(self.config.retry_backoff_max, self.config.retry_backoff_base * (2 ** (attempt - 1)))
        delay *= 0.5 + 0.5 * self.random.random()  # jitter: no synchronized retry waves
        return delay if delay > 0 else True

    def request_finished(self, ctx: RequestContext) -> None:
        stash = ctx.stash
        if stash.pop(_ADMITTED, False):
            self.active -= 1
        worker = ctx.worker
        rids = stash.pop(_RIDS, None)
        if rids:
            for r in rids:
                if self.rids.get(r) is worker:
                    del self.rids[r]
        if worker is None:
            return
        status = ctx.status
        if status == 499 or status >= 500:
            # 5xx: the failed attempt was already counted by upstream_failed (or it was the router's own error)
            self.breaker.on_neutral(worker)
            return
        if ctx.error and status < 400:  # the stream broke after it began
            self.breaker.on_failure(worker)
            return
        self.breaker.on_success(worker)
        if status < 400:
            t = ctx.timings
            latency = t.get("total") if ctx.stream else t.get("upstream", t.get("total"))
            if latency is not None:
                old = worker.state.get("latency_ema_s")
                worker.state["latency_ema_s"] = latency if old is None else \
                    old + LATENCY_EMA_ALPHA * (latency - old)

    # --- stats (for the metrics plugin and GET /workers/state) -------------------------------------

    def worker_stats(self) -> list[dict[str, Any]]:
        now = time.time()
        out = []
        for w in self.router.pool:
            st = w.state
            checked = st.get("last_health_check")
            out.append({
                "url": w.url,
                "in_flight": w.inflight,
                "requests": w.requests,
                "failures": w.failures,
                "healthy": w.healthy,
                "available": w.available,
                "health": st.get("health", "healthy" if w.healthy else "unhealthy"),
                "health_failures": st.get("health_failures", 0),
                "last_health_status": st.get("last_health_status"),
                "last_health_check_age_s": None if checked is None else round(now - checked, 3),
                "circuit": st.get("circuit", "closed"),
                "circuit_open": bool(st.get("circuit_open", False)),
                "circuit_opens": st.get("circuit_opens", 0),
                "consecutive_failures": st.get("consecutive_failures", 0),
                "last_failure": st.get("last_failure"),
                "latency_ema_s": st.get("latency_ema_s"),
                "reported_load": st.get("reported_load"),
            })
        return out

    def state(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "policy_stats": dict(self.policy_impl.stats),
            "paused": self.paused,
            "drain_mode": self.drain_mode,
            "active_requests": self.active,
            "waiting_requests": self.waiting,
            "in_flight": self.router.pool.total_inflight(),
            "retries": self.retries,
            "tracked_rids": len(self.rids),
            "health_check": {"path": self.health.path, "interval_s": self.health.interval,
                             "timeout_s": self.health.timeout, "rounds": self.health.rounds,
                             "failure_threshold": self.health.failure_threshold,
                             "success_threshold": self.health.success_threshold},
            "circuit_breaker": {"failure_threshold": self.breaker.threshold, "cooldown_s": self.breaker.cooldown},
            "workers": self.worker_stats(),
        }

    # --- rid lookup --------------------------------------------------------------------------------

    def workers_for_rid(self, rid: str) -> list[str]:
        """URLs of the workers holding requests whose rid matches ``rid`` (SGLang matches by prefix).

        A tracked batch rid ``abc`` becomes ``abc_0``, ``abc_1``... inside the worker, so ``abc_1`` also
        matches the tracked ``abc``.
        """
        urls: dict[str, None] = {}
        exact = self.rids.get(rid)
        if exact is not None:
            urls[exact.url] = None
        for r, w in self.rids.items():
            if r.startswith(rid) or rid.startswith(r):
                urls[w.url] = None
        return list(urls)

    # --- drain ---------------------------------------------------------------------------------------

    def pause(self, mode: str | None = None) -> None:
        if mode is not None:
            self.drain_mode = mode
        if not self.paused:
            self.paused = True
            self.paused_at = time.time()
            if self._resumed is not None:
                self._resumed.clear()
            log.warning("router paused (%s mode): draining %d in-flight requests", self.drain_mode, self.active)

    def resume(self) -> int:
        released = self.waiting
        self.paused = False
        self.paused_at = None
        self.drain_mode = self.config.drain_mode
        if self._resumed is not None:
            self._resumed.set()
        log.warning("router resumed: releasing %d held requests", released)
        return released

    def drained(self) -> bool:
        return self.active <= 0 and self.router.pool.total_inflight() == 0

    async def wait_drained(self, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        while not self.drained():
            if loop.time() >= deadline or not self.paused:
                return self.drained()
            await asyncio.sleep(0.01)
        return True

    # --- routes --------------------------------------------------------------------------------------

    def register_routes(self, app: FastAPI, router: Router) -> None:
        if router is not self.router:
            return
        balancer = self

        # The bodies are parsed by FastAPI into the models of models.py (a refusal is the core's 400, naming the
        # field); the answers keep their orjson serialization and status codes, described by the same models.
        no_workers: dict[int | str, dict[str, Any]] = {
            503: {"model": ErrorResponse, "description": "No workers registered"}}
        worker_failed: dict[int | str, dict[str, Any]] = {
            502: {"model": BroadcastReport, "description": "A worker failed (each worker's result)"}, **no_workers}

        @app.post("/abort_request", response_model=AbortReport,
                  responses={502: {"model": AbortReport, "description": "A worker failed"}, **no_workers})
        async def abort_request(body: Annotated[AbortRequest | None, Body()] = None) -> Response:
            """Abort by rid (SGLang prefix match), sent only to the worker(s) holding it.

            JSON ``{"rid": "...", "abort_all": false}``. An untracked rid, or ``abort_all``, goes to every
            worker. Answers per worker.
            """
            body = body or AbortRequest()
            rid, abort_all = body.rid, body.abort_all
            if not abort_all and not rid:
                raise HTTPError(400, "Give 'rid' (matched as a prefix of request ids) or 'abort_all': true.",
                                param="rid")
            _require_workers(balancer.router)
            targets: list[str] = []
            if not abort_all:
                assert rid is not None  # checked above: a non-empty string unless abort_all
                targets = balancer.workers_for_rid(rid)
            routed = "tracked" if targets else "broadcast"
            results = await balancer.router.broadcast("POST", "/abort_request", body.model_dump(exclude_unset=True),
                                                      urls=targets or None)
            ok = all(200 <= s < 300 for s, _ in results.values())
            return _json({"success": ok, "rid": rid, "abort_all": abort_all, "routed": routed,
                          "workers": {u: {"status": s, "response": r} for u, (s, r) in results.items()}},
                         200 if ok else 502)

        async def all_or_nothing(path: str, body: BaseModel | None) -> Response:
            _require_workers(balancer.router)
            payload = body.model_dump(exclude_unset=True) if body is not None else None  # as sent, extras included
            results = await balancer.router.broadcast("POST", path, payload)
            workers, failed = {}, []
            for url, (status, resp) in results.items():
                ok = 200 <= status < 300 and not (isinstance(resp, dict) and resp.get("success") is False)
                workers[url] = {"status": status, "success": ok, "response": resp}
                if not ok:
                    failed.append(url)
            if not failed:
                code = 200
            else:
                statuses = {results[u][0] for u in failed}
                same_client_error = len(failed) == len(results) and len(statuses) == 1 and \
                    400 <= next(iter(statuses)) < 500
                code = next(iter(statuses)) if same_client_error else 502
                log.warning("%s failed on %d/%d workers: %s", path, len(failed), len(results), failed)
            return _json({"success": not failed, "failed": failed, "workers": workers}, code)

        @app.post("/update_weights_from_disk", response_model=BroadcastReport, responses=worker_failed)
        async def update_weights_from_disk(body: Annotated[UpdateWeightsFromDiskRequest | None, Body()] = None
                                           ) -> Response:
            """Broadcast to every worker; 200 only if all succeeded, else 502 with each worker's result."""
            return await all_or_nothing("/update_weights_from_disk", body)

        @app.post("/update_weight_version", response_model=BroadcastReport, responses=worker_failed)
        async def update_weight_version(body: Annotated[UpdateWeightVersionRequest | None, Body()] = None
                                        ) -> Response:
            """Broadcast ``{"new_version": ...}`` to every worker; 200 only if all succeeded."""
            return await all_or_nothing("/update_weight_version", body)

        @app.post("/pause", response_model=PauseReport)
        async def pause(body: Annotated[PauseRequest | None, Body()] = None) -> Response:
            """Stop admitting requests and wait for in-flight ones (drain).

            Optional JSON: ``{"timeout": seconds, "mode": "wait"|"reject", "wait": true}``. New requests are
            held (``wait``) or answered 503 (``reject``) until ``POST /resume``. Answers when in-flight
            reaches 0 (``drained: true``) or at the timeout (``drained: false``; still paused).
            """
            body = body or PauseRequest()
            timeout = balancer.config.drain_timeout if body.timeout is None else body.timeout
            balancer.pause(body.mode)
            started = time.perf_counter()
            drained = await balancer.wait_drained(timeout) if body.wait else balancer.drained()
            return _json({"paused": balancer.paused, "drained": drained, "mode": balancer.drain_mode,
                          "in_flight": max(balancer.active, balancer.router.pool.total_inflight()),
                          "waiting_requests": balancer.waiting,
                          "waited_s": round(time.perf_counter() - started, 4)})

        @app.post("/resume", response_model=ResumeReport)
        async def resume() -> Response:
            """Admit requests again (releases the ones held by ``/pause``)."""
            released = balancer.resume()
            return _json({"paused": False, "released": released})

        @app.get("/workers/state", response_model=BalancingState)
        async def workers_state() -> Response:
            """Per-worker balancing state: in-flight, requests, failures, health, circuit, latency EMA..."""
            return _json(balancer.state())


# --- helpers -----------------------------------------------------------------------------------------


def _json(obj: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(obj), status_code=status, media_type="application/json")


def _require_workers(router: Router) -> None:
    if not len(router.pool):
        raise HTTPError(503, "No workers registered. Add one with POST /add_worker?url=http://HOST:PORT")
