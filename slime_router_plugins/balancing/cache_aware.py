"""``--policy cache_aware`` (the default): keep a trajectory on the worker that holds its KV prefix cache.

Order of decisions for one attempt (all synchronous, no ``await``):

1. **Explicit session key** — header ``X-Session-ID`` or ``ctx.stash[SESSION_KEY]`` (openai_compat sets it
   from the OpenAI ``user`` field). The body's ``extra_key`` / ``cache_salt`` (which partition SGLang's prefix
   cache) join the key. The key is consistent-hashed onto a ring of the pool's workers; the first ring owner
   that is a current candidate wins, so adding/removing/losing one worker moves only its own sessions.
2. **Trajectory affinity** — ``ctx.stash[AFFINITY]`` (``slime_router_core.contracts.Affinity``): the worker that
   produced the longest recorded prefix of this request (set by the radix_tree plugin for ``/generate`` and by
   openai_compat), with the length of that prefix and of the prompt in tokens. The affinity is only used if the
   prefix covers at least ``--cache-aware-min-match`` of the prompt: a new conversation that merely shares a few
   tokens of boilerplate with a recorded one ("<|im_start|>system\nProblem 1") is routed by load, not piled onto
   one worker.
3. The preferred worker from 1 or 2 is used **unless overloaded**: its in-flight count exceeds the least
   loaded candidate's by more than ``--cache-aware-abs-threshold`` *and* is more than
   ``--cache-aware-rel-threshold`` times it (the sglang-router rule, applied to the preferred worker).
   An overloaded session owner spills along the ring (bounded-load consistent hashing): the session goes to the
   next worker clockwise that is not overloaded, so every request of that session made while the owner is
   busy lands on the same second worker (its KV cache warms once), and it returns to its owner when the load
   drops. A session whose worker leaves (removed, unhealthy, circuit open) moves to its ring successor the same
   way, and only that worker's sessions move.
4. Otherwise (no preference, affinity worker unavailable/already tried or overloaded): least in-flight,
   ties rotated.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from slime_router_core.contracts import AFFINITY, SESSION_KEY

from .base import Policy
from .hashring import HashRing

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


class CacheAwarePolicy(Policy):
    name = "cache_aware"

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.abs_threshold = float(config.cache_aware_abs_threshold)
        self.rel_threshold = float(config.cache_aware_rel_threshold)
        self.min_match = float(getattr(config, "cache_aware_min_match", 0.0) or 0.0)
        self.ring = HashRing()
        self.stats = {"session_routed": 0, "session_spilled": 0, "affinity_routed": 0, "affinity_unavailable": 0,
                      "affinity_below_min_match": 0, "overload_fallbacks": 0, "load_routed": 0}

    def worker_added(self, worker: Worker) -> None:
        self.ring.add(worker.url)

    def worker_removed(self, worker: Worker) -> None:
        self.ring.remove(worker.url)

    def overloaded(self, worker: Worker, workers: list[Worker]) -> bool:
        load = worker.inflight
        low = min(w.inflight for w in workers)
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
            if reason == "session_routed":  # the ring's next worker that is not overloaded
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
