"""`slime-router serve` start-up, as a user meets it (the real CLI in a subprocess where the process matters).

- "serving on ..." is printed only once the server listens and its start-up (lifespan, plugins' ``startup``)
  has completed; a busy port is an immediate, clear error with a non-zero exit, before any slow start-up work
  (the demo's mock workers are never started).
- ``--no-plugin`` / ``--plugin`` names that name no plugin are errors listing the installed ones.
- An enumerated plugin flag (``--openai-reasoning-parser``, ``--openai-tool-parser``, ``--openai-history``)
  refuses unknown values, naming the valid ones (``--help`` lists them); so does ``build_app`` for settings
  given in code.

Tests wait for events (output lines, process exit), never for a fixed time.
"""

from __future__ import annotations

import os
import queue
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from slime_router_core import PluginLoadError, Settings
from slime_router_core.app import build_app
from slime_router_core.plugins import load_plugins
from slime_router_core.settings import OptionRegistry
from slime_router_core.tokenizers import BUILTIN_CHECKPOINT
from slime_router_testing import stop_process_group

FIXTURES = Path(__file__).parent / "fixtures"
FIRST_PARTY = ("radix_tree", "openai_compat", "metrics", "balancing")
CORE_ONLY = [a for name in FIRST_PARTY for a in ("--no-plugin", name)]
# A quick way through option parsing to a start-up error that names something else (no server, no demo).
NO_SUCH_CHECKPOINT = ["--worker-url", "http://127.0.0.1:9", "--hf-checkpoint", "/no/such/checkpoint/dir"]


def _cli() -> list[str]:
    # the module, not the console script: the code on PYTHONPATH is the code under test
    return [sys.executable, "-m", "slime_router_core.cli"]


