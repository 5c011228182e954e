"""Overload: the router's RSS and latency with many generations held at once (not part of ``python -m bench``).

    python bench/bench_overload.py                                   # 2,000 held: --max-concurrent-requests 4096
    python bench/bench_overload.py --limit 500 --queued 2000         # 500 in flight, 1,500 waiting in the queue
    python bench/bench_overload.py --limit 0                         # unlimited (the default)

The router runs as ``slime-router serve`` in its own process (pass-through: balancing + metrics) in front of mock
worker processes with 1, 2 and 3 s latency; its RSS is read from /proc/<pid>/status (VmRSS) every 50 ms while
the requests are held. Prints idle and peak RSS, the growth per held request, statuses and p50/p99 latency.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import subprocess
import sys
import time

import aiohttp
import orjson

from slime_router_core.tokenizers import BUILTIN_CHECKPOINT
from slime_router_testing import start_mock_worker_process
from slime_router_testing.servers import free_port, wait_http

BODY = orjson.dumps({"text": "Hello, my name is", "sampling_params": {"max_new_tokens": 4}})


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def load(url: str, n: int, pid: int) -> tuple[list[int], list[float], int]:
    latencies: list[float] = []
    peak = rss_kb(pid)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=600)) as s:
        async def one() -> int:
            t = time.perf_counter()
            async with s.post(url + "/generate", data=BODY, headers={"Content-Type": "application/json"}) as r:
                await r.read()
                latencies.append(time.perf_counter() - t)
                return r.status

        done = asyncio.Event()

        async def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, rss_kb(pid))
                await asyncio.sleep(0.05)

        sampler = asyncio.create_task(sample())
        statuses = await asyncio.gather(*(one() for _ in range(n)))
        done.set()
        await sampler
    return statuses, latencies, peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000, help="simultaneous generations")
    p.add_argument("--limit", type=int, default=4096, help="--max-concurrent-requests (0: unlimited)")
    p.add_argument("--queued", type=int, default=1024, help="--max-queued-requests")
    p.add_argument("--queue-timeout", type=float, default=60.0, help="--queue-timeout")
    p.add_argument("--latencies", default="1,2,3", help="one mock worker process per latency (seconds)")
    a = p.parse_args()

    workers = [start_mock_worker_process(hf_checkpoint=BUILTIN_CHECKPOINT, latency=float(x))
               for x in a.latencies.split(",")]
    port = free_port()
    cmd = [sys.executable, "-c", "from slime_router_core.cli import main; main()", "serve", "--host", "127.0.0.1",
           "--port", str(port), "--no-plugin", "radix_tree", "--no-plugin", "openai_compat",
           "--max-concurrent-requests", str(a.limit), "--max-queued-requests", str(a.queued),
           "--queue-timeout", str(a.queue_timeout)]
    for w in workers:
        cmd += ["--worker-url", w.url]
    proc = subprocess.Popen(cmd, env=dict(os.environ), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/health", timeout=60, proc=proc)
        idle = rss_kb(proc.pid)
        t = time.perf_counter()
        statuses, latencies, peak = asyncio.run(load(url, a.n, proc.pid))
        wall = time.perf_counter() - t
        latencies.sort()
        counts = {st: statuses.count(st) for st in sorted(set(statuses))}
        p50 = latencies[len(latencies) // 2]
        p99 = latencies[math.ceil(0.99 * len(latencies)) - 1]
        print(f"{a.n} simultaneous generations, --max-concurrent-requests {a.limit} --max-queued-requests "
              f"{a.queued}, workers {a.latencies} s")
        print(f"  statuses {counts}  wall {wall:.2f} s  p50 {p50:.2f} s  p99 {p99:.2f} s")
        print(f"  router RSS idle {idle / 1024:.1f} MB, peak {peak / 1024:.1f} MB, +{(peak - idle) / 1024:.1f} MB "
              f"(~{(peak - idle) / a.n:.1f} KB per request)")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        for w in workers:
            w.stop()


if __name__ == "__main__":
    main()
