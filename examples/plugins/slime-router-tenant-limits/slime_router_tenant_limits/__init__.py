"""A slime-router policy plugin: per-tenant rate limits, and optionally each tenant pinned to one worker.

The tenant is a request header (``--tenant-limits-header``, default ``x-tenant``; requests without it are not
limited). Each tenant has a token bucket: ``--tenant-limits-rate`` requests per second, bursts of up to
``--tenant-limits-burst``. A request over the limit is answered 429 with ``Retry-After`` before it reaches a worker.
With ``--tenant-limits-pin`` each tenant's requests go to one worker (rendezvous hashing over the available
workers, so a worker leaving moves only its own tenants): the policy is a ``select_worker`` implementation.
``GET /tenant_limits/stats`` tells, per tenant, how many requests were served and refused.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from slime_router_core import HTTPError, hookimpl
from slime_router_core.settings import PluginConfig, at_least, option

COMPONENT = "tenant_limits"


@dataclass(frozen=True)
class TenantLimitsConfig(PluginConfig):
    flag_prefix = "--tenant-limits-"
    rate: float = option(10.0, check=lambda v: None if v > 0 else "must be positive",
                         help="Requests per second each tenant may make (sustained).")
    burst: int = option(20, check=at_least(1), help="Requests a tenant may make at once.")
    header: str = option("x-tenant", help="The request header that names the tenant.")
    pin: bool = option(False, help="Send each tenant's requests to one worker (rendezvous hashing).")


@dataclass
class Bucket:
    tokens: float
    updated: float
    served: int = 0
    refused: int = 0


@dataclass
class TenantLimits:
    config: TenantLimitsConfig
    buckets: dict[str, Bucket] = field(default_factory=dict)

    def admit(self, tenant: str, now: float) -> float:
        """0.0 when the request may go; else the seconds until it could."""
        c = self.config
        b = self.buckets.get(tenant)
        if b is None:
            b = self.buckets[tenant] = Bucket(tokens=float(c.burst), updated=now)
        b.tokens = min(float(c.burst), b.tokens + (now - b.updated) * c.rate)
        b.updated = now
        if b.tokens >= 1.0:
            b.tokens -= 1.0
            return 0.0
        b.refused += 1
        return (1.0 - b.tokens) / c.rate


class TenantStats(BaseModel):
    served: int
    refused: int


def _limits(router: Any) -> TenantLimits:
    return router.registry.get(COMPONENT)


def _tenant(ctx: Any) -> str | None:
    return ctx.headers.get(_limits(ctx.router).config.header.lower()) or None


@hookimpl
def add_options(options: Any) -> None:
    options.add_config(TenantLimitsConfig)


@hookimpl
def register_components(registry: Any, router: Any) -> None:
    registry.register(COMPONENT, TenantLimits(router.settings.config(TenantLimitsConfig)), owner="tenant_limits")


@hookimpl
def register_routes(app: Any, router: Any) -> None:
    @app.get("/tenant_limits/stats")
    async def tenant_stats() -> dict[str, TenantStats]:
        """Per tenant: requests served and refused (429)."""
        return {t: TenantStats(served=b.served, refused=b.refused) for t, b in _limits(router).buckets.items()}


@hookimpl(tryfirst=True)  # refuse before any other plugin does work on the request
def pre_request(ctx: Any) -> None:
    tenant = _tenant(ctx)
    if tenant is None:
        return
    wait = _limits(ctx.router).admit(tenant, time.monotonic())
    if wait:
        raise HTTPError(429, f"Tenant {tenant!r} is over its rate limit; retry in {wait:.1f}s",
                        type="rate_limit_error", code="tenant_rate_limited",
                        headers={"Retry-After": str(max(1, math.ceil(wait)))})


@hookimpl
def select_worker(ctx: Any, workers: list[Any]) -> Any:
    limits = ctx.router.registry.find(COMPONENT)
    if limits is None or not limits.config.pin:
        return None
    tenant = _tenant(ctx)
    if tenant is None:
        return None  # no opinion: the next policy decides

    def score(worker: Any) -> bytes:
        return hashlib.blake2b(f"{tenant}\0{worker.url}".encode(), digest_size=8).digest()

    return max(workers, key=score)


@hookimpl
def request_finished(ctx: Any) -> None:
    limits = ctx.router.registry.find(COMPONENT)
    tenant = _tenant(ctx) if limits is not None else None
    if tenant is not None and ctx.status < 400 and tenant in limits.buckets:
        limits.buckets[tenant].served += 1
