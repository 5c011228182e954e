"""The balancing plugin against mock SGLang workers on real loopback sockets.

Every distribution claim is checked against what the workers themselves saw (``/mock/stats``,
``/mock/records``), not against what the router says it did.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from slime_router_core import PluginLoadError, Settings, hookimpl
from slime_router_core.context import RequestContext
from slime_router_core.contracts import AFFINITY, SESSION_KEY, Affinity
from slime_router_plugins.balancing import Rendezvous
from slime_router_plugins.balancing.cache_aware import CacheAwarePolicy, session_key
from slime_router_plugins.balancing.health import reported_load
from slime_router_plugins.balancing.plugin import BalancingConfig, parse_status_codes
from slime_router_testing import free_port

GEN = {"sampling_params": {"max_new_tokens": 4}}
ENGINES = ("sglang", "vllm")  # every test with mock workers runs against both (conftest.py)


# --- helpers -------------------------------------------------------------------------------------------


def start(router, workers, plugins=("balancing",), extra_plugins=None, max_attempts=3, **opts: Any):
    """A router in front of ``workers`` with balancing options ``opts`` (e.g. policy="round_robin")."""
    opts.setdefault("health_check_interval", 1.0)
    hf_checkpoint = opts.pop("hf_checkpoint", None)
    settings = Settings(worker_urls=[w.url for w in workers], max_attempts=max_attempts, extra=dict(opts),
                        hf_checkpoint=hf_checkpoint)
    return router(settings=settings, plugins=list(plugins), extra=extra_plugins)


def received(worker) -> int:
    return httpx.get(worker.url + "/mock/stats").json()["requests_received"]


def stats(worker) -> dict:
    return httpx.get(worker.url + "/mock/stats").json()


def reset(*workers) -> None:
    for w in workers:
        httpx.delete(w.url + "/mock/stats")
        httpx.delete(w.url + "/mock/records")


def configure(worker, **knobs: Any) -> None:
    r = httpx.post(worker.url + "/mock/configure", json=knobs)
    assert r.status_code == 200, r.text


def state(r) -> dict:
    return httpx.get(r.url + "/workers/state").json()


def wstate(r, url: str) -> dict:
    return next(w for w in state(r)["workers"] if w["url"] == url)


async def fire(url: str, bodies: list[dict], concurrency: int = 16, headers: list[dict] | None = None) -> list:
    """POST every body to ``url`` with at most ``concurrency`` in flight; returns the responses in order."""
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=30) as client:
        async def one(i: int, body: dict) -> httpx.Response:
            async with sem:
                return await client.post(url, json=body, headers=(headers[i] if headers else None))
        return await asyncio.gather(*(one(i, b) for i, b in enumerate(bodies)))


def wait_for(cond, timeout: float = 5.0, interval: float = 0.01) -> float:
    """Poll ``cond()`` until true; returns the seconds it took (fails the test on timeout)."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"condition not met within {timeout:.1f}s")
        time.sleep(interval)
    return time.monotonic() - t0


class AffinityPlugin:
    """A stand-in for the trajectory cache: conversation id -> the worker that served its last turn."""

    def __init__(self, fixed: str | None = None, tokens: int | None = None) -> None:
        self.last: dict[str, str] = {}
        self.fixed = fixed
        self.tokens = tokens  # reported length of the recorded prefix, if any

    @staticmethod
    def conv(ctx: RequestContext) -> str:
        return str(ctx.body.get("rid", "")).split("/")[0]

    @hookimpl
    def pre_request(self, ctx: RequestContext) -> None:
        url = self.fixed or self.last.get(self.conv(ctx))
        if url:
            ids = ctx.body.get("input_ids")
            prompt = len(ids) if isinstance(ids, list) else 0
            ctx.stash[AFFINITY] = Affinity(url, prompt if self.tokens is None else self.tokens, prompt)

    @hookimpl
    def post_response(self, ctx: RequestContext, response: Any) -> None:
        self.last[self.conv(ctx)] = ctx.worker.url


