"""A real HAProxy in front of router replicas, for tests and benchmarks: the shipped configuration
(``deploy/haproxy/haproxy.cfg``) rendered with the given backend URLs and a free port, run in the foreground
(``haproxy -db``) from a temporary directory, stopped with its process group.

    with start_haproxy(["http://127.0.0.1:31001", "http://127.0.0.1:31002"]) as lb:
        httpx.post(lb.url + "/generate", headers={"X-Session-ID": "ep-1"}, json=...)
        lb.server_states()      # {"by_session": {"r0": "UP", "r1": "DOWN"}, "any_replica": {...}}

Rendering keeps everything of the template but: the frontend's ``bind`` (one, on 127.0.0.1 and the port), each
backend's ``server`` lines (``r0``, ``r1``, ... at the given addresses, in that order: the consistent hash ring is
built on the servers' ids, which follow their order, so a replica keeps its place on the ring across restarts),
the runtime API socket (in the temporary directory), and the settings given in ``overrides`` (a keyword's whole
line, e.g. ``{"hash-balance-factor": "0"}``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .servers import free_port

REPO_CONFIG = Path(__file__).resolve().parent.parent / "deploy" / "haproxy" / "haproxy.cfg"


def haproxy_binary() -> str | None:
    return shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy")
                                            if os.path.exists(p)), None)


def _address(url: str) -> str:
    u = urlsplit(url if "//" in url else "http://" + url)
    if not u.hostname or not u.port:
        raise ValueError(f"backend {url!r}: give host and port (http://HOST:PORT)")
    host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
    return f"{host}:{u.port}"


def render_config(template: str, backends: list[str], port: int, stats_socket: str,
                  overrides: dict[str, str] | None = None, host: str = "127.0.0.1") -> str:
    """The template with its frontend bound to ``host:port``, every backend's servers replaced by ``backends``
    (named r0, r1, ...), the runtime API on ``stats_socket`` and each ``overrides`` keyword's line replaced (in
    every section where it occurs)."""
    if not backends:
        raise ValueError("at least one backend")
    servers = [f"server r{i} {_address(b)}" for i, b in enumerate(backends)]
    overrides = dict(overrides or {})
    out: list[str] = []
    section = ""
    bound = False
    for line in template.splitlines():
        stripped = line.strip()
        indent = line[: len(line) - len(line.lstrip())]
        word = stripped.split(None, 1)[0] if stripped and not stripped.startswith("#") else ""
        if line and not line[0].isspace() and word:
            section = word
            out.append(line)
            if section == "global":
                out.append(f"    stats socket {stats_socket} mode 600 level admin")
            continue
        if word == "stats" and stripped.startswith("stats socket"):
            continue  # ours replaces it
        if section == "frontend" and word == "bind":
            if not bound:
                out.append(f"{indent}bind {host}:{port}")
                bound = True
            continue
        if section == "backend" and word == "server":
            if servers and not out[-1].lstrip().startswith("server "):
                out.extend(f"{indent}{s}" for s in servers)
            continue
        if word in overrides:
            out.append(f"{indent}{word} {overrides[word]}")
            continue
        out.append(line)
    if not bound:
        raise ValueError("the template has no frontend with a bind line")
    return "\n".join(out) + "\n"


class HAProxy:
    """A running HAProxy: ``url`` (its frontend), ``config`` (the rendered text), ``server_states()``, ``stop()``."""

    def __init__(self, proc: subprocess.Popen, port: int, tmpdir: str, config: str, host: str = "127.0.0.1"):
        self.proc = proc
        self.port = port
        self.host = host
        self.url = f"http://{host}:{port}"
        self.tmpdir = tmpdir
        self.config = config
        self.socket_path = os.path.join(tmpdir, "admin.sock")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def command(self, cmd: str, timeout: float = 5.0) -> str:
        """One command on the runtime API (``show stat``, ``set server by_session/r0 state drain``...)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(self.socket_path)
            s.sendall(cmd.encode() + b"\n")
            chunks = []
            while True:
                data = s.recv(65536)
                if not data:
                    break
                chunks.append(data)
        return b"".join(chunks).decode(errors="replace")

    def server_states(self) -> dict[str, dict[str, str]]:
        """Per backend, per server: its status as HAProxy sees it (UP, DOWN, "UP 1/2", MAINT, ...)."""
        lines = self.command("show stat").splitlines()
        if not lines or not lines[0].startswith("# "):
            raise RuntimeError(f"unexpected answer to show stat: {lines[:2]}")
        head = lines[0][2:].split(",")
        out: dict[str, dict[str, str]] = {}
        for line in lines[1:]:
            if not line.strip():
                continue
            row = dict(zip(head, line.split(",")))
            if row.get("svname") not in ("FRONTEND", "BACKEND"):
                out.setdefault(row["pxname"], {})[row["svname"]] = row.get("status", "")
        return out

    def wait_states(self, want: dict[str, str], timeout: float = 30.0) -> None:
        """Wait until every server named in ``want`` (``{"r1": "DOWN"}``) has that status in every backend."""
        deadline = time.monotonic() + timeout
        states: dict[str, dict[str, str]] = {}
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"haproxy exited with {self.proc.returncode}: {self.log()}")
            states = self.server_states()
            if states and all(backend.get(name, "").split()[0:1] == [status]
                              for backend in states.values() for name, status in want.items()):
                return
            time.sleep(0.05)
        raise TimeoutError(f"haproxy servers not {want} after {timeout}s: {states}")

    def log(self) -> str:
        try:
            return Path(self.tmpdir, "haproxy.log").read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)  # -db: SIGTERM stops at once
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def __enter__(self) -> HAProxy:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def start_haproxy(backends: list[str], port: int | None = None, config: str | Path | None = None,
                  overrides: dict[str, str] | None = None, timeout: float = 30.0,
                  wait_up: bool = True) -> HAProxy:
    """Start HAProxy on a free port (or ``port``) in front of ``backends`` (``http://host:port`` each), from the
    shipped configuration (or the template file ``config``); returns once it answers (and, with ``wait_up``,
    once its health checks see every backend UP)."""
    exe = haproxy_binary()
    if exe is None:
        raise RuntimeError("haproxy is not installed (Debian/Ubuntu: apt-get install haproxy)")
    path = Path(config) if config is not None else REPO_CONFIG
    if not path.exists():
        raise FileNotFoundError(f"{path}: no HAProxy configuration template (the shipped one is "
                                f"deploy/haproxy/haproxy.cfg in the repository; pass config=...)")
    tmpdir = tempfile.mkdtemp(prefix="slime-haproxy-")
    port = port or free_port()
    text = render_config(path.read_text(), backends, port, os.path.join(tmpdir, "admin.sock"), overrides)
    cfg = Path(tmpdir, "haproxy.cfg")
    cfg.write_text(text)
    check = subprocess.run([exe, "-c", "-q", "-f", str(cfg)], capture_output=True, text=True, timeout=30)
    if check.returncode != 0:
        shutil.rmtree(tmpdir, ignore_errors=True)
        raise RuntimeError(f"haproxy rejects the rendered configuration: {check.stdout}{check.stderr}")
    log = open(Path(tmpdir, "haproxy.log"), "wb")
    try:
        proc = subprocess.Popen([exe, "-db", "-f", str(cfg)], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, cwd=tmpdir)
    finally:
        log.close()
    lb = HAProxy(proc, port, tmpdir, text)
    try:
        _wait_listening(lb, timeout)
        if wait_up:
            lb.wait_states({f"r{i}": "UP" for i in range(len(backends))}, timeout)
    except BaseException:
        lb.stop()
        raise
    return lb


def _wait_listening(lb: HAProxy, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if lb.proc.poll() is not None:
            raise RuntimeError(f"haproxy exited with {lb.proc.returncode}: {lb.log()}")
        try:
            with socket.create_connection((lb.host, lb.port), timeout=1.0):
                pass
            if os.path.exists(lb.socket_path):
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"haproxy not listening on {lb.url} after {timeout}s: {lb.log()}")
