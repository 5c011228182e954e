"""Overload: --max-concurrent-requests, --max-queued-requests, --queue-timeout (429 + Retry-After).

Real routers on real sockets in front of slow mock workers; waits are for the router's own counters
(``router.admission``), not for wall-clock guesses.
"""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import pytest

from slime_router_core.settings import Settings
from slime_router_core.tokenizers import BUILTIN_CHECKPOINT
from slime_router_testing import start_mock_worker_process
from slime_router_testing.servers import free_port, wait_http

BODY = {"text": "Hello, my name is", "sampling_params": {"max_new_tokens": 4}}


def admission_of(server: Any) -> Any:
    return server.app.router.admission


async def until(pred: Callable[[], bool], timeout: float = 20.0) -> None:
    """Wait for a condition on the router's counters (the timeout only guards against a hang)."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.005)


def settled(adm: Any, timeout: float = 20.0) -> dict[str, Any]:
    """The counters once every request has closed its books (the client may see its answer a moment before the
    router's handler returns and gives its slot back)."""
    deadline = time.monotonic() + timeout
    while adm.in_flight or adm.queued:
        if time.monotonic() > deadline:
            raise AssertionError(f"admission not back to zero: {adm.stats()}")
        time.sleep(0.005)
    return adm.stats()


async def post(session: aiohttp.ClientSession, url: str, body: dict = BODY) -> tuple[int, dict, dict]:
    async with session.post(url, data=orjson.dumps(body), headers={"Content-Type": "application/json"}) as r:
        return r.status, dict(r.headers), orjson.loads(await r.read())


def session(limit: int = 0) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit),
                                 timeout=aiohttp.ClientTimeout(total=120))


def assert_overloaded(status: int, headers: dict, body: dict, code: str) -> None:
    assert status == 429, body
    retry = headers.get("Retry-After")
    assert retry is not None and retry.isdigit() and int(retry) >= 1
    err = body["error"]
    assert err["type"] == "overloaded_error" and err["code"] == code
    assert "--max-concurrent-requests" in err["message"]
    if code == "queue_full":
        assert "--max-queued-requests" in err["message"]
    else:
        assert "--queue-timeout" in err["message"]


def test_bounded_limit_and_queue_serve_24_of_40_and_refuse_16_with_retry_after(router, mock_worker):
    # N=8 in flight, M=16 queued: of 40 simultaneous 1 s generations, 8 run, 16 wait (and run in turn), 16 are
    # refused at once with 429 + Retry-After. Nothing else fails; the books return to zero.
    worker = mock_worker(latency=1.0)
    r = router(plugins=[], worker_urls=[worker.url], max_concurrent_requests=8, max_queued_requests=16,
               queue_timeout=60)
    adm = admission_of(r)
    peak = {"in_flight": 0, "queued": 0}

    async def main() -> list[tuple[int, dict, dict]]:
        async with session() as s:
            async def watch() -> None:
                while True:
                    peak["in_flight"] = max(peak["in_flight"], adm.in_flight)
                    peak["queued"] = max(peak["queued"], adm.queued)
                    await asyncio.sleep(0.002)
            watcher = asyncio.create_task(watch())
            results = await asyncio.gather(*(post(s, r.url + "/generate") for _ in range(40)))
            watcher.cancel()
            return results

    results = asyncio.run(main())
    statuses = sorted(st for st, _, _ in results)
    assert statuses.count(200) == 24 and statuses.count(429) == 16, statuses
    for status, headers, body in results:
        if status == 429:
            assert_overloaded(status, headers, body, "queue_full")
            assert headers["Retry-After"] == "60"
        else:
            assert body["meta_info"]["finish_reason"] is not None
    stats = settled(adm)
    assert stats["in_flight"] == 0 and stats["queued"] == 0
    assert stats["rejected"] == stats["rejected_queue_full"] == 16 and stats["rejected_queue_timeout"] == 0
    assert stats["admitted_after_wait"] == 16
    assert peak["in_flight"] <= 8 and peak["queued"] <= 16


