"""End-to-end smoke test of an INSTALLED slime-router: the wheel in a fresh virtualenv, run from outside the repo.

The test suite runs from the repository root against an editable install, where a name that exists only in the
source tree (``plugins.radix_tree.process``) still imports. This script catches such packaging-only bugs:
``.ci/run`` builds the wheel, installs it (not editable) into a new virtualenv and runs

    <fresh venv>/bin/python -I <repo>/.ci/smoke_installed.py      (current directory: a temporary one)

It imports nothing from the checkout (stdlib only; it refuses to run if the installed packages resolve into the
repository) and drives the real command line:

1. ``slime-router plugins`` lists the four first-party plugins, from their entry points;
2. ``slime-router serve`` on the embedded demo (its own mock workers, in-process trajectory cache);
3. two ``slime-router mock-worker`` processes and ``slime-router serve --worker-url ... --radix-tree-process``
   (the cache in its own process);

in 2 and 3: wait for /health by polling, POST /generate and /v1/chat/completions, check /retrieve_from_text
returns the recorded tokens (exact_tokens > 0, loss_mask 1 on the generated ones), then SIGTERM everything and
check that no child (demo worker, cache process) outlives the router. Exit status 0 only if all of it held.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
FIRST_PARTY = {"radix_tree", "openai_compat", "metrics", "balancing"}
START_TIMEOUT = 180.0  # cap on waiting for a server to come up (it loads transformers and the tokenizer)
REQUEST_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0
# uvicorn re-raises the SIGTERM it handled once its graceful shutdown is done, so -SIGTERM is a clean exit too;
# that the shutdown really ran is checked by what it must stop (demo workers, the cache process)
CLEAN_EXIT = (0, -signal.SIGTERM)
# no proxy from the environment may stand between this script and loopback
HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class SmokeFailure(AssertionError):
    pass


def check(cond: Any, message: str) -> None:
    if not cond:
        raise SmokeFailure(message)


def step(message: str) -> None:
    print(f"[smoke] {message}", flush=True)


# --- the installation under test ------------------------------------------------------------------------------


def _inside(path: Path, parent: Path) -> bool:
    try:
        path.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


def check_installation() -> Path:
    """The packages come from this interpreter's site-packages (a wheel install), not from the checkout."""
    check(not _inside(Path.cwd(), REPO), f"run this from a directory outside the repository (cwd: {Path.cwd()})")
    check(sys.prefix != sys.base_prefix, "run this with the fresh virtualenv's python")
    purelib = Path(sysconfig.get_paths()["purelib"])
    # slime_router_testing: the mock worker behind `slime-router mock-worker` and the demo, the tokenizer builder
    for name in ("slime_router_core", "slime_router_plugins", "slime_router_testing",
                 "slime_router_testing.mock_worker"):
        spec = importlib.util.find_spec(name)
        check(spec is not None and spec.origin, f"{name} is not installed in {sys.prefix}")
        origin = Path(spec.origin)  # type: ignore[arg-type, union-attr]
        check(_inside(origin, purelib) and not _inside(origin, REPO),
              f"{name} imports from {origin}, not from the installed wheel in {purelib}")
    # the source-tree-only name must not resolve here, or this run proves nothing about the installed copy
    check(importlib.util.find_spec("plugins") is None, "a top-level 'plugins' package is importable here")
    dist = importlib.metadata.distribution("slime-router")
    direct = dist.read_text("direct_url.json")
    check(not (direct and json.loads(direct).get("dir_info", {}).get("editable")),
          "slime-router is installed in editable mode; install the built wheel")
    files = [str(f) for f in dist.files or []]
    check(any(f.endswith("/LICENSE") and ".dist-info/" in f for f in files), f"no LICENSE in the wheel: {files}")
    check(any(f.endswith("slime_router_plugins/metrics/grafana_dashboard.json") for f in files),
          "the metrics plugin's grafana_dashboard.json is missing from the wheel")
    # the C module (slime_router_core/_speedups.c) is compiled into the wheel and imported from it
    check(any("slime_router_core/_speedups" in f and f.endswith((".so", ".pyd")) for f in files),
          "the wheel holds no compiled slime_router_core._speedups")
    fast = importlib.util.find_spec("slime_router_core._speedups")
    check(fast is not None and fast.origin and not _inside(Path(fast.origin), REPO),
          f"slime_router_core._speedups does not import from the installed wheel ({fast and fast.origin})")
    exe = Path(sys.executable).parent / "slime-router"
    check(exe.is_file(), f"the slime-router console script is missing next to {sys.executable}")
    step(f"slime-router {dist.version} installed from a wheel in {sys.prefix}")
    return exe


