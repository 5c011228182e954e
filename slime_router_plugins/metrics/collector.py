"""Per-app metric state: plain counters updated on the event loop, exposed at scrape time.

Everything on the request path runs on the router's event loop thread, and so do the scrapes
(async FastAPI routes), so the numbers here are plain Python ints/floats without locks: a
request costs a few dict updates and ``bisect`` calls, never a ``prometheus_client`` lock.
At scrape time :class:`RouterCollector` turns them (and the live worker pool and trajectory
cache stats) into metric families of a per-app ``CollectorRegistry``.

Label values are bounded: routes outside the app's own routes become ``"other"``, statuses
are HTTP codes, worker labels are the URLs of the current pool, weight versions keep the
``max_versions`` most recent ones and fold older ones into ``"other"``. No request ids, texts
or other per-request values ever become labels.
"""

from __future__ import annotations

import logging
import time
from bisect import bisect_left
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from slime_router_core.context import StashKey
from slime_router_core.contracts import BALANCER, OPENAI_COMPAT, SESSIONS, TRAJECTORY_CACHE, ComponentKey

if TYPE_CHECKING:  # pragma: no cover
    from slime_router_core.context import RequestContext
    from slime_router_core.router import Router

log = logging.getLogger("slime_router.metrics")

PREFIX = "slime_router_"
OTHER = "other"

# Generations take from milliseconds (mock workers) to minutes (long RL rollouts).
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0, 600.0)
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Router-side stages (queueing, tokenization, recording) are sub-millisecond to tens of ms.
STAGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                 5.0, 10.0, 30.0, 60.0, 300.0)

STAGES = ("queueing", "retrying", "tokenization", "upstream", "recording")
CIRCUIT_STATES = ("closed", "open", "half_open")

# per-request values owned by this plugin: when the first and the last attempt's worker was chosen
K_FIRST_SELECTED: StashKey[float] = StashKey("metrics.first_selected")
K_LAST_SELECTED: StashKey[float] = StashKey("metrics.last_selected")


