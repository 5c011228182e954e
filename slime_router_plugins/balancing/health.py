"""Active health checks and a per-worker circuit breaker.

Both only flip flags the core already honours — ``worker.healthy`` and ``worker.state["circuit_open"]``
(``Worker.available`` is ``healthy and not removed and not circuit_open``) — so a worker taken out of
rotation receives no new requests while its in-flight requests finish. Neither ever drops a worker for
good: unhealthy workers keep being probed, and an open circuit half-opens after its cooldown.

Worker state written here (``worker.state``):
``health`` ("healthy" / "unhealthy"), ``health_failures`` / ``health_successes`` (consecutive),
``last_health_status`` (HTTP status or error name), ``last_health_check`` (unix time),
``circuit`` ("closed" / "open" / "half_open"), ``circuit_open`` (bool), ``consecutive_failures``,
``circuit_opens`` (count), ``circuit_opened_at`` (unix time), ``reported_load`` (the worker's own count of running
and waiting requests, read from its ``GET /get_load`` after each passed health check; absent where the worker has no
such endpoint, e.g. vLLM, or no check has run yet).

The reported load counts the requests of every router in front of the worker, so replicas of the router that poll
the same workers see the same figure: ``cache_aware`` uses it for its bounded-load escape (``cache_aware.py``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson

if TYPE_CHECKING:  # pragma: no cover
    from slime_router_core.router import Router
    from slime_router_core.workers import Worker

log = logging.getLogger("slime_router.balancing")

PROBE_TIMEOUT = 60.0  # seconds before an unresolved half-open probe lets another one through
LOAD_PATH = "/get_load"  # SGLang: [{"dp_rank", "num_reqs", "num_waiting_reqs", "num_tokens"}, ...] (one per rank)


def reported_load(answer: Any) -> int | None:
    """Running + waiting requests in a ``/get_load`` answer (a list per data-parallel rank, or one object)."""
    ranks = answer if isinstance(answer, list) else [answer]
    total = 0
    for r in ranks:
        if not isinstance(r, dict):
            return None
        for k in ("num_reqs", "num_waiting_reqs"):
            v = r.get(k, 0)
            if type(v) is not int or v < 0:
                return None
            total += v
    return total


def init_worker_state(worker: Worker) -> None:
    st = worker.state
    st.setdefault("health", "healthy" if worker.healthy else "unhealthy")
    st.setdefault("health_failures", 0)
    st.setdefault("health_successes", 0)
    st.setdefault("last_health_status", None)
    st.setdefault("last_health_check", None)
    st.setdefault("circuit", "closed")
    st.setdefault("circuit_open", False)
    st.setdefault("consecutive_failures", 0)
    st.setdefault("circuit_opens", 0)


class HealthChecker:
    """Background task: ``GET <worker><path>`` every ``interval`` seconds for every registered worker.

    ``failure_threshold`` consecutive failures (non-2xx, timeout, connection error) take a worker out of
    rotation; ``success_threshold`` consecutive successes put it back.
    """

    def __init__(self, router: Router, *, path: str = "/health", interval: float = 5.0, timeout: float = 5.0,
                 failure_threshold: int = 3, success_threshold: int = 2) -> None:
        self.router = router
        self.path = path if path.startswith("/") else "/" + path
        self.interval = interval
        self.timeout = timeout
        self.failure_threshold = max(1, failure_threshold)
        self.success_threshold = max(1, success_threshold)
        self.task: asyncio.Task | None = None
        self.rounds = 0

    def start(self) -> None:
        if self.interval > 0 and self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._run(), name="balancing-health-checker")

    async def stop(self) -> None:
        task, self.task = self.task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                await self.check_all()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the checker die
                log.exception("health check round failed")
            await asyncio.sleep(max(0.0, self.interval - (loop.time() - started)))

    async def check_all(self) -> None:
        workers = [w for w in self.router.pool if not w.removed]
        if workers:
            await asyncio.gather(*(self.check(w) for w in workers))
        self.rounds += 1

    async def check(self, worker: Worker) -> bool:
        session = self.router.session
        if session is None:
            return False
        detail: int | str  # the HTTP status, or the connection error's name
        try:
            async with session.get(worker.url + self.path,
                                   timeout=aiohttp.ClientTimeout(total=self.timeout)) as resp:
                await resp.read()
                ok, detail = 200 <= resp.status < 300, resp.status
        except asyncio.CancelledError:
            raise
        except (asyncio.TimeoutError, aiohttp.ClientError, OSError) as e:
            ok, detail = False, type(e).__name__
        self.record(worker, ok, detail)
        if ok and not worker.state.get("load_unsupported"):
            await self.poll_load(worker, session)
        return ok

    async def poll_load(self, worker: Worker, session: aiohttp.ClientSession) -> None:
        """Read the worker's own load; a worker without the endpoint (404, 501...) is not asked again."""
        try:
            async with session.get(worker.url + LOAD_PATH,
                                   timeout=aiohttp.ClientTimeout(total=self.timeout)) as resp:
                data = await resp.read()
                status = resp.status
        except asyncio.CancelledError:
            raise
        except (asyncio.TimeoutError, aiohttp.ClientError, OSError):
            return  # the next round tries again
        load = None
        if 200 <= status < 300:
            try:
                load = reported_load(orjson.loads(data))
            except orjson.JSONDecodeError:
                pass
        if load is None:
            if 400 <= status < 500 or status == 501:
                worker.state["load_unsupported"] = True
            worker.state.pop("reported_load", None)
            return
        worker.state["reported_load"] = load

    def record(self, worker: Worker, ok: bool, detail: Any) -> None:
        """Account one probe result (synchronous, so it can be unit-tested)."""
        st = worker.state
        st["last_health_status"] = detail
        st["last_health_check"] = time.time()
        if ok:
            st["health_failures"] = 0
            st["health_successes"] = st.get("health_successes", 0) + 1
            if not worker.healthy and st["health_successes"] >= self.success_threshold:
                worker.healthy = True
                st["health"] = "healthy"
                log.warning("worker %s is healthy again: back in rotation", worker.url)
        else:
            st["health_successes"] = 0
            st["health_failures"] = st.get("health_failures", 0) + 1
            if worker.healthy and st["health_failures"] >= self.failure_threshold:
                worker.healthy = False
                st["health"] = "unhealthy"
                log.warning("worker %s failed %d health checks (%s): out of rotation until it recovers",
                            worker.url, st["health_failures"], detail)


