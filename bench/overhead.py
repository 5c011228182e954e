"""Router overhead, side by side: sglang-router vs slime-router vs the original design, same fake worker.

Every router runs as its own process in front of the same two nginx fake workers (fixed SGLang-shaped
reply). The load generator (wrk) measures each router in turn, alternating the order between repeats;
all processes share the machine's cores. Reported per router:

- throughput at 32 and 256 connections (median of the repeats) and the ratio to sglang-router;
- added latency at 1 connection: the router's p50 / p99 minus the worker-direct p50 / p99 of the same repeat;
- router CPU per request: utime+stime of the router's process tree (``/proc/<pid>/stat``) over the run,
  divided by the requests served;
- cache-on: multi-turn trajectory bodies (see ``loadgen.run_multiturn``) through slime-router with the
  radix_tree plugin and the real (bundled Qwen3) tokenizer, the cache in the router's process and in its own
  (``--radix-tree-process``), vs sglang-router proxying the same bodies;
- streaming time to first byte (SSE fake workers) at 1 connection;
- RSS of each router after warm-up and at the end, with the number of requests served in between.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import loadgen
from .fake_worker import REPLY_TEXT, start_fake_workers

BIN = Path(sys.executable).parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
NO_PLUGINS = ["--no-plugin", "radix_tree", "--no-plugin", "openai_compat", "--no-plugin", "metrics",
              "--no-plugin", "balancing", "--no-plugin", "sessions", "--no-plugin", "vllm", "--no-plugin", "inspector"]
OWN = "slime cache-on, own process"  # the cache in its own process (--radix-tree-process)
VLLM_PASS = "slime pass-through, vLLM worker"  # --plugin vllm (+ the tokenizer: the reply's text is decoded)
VLLM_CACHE = "slime cache-on, vLLM worker"
CACHED = ("slime cache-on", OWN, "slime default plugins")  # the targets with a /radix_tree/stats


def free_ports(n: int) -> list[int]:
    import socket

    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


# --- process accounting ---------------------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                st = f.read()
        except OSError:
            continue
        ppid = int(st[st.rfind(")") + 2:].split()[1])
        out.setdefault(ppid, []).append(int(d))
    return out


def tree(pid: int) -> list[int]:
    kids = _children()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            st = f.read()
    except OSError:
        return None
    return st[st.rfind(")") + 2:].split()


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for p in pids:
        f = _stat(p)
        if f:
            total += int(f[11]) + int(f[12])  # utime, stime (fields 14, 15)
    return total / CLK_TCK


def rss_mb(pids: list[int]) -> float:
    total = 0
    for p in pids:
        f = _stat(p)
        if f:
            total += int(f[21]) * PAGE  # rss pages (field 24)
    return total / 2**20


# --- routers --------------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    url: str  # base URL
    proc: subprocess.Popen | None = None
    log: Any = None
    pids: list[int] = field(default_factory=list)
    served: int = 0
    rss_start: float = 0.0
    rss_end: float = 0.0

    def refresh_pids(self) -> None:
        if self.proc is not None:
            self.pids = tree(self.proc.pid)

    def cpu(self) -> float:
        return cpu_seconds(self.pids) if self.pids else 0.0

    def rss(self) -> float:
        self.refresh_pids()
        return rss_mb(self.pids) if self.pids else 0.0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.log is not None:
            self.log.close()


def _spawn(name: str, port: int, cmd: list[str], logdir: Path) -> Target:
    log = open(logdir / f"{name}.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            cwd=str(Path(__file__).resolve().parent.parent), env=dict(os.environ, PYTHONUNBUFFERED="1"))
    return Target(name, f"http://127.0.0.1:{port}", proc, log)


def sglang_cmd(port: int, workers: list[str]) -> list[str] | None:
    exe = BIN / "sglang-router"
    if exe.exists():
        base = [str(exe), "launch"]
    else:
        try:
            import sglang_router  # noqa: F401
        except ImportError:
            return None
        base = [sys.executable, "-m", "sglang_router.launch_router"]
    # Each instance needs its own Prometheus exporter port (default 29000 for all).
    return base + ["--host", "127.0.0.1", "--port", str(port), "--worker-urls", *workers, "--policy", "round_robin",
                   "--log-level", "warn", "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_ports(1)[0])]


def slime_cmd(port: int, workers: list[str], extra: list[str]) -> list[str]:
    exe = BIN / "slime-router"
    base = [str(exe)] if exe.exists() else [sys.executable, "-m", "slime_router_core.cli"]
    cmd = base + ["serve", "--host", "127.0.0.1", "--port", str(port)]
    for w in workers:
        cmd += ["--worker-url", w]
    return cmd + extra


def baseline_cmd(port: int, workers: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "bench.baseline_proxy", "--port", str(port)]
    for w in workers:
        cmd += ["--worker-url", w]
    return cmd


def wait_ready(t: Target, body: bytes, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if t.proc is not None and t.proc.poll() is not None:
            t.log.flush()
            text = Path(t.log.name).read_text(errors="replace")[-1500:]
            raise RuntimeError(f"{t.name} exited with {t.proc.returncode}:\n{text}")
        try:
            req = urllib.request.Request(t.url + "/generate", data=body, headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=2) as r:
                if r.status == 200:
                    r.read()
                    t.refresh_pids()
                    return
        except Exception as e:  # noqa: BLE001 - not up yet
            last = f"{type(e).__name__}: {e}"
        time.sleep(0.2)
    raise TimeoutError(f"{t.name} not ready after {timeout}s ({last})")


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


# --- the section ----------------------------------------------------------------------------------


@dataclass
class Config:
    duration: float = 3.0  # seconds per throughput measurement
    lat_duration: float = 2.0  # seconds per 1-connection latency measurement
    cache_duration: float = 4.0
    cache_repeats: int = 3  # rounds of the cache-on comparison (its ratio is the noisiest: more rounds)
    repeats: int = 2
    connections: tuple[int, ...] = (32, 256)
    ttfb_requests: int = 1000
    rss_requests: int = 0  # extra requests through slime pass-through for the RSS check (0: none)
    cache_max_size: int | None = None  # None: the router's default bound
    tool: str = "auto"
    prompt_words: int = 100
    profile_dir: str | None = None  # py-spy profiles of slime-router under load go here
    profile_seconds: float = 8.0
    json_out: str | None = None
    streaming: bool = True
    baseline_all_conns: bool = False  # the baseline only at the first connection count (it queues seconds at 256)


def _median(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


def _rotate(xs: list, k: int) -> list:
    k %= max(1, len(xs))
    return xs[k:] + xs[:k]


def settle(t: Target, timeout: float = 15.0) -> float:
    """Wait until the router has drained the requests queued by the previous run (its CPU goes idle).

    A slow router still works through requests of connections the load generator already closed; the
    next measurement would pay for them. Returns the seconds waited.
    """
    if not t.pids:
        return 0.0
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        c0 = t.cpu()
        time.sleep(0.1)
        if t.cpu() - c0 < 0.02:  # < 20 % of a core over 100 ms
            break
    return time.monotonic() - start


def _measure(t: Target, fn: Callable[[], loadgen.LoadResult]) -> dict:
    t.refresh_pids()
    settle(t)
    c0 = t.cpu()
    r = fn()
    c1 = t.cpu()
    t.served += r.requests
    d = r.to_dict()
    d["cpu_s"] = c1 - c0
    d["cpu_us_per_req"] = (c1 - c0) / r.requests * 1e6 if r.requests and t.pids else float("nan")
    return d


def run(cfg: Config, out: Callable[[str], None] = print) -> dict:
    logdir = Path(tempfile.mkdtemp(prefix="bench-logs-"))
    ports = free_ports(18)
    fw = start_fake_workers(ports[0:2], ports[2:4], vllm_ports=ports[16:18])
    out(f"fake workers: {fw.kind} {fw.urls} (SSE {fw.sse_urls}); load generator: "
        f"{'wrk' if (loadgen.WRK and cfg.tool != 'asyncio') else 'asyncio client'}; logs in {logdir}")
    body = loadgen.generate_body(cfg.prompt_words)
    sbody = loadgen.stream_body(cfg.prompt_words)
    res: dict[str, Any] = {"fake_worker": fw.kind, "tool": "wrk" if (loadgen.WRK and cfg.tool != "asyncio") else
                           "asyncio", "throughput": {}, "latency": {}, "cache": {}, "ttfb": {}, "rss": {},
                           "notes": []}
    targets: dict[str, Target] = {}
    sse_targets: dict[str, Target] = {}
    try:
        # Start everything at once (start-up is the slow part), then wait.
        p = iter(ports[4:])
        direct = Target("worker-direct", fw.urls[0])
        sg = sglang_cmd(next(p), fw.urls)
        # the cache bound users run (the shipped default) unless --cache-max-size says otherwise
        size = ["--radix-tree-max-size", str(cfg.cache_max_size)] if cfg.cache_max_size else []
        specs: list[tuple[str, list[str] | None]] = [
            ("sglang-router", sg),
            ("slime pass-through", slime_cmd(next(p), fw.urls, NO_PLUGINS)),
            ("slime default plugins", slime_cmd(next(p), fw.urls, ["--hf-checkpoint", "builtin:qwen3", *size])),
            ("slime cache-on", slime_cmd(next(p), fw.urls, ["--plugin", "radix_tree", "--hf-checkpoint",
                                                              "builtin:qwen3", *size])),
            (OWN, slime_cmd(next(p), fw.urls, ["--plugin", "radix_tree", "--hf-checkpoint", "builtin:qwen3", *size,
                                               "--radix-tree-process"])),
            ("baseline (FastAPI+httpx)", baseline_cmd(next(p), fw.urls)),
        ]
        if fw.vllm_urls:  # the same reply from a vLLM-shaped fake worker: the vllm plugin translates
            specs += [
                (VLLM_PASS, slime_cmd(next(p), fw.vllm_urls, ["--plugin", "vllm", "--hf-checkpoint", "builtin:qwen3"])),
                (VLLM_CACHE, slime_cmd(next(p), fw.vllm_urls, ["--plugin", "radix_tree,vllm", "--hf-checkpoint",
                                                               "builtin:qwen3", *size])),
            ]
        sse_specs: list[tuple[str, list[str] | None]] = []
        if cfg.streaming:
            sse_specs = [
                ("sglang-router", sglang_cmd(next(p), fw.sse_urls)),
                ("slime pass-through", slime_cmd(next(p), fw.sse_urls, NO_PLUGINS)),
                ("slime default plugins", slime_cmd(next(p), fw.sse_urls, ["--hf-checkpoint", "builtin:qwen3"])),
                ("baseline (FastAPI+httpx)", baseline_cmd(next(p), fw.sse_urls)),
            ]
        for name, cmd in specs:
            if cmd is None:
                res["notes"].append(f"{name}: not installed (pip install sglang-router); ratios are to "
                                    f"slime pass-through instead")
                continue
            port = int(cmd[cmd.index("--port") + 1])
            targets[name] = _spawn(name.split(" ")[0] + "-" + str(port), port, cmd, logdir)
            targets[name].name = name
        for name, cmd in sse_specs:
            if cmd is None:
                continue
            port = int(cmd[cmd.index("--port") + 1])
            sse_targets[name] = _spawn("sse-" + name.split(" ")[0] + "-" + str(port), port, cmd, logdir)
            sse_targets[name].name = name
        for name, t in list(targets.items()):
            try:
                wait_ready(t, body)
            except Exception as e:  # one broken router must not lose the others' numbers
                out(f"!! {name} did not start: {e}")
                res["notes"].append(f"{name} did not start: {str(e)[:300]}")
                t.stop()
                del targets[name]
        for name, t in list(sse_targets.items()):
            try:
                wait_ready(t, sbody)
            except Exception as e:
                res["notes"].append(f"{name} (SSE) did not start: {str(e)[:300]}")
                t.stop()
                del sse_targets[name]
        ref = "sglang-router" if "sglang-router" in targets else "slime pass-through"
        res["reference"] = ref

        # Warm-up (connection pools, JIT-free but caches, tokenizer) and the RSS baseline.
        for t in targets.values():
            loadgen.run_load(t.url + "/generate", body, 32, 1, cfg.tool)
            t.rss_start = t.rss()
        order = [direct] + list(targets.values())

        # 1. throughput
        for conns in cfg.connections:
            here = [t for t in order if cfg.baseline_all_conns or conns == cfg.connections[0]
                    or not t.name.startswith("baseline")]
            runs: dict[str, list[dict]] = {t.name: [] for t in here}
            for rep in range(cfg.repeats):
                for t in _rotate(here, rep):
                    runs[t.name].append(_measure(t, lambda t=t, conns=conns: loadgen.run_load(
                        t.url + "/generate", body, conns, cfg.duration, cfg.tool)))
            res["throughput"][conns] = runs
            out(f"  throughput at {conns} connections: " + ", ".join(
                f"{n} {_median([r['rps'] for r in rs]):,.0f}/s" for n, rs in runs.items()))

        # 2. latency at 1 connection
        runs = {t.name: [] for t in order}
        for rep in range(cfg.repeats):
            for t in _rotate(order, rep):
                runs[t.name].append(_measure(t, lambda t=t: loadgen.run_load(t.url + "/generate", body, 1,
                                                                              cfg.lat_duration, cfg.tool)))
        res["latency"] = runs
        out("  p50 at 1 connection: " + ", ".join(f"{n} {_median([r['p50_ms'] for r in rs]):.3f} ms"
                                                  for n, rs in runs.items()))

        # 3. cache on: multi-turn trajectories
        cache_names = [n for n in (ref, "slime cache-on", OWN, "slime default plugins", "slime pass-through")
                       if n in targets]
        cache_names = list(dict.fromkeys(cache_names))
        cruns: dict[str, list[dict]] = {n: [] for n in cache_names}
        stats_before = {}
        for n in CACHED:
            if n in targets:
                try:
                    stats_before[n] = get_json(targets[n].url + "/radix_tree/stats")
                except Exception:  # noqa: BLE001
                    pass
        # Each round also measures the reference's pass-through (fixed body) next to the cache-on runs: the
        # target ratio is taken per round (same minute, same machine noise), then the median of the rounds.
        ref_fixed: list[dict] = []
        for rep in range(cfg.cache_repeats):
            for n in _rotate(cache_names + ["(reference, fixed body)"], rep):
                if n == "(reference, fixed body)":
                    t = targets[ref]
                    ref_fixed.append(_measure(t, lambda t=t: loadgen.run_load(t.url + "/generate", body, 32,
                                                                              cfg.duration, cfg.tool)))
                    continue
                t = targets[n]
                spec = loadgen.MultiTurnSpec(reply_text=REPLY_TEXT, tag=f"r{rep}{n[:3]}")
                runs_ = _measure(t, lambda t=t, spec=spec: loadgen.run_multiturn(t.url + "/generate", spec, 32,
                                                                                 cfg.cache_duration, cfg.tool))
                cruns[n].append(runs_)
        res["cache"]["throughput_32"] = cruns
        res["cache"]["reference_fixed_32"] = ref_fixed
        for n in CACHED:
            if n in targets:
                try:
                    st = get_json(targets[n].url + "/radix_tree/stats")
                    b = stats_before.get(n, {})
                    hits = st["cache_hits"] - b.get("cache_hits", 0)
                    misses = st["cache_misses"] - b.get("cache_misses", 0)
                    ht = st["hit_tokens"] - b.get("hit_tokens", 0)
                    lt = st["lookup_tokens"] - b.get("lookup_tokens", 0)
                    res["cache"].setdefault("stats", {})[n] = {
                        "hit_rate": hits / max(1, hits + misses), "token_hit_rate": ht / max(1, lt),
                        "lookups": hits + misses, "entries": st.get("total_entries"),
                        "cur_cache_size": st.get("cur_cache_size"), "evictions": st.get("evictions")}
                except Exception as e:  # noqa: BLE001
                    res["notes"].append(f"{n}: /radix_tree/stats failed: {e}")
        out("  cache-on (multi-turn, 32 conns): " + ", ".join(
            f"{n} {_median([r['rps'] for r in rs]):,.0f}/s" for n, rs in cruns.items()))

        # 4. extra requests for the RSS check
        if cfg.rss_requests and "slime pass-through" in targets:
            t = targets["slime pass-through"]
            rate = _median([r["rps"] for r in res["throughput"][cfg.connections[0]]["slime pass-through"]]) or 1000
            before = t.rss()
            served0 = t.served
            _measure(t, lambda: loadgen.run_load(t.url + "/generate", body, 32, cfg.rss_requests / rate, cfg.tool))
            res["rss"]["hammer"] = {"requests": t.served - served0, "before_mb": before, "after_mb": t.rss()}
        for t in targets.values():
            t.rss_end = t.rss()
            res["rss"][t.name] = {"after_warmup_mb": t.rss_start, "end_mb": t.rss_end, "requests": t.served}

        # 5. profiles (optional)
        if cfg.profile_dir:
            res["profiles"] = profile(cfg, targets, body, out)

        # 6. streaming time to first byte
        if sse_targets:
            for t in list(targets.values()):  # free the cores
                t.stop()
            tt: dict[str, dict] = {}
            sdirect = Target("worker-direct", fw.sse_urls[0])
            for t in [sdirect] + list(sse_targets.values()):
                loadgen.ttfb(t.url + "/generate", sbody, 200)
            for t in [sdirect] + list(sse_targets.values()):
                tt[t.name] = loadgen.ttfb(t.url + "/generate", sbody, cfg.ttfb_requests)
            res["ttfb"] = tt
            out("  streaming TTFB p50: " + ", ".join(f"{n} {d['ttfb_p50_ms']:.3f} ms" for n, d in tt.items()))
    finally:
        for t in list(targets.values()) + list(sse_targets.values()):
            t.stop()
        fw.stop()
    res["logdir"] = str(logdir)
    return res


# --- profiles ---------------------------------------------------------------------------------------


def profile(cfg: Config, targets: dict[str, Target], body: bytes, out: Callable[[str], None]) -> dict:
    """py-spy record (raw collapsed stacks) of slime-router under load; top functions by self time."""
    spy = BIN / "py-spy"
    if not spy.exists():
        return {"error": "py-spy not installed (pip install py-spy)"}
    os.makedirs(cfg.profile_dir, exist_ok=True)
    result = {}
    for n, multiturn in (("slime pass-through", False), ("slime cache-on", True), (OWN, True)):
        if n not in targets:
            continue
        t = targets[n]
        path = Path(cfg.profile_dir) / (n.replace(" ", "_") + ".txt")
        rec = subprocess.Popen([str(spy), "record", "--format", "raw", "--rate", "250", "--nonblocking",
                                "--subprocesses", "-o", str(path), "--pid", str(t.proc.pid),
                                "--duration", str(int(cfg.profile_seconds))],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.5)
        if multiturn:
            spec = loadgen.MultiTurnSpec(reply_text=REPLY_TEXT, tag="prof")
            loadgen.run_multiturn(t.url + "/generate", spec, 32, cfg.profile_seconds - 1, cfg.tool)
        else:
            loadgen.run_load(t.url + "/generate", body, 32, cfg.profile_seconds - 1, cfg.tool)
        _, err = rec.communicate(timeout=60)
        if not path.exists():
            result[n] = {"error": err.decode(errors="replace")[-500:]}
            continue
        result[n] = {"file": str(path), **summarize_collapsed(path)}
        out(f"  profile {n}: {path}")
    return result


def summarize_collapsed(path: Path, top: int = 25) -> dict:
    """Self time and inclusive time per function from py-spy's collapsed stacks."""
    self_t: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in Path(path).read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        k = int(n)
        total += k
        frames = stack.split(";")
        leaf = frames[-1]
        self_t[leaf] = self_t.get(leaf, 0) + k
        for f in set(frames):
            incl[f] = incl.get(f, 0) + k
    return {"samples": total,
            "self": [(f, round(100 * v / total, 1)) for f, v in sorted(self_t.items(), key=lambda x: -x[1])[:top]],
            "inclusive": [(f, round(100 * v / total, 1)) for f, v in sorted(incl.items(), key=lambda x: -x[1])[:top]]}


