"""State reconciliation: a replica that (re)joins takes the control-plane state of its most recent live peer.

The control-plane state a replica can share (``GET /replicas/state``): its workers (url, engine, and the weight
version it tracks for a worker whose engine does not stamp replies itself, e.g. vLLM), whether it is paused and in
which drain mode (the balancing component, if loaded), the last weight version set through
``/update_weight_version``, and a ``generation`` stamp: the ``time.time_ns()`` of the last control-plane call
(``front.CONTROL``) applied here. The replica that receives such a call without the hop header stamps it and passes
its stamp on to the peers it fans the call out to (``front.GENERATION_HEADER``), so every replica that got the call
carries the same generation.

A sync (``Reconciler``), in the background: at start-up, whenever a peer turns from dead to live and when new peers
are set (``PUT /replicas/peers``): every live peer's state is read; the one of the newest generation wins if it is
newer than this replica's own: its differences are applied here only (nothing is fanned out, nothing is sent to the
workers): missing workers added, workers it no longer has removed (the peers' list wins, command-line workers
included), paused/resumed to match, the tracked weight versions set. A replica whose generation is the newest (or
with no live peer) keeps its own state. While a sync reads and applies, the control-plane calls that reach this
replica wait (so a newer call is always applied after, never undone by, an older state).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import orjson
from pydantic import BaseModel, Field, StrictStr, ValidationError

from slime_router_core import HTTPError
from slime_router_core.workers import normalize_worker_url

from .front import HOP_HEADER, parsed

if TYPE_CHECKING:  # pragma: no cover
    from slime_router_core.workers import Worker

    from .plugin import Replicas

log = logging.getLogger("slime_router.replicas")

RETRIES = 5  # further rounds of a sync while a live peer did not answer (each after a check interval, 0.5 to 5 s)
RETRY_MIN, RETRY_MAX = 0.5, 5.0
MAX_PULL_TIMEOUT = 10.0  # seconds a peer's state is waited for (admin calls here wait meanwhile)


class StateWorker(BaseModel):
    url: StrictStr
    engine: StrictStr = "sglang"
    weight_version: StrictStr | None = Field(
        None, description="The weight version this replica tracks for the worker (an engine whose replies do not "
                          "carry one, e.g. vLLM); null: the worker reports its own")


class ReplicaState(BaseModel):
    """``GET /replicas/state``: this replica's shareable control-plane state."""

    replica: str = Field(description="This replica (--replica-url)")
    generation: int = Field(ge=0, lt=2**63,
                            description="time.time_ns() of the last control-plane call applied here (or of the "
                                        "state taken from a peer); 0: none since start-up")
    changed_at: float | None = Field(None, description="Unix time of that change here")
    workers: list[StateWorker] = Field(description="The registered workers")
    paused: bool | None = Field(None, description="Paused by POST /pause (null: no balancing plugin)")
    drain_mode: str | None = Field(None, description="wait or reject (null: no balancing plugin)")
    weight_version: str | None = Field(None, description="The last version set through /update_weight_version "
                                                         "(or taken from a peer); null: none")


class SyncReport(BaseModel):
    """``GET /replicas`` ``last_sync``: the last reconciliation with the peers."""

    at: float = Field(description="Unix time it ended")
    reason: str = Field(description="start-up, a peer back, peers set")
    outcome: str = Field(description="applied | up to date | no live peer | no peer answered")
    peer: str | None = Field(None, description="The peer whose state was the newest")
    generation: int | None = Field(None, description="Its generation")
    changes: dict[str, Any] = Field(description="What was changed here (added_workers, removed_workers, paused, "
                                                "resumed, weight_version, worker_versions, errors)")
    failed: dict[str, str] = Field(description="Live peers whose state could not be read, and why")


def _engine_state(worker: Worker) -> dict[str, Any] | None:
    """The engine's per-worker state (``worker.state[engine name]``, e.g. the vLLM engine's), if it has one."""
    engine = worker.engine
    found = worker.state.get(engine.name) if engine is not None else None
    return found if isinstance(found, dict) else None


