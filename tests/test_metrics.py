"""The metrics plugin: /metrics JSON (the seed guide's shape) and Prometheus exposition, scraped
after real traffic through a real router in front of mock SGLang workers."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from fastapi import Request
from fastapi.responses import JSONResponse
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_prometheus

from slime_router_core import HTTPError, Settings, hookimpl
from slime_router_core.context import RequestContext
from slime_router_plugins.metrics import dashboard_path
from slime_router_plugins.metrics.collector import BoundedCounter, Histogram
from slime_router_plugins.metrics.plugin import wants_prometheus
from slime_router_plugins.radix_tree.trie import DEFAULT_MAX_TOKENS
from slime_router_testing import free_port
from slime_router_testing.redis_server import RedisServer

ENGINES = ("sglang", "vllm")  # every test with mock workers runs against both (conftest.py)

ROUTER_KEYS = {"active_workers", "worker_loads", "total_in_flight"}
CACHE_KEYS = {"total_entries", "cache_hits", "cache_misses", "hit_rate", "cur_cache_size", "max_cache_size",
              "cache_size_mb", "gc_threshold_k"}


def gen(url: str, text: str = "Hello", stream: bool = False, n: int = 4, **kw: Any) -> httpx.Response:
    body = {"text": text, "sampling_params": {"max_new_tokens": n}, "stream": stream, **kw}
    return httpx.post(url + "/generate", json=body, timeout=30)


def scrape(url: str, path: str = "/metrics/prometheus", accept: str | None = None) -> dict[str, Any]:
    """Parse a Prometheus scrape into {family name: family}."""
    headers = {"accept": accept} if accept else {}
    r = httpx.get(url + path, headers=headers)
    assert r.status_code == 200, r.text
    parse = parse_openmetrics if "openmetrics" in r.headers["content-type"] else parse_prometheus
    return {f.name: f for f in parse(r.text)}


def value(families: dict[str, Any], family: str, sample: str | None = None, **labels: str) -> float:
    """Sum of the samples named ``sample`` (default: the family's own) matching ``labels``."""
    fam = families[family]
    name = sample or (family + "_total" if fam.type == "counter" else family)
    return sum(s.value for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


# --- a stand-in trajectory cache (the real radix_tree component has the same stats() keys) ------------


class FakeCache:
    """Counts a hit when the exact prompt text was answered before (whole-prompt granularity). It registers as the
    trajectory cache, so it has the contract's members; the metrics tests only read ``stats()``."""

    max_record_tokens = 0

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.hits = self.misses = 0
        self.hit_tokens = self.lookup_tokens = 0

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def refresh(self) -> None:
        pass

    async def prepare(self, text: str) -> Any:
        raise NotImplementedError("not used by the metrics tests")

    async def prepare_ids(self, ids: list[int]) -> Any:
        raise NotImplementedError("not used by the metrics tests")

    async def record(self, prepared: Any, response: dict, worker_url: str | None) -> bool:
        raise NotImplementedError("not used by the metrics tests")

    async def record_replies(self, prepared: list, replies: list, n: int, worker_url: str | None,
                             raw: bytes | None = None) -> list:
        raise NotImplementedError("not used by the metrics tests")

    async def retrieve(self, text: str, strict: bool = False) -> dict[str, Any]:
        raise NotImplementedError("not used by the metrics tests")

    def stats(self) -> dict[str, Any]:
        return {"total_entries": len(self.seen), "cache_hits": self.hits, "cache_misses": self.misses,
                "hit_rate": self.hits / max(1, self.hits + self.misses), "hit_tokens": self.hit_tokens,
                "lookup_tokens": self.lookup_tokens, "cur_cache_size": 7 * len(self.seen), "max_cache_size": 10000,
                "cache_size_bytes": 3 * 1024 * 1024 + 512 * 1024, "evictions": 2, "gc_runs": 1,
                "gc_threshold_k": 100, "versions": ["default"]}


class FakeCachePlugin:
    def __init__(self) -> None:
        self.cache = FakeCache()

    @hookimpl
    def register_components(self, registry: Any) -> None:
        registry.register("radix_tree", self.cache, owner="fake_cache")

    @hookimpl
    def pre_request(self, ctx: RequestContext) -> None:
        text = ctx.body.get("text")
        self.cache.lookup_tokens += 7
        if text in self.cache.seen:
            self.cache.hits += 1
            self.cache.hit_tokens += 7
        else:
            self.cache.misses += 1

    @hookimpl
    def post_response(self, ctx: RequestContext, response: Any) -> None:
        self.cache.seen.add(ctx.body.get("text"))


class CustomRoutePlugin:
    """A plugin with its own client-facing route, served through Router.generate / generate_stream."""

    @hookimpl
    def register_routes(self, app: Any, router: Any) -> None:
        @app.post("/custom")
        async def custom(request: Request) -> JSONResponse:
            body = await request.json()
            ctx = RequestContext(body.pop("route", "/custom"), body, upstream_path="/generate")
            try:
                if ctx.stream:
                    chunks = [c async for c in router.generate_stream(ctx)]
                    out: Any = chunks[-1]
                else:
                    out = await router.generate(ctx)
            except HTTPError as e:
                router.finish(ctx, e.status, e.message)
                return JSONResponse(e.to_dict(), status_code=e.status)
            router.finish(ctx, 200)
            return JSONResponse(out)


# --- JSON ----------------------------------------------------------------------------------------------


def test_json_shape_counts_and_in_flight_after_traffic(router, mock_worker):
    w1, w2 = mock_worker(), mock_worker(seed=1)
    r = router(plugins=["metrics"], worker_urls=[w1.url, w2.url])
    before = httpx.get(r.url + "/metrics").json()
    assert set(before) >= {"router", "workers", "requests"} and "cache" not in before
    assert before["router"] == {"active_workers": 2, "worker_loads": {w1.url: 0, w2.url: 0}, "total_in_flight": 0}

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda i: gen(r.url, f"prompt {i}", n=3 + i % 4), range(20)))
        streams = list(pool.map(lambda i: gen(r.url, f"stream {i}", stream=True), range(5)))
    assert all(x.status_code == 200 for x in replies + streams)
    objs = [x.json() for x in replies]

    m = httpx.get(r.url + "/metrics").json()
    assert set(m["router"]) == ROUTER_KEYS
    assert m["router"] == {"active_workers": 2, "worker_loads": {w1.url: 0, w2.url: 0}, "total_in_flight": 0}
    assert "cache" not in m
    req = m["requests"]
    assert req["total"] == 25 and req["by_route"] == {"/generate": {"200": 25}}
    assert req["retries"] == 0 and req["upstream_failures"] == {}
    # tokens come from each reply's meta_info (pass-through streams are not parsed, so not counted)
    assert req["prompt_tokens"] == sum(o["meta_info"]["prompt_tokens"] for o in objs)
    assert req["completion_tokens"] == sum(o["meta_info"]["completion_tokens"] for o in objs) > 0
    assert m["weight_versions"] == {"default": 20}
    assert set(m["workers"]) == {w1.url, w2.url}
    assert sum(w["requests"] for w in m["workers"].values()) == 25
    assert all(w["in_flight"] == 0 and w["health"] == "healthy" and w["circuit"] == "closed"
               for w in m["workers"].values())