# --- the table --------------------------------------------------------------------------------------


def table(res: dict) -> str:
    ref = res.get("reference", "sglang-router")
    lines = []
    thr = res["throughput"]
    lat = res["latency"]
    names = [n for n in next(iter(thr.values())).keys()] if thr else []
    conns = list(thr.keys())

    def rps(c, n):
        return _median([r["rps"] for r in thr[c].get(n, [])])

    def cpu(c, n):
        return _median([r["cpu_us_per_req"] for r in thr[c].get(n, [])])

    def added(n, key):
        direct = _median([r[key] for r in lat["worker-direct"]])
        return _median([r[key] for r in lat[n]]) - direct

    def ratio(a, b):
        return f"{a / b:.2f}x" if b and b == b and a == a else "-"

    head = ["router"] + [f"req/s @{c}" for c in conns] + [f"vs {ref.split()[0]} @{c}" for c in conns] + \
        ["added p50 ms @1", "p50 ratio", "added p99 ms @1", "CPU us/req @32", "CPU ratio"]
    rows = []
    c0 = conns[0] if conns else 32
    for n in names:
        row = [n]
        row += [f"{rps(c, n):,.0f}" if n in thr[c] else "-" for c in conns]
        row += ["-" if n == "worker-direct" or n not in thr[c] else ratio(rps(c, n), rps(c, ref)) for c in conns]
        if n == "worker-direct":
            row += [f"({_median([r['p50_ms'] for r in lat[n]]):.3f} abs)", "-",
                    f"({_median([r['p99_ms'] for r in lat[n]]):.3f} abs)", "-", "-"]
        else:
            row += [f"{added(n, 'p50_ms'):.3f}", ratio(added(n, "p50_ms"), added(ref, "p50_ms")),
                    f"{added(n, 'p99_ms'):.3f}", f"{cpu(c0, n):.0f}", ratio(cpu(c0, n), cpu(c0, ref))]
        rows.append(row)
    lines.append(_md(head, rows))

    cache = res.get("cache", {}).get("throughput_32", {})
    if cache:
        lines.append("")
        lines.append("Trajectory cache on: multi-turn bodies (each turn = previous text + reply + new user turn), "
                     "32 connections")
        peer = ref.split()[0]
        head = ["router", "req/s", f"vs {peer} same bodies", f"vs {peer} pass-through (same rounds)",
                "p50 ms", "p99 ms", "CPU us/req", "prefix hit rate (lookups)", "tokens from cache"]
        rows = []
        for n, rs in cache.items():
            r = _median([x["rps"] for x in rs])
            st = res["cache"].get("stats", {}).get(n)
            rows.append([n, f"{r:,.0f}", ratio(r, _median([x["rps"] for x in cache[ref]])) if ref in cache else "-",
                         f"{paired_ratio(res, n):.2f}x", f"{_median([x['p50_ms'] for x in rs]):.2f}",
                         f"{_median([x['p99_ms'] for x in rs]):.2f}",
                         f"{_median([x['cpu_us_per_req'] for x in rs]):.0f}",
                         f"{st['hit_rate']:.1%}" if st else "-", f"{st['token_hit_rate']:.1%}" if st else "-"])
        lines.append(_md(head, rows))

    tt = res.get("ttfb") or {}
    if tt:
        lines.append("")
        lines.append("Streaming (SSE) time to first body byte at 1 connection")
        d0 = tt.get("worker-direct", {}).get("ttfb_p50_ms", float("nan"))
        refa = tt.get(ref, {}).get("ttfb_p50_ms", float("nan")) - d0
        rows = []
        for n, d in tt.items():
            a = d["ttfb_p50_ms"] - d0
            rows.append([n, f"{d['ttfb_p50_ms']:.3f}", f"{d['ttfb_p99_ms']:.3f}",
                         "-" if n == "worker-direct" else f"{a:.3f}",
                         "-" if n == "worker-direct" else ratio(a, refa)])
        lines.append(_md(["router", "TTFB p50 ms", "TTFB p99 ms", "added p50 ms", "ratio"], rows))

    rss = res.get("rss") or {}
    if rss:
        lines.append("")
        lines.append("Router RSS")
        rows = []
        for n, d in rss.items():
            if n == "hammer":
                rows.append(["slime pass-through (extra run)", f"{d['before_mb']:.1f}", f"{d['after_mb']:.1f}",
                             f"{d['after_mb'] - d['before_mb']:+.1f}", f"{d['requests']:,}"])
            else:
                rows.append([n, f"{d['after_warmup_mb']:.1f}", f"{d['end_mb']:.1f}",
                             f"{d['end_mb'] - d['after_warmup_mb']:+.1f}", f"{d['requests']:,}"])
        lines.append(_md(["router", "RSS after warm-up MB", "RSS at end MB", "delta MB", "requests in between"],
                         rows))
    for note in res.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def _md(head: list[str], rows: list[list[str]]) -> str:
    w = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = lambda r: "| " + " | ".join(str(x).ljust(w[i]) for i, x in enumerate(r)) + " |"  # noqa: E731
    return "\n".join([fmt(head), "|" + "|".join("-" * (x + 2) for x in w) + "|"] + [fmt(r) for r in rows])


