"""Batch retrieval benchmark (a script, not a test): python -m bench.bench_sessions [--sizes 1000,10000]

The end of a rollout step: the trainer fetches every trajectory of the step. A router process (its own process,
the shipped plugins, the bundled tokenizer) holds N sessions of one 4,096-token trajectory each (half prompt,
half generated, one weight-version change), put straight into its session store so that only retrieval is timed;
then, against that router over HTTP:

- single calls: ``GET /sessions/{sid}``, one per session, 16 in flight (httpx, asyncio);
- batch, JSON lines: one ``POST /retrieve_batch`` with every id;
- batch, columnar: the same with ``"format": "columnar"``, decoded into numpy arrays.

Prints trajectories per second and the wall time of the whole step for each. Goal (issue 16): a 10,000-trajectory
step in under 2 s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import time

import httpx

TOKENS = 4096


def serve(port: int, n: int, tokens: int) -> None:
    """The router process: build the app, fill its session store, serve."""
    import uvicorn

    from slime_router_core import Settings
    from slime_router_core.app import build_app
    from slime_router_core.contracts import SESSIONS
    from slime_router_core.plugins import load_plugins
    from slime_router_core.tokenizers import BUILTIN_CHECKPOINT

    settings = Settings(hf_checkpoint=BUILTIN_CHECKPOINT, worker_urls=[])
    app = build_app(settings, load_plugins(["radix_tree", "sessions"]))
    store = app.router.registry.get(SESSIONS)
    rng = random.Random(0)
    half = tokens // 2
    for k in range(n):
        s, _ = store.open(f"s{k}", {"episode": k})
        prompt = [rng.randrange(150_000) for _ in range(half)]
        out = [rng.randrange(150_000) for _ in range(tokens - half)]
        lps = [-rng.random() for _ in out]
        versions = ["v1"] * (len(out) // 2) + ["v2"] * (len(out) - len(out) // 2)
        s.add_turn(prompt, out, lps, versions, "v1", f"r{k}", {"type": "stop"}, None)
    print("ready", flush=True)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


async def singles(url: str, n: int) -> float:
    sem = asyncio.Semaphore(16)
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        async def one(k: int) -> None:
            async with sem:
                r = await c.get(f"/sessions/s{k}")
                r.raise_for_status()
                r.json()

        t0 = time.perf_counter()
        await asyncio.gather(*(one(k) for k in range(n)))
        return time.perf_counter() - t0


def batch(url: str, n: int, fmt: str) -> float:
    import orjson

    from slime_router_plugins.sessions.columnar import decode

    with httpx.Client(base_url=url, timeout=600) as c:
        t0 = time.perf_counter()
        r = c.post("/retrieve_batch", json={"sessions": [f"s{k}" for k in range(n)], "format": fmt})
        r.raise_for_status()
        if fmt == "columnar":
            items = decode(r.content, numpy=True)
        else:
            items = [orjson.loads(line) for line in r.content.splitlines()]
        dt = time.perf_counter() - t0
    assert len(items) == n and all(len(i["trajectories"][0]["tokens"]) == TOKENS for i in items)
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,10000")
    ap.add_argument("--serve", nargs=3, type=int, metavar=("PORT", "N", "TOKENS"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve:
        serve(*a.serve)
        return
    from slime_router_testing.servers import free_port, wait_http

    print(f"batch retrieval: sessions of one {TOKENS:,}-token trajectory, router in its own process")
    print("   trajectories | method                    | seconds | trajectories/s")
    for n in [int(x) for x in a.sizes.split(",")]:
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "bench.bench_sessions", "--serve", str(port), str(n),
                                 str(TOKENS)], stdout=subprocess.PIPE, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
            url = f"http://127.0.0.1:{port}"
            wait_http(url + "/health", timeout=600, proc=proc)
            rows = [("single GET, 16 in flight", asyncio.run(singles(url, n))),
                    ("batch, JSON lines", batch(url, n, "jsonl")),
                    ("batch, columnar (numpy)", batch(url, n, "columnar"))]
            for name, dt in rows:
                print(f"   {n:12,} | {name:25s} | {dt:7.2f} | {n / dt:14,.0f}", flush=True)
        finally:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