class Histogram:
    """A fixed-bucket histogram (Prometheus semantics: bucket ``le=b`` counts values <= b)."""

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def buckets(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        acc = 0
        for bound, n in zip(self.bounds, self.counts):
            acc += n
            out.append((floatToGoString(bound), acc))
        out.append(("+Inf", self.count))
        return out


class BoundedCounter:
    """Counts per label value, keeping at most ``max_values`` values; the oldest fold into "other"."""

    def __init__(self, max_values: int) -> None:
        self.max_values = max(1, int(max_values))
        self.values: OrderedDict[str, int] = OrderedDict()
        self.other = 0

    def add(self, key: str, n: int = 1) -> None:
        values = self.values
        if key in values:
            values[key] += n
            values.move_to_end(key)  # most recently seen last: the oldest is folded first
            return
        if len(values) >= self.max_values:
            _, count = values.popitem(last=False)
            self.other += count
        values[key] = n

    def items(self) -> list[tuple[str, int]]:
        out = list(self.values.items())
        if self.other:
            out.append((OTHER, self.other))
        return out


def _status_label(status: int) -> str:
    return str(status) if 100 <= status <= 599 else "0"


def _reply_objects(response: Any, stream: bool) -> list[dict]:
    """The SGLang reply objects of a /generate answer: one per prompt/sample.

    For a stream, ``response`` is the list of chunks: the last chunk of each ``index`` carries
    the final counts (prompt_tokens / completion_tokens are cumulative in every stream mode).
    """
    if isinstance(response, dict):
        return [response]
    if not isinstance(response, list):
        return []
    if not stream:
        return [r for r in response if isinstance(r, dict)]
    last: dict[Any, dict] = {}
    for chunk in response:
        if isinstance(chunk, dict) and "error" not in chunk:
            last[chunk.get("index", 0)] = chunk
    return list(last.values())


def _entry(route: str, status: int, stream: bool, worker: str | None, attempts: int, finished_at: float,
           breakdown: dict[str, float | None], error: str | None) -> dict[str, Any]:
    entry = {"route": route, "status": status, "stream": stream, "worker": worker, "attempts": attempts,
             "finished_at": finished_at,
             **{k: (round(v * 1000, 3) if v is not None else None) for k, v in breakdown.items()}}
    if error:
        entry["error"] = error[:300]
    return entry


class MetricsState:
    """All metrics of one router app. Registered as the component ``"metrics"``."""

    def __init__(self, router: Router, max_versions: int = 20, recent: int = 100) -> None:
        self.router = router
        self.started_at = time.time()
        self.known_routes: set[str] = {"/generate"}
        # request-path counters, keyed by bounded label tuples
        self.requests: dict[tuple[str, str], int] = {}
        self.durations: dict[tuple[str, str], Histogram] = {}
        self.upstream: dict[str, Histogram] = {}
        self.ttft: dict[str, Histogram] = {}
        self.stages: dict[tuple[str, str], Histogram] = {}
        self.prompt_tokens: dict[str, int] = {}
        self.completion_tokens: dict[str, int] = {}
        self.cached_tokens: dict[str, int] = {}
        self.retries: dict[str, int] = {}
        self.upstream_failures: dict[str, int] = {}  # reason: HTTP status or "connection"
        self.weight_versions = BoundedCounter(max_versions)
        self.recent: deque[tuple[Any, ...]] | None = deque(maxlen=recent) if recent > 0 else None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(RouterCollector(self))

    # --- labels --------------------------------------------------------------------------------

    def set_known_routes(self, paths: Iterable[object]) -> None:
        """The app's own static paths: the only route label values besides "other"."""
        self.known_routes = {p for p in paths if isinstance(p, str) and "{" not in p} | {"/generate"}

    def route_label(self, route: str) -> str:
        return route if route in self.known_routes else OTHER

    # --- recording (called from the hooks) -----------------------------------------------------

    def on_worker_selected(self, ctx: RequestContext) -> None:
        now = time.perf_counter()
        stash = ctx.stash
        if K_FIRST_SELECTED not in stash:
            stash[K_FIRST_SELECTED] = now
        stash[K_LAST_SELECTED] = now

    def on_upstream_failed(self, status: int | None, error: BaseException | None) -> None:
        reason = _status_label(status) if status is not None else "connection"
        self.upstream_failures[reason] = self.upstream_failures.get(reason, 0) + 1

    def on_response(self, ctx: RequestContext, response: Any) -> None:
        route = self.route_label(ctx.route)
        prompt = completion = cached = 0
        for obj in _reply_objects(response, ctx.stream):
            meta = obj.get("meta_info")
            if not isinstance(meta, dict):
                continue
            p, c, h = meta.get("prompt_tokens"), meta.get("completion_tokens"), meta.get("cached_tokens")
            if type(p) is int:
                prompt += p
            if type(c) is int:
                completion += c
            elif isinstance(obj.get("output_ids"), list) and not ctx.stream:
                completion += len(obj["output_ids"])
            if type(h) is int:
                cached += h
            version = meta.get("weight_version")
            if version is not None:
                self.weight_versions.add(str(version))
        if prompt:
            self.prompt_tokens[route] = self.prompt_tokens.get(route, 0) + prompt
        if completion:
            self.completion_tokens[route] = self.completion_tokens.get(route, 0) + completion
        if cached:
            self.cached_tokens[route] = self.cached_tokens.get(route, 0) + cached

    def on_finished(self, ctx: RequestContext) -> None:
        route = self.route_label(ctx.route)
        status = _status_label(ctx.status)
        key = (route, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        timings = ctx.timings
        total = timings.get("total")
        if total is None:
            total = time.perf_counter() - ctx.started
        hist = self.durations.get(key)
        if hist is None:
            hist = self.durations[key] = Histogram(REQUEST_BUCKETS)
        hist.observe(total)
        if ctx.attempts > 1:
            self.retries[route] = self.retries.get(route, 0) + ctx.attempts - 1

        breakdown = self.breakdown(ctx, total)
        up = timings.get("upstream", timings.get("upstream_headers"))
        if up is not None:
            h = self.upstream.get(route)
            if h is None:
                h = self.upstream[route] = Histogram(REQUEST_BUCKETS)
            h.observe(up)
        ttft = breakdown.get("ttft")
        if ttft is not None:
            h = self.ttft.get(route)
            if h is None:
                h = self.ttft[route] = Histogram(TTFT_BUCKETS)
            h.observe(ttft)
        for stage in STAGES:
            v = breakdown.get(stage)
            if v is None:
                continue
            skey = (route, stage)
            h = self.stages.get(skey)
            if h is None:
                h = self.stages[skey] = Histogram(STAGE_BUCKETS)
            h.observe(v)

        if self.recent is not None:  # formatted only when read (GET /metrics/requests)
            self.recent.append((route, ctx.status, ctx.stream, ctx.worker.url if ctx.worker is not None else None,
                                ctx.attempts, time.time(), breakdown, ctx.error))
        if self.router.settings.verbose:
            entry = _entry(route, ctx.status, ctx.stream, ctx.worker.url if ctx.worker is not None else None,
                           ctx.attempts, time.time(), breakdown, ctx.error)
            log.info("request %s status=%s worker=%s attempts=%d | %s", ctx.route, ctx.status, entry["worker"],
                     ctx.attempts, " ".join(f"{k}={entry[k]}ms" for k in breakdown if entry[k] is not None))

    def recent_requests(self, limit: int | None = None) -> list[dict[str, Any]]:
        """The last requests' breakdowns (milliseconds), oldest first."""
        items = list(self.recent) if self.recent is not None else []
        if limit is not None and limit >= 0:
            items = items[-limit:] if limit else []
        return [_entry(*item) for item in items]

    @staticmethod
    def breakdown(ctx: RequestContext, total: float) -> dict[str, float | None]:
        """Where one request's time went, in seconds (``None``: the stage did not happen).

        - queueing: arrival → first worker chosen, minus tokenization (router overhead, waits)
        - retrying: first → last worker chosen (failed attempts and retry back-off)
        - tokenization: the ``pre_request`` hooks (trajectory-cache lookup and tokenization)
        - upstream: the worker's part (non-streaming: the final attempt's round trip;
          streaming: last worker chosen → end of stream)
        - ttft: arrival → first streamed chunk (streams whose chunks are inspected)
        - recording: the ``post_response`` hooks (trajectory-cache recording)
        """
        timings, stash = ctx.timings, ctx.stash
        pre = timings.get("pre_request")
        post = timings.get("post_response")
        first_sel = stash.get(K_FIRST_SELECTED)
        last_sel = stash.get(K_LAST_SELECTED, first_sel)  # both are set together, the last one again per retry
        queueing = retrying = upstream = None
        if first_sel is not None:
            queueing = max(0.0, first_sel - ctx.started - (pre or 0.0))
            retrying = (last_sel or first_sel) - first_sel
        if "upstream" in timings:
            upstream = timings["upstream"]
        elif last_sel is not None and ctx.stream:
            upstream = max(0.0, total - (last_sel - ctx.started) - (post or 0.0))
        elif "upstream_headers" in timings:
            upstream = timings["upstream_headers"]
        ttft = timings.get("first_chunk")  # recorded by the core for every stream
        return {"queueing": queueing, "retrying": retrying, "tokenization": pre, "upstream": upstream,
                "ttft": ttft, "recording": post, "total": total}

    # --- reading ---------------------------------------------------------------------------------

    def _component_stats(self, key: ComponentKey[Any]) -> dict[str, Any] | None:
        """``stats()`` of the component under ``key`` when its plugin is loaded; a broken one must not break
        /metrics."""
        component = self.router.registry.find(key)
        if component is None:
            return None
        try:
            stats = component.stats()
        except Exception:
            log.exception("%s.stats() failed", key.name)
            return None
        return stats if isinstance(stats, dict) else None

    def openai_stats(self) -> dict[str, Any] | None:
        """openai_compat's counters (requests, recorded turns, history rewrites...), when it is loaded."""
        return self._component_stats(OPENAI_COMPAT)

    def cache_stats(self) -> dict[str, Any] | None:
        return self._component_stats(TRAJECTORY_CACHE)

    def session_store_stats(self) -> dict[str, Any] | None:
        """The sessions plugin's write-behind counters (``GET /sessions`` → ``stats.store``), when it is loaded and
        ``--session-store-url`` is set."""
        stats = self._component_stats(SESSIONS)
        store = stats.get("store") if stats is not None else None
        return store if isinstance(store, dict) else None

    def audit(self) -> dict[str, dict[str, int]] | None:
        """Where the generated tokens went: recorded, served back exactly, or lost (and why), and the tokens
        retrievals had to tokenize afresh, by cause -- so drift shows in production, not in a post-mortem."""
        cache, openai = self.cache_stats(), self.openai_stats()
        if cache is None:
            return None
        a = cache.get("audit") or {}
        generated = {
            "recorded": a.get("generated_recorded", 0),
            "not_recorded_too_large": a.get("generated_not_recorded_too_large", 0),
            "served_exact": a.get("generated_served_exact", 0),
            "evicted_before_retrieval": cache.get("evicted_unretrieved_generated_tokens", 0),
            "gc_removed_before_retrieval": cache.get("gc_removed_unretrieved_generated_tokens", 0),
            "missing_from_retrieval_evicted": cache.get("retrievals_after_eviction_generated_tokens", 0),
        }
        for key, v in (openai or {}).items():  # chat conversations: generated turns kept out of the sequence
            if key.startswith("audit_generated_tokens_") and key != "audit_generated_tokens_exact":
                generated["chat_turn_not_in_sequence_" + key[len("audit_generated_tokens_"):]] = v
        fresh = {"never_recorded": a.get("fresh_served_never_recorded", 0),
                 "evicted": a.get("fresh_served_evicted", 0)}
        return {"generated_tokens": generated, "fresh_tokens_served": fresh}

    def balancing_stats(self) -> list[dict[str, Any]] | None:
        balancer = self.router.registry.find(BALANCER)
        if balancer is None:
            return None
        try:
            return balancer.worker_stats()
        except Exception:
            log.exception("balancing.worker_stats() failed")
            return None

    def worker_details(self) -> dict[str, dict[str, Any]]:
        """Per-worker stats: the balancing component's when it offers them, else the pool's."""
        stats = self.balancing_stats()
        if stats and all(isinstance(s, dict) and "url" in s for s in stats):
            return {s["url"]: s for s in stats}
        out: dict[str, dict[str, Any]] = {}
        for w in self.router.pool:
            d = w.to_dict()
            st = w.state
            d["health"] = st.get("health", "healthy" if w.healthy else "unhealthy")
            d["circuit"] = st.get("circuit", "open" if st.get("circuit_open") else "closed")
            if isinstance(st.get("latency_ema_s"), (int, float)):
                d["latency_ema_s"] = st["latency_ema_s"]
            out[w.url] = d
        return out

    def snapshot(self) -> dict[str, Any]:
        """The /metrics JSON: the seed guide's ``router`` and ``cache`` sections, then details."""
        pool = self.router.pool
        workers = pool.workers()
        out: dict[str, Any] = {
            "router": {
                "active_workers": len(workers),
                "worker_loads": {w.url: w.inflight for w in workers},
                "total_in_flight": sum(w.inflight for w in workers),
            }
        }
        stats = self.cache_stats()
        if stats is not None:
            hits = int(stats.get("cache_hits", 0) or 0)
            misses = int(stats.get("cache_misses", 0) or 0)
            size_bytes = stats.get("cache_size_bytes") or 0
            out["cache"] = {
                "total_entries": stats.get("total_entries", 0),
                "cache_hits": hits,
                "cache_misses": misses,
                # from the very numbers shown, so hits, misses and rate always agree
                "hit_rate": hits / (hits + misses) if hits + misses else 0.0,
                "cur_cache_size": stats.get("cur_cache_size", 0),
                "max_cache_size": stats.get("max_cache_size", 0),
                "cache_size_mb": round(size_bytes / (1024 * 1024), 6),
                "gc_threshold_k": stats.get("gc_threshold_k"),
            }
            out["cache_stats"] = stats  # everything the cache reports (token-level hit rate, evictions...)
        openai = self.openai_stats()
        audit = self.audit()
        if audit is not None:
            out["audit"] = audit
        if openai is not None:
            out["openai_compat"] = openai  # incl. history_rewritten / rewritten_turns (templates rewriting history)
        store = self.session_store_stats()
        if store is not None:
            out["session_store"] = store
        out["workers"] = self.worker_details()
        out["requests"] = self.request_summary()
        out["admission"] = self.router.admission.stats()
        out["weight_versions"] = dict(self.weight_versions.items())
        out["uptime_s"] = round(time.time() - self.started_at, 3)
        return out

    def request_summary(self) -> dict[str, Any]:
        by_route: dict[str, dict[str, int]] = {}
        for (route, status), n in sorted(self.requests.items()):
            by_route.setdefault(route, {})[status] = n
        return {
            "total": sum(self.requests.values()),
            "by_route": by_route,
            "retries": sum(self.retries.values()),
            "upstream_failures": dict(self.upstream_failures),
            "prompt_tokens": sum(self.prompt_tokens.values()),
            "completion_tokens": sum(self.completion_tokens.values()),
            "cached_tokens": sum(self.cached_tokens.values()),
        }


def _hist_family(name: str, doc: str, labels: list[str], hists: dict[Any, Histogram]) -> HistogramMetricFamily:
    fam = HistogramMetricFamily(name, doc, labels=labels)
    for key, h in sorted(hists.items()):
        fam.add_metric(list(key) if isinstance(key, tuple) else [key], h.buckets(), h.sum)
    return fam


def _counter_family(name: str, doc: str, label: str, values: dict[str, int] | list[tuple[str, int]]
                    ) -> CounterMetricFamily:
    fam = CounterMetricFamily(name, doc, labels=[label])
    for key, v in sorted(values.items() if isinstance(values, dict) else values):
        fam.add_metric([key], v)
    return fam


class RouterCollector:
    """Turns a :class:`MetricsState`, the worker pool and the cache stats into metric families."""

    def __init__(self, state: MetricsState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        s = self.state
        P = PREFIX
        # requests
        fam = CounterMetricFamily(P + "requests", "Client requests finished, by route and HTTP status "
                                  "(499: client went away).", labels=["route", "status"])
        for (route, status), n in sorted(s.requests.items()):
            fam.add_metric([route, status], n)
        yield fam
        yield _hist_family(P + "request_duration_seconds", "End-to-end request latency in the router, by route "
                           "and status.", ["route", "status"], s.durations)
        yield _hist_family(P + "upstream_latency_seconds", "Worker round trip of the successful attempt "
                           "(streams: time to response headers).", ["route"], s.upstream)
        yield _hist_family(P + "time_to_first_token_seconds", "Arrival to first streamed chunk (streams whose "
                           "chunks the router inspects).", ["route"], s.ttft)
        yield _hist_family(P + "request_stage_seconds", "Per-request time by stage: queueing, retrying, "
                           "tokenization (pre_request hooks), upstream, recording (post_response hooks).",
                           ["route", "stage"], s.stages)
        yield _counter_family(P + "prompt_tokens", "Prompt tokens reported by workers (meta_info.prompt_tokens).",
                              "route", s.prompt_tokens)
        yield _counter_family(P + "completion_tokens", "Generated tokens reported by workers "
                              "(meta_info.completion_tokens).", "route", s.completion_tokens)
        yield _counter_family(P + "worker_cached_tokens", "Prompt tokens served from the workers' prefix cache "
                              "(meta_info.cached_tokens).", "route", s.cached_tokens)
        yield _counter_family(P + "retries", "Extra attempts on another worker after a failed attempt.",
                              "route", s.retries)
        yield _counter_family(P + "upstream_failures", "Failed upstream attempts, by reason (HTTP status or "
                              "'connection').", "reason", s.upstream_failures)
        yield _counter_family(P + "weight_version_responses", "Reply objects per weight version (the most "
                              f"recent {s.weight_versions.max_values} versions; older ones as 'other').",
                              "version", s.weight_versions.items())
        yield from self.collect_workers()
        yield from self.collect_admission()
        yield from self.collect_cache()
        yield from self.collect_audit()
        yield from self.collect_openai()
        yield from self.collect_session_store()
        yield GaugeMetricFamily(P + "start_time_seconds", "Unix time the router started.", value=s.started_at)

    def collect_admission(self) -> Iterator[Metric]:
        """--max-concurrent-requests: generations held and queued, and the 429s by reason."""
        P = PREFIX
        a = self.state.router.admission.stats()
        yield GaugeMetricFamily(P + "admission_in_flight", "Generations holding a --max-concurrent-requests slot.",
                                value=a["in_flight"])
        yield GaugeMetricFamily(P + "admission_queued", "Generations waiting for a slot.", value=a["queued"])
        yield GaugeMetricFamily(P + "admission_limit", "--max-concurrent-requests (0: unlimited).",
                                value=a["max_concurrent_requests"])
        rejected = CounterMetricFamily(P + "admission_rejected", "Generations answered 429 (queue full, or waited "
                                       "longer than --queue-timeout).", labels=["reason"])
        rejected.add_metric(["queue_full"], a["rejected_queue_full"])
        rejected.add_metric(["queue_timeout"], a["rejected_queue_timeout"])
        yield rejected

    def collect_workers(self) -> Iterator[Metric]:
        P = PREFIX
        workers = self.state.router.pool.workers()
        yield GaugeMetricFamily(P + "workers", "Registered workers.", value=len(workers))
        yield GaugeMetricFamily(P + "workers_available", "Workers that can take requests (healthy, circuit "
                                "closed).", value=sum(1 for w in workers if w.available))
        yield GaugeMetricFamily(P + "in_flight_requests", "Requests in flight to workers.",
                                value=sum(w.inflight for w in workers))
        inflight = GaugeMetricFamily(P + "worker_in_flight", "Requests in flight per worker.", labels=["worker"])
        requests = CounterMetricFamily(P + "worker_requests", "Attempts sent per worker.", labels=["worker"])
        failures = CounterMetricFamily(P + "worker_failures", "Failed attempts per worker.", labels=["worker"])
        healthy = GaugeMetricFamily(P + "worker_healthy", "1 if the worker passes health checks.", labels=["worker"])
        available = GaugeMetricFamily(P + "worker_available", "1 if the worker can take requests.",
                                      labels=["worker"])
        circuit = GaugeMetricFamily(P + "worker_circuit_state", "Circuit breaker state per worker (1 for the "
                                    "current state).", labels=["worker", "state"])
        latency = GaugeMetricFamily(P + "worker_latency_ema_seconds", "Smoothed worker latency (balancing).",
                                    labels=["worker"])
        for w in workers:
            url = [w.url]
            inflight.add_metric(url, w.inflight)
            requests.add_metric(url, w.requests)
            failures.add_metric(url, w.failures)
            healthy.add_metric(url, 1 if w.healthy else 0)
            available.add_metric(url, 1 if w.available else 0)
            cur = w.state.get("circuit", "open" if w.state.get("circuit_open") else "closed")
            for st in CIRCUIT_STATES:
                circuit.add_metric([w.url, st], 1 if cur == st else 0)
            ema = w.state.get("latency_ema_s")
            if isinstance(ema, (int, float)):
                latency.add_metric(url, float(ema))
        yield from (inflight, requests, failures, healthy, available, circuit, latency)

    def collect_audit(self) -> Iterator[Metric]:
        audit = self.state.audit()
        if audit is None:
            return
        yield _counter_family(PREFIX + "audit_generated_tokens", "Generated tokens by what became of them: recorded, "
                              "not recorded (one request over a quarter of the bound), served back exactly by "
                              "retrievals, evicted / GC-removed before any retrieval, missing from a retrieval "
                              "(evicted), kept out of a retrieved chat's sequence (by cause).", "outcome",
                              audit["generated_tokens"])
        yield _counter_family(PREFIX + "audit_fresh_tokens_served", "Tokens retrievals tokenized afresh (loss_mask 0), "
                              "by cause: text never recorded, or recorded and evicted.", "cause",
                              audit["fresh_tokens_served"])

    def collect_openai(self) -> Iterator[Metric]:
        stats = self.state.openai_stats()
        for key, v in sorted((stats or {}).items()):  # a fixed set of counter names: bounded
            if isinstance(v, int) and not isinstance(v, bool) and key != "history_entries":
                yield CounterMetricFamily(PREFIX + "openai_" + key, f"openai_compat: {key.replace('_', ' ')}.",
                                          value=v)

    def collect_cache(self) -> Iterator[Metric]:
        stats = self.state.cache_stats()
        if stats is None:
            return
        P = PREFIX + "cache_"

        def num(key: str) -> float | None:
            v = stats.get(key)
            return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

        gauges = (("entries", "total_entries", "Trajectories (entries) in the trajectory cache."),
                  ("size_tokens", "cur_cache_size", "Tokens held by the trajectory cache."),
                  ("max_size_tokens", "max_cache_size", "Token capacity of the trajectory cache."),
                  ("size_bytes", "cache_size_bytes", "Bytes used by the trajectory cache."),
                  ("hit_rate", "hit_rate", "Hit rate as the cache reports it."),
                  ("max_record_tokens", "max_record_tokens",
                   "Most tokens one record may add (a quarter of the bound)."))
        counters = (("hits", "cache_hits", "Cache lookups that reused recorded tokens."),
                    ("misses", "cache_misses", "Cache lookups that found nothing to reuse."),
                    ("hit_tokens", "hit_tokens", "Prompt tokens reused from the cache."),
                    ("lookup_tokens", "lookup_tokens", "Prompt tokens looked up in the cache."),
                    ("evictions", "evictions", "Entries evicted from the cache."),
                    ("evicted_tokens", "evicted_tokens", "Tokens evicted from the cache."),
                    ("gc_runs", "gc_runs", "Cache garbage-collection runs."),
                    # training data lost or at risk: each should stay 0 with a well-sized bound
                    ("records_too_large", "records_too_large",
                     "Requests passed through unrecorded: their record would add more than max_record_tokens."),
                    ("records_too_large_tokens", "records_too_large_tokens", "Tokens of those records."),
                    ("evicted_unretrieved", "evicted_unretrieved",
                     "Evicted entries holding generated tokens no retrieval had returned."),
                    ("evicted_unretrieved_generated_tokens", "evicted_unretrieved_generated_tokens",
                     "Generated tokens evicted before any retrieval returned them."),
                    ("gc_removed_unretrieved", "gc_removed_unretrieved",
                     "Entries removed by weight-version GC holding generated tokens no retrieval had returned."),
                    ("gc_removed_unretrieved_generated_tokens", "gc_removed_unretrieved_generated_tokens",
                     "Generated tokens removed by weight-version GC before any retrieval returned them."),
                    ("retrievals_after_eviction", "retrievals_after_eviction",
                     "Retrievals that ran into evicted text (answered with \"evicted\": true, or 410 if strict)."),
                    ("retrievals_after_eviction_generated_tokens", "retrievals_after_eviction_generated_tokens",
                     "Generated tokens such retrievals got back as fresh tokens (loss_mask 0)."))
        for name, key, doc in gauges:
            v = num(key)
            if v is not None:
                yield GaugeMetricFamily(P + name, doc, value=v)
        for name, key, doc in counters:
            v = num(key)
            if v is not None:
                yield CounterMetricFamily(P + name, doc, value=v)

    def collect_session_store(self) -> Iterator[Metric]:
        """--session-store-url: the write-behind's queue and counters (only when it is configured)."""
        stats = self.state.session_store_stats()
        if stats is None:
            return
        P = PREFIX + "session_store_"
        for key, v in sorted(stats.items()):  # a fixed set of names: bounded
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            doc = SESSION_STORE_DOCS.get(key, f"session store: {key.replace('_', ' ')}.")
            if key in SESSION_STORE_GAUGES:
                yield GaugeMetricFamily(P + key, doc, value=v)
            else:
                yield CounterMetricFamily(P + key, doc, value=v)


# The write-behind's stats (slime_router_plugins/sessions/write_behind.py, ``WriteBehind.stats``): the gauges, and
# what each number means (a counter not listed here is exported all the same, with a generic description).
SESSION_STORE_GAUGES = frozenset({"queued", "queue_max"})
SESSION_STORE_DOCS = {
    "queued": "Session entries waiting to be written to the session store (queued, encoded or being written).",
    "queue_max": "Most session entries that may wait; beyond, new ones are dropped.",
    "entries_queued": "Session entries queued for the session store (one per finished request of a session).",
    "entries_written": "Session entries written to the session store.",
    "bytes_written": "Bytes of session entries written to the session store.",
    "write_errors": "Failed writes of a batch of session entries (each retried).",
    "write_retries": "Retries of a failed batch of session entries.",
    "entries_dropped": "Session entries dropped because the write-behind queue was full (the store down or too "
                       "slow): those sessions are incomplete in the store.",
    "loads": "Reads of a session this replica did not hold from the session store.",
    "loaded": "Sessions loaded from the session store.",
    "load_misses": "Reads of a session the session store did not have (a new session).",
    "load_errors": "Sessions that could not be read or rebuilt from the session store (they went on as new "
                   "sessions with a history_unavailable gap).",
    "load_incomplete": "Sessions loaded only in part (an entry missing: dropped).",
    "loaded_turns": "Turns of sessions loaded from the session store.",
    "loaded_records": "Trajectory-cache records imported with sessions loaded from the session store.",
    "record_errors": "Trajectory-cache records or entries that could not be encoded for the session store.",
    "history_errors": "Sessions loaded whose chat history could not be imported into the OpenAI layer.",
}