def targets_check(res: dict) -> list[str]:
    """The issue's targets, checked against this run."""
    ref = res.get("reference")
    if ref != "sglang-router":
        return ["sglang-router not measured: targets not checked"]
    out = []
    thr = res["throughput"]
    c = 32 if 32 in thr else next(iter(thr))
    med = lambda n: _median([r["rps"] for r in thr[c][n]])  # noqa: E731
    lat = res["latency"]
    d = _median([r["p50_ms"] for r in lat["worker-direct"]])
    add = lambda n: _median([r["p50_ms"] for r in lat[n]]) - d  # noqa: E731
    sg = med("sglang-router")
    if "slime pass-through" in thr[c]:
        s = med("slime pass-through")
        out.append(f"pass-through @{c}: {s / sg:.2f}x sglang-router (target >= 0.5x): "
                   f"{'MET' if s / sg >= 0.5 else 'NOT MET'}")
        b = "baseline (FastAPI+httpx)"
        if b in thr[c]:
            out.append(f"pass-through @{c}: {s / med(b):.1f}x baseline (target >= 10x): "
                       f"{'MET' if s / med(b) >= 10 else 'NOT MET'}")
        out.append(f"added p50 @1: {add('slime pass-through'):.3f} ms vs sglang-router {add('sglang-router'):.3f} ms "
                   f"= {add('slime pass-through') / add('sglang-router'):.2f}x (target <= 2x): "
                   f"{'MET' if add('slime pass-through') <= 2 * add('sglang-router') else 'NOT MET'}")
    cache = res.get("cache", {}).get("throughput_32", {})
    for n in ("slime cache-on", OWN):
        if n in cache:
            q = paired_ratio(res, n)
            out.append(f"{n}: {q:.2f}x sglang-router pass-through, median of the per-round ratios "
                       f"(target >= 0.35x): {'MET' if q >= 0.35 else 'NOT MET'}")
    # issue 17: what every user of the trajectory cache runs, on the multi-turn bodies (the headline)
    dp = "slime default plugins"
    if dp in cache:
        q = paired_ratio(res, dp)
        cpu = _median([r["cpu_us_per_req"] for r in cache[dp]])
        out.append(f"{dp}, multi-turn: {q:.2f}x sglang-router pass-through (target >= 0.5x): "
                   f"{'MET' if q >= 0.5 else 'NOT MET'}; CPU {cpu:.0f} us/request (target <= 200): "
                   f"{'MET' if cpu <= 200 else 'NOT MET'}")
    if dp in lat:
        q = add(dp) / add("sglang-router")
        out.append(f"{dp}: added p50 @1 {add(dp):.3f} ms = {q:.2f}x sglang-router's (target <= 1.5x): "
                   f"{'MET' if q <= 1.5 else 'NOT MET'}")
    return out


def paired_ratio(res: dict, name: str) -> float:
    """Median over the cache rounds of ``name``'s multi-turn req/s / the reference's fixed-body req/s (same round)."""
    runs = res.get("cache", {}).get("throughput_32", {}).get(name, [])
    ref = res.get("cache", {}).get("reference_fixed_32", [])
    return _median([a["rps"] / b["rps"] for a, b in zip(runs, ref) if b["rps"]])