def test_in_flight_is_visible_while_requests_run_and_returns_to_zero(router, mock_worker):
    w = mock_worker(latency=0.5)
    r = router(plugins=["metrics"], worker_urls=[w.url])
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(gen, r.url, f"slow {i}") for i in range(4)]
        deadline = time.monotonic() + 5
        seen = 0
        while time.monotonic() < deadline and seen < 4:
            seen = httpx.get(r.url + "/metrics").json()["router"]["total_in_flight"]
            time.sleep(0.01)
        assert seen == 4
        fams = scrape(r.url)
        assert value(fams, "slime_router_in_flight_requests") == 4
        assert value(fams, "slime_router_worker_in_flight", worker=w.url) == 4
        assert all(f.result().status_code == 200 for f in futures)
    m = httpx.get(r.url + "/metrics").json()
    assert m["router"] == {"active_workers": 1, "worker_loads": {w.url: 0}, "total_in_flight": 0}
    assert value(scrape(r.url), "slime_router_in_flight_requests") == 0


def test_cache_section_hit_rate_matches_the_hits_produced(router, mock_worker):
    fake = FakeCachePlugin()
    w = mock_worker()
    r = router(plugins=["metrics"], extra=[("fake_cache", fake)], worker_urls=[w.url])
    m = httpx.get(r.url + "/metrics").json()
    assert set(m["cache"]) == CACHE_KEYS and m["cache"]["hit_rate"] == 0.0
    for text in ["a", "b", "c", "a", "a", "b", "d", "a"]:  # 4 misses (a b c d), 4 hits
        assert gen(r.url, text).status_code == 200
    m = httpx.get(r.url + "/metrics").json()
    assert set(m["cache"]) == CACHE_KEYS
    assert m["cache"] == {"total_entries": 4, "cache_hits": 4, "cache_misses": 4, "hit_rate": 0.5,
                          "cur_cache_size": 28, "max_cache_size": 10000, "cache_size_mb": 3.5, "gc_threshold_k": 100}
    assert m["cache_stats"]["evictions"] == 2
    fams = scrape(r.url)
    assert value(fams, "slime_router_cache_hits") == 4
    assert value(fams, "slime_router_cache_misses") == 4
    assert value(fams, "slime_router_cache_hit_rate") == 0.5
    assert value(fams, "slime_router_cache_hit_tokens") == 28
    assert value(fams, "slime_router_cache_lookup_tokens") == 56
    assert value(fams, "slime_router_cache_evictions") == 2
    assert value(fams, "slime_router_cache_entries") == 4
    assert value(fams, "slime_router_cache_size_bytes") == 3.5 * 1024 * 1024
    # the fake's pre_request ran: its time is the "tokenization" stage
    assert value(fams, "slime_router_request_stage_seconds", "slime_router_request_stage_seconds_count",
                 stage="tokenization") == 8


