"""The policy interface shared by the policy modules.

A policy is a small object with ``select(ctx, workers) -> Worker``. ``workers`` is never empty and holds only
available workers this request has not tried yet. ``select`` runs synchronously on the event loop with no
``await`` between selection and the core's in-flight accounting, so it is race-free without locks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from slime_router_core.context import RequestContext
    from slime_router_core.workers import Worker


class Policy:
    """Base class: ``name`` is the ``--policy`` value; ``stats`` is shown in ``/workers/state``."""

    name = ""

    def __init__(self, config: Any) -> None:
        self.config = config  # plugin.BalancingConfig
        self.stats: dict[str, int] = {}
        self._rr = 0  # rotation counter for tie-breaks

    def select(self, ctx: RequestContext, workers: list[Worker]) -> Worker:  # pragma: no cover - abstract
        raise NotImplementedError

    def worker_added(self, worker: Worker) -> None:
        """A worker joined the pool (default: nothing)."""

    def worker_removed(self, worker: Worker) -> None:
        """Forget anything about a worker that left the pool (default: nothing)."""

    def least_loaded(self, workers: list[Worker]) -> Worker:
        w = least_loaded(workers, self._rr)
        self._rr += 1
        return w


def least_loaded(workers: list[Worker], rotation: int) -> Worker:
    """The worker with the fewest in-flight requests; among equals, the ``rotation``-th (mod ties)."""
    best = workers[0].inflight
    ties: list[Worker] = []
    for w in workers:
        n = w.inflight
        if n < best:
            best = n
            ties = [w]
        elif n == best:
            ties.append(w)
    return ties[rotation % len(ties)]
