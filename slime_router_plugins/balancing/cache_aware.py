"""``--policy cache_aware`` (the default): keep a trajectory on the worker that holds its KV prefix cache.

Order of decisions for one attempt (all synchronous, no ``await``):

1. **Explicit session key** — header ``X-Session-ID`` or ``ctx.stash[SESSION_KEY]`` (openai_compat sets it
   from the OpenAI ``user`` field). The body's ``extra_key`` / ``cache_salt`` (which partition SGLang's prefix
   cache) join the key. The key is rendezvous-hashed over the pool's workers (``rendezvous.py``): the candidate of
   highest weight wins, so adding/removing/losing one worker moves only its own sessions, and every router replica
   that sees the same workers makes the same choice without talking to the others.
2. **Trajectory affinity** — ``ctx.stash[AFFINITY]`` (``slime_router_core.contracts.Affinity``): the worker that
   produced the longest recorded prefix of this request (set by the radix_tree plugin for ``/generate`` and by
   openai_compat), with the length of that prefix and of the prompt in tokens. The affinity is only used if the
   prefix covers at least ``--cache-aware-min-match`` of the prompt: a new conversation that merely shares a few
   tokens of boilerplate with a recorded one ("<|im_start|>system\nProblem 1") is routed by load, not piled onto
   one worker.
3. The preferred worker from 1 or 2 is used **unless overloaded**: its in-flight count exceeds the least
   loaded candidate's by more than ``--cache-aware-abs-threshold`` *and* is more than
   ``--cache-aware-rel-threshold`` times it (the sglang-router rule, applied to the preferred worker).
   A worker's load is the larger of this router's in-flight requests on it and the load the worker itself last
   reported (``reported_load``, polled by the health checker: it includes the requests of every router replica,
   so replicas see the same busy workers). An overloaded session owner spills to the session's next worker in
   rendezvous order that is not overloaded (bounded-load rendezvous hashing): every request of that session made
   while the owner is busy lands on the same second worker (its KV cache warms once), the same one whichever
   replica routes it, and it returns to its owner when the load drops. A session whose worker leaves (removed,
   unhealthy, circuit open) moves to its next worker the same way, and only that worker's sessions move.
4. Otherwise (no preference, affinity worker unavailable/already tried or overloaded): least in-flight,
   ties rotated.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from slime_router_core.contracts import AFFINITY, SESSION_KEY

from .base import Policy
from .rendezvous import Rendezvous

if TYPE_CHECKING:  # pragma: no cover
    from slime_router_core.context import RequestContext
    from slime_router_core.workers import Worker

SESSION_HEADER = "x-session-id"


def session_key(ctx: RequestContext) -> str | None:
    """The explicit affinity key of a request, or ``None``: session id joined with extra_key / cache_salt."""
    key = ctx.headers.get(SESSION_HEADER) or ctx.stash.get(SESSION_KEY)
    if not key:
        return None
    body = ctx.body
    if isinstance(body, dict):
        extra, salt = body.get("extra_key"), body.get("cache_salt")
        if extra is not None or salt is not None:
            return f"{key}\x1f{'' if extra is None else extra}\x1f{'' if salt is None else salt}"
    return str(key)


def _load(worker: Worker) -> int:
    """This router's in-flight requests on ``worker``, or the worker's own last reported load if higher."""
    reported = worker.state.get("reported_load")
    inflight = worker.inflight
    return reported if reported is not None and reported > inflight else inflight


class CacheAwarePolicy(Policy):
    name = "cache_aware"

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.abs_threshold = float(config.cache_aware_abs_threshold)
        self.rel_threshold = float(config.cache_aware_rel_threshold)
        self.min_match = float(getattr(config, "cache_aware_min_match", 0.0) or 0.0)
        self.ring = Rendezvous()
        self.stats = {"session_routed": 0, "session_spilled": 0, "affinity_routed": 0, "affinity_unavailable": 0,
                      "affinity_below_min_match": 0, "overload_fallbacks": 0, "load_routed": 0}

    def worker_added(self, worker: Worker) -> None:
        self.ring.add(worker.url)

    def worker_removed(self, worker: Worker) -> None:
        self.ring.remove(worker.url)

    def overloaded(self, worker: Worker, workers: list[Worker]) -> bool:
        load = _load(worker)
        low = min(map(_load, workers))
        return load - low > self.abs_threshold and load > self.rel_threshold * low

    def preferred(self, ctx: RequestContext, workers: list[Worker]) -> tuple[Worker | None, str]:
        key = session_key(ctx)
        if key is not None:
            return self.ring.lookup(key, workers), "session_routed"
        affinity = ctx.stash.get(AFFINITY)
        if affinity is not None:
            if affinity.cached_tokens < self.min_match * affinity.prompt_tokens:
                self.stats["affinity_below_min_match"] += 1
                return None, ""
            url = affinity.worker_url
            for w in workers:
                if w.url == url:
                    return w, "affinity_routed"
            self.stats["affinity_unavailable"] += 1
        return None, ""

    def select(self, ctx: RequestContext, workers: list[Worker]) -> Worker:
        target, reason = self.preferred(ctx, workers)
        if target is not None:
            if len(workers) == 1 or not self.overloaded(target, workers):
                self.stats[reason] += 1
                return target
            if reason == "session_routed":  # the session's next worker that is not overloaded
                key = session_key(ctx)
                by_url = {w.url: w for w in workers}
                for url in self.ring.successors(key or "", set(by_url))[1:]:
                    if not self.overloaded(by_url[url], workers):
                        self.stats["session_spilled"] += 1
                        return by_url[url]
            self.stats["overload_fallbacks"] += 1
        else:
            self.stats["load_routed"] += 1
        return self.least_loaded(workers)
