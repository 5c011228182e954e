"""``python -m bench``: the benchmark suite in one run (see bench/README.md).

Sections:
  overhead  router overhead vs sglang-router and the original design (bench/overhead.py)
  cache     trajectory cache: tokenization saved, memory per token, lookup/insert rates (bench/bench_cache.py)
  routing   multi-turn rollout throughput under each balancing policy (bench/bench_routing.py)

    python -m bench                      # everything, about 6 minutes on 2 cores
    python -m bench --quick              # about 1-2 minutes
    python -m bench --sections overhead --duration 5 --repeats 3 --json out.json
    python -m bench --sections overhead --profile /tmp/prof   # + py-spy profiles of slime-router under load
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("overhead", "cache", "routing")


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = f", {int(line.split()[1]) / 2**20:.0f} GiB RAM"
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {model}{mem}, " \
           f"{platform.system()} {platform.release()}, Python {platform.python_version()}"


def versions() -> str:
    out = []
    for mod in ("sglang_router", "uvicorn", "aiohttp", "orjson", "fastapi", "httpx", "uvloop", "httptools"):
        try:
            from importlib.metadata import version

            out.append(f"{mod.replace('_', '-')} {version(mod.replace('_', '-'))}")
        except Exception:  # noqa: BLE001
            out.append(f"{mod} -")
    for exe in ("nginx", "wrk"):
        try:
            r = subprocess.run([exe, "-v"], capture_output=True, text=True, timeout=5)
            txt = (r.stdout + r.stderr).strip().splitlines()
            out.append(txt[0] if txt else exe)
        except (OSError, subprocess.TimeoutExpired):
            out.append(f"{exe}: not installed")
    return "; ".join(out)


def _supported_flags(module: str) -> str:
    try:
        r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=60,
                           cwd=str(ROOT))
        return r.stdout + r.stderr
    except (OSError, subprocess.TimeoutExpired):
        return ""


def run_module_section(name: str, module: str, quick: bool, extra: list[str]) -> int:
    """Run another helper's benchmark script as a subprocess (its own output streams through)."""
    path = ROOT / (module.replace(".", "/") + ".py")
    if not path.exists():
        print(f"[{name}] skipped: {path.relative_to(ROOT)} is not there (yet). "
              f"Run it later with: python -m {module}", flush=True)
        return 0
    args = list(extra)
    if quick and not args:
        helptext = _supported_flags(module)
        if "--quick" in helptext:
            args = ["--quick"]
        elif module.endswith("bench_routing"):
            for flag, val in (("--conversations", "16"), ("--turns", "3")):
                if flag in helptext:
                    args += [flag, val]
    cmd = [sys.executable, "-m", module, *args]
    print(f"[{name}] {' '.join(cmd[1:])}", flush=True)
    t = time.monotonic()
    r = subprocess.run(cmd, cwd=str(ROOT))
    print(f"[{name}] exit {r.returncode} after {time.monotonic() - t:.0f} s", flush=True)
    return r.returncode


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    ap.add_argument("--quick", action="store_true", help="short runs (about 1 minute for the overhead section)")
    ap.add_argument("--duration", type=float, help="seconds per throughput measurement (default 3; quick 2)")
    ap.add_argument("--lat-duration", type=float, help="seconds per 1-connection measurement (default 2; quick 1)")
    ap.add_argument("--cache-duration", type=float, help="seconds per cache-on measurement (default 4; quick 3)")
    ap.add_argument("--repeats", type=int, help="alternating rounds over the routers (default 2; quick 1)")
    ap.add_argument("--cache-repeats", type=int,
                    help="rounds of the cache-on comparison, each with the reference's pass-through next to it "
                         "(default 3; quick 1)")
    ap.add_argument("--connections", default="32,256", help="connection counts for throughput (default 32,256)")
    ap.add_argument("--ttfb-requests", type=int, help="streaming requests per router for TTFB (default 1000)")
    ap.add_argument("--rss-requests", type=int, default=0,
                    help="extra requests through slime pass-through for the RSS check (e.g. 200000)")
    ap.add_argument("--cache-max-size", type=int, default=None,
                    help="--radix-tree-max-size for the cache-on routers (default: the router's own default)")
    ap.add_argument("--baseline-all-conns", action="store_true",
                    help="measure the baseline at every connection count (default: only the first; at 256 it "
                         "queues requests for seconds)")
    ap.add_argument("--no-streaming", action="store_true", help="skip the streaming TTFB measurement")
    ap.add_argument("--load-tool", choices=("auto", "wrk", "asyncio"), default="auto",
                    help="load generator (auto: wrk when installed)")
    ap.add_argument("--profile", metavar="DIR", help="also record py-spy profiles of slime-router under load")
    ap.add_argument("--json", metavar="PATH", help="write the overhead results as JSON")
    ap.add_argument("--cache-args", default="", help="extra args for the cache section (quoted string)")
    ap.add_argument("--routing-args", default="", help="extra args for the routing section (quoted string)")
    a = ap.parse_args(argv)

    sections = [s.strip() for s in a.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        ap.error(f"unknown section(s) {bad}; choose from {SECTIONS}")

    started = time.monotonic()
    print(f"slime-router benchmark suite — {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
    print(f"machine: {machine()}")
    print(f"software: {versions()}", flush=True)
    rc = 0

    if "overhead" in sections:
        from . import overhead

        q = a.quick
        cfg = overhead.Config(
            duration=a.duration or (2.0 if q else 3.0),
            lat_duration=a.lat_duration or (1.0 if q else 2.0),
            cache_duration=a.cache_duration or (3.0 if q else 4.0),
            repeats=a.repeats or (1 if q else 2),
            cache_repeats=a.cache_repeats or (1 if q else 3),
            connections=tuple(int(x) for x in a.connections.split(",") if x.strip()),
            ttfb_requests=a.ttfb_requests or (300 if q else 1000),
            rss_requests=a.rss_requests,
            cache_max_size=a.cache_max_size,
            tool=a.load_tool,
            profile_dir=a.profile,
            streaming=not a.no_streaming,
            baseline_all_conns=a.baseline_all_conns,
        )
        print(f"\n== overhead: {cfg.repeats} alternating round(s), {cfg.duration:g} s per throughput run, "
              f"{cfg.lat_duration:g} s per latency run; cache-on: {cfg.cache_repeats} round(s) of "
              f"{cfg.cache_duration:g} s ==", flush=True)
        t = time.monotonic()
        res = overhead.run(cfg)
        print(f"\n{overhead.table(res)}")
        print("\nTargets (issue #7):")
        for line in overhead.targets_check(res):
            print(f"  {line}")
        if res.get("profiles"):
            print("\nProfiles (py-spy, self time, % of samples):")
            for n, p in res["profiles"].items():
                print(f"  {n}: {p.get('file', p.get('error'))}")
                for f, pct in p.get("self", [])[:15]:
                    print(f"    {pct:5.1f}%  {f}")
        print(f"[overhead] {time.monotonic() - t:.0f} s", flush=True)
        if a.json:
            Path(a.json).write_text(json.dumps({"machine": machine(), "software": versions(),
                                                "date": datetime.datetime.now().astimezone().isoformat(),
                                                **res}, indent=1, default=str))

    if "cache" in sections:
        print("\n== cache ==", flush=True)
        rc |= run_module_section("cache", "bench.bench_cache", a.quick, a.cache_args.split())
    if "routing" in sections:
        print("\n== routing ==", flush=True)
        rc |= run_module_section("routing", "bench.bench_routing", a.quick, a.routing_args.split())
    print(f"\ntotal {time.monotonic() - started:.0f} s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