class CircuitBreaker:
    """Opens after ``threshold`` consecutive request failures; half-opens after ``cooldown`` seconds.

    Half-open lets exactly one probe request through (the worker is blocked again while the probe is in
    flight): success closes the circuit, failure re-opens it for another cooldown. ``threshold <= 0``
    disables the breaker.
    """

    def __init__(self, threshold: int = 5, cooldown: float = 10.0) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self._timers: dict[str, asyncio.TimerHandle] = {}

    def on_failure(self, worker: Worker) -> None:
        st = worker.state
        st["consecutive_failures"] = st.get("consecutive_failures", 0) + 1
        if self.threshold <= 0:
            return
        circuit = st.get("circuit", "closed")
        if circuit == "half_open":
            self._open(worker, "half-open probe failed")
        elif circuit == "closed" and st["consecutive_failures"] >= self.threshold:
            self._open(worker, f"{st['consecutive_failures']} consecutive failures")

    def on_success(self, worker: Worker) -> None:
        st = worker.state
        circuit = st.get("circuit", "closed")
        if circuit == "open":
            return  # a request sent before the circuit opened: the cooldown and a probe decide
        st["consecutive_failures"] = 0
        if circuit == "half_open":
            self._cancel_timer(worker)
            st["circuit"] = "closed"
            st["circuit_open"] = False
            st["circuit_probe"] = False
            log.warning("circuit of %s closed: probe request succeeded", worker.url)

    def on_selected(self, worker: Worker) -> None:
        """A half-open worker got its probe: block it until the probe's outcome is known.

        Safety net: a probe whose outcome never arrives (a caller that does not finish its request)
        releases the worker for another probe after ``max(cooldown, PROBE_TIMEOUT)`` seconds.
        """
        st = worker.state
        if st.get("circuit") == "half_open" and not st.get("circuit_probe"):
            st["circuit_probe"] = True
            st["circuit_open"] = True
            self._cancel_timer(worker)
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._timers[worker.url] = loop.call_later(max(self.cooldown, PROBE_TIMEOUT), self._probe_expired,
                                                       worker)

    def _probe_expired(self, worker: Worker) -> None:
        self._timers.pop(worker.url, None)
        self.on_neutral(worker)

    def on_neutral(self, worker: Worker) -> None:
        """The probe ended without a verdict (client went away, 4xx...): let another probe through."""
        st = worker.state
        if st.get("circuit") == "half_open" and st.get("circuit_probe"):
            self._cancel_timer(worker)
            st["circuit_probe"] = False
            st["circuit_open"] = False

    def _open(self, worker: Worker, why: str) -> None:
        st = worker.state
        st["circuit"] = "open"
        st["circuit_open"] = True
        st["circuit_probe"] = False
        st["circuit_opens"] = st.get("circuit_opens", 0) + 1
        st["circuit_opened_at"] = time.time()
        log.warning("circuit of %s opened (%s): out of rotation for %.3gs", worker.url, why, self.cooldown)
        self._cancel_timer(worker)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (unit use): half-open immediately on the next check
            self.half_open(worker)
            return
        self._timers[worker.url] = loop.call_later(max(0.0, self.cooldown), self.half_open, worker)

    def half_open(self, worker: Worker) -> None:
        self._timers.pop(worker.url, None)
        st = worker.state
        if st.get("circuit") == "open":
            st["circuit"] = "half_open"
            st["circuit_open"] = False
            st["circuit_probe"] = False
            log.info("circuit of %s half-open: letting one probe request through", worker.url)

    def _cancel_timer(self, worker: Worker) -> None:
        handle = self._timers.pop(worker.url, None)
        if handle is not None:
            handle.cancel()

    def forget(self, worker: Worker) -> None:
        self._cancel_timer(worker)

    def close(self) -> None:
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
