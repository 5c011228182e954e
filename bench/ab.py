"""Paired A/B under load: this checkout against an earlier commit.

    python -m bench.ab --baseline HEAD~3 --rounds 6
    python -m bench.ab --baseline HEAD --modes in-process --this-flags "--cache-snapshot {tmp}/{mode}.snap"

Exports the baseline commit (``git archive``) to a temporary directory, starts the router from both source trees
side by side in front of one fake worker (nginx when installed) in each mode -- pass-through (no plugins; one
fixed /generate body), the default plugins (multi-turn; "default plugins fixed": the fixed body) and the cache-on
router in process and with ``--radix-tree-process`` (the multi-turn load of ``loadgen.run_multiturn``) -- 32
connections, each target in turn, the
order reversed every other round, so a slow minute of a shared machine hits both sides of a ratio. Prints, per
mode, this checkout's req/s and CPU per request relative to the baseline's in each round, and the medians. Both
trees run with the same cache bound (``--radix-tree-max-size``, default: this checkout's default), so a change of
the default does not count as a change of speed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import loadgen
from bench.fake_worker import start_fake_workers
from bench.overhead import NO_PLUGINS, REPLY_TEXT, Target, _measure, free_ports, wait_ready

CACHE = ["--hf-checkpoint", "builtin:qwen3"]
# mode -> (flags, load): "fixed" = one /generate body over and over, "multiturn" = growing conversations
MODES = {"pass-through": (NO_PLUGINS, "fixed"), "default plugins": (CACHE, "multiturn"),
         "in-process": (["--plugin", "radix_tree", *CACHE], "multiturn"),
         "own process": (["--plugin", "radix_tree", *CACHE, "--radix-tree-process"], "multiturn"),
         "default plugins fixed": (CACHE, "fixed")}

ROOT = Path(__file__).resolve().parent.parent


def export(rev: str) -> Path:
    """The source tree of ``rev``, importable the way the installed package is (revisions before the rename kept
    their plugins in plugins/)."""
    out = Path(tempfile.mkdtemp(prefix="ab-baseline-"))
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    if not (out / "slime_router_plugins").exists():
        (out / "slime_router_plugins").symlink_to(out / "plugins")
    return out


def main() -> None:
    from slime_router_plugins.radix_tree.trie import DEFAULT_MAX_TOKENS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", required=True, help="git revision to compare against (e.g. HEAD~3, a tag)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--duration", type=float, default=4.0, help="seconds per measurement")
    ap.add_argument("--max-size", type=int, default=DEFAULT_MAX_TOKENS, help="--radix-tree-max-size for both")
    ap.add_argument("--this-flags", default="", help="extra router flags for this checkout only, e.g. "
                    "'--cache-snapshot {tmp}/c.snap' ({tmp}: a fresh temporary directory) to measure a flag's cost")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of: {', '.join(MODES)}")
    a = ap.parse_args()
    modes = {m: MODES[m] for m in a.modes.split(",")}

    this_flags = a.this_flags.replace("{tmp}", tempfile.mkdtemp(prefix="ab-this-")).split()
    base = export(a.baseline)
    trees = {"this": (ROOT, {}), "baseline": (base, {"PYTHONPATH": str(base)})}  # PYTHONPATH beats the install
    logdir = Path(tempfile.mkdtemp(prefix="ab-logs-"))
    ports = free_ports(4 + 2 * len(modes))
    fw = start_fake_workers(ports[0:2], ports[2:4])
    exe = str(Path(sys.executable).parent / "slime-router")
    targets: dict[tuple[str, str], Target] = {}
    it = iter(ports[4:])
    try:
        for tree, (root, env_extra) in trees.items():
            for mode, (flags, _) in modes.items():
                port = next(it)
                cmd = [exe, "serve", "--host", "127.0.0.1", "--port", str(port), "--worker-url", fw.urls[0],
                       "--worker-url", fw.urls[1], *flags]
                if "--hf-checkpoint" in flags:
                    cmd += ["--radix-tree-max-size", str(a.max_size)]
                if tree == "this" and this_flags:
                    cmd += [f.replace("{mode}", mode.replace(" ", "-")) for f in this_flags]
                log = open(logdir / f"{tree}-{mode.replace(' ', '-')}.log", "wb")
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(root),
                                        env=dict(os.environ, PYTHONUNBUFFERED="1", **env_extra))
                targets[(tree, mode)] = Target(f"{tree} {mode}", f"http://127.0.0.1:{port}", proc, log)
        body = loadgen.generate_body(100)
        for t in targets.values():
            wait_ready(t, body)
        print(f"baseline {a.baseline} exported to {base}; fake worker {fw.kind}; logs in {logdir}", flush=True)
        res: dict[tuple[str, str], list[tuple[float, float]]] = {k: [] for k in targets}
        for rnd in range(a.rounds):
            order = list(targets) if rnd % 2 == 0 else list(reversed(targets))
            for k in order:
                t = targets[k]
                if MODES[k[1]][1] == "fixed":
                    d = _measure(t, lambda t=t: loadgen.run_load(t.url + "/generate", body, 32, a.duration))
                else:
                    spec = loadgen.MultiTurnSpec(reply_text=REPLY_TEXT, tag=f"ab{rnd}{k[0][0]}{k[1][:3]}")
                    d = _measure(t, lambda t=t, spec=spec: loadgen.run_multiturn(t.url + "/generate", spec, 32,
                                                                                  a.duration))
                res[k].append((d["rps"], d["cpu_us_per_req"]))
                print(f"round {rnd}: {t.name:22s} {d['rps']:8,.0f} req/s {d['cpu_us_per_req']:6.0f} us CPU/req",
                      flush=True)
    finally:
        for t in targets.values():
            t.stop()
        fw.stop()
    for mode in modes:
        pairs = list(zip(res[("this", mode)], res[("baseline", mode)]))
        rps = [x[0] / y[0] for x, y in pairs]
        cpu = [x[1] / y[1] for x, y in pairs]
        print(f"{mode}: this / baseline req/s per round {[round(r, 3) for r in rps]}, median "
              f"{statistics.median(rps):.3f}; CPU per request, median {statistics.median(cpu):.3f}")


if __name__ == "__main__":
    main()
