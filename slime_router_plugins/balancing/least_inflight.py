"""``--policy least_inflight``: the worker with the fewest in-flight requests; ties are rotated.

Rotating ties (instead of always taking the first) keeps an idle cluster evenly used: with sequential
requests every worker has 0 in flight, and a plain ``min`` would send everything to the first worker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Policy

if TYPE_CHECKING:  # pragma: no cover
    from slime_router_core.context import RequestContext
    from slime_router_core.workers import Worker


class LeastInflightPolicy(Policy):
    name = "least_inflight"

    def select(self, ctx: RequestContext, workers: list[Worker]) -> Worker:
        return self.least_loaded(workers)
