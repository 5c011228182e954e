"""Helpers for tests, demos and plugin authors: real servers on free loopback ports.

- ``ServerThread``: serve any ASGI app with uvicorn in a background thread (own event loop).
- ``start_mock_worker_process``: the bundled mock SGLang worker in a separate process.
- ``start_router``: build a router app from settings and plugins and serve it in a thread.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}")
        try:  # the standard library: a readiness poll needs no HTTP client dependency
            with urllib.request.urlopen(url, timeout=1.0):
                return
        except urllib.error.HTTPError as e:
            if e.code < 500:
                return
            last = e
        except OSError as e:  # refused, reset, timed out (URLError is an OSError)
            last = e
        time.sleep(0.05)
    raise TimeoutError(f"{url} not up after {timeout}s: {last}")


class ServerThread:
    """uvicorn serving ``app`` on 127.0.0.1:``port`` in a daemon thread."""

    def __init__(self, app: Any, port: int | None = None, host: str = "127.0.0.1") -> None:
        import uvicorn

        from slime_router_core.server import http_protocol

        self.host = host
        self.port = port or free_port()
        self.url = f"http://{host}:{self.port}"
        config = uvicorn.Config(app, host=host, port=self.port, log_level="warning", lifespan="on",
                                loop="asyncio", http=http_protocol(), timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True, name=f"uvicorn-{self.port}")

    def start(self, timeout: float = 30.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError(f"server on port {self.port} failed to start")
            if time.monotonic() > deadline:
                raise TimeoutError(f"server on port {self.port} not started after {timeout}s")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _die_with_parent() -> None:
    """In the child (Linux): get SIGTERM when the parent dies, so no mock worker outlives its router."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # pragma: no cover - not Linux: the parent stops its workers itself
        pass


def stop_process_group(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM a process started with ``start_new_session=True``, wait for it, then SIGKILL whatever is left of
    its process group (children it should have stopped itself)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class WorkerProcess:
    def __init__(self, proc: subprocess.Popen, port: int) -> None:
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def start_mock_worker_process(port: int | None = None, hf_checkpoint: str | None = None, wait: bool = True,
                              **knobs: Any) -> WorkerProcess:
    """Start ``python -m slime_router_testing.mock_worker`` on a free port; knobs become ``--flags``."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "slime_router_testing.mock_worker", "--host", "127.0.0.1", "--port", str(port)]
    if hf_checkpoint:
        cmd += ["--hf-checkpoint", hf_checkpoint]
    for key, value in knobs.items():
        if value is None or value is False:
            continue
        cmd.append("--" + key.replace("_", "-"))
        if value is not True:
            cmd.append(str(value))
    proc = subprocess.Popen(cmd, env=dict(os.environ), stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
    worker = WorkerProcess(proc, port)
    if wait:
        wait_http(worker.url + ready_path(knobs.get("engine")), proc=proc)
    return worker


def ready_path(engine: str | None) -> str:
    """The path that answers once a mock worker of ``engine`` (``--engine``) serves."""
    return "/health" if engine == "vllm" else "/get_model_info"


def start_router(settings: Any = None, plugins: list[str] | None = None, block: list[str] | None = None,
                 extra: list[tuple[str, Any]] | None = None, port: int | None = None,
                 **settings_kw: Any) -> ServerThread:
    """Build and serve a router. ``plugins=None`` loads every installed plugin, ``[]`` none."""
    from slime_router_core.app import build_app
    from slime_router_core.plugins import load_plugins
    from slime_router_core.settings import Settings

    settings = settings or Settings(**settings_kw)
    pm = load_plugins(plugins, block, extra=extra)
    app = build_app(settings, pm)
    server = ServerThread(app, port=port)
    server.app = app  # type: ignore[attr-defined]
    return server.start()
