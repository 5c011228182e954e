"""The core proxy on real sockets: admin API, pass-through, streaming, failover, in-flight, bad input."""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import orjson
import pytest

from slime_router_testing import free_port

CORE_ONLY: list[str] = []  # no plugins: the core alone


def test_add_list_remove_workers_both_forms(router, mock_worker):
    w1, w2 = mock_worker(), mock_worker()
    r = router(plugins=CORE_ONLY)
    c = httpx.Client(base_url=r.url)
    assert c.get("/list_workers").json()["urls"] == []
    assert c.post("/add_worker", params={"url": w1.url}).json()["status"] == "added"
    assert c.post("/add_worker", json={"url": w2.url + "/"}).json()["status"] == "added"
    again = c.post("/add_worker", params={"url": w1.url})
    assert again.status_code == 200 and again.json()["status"] == "already_registered"
    assert c.get("/list_workers").json()["urls"] == [w1.url, w2.url]
    assert c.post("/remove_worker", params={"url": w1.url}).json()["status"] == "removed"
    gone = c.post("/remove_worker", json={"url": w1.url})
    assert gone.status_code == 404 and w1.url in gone.json()["error"]["message"]
    assert c.get("/list_workers").json()["urls"] == [w2.url]
    assert c.post("/generate", json={"text": "Hi"}).status_code == 200
    health = c.get("/health").json()
    assert health["status"] == "ok" and health["workers"] == 1


@pytest.mark.parametrize("bad,fragment", [
    ({"url": "ftp://127.0.0.1:1"}, "scheme must be http or https"),
    ({"url": "http://:80"}, "missing host"),
    ({"url": "http://127.0.0.1"}, "missing port"),
    ({"url": "http://127.0.0.1:99999"}, "Invalid worker url"),
    ({"url": "http://127.0.0.1:1/generate"}, "give only scheme://host:port"),
    ({"url": 5}, "non-empty string"),
    ({}, "Missing worker url"),
])
def test_bad_worker_urls_are_400_with_a_reason(router, bad, fragment):
    r = router(plugins=CORE_ONLY)
    resp = httpx.post(r.url + "/add_worker", json=bad)
    assert resp.status_code == 400
    assert fragment in resp.json()["error"]["message"]
    assert httpx.get(r.url + "/list_workers").json()["urls"] == []


def test_generate_passes_through_and_other_endpoints_are_forwarded(router, mock_worker):
    w1, w2 = mock_worker(), mock_worker()
    r = router(plugins=CORE_ONLY, worker_urls=[w1.url, w2.url])
    body = {"text": "The capital of France is", "sampling_params": {"max_new_tokens": 8}, "return_logprob": True}
    got = httpx.post(r.url + "/generate", json=body).json()
    direct = httpx.post(w1.url + "/generate", json=body).json()
    assert got["output_ids"] == direct["output_ids"] and got["text"] == direct["text"]
    assert got["meta_info"]["output_token_logprobs"] == direct["meta_info"]["output_token_logprobs"]
    # the worker received exactly what the client sent (the original bytes, no plugin rewrote them)
    rec = httpx.get(w1.url + "/mock/records").json() + httpx.get(w2.url + "/mock/records").json()
    assert sum(1 for x in rec if x["text"] == got["text"]) >= 2
    assert httpx.get(r.url + "/get_model_info").json()["model_path"]
    flushed = httpx.post(r.url + "/flush_cache").json()
    assert flushed["success"] is True and set(flushed["workers"]) == {w1.url, w2.url}
    aborted = httpx.post(r.url + "/abort_request", json={"rid": "nothing-running"}).json()
    assert set(aborted["workers"]) == {w1.url, w2.url}


def test_round_robin_without_a_policy_plugin_is_exactly_even(router, mock_worker):
    workers = [mock_worker() for _ in range(3)]
    r = router(plugins=CORE_ONLY, worker_urls=[w.url for w in workers])
    for i in range(30):
        assert httpx.post(r.url + "/generate", json={"text": f"q{i}"}).status_code == 200
    counts = [len(httpx.get(w.url + "/mock/records").json()) for w in workers]
    assert counts == [10, 10, 10]