# --- Prometheus ------------------------------------------------------------------------------------------


def test_prometheus_both_formats_and_paths_parse_and_match_the_traffic(router, mock_worker):
    w = mock_worker()
    r = router(plugins=["metrics"], worker_urls=[w.url])
    replies = [gen(r.url, f"p{i}").json() for i in range(6)]
    for i in range(3):
        assert gen(r.url, f"s{i}", stream=True).status_code == 200
    # rejected by the core's validation before any hook: never proxied, not counted
    assert httpx.post(r.url + "/generate", json={"sampling_params": {}}).status_code == 400

    text_plain = scrape(r.url, "/metrics", accept="text/plain")
    negotiated = scrape(r.url, "/metrics", accept="application/openmetrics-text;version=1.0.0,text/plain;q=0.5")
    always = scrape(r.url, "/metrics/prometheus")
    query = scrape(r.url, "/metrics?format=prometheus")
    assert httpx.get(r.url + "/metrics", headers={"accept": "*/*"}).headers["content-type"] == "application/json"
    assert "openmetrics" in httpx.get(r.url + "/metrics?format=openmetrics").headers["content-type"]

    for fams in (text_plain, negotiated, always, query):
        assert all(name.startswith("slime_router_") for name in fams)
        assert value(fams, "slime_router_requests", route="/generate", status="200") == 9
        hist = "slime_router_request_duration_seconds"
        assert value(fams, hist, hist + "_count", route="/generate", status="200") == 9
        assert value(fams, hist, hist + "_bucket", route="/generate", status="200", le="+Inf") == 9
        assert value(fams, hist, hist + "_sum") > 0
        assert value(fams, "slime_router_upstream_latency_seconds", "slime_router_upstream_latency_seconds_count") == 9
        ttft = "slime_router_time_to_first_token_seconds"
        assert value(fams, ttft, ttft + "_count", route="/generate") == 3
        assert value(fams, "slime_router_prompt_tokens") == sum(o["meta_info"]["prompt_tokens"] for o in replies)
        assert value(fams, "slime_router_completion_tokens") == sum(
            o["meta_info"]["completion_tokens"] for o in replies)
        assert value(fams, "slime_router_weight_version_responses", version="default") == 6
        assert value(fams, "slime_router_workers") == 1 and value(fams, "slime_router_workers_available") == 1
        assert value(fams, "slime_router_worker_requests", worker=w.url) == 9
        assert value(fams, "slime_router_worker_failures", worker=w.url) == 0
        assert value(fams, "slime_router_worker_healthy", worker=w.url) == 1
        assert value(fams, "slime_router_worker_circuit_state", worker=w.url, state="closed") == 1
        assert value(fams, "slime_router_worker_circuit_state", worker=w.url, state="open") == 0
        assert value(fams, "slime_router_in_flight_requests") == 0
        assert value(fams, "slime_router_retries") == 0
        assert "slime_router_cache_hits" not in fams  # no trajectory cache loaded
        # stage histograms: every proxied request has queueing, upstream and total accounted
        stage = "slime_router_request_stage_seconds"
        assert value(fams, stage, stage + "_count", stage="queueing") == 9
        assert value(fams, stage, stage + "_count", stage="upstream") == 9
        # bounded labels only
        for fam in fams.values():
            for s in fam.samples:
                assert set(s.labels) <= {"route", "status", "worker", "state", "stage", "reason", "version", "le"}