def workers_by_rid(workers) -> dict[str, set[str]]:
    """conversation id -> set of worker URLs that generated for it (from the workers' own records)."""
    out: dict[str, set[str]] = {}
    for w in workers:
        for rec in httpx.get(w.url + "/mock/records").json():
            rid = rec["rid"]
            if rid.startswith("cmpl-"):  # vLLM's /v1/completions names a request cmpl-<request_id>-<prompt index>
                rid = rid[len("cmpl-"):].rsplit("-", 1)[0]
            out.setdefault(rid.split("/")[0], set()).add(w.url)
    return out


# --- pure units ----------------------------------------------------------------------------------------


def test_rendezvous_moves_few_keys_and_skips_unavailable_workers():
    urls = [f"http://10.0.0.{i}:30000" for i in range(4)]
    ring = Rendezvous()
    ring.set_urls(urls)
    keys = [f"session-{i}" for i in range(4000)]
    before = {k: ring.owner(k) for k in keys}
    counts = {u: sum(1 for v in before.values() if v == u) for u in urls}
    assert all(850 < c < 1150 for c in counts.values()), counts  # even spread
    ring.add("http://10.0.0.9:30000")
    after = {k: ring.owner(k) for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert all(after[k] == "http://10.0.0.9:30000" for k in moved)  # keys only move to the new worker
    assert 0.15 < len(moved) / len(keys) < 0.25  # ~1/5, not a reshuffle
    # an unavailable worker's keys go to their successors, spread over the others; every other key stays put
    allowed = set(urls[1:]) | {"http://10.0.0.9:30000"}
    rerouted = {k: ring.owner(k, allowed) for k in keys}
    assert all(rerouted[k] == after[k] for k in keys if after[k] != urls[0])
    assert all(rerouted[k] != urls[0] for k in keys)
    heirs = [rerouted[k] for k in keys if after[k] == urls[0]]
    assert all(heirs.count(u) > len(heirs) / 8 for u in allowed), heirs  # not all onto one neighbour


def test_rendezvous_is_the_same_in_every_replica():
    """Two routers (replicas) that know the same workers, in any order and after any history of additions and
    removals, rank every session the same way: they agree without talking to each other."""
    urls = [f"http://10.0.1.{i}:30000" for i in range(6)]
    a, b = Rendezvous(), Rendezvous()
    a.set_urls(urls)
    for u in reversed(urls + ["http://10.0.1.99:30000"]):
        b.add(u)
    b.remove("http://10.0.1.99:30000")
    keys = [f"s{i}" for i in range(500)]
    assert all(a.rank(k) == b.rank(k) for k in keys)
    assert all(a.successors(k, set(urls[:3])) == b.successors(k, set(urls[:3])) for k in keys)
    assert len({a.rank(k)[0] for k in keys}) == 6


class _Worker:
    def __init__(self, url: str, inflight: int = 0, reported: int | None = None) -> None:
        self.url, self.inflight, self.state = url, inflight, {}
        if reported is not None:
            self.state["reported_load"] = reported


def test_bounded_load_escape_uses_the_load_workers_report():
    """A busy session owner is recognised from the load the worker itself reports (the requests of every
    replica), not only this router's in-flight count: two replicas with no requests of their own in flight both
    send the session to the same next worker."""
    urls = [f"http://10.0.2.{i}:30000" for i in range(3)]
    order = Rendezvous()
    order.set_urls(urls)
    owner, second, _ = order.rank("hot")
    config = BalancingConfig(cache_aware_abs_threshold=2, cache_aware_rel_threshold=1.5)
    ctx = RequestContext("/generate", {"text": "x"}, headers={"x-session-id": "hot"})
    picks = set()
    for _replica in range(2):
        policy = CacheAwarePolicy(config)
        workers = [_Worker(u, 0, 9 if u == owner else 0) for u in urls]
        for w in workers:
            policy.worker_added(w)  # type: ignore[arg-type]
        picks.add(policy.select(ctx, workers).url)  # type: ignore[arg-type]
    assert picks == {second}
    quiet = [_Worker(u) for u in urls]
    assert CacheAwarePolicy(config).select(ctx, quiet).url == owner  # type: ignore[arg-type]


def test_reported_load_reads_sglang_get_load():
    assert reported_load([{"dp_rank": 0, "num_reqs": 3, "num_waiting_reqs": 2, "num_tokens": 9},
                          {"dp_rank": 1, "num_reqs": 1, "num_waiting_reqs": 0}]) == 6
    assert reported_load({"num_reqs": 4}) == 4
    assert reported_load([{"num_reqs": "x"}]) is None and reported_load(["x"]) is None


@pytest.mark.engines("sglang", reason="vLLM has no /get_load (the checker stops asking it: no reported load)")
async def test_health_checker_polls_the_workers_own_load(router, mock_worker):
    """The load a worker reports is read by the health checker (the signal replicas share)."""
    workers = [mock_worker(token_latency=10.0) for _ in range(2)]  # generating (running) for 40 s
    r = start(router, workers, health_check_interval=0.05)
    async with httpx.AsyncClient(timeout=60) as client:
        held = [asyncio.create_task(client.post(r.url + "/generate", json=dict(GEN, text=f"slow {i}"),
                                                headers={"X-Session-ID": "one"})) for i in range(2)]
        loads: dict = {}
        for _ in range(2000):
            loads = {w["url"]: w.get("reported_load") for w in state(r)["workers"]}
            if sorted(v or 0 for v in loads.values()) == [0, 2]:
                break
            await asyncio.sleep(0.02)
        assert sorted(v or 0 for v in loads.values()) == [0, 2], loads
        for t in held:
            t.cancel()


def test_session_key_joins_extra_key_and_cache_salt():
    ctx = RequestContext("/generate", {"text": "x"}, headers={"x-session-id": "s1"})
    assert session_key(ctx) == "s1"
    salted = RequestContext("/generate", {"text": "x", "cache_salt": "u7"}, headers={"x-session-id": "s1"})
    assert session_key(salted) != "s1" and "u7" in session_key(salted)
    from_user = RequestContext("/v1/chat/completions", {"text": "x", "extra_key": "k"})
    from_user.stash[SESSION_KEY] = "alice"
    assert session_key(from_user).startswith("alice") and "k" in session_key(from_user)
    assert session_key(RequestContext("/generate", {"text": "x", "cache_salt": "u7"})) is None


def test_options_are_validated_with_helpful_messages(router, mock_worker):
    assert parse_status_codes("502, 503 504") == {502, 503, 504}
    with pytest.raises(ValueError, match="only 5xx"):
        parse_status_codes("429,503")
    w = mock_worker()
    with pytest.raises(ValueError, match=r"Invalid value for --policy: 'fastest'.*cache_aware.*round_robin"):
        start(router, [w], policy="fastest")
    with pytest.raises(ValueError, match="Invalid value for --drain-mode: 'later'. Valid values: wait, reject"):
        start(router, [w], drain_mode="later")
    with pytest.raises(PluginLoadError, match=r"--cache-aware-min-match: 2.0: must be within \[0, 1\]"):
        start(router, [w], cache_aware_min_match="2")
    with pytest.raises(PluginLoadError, match=r"--retry-status-codes: '429'.*only 5xx"):
        start(router, [w], retry_status_codes="429")


# --- distribution per policy ---------------------------------------------------------------------------


async def test_round_robin_is_exactly_even(router, mock_worker):
    workers = [mock_worker() for _ in range(4)]
    r = start(router, workers, policy="round_robin")
    responses = await fire(r.url + "/generate", [dict(GEN, text=f"q{i}") for i in range(40)], concurrency=8)
    assert all(x.status_code == 200 for x in responses)
    assert [received(w) for w in workers] == [10, 10, 10, 10]
    st = state(r)
    assert st["policy"] == "round_robin" and st["in_flight"] == 0 and st["active_requests"] == 0


async def test_least_inflight_rotates_ties_and_follows_load(router, mock_worker):
    slow, fast1, fast2 = mock_worker(latency=0.25), mock_worker(latency=0.01), mock_worker(latency=0.01)
    r = start(router, [slow, fast1, fast2], policy="least_inflight")
    for i in range(9):  # sequential: every worker idle each time -> ties, rotated (not always the first)
        assert httpx.post(r.url + "/generate", json=dict(GEN, text=f"t{i}")).status_code == 200
    assert [received(w) for w in (slow, fast1, fast2)] == [3, 3, 3]
    reset(slow, fast1, fast2)
    responses = await fire(r.url + "/generate", [dict(GEN, text=f"q{i}") for i in range(90)], concurrency=12)
    assert all(x.status_code == 200 for x in responses)
    n_slow, n1, n2 = received(slow), received(fast1), received(fast2)
    assert n_slow + n1 + n2 == 90
    assert n_slow * 3 < min(n1, n2), (n_slow, n1, n2)  # the slow worker holds its requests longer: fewer
    assert stats(slow)["max_concurrent"] <= 6  # never piled up


async def test_power_of_two_uses_every_worker_and_avoids_the_slow_one(router, mock_worker):
    slow = mock_worker(latency=0.25)
    fast = [mock_worker(latency=0.01) for _ in range(3)]
    r = start(router, [slow] + fast, policy="power_of_two")
    responses = await fire(r.url + "/generate", [dict(GEN, text=f"q{i}") for i in range(80)], concurrency=12)
    assert all(x.status_code == 200 for x in responses)
    counts = [received(w) for w in fast]
    assert min(counts) > 0 and received(slow) * 2 < min(counts), (received(slow), counts)


async def test_cache_aware_keeps_conversations_sticky_and_balanced(router, mock_worker):
    """50 concurrent 5-turn conversations over 4 workers; affinity from a stand-in trajectory cache."""
    workers = [mock_worker(latency=0.005) for _ in range(4)]
    affinity = AffinityPlugin()
    r = start(router, workers, extra_plugins=[("affinity", affinity)], cache_aware_abs_threshold=16)

    async def conversation(client: httpx.AsyncClient, i: int) -> list[int]:
        text, codes = f"conversation {i}:", []
        for turn in range(5):
            text += f" user turn {turn}."
            resp = await client.post(r.url + "/generate", json=dict(GEN, text=text, rid=f"c{i}/t{turn}"))
            codes.append(resp.status_code)
            text += resp.json()["text"]
        return codes

    async with httpx.AsyncClient(timeout=30) as client:
        results = await asyncio.gather(*(conversation(client, i) for i in range(50)))
    assert all(c == 200 for codes in results for c in codes)
    by_conv = workers_by_rid(workers)
    assert len(by_conv) == 50
    assert all(len(urls) == 1 for urls in by_conv.values()), {k: v for k, v in by_conv.items() if len(v) > 1}
    per_worker = [sum(1 for urls in by_conv.values() if w.url in urls) for w in workers]
    # first turns spread by least-in-flight: exactly even when all 50 are chosen before any answer comes back,
    # within a few when a loaded machine lets early answers (and sticky next turns) interleave
    assert sum(per_worker) == 50 and max(per_worker) - min(per_worker) <= 4, per_worker
    ps = state(r)["policy_stats"]
    assert ps["affinity_routed"] == 200 and ps["overload_fallbacks"] == 0


async def test_cache_aware_overloaded_affinity_worker_spills_to_least_loaded(router, mock_worker):
    hot, *others = [mock_worker(latency=0.2) for _ in range(4)]
    r = start(router, [hot] + others, extra_plugins=[("affinity", AffinityPlugin(fixed=hot.url))],
              cache_aware_abs_threshold=2, cache_aware_rel_threshold=1.5)
    responses = await fire(r.url + "/generate", [dict(GEN, text=f"q{i}") for i in range(24)], concurrency=24)
    assert all(x.status_code == 200 for x in responses)
    # the hot worker takes requests while load - low <= 2 or load <= 1.5 * low; with 24 requests over 4
    # workers that settles at hot = 8, the others ~5 (instead of hot = 24 without thresholds)
    assert stats(hot)["max_concurrent"] <= 9
    assert all(received(w) > 0 for w in others)
    assert received(hot) == max(received(w) for w in [hot] + others)  # still preferred
    assert state(r)["policy_stats"]["overload_fallbacks"] > 0


def test_cache_aware_ignores_an_affinity_that_covers_too_little_of_the_prompt(router, mock_worker):
    workers = [mock_worker() for _ in range(4)]
    # the "recorded prefix" is 2 of 10 prompt tokens (< --cache-aware-min-match 0.3): routed by load
    r = start(router, workers, extra_plugins=[("affinity", AffinityPlugin(fixed=workers[0].url, tokens=2))])
    body = {"input_ids": list(range(100, 110)), "sampling_params": {"max_new_tokens": 2}}
    for _ in range(8):
        assert httpx.post(r.url + "/generate", json=body).status_code == 200
    assert [received(w) for w in workers] == [2, 2, 2, 2]
    assert state(r)["policy_stats"]["affinity_below_min_match"] == 8


async def test_cache_aware_session_header_consistent_hashing(router, mock_worker):
    workers = [mock_worker() for _ in range(4)]
    r = start(router, workers)
    sessions = [f"sess-{i}" for i in range(24)]
    bodies = [dict(GEN, text=f"{s} turn {t}", rid=f"{s}/{t}") for t in range(3) for s in sessions]
    hdrs = [{"X-Session-ID": b["rid"].split("/")[0]} for b in bodies]
    for i in range(0, len(bodies), 24):  # turn by turn
        assert all(x.status_code == 200 for x in await fire(r.url + "/generate", bodies[i:i + 24], 24, hdrs[i:i + 24]))
    placed = workers_by_rid(workers)
    assert all(len(v) == 1 for v in placed.values())
    assert len({next(iter(v)) for v in placed.values()}) >= 3  # sessions spread
    # remove one worker: only its sessions move
    gone = workers[0].url
    assert httpx.post(r.url + "/remove_worker", params={"url": gone}).status_code == 200
    reset(*workers)
    assert all(x.status_code == 200 for x in await fire(r.url + "/generate", bodies[:24], 24, hdrs[:24]))
    moved = workers_by_rid(workers)
    for s in sessions:
        (old,) = placed[s]
        (new,) = moved[s]
        assert new != gone
        if old != gone:
            assert new == old, s


async def test_cache_aware_busy_session_spills_in_rendezvous_order(router, mock_worker):
    """An overloaded session owner sends the session to its next worker in rendezvous order (bounded-load
    rendezvous hashing), not to whichever worker is least loaded: the session's requests fill the workers in that
    order."""
    workers = [mock_worker(latency=1.0) for _ in range(4)]
    r = start(router, workers, cache_aware_abs_threshold=2, cache_aware_rel_threshold=1.5)
    ring = Rendezvous()
    ring.set_urls(w.url for w in workers)
    order = ring.successors("hot", {w.url for w in workers})
    bodies = [dict(GEN, text=f"hot turn {i}") for i in range(8)]
    responses = await fire(r.url + "/generate", bodies, 8, [{"X-Session-ID": "hot"}] * 8)
    assert all(x.status_code == 200 for x in responses)
    by_url = {w.url: received(w) for w in workers}
    counts = [by_url[u] for u in order]
    # the owner takes 3 (then 3 - 0 > 2 and 3 > 1.5 * 0: overloaded), its successor 3, the next 2, the last none;
    # a spill to the least loaded would have spread the 5 over the other three
    assert counts == [3, 3, 2, 0], counts
    assert state(r)["policy_stats"]["session_spilled"] == 5


async def test_cache_aware_with_the_radix_tree_plugin(router, mock_worker):
    """The real trajectory cache supplies ctx.stash[AFFINITY] for multi-turn /generate text."""
    workers = [mock_worker(latency=0.005) for _ in range(4)]
    r = start(router, workers, plugins=("radix_tree", "balancing"), hf_checkpoint="builtin:qwen3",
              cache_aware_abs_threshold=16)

    async def conversation(client: httpx.AsyncClient, i: int) -> None:
        text = f"<|im_start|>user\nConversation {i}: tell me something.<|im_end|>\n<|im_start|>assistant\n"
        for turn in range(5):
            resp = await client.post(r.url + "/generate", json=dict(GEN, text=text, rid=f"r{i}/t{turn}"))
            assert resp.status_code == 200, resp.text
            text += (resp.json()["text"]
                     + f"<|im_end|>\n<|im_start|>user\nTurn {turn}?<|im_end|>\n<|im_start|>assistant\n")

    async with httpx.AsyncClient(timeout=30) as client:
        await asyncio.gather(*(conversation(client, i) for i in range(20)))
    by_conv = workers_by_rid(workers)
    assert len(by_conv) == 20 and all(len(v) == 1 for v in by_conv.values())
    assert len({next(iter(v)) for v in by_conv.values()}) == 4
    assert state(r)["policy_stats"]["affinity_routed"] >= 80


# --- failures: killed worker, health, retries, circuit breaker -----------------------------------------


async def test_killed_worker_mid_run_fails_no_request(router, mock_worker, mock_worker_process):
    victim = mock_worker_process(latency=0.05)
    others = [mock_worker(latency=0.05) for _ in range(2)]
    r = start(router, [victim] + others, policy="round_robin", health_check_interval=0.2,
              health_failure_threshold=1, retry_backoff_base=0.01)
    bodies = [dict(GEN, text=f"q{i}") for i in range(150)]
    task = asyncio.ensure_future(fire(r.url + "/generate", bodies, concurrency=12))
    await asyncio.sleep(0.4)
    assert not task.done()
    victim.kill()  # SIGKILL: in-flight requests on it see a dropped connection
    responses = await task
    assert [x.status_code for x in responses] == [200] * 150
    w = wstate(r, victim.url)
    assert w["failures"] >= 1 and state(r)["retries"] >= 1
    wait_for(lambda: wstate(r, victim.url)["health"] == "unhealthy", timeout=2)


async def test_health_503_leaves_rotation_within_interval_and_returns(router, mock_worker):
    a, b = mock_worker(), mock_worker()
    interval = 0.2
    r = start(router, [a, b], policy="round_robin", health_check_interval=interval, health_failure_threshold=1,
              health_success_threshold=1, health_check_timeout=0.5)
    configure(b, health_status=503)
    took = wait_for(lambda: not wstate(r, b.url)["healthy"], timeout=3)
    assert took <= interval + 0.15, took
    assert wstate(r, b.url)["health"] == "unhealthy" and wstate(r, b.url)["last_health_status"] == 503
    reset(a, b)
    assert all(x.status_code == 200 for x in await fire(r.url + "/generate", [dict(GEN, text="x")] * 10))
    assert (received(a), received(b)) == (10, 0)
    configure(b, health_status=200)
    took = wait_for(lambda: wstate(r, b.url)["healthy"], timeout=3)
    assert took <= interval + 0.15, took
    reset(a, b)
    assert all(x.status_code == 200 for x in await fire(r.url + "/generate", [dict(GEN, text="x")] * 10))
    assert (received(a), received(b)) == (5, 5)


async def test_retries_stop_at_the_bound_and_pass_the_workers_error(router, mock_worker):
    workers = [mock_worker(fail_first_n=10_000, fail_status=503) for _ in range(4)]
    r = start(router, workers, max_attempts=3, retry_backoff_base=0.01, circuit_failure_threshold=0)
    resp = httpx.post(r.url + "/generate", json=dict(GEN, text="doomed"))
    assert resp.status_code == 503
    assert "injected failure" in resp.text
    counts = [received(w) for w in workers]
    assert sum(counts) == 3 and max(counts) == 1  # exactly max-attempts attempts, each on another worker
    assert state(r)["retries"] == 2
    # a status not in --retry-status-codes (500) is not retried
    for w in workers:
        configure(w, fail_status=500)
    reset(*workers)
    assert httpx.post(r.url + "/generate", json=dict(GEN, text="x")).status_code == 500
    assert sum(received(w) for w in workers) == 1


async def test_a_503_is_retried_on_another_worker_and_succeeds(router, mock_worker):
    bad, good = mock_worker(fail_first_n=1, fail_status=503), mock_worker()
    r = start(router, [bad, good], policy="round_robin", retry_backoff_base=0.01)
    resp = httpx.post(r.url + "/generate", json=dict(GEN, text="x"))
    assert resp.status_code == 200
    assert (received(bad), received(good)) == (1, 1)
    # streaming: nothing was streamed yet when the worker answered 503, so it is retried too
    configure(bad, fail_first_n=3)
    resp = httpx.post(r.url + "/generate", json=dict(GEN, text="x", stream=True))
    assert resp.status_code == 200 and resp.text.rstrip().endswith("data: [DONE]")


def test_circuit_breaker_opens_half_opens_and_closes(router, mock_worker):
    good, bad = mock_worker(), mock_worker(fail_first_n=3, fail_status=500)
    r = start(router, [good, bad], policy="round_robin", circuit_failure_threshold=2, circuit_cooldown=0.6)
    with httpx.Client(timeout=10) as client:
        def gen() -> int:
            return client.post(r.url + "/generate", json=dict(GEN, text="x")).status_code

        codes = [gen() for _ in range(4)]
        assert sorted(codes) == [200, 200, 500, 500]  # 500 is not a retry code: the client sees it
        assert wstate(r, bad.url)["circuit"] == "open" and not wstate(r, bad.url)["available"]
        assert received(bad) == 2  # (not reset: the mock counts its injected failures with it)
        assert [gen() for _ in range(4)] == [200] * 4
        assert received(bad) == 2  # open: out of rotation
        wait_for(lambda: wstate(r, bad.url)["circuit"] == "half_open", timeout=2)
        # half-open: exactly one probe goes through; it fails (3rd injected failure) -> open again
        codes = [gen() for _ in range(3)]
        assert received(bad) == 3 and codes.count(500) == 1
        assert wstate(r, bad.url)["circuit"] == "open" and wstate(r, bad.url)["circuit_opens"] == 2
        wait_for(lambda: wstate(r, bad.url)["circuit"] == "half_open", timeout=2)
        assert [gen() for _ in range(3)] == [200] * 3  # the probe succeeded: closed, back in rotation
        assert received(bad) >= 4
    assert wstate(r, bad.url)["circuit"] == "closed" and wstate(r, bad.url)["consecutive_failures"] == 0


# --- RL operations -------------------------------------------------------------------------------------


@pytest.mark.engines("sglang", reason="SGLang matches an abort's rid as a prefix; vLLM's /abort_requests takes "
                                       "exact ids (tests/test_vllm_engine.py)")
async def test_abort_reaches_the_worker_holding_the_rid(router, mock_worker):
    workers = [mock_worker(token_latency=0.01) for _ in range(3)]
    r = start(router, workers, policy="round_robin")
    long = {"text": "go on", "sampling_params": {"max_new_tokens": 400, "ignore_eos": True}}
    async with httpx.AsyncClient(timeout=30) as client:
        # occupy the first two round-robin slots, so the tracked request lands on the third worker
        pending = [asyncio.ensure_future(client.post(r.url + "/generate", json=dict(long, rid=f"other-{i}")))
                   for i in range(2)]
        await asyncio.sleep(0.1)
        target = asyncio.ensure_future(client.post(r.url + "/generate", json=dict(long, rid="job-7")))
        t0 = time.monotonic()
        while state(r)["tracked_rids"] < 3:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # the worker is generating it now
        resp = await client.post(r.url + "/abort_request", json={"rid": "job-7"})
        assert resp.status_code == 200, resp.text
        report = resp.json()
        assert report["routed"] == "tracked" and list(report["workers"]) == [workers[2].url]
        out = (await target).json()
        assert out["meta_info"]["finish_reason"]["type"] == "abort"
        assert time.monotonic() - t0 < 3  # not the full 4 s generation
        assert [len(stats(w).get("abort_requests", [])) for w in workers] == [0, 0, 1]
        # an unknown rid falls back to every worker
        resp = await client.post(r.url + "/abort_request", json={"rid": "nobody-knows"})
        assert resp.json()["routed"] == "broadcast" and len(resp.json()["workers"]) == 3
        # prefix matching: "other-" aborts both remaining requests, each on its own worker
        resp = await client.post(r.url + "/abort_request", json={"rid": "other-"})
        assert resp.json()["routed"] == "tracked"
        assert set(resp.json()["workers"]) == {workers[0].url, workers[1].url}
        for p in pending:
            assert (await p).json()["meta_info"]["finish_reason"]["type"] == "abort"
    assert state(r)["tracked_rids"] == 0
    assert httpx.post(r.url + "/abort_request", json={}).status_code == 400


@pytest.mark.engines("sglang", reason="/update_weights_from_disk has no vLLM equivalent (501 per vLLM worker; "
                                       "tests/test_vllm_engine.py covers weight versions)")
async def test_weight_updates_are_all_or_nothing(router, mock_worker):
    a, b = mock_worker(), mock_worker()
    r = start(router, [a, b])
    resp = httpx.post(r.url + "/update_weight_version", json={"new_version": "7"})
    assert resp.status_code == 200 and resp.json()["success"] is True
    assert all(httpx.get(w.url + "/get_model_info").json()["weight_version"] == "7" for w in (a, b))
    resp = httpx.post(r.url + "/update_weights_from_disk", json={"model_path": "/ckpt/8", "weight_version": "8"})
    assert resp.status_code == 200 and set(resp.json()["workers"]) == {a.url, b.url}
    # one unreachable worker: the whole operation reports failure, with each worker's result
    dead = f"http://127.0.0.1:{free_port()}"
    httpx.post(r.url + "/add_worker", params={"url": dead})
    resp = httpx.post(r.url + "/update_weight_version", json={"new_version": "9"})
    assert resp.status_code == 502
    body = resp.json()
    assert body["success"] is False and body["failed"] == [dead]
    assert body["workers"][a.url]["success"] is True and body["workers"][dead]["status"] == 502
    # every worker rejecting the request the same way: that status is passed on
    httpx.post(r.url + "/remove_worker", params={"url": dead})
    resp = httpx.post(r.url + "/update_weight_version", json={})
    assert resp.status_code == 400 and resp.json()["failed"] == [a.url, b.url]


async def test_pause_drains_in_flight_requests_and_resume_releases_held_ones(router, mock_worker):
    workers = [mock_worker(latency=0.4) for _ in range(2)]
    r = start(router, workers)
    async with httpx.AsyncClient(timeout=30) as client:
        first = asyncio.ensure_future(client.post(r.url + "/generate", json=dict(GEN, text="in flight")))
        await asyncio.sleep(0.1)
        pause = await client.post(r.url + "/pause", json={"timeout": 5})
        # pause answered only after the drain (waited_s below); the client may see the two replies in any order
        assert (await first).status_code == 200
        info = pause.json()
        assert info["paused"] and info["drained"] and info["in_flight"] == 0 and info["waited_s"] >= 0.2
        held = asyncio.ensure_future(client.post(r.url + "/generate", json=dict(GEN, text="held")))
        await asyncio.sleep(0.3)
        assert not held.done() and state(r)["waiting_requests"] == 1
        assert sum(received(w) for w in workers) == 1  # the held request never reached a worker
        resume = await client.post(r.url + "/resume")
        assert resume.json() == {"paused": False, "released": 1}
        assert (await held).status_code == 200
        # reject mode: new requests get 503 at once while paused
        info = (await client.post(r.url + "/pause", json={"mode": "reject", "wait": False})).json()
        assert info["paused"] and info["mode"] == "reject"
        resp = await client.post(r.url + "/generate", json=dict(GEN, text="rejected"))
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "router_paused"
        await client.post(r.url + "/resume")
        assert (await client.post(r.url + "/generate", json=dict(GEN, text="ok"))).status_code == 200
    st = state(r)
    assert st["paused"] is False and st["active_requests"] == 0 and st["drain_mode"] == "wait"


def test_component_for_metrics(router, mock_worker):
    w = mock_worker()
    r = start(router, [w], policy="least_inflight")
    httpx.post(r.url + "/generate", json=dict(GEN, text="x"))
    comp = r.app.router.registry.get("balancing")
    wait_for(lambda: comp.active == 0)  # the request's books close just after its reply went out
    assert comp.policy == "least_inflight" and comp.retries == 0
    (s,) = comp.worker_stats()
    assert s["url"] == w.url and s["requests"] == 1 and s["in_flight"] == 0
    assert s["health"] == "healthy" and s["circuit"] == "closed" and s["latency_ema_s"] > 0


def test_balancing_seed_makes_power_of_two_reproducible():
    from types import SimpleNamespace

    from slime_router_plugins.balancing.plugin import BalancingConfig
    from slime_router_plugins.balancing.power_of_two import PowerOfTwoPolicy

    workers = [SimpleNamespace(url=f"w{i}", inflight=0, state={}) for i in range(8)]

    def picks(seed):
        cfg = BalancingConfig.from_settings(Settings(extra={"policy": "power_of_two", "balancing_seed": seed}))
        assert cfg.seed == seed
        policy = PowerOfTwoPolicy(cfg)
        return [policy.select(None, workers).url for _ in range(50)]

    assert picks(7) == picks(7)
    assert picks(7) != picks(8)
