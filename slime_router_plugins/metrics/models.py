"""The metrics plugin's response models (pydantic), for ``/openapi.json``. Its routes take no body.

``GET /metrics`` is serialized with orjson (scraped often) and described by :class:`MetricsSnapshot`; the tests
validate real answers against these models.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class RouterSection(BaseModel):
    active_workers: int
    worker_loads: dict[str, int] = Field(description="In-flight requests per worker URL")
    total_in_flight: int


class CacheSection(BaseModel):
    total_entries: int
    cache_hits: int
    cache_misses: int
    hit_rate: float
    cur_cache_size: int
    max_cache_size: int
    cache_size_mb: float
    gc_threshold_k: int | None


class TokenAudit(BaseModel):
    generated_tokens: dict[str, int] = Field(description="Generated tokens: recorded, served back exactly, or lost "
                                                         "(and why)")
    fresh_tokens_served: dict[str, int] = Field(description="Tokens retrievals had to tokenize afresh, by cause")


class RequestSummary(BaseModel):
    total: int
    by_route: dict[str, dict[str, int]] = Field(description="Route -> HTTP status -> requests")
    retries: int
    upstream_failures: dict[str, int] = Field(description="By reason: HTTP status or 'connection'")
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


class MetricsSnapshot(BaseModel):
    """``GET /metrics`` as JSON: the ``router`` and ``cache`` sections, then details. ``cache``, ``cache_stats``
    and ``audit`` need the radix_tree plugin, ``openai_compat`` the openai_compat plugin, ``session_store`` the
    sessions plugin with ``--session-store-url``."""

    model_config = ConfigDict(extra="allow")
    router: RouterSection
    cache: CacheSection | None = None
    cache_stats: dict[str, Any] | None = Field(default=None, description="Everything the trajectory cache reports")
    audit: TokenAudit | None = None
    openai_compat: dict[str, Any] | None = Field(default=None, description="GET /openai_compat/stats")
    session_store: dict[str, Any] | None = Field(default=None, description="The sessions' write-behind "
                                                 "(--session-store-url only): GET /sessions -> stats.store")
    workers: dict[str, dict[str, Any]] = Field(description="Per worker URL: the balancing plugin's stats when it "
                                                           "is loaded (GET /workers/state), else the pool's")
    requests: RequestSummary
    admission: dict[str, float] = Field(description="Generations in flight and queued, refused (429) by reason, "
                                                    "and the --max-concurrent-requests limits (0: unlimited)")
    weight_versions: dict[str, int] = Field(description="Reply objects per weight version (bounded: the oldest "
                                                        "are counted as 'other')")
    uptime_s: float


class RequestTiming(BaseModel):
    """Where one request's time went, in milliseconds (``null``: the stage did not happen)."""

    route: str
    status: int | None
    stream: bool
    worker: str | None
    attempts: int
    finished_at: float = Field(description="Unix time")
    queueing: float | None = Field(description="Arrival to first worker chosen, minus tokenization")
    retrying: float | None = Field(description="First to last worker chosen (failed attempts, back-off)")
    tokenization: float | None = Field(description="The pre_request hooks (trajectory-cache lookup, tokenization)")
    upstream: float | None = Field(description="The worker's part")
    ttft: float | None = Field(description="Arrival to first streamed chunk")
    recording: float | None = Field(description="The post_response hooks (trajectory-cache recording)")
    total: float | None
    error: str | None = Field(default=None, description="Only when the request failed")


class RecentRequests(BaseModel):
    """Answer of ``GET /metrics/requests``: the most recent requests, newest last."""

    capacity: int = Field(description="How many are kept (--metrics-recent-requests)")
    requests: list[RequestTiming]