class Reconciler:
    """A replica's generation stamp, last weight version and syncs with its peers."""

    def __init__(self, replicas: Replicas) -> None:
        self.replicas = replicas
        self.generation = 0
        self.changed_at: float | None = None
        self.weight_version: str | None = None
        self.last_sync: dict[str, Any] | None = None
        self.syncs = 0
        self.waiting = 0  # control-plane calls waiting for a sync to end
        self.started = False
        self.idle = asyncio.Event()  # clear while a sync reads and applies: control-plane calls wait
        self.idle.set()
        self._reasons: list[str] = []
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None

    # --- the state ------------------------------------------------------------------------------------------

    def stamp(self, given: int | None) -> None:
        """A control-plane call is applied here (``given``: the stamp of the replica that fanned it out)."""
        now = given if given is not None and 0 < given < 2**63 else time.time_ns()  # 64 bits: JSON-safe
        self.generation = max(self.generation + 1, now)
        self.changed_at = time.time()

    def applied(self, path: str, body: bytes, status: int) -> None:
        """After the call: the weight version it set, if it was ``/update_weight_version`` and succeeded."""
        if path != "/update_weight_version" or not 200 <= status < 300:
            return
        try:
            req = orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            return
        version = req.get("new_version") if isinstance(req, dict) else None
        if version is not None:
            self.weight_version = str(version)

    def state(self) -> dict[str, Any]:
        router = self.replicas.router
        workers = []
        for w in router.pool:
            tracked = _engine_state(w)
            version = tracked.get("weight_version") if tracked is not None else None
            workers.append({"url": w.url, "engine": w.engine.name if w.engine is not None else "sglang",
                            "weight_version": None if version is None else str(version)})
        balancer = router.registry.find("balancing")
        paused = getattr(balancer, "paused", None)
        return {"replica": self.replicas.membership.self_url, "generation": self.generation,
                "changed_at": self.changed_at, "workers": workers,
                "paused": paused if isinstance(paused, bool) else None,
                "drain_mode": getattr(balancer, "drain_mode", None) if isinstance(paused, bool) else None,
                "weight_version": self.weight_version}

    # --- syncs ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        """At start-up (inside the loop, before the first request is served): the first sync is pending, and the
        control-plane calls wait for it."""
        self.started = True
        self.idle.clear()
        self.request("start-up")

    def request(self, reason: str) -> None:
        """Schedule a sync (coalesced with one pending or running)."""
        if reason not in self._reasons:
            self._reasons.append(reason)
        if self._wake is not None:
            self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        self.started = False
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        self.idle.set()

    def retry_delay(self) -> float:
        """Seconds between the rounds of a sync: a check interval, within [0.5, 5]."""
        return min(max(self.replicas.membership.interval, RETRY_MIN), RETRY_MAX)

    async def _run(self) -> None:
        try:
            while self._reasons:
                reason = ", ".join(self._reasons)
                self._reasons.clear()
                for attempt in range(RETRIES + 1):
                    if attempt:
                        self._wake = asyncio.Event()
                        try:
                            await asyncio.wait_for(self._wake.wait(), self.retry_delay())
                        except asyncio.TimeoutError:
                            pass
                        self._wake = None
                        if self._reasons:  # asked again meanwhile: a new sync (with its own retries)
                            break
                    try:
                        missed = await self.sync_once(reason if not attempt else f"{reason} (retry {attempt})")
                    except Exception:  # pragma: no cover - a bug: logged, the replica keeps its state
                        log.exception("replicas: sync failed")
                        missed = False
                    if not missed:
                        break
        finally:
            self.idle.set()

    async def sync_once(self, reason: str) -> bool:
        """One round: read the live peers' states, apply the newest if it is newer than this replica's. True if
        some live peer did not answer (worth another round)."""
        replicas = self.replicas
        m = replicas.membership
        self.idle.clear()
        try:
            peers = m.live_others()
            report: dict[str, Any] = {"reason": reason, "peer": None, "generation": None, "changes": {},
                                      "failed": {}}
            if not peers:
                self._report(report, "no live peer")
                return False
            answers = await asyncio.gather(*(self._fetch(u) for u in peers))
            best: ReplicaState | None = None
            source = None
            for url, (state, error) in zip(peers, answers):
                if state is None:
                    report["failed"][url] = error or "no state"
                elif best is None or state.generation > best.generation:
                    best, source = state, url
            missed = any(u in m.live for u in report["failed"])
            if best is None:
                self._report(report, "no peer answered")
                return missed
            report.update(peer=source, generation=best.generation)
            if best.generation <= self.generation:
                self._report(report, "up to date")
                return missed
            report["changes"] = await self.apply(best)
            self.generation = max(self.generation, best.generation)
            self.changed_at = time.time()
            self._report(report, "applied")
            if report["changes"]:
                log.warning("replicas: reconciled with %s (generation %d; %s): %s", source, best.generation, reason,
                            report["changes"])
            else:
                log.info("replicas: state of %s (generation %d) taken; nothing differed", source, best.generation)
            return missed
        finally:
            self.idle.set()

    def _report(self, report: dict[str, Any], outcome: str) -> None:
        self.syncs += 1
        self.last_sync = {"at": time.time(), "outcome": outcome, **report}

    async def _fetch(self, url: str) -> tuple[ReplicaState | None, str | None]:
        replicas = self.replicas
        settings = replicas.router.settings
        headers = {HOP_HEADER: replicas.membership.self_url, "Accept": "application/json"}
        key = settings.admin_api_key or settings.api_key  # the replicas share their keys
        if key:
            headers["Authorization"] = f"Bearer {key}"
        status, _, data = await replicas.peer(url, "GET", "/replicas/state", headers, None,
                                              timeout=min(replicas.config.timeout, MAX_PULL_TIMEOUT))
        answer = parsed(data)
        if status != 200:
            error = answer.get("error") if isinstance(answer, dict) else None
            message = error.get("message") if isinstance(error, dict) else answer
            return None, f"{status}: {message}"[:500]
        try:
            return ReplicaState.model_validate(answer), None
        except ValidationError as e:
            return None, f"unusable state: {e.errors()[0].get('msg')}"

    async def apply(self, state: ReplicaState) -> dict[str, Any]:
        """Make this replica's state ``state`` (locally: no fan-out, nothing sent to the workers)."""
        router = self.replicas.router
        changes: dict[str, Any] = {}
        errors: dict[str, str] = {}
        wanted: dict[str, StateWorker] = {}
        for w in state.workers:
            try:
                wanted[normalize_worker_url(w.url)] = w
            except HTTPError as e:
                errors[w.url] = e.message
        added, removed = [], []
        for url, w in wanted.items():
            if router.pool.get(url) is None:
                try:
                    await router.add_worker_detected(url, w.engine)
                except HTTPError as e:
                    errors[url] = e.message
                else:
                    added.append(url)
        for worker in router.pool:
            if worker.url not in wanted:
                router.remove_worker(worker.url)
                removed.append(worker.url)
        versions = {}
        for url, w in wanted.items():
            local = router.pool.get(url)
            tracked = _engine_state(local) if local is not None else None
            if w.weight_version is not None and tracked is not None and \
                    tracked.get("weight_version") != w.weight_version:
                tracked["weight_version"] = w.weight_version
                versions[url] = w.weight_version
        balancer = router.registry.find("balancing")
        if state.paused is not None and balancer is not None and isinstance(getattr(balancer, "paused", None), bool):
            mode = state.drain_mode if state.drain_mode in ("wait", "reject") else None
            if state.paused and (not balancer.paused or (mode is not None and balancer.drain_mode != mode)):
                balancer.pause(mode)
                changes["paused"] = balancer.drain_mode
            elif not state.paused and balancer.paused:
                balancer.resume()
                changes["resumed"] = True
        if state.weight_version is not None and state.weight_version != self.weight_version:
            changes["weight_version"] = state.weight_version
            self.weight_version = state.weight_version
        for key, value in (("added_workers", added), ("removed_workers", removed), ("worker_versions", versions),
                           ("errors", errors)):
            if value:
                changes[key] = value
        return changes