def test_queue_timeout_answers_429_and_frees_the_place(router, mock_worker):
    worker = mock_worker(latency=1.5)
    r = router(plugins=[], worker_urls=[worker.url], max_concurrent_requests=1, max_queued_requests=4,
               queue_timeout=0.2)
    adm = admission_of(r)

    async def main() -> None:
        async with session() as s:
            first = asyncio.create_task(post(s, r.url + "/generate"))
            await until(lambda: adm.in_flight == 1)
            late = await asyncio.gather(*(post(s, r.url + "/generate") for _ in range(2)))
            assert not first.done()  # answered after the queue timeout, while the generation still runs
            for status, headers, body in late:
                assert_overloaded(status, headers, body, "queue_timeout")
                assert headers["Retry-After"] == "1"  # ceil(0.2)
            assert adm.queued == 0 and adm.in_flight == 1
            status, _, _ = await first
            assert status == 200

    asyncio.run(main())
    stats = settled(adm)
    assert stats["in_flight"] == 0 and stats["rejected_queue_timeout"] == 2 and stats["rejected"] == 2


def test_a_stream_holds_its_slot_until_it_ends(router, mock_worker):
    worker = mock_worker(token_latency=0.05, stop_at_eos=0.0, min_random_tokens=40, max_random_tokens=40)
    r = router(plugins=[], worker_urls=[worker.url], max_concurrent_requests=1, max_queued_requests=0)
    adm = admission_of(r)
    stream_body = {**BODY, "stream": True, "sampling_params": {"max_new_tokens": 40}}

    async def main() -> None:
        async with session() as s:
            async with s.post(r.url + "/generate", data=orjson.dumps(stream_body)) as resp:
                assert resp.status == 200
                await resp.content.readany()  # the stream has begun
                assert adm.in_flight == 1
                assert_overloaded(*await post(s, r.url + "/generate"), "queue_full")
                assert adm.in_flight == 1
                assert (await resp.read()).rstrip().endswith(b"data: [DONE]")
            await until(lambda: adm.in_flight == 0)
            status, _, _ = await post(s, r.url + "/generate")
            assert status == 200

    asyncio.run(main())
    assert settled(adm)["rejected"] == 1


def test_a_client_leaving_the_queue_frees_its_place(router, mock_worker):
    worker = mock_worker(latency=2.0)  # the first request holds the only slot while the queue is watched
    r = router(plugins=[], worker_urls=[worker.url], max_concurrent_requests=1, max_queued_requests=1,
               queue_timeout=60)
    adm = admission_of(r)

    async def main() -> None:
        async with session() as s:
            first = asyncio.create_task(post(s, r.url + "/generate"))
            await until(lambda: adm.in_flight == 1)
            async with session() as gone:
                leaver = asyncio.create_task(post(gone, r.url + "/generate"))
                await until(lambda: adm.queued == 1)
                leaver.cancel()
            await until(lambda: adm.queued == 0)  # the disconnect took it out of the queue
            second = asyncio.create_task(post(s, r.url + "/generate"))
            await until(lambda: adm.queued == 1)  # the freed place is usable
            assert (await first)[0] == 200 and (await second)[0] == 200

    asyncio.run(main())
    stats = settled(adm)
    assert stats["in_flight"] == 0 and stats["queued"] == 0 and stats["rejected"] == 0


def test_a_slot_handed_to_a_waiter_cancelled_at_that_moment_is_passed_on() -> None:
    from slime_router_core.admission import Admission

    async def main() -> None:
        adm = Admission(1, 4, 60)
        assert adm.try_acquire()
        a = asyncio.create_task(adm.wait())
        b = asyncio.create_task(adm.wait())
        await until(lambda: adm.queued == 2)
        adm.release()  # the slot goes to a...
        a.cancel()  # ...whose client leaves before it runs: b gets it
        with pytest.raises(asyncio.CancelledError):
            await a
        await asyncio.wait_for(b, 10)
        assert adm.in_flight == 1 and adm.queued == 0
        adm.release()
        assert adm.in_flight == 0

    asyncio.run(main())


