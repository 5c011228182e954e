"""Routing quality: multi-turn rollout throughput under each balancing policy (a script, not a test).

Mock SGLang workers (separate processes) model a per-worker prefix cache: a request pays
``--prefill-ms-per-token`` for every prompt token its worker has not cached (the mock's token trie, like
SGLang's radix cache), then ``--token-latency-ms`` per generated token. N conversations x T turns run
concurrently; each turn's prompt is the whole conversation so far. A policy that keeps a conversation on
the worker that served its previous turn pays prefill only for the new tokens.

Policies measured: round_robin, least_inflight, power_of_two, cache_aware with an ``X-Session-ID`` header
(rendezvous hashing), and cache_aware fed by the radix_tree plugin (trajectory affinity, no header) when
that plugin is installed and working. Worker caches are flushed between runs.

    python -m bench.bench_routing                 # 32 conversations x 5 turns over 4 workers
    python -m bench.bench_routing --conversations 64 --turns 8 --repeat 2
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from typing import Any

import aiohttp
import httpx

from slime_router_core import Settings
from slime_router_core.tokenizers import BUILTIN_CHECKPOINT
from slime_router_testing import start_mock_worker_process, start_router, wait_http

WORDS = ("alpha beta gamma delta river mountain number prime proof lemma integer graph vertex edge cycle "
         "sum product matrix vector field ring group order bound limit series answer check step case").split()


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


async def conversation(session: aiohttp.ClientSession, url: str, i: int, args: Any, headers: dict | None,
                       out: list[dict]) -> None:
    rng = random.Random(i)
    # a unique long problem statement (about --prompt-words tokens), then short user turns
    text = f"<|im_start|>system\nProblem {i}: {words(rng, args.prompt_words)}<|im_end|>\n"
    for turn in range(args.turns):
        text += f"<|im_start|>user\nTurn {turn}: {words(rng, args.user_words)}<|im_end|>\n<|im_start|>assistant\n"
        body = {"text": text, "rid": f"c{i}-t{turn}",
                "sampling_params": {"max_new_tokens": args.max_new_tokens, "ignore_eos": True}}
        t0 = time.perf_counter()
        async with session.post(url + "/generate", json=body, headers=headers) as resp:
            data = await resp.json()
            if resp.status != 200:
                raise RuntimeError(f"request failed: {resp.status} {data}")
        meta = data["meta_info"]
        out.append({"latency": time.perf_counter() - t0, "prompt": meta["prompt_tokens"],
                    "cached": meta.get("cached_tokens", 0), "turn": turn})
        text += data["text"] + "<|im_end|>\n"


async def rollout(url: str, args: Any, session_header: bool) -> tuple[float, list[dict]]:
    out: list[dict] = []
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=600)) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(conversation(session, url, i, args,
                                            {"X-Session-ID": f"conv-{i}"} if session_header else None, out)
                               for i in range(args.conversations)))
        return time.perf_counter() - t0, out


def radix_tree_usable(worker_urls: list[str]) -> bool:
    """True when the radix_tree plugin is installed and registers its trajectory cache component."""
    try:
        r = start_router(settings=Settings(worker_urls=worker_urls, hf_checkpoint=BUILTIN_CHECKPOINT,
                                           extra={"health_check_interval": 0}),
                         plugins=["radix_tree", "balancing"])
    except Exception as e:  # not installed / not implemented yet
        print(f"(radix_tree plugin not usable: {type(e).__name__}: {str(e)[:120]})")
        return False
    try:
        return r.app.router.registry.has("radix_tree")
    finally:
        r.stop()


def run_policy(label: str, policy: str, worker_urls: list[str], args: Any, radix: bool,
               session_header: bool) -> dict:
    for u in worker_urls:  # every run starts with cold worker caches
        httpx.post(u + "/flush_cache").raise_for_status()
    plugins = ["radix_tree", "balancing"] if radix else ["balancing"]
    extra = {"policy": policy, "health_check_interval": 5.0}
    if radix:  # room for every trajectory (the default 10k tokens would evict most of them here)
        extra["radix_tree_max_size"] = args.radix_tree_max_size
    settings = Settings(worker_urls=worker_urls, hf_checkpoint=BUILTIN_CHECKPOINT if radix else None, extra=extra)
    router = start_router(settings=settings, plugins=plugins)
    try:
        wall, out = asyncio.run(rollout(router.url, args, session_header))
        balancing = router.app.router.registry.get("balancing")
        per_worker = [w["requests"] for w in balancing.worker_stats()]
        policy_stats = {k: v for k, v in balancing.policy_impl.stats.items() if v}
    finally:
        router.stop()
    lat = sorted(o["latency"] for o in out)
    prompt, cached = sum(o["prompt"] for o in out), sum(o["cached"] for o in out)
    return {"label": label, "wall": wall, "rps": len(out) / wall, "mean": statistics.fmean(lat),
            "p90": lat[int(0.9 * (len(lat) - 1))], "hit": cached / prompt if prompt else 0.0,
            "per_worker": per_worker, "n": len(out),
            "policy_stats": policy_stats}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--conversations", type=int, default=32)
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--prompt-words", type=int, default=1200, help="words in each conversation's first prompt")
    p.add_argument("--user-words", type=int, default=30, help="words in each later user turn")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--prefill-ms-per-token", type=float, default=0.3)
    p.add_argument("--decode-ms", type=float, default=100.0,
                   help="fixed generation time per request (one sleep: keeps the mock's CPU use low)")
    p.add_argument("--token-latency-ms", type=float, default=0.0, help="extra time per generated token")
    p.add_argument("--radix-tree-max-size", type=int, default=1_000_000)
    p.add_argument("--repeat", type=int, default=1, help="rounds over all policies (alternating); best kept")
    p.add_argument("--policies", default="round_robin,least_inflight,power_of_two,cache_aware,cache_aware+radix")
    args = p.parse_args(argv)

    print(f"starting {args.workers} mock workers (prefill {args.prefill_ms_per_token} ms per uncached prompt "
          f"token, decode {args.decode_ms} ms + {args.token_latency_ms} ms/output token) ...", flush=True)
    procs = [start_mock_worker_process(hf_checkpoint=BUILTIN_CHECKPOINT, wait=False,
                                       prefill_time_per_token=args.prefill_ms_per_token / 1000,
                                       latency=args.decode_ms / 1000, token_latency=args.token_latency_ms / 1000)
             for _ in range(args.workers)]
    try:
        for w in procs:
            wait_http(w.url + "/get_model_info", timeout=60, proc=w.proc)
        urls = [w.url for w in procs]
        wanted = [s.strip() for s in args.policies.split(",") if s.strip()]
        variants = []
        for name in wanted:
            if name == "cache_aware+radix":
                if radix_tree_usable(urls):
                    variants.append(("cache_aware (radix_tree affinity)", "cache_aware", True, False))
                continue
            if name == "cache_aware":
                variants.append(("cache_aware (X-Session-ID)", "cache_aware", False, True))
            else:
                variants.append((name, name, False, False))
        best: dict[str, dict] = {}
        for _ in range(args.repeat):
            for label, policy, radix, header in variants:
                res = run_policy(label, policy, urls, args, radix, header)
                if label not in best or res["rps"] > best[label]["rps"]:
                    best[label] = res
        n = args.conversations * args.turns
        print(f"\n{args.conversations} conversations x {args.turns} turns = {n} requests over {args.workers} "
              f"workers (python {sys.version.split()[0]})")
        print(f"{'policy':36} {'wall s':>7} {'req/s':>7} {'mean ms':>8} {'p90 ms':>8} {'cache hit':>9}  per-worker")
        for r in best.values():
            print(f"{r['label']:36} {r['wall']:7.2f} {r['rps']:7.1f} {r['mean'] * 1000:8.0f} {r['p90'] * 1000:8.0f} "
                  f"{r['hit']:9.1%}  {r['per_worker']}  {r['policy_stats'] or ''}")
        rr = best.get("round_robin")
        if rr:
            for r in best.values():
                if r["label"].startswith("cache_aware"):
                    print(f"{r['label']} vs round_robin: throughput x{r['rps'] / rr['rps']:.2f}, "
                          f"mean latency x{r['mean'] / rr['mean']:.2f}")
    finally:
        for w in procs:
            w.stop()


if __name__ == "__main__":
    main()
