"""Issue 13, defect 5: a bounded graceful shutdown, and a second signal exits now.

A real ``slime-router serve`` process in front of a mock worker that streams slowly: the first
SIGTERM lets running requests go on for ``--shutdown-grace-seconds``, then closes what is still open
(the worker's generation is aborted) and exits 0; a second SIGTERM or SIGINT (Ctrl-C twice) exits at
once with 128+signal and no traceback. The tests wait for events and exit codes; the only clock
assertion is a lower bound (the drain lasted at least the grace period).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from slime_router_testing import free_port, wait_http

pytestmark = pytest.mark.slow

LONG = {"max_new_tokens": 100_000}  # at 0.05 s a token: far longer than any test waits


class Router:
    """``slime-router serve`` in a subprocess, its output in files."""

    def __init__(self, tmp_path: Path, worker_url: str, grace: float | None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ)
        if grace is not None:  # the flag's environment variable (old code ignores it instead of refusing it)
            env["SLIME_ROUTER_SHUTDOWN_GRACE_SECONDS"] = str(grace)
        self.err_path = tmp_path / f"router-{self.port}.err"
        self.out = open(tmp_path / f"router-{self.port}.out", "w")  # noqa: SIM115 - closed by close()
        self.err = open(self.err_path, "w")  # noqa: SIM115 - closed by close()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "slime_router_core.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
             "--worker-url", worker_url, "--plugin", "balancing"],
            env=env, stdin=subprocess.DEVNULL, stdout=self.out, stderr=self.err, start_new_session=True)
        wait_http(self.url + "/health", timeout=120, proc=self.proc)

    def stderr(self) -> str:
        self.err.flush()
        return self.err_path.read_text()

    def listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.out.close()
        self.err.close()


class Stream:
    """A streamed /generate in a thread: every SSE line as it arrives, and how the stream ended."""

    def __init__(self, url: str, sampling_params: dict[str, Any]) -> None:
        self.lines: list[str] = []
        self.first = threading.Event()
        self.error: BaseException | None = None
        self.body = {"text": "Tell me a long story", "stream": True, "sampling_params": sampling_params}
        self.thread = threading.Thread(target=self._run, args=(url,), daemon=True)
        self.thread.start()

    def _run(self, url: str) -> None:
        try:
            with httpx.stream("POST", url + "/generate", json=self.body, timeout=httpx.Timeout(120.0)) as resp:
                for line in resp.iter_lines():
                    if line.startswith("data:"):
                        self.lines.append(line)
                        self.first.set()
        except BaseException as e:  # noqa: BLE001 - recorded for the test to look at
            self.error = e
        finally:
            self.first.set()

    @property
    def done(self) -> bool:
        return bool(self.lines) and self.lines[-1].strip() == "data: [DONE]"


def _wait(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def _worker_stats(worker: Any) -> dict[str, Any]:
    return httpx.get(worker.url + "/mock/stats", timeout=5).json()


@pytest.fixture
def slow_worker(mock_worker_process):
    return mock_worker_process(token_latency=0.05, stop_at_eos=0.0)


@pytest.fixture
def routers(tmp_path):
    started: list[Router] = []

    def make(worker_url: str, grace: float | None = None) -> Router:
        r = Router(tmp_path, worker_url, grace)
        started.append(r)
        return r

    yield make
    for r in started:
        r.close()


def test_sigterm_drains_for_the_grace_period_then_closes_open_streams_and_exits(slow_worker, routers):
    grace = 2.0
    r = routers(slow_worker.url, grace=grace)
    stream = Stream(r.url, LONG)
    assert stream.first.wait(60) and stream.lines, stream.error
    signalled = time.monotonic()
    r.proc.send_signal(signal.SIGTERM)
    at_signal = len(stream.lines)
    _wait(lambda: not r.listening(), 30, "the router to stop accepting connections")
    try:
        code = r.proc.wait(timeout=60)  # before the fix: the stream held the shutdown for as long as it lasted
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running 60 s after SIGTERM with --shutdown-grace-seconds {grace}") from None
    elapsed = time.monotonic() - signalled
    assert code == 0, r.stderr()
    assert elapsed >= grace * 0.9  # it did drain: running requests had the grace period
    stream.thread.join(30)
    assert not stream.thread.is_alive()
    assert len(stream.lines) > at_signal  # the stream went on during the drain ...
    assert not stream.done and stream.error is not None  # ... and was closed at the end of it
    # closing the client's stream closed the upstream one: the worker aborted the generation
    _wait(lambda: _worker_stats(slow_worker)["in_flight"] == 0, 30, "the worker's generation to end")
    assert _worker_stats(slow_worker)["aborted"] >= 1
    err = r.stderr()
    assert "grace period of 2s over" in err and "Traceback" not in err, err


def test_a_stream_that_ends_within_the_grace_period_completes_and_the_exit_is_clean(slow_worker, routers):
    r = routers(slow_worker.url, grace=120)
    stream = Stream(r.url, {"max_new_tokens": 40})  # about 2 s
    assert stream.first.wait(60) and stream.lines, stream.error
    r.proc.send_signal(signal.SIGTERM)
    _wait(lambda: not r.listening(), 30, "the router to stop accepting connections")
    assert r.proc.wait(timeout=60) == 0, r.stderr()
    stream.thread.join(30)
    assert stream.done and stream.error is None
    assert "Traceback" not in r.stderr()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_second_signal_exits_at_once_without_a_traceback(slow_worker, routers, sig):
    r = routers(slow_worker.url, grace=600)  # the drain alone would take ten minutes
    stream = Stream(r.url, LONG)
    assert stream.first.wait(60) and stream.lines, stream.error
    r.proc.send_signal(sig)
    _wait(lambda: not r.listening(), 30, "the first signal to start the shutdown")
    assert r.proc.poll() is None  # draining the open stream
    r.proc.send_signal(sig)
    try:
        code = r.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"a second {sig.name} did not make the router exit") from None
    err = r.stderr()
    assert "Traceback" not in err and "CancelledError" not in err, err
    assert code == 128 + sig, err
    stream.thread.join(30)
    assert not stream.done and stream.error is not None
    _wait(lambda: _worker_stats(slow_worker)["in_flight"] == 0, 30, "the worker's generation to end")


def test_the_flag_is_declared_with_its_default(tmp_path):
    out = subprocess.run([sys.executable, "-m", "slime_router_core.cli", "serve", "--help"], capture_output=True,
                         text=True, timeout=120, env=dict(os.environ, COLUMNS="200"), check=False)
    assert out.returncode == 0 and "--shutdown-grace-seconds" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "slime_router_core.cli", "serve", "--shutdown-grace-seconds", "-1"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode == 2 and "shutdown-grace-seconds" in bad.stderr
