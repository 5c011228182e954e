"""``--policy power_of_two``: sample two distinct candidates at random, send to the less loaded one.

Ties on in-flight count go to the lower latency EMA (``worker.state["latency_ema_s"]``), then to the first
sampled. Near least-in-flight quality with O(1) work and no herding on one "least loaded" worker when
several routers share the workers.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from .base import Policy

if TYPE_CHECKING:  # pragma: no cover
    from slime_router_core.context import RequestContext
    from slime_router_core.workers import Worker


class PowerOfTwoPolicy(Policy):
    name = "power_of_two"

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.random = random.Random(getattr(config, "seed", None))

    def select(self, ctx: RequestContext, workers: list[Worker]) -> Worker:
        n = len(workers)
        if n == 1:
            return workers[0]
        i = self.random.randrange(n)
        j = self.random.randrange(n - 1)
        if j >= i:
            j += 1
        a, b = workers[i], workers[j]
        if a.inflight != b.inflight:
            return a if a.inflight < b.inflight else b
        la, lb = a.state.get("latency_ema_s"), b.state.get("latency_ema_s")
        if la is not None and lb is not None and lb < la:
            return b
        return a
