"""``slime-router serve --replicas N``: N router processes on one machine, one public port.

The parent process serves nothing itself. It starts N children, each ``slime-router serve`` with the parent's own
command line unchanged plus:

- ``--reuse-port-listen HOST:PORT``: the child also listens on the public address with ``SO_REUSEPORT`` (Linux):
  the kernel spreads incoming connections over the children;
- ``--host 127.0.0.1 --port P_i --replica-url http://127.0.0.1:P_i``: its private address, how its peers reach it;
- ``--replica-peers`` (every child's private URL) and ``--replica-routing proxy``: a session's request that lands on a
  child that does not own the session is forwarded once to its owner (the replicas plugin's rendezvous hash over
  the live replicas), so every session is served by one process whatever connection it came in on.

A child that dies is restarted on the same ports (its sessions go back to it once it answers again; meanwhile
their requests are served by the others). SIGTERM / SIGINT are forwarded: the children drain
(``--shutdown-grace-seconds``) and the parent exits 0 when they are gone; a second signal is forwarded too (the
children stop at once). The embedded demo (no ``--worker-url``, no ``--hf-checkpoint``) starts its mock workers once,
in the parent, and every child routes to them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

RESTART_BACKOFF_SECONDS = (0.5, 1.0, 2.0, 5.0)  # between restarts of a child that keeps dying (reset once it serves)
READY_TIMEOUT_SECONDS = 180.0  # a child that never answers its /health within this stops the launch


def check_platform() -> str | None:
    """Why ``--replicas`` cannot run here (None: it can)."""
    if not sys.platform.startswith("linux") or not hasattr(socket, "SO_REUSEPORT"):
        return (f"--replicas needs Linux (SO_REUSEPORT spreads the connections of one port over the replicas); "
                f"this is {sys.platform}. Run several `slime-router serve` processes behind a load balancer instead "
                f"(deploy/haproxy/haproxy.cfg, docs/scale-out.md)")
    return None


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` with SO_REUSEPORT (and SO_REUSEADDR): every process that binds the same
    address this way shares it, the kernel spreading new connections over those that listen."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def split_address(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT``) → (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{value!r}: expected HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


@dataclass
class Child:
    index: int
    port: int  # private
    cmd: list[str]
    proc: subprocess.Popen | None = None
    ready: bool = False  # answered /health since its last start
    served: bool = False  # answered at least once, ever
    restarts: int = 0
    failures: int = 0  # consecutive deaths before serving
    next_start: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Launcher:
    """The parent of ``--replicas N``: ``run()`` until stopped; ``children`` hold the commands and processes."""

    replicas: int
    args: list[str]  # the serve command line as given (after "serve")
    host: str
    port: int
    routing: str = "proxy"
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    out: Any = print
    children: list[Child] = field(default_factory=list)
    signals: list[int] = field(default_factory=list)
    demo: list[Any] = field(default_factory=list)  # the embedded demo's mock workers (started here, shared)

    def plan(self, extra: list[str] | None = None) -> None:
        ports = [_free_port() for _ in range(self.replicas)]
        peers = ",".join(f"http://127.0.0.1:{p}" for p in ports)
        shown = f"[{self.host}]" if ":" in self.host else self.host
        for i, p in enumerate(ports):
            cmd = [sys.executable, "-m", "slime_router_core.cli", "serve", *self.args, *(extra or []),
                   # appended: the last occurrence of a flag wins
                   "--replicas", "1", "--reuse-port-listen", f"{shown}:{self.port}",
                   "--host", "127.0.0.1", "--port", str(p), "--replica-url", f"http://127.0.0.1:{p}",
                   "--replica-peers", peers, "--replica-routing", self.routing]
            self.children.append(Child(i, p, cmd))

    def start(self, child: Child) -> None:
        env = dict(self.env)
        env.pop("SLIME_ROUTER_REPLICAS", None)
        env.pop("SLIME_ROUTER_PORT", None)
        env.pop("SLIME_ROUTER_HOST", None)
        child.proc = subprocess.Popen(child.cmd, env=env, stdin=subprocess.DEVNULL, start_new_session=True,
                                      preexec_fn=_die_with_parent)
        child.ready = False
        self.out(f"replica {child.index} (pid {child.proc.pid}, {child.url}): {_shell(child.cmd)}")

    def _healthy(self, child: Child) -> bool:
        try:
            with urllib.request.urlopen(child.url + "/health", timeout=1.0) as r:
                return 200 <= r.status < 300
        except (OSError, urllib.error.URLError):
            return False

    def _on_signal(self, sig: int, frame: Any) -> None:
        self.signals.append(sig)
        for c in self.children:
            if c.proc is not None and c.proc.poll() is None:
                try:
                    c.proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass

    def run(self) -> int:
        """Start every child, supervise them until a signal; the exit code."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        for c in self.children:
            self.start(c)
        started = time.monotonic()
        announced = False
        while not self.signals:
            now = time.monotonic()
            for c in self.children:
                if self.signals:
                    break
                assert c.proc is not None
                code = c.proc.poll()
                if code is None:
                    if not c.ready and self._healthy(c):
                        c.ready = c.served = True
                        c.failures = 0
                        if announced:
                            self.out(f"replica {c.index} is back ({c.url})")
                    elif not c.served and now - started > READY_TIMEOUT_SECONDS:
                        self.out(f"Error: replica {c.index} did not answer {c.url}/health within "
                                 f"{READY_TIMEOUT_SECONDS:g}s; stopping")
                        return self.stop(3)
                    continue
                if self.signals:
                    break
                if not c.served:  # never came up: its command line is wrong (the others' is the same)
                    self.out(f"Error: replica {c.index} exited with code {code} before serving (see its output "
                             f"above); stopping")
                    return self.stop(3)
                if c.next_start == 0.0:  # just found dead: restart after a pause that grows while it keeps dying
                    c.failures = 0 if c.ready else c.failures + 1
                    c.ready = False
                    c.next_start = now + RESTART_BACKOFF_SECONDS[min(c.failures, len(RESTART_BACKOFF_SECONDS) - 1)]
                    self.out(f"replica {c.index} (pid {c.proc.pid}) exited with code {code}; restarting it on "
                             f"{c.url}")
                if now >= c.next_start:
                    c.restarts += 1
                    c.next_start = 0.0
                    self.start(c)
            if not announced and all(c.ready for c in self.children):
                announced = True
                shown = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
                self.out(f"slime-router: {self.replicas} replicas serving on http://{shown}:{self.port} "
                         f"(SO_REUSEPORT; private URLs {', '.join(c.url for c in self.children)}; "
                         f"--replica-routing {self.routing})")
            time.sleep(0.1)
        return self.stop(0)

    def stop(self, code: int) -> int:
        """SIGTERM every child (unless a signal to the parent was forwarded already: a second SIGTERM would cut
        their drain short), wait until all are gone; ``code``."""
        for c in self.children:
            if not self.signals and c.proc is not None and c.proc.poll() is None:
                try:
                    c.proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for c in self.children:
            if c.proc is None:
                continue
            while c.proc.poll() is None:  # each child bounds its own shutdown (a second signal: at once)
                try:
                    c.proc.wait(timeout=0.2)
                except subprocess.TimeoutExpired:
                    continue
            try:
                os.killpg(c.proc.pid, signal.SIGKILL)  # whatever it left behind
            except (ProcessLookupError, PermissionError):
                pass
        for w in self.demo:
            w.stop()
        return code


