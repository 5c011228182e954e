"""Trajectory cache benchmark (a script, not a test): python bench/bench_cache.py [--quick]

1. Tokenization saved per turn on multi-turn trajectories (real Qwen3 tokenizer, turns 1-10, ~100 to
   ~8,000 tokens): time of ``TrajectoryCache.prepare`` (longest recorded prefix + tokenizing only the
   new text) vs tokenizing the full text each turn.
2. Memory per cached token (tracemalloc, and the trie's own sys.getsizeof count), text included; and the same
   for 8 branches per prompt (GRPO samples sharing the prompt and their first few generated tokens, each
   with its own logprobs, which the trie keeps per branch).
3. Lookups and inserts per second at 1e4, 1e5 and 1e6 cached tokens.
4. Per-request cache cost (in-process): prepare() and record() microseconds per turn on 10-turn chat
   trajectories (~40-token user messages, ~100-250-token replies), in a cache shared by many
   trajectories (as on a router), plus the encoder used (tiktoken fast path or HF).
5. ``--breakdown`` (alone): where prepare and record spend their CPU time, on the overhead benchmark's own
   multi-turn bodies (``bench.loadgen.multiturn_bodies``, the fake worker's reply), each part timed around its
   call.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import tracemalloc

from slime_router_core.tokenizers import BUILTIN_CHECKPOINT, load_tokenizer
from slime_router_plugins.radix_tree import StringRadixTrie, TrajectoryCache

EOS = 151645
WORDS = ("the of and to in is you that it he was for on are as with his they at be this have from or one had by "
         "word but not what all were we when your can said there use each which she do how their if will up other "
         "about out many then them these so some her would make like him into time has look two more write go see "
         "number no way could people my than first water been call who its now find long down day did get come").split()


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def bench_turns(tok, trajectories: int, rng: random.Random) -> None:
    enc = tok.backend_tokenizer.encode
    print("1) tokenization per turn: prepare() (cached prefix + new text only) vs tokenizing the full text")
    print(f"   {trajectories} trajectories, each turn adds a user message (~50-350 words) and a reply (~100-700 words)")
    print("   turn | prompt tokens | full tokenize ms | prepare ms | time saved | tokens tokenized fresh")
    per_turn: dict[int, list[tuple[int, float, float, int]]] = {}
    for _ in range(trajectories):
        cache = TrajectoryCache(tok, max_size=10_000_000)
        prompt = "<|im_start|>system\nYou are a helpful agent.<|im_end|>\n<|im_start|>user\n" + words(rng, 60) + \
                 "<|im_end|>\n<|im_start|>assistant\n"
        for turn in range(1, 11):
            t0 = time.perf_counter()
            for _ in range(3):
                full_ids = enc(prompt, add_special_tokens=False).ids
            t_full = (time.perf_counter() - t0) / 3
            t0 = time.thread_time()  # CPU time of this thread: the cost, whatever else the machine runs
            prepared = cache.prepare_sync(prompt)
            t_prep = time.thread_time() - t0
            per_turn.setdefault(turn, []).append((len(full_ids), t_full, t_prep, prepared.fresh_tokens))
            reply_text = words(rng, rng.randint(100, 700))
            out = enc(" " + reply_text, add_special_tokens=False).ids + [EOS]
            cache.record_sync(prepared, {"text": " " + reply_text, "output_ids": out, "meta_info": {
                "finish_reason": {"type": "stop", "matched": EOS}, "weight_version": "1",
                "output_token_logprobs": [[-0.5, t, None] for t in out]}}, "w")
            prompt = prompt + " " + reply_text + "<|im_end|>\n<|im_start|>user\n" + words(rng, rng.randint(50, 350)) + \
                "<|im_end|>\n<|im_start|>assistant\n"
    for turn, rows in per_turn.items():
        n = statistics.mean(r[0] for r in rows)
        tf = statistics.mean(r[1] for r in rows) * 1e3
        tp = statistics.mean(r[2] for r in rows) * 1e3
        fresh = statistics.mean(r[3] for r in rows)
        print(f"   {turn:4d} | {n:13.0f} | {tf:16.3f} | {tp:10.3f} | {100 * (1 - tp / tf):9.1f}% | "
              f"{fresh:.0f} ({100 * fresh / n:.1f}%)")


def synthetic(rng: random.Random, n_tokens: int) -> tuple[str, list[int], list[int]]:
    parts = [" " + rng.choice(WORDS) for _ in range(n_tokens)]
    text = "".join(parts)
    ends, pos = [], 0
    for p in parts:
        pos += len(p)
        ends.append(pos)
    return text, [rng.randrange(150_000) for _ in parts], ends


def bench_memory(rng: random.Random, total: int) -> None:
    print("\n2) memory per cached token (trajectories of 1,000 tokens sharing 200-token prefixes in groups of 4)")
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    t = StringRadixTrie(max_tokens=10 * total)
    prefix = None
    k = 0
    while t.size < total:
        if k % 4 == 0:
            prefix = synthetic(rng, 200)
        text, ids, ends = synthetic(rng, 800)
        ptext, pids, pends = prefix
        t.insert(ptext + text, pids + ids, pends + [len(ptext) + e for e in ends],
                 [-0.5] * 1000, [0] * 200 + [1] * 800, "1")
        k += 1
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    print(f"   {t.size:,} tokens in {t.node_count:,} nodes: tracemalloc {used / t.size:.1f} B/token, "
          f"getsizeof {t.nbytes() / t.size:.1f} B/token (text, ids, logprobs, widths, mask+version, nodes)")


def bench_memory_branches(rng: random.Random, total: int, branches: int = 8) -> None:
    print(f"\n2b) memory per cached token, {branches} branches per prompt (200-token prompt, 800 generated tokens per "
          f"branch, the first 1-8 of them the same ids in every branch but each branch with its own logprobs)")
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    t = StringRadixTrie(max_tokens=10 * total)
    recorded = 0
    while t.size < total:
        ptext, pids, pends = synthetic(rng, 200)
        htext, hids, hends = synthetic(rng, rng.randint(1, 8))  # the tokens every branch sampled first
        ptext, pids, pends = ptext + htext, pids + hids, pends + [len(ptext) + e for e in hends]
        for _ in range(branches):
            text, ids, ends = synthetic(rng, 1000 - len(pids))
            lps = [-0.5] * 200 + [-5 * rng.random() for _ in range(800)]
            t.insert(ptext + text, pids + ids, pends + [len(ptext) + e for e in ends], lps, [0] * 200 + [1] * 800, "1")
            recorded += 1000
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    print(f"   {recorded:,} tokens recorded, {t.size:,} stored in {t.node_count:,} nodes: tracemalloc "
          f"{used / t.size:.1f} B per cached token ({used / recorded:.1f} B per recorded token), getsizeof "
          f"{t.nbytes() / t.size:.1f} B per cached token")


def bench_rates(rng: random.Random, sizes: list[int]) -> None:
    print("\n3) lookup / insert rates (1,000-token trajectories; lookups of a recorded trajectory + 40 new chars)")
    for size in sizes:
        t = StringRadixTrie(max_tokens=size)
        trajs = []
        while t.size + 1000 <= size:
            text, ids, ends = synthetic(rng, 1000)
            t.insert(text, ids, ends, None, None, "1")
            trajs.append(text)
        queries = [rng.choice(trajs) + " and some new user text here!" for _ in range(300)]
        t0 = time.perf_counter()
        for q in queries:
            m = t.match(q)
            assert len(m.ids) == 1000
        lookup = len(queries) / (time.perf_counter() - t0)
        news = [synthetic(rng, 1000) for _ in range(100)]
        t0 = time.perf_counter()
        for text, ids, ends in news:  # extends a recorded trajectory: 1,000 shared + 1,000 new tokens
            base = rng.choice(trajs)
            m = t.match(base, touch=False)
            t.insert(base + text, m.ids + ids, m.ends + [len(base) + e for e in ends], None, None, "1")
        insert = len(news) / (time.perf_counter() - t0)
        print(f"   {size:>9,} cached tokens: {lookup:8.0f} lookups/s ({lookup * 1000 / 1e6:.2f} M tokens/s), "
              f"{insert:7.0f} inserts/s (with LRU eviction at the bound)")


def bench_per_request(tok, trajectories: int, rng: random.Random, snapshot: str | None = None) -> None:
    enc = tok.backend_tokenizer.encode
    cache = TrajectoryCache(tok, max_size=10_000_000, snapshot=snapshot)
    cache.start_sync()  # with a snapshot path: the journal is on (its writer thread runs meanwhile)
    print("\n4) per-request cache cost: prepare() + record() per turn, 10-turn chat trajectories, shared cache"
          + (f", journal on ({snapshot}.journal)" if snapshot else ""))
    print(f"   encoder: {getattr(cache.detok, 'encoder_name', 'hf tokenizers')}")
    user_msgs = ["Tell me about " + words(rng, 30) + " 你好世界 🤖 ok?" for _ in range(50)]
    replies = [words(rng, rng.randint(100, 250)) for _ in range(50)]
    # precompute the worker's outputs so only the cache is timed
    out_ids = {r: enc(" " + r, add_special_tokens=False).ids + [EOS] for r in replies}
    rows: dict[int, list[tuple[int, int, float, float]]] = {}
    for _ in range(3):  # warm-up trajectories (imports, tokenizer caches)
        p = cache.prepare_sync("<|im_start|>user\nwarm up " + words(rng, 20) + "<|im_end|>\n<|im_start|>assistant\n")
        cache.record_sync(p, {"text": " x", "output_ids": enc(" x").ids + [EOS], "meta_info": {
            "finish_reason": {"type": "stop", "matched": EOS}, "weight_version": "1"}}, "w")
    for k in range(trajectories):
        prompt = f"<|im_start|>system\nYou are agent {k}.<|im_end|>\n<|im_start|>user\n" + rng.choice(user_msgs) + \
                 "<|im_end|>\n<|im_start|>assistant\n"
        for turn in range(1, 11):
            t0 = time.thread_time()  # CPU time of this thread: the cost, whatever else the machine runs
            prepared = cache.prepare_sync(prompt)
            t_prep = time.thread_time() - t0
            reply_text = " " + rng.choice(replies)
            out = out_ids[reply_text[1:]]
            resp = {"text": reply_text, "output_ids": out, "meta_info": {
                "finish_reason": {"type": "stop", "matched": EOS}, "weight_version": "1",
                "output_token_logprobs": [[-0.5, t, None] for t in out]}}
            t0 = time.thread_time()
            cache.record_sync(prepared, resp, "w")
            t_rec = time.thread_time() - t0
            rows.setdefault(turn, []).append((len(prepared.input_ids), prepared.fresh_tokens, t_prep, t_rec))
            prompt = prompt + reply_text + "<|im_end|>\n<|im_start|>user\n" + rng.choice(user_msgs) + \
                "<|im_end|>\n<|im_start|>assistant\n"
    print("   turn | prompt tokens | fresh tokens | prepare us (median) | record us (median) | total us   (CPU time)")
    tot_p, tot_r = [], []
    for turn, rs in rows.items():
        n = statistics.mean(r[0] for r in rs)
        f = statistics.mean(r[1] for r in rs)
        tp = statistics.median(r[2] for r in rs) * 1e6
        tr = statistics.median(r[3] for r in rs) * 1e6
        tot_p += [r[2] for r in rs]
        tot_r += [r[3] for r in rs]
        print(f"   {turn:4d} | {n:13.0f} | {f:12.0f} | {tp:19.1f} | {tr:18.1f} | {tp + tr:8.1f}")
    print(f"   all turns: prepare mean {statistics.mean(tot_p) * 1e6:.1f} us, record mean "
          f"{statistics.mean(tot_r) * 1e6:.1f} us, "
          f"sum {(statistics.mean(tot_p) + statistics.mean(tot_r)) * 1e6:.1f} us")
    assert cache.retrieve_sync(prompt[:len(prompt) - 40])["exact_tokens"] > 0
    if cache.persist is not None:
        cache.persist.flush()
        st = cache.persist.stats()
        n = max(1, st["journal_records"])
        print(f"   journal: {st['journal_records']:,} records, {st['journal_bytes'] / n:,.0f} bytes per record, "
              f"{st['journal_text_chars'] / n:,.0f} characters of text per record")
        cache.close_sync()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only-per-request", action="store_true", help="run only section 4")
    ap.add_argument("--only-memory", action="store_true", help="run only section 2 (and 2b)")
    ap.add_argument("--journal", action="store_true", help="section 4 once more with --cache-snapshot's journal on")
    ap.add_argument("--breakdown", action="store_true", help="run only section 5")
    args = ap.parse_args()
    rng = random.Random(0)
    if args.breakdown:
        breakdown(load_tokenizer(BUILTIN_CHECKPOINT), 2 if args.quick else 4)
        return
    if args.only_memory:
        bench_memory(rng, 100_000 if args.quick else 1_000_000)
        bench_memory_branches(rng, 100_000 if args.quick else 1_000_000)
        return
    tok = load_tokenizer(BUILTIN_CHECKPOINT)
    if args.only_per_request:
        per_request(tok, 30 if args.quick else 100, rng, args.journal)
        return
    bench_turns(tok, 3 if args.quick else 10, rng)
    bench_memory(rng, 100_000 if args.quick else 1_000_000)
    bench_memory_branches(rng, 100_000 if args.quick else 1_000_000)
    bench_rates(rng, [10_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000])
    per_request(tok, 30 if args.quick else 100, rng, args.journal)


def per_request(tok, trajectories: int, rng: random.Random, journal: bool) -> None:
    seed = rng.random()
    bench_per_request(tok, trajectories, random.Random(seed))
    if journal:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            bench_per_request(tok, trajectories, random.Random(seed), snapshot=f"{d}/cache.snap")


def breakdown(tok, epochs: int) -> None:
    """Section 5: CPU time per turn of each part of prepare and record (``time.thread_time_ns`` around the call)."""
    import functools
    import json

    from bench import fake_worker, loadgen
    from slime_router_plugins.radix_tree import cache as cache_mod
    from slime_router_plugins.radix_tree import trie as trie_mod

    spent: dict[str, int] = {}

    def timed(owner, name: str, label: str) -> None:
        fn = getattr(owner, name)

        @functools.wraps(fn)
        def wrapper(*a, **k):
            t0 = time.thread_time_ns()
            try:
                return fn(*a, **k)
            finally:
                spent[label] = spent.get(label, 0) + time.thread_time_ns() - t0

        setattr(owner, name, wrapper)

    for owner, name, label in (
            (cache_mod.TrajectoryCache, "prepare_sync", "prepare"),
            (trie_mod.StringRadixTrie, "match", "  the trie walk (match)"),
            (cache_mod.Detokenizer, "encode", "  tokenizing the new text"),
            (cache_mod.TrajectoryCache, "_prepared", "  the ids list and the prepared prompt"),
            (cache_mod.TrajectoryCache, "record_sync", "record"),
            (cache_mod, "_output_ids_and_logprobs", "  splitting the reply's logprob entries"),
            (cache_mod.Detokenizer, "align_output", "  lining the reply up with its text"),
            (cache_mod.Detokenizer, "widths_for", "  widths of the new prompt tokens"),
            (trie_mod.StringRadixTrie, "insert_raw", "  the tree insert")):
        timed(owner, name, label)
    spec = loadgen.MultiTurnSpec(reply_text=fake_worker.REPLY_TEXT, tag="breakdown")
    body = loadgen.multiturn_bodies(spec)
    per_epoch = spec.conversations * spec.turns
    texts = [json.loads(body(i))["text"] for i in range(per_epoch * epochs)]
    reply = json.dumps(fake_worker.generate_reply())
    cache = cache_mod.TrajectoryCache(tok)
    for i, text in enumerate(texts):
        if i == per_epoch:  # the first epoch warms up (imports, tokenizer tables); count the others
            spent.clear()
        cache.record_sync(cache.prepare_sync(text), json.loads(reply), "http://worker")
    turns = len(texts) - per_epoch
    print(f"5) where a turn's cache time goes: {spec.conversations} conversations x {spec.turns} turns "
          f"(the overhead benchmark's multi-turn bodies), {turns:,} turns timed, CPU time per turn")
    for label in ("prepare", "  the trie walk (match)", "  tokenizing the new text",
                  "  the ids list and the prepared prompt", "record", "  the tree insert",
                  "  widths of the new prompt tokens", "  lining the reply up with its text",
                  "  splitting the reply's logprob entries"):
        print(f"   {spent.get(label, 0) / turns / 1000:7.1f} us  {label}")


if __name__ == "__main__":
    main()
