"""``--policy round_robin``: strict rotation over the available candidates (exactly even when they are stable)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Policy

if TYPE_CHECKING:  # pragma: no cover
    from slime_router_core.context import RequestContext
    from slime_router_core.workers import Worker


class RoundRobinPolicy(Policy):
    name = "round_robin"

    def select(self, ctx: RequestContext, workers: list[Worker]) -> Worker:
        w = workers[self._rr % len(workers)]
        self._rr += 1
        return w