def test_openai_routes_take_slots_through_router_generate(router, mock_worker):
    # openai_compat calls Router.generate / Router.generate_stream: they hold the same slots as /generate.
    worker = mock_worker(latency=1.0)
    r = router(plugins=["openai_compat"], hf_checkpoint=BUILTIN_CHECKPOINT, worker_urls=[worker.url],
               max_concurrent_requests=1, max_queued_requests=0)
    adm = admission_of(r)
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

    async def main() -> None:
        async with session() as s:
            for streamed in (False, True):
                held = asyncio.create_task(_read(s, r.url + "/v1/chat/completions", {**chat, "stream": streamed}))
                await until(lambda: adm.in_flight == 1)
                status, _, body = await post(s, r.url + "/generate")  # a /generate waits for no one: refused
                assert status == 429 and body["error"]["code"] == "queue_full"
                status, headers, body = await post(s, r.url + "/v1/chat/completions", chat)
                assert status == 429 and body["error"]["code"] == "queue_full", body
                assert "--max-concurrent-requests" in body["error"]["message"]
                assert headers.get("Retry-After") == "1"  # set by the app's HTTPError handler
                assert (await held)[0] == 200
                await until(lambda: adm.in_flight == 0)
            status, _, body = await post(s, r.url + "/v1/chat/completions", chat)
            assert status == 200, body

    asyncio.run(main())
    assert settled(adm)["rejected"] == 4


async def _read(s: aiohttp.ClientSession, url: str, body: dict) -> tuple[int, dict, bytes]:
    async with s.post(url, data=orjson.dumps(body), headers={"Content-Type": "application/json"}) as resp:
        return resp.status, dict(resp.headers), await resp.read()