def test_streaming_arrives_incrementally(router, mock_worker):
    w = mock_worker(token_latency=0.05, stop_at_eos=0.0)
    r = router(plugins=CORE_ONLY, worker_urls=[w.url])
    arrivals: list[float] = []
    chunks = []
    t0 = time.perf_counter()
    with httpx.stream("POST", r.url + "/generate", json={"text": "Hi", "stream": True,
                                                         "sampling_params": {"max_new_tokens": 10}}) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        for line in s.iter_lines():
            if line.startswith("data: "):
                arrivals.append(time.perf_counter() - t0)
                chunks.append(line[6:])
    assert chunks[-1] == "[DONE]"
    assert len(chunks) == 11
    # chunks were not buffered: the first came long before the last (10 tokens x 50 ms)
    assert arrivals[-1] - arrivals[0] > 0.3
    final = orjson.loads(chunks[-2])
    assert final["meta_info"]["finish_reason"]["type"] == "length" and len(final["output_ids"]) == 10


def test_failover_when_a_worker_is_down(router, mock_worker):
    live = mock_worker()
    dying = mock_worker()
    dead_url = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    r = router(plugins=CORE_ONLY, worker_urls=[dead_url, dying.url, live.url])
    dying.stop()  # gone after the router took it: its port refuses connections
    for i in range(12):
        resp = httpx.post(r.url + "/generate", json={"text": f"hello {i}"})
        assert resp.status_code == 200, resp.text
    with httpx.stream("POST", r.url + "/generate", json={"text": "x", "stream": True}) as s:
        lines = [ln for ln in s.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and "error" not in lines[-2]
    assert len(httpx.get(live.url + "/mock/records").json()) == 13
    workers = {w["url"]: w for w in httpx.get(r.url + "/list_workers").json()["workers"]}
    assert workers[dead_url]["failures"] > 0 and all(w["in_flight"] == 0 for w in workers.values())


def test_all_workers_down_gives_502_naming_the_worker(router):
    dead_url = f"http://127.0.0.1:{free_port()}"
    r = router(plugins=CORE_ONLY, worker_urls=[dead_url])
    resp = httpx.post(r.url + "/generate", json={"text": "x"})
    assert resp.status_code == 502 and dead_url in resp.json()["error"]["message"]


def test_worker_error_reaches_the_client_with_its_status(router, mock_worker):
    w = mock_worker(fail_first_n=1, fail_status=500)
    r = router(plugins=CORE_ONLY, worker_urls=[w.url])
    resp = httpx.post(r.url + "/generate", json={"text": "x"})
    assert resp.status_code == 500
    assert httpx.post(r.url + "/generate", json={"text": "x"}).status_code == 200
    # a worker's own 400 is passed on as is
    resp = httpx.post(r.url + "/generate", json={"text": "x", "sampling_params": {"bogus": 1}})
    assert resp.status_code == 400 and "bogus" in resp.text


def test_exact_inflight_under_200_concurrent_requests_with_random_disconnects(router, mock_worker):
    workers = [mock_worker(latency=0.05, token_latency=0.002), mock_worker(latency=0.05, token_latency=0.002)]
    r = router(plugins=CORE_ONLY, worker_urls=[w.url for w in workers])
    app_router = r.app.router
    rng = random.Random(7)
    max_seen = 0

    async def one(client: httpx.AsyncClient, i: int) -> str:
        stream = i % 3 == 0
        body = {"text": f"request {i}", "stream": stream, "sampling_params": {"max_new_tokens": 16}}
        disconnect = rng.random() < 0.3
        try:
            if stream:
                async with client.stream("POST", "/generate", json=body,
                                         timeout=rng.uniform(0.01, 0.1) if disconnect else 30) as s:
                    async for _ in s.aiter_lines():
                        pass
            else:
                resp = await client.post("/generate", json=body,
                                         timeout=rng.uniform(0.01, 0.08) if disconnect else 30)
                assert resp.status_code == 200
            return "ok"
        except httpx.TimeoutException:
            return "disconnected"

    async def watch(stop: asyncio.Event) -> None:
        nonlocal max_seen
        while not stop.is_set():
            counts = [w.inflight for w in app_router.pool.workers()]
            assert all(c >= 0 for c in counts)
            max_seen = max(max_seen, sum(counts))
            await asyncio.sleep(0.005)

    async def main() -> list[str]:
        stop = asyncio.Event()
        watcher = asyncio.create_task(watch(stop))
        async with httpx.AsyncClient(base_url=r.url, limits=httpx.Limits(max_connections=200)) as client:
            results = await asyncio.gather(*(one(client, i) for i in range(200)))
        stop.set()
        await watcher
        return results

    results = asyncio.run(main())
    assert results.count("disconnected") > 10 and results.count("ok") > 100
    deadline = time.time() + 5
    while time.time() < deadline and app_router.pool.total_inflight():
        time.sleep(0.05)
    assert [w.inflight for w in app_router.pool.workers()] == [0, 0]
    assert max_seen > 20  # the requests really overlapped
    # some clients gave up before their request reached the router; all that reached it were counted
    assert results.count("ok") <= sum(w.requests for w in app_router.pool.workers()) <= 200


@pytest.mark.parametrize("content,status,fragment", [
    (b"{not json", 400, "Malformed JSON body"),
    (b"", 400, "Empty request body"),
    (b"[1, 2]", 400, "must be a JSON object"),
    (b'{"sampling_params": {}}', 400, "Either text, input_ids or input_embeds should be provided."),
    (b'{"text": 5}', 400, "'text' must be a string"),
    (b'{"text": []}', 400, "'text' must be a string"),
    (b'{"input_ids": ["a"]}', 400, "'input_ids' must be a non-empty list of integers"),
    (b'{"input_ids": []}', 400, "'input_ids' must be a non-empty list of integers"),
    (b'{"text": "a", "input_ids": [1]}', 400, "exactly one of"),
    (b'{"text": "a", "sampling_params": "hot"}', 400, "'sampling_params' must be an object"),
    (b'{"text": "a", "stream": "yes"}', 400, "'stream' must be a boolean"),
    (b'{"text": "a", "return_logprob": 1}', 400, "'return_logprob' must be a boolean"),
    (b'{"text": "a", "rid": 5}', 400, "'rid' must be a string"),
])
def test_bad_generate_requests_are_400_with_a_message(router, mock_worker, content, status, fragment):
    w = mock_worker()
    r = router(plugins=CORE_ONLY, worker_urls=[w.url])
    resp = httpx.post(r.url + "/generate", content=content, headers={"content-type": "application/json"})
    assert resp.status_code == status
    err = resp.json()["error"]
    assert fragment in err["message"] and err["type"] == "invalid_request_error"
    assert httpx.get(w.url + "/mock/records").json() == []  # nothing reached the worker


def test_body_over_the_limit_is_413(router, mock_worker):
    w = mock_worker()
    r = router(plugins=CORE_ONLY, worker_urls=[w.url], max_body_size=1000)
    resp = httpx.post(r.url + "/generate", json={"text": "x" * 2000})
    assert resp.status_code == 413 and "--max-body-size" in resp.json()["error"]["message"]

    def chunked():  # no content-length: the limit is enforced while reading
        for _ in range(10):
            yield b" " * 200
    resp = httpx.post(r.url + "/generate", content=chunked())
    assert resp.status_code == 413
    assert httpx.post(r.url + "/generate", json={"text": "small"}).status_code == 200


def test_no_workers_is_503_with_how_to_fix(router):
    r = router(plugins=CORE_ONLY)
    resp = httpx.post(r.url + "/generate", json={"text": "x"})
    assert resp.status_code == 503
    assert "/add_worker" in resp.json()["error"]["message"]
    resp = httpx.get(r.url + "/get_model_info")
    assert resp.status_code == 503


def test_a_worker_dying_mid_stream_ends_the_stream_with_an_error_and_leaks_nothing(router, mock_worker_process):
    proc = mock_worker_process(token_latency=0.05, stop_at_eos=0.0)
    r = router(plugins=CORE_ONLY, worker_urls=[proc.url])
    lines = []
    with httpx.stream("POST", r.url + "/generate", json={"text": "Hi", "stream": True,
                                                         "sampling_params": {"max_new_tokens": 100}}) as s:
        for line in s.iter_lines():
            if line.startswith("data: "):
                lines.append(line[6:])
                if len(lines) == 3:
                    proc.kill()
    assert lines[-1] == "[DONE]"
    assert "failed mid-stream" in orjson.loads(lines[-2])["error"]["message"]
    worker = r.app.router.pool.workers()[0]
    deadline = time.monotonic() + 10  # the slot is let go just after the stream's last bytes are sent
    while worker.inflight and time.monotonic() < deadline:
        time.sleep(0.01)
    assert worker.inflight == 0 and worker.failures == 1