def test_failures_retries_and_statuses_are_counted(router, mock_worker):
    good = mock_worker()
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: connection refused, retried elsewhere
    r = router(plugins=["metrics"], worker_urls=[dead, good.url])
    assert all(gen(r.url, f"x{i}").status_code == 200 for i in range(6))
    m = httpx.get(r.url + "/metrics").json()
    failed = m["workers"][dead]["failures"]
    assert failed >= 1  # round robin sends some first attempts to the dead worker
    assert m["requests"]["retries"] == failed
    assert m["requests"]["upstream_failures"] == {"connection": failed}
    fams = scrape(r.url)
    assert value(fams, "slime_router_retries", route="/generate") == failed
    assert value(fams, "slime_router_upstream_failures", reason="connection") == failed
    assert value(fams, "slime_router_worker_failures", worker=dead) == failed
    assert value(fams, "slime_router_requests", route="/generate", status="200") == 6
    stage = "slime_router_request_stage_seconds"
    assert value(fams, stage, stage + "_count", stage="retrying") == 6

    # a worker error (5xx, not retried by the core) and no worker at all (503 before any selection)
    bad = mock_worker(failure_rate=1.0, fail_status=500)
    r2 = router(plugins=["metrics"], worker_urls=[bad.url])
    assert gen(r2.url, "y").status_code == 500
    r3 = router(plugins=["metrics"])
    assert gen(r3.url, "z").status_code == 503
    f2, f3 = scrape(r2.url), scrape(r3.url)
    assert value(f2, "slime_router_requests", route="/generate", status="500") == 1
    assert value(f2, "slime_router_upstream_failures", reason="500") == 1
    assert value(f3, "slime_router_requests", route="/generate", status="503") == 1
    assert value(f3, "slime_router_workers") == 0


def test_each_router_in_a_process_counts_only_its_own_requests(router, mock_worker):
    w = mock_worker()
    a = router(plugins=["metrics"], worker_urls=[w.url])
    b = router(plugins=["metrics"], worker_urls=[w.url])
    for _ in range(2):
        gen(a.url)
    for _ in range(3):
        gen(b.url)
    assert httpx.get(a.url + "/metrics").json()["requests"]["total"] == 2
    assert httpx.get(b.url + "/metrics").json()["requests"]["total"] == 3
    assert value(scrape(b.url), "slime_router_requests") == 3


@pytest.mark.engines("sglang", reason="versions are changed on the worker behind the router's back: vLLM does not "
                                       "stamp replies, the router only knows versions set through it")
def test_plugin_routes_streams_weight_versions_and_label_bounds(router, mock_worker):
    w = mock_worker()
    r = router(plugins=["metrics"], extra=[("custom", CustomRoutePlugin())],
               settings=Settings(worker_urls=[w.url], extra={"metrics_max_weight_versions": 3}))
    body = {"text": "Hi", "sampling_params": {"max_new_tokens": 5}}
    for version in ["v1", "v2", "v3", "v4", "v5", "v5"]:
        httpx.post(w.url + "/mock/configure", json={"weight_version": version})
        assert httpx.post(r.url + "/custom", json=body).status_code == 200
    last = httpx.post(r.url + "/custom", json={**body, "stream": True}).json()
    assert httpx.post(r.url + "/custom", json={**body, "route": "/user/12345"}).status_code == 200

    fams = scrape(r.url)
    assert value(fams, "slime_router_requests", route="/custom", status="200") == 7
    assert value(fams, "slime_router_requests", route="other", status="200") == 1  # unknown route folded
    # versions: the 3 most recent kept, older ones folded into "other"
    versions = {s.labels["version"]: s.value for s in fams["slime_router_weight_version_responses"].samples
                if s.name.endswith("_total")}
    assert versions == {"v3": 1, "v4": 1, "v5": 2 + 2, "other": 2}  # v5 also for the stream and '/user/..'
    # router.generate_stream inspects chunks: TTFT and the stream's tokens are recorded
    ttft = "slime_router_time_to_first_token_seconds"
    assert value(fams, ttft, ttft + "_count", route="/custom") == 1
    assert value(fams, "slime_router_completion_tokens", route="/custom") >= last["meta_info"]["completion_tokens"]


