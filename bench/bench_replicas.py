"""Replicas: throughput of 1 and 2 router replicas with every default plugin on, multi-turn session traffic,
side by side with sglang-router's pass-through in the same run (docs/scale-out.md).

    python -m bench.bench_replicas                        # ~3 minutes on 2 cores
    python -m bench.bench_replicas --duration 3 --repeats 1 --json out.json

Targets, each its own process(es) in front of the same nginx fake workers (bench/fake_worker.py), measured in turn
(order rotated between rounds, the router's CPU left to go idle between runs, as bench/overhead.py does):

- ``sglang-router``: sglang-router 0.3.x, round robin, the same multi-turn bodies (it ignores the session header);
- ``1 replica``: ``slime-router serve --hf-checkpoint builtin:qwen3`` (every default plugin: trajectory cache,
  sessions, OpenAI layer, metrics, balancing, ...);
- ``--replicas 2``: the same with ``--replicas 2`` (two children on one port, SO_REUSEPORT, proxy routing);
- ``2 replicas + HAProxy``: two ``slime-router serve`` with ``--replica-routing lb`` behind the real HAProxy with the
  shipped configuration (deploy/haproxy/haproxy.cfg);
- ``HAProxy alone``: HAProxy in front of the fake workers (its own cost per request; the sessions' backend).

Load: wrk (one thread) with multi-turn trajectories (``loadgen.lua_multiturn``: a ~200-token system prompt, 8 turns
of ~40 new tokens each, the fake worker's fixed reply), every trajectory its own ``X-Session-ID``, at
``--connections`` connections. Reported: req/s (median of the rounds), the ratio to sglang-router, CPU per request
of the router processes (``utime+stime`` of their process trees over the run / requests) and of HAProxy, and a
projection to 16 cores and several machines from the measured CPU per request. On 2 shared cores the load
generator, the fake worker and the routers compete: the 2-replica rows measure cost more than scaling.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import loadgen
from .fake_worker import REPLY_TEXT, start_fake_workers
from .overhead import Target, _rotate, _spawn, cpu_seconds, free_ports, settle, sglang_cmd, slime_cmd, tree, wait_ready

SGLANG = "sglang-router"
ONE = "1 replica"
TWO = "--replicas 2"
HAP = "2 replicas + HAProxy"
HAP_ALONE = "HAProxy alone"
DEFAULT = ["--hf-checkpoint", "builtin:qwen3"]  # every default plugin: they need the tokenizer


def session_lua(spec: loadgen.MultiTurnSpec) -> str:
    """``loadgen.lua_multiturn`` with an ``X-Session-ID`` per trajectory (tag, epoch, conversation)."""
    script = loadgen.lua_multiturn(spec)
    call = 'return wrk.format(nil, "/generate", nil, '
    assert call in script, "loadgen.lua_multiturn changed: update bench_replicas.session_lua"
    headers = ('{["Content-Type"] = "application/json", '
               '["X-Session-ID"] = "s" .. TAG .. "." .. epoch .. "." .. conv}')
    return script.replace(call, f'return wrk.format(nil, "/generate", {headers}, ')


def run_sessions(url: str, spec: loadgen.MultiTurnSpec, connections: int, duration: float) -> loadgen.LoadResult:
    if spec.conversations < 2 * connections:
        spec.conversations = 4 * connections
    if not loadgen.WRK:
        raise SystemExit("bench_replicas needs wrk (apt-get install wrk)")
    return loadgen._run_wrk(url, session_lua(spec), connections, duration)


def measure(t: Target, fn: Callable[[], loadgen.LoadResult], haproxy_pid: int | None) -> dict[str, Any]:
    if t.proc is not None:
        t.refresh_pids()
    settle(t)
    c0, h0 = t.cpu(), cpu_seconds([haproxy_pid]) if haproxy_pid else 0.0
    r = fn()
    c1, h1 = t.cpu(), cpu_seconds([haproxy_pid]) if haproxy_pid else 0.0
    d = r.to_dict()
    n = max(1, r.requests)
    d["cpu_us_per_req"] = (c1 - c0) / n * 1e6 if t.pids else float("nan")
    d["haproxy_cpu_us_per_req"] = (h1 - h0) / n * 1e6 if haproxy_pid else float("nan")
    return d


def _median(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


def run(duration: float, repeats: int, connections: int, out: Callable[[str], None] = print) -> dict[str, Any]:
    from slime_router_testing.haproxy import start_haproxy

    logdir = Path(tempfile.mkdtemp(prefix="bench-replicas-"))
    ports = iter(free_ports(12))
    fw = start_fake_workers([next(ports), next(ports)], [])
    out(f"fake workers: {fw.kind} {fw.urls}; logs in {logdir}")
    body = loadgen.generate_body()
    targets: dict[str, Target] = {}
    haproxies: dict[str, Any] = {}
    extra: list[Target] = []
    res: dict[str, Any] = {"runs": {}, "notes": []}
    try:
        sg = sglang_cmd(next(ports), fw.urls)
        specs: list[tuple[str, list[str] | None]] = [
            (SGLANG, sg),
            (ONE, slime_cmd(next(ports), fw.urls, DEFAULT)),
            (TWO, slime_cmd(next(ports), fw.urls, [*DEFAULT, "--replicas", "2"])),
        ]
        for name, cmd in specs:
            if cmd is None:
                res["notes"].append(f"{name}: not installed (pip install sglang-router)")
                continue
            port = int(cmd[cmd.index("--port") + 1])
            targets[name] = _spawn(name.replace(" ", "_").strip("-") + f"-{port}", port, cmd, logdir)
            targets[name].name = name
        # two replicas behind HAProxy (lb routing: HAProxy hashes the sessions)
        rports = [next(ports), next(ports)]
        peers = ",".join(f"http://127.0.0.1:{p}" for p in rports)
        for p in rports:
            cmd = slime_cmd(p, fw.urls, [*DEFAULT, "--replica-url", f"http://127.0.0.1:{p}", "--replica-peers",
                                         peers, "--replica-routing", "lb"])
            extra.append(_spawn(f"replica-{p}", p, cmd, logdir))
        for t in [*targets.values(), *extra]:
            wait_ready(t, body, timeout=180)
        lb = haproxies[HAP] = start_haproxy([t.url for t in extra])
        both = Target(HAP, lb.url)
        both.pids = [pid for t in extra for pid in tree(t.proc.pid)]  # type: ignore[union-attr]
        targets[HAP] = both
        alone = haproxies[HAP_ALONE] = start_haproxy(fw.urls)
        targets[HAP_ALONE] = Target(HAP_ALONE, alone.url)
        for name, t in targets.items():  # warm-up: connection pools, the tokenizer's caches
            run_sessions(t.url + "/generate", loadgen.MultiTurnSpec(reply_text=REPLY_TEXT, tag=f"w{len(name)}"),
                         connections, 1)
            if t.proc is not None:
                t.refresh_pids()
        names = list(targets)
        runs: dict[str, list[dict]] = {n: [] for n in names}
        for rep in range(repeats):
            for n in _rotate(names, rep):
                t = targets[n]
                spec = loadgen.MultiTurnSpec(reply_text=REPLY_TEXT, tag=f"r{rep}{names.index(n)}")
                hp = haproxies[n].pid if n in haproxies else None
                runs[n].append(measure(t, lambda t=t, spec=spec: run_sessions(t.url + "/generate", spec,
                                                                              connections, duration), hp))
                r = runs[n][-1]
                out(f"  round {rep + 1} {n}: {r['rps']:,.0f} req/s, errors {r['errors']}, router CPU "
                    f"{r['cpu_us_per_req']:.0f} us/req, HAProxy CPU {r['haproxy_cpu_us_per_req']:.0f} us/req")
        res["runs"] = runs
        res["connections"] = connections
        res["duration"] = duration
        for n, t in targets.items():
            if t.proc is not None and t.proc.poll() is not None:
                res["notes"].append(f"{n} exited during the run: see {logdir}")
        return res
    finally:
        for lb_ in haproxies.values():
            lb_.stop()
        for t in [*targets.values(), *extra]:
            t.stop()
        fw.stop()


def table(res: dict[str, Any], cores: int = 16, machines: tuple[int, ...] = (2, 4, 8)) -> str:
    runs = res["runs"]
    med = {n: {k: _median([r[k] for r in rs]) for k in ("rps", "cpu_us_per_req", "haproxy_cpu_us_per_req")}
           for n, rs in runs.items()}
    errors = {n: sum(r["errors"] for r in rs) for n, rs in runs.items()}
    ref = med.get(SGLANG, {}).get("rps", float("nan"))
    lines = [f"multi-turn session traffic, {res['connections']} connections, {res['duration']:g} s per run, "
             f"median of {max(len(v) for v in runs.values())} round(s)", "",
             "| setup | req/s | vs sglang-router | router CPU us/req | HAProxy CPU us/req | errors |",
             "|---|---|---|---|---|---|"]
    for n, m in med.items():
        ratio = m["rps"] / ref if ref == ref and ref else float("nan")
        cpu = "-" if n == HAP_ALONE else f"{m['cpu_us_per_req']:,.0f}"
        hcpu = "-" if m["haproxy_cpu_us_per_req"] != m["haproxy_cpu_us_per_req"] else \
            f"{m['haproxy_cpu_us_per_req']:,.0f}"
        lines.append(f"| {n} | {m['rps']:,.0f} | {ratio:.2f}x | {cpu} | {hcpu} | {errors[n]} |")
    router = med.get(HAP, med.get(ONE, {})).get("cpu_us_per_req", float("nan"))
    hap = med.get(HAP, {}).get("haproxy_cpu_us_per_req", float("nan"))
    sg_cpu = med.get(SGLANG, {}).get("cpu_us_per_req", float("nan"))
    lines += ["", "Projection from the measured CPU per request (each replica one core; workers, load generator "
                  "elsewhere; linear in cores, which the 2-core run cannot confirm):"]
    if router == router and router > 0:
        per_core = 1e6 / router
        lines.append(f"- a replica: {per_core:,.0f} req/s per core ({router:,.0f} us/req)")
        lines.append(f"- {cores} cores, {cores} replicas: {cores * per_core:,.0f} req/s")
        if hap == hap and hap > 0:
            both = 1e6 / (router + hap)
            lines.append(f"- {cores} cores, replicas + HAProxy on the same machine: {cores * both:,.0f} req/s "
                         f"(HAProxy {hap:,.0f} us/req)")
            lb_cap = cores * 1e6 / hap
            for k in machines:
                lines.append(f"- {k} machines x {cores} cores of replicas behind one {cores}-core HAProxy machine: "
                             f"{min(k * cores * per_core, lb_cap):,.0f} req/s (HAProxy's ceiling {lb_cap:,.0f})")
        if sg_cpu == sg_cpu and sg_cpu > 0:
            lines.append(f"- for scale: sglang-router pass-through, {sg_cpu:,.0f} us/req "
                         f"(its process, all threads)")
    for note in res.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_replicas", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per run (default 5)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds over the targets (default 3)")
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--cores", type=int, default=16, help="the projection's cores per machine")
    ap.add_argument("--json", metavar="PATH", help="write the raw results here")
    a = ap.parse_args(argv)
    print(f"bench_replicas — {time.strftime('%Y-%m-%d %H:%M %Z')}", flush=True)
    try:
        from .__main__ import machine, versions

        print(f"machine: {machine()}\nsoftware: {versions()}", flush=True)
    except Exception:  # noqa: BLE001 - informational
        pass
    from slime_router_testing.haproxy import haproxy_binary

    exe = haproxy_binary()
    if exe is None:
        raise SystemExit("bench_replicas needs haproxy (apt-get install haproxy)")
    print(f"haproxy: {subprocess.run([exe, '-v'], capture_output=True, text=True).stdout.splitlines()[0]}", flush=True)
    res = run(a.duration, a.repeats, a.connections)
    print()
    print(table(res, a.cores))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