def _env(*paths: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIME_ROUTER_")}
    env["PYTHONPATH"] = os.pathsep.join([*map(str, paths), *filter(None, [env.get("PYTHONPATH")])])
    env["COLUMNS"] = "200"
    env.update(extra)
    return env


def _run(args: list[str], timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(_cli() + args, check=False, capture_output=True, text=True, timeout=timeout, env=_env(**env),
                          stdin=subprocess.DEVNULL)


class Lines:
    """A process's merged output, line by line, read in a thread; ``until`` waits for a line (or the exit)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.seen: list[str] = []
        self._q: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._q.put(line.rstrip("\n"))
        self._q.put(None)

    def until(self, *patterns: str, timeout: float = 120) -> str:
        while True:
            try:
                line = self._q.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"none of {patterns} within {timeout}s; output so far: {self.seen}") from None
            if line is None:
                raise AssertionError(f"process exited ({self.proc.wait()}) before {patterns}; output: {self.seen}")
            self.seen.append(line)
            if any(p in line for p in patterns):
                return line


@pytest.fixture
def serve_proc():
    started: list[subprocess.Popen] = []

    def start(args: list[str], env: dict[str, str]) -> subprocess.Popen:
        proc = subprocess.Popen(_cli() + args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        stop_process_group(proc)


@pytest.fixture
def busy_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


# --------------------------------------------------------------------------- 6a: the banner, a busy port


def test_banner_only_after_startup_completed_and_then_it_answers(serve_proc, tmp_path):
    gate = tmp_path / "open"
    proc = serve_proc(["serve", "--host", "127.0.0.1", "--port", "0", "--worker-url", "http://127.0.0.1:9",
                       *CORE_ONLY, "--slime-router-middleware-paths", "slime_router_startup_gate"],
                      _env(FIXTURES / "startup_gate", SLIME_TEST_GATE=str(gate)))
    out = Lines(proc)
    first = out.until("startup-gate: waiting", "serving on")
    assert "startup-gate: waiting" in first, f"banner printed while start-up was still running: {out.seen}"
    gate.touch()  # let the start-up finish
    banner = out.until("serving on")
    assert out.seen.index("startup-gate: released") < out.seen.index(banner)
    # the banner names the port really listened on (--port 0: the system's choice), and it answers at once
    url = re.search(r"serving on (http://127\.0\.0\.1:(\d+))", banner)
    assert url and url.group(2) != "0", banner
    assert httpx.get(url.group(1) + "/health", timeout=10).json()["status"] == "ok"


def test_failed_startup_prints_no_banner_and_exits_nonzero(serve_proc):
    proc = serve_proc(["serve", "--host", "127.0.0.1", "--port", "0", "--worker-url", "http://127.0.0.1:9",
                       *CORE_ONLY, "--slime-router-middleware-paths", "slime_router_startup_gate"],
                      _env(FIXTURES / "startup_gate", SLIME_TEST_GATE="unused", SLIME_TEST_GATE_FAIL="1"))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "slime-router serving on" not in out and "start-up failed on purpose" in out


def test_busy_port_is_a_clear_error_with_no_banner(busy_port):
    r = _run(["serve", "--host", "127.0.0.1", "--port", str(busy_port), "--worker-url", "http://127.0.0.1:9",
              *CORE_ONLY])
    assert r.returncode != 0
    assert "slime-router serving on" not in r.stdout + r.stderr
    assert f"Error: cannot listen on 127.0.0.1:{busy_port}: address already in use" in r.stderr
    assert "--port" in r.stderr and "Traceback" not in r.stderr


def test_busy_port_in_the_demo_fails_before_any_mock_worker_starts(busy_port, tmp_path):
    log = tmp_path / "processes.log"
    r = subprocess.run(_cli() + ["serve", "--host", "127.0.0.1", "--port", str(busy_port)], check=False,
                       capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL,
                       env=_env(FIXTURES / "proc_log", SLIME_TEST_PROC_LOG=str(log)))
    assert r.returncode != 0
    assert "slime-router serving on" not in r.stdout and "address already in use" in r.stderr
    started = log.read_text().splitlines()
    assert len(started) == 1 and "slime_router_core.cli" in started[0], started  # the router only: no mock worker


# --------------------------------------------------------------------------- 6b: plugin names


@pytest.mark.parametrize("how", ["flag", "env"])
def test_unknown_no_plugin_name_is_an_error_listing_the_installed_plugins(how):
    if how == "flag":
        r = _run(["serve", "--no-plugin", "metrcs", *NO_SUCH_CHECKPOINT])
    else:
        r = _run(["serve", *NO_SUCH_CHECKPOINT], SLIME_ROUTER_NO_PLUGINS="metrcs")
    assert r.returncode == 2
    assert "Unknown plugin(s) ['metrcs']" in r.stderr and "Did you mean 'metrics'?" in r.stderr
    assert all(name in r.stderr for name in FIRST_PARTY)
    assert "no such directory" not in r.stderr  # refused before anything else


def test_unknown_no_plugin_name_in_the_plugins_command():
    r = _run(["plugins", "--no-plugin", "openai"])
    assert r.returncode != 0
    assert "'openai'" in r.stderr and "openai_compat" in r.stderr


def test_unknown_plugin_name_is_an_error_listing_the_installed_plugins():
    r = _run(["serve", "--plugin", "radix-tree", *NO_SUCH_CHECKPOINT])
    assert r.returncode == 2
    assert "Unknown plugin(s) ['radix-tree']" in r.stderr and all(name in r.stderr for name in FIRST_PARTY)


def test_load_plugins_refuses_blocking_an_unknown_name():
    with pytest.raises(PluginLoadError) as e:
        load_plugins(block=["metrics", "balancnig"])
    assert "['balancnig']" in str(e.value) and "Installed plugins:" in str(e.value)
    for name in FIRST_PARTY:
        assert name in str(e.value)
    # what can be blocked: installed plugins, dotted paths and plugins registered in code
    assert "metrics" not in load_plugins(block=["metrics"]).names()
    assert load_plugins([], dotted_paths=["slime_router_core.hookspecs"], block=["slime_router_core.hookspecs"]
                        ).names() == ["core"]
    assert load_plugins([], extra=[("mine", object())], block=["mine"]).names() == ["core"]


# --------------------------------------------------------------------------- 6c: enumerated option values

BAD_VALUES = [("--openai-reasoning-parser", "qwen", ("qwen3", "none")),
              ("--openai-tool-parser", "hermes", ("qwen", "none")),
              ("--openai-history", "exact", ("template", "raw"))]


@pytest.mark.parametrize("flag,value,valid", BAD_VALUES)
def test_unknown_option_value_is_an_error_naming_the_valid_ones(flag, value, valid):
    r = _run(["serve", flag, value, *NO_SUCH_CHECKPOINT])
    assert r.returncode == 2
    err = " ".join(r.stderr.replace("│", " ").split())  # rich wraps the message in a box
    assert flag in err and repr(value) in err
    assert all(repr(v) in err for v in valid), err
    assert "no such directory" not in err


def test_unknown_option_value_from_the_environment_is_an_error_too():
    r = _run(["serve", *NO_SUCH_CHECKPOINT], SLIME_ROUTER_OPENAI_REASONING_PARSER="deepseek")
    assert r.returncode == 2
    err = " ".join(r.stderr.replace("│", " ").split())
    assert "--openai-reasoning-parser" in err and "'deepseek'" in err and "'qwen3'" in err


def test_valid_option_values_pass_option_parsing():
    r = _run(["serve", "--openai-reasoning-parser", "none", "--openai-tool-parser", "none", "--openai-history", "raw",
              *NO_SUCH_CHECKPOINT])
    assert r.returncode == 2 and "/no/such/checkpoint/dir: no such directory" in r.stderr  # the next check


def test_help_lists_the_valid_values():
    r = _run(["serve", "--help"])
    assert r.returncode == 0
    assert re.search(r"qwen3\|none", r.stdout) and re.search(r"qwen\|none", r.stdout)
    assert re.search(r"template\|raw", r.stdout)


@pytest.mark.parametrize("flag,value,valid", BAD_VALUES)
def test_build_app_refuses_an_unknown_value_given_in_code(flag, value, valid):
    dest = flag.lstrip("-").replace("-", "_")
    settings = Settings(hf_checkpoint=BUILTIN_CHECKPOINT, extra={dest: value})
    with pytest.raises(ValueError) as e:
        build_app(settings, load_plugins(["openai_compat"]))
    assert flag in str(e.value) and repr(value) in str(e.value)
    assert all(v in str(e.value) for v in valid)


def test_option_registry_choices():
    reg = OptionRegistry(owner="p")
    reg.add("--p-mode", default="a", choices=["a", "b"])
    assert reg.options["p_mode"].choices == ("a", "b")
    with pytest.raises(ValueError, match="not one of its choices"):
        reg.add("--p-other", default="c", choices=["a", "b"])
    s = Settings(extra={"p_mode": "b"}).with_defaults(reg)
    assert s.p_mode == "b"
    with pytest.raises(ValueError, match="Invalid value for --p-mode: 'z'. Valid values: a, b"):
        Settings(extra={"p_mode": "z"}).with_defaults(reg)
