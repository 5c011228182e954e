"""balancing plugin: worker-selection policies, health checks, circuit breaker, retries, RL operations.

One plugin (entry point ``balancing``); the policy is chosen with ``--policy``:

- ``round_robin`` (``round_robin.py``): strict rotation over the available workers.
- ``least_inflight`` (``least_inflight.py``): fewest in-flight requests, ties rotated.
- ``power_of_two`` (``power_of_two.py``): two random candidates, the less loaded wins.
- ``cache_aware`` (``cache_aware.py``, the default): an explicit session key (``X-Session-ID`` header, or the
  OpenAI ``user`` field through ``ctx.state["session_key"]``) is rendezvous-hashed over the workers; otherwise
  the worker that produced the longest recorded prefix of the trajectory (``ctx.state["affinity_worker"]``, set
  by the radix_tree / openai_compat plugins) is preferred — unless it is overloaded beyond
  ``--cache-aware-abs-threshold`` / ``--cache-aware-rel-threshold``; fallback: least in-flight.

The runtime lives in ``plugin.Balancer`` (one per router app), registered as component ``"balancing"``.
"""

from .base import Policy, least_loaded
from .cache_aware import CacheAwarePolicy
from .least_inflight import LeastInflightPolicy
from .power_of_two import PowerOfTwoPolicy
from .rendezvous import Rendezvous
from .round_robin import RoundRobinPolicy

#: ``--policy`` name -> policy class (the classes are stateless definitions; instances are per app).
POLICIES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (CacheAwarePolicy, LeastInflightPolicy, PowerOfTwoPolicy, RoundRobinPolicy)
}

__all__ = ["POLICIES", "Policy", "least_loaded", "Rendezvous", "CacheAwarePolicy", "LeastInflightPolicy",
           "PowerOfTwoPolicy", "RoundRobinPolicy"]
