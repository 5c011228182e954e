"""The balancing plugin's request and response models (pydantic): its routes declare them, so FastAPI parses the
bodies (a refusal is the core's 400 in the project's error shape, naming the field) and ``/openapi.json``
describes them.

The bodies are the core's JSON-object bodies (``slime_router_core.admin``): sent without a JSON content type
(``curl -d``) they are parsed all the same. The weight-update bodies are the workers' (SGLang's): the router
passes on what it was sent, unknown fields included, and each worker validates it (its refusals come back per
worker); the fields listed are the common ones.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from slime_router_core.admin import JSONObjectBody, WorkerAnswer, WorkerCommand

# --- request bodies ---------------------------------------------------------------------------------


class AbortRequest(WorkerCommand):
    """Body of ``POST /abort_request``: a ``rid``, or ``abort_all``. Passed on to the workers as given."""

    rid: str | None = Field(default=None, description="Matched as a prefix of request ids (SGLang's rule); a tracked "
                                                      "rid goes only to the worker(s) holding it, an unknown one to "
                                                      "every worker")
    abort_all: bool = Field(default=False, description="Abort every request on every worker")


class UpdateWeightsFromDiskRequest(WorkerCommand):
    """Body of ``POST /update_weights_from_disk`` (SGLang's ``UpdateWeightFromDiskReqInput``), sent to every
    worker."""

    model_path: str | None = Field(default=None, description="The checkpoint to load (required by the workers)")
    load_format: str | None = None
    weight_version: str | None = Field(default=None, description="The version the new weights report")
    abort_all_requests: bool | None = None
    flush_cache: bool | None = None


class UpdateWeightVersionRequest(WorkerCommand):
    """Body of ``POST /update_weight_version``, sent to every worker."""

    new_version: str | None = Field(default=None, description="The weight version to report (required by the workers)")
    abort_all_requests: bool | None = None


class PauseRequest(JSONObjectBody):
    """Optional body of ``POST /pause``."""

    not_an_object: ClassVar[str] = 'Body must be a JSON object like {"timeout": 30, "mode": "wait"}'
    timeout: float | None = Field(default=None, description="Seconds to wait for the drain (default: --drain-timeout)")
    mode: Literal["wait", "reject"] | None = Field(
        default=None, description="Hold new requests until /resume (wait) or answer them 503 (reject); default: "
                                  "--drain-mode")
    wait: bool = Field(default=True, description="false: answer at once instead of when drained")


# --- answers ------------------------------------------------------------------------------------------


class AbortReport(BaseModel):
    """Answer of ``POST /abort_request`` (502 when a worker failed)."""

    success: bool
    rid: str | None
    abort_all: bool
    routed: Literal["tracked", "broadcast"] = Field(description="tracked: sent only to the worker(s) holding the rid")
    workers: dict[str, WorkerAnswer]


class WorkerOutcome(WorkerAnswer):
    success: bool = Field(description="2xx and not {\"success\": false}")


class BroadcastReport(BaseModel):
    """Answer of the weight updates: 200 only if every worker succeeded; else every worker's same 4xx, or 502."""

    success: bool
    failed: list[str] = Field(description="The workers that did not succeed")
    workers: dict[str, WorkerOutcome]


class PauseReport(BaseModel):
    """Answer of ``POST /pause``: when drained, or at the timeout (still paused)."""

    paused: bool
    drained: bool
    mode: Literal["wait", "reject"]
    in_flight: int
    waiting_requests: int = Field(description="New requests held until /resume")
    waited_s: float


class ResumeReport(BaseModel):
    paused: bool
    released: int = Field(description="Held requests released")


class WorkerStats(BaseModel):
    model_config = ConfigDict(extra="allow")
    url: str
    in_flight: int
    requests: int
    failures: int
    healthy: bool
    available: bool
    health: str = Field(description="healthy or unhealthy (active health checks)")
    health_failures: int
    last_health_status: int | str | None = Field(description="HTTP status or error name")
    last_health_check_age_s: float | None
    circuit: str = Field(description="closed, open or half_open")
    circuit_open: bool
    circuit_opens: int
    consecutive_failures: int
    last_failure: int | str | None = Field(description="HTTP status or error name")
    latency_ema_s: float | None
    reported_load: int | None = Field(None, description="Running + waiting requests the worker itself last reported "
                                                        "(GET /get_load, polled with the health checks): the load "
                                                        "of every router replica in front of it.")


class HealthCheckSettings(BaseModel):
    path: str
    interval_s: float
    timeout_s: float
    rounds: int
    failure_threshold: int
    success_threshold: int


class CircuitBreakerSettings(BaseModel):
    failure_threshold: int
    cooldown_s: float


class BalancingState(BaseModel):
    """Answer of ``GET /workers/state``."""

    model_config = ConfigDict(extra="allow")
    policy: str
    policy_stats: dict[str, int]
    paused: bool
    drain_mode: Literal["wait", "reject"]
    active_requests: int
    waiting_requests: int
    in_flight: int
    retries: int
    tracked_rids: int
    health_check: HealthCheckSettings
    circuit_breaker: CircuitBreakerSettings
    workers: list[WorkerStats]