def test_unlimited_by_default_counts_in_flight_and_refuses_nothing(router, mock_worker):
    assert Settings().max_concurrent_requests == 0
    worker = mock_worker(latency=0.5)
    r = router(plugins=[], worker_urls=[worker.url])
    adm = admission_of(r)

    async def main() -> list[tuple[int, dict, dict]]:
        async with session() as s:
            tasks = [asyncio.create_task(post(s, r.url + "/generate")) for _ in range(60)]
            await until(lambda: adm.in_flight == 60)  # all of them at once: no limit, no queue
            assert adm.queued == 0
            return await asyncio.gather(*tasks)

    results = asyncio.run(main())
    assert [st for st, _, _ in results] == [200] * 60
    stats = settled(adm)
    assert stats["in_flight"] == 0 and stats["queued"] == 0 and stats["rejected"] == 0


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/<pid>/status")
def test_2000_held_generations_no_errors_and_bounded_rss(tokenizer_dir: str) -> None:
    """2,000 concurrent slow generations (3 worker processes, 1/2/3 s) through a router in its own process with
    --max-concurrent-requests 4096 (none queued, none refused): no error, the router's RSS bounded."""
    n = 2000
    workers = [start_mock_worker_process(hf_checkpoint=BUILTIN_CHECKPOINT, latency=lat) for lat in (1, 2, 3)]
    port = free_port()
    cmd = [sys.executable, "-c", "from slime_router_core.cli import main; main()", "serve", "--host", "127.0.0.1",
           "--port", str(port), "--no-plugin", "radix_tree", "--no-plugin", "openai_compat",
           "--max-concurrent-requests", "4096", "--max-queued-requests", "0"]
    for w in workers:
        cmd += ["--worker-url", w.url]
    proc = subprocess.Popen(cmd, env=dict(os.environ), stdin=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/health", timeout=60, proc=proc)
        rss_idle = _rss_kb(proc.pid)
        peak = [rss_idle]
        latencies: list[float] = []

        async def one(s: aiohttp.ClientSession) -> int:
            t = time.perf_counter()
            status, _, _ = await post(s, url + "/generate")
            latencies.append(time.perf_counter() - t)
            return status

        async def main() -> list[int]:
            async with session() as s:
                done = asyncio.Event()

                async def sample() -> None:
                    while not done.is_set():
                        peak[0] = max(peak[0], _rss_kb(proc.pid))
                        await asyncio.sleep(0.05)
                sampler = asyncio.create_task(sample())
                statuses = await asyncio.gather(*(one(s) for _ in range(n)))
                done.set()
                await sampler
                return statuses

        statuses = asyncio.run(main())
        assert statuses == [200] * n, {st: statuses.count(st) for st in set(statuses)}
        latencies.sort()
        p99 = latencies[math.ceil(0.99 * n) - 1]
        grown_mb = (peak[0] - rss_idle) / 1024
        print(f"\n2000 held generations: router RSS idle {rss_idle / 1024:.1f} MB, peak {peak[0] / 1024:.1f} MB "
              f"(+{grown_mb:.1f} MB), p99 {p99:.2f} s")
        assert grown_mb < 200, f"router RSS grew by {grown_mb:.1f} MB for {n} held generations"
        assert p99 < 20  # the slowest worker's 3 s plus the share of 2,000 connections on a small machine; were
        # the generations not all admitted at once, 2,000 x 1-3 s could not fit in it
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for w in workers:
            w.stop()


@pytest.mark.slow
def test_cli_flags_and_environment_set_the_limits(mock_worker) -> None:
    """``slime-router serve --max-concurrent-requests 1 --max-queued-requests 1`` with SLIME_ROUTER_QUEUE_TIMEOUT
    0.5: of three simultaneous 2 s generations one is served, one refused at once (queue full), one after waiting
    half a second (queue timeout), both with Retry-After."""
    worker = mock_worker(latency=2.0)
    port = free_port()
    cmd = [sys.executable, "-c", "from slime_router_core.cli import main; main()", "serve", "--host", "127.0.0.1",
           "--port", str(port), "--plugin", "balancing", "--worker-url", worker.url,
           "--max-concurrent-requests", "1", "--max-queued-requests", "1"]
    proc = subprocess.Popen(cmd, env={**os.environ, "SLIME_ROUTER_QUEUE_TIMEOUT": "0.5"}, stdin=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/health", timeout=60, proc=proc)

        async def main() -> list[tuple[int, dict, dict]]:
            async with session() as s:
                return await asyncio.gather(*(post(s, url + "/generate") for _ in range(3)))

        results = asyncio.run(main())
        assert sorted(st for st, _, _ in results) == [200, 429, 429]
        refused = {body["error"]["code"]: (status, headers, body) for status, headers, body in results
                   if status == 429}
        assert set(refused) == {"queue_full", "queue_timeout"}
        for code, (status, headers, body) in refused.items():
            assert_overloaded(status, headers, body, code)
            assert headers["Retry-After"] == "1"  # ceil(0.5)
        assert "(--max-concurrent-requests 1) and 1 waiting (--max-queued-requests 1)" in \
            refused["queue_full"][2]["error"]["message"]
        assert "(--queue-timeout 0.5)" in refused["queue_timeout"][2]["error"]["message"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_metrics_export_the_admission_counters(router, mock_worker):
    worker = mock_worker(latency=1.0)
    r = router(plugins=["metrics"], worker_urls=[worker.url], max_concurrent_requests=1, max_queued_requests=0)
    adm = admission_of(r)

    async def main() -> None:
        async with session() as s:
            held = asyncio.create_task(post(s, r.url + "/generate"))
            await until(lambda: adm.in_flight == 1)
            assert (await post(s, r.url + "/generate"))[0] == 429
            async with s.get(r.url + "/metrics") as resp:
                snap = orjson.loads(await resp.read())["admission"]
            assert (snap["in_flight"], snap["rejected_queue_full"], snap["max_concurrent_requests"]) == (1, 1, 1)
            async with s.get(r.url + "/metrics/prometheus") as resp:
                text = await resp.text()
            assert 'slime_router_admission_rejected_total{reason="queue_full"} 1.0' in text
            assert "slime_router_admission_in_flight 1.0" in text
            assert (await held)[0] == 200

    asyncio.run(main())


def test_health_shows_the_load_without_metrics(router, mock_worker):
    # orchestrators see overload on /health (no metrics plugin): in flight, queued, and the limit
    worker = mock_worker(latency=1.0)
    r = router(plugins=[], worker_urls=[worker.url], max_concurrent_requests=1, max_queued_requests=1)
    adm = admission_of(r)

    async def health(s: aiohttp.ClientSession) -> dict[str, Any]:
        async with s.get(r.url + "/health") as resp:
            assert resp.status == 200
            return orjson.loads(await resp.read())

    async def main() -> None:
        async with session() as s:
            idle = await health(s)
            assert idle["status"] == "ok"
            assert (idle["in_flight"], idle["queued"], idle["max_concurrent_requests"]) == (0, 0, 1)
            held = [asyncio.create_task(post(s, r.url + "/generate")) for _ in range(2)]
            await until(lambda: adm.in_flight == 1 and adm.queued == 1)
            busy = await health(s)
            assert (busy["in_flight"], busy["queued"], busy["max_concurrent_requests"]) == (1, 1, 1)
            assert [status for status, _, _ in await asyncio.gather(*held)] == [200, 200]
            await until(lambda: adm.in_flight == 0)
            assert (await health(s))["in_flight"] == 0

    asyncio.run(main())