def test_verbose_logs_breakdown_and_recent_requests_endpoint(router, mock_worker, caplog):
    caplog.set_level(logging.INFO, logger="slime_router.metrics")
    w = mock_worker(latency=0.02)
    r = router(plugins=["metrics"], worker_urls=[w.url], verbose=True)
    gen(r.url, "one")
    gen(r.url, "two", stream=True)
    recent = httpx.get(r.url + "/metrics/requests").json()
    assert recent["capacity"] == 100 and len(recent["requests"]) == 2
    plain, stream = recent["requests"]
    for e in (plain, stream):
        assert e["route"] == "/generate" and e["status"] == 200 and e["worker"] == w.url and e["attempts"] == 1
        assert e["upstream"] >= 20 and e["total"] >= e["upstream"]
        assert e["queueing"] is not None and e["queueing"] < e["total"]
        assert e["tokenization"] is None and e["recording"] is not None  # no pre_request hooks loaded
    assert plain["ttft"] is None and stream["ttft"] >= 20
    assert httpx.get(r.url + "/metrics/requests?limit=1").json()["requests"] == [stream]
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and len([x for x in caplog.records if x.name == "slime_router.metrics"]) < 2:
        time.sleep(0.01)
    lines = [x.getMessage() for x in caplog.records if x.name == "slime_router.metrics"]
    assert len(lines) == 2
    assert all("queueing=" in line and "upstream=" in line and "total=" in line for line in lines)
    assert "ttft=" in lines[1]


# --- the dashboard and small units --------------------------------------------------------------------


def test_grafana_dashboard_is_valid_and_uses_only_exposed_metrics(router, mock_worker):
    with open(dashboard_path()) as f:
        dash = json.load(f)
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 20 and all(p["type"] in ("row", "stat", "timeseries") for p in dash["panels"])
    used = {re.sub(r"_(bucket|sum|count|total)$", "", n) for e in exprs for n in re.findall(r"slime_router_\w+", e)}

    w = mock_worker()
    r = router(plugins=["metrics"], extra=[("fake_cache", FakeCachePlugin())], worker_urls=[w.url])
    gen(r.url)
    exposed = set(scrape(r.url))
    assert used <= exposed, used - exposed
    # every request-path family has a panel
    assert {"slime_router_requests", "slime_router_request_duration_seconds", "slime_router_upstream_latency_seconds",
            "slime_router_time_to_first_token_seconds", "slime_router_prompt_tokens", "slime_router_retries",
            "slime_router_weight_version_responses", "slime_router_worker_in_flight",
            "slime_router_cache_hits", "slime_router_cache_evictions"} <= used


@pytest.mark.parametrize("accept,prom", [
    ("", False), ("*/*", False), ("application/json", False), ("text/html,application/xhtml+xml,*/*;q=0.8", False),
    ("text/plain", True), ("text/plain;version=0.0.4", True),
    ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
     "text/plain;version=0.0.4;q=0.5,*/*;q=0.1", True),
    ("application/json, text/plain;q=0.5", False), ("text/plain;q=0.5, application/json;q=0.9", False),
])
def test_accept_negotiation(accept, prom):
    assert wants_prometheus(accept) is prom


def test_histogram_buckets_are_cumulative_and_inclusive():
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 1.0, 7.0):
        h.observe(v)
    assert h.buckets() == [("0.1", 2), ("1.0", 4), ("+Inf", 5)] and h.count == 5 and h.sum == pytest.approx(8.65)


def test_bounded_counter_folds_the_oldest_into_other():
    c = BoundedCounter(2)
    for v in ["a", "b", "a", "c", "d"]:
        c.add(v)
    assert c.items() == [("c", 1), ("d", 1), ("other", 3)]


def test_cache_section_with_the_real_trajectory_cache(router, mock_worker):
    w = mock_worker()
    r = router(plugins=["metrics", "radix_tree"], hf_checkpoint="builtin:qwen3", worker_urls=[w.url])
    first = "<|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\n"
    reply = gen(r.url, first).json()
    gen(r.url, first + reply["text"] + "<|im_end|>\n<|im_start|>user\nAnd three?<|im_end|>\n")  # a hit
    gen(r.url, "Something unrelated entirely")  # a miss
    m = httpx.get(r.url + "/metrics").json()
    stats = httpx.get(r.url + "/radix_tree/stats").json()
    assert set(m["cache"]) == CACHE_KEYS
    assert (m["cache"]["cache_hits"], m["cache"]["cache_misses"]) == (1, 2)
    assert m["cache"]["hit_rate"] == pytest.approx(1 / 3)
    assert m["cache"]["cur_cache_size"] == stats["cur_cache_size"] > 0
    assert m["cache"]["cache_size_mb"] == pytest.approx(stats["cache_size_bytes"] / 2**20, rel=1e-3)
    assert m["cache"]["max_cache_size"] == DEFAULT_MAX_TOKENS and m["cache"]["gc_threshold_k"] == 5
    fams = scrape(r.url)
    assert value(fams, "slime_router_cache_hits") == 1 and value(fams, "slime_router_cache_misses") == 2