def _shell(cmd: list[str]) -> str:
    import shlex

    shown = ["slime-router", *cmd[3:]] if cmd[1:3] == ["-m", "slime_router_core.cli"] else cmd
    return " ".join(shlex.quote(c) for c in shown)


def serve_replicas(replicas: int, argv: list[str], *, host: str, port: int, plugin_names: list[str],
                   worker_urls: list[str], hf_checkpoint: str | None, demo_workers: int = 2,
                   demo_engine: str = "sglang", out: Any = print) -> int:
    """Run ``replicas`` children of ``slime-router serve`` (``argv``: the serve arguments as given). Returns the exit
    code; errors that stop it before anything starts are raised as ValueError."""
    why = check_platform()
    if why:
        raise ValueError(why)
    if "replicas" not in plugin_names:
        raise ValueError("--replicas needs the replicas plugin (it is blocked or not selected: add --plugin replicas "
                         "or remove --no-plugin replicas)")
    routing = _flag_value(argv, "--replica-routing") or os.environ.get("SLIME_ROUTER_REPLICA_ROUTING") or "proxy"
    if routing == "lb":
        raise ValueError("--replicas N with --replica-routing lb: the kernel spreads connections over the replicas "
                         "without looking at sessions, so a replica must forward what it does not own: use proxy "
                         "(the default here) or redirect")
    try:
        reserved = reuse_port_socket(host, port)  # the public port: checked free now, 0 resolved, held till exit
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    launcher = Launcher(replicas, list(argv), host, reserved.getsockname()[1], routing=routing, out=out)
    extra: list[str] = []
    try:
        if not worker_urls and not hf_checkpoint:  # the embedded demo: its mock workers once, for every replica
            extra = _start_demo(launcher, demo_workers, demo_engine)
        launcher.plan(extra)
        return launcher.run()
    finally:
        for w in launcher.demo:
            w.stop()
        reserved.close()


def _start_demo(launcher: Launcher, n: int, engine: str) -> list[str]:
    from slime_router_core.cli import demo_worker_knobs
    from slime_router_core.tokenizers import BUILTIN_CHECKPOINT
    from slime_router_testing import start_mock_worker_process, wait_http
    from slime_router_testing.servers import ready_path

    procs = [start_mock_worker_process(hf_checkpoint=BUILTIN_CHECKPOINT, wait=False, engine=engine,
                                       **demo_worker_knobs(i)) for i in range(n)]
    launcher.demo.extend(procs)
    for p in procs:
        wait_http(p.url + ready_path(engine), timeout=120, proc=p.proc)
    launcher.out(f"embedded demo: {n} mock {engine} workers shared by the replicas: "
                 f"{', '.join(p.url for p in procs)}")
    extra = ["--hf-checkpoint", BUILTIN_CHECKPOINT]
    for p in procs:
        extra += ["--worker-url", p.url]
    return extra


def _flag_value(argv: list[str], flag: str) -> str | None:
    value = None
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value