# --- processes and HTTP ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env = {k: v for k, v in env.items() if not k.startswith("SLIME_ROUTER_") or k == "SLIME_ROUTER_CACHE_DIR"}
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Proc:
    """A child process whose output goes to a log file (shown when something fails)."""

    def __init__(self, name: str, cmd: list[str], logdir: Path) -> None:
        self.name = name
        self.log_path = logdir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - open for the process's life, closed in stop()
        self.popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                      env=child_env(), start_new_session=True)

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired as e:
                self.kill()
                raise SmokeFailure(f"{self.name} did not exit within {STOP_TIMEOUT:.0f}s of SIGTERM") from e
        self._log.close()
        return self.popen.returncode

    def kill(self) -> None:
        """Last resort: the whole process group (the child and anything it started)."""
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait()


def request(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with HTTP.open(req, timeout=REQUEST_TIMEOUT) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode(errors="replace")


def ok(method: str, url: str, body: Any = None) -> Any:
    status, reply = request(method, url, body)
    check(status == 200, f"{method} {url} -> {status}: {reply}")
    return reply


def wait_ready(proc: Proc, url: str) -> None:
    """Poll ``url`` until it answers 200; fail at once if the process exits (with its log)."""
    deadline = time.monotonic() + START_TIMEOUT
    last: Any = None
    while time.monotonic() < deadline:
        code = proc.popen.poll()
        if code is not None:
            raise SmokeFailure(f"{proc.name} exited with code {code} before it was ready")
        try:
            status, last = request("GET", url)
            if status == 200:
                return
        except (OSError, urllib.error.URLError) as e:
            last = e
        time.sleep(0.1)
    raise SmokeFailure(f"{proc.name}: {url} not ready within {START_TIMEOUT:.0f}s (last: {last})")


def refuses(url: str) -> bool:
    try:
        request("GET", url)
        return False
    except (OSError, urllib.error.URLError):
        return True


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie still answers kill(0): it has exited, its parent has not reaped it yet
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return True


def wait_until(cond: Any, what: str, timeout: float = STOP_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise SmokeFailure(f"still not true after {timeout:.0f}s: {what}")
        time.sleep(0.1)


# --- what a user does -----------------------------------------------------------------------------------------


def check_plugins_command(exe: Path, logdir: Path) -> None:
    out = subprocess.run([str(exe), "plugins"], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                         env=child_env(), timeout=120, check=False)
    (logdir / "plugins.log").write_text(out.stdout + out.stderr)
    check(out.returncode == 0, f"slime-router plugins exited {out.returncode}:\n{out.stdout}{out.stderr}")
    listed = {line.strip() for line in out.stdout.splitlines() if line.strip() and not line.startswith(" ")}
    check(FIRST_PARTY <= listed, f"slime-router plugins lists {sorted(listed)}, expected {sorted(FIRST_PARTY)}")
    for name in FIRST_PARTY:
        check(f"source: entry point slime_router_plugins.{name}.plugin" in out.stdout,
              f"plugin {name} does not come from its installed entry point:\n{out.stdout}")
    step(f"slime-router plugins: {', '.join(sorted(FIRST_PARTY))} (entry points)")


def exercise(url: str, cache_process: bool) -> int | None:
    """Generate, chat, retrieve; returns the cache process's pid (``cache_process``)."""
    workers = ok("GET", url + "/list_workers")["urls"]
    check(len(workers) == 2, f"/list_workers: {workers}")

    prompt = "Hello, my name is"
    gen = ok("POST", url + "/generate", {"text": prompt, "sampling_params": {"max_new_tokens": 16}})
    out_ids = gen.get("output_ids")
    check(isinstance(out_ids, list) and out_ids and isinstance(gen.get("text"), str), f"/generate: {gen}")

    got = ok("POST", url + "/retrieve_from_text", {"text": prompt + gen["text"], "strict": True})
    check(got.get("exact_tokens", 0) > 0, f"/retrieve_from_text: no exact tokens: {got}")
    check(got["tokens"][-len(out_ids):] == out_ids, f"/retrieve_from_text tokens {got['tokens']} do not end "
                                                    f"with the generated {out_ids}")
    check(1 in got["loss_mask"] and got["loss_mask"][-len(out_ids):] == [1] * len(out_ids),
          f"/retrieve_from_text loss_mask {got['loss_mask']}")

    chat = ok("POST", url + "/v1/chat/completions", {
        "model": "smoke", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 12})
    check(chat.get("object") == "chat.completion" and chat.get("choices"), f"/v1/chat/completions: {chat}")
    message = chat["choices"][0].get("message") or {}
    check(message.get("role") == "assistant", f"/v1/chat/completions message: {message}")

    stats = ok("GET", url + "/radix_tree/stats")
    pid = (stats.get("process") or {}).get("pid")
    if cache_process:
        check(isinstance(pid, int) and not gone(pid), f"--radix-tree-process: no live cache process: {stats}")
    else:
        check(pid is None, f"the default cache should run in-process: {stats}")
    step(f"  /generate {len(out_ids)} tokens, /retrieve_from_text exact_tokens={got['exact_tokens']}, "
         f"/v1/chat/completions ok" + (f", cache process pid {pid}" if cache_process else ", cache in-process"))
    return pid


def scenario_demo(exe: Path, logdir: Path) -> None:
    step("scenario 1: slime-router serve (embedded demo, in-process trajectory cache)")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    router = Proc("demo-router", [str(exe), "serve", "--host", "127.0.0.1", "--port", str(port)], logdir)
    try:
        wait_ready(router, url + "/health")
        workers = ok("GET", url + "/list_workers")["urls"]
        exercise(url, cache_process=False)
        code = router.stop()
        check(code in CLEAN_EXIT, f"the router exited with code {code} on SIGTERM")
        for w in workers:
            wait_until(lambda w=w: refuses(w + "/health"), f"demo worker {w} stopped with its router")
    except BaseException:
        router.kill()
        print(f"----- {router.name} log -----\n{router.log()}", file=sys.stderr)
        raise
    step("  shut down: router and its demo workers exited")


def scenario_workers_and_cache_process(exe: Path, logdir: Path) -> None:
    step("scenario 2: 2 x slime-router mock-worker + slime-router serve --radix-tree-process")
    procs: list[Proc] = []
    try:
        workers = []
        for i in range(2):
            wport = free_port()
            procs.append(Proc(f"mock-worker-{i}", [str(exe), "mock-worker", "--host", "127.0.0.1", "--port",
                                                   str(wport), "--seed", str(i)], logdir))
            workers.append(f"http://127.0.0.1:{wport}")
        for proc, w in zip(procs, workers):
            wait_ready(proc, w + "/get_model_info")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [str(exe), "serve", "--host", "127.0.0.1", "--port", str(port), "--hf-checkpoint", "builtin:qwen3",
               "--radix-tree-process"]
        for w in workers:
            cmd += ["--worker-url", w]
        router = Proc("router-cache-process", cmd, logdir)
        procs.append(router)
        wait_ready(router, url + "/health")
        pid = exercise(url, cache_process=True)
        code = router.stop()
        check(code in CLEAN_EXIT, f"the router exited with code {code} on SIGTERM")
        assert pid is not None
        wait_until(lambda: gone(pid), f"the cache process {pid} exited with its router")
        for proc in procs[:-1]:
            code = proc.stop()
            check(code in CLEAN_EXIT, f"{proc.name} exited with code {code} on SIGTERM")
    except BaseException:
        for proc in procs:
            proc.kill()
            print(f"----- {proc.name} log -----\n{proc.log()}", file=sys.stderr)
        raise
    step("  shut down: router, cache process and mock workers exited")


def main() -> int:
    started = time.monotonic()
    exe = check_installation()
    with tempfile.TemporaryDirectory(prefix="slime-router-smoke-logs-") as tmp:
        logdir = Path(tmp)
        try:
            check_plugins_command(exe, logdir)
            scenario_demo(exe, logdir)
            scenario_workers_and_cache_process(exe, logdir)
        except SmokeFailure as e:
            print(f"[smoke] FAILED: {e}", file=sys.stderr, flush=True)
            return 1
    step(f"installed-wheel smoke test OK ({time.monotonic() - started:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