def test_history_rewrites_reported_by_openai_compat_reach_the_metrics(router, mock_worker):
    w = mock_worker(mode="think", think_text="Greeting detected.", reply_text="Hello!")
    r = router(plugins=["metrics", "radix_tree", "openai_compat"], hf_checkpoint="builtin:qwen3", worker_urls=[w.url])
    msgs = [{"role": "user", "content": "Hi"}]
    first = httpx.post(r.url + "/v1/chat/completions", json={"model": "m", "messages": msgs}).json()["choices"][0]
    msgs += [{"role": "assistant", "content": first["message"]["content"],
              "reasoning_content": first["message"]["reasoning_content"]},
             {"role": "user", "content": "How are you?"}]
    second = httpx.post(r.url + "/v1/chat/completions", json={"model": "m", "messages": msgs}).json()["choices"][0]
    msgs.append({"role": "assistant", "content": second["message"]["content"]})
    res = httpx.post(r.url + "/retrieve_from_messages", json={"messages": msgs}).json()
    assert res["history_rewritten"] is True  # Qwen3's template dropped turn 1's <think> block
    m = httpx.get(r.url + "/metrics").json()
    assert m["openai_compat"]["history_rewritten"] == 1 and m["openai_compat"]["chat_requests"] == 2
    fams = scrape(r.url)
    assert value(fams, "slime_router_openai_history_rewritten") == 1
    assert value(fams, "slime_router_openai_chat_requests") == 2


@pytest.mark.skipif(not RedisServer.available() and not os.environ.get("CI"),
                    reason="redis-server is not installed (apt-get install redis-server)")
def test_session_store_counters_reach_the_metrics_only_when_configured(router, mock_worker):
    w = mock_worker()
    plugins = ["metrics", "radix_tree", "sessions"]
    plain = router(plugins=plugins, settings=Settings(hf_checkpoint="builtin:qwen3", worker_urls=[w.url]))
    assert "session_store" not in httpx.get(plain.url + "/metrics").json()
    assert not any(n.startswith("slime_router_session_store_") for n in scrape(plain.url))
    with RedisServer() as redis_server:
        r = router(plugins=plugins, settings=Settings(hf_checkpoint="builtin:qwen3", worker_urls=[w.url],
                                                      extra={"session_store_url": redis_server.url}))
        for t in range(2):
            assert httpx.post(r.url + "/generate", headers={"X-Session-ID": "s1"}, timeout=30, json={
                "text": f"Hello {t}", "sampling_params": {"max_new_tokens": 4}}).status_code == 200
        assert httpx.get(r.url + "/sessions/unknown-here").status_code == 404  # read from the store too: a miss
        deadline = time.monotonic() + 30
        while httpx.get(r.url + "/sessions").json()["stats"]["store"]["entries_written"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        store = httpx.get(r.url + "/sessions").json()["stats"]["store"]
        m = httpx.get(r.url + "/metrics").json()["session_store"]
        assert m["entries_written"] == 2 and m["bytes_written"] == store["bytes_written"] > 0
        assert m["loads"] == m["load_misses"] == 2 and m["load_errors"] == m["entries_dropped"] == 0  # s1, unknown
        fams = scrape(r.url)
        assert value(fams, "slime_router_session_store_entries_written") == 2
        assert value(fams, "slime_router_session_store_bytes_written") == store["bytes_written"]
        assert value(fams, "slime_router_session_store_loads") == 2
        for name in ("write_errors", "entries_dropped", "load_errors"):
            assert value(fams, "slime_router_session_store_" + name) == 0
        assert fams["slime_router_session_store_queued"].type == "gauge"
        assert value(fams, "slime_router_session_store_queue_max") == store["queue_max"]
        assert value(scrape(r.url, "/metrics", accept="application/openmetrics-text"),
                     "slime_router_session_store_entries_written") == 2
