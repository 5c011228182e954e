"""Router replicas as Ray actors, behind a load balancer (the optional extra ``ray``: ``pip install
'slime-router[ray]'``).

    import ray
    from slime_router_plugins.replicas.ray_launcher import launch_replicas

    ray.init(address="auto")
    urls = launch_replicas(3, ["--worker-url", "http://gpu-1:30001", "--hf-checkpoint", "/models/Qwen3-4B"])
    # -> ["http://10.0.0.5:31000", "http://10.0.0.6:31001", "http://10.0.0.7:31002"]: put them behind HAProxy
    #    (haproxy_servers(urls) / write_haproxy_config(urls, "haproxy.cfg")), Envoy or nginx (docs/scale-out.md)

or from a shell, in the foreground until Ctrl-C (then the replicas are stopped)::

    python -m slime_router_plugins.replicas.ray_launcher --replicas 3 --address auto --port 31000 \\
        --haproxy-config /etc/haproxy/haproxy.cfg -- --worker-url http://gpu-1:30001 --hf-checkpoint /models/Qwen3-4B

Replica ``i`` is the actor ``{name}-{i}`` in ``namespace`` (``max_restarts=-1``: Ray restarts it whenever it or its
node dies; scheduling strategy ``SPREAD``: one per node while nodes last). The actor runs ``slime-router serve
<router_args> --host 0.0.0.0 --port {port + i} --replica-url http://{node ip}:{port + i}`` as its child process
(killed with the actor: ``PR_SET_PDEATHSIG``) and reports its URL. A replica restarted on the same node comes back
on the same URL, so the load balancer's consistent hash (keyed by server order) and the peers' rendezvous hash give
it back the same sessions. Membership is the set of named actors (``ray.util.list_named_actors``): the launcher
sets every replica's peers (``PUT /replicas/peers``) once all are up, and a restarted actor announces itself again
the same way to every live replica. Routing defaults to ``--replica-routing lb`` (the balancer sends a session's
requests to one replica); pass ``--replica-routing proxy`` in ``router_args`` for a balancer that does not hash
sessions.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any

log = logging.getLogger("slime_router.replicas.ray")

DEFAULT_NAME = "slime-router"
DEFAULT_NAMESPACE = "slime-router"
DEFAULT_PORT = 31000
EXTRA_HINT = "pip install 'slime-router[ray]'"
# The driver's handles of the replica actors it launched, by (namespace, name): a non-detached actor lives as long
# as a handle to it does (Ray's reference counting), so they are kept here until stop_replicas().
_HANDLES: dict[tuple[str, str], list[Any]] = {}


def _ray() -> Any:
    try:
        import ray
    except ImportError as e:  # pragma: no cover - the extra is installed in the test environment
        raise RuntimeError(f"The Ray launcher needs Ray: {EXTRA_HINT} ({e})") from None
    return ray


# --- the replica, inside its actor -------------------------------------------------------------------------


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: gone with the actor
    except Exception:
        pass


def _http(method: str, url: str, body: Any = None, timeout: float = 5.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        raw = r.read()
    return json.loads(raw) if raw else None


def _flag_given(args: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


class Replica:
    """One router replica: the body of the Ray actor (``ray.remote(...)(Replica)``; usable without Ray too).

    ``__init__`` starts the router and waits until it answers; on a restart by Ray (the actor died) it then
    announces itself to every live replica in a background thread."""

    def __init__(self, index: int, router_args: list[str], port: int, name: str = DEFAULT_NAME,
                 namespace: str = DEFAULT_NAMESPACE, startup_timeout: float = 180.0, host: str | None = None):
        self.index = index
        self.name = name
        self.namespace = namespace
        self.port = port
        self.host = host or _node_ip()
        self.url_ = f"http://{self.host}:{port}"
        self.args = list(router_args)
        self.proc: subprocess.Popen | None = None
        self._start(startup_timeout)
        if _reconstructed():
            threading.Thread(target=self._announce, name="announce", daemon=True).start()

    def _command(self) -> list[str]:
        cmd = [sys.executable, "-m", "slime_router_core.cli", "serve", *self.args,
               "--host", "0.0.0.0", "--port", str(self.port), "--replica-url", self.url_]
        if not _flag_given(self.args, "--replica-routing"):
            cmd += ["--replica-routing", "lb"]
        if not _flag_given(self.args, "--replica-peers"):
            cmd += ["--replica-peers", self.url_]  # the launcher (or its own announcement) sets the others
        return cmd

    def _start(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        cmd = self._command()
        while True:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=_die_with_parent)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    _http("GET", self.url_ + "/health", timeout=1.0)
                    return
                except (OSError, ValueError):
                    time.sleep(0.1)
            code = self.proc.poll()
            if code is None:
                self.stop()
                raise TimeoutError(f"replica {self.index}: {self.url_} did not answer within {timeout:g}s")
            # exit code 1: the port is still held (the previous incarnation, killed with the old actor, is going)
            if code != 1 or time.monotonic() >= deadline:
                raise RuntimeError(f"replica {self.index}: the router exited with code {code}: {' '.join(cmd)}")
            time.sleep(0.5)

    def _announce(self) -> None:
        """Tell every live replica (and itself) the current membership, until one round succeeds."""
        for _ in range(30):
            try:
                urls = membership(self.name, self.namespace, own=(f"{self.name}-{self.index}", self.url_))
                if set_peers(urls) == len(urls):
                    return
            except Exception as e:  # noqa: BLE001 - retried; Ray or a peer may be restarting too
                log.warning("replica %d: announcing itself failed (%s); retrying", self.index, e)
            time.sleep(1.0)

    # actor methods
    def url(self) -> str:
        return self.url_

    def info(self) -> dict[str, Any]:
        return {"index": self.index, "url": self.url_, "pid": self.proc.pid if self.proc else None,
                "actor_pid": os.getpid(), "alive": self.proc is not None and self.proc.poll() is None}

    def set_peers(self, urls: list[str]) -> Any:
        return _http("PUT", self.url_ + "/replicas/peers", {"peers": list(urls)})

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _node_ip() -> str:
    try:
        return str(_ray().util.get_node_ip_address())
    except Exception:  # noqa: BLE001 - outside Ray
        return "127.0.0.1"


def _reconstructed() -> bool:
    try:
        return bool(_ray().get_runtime_context().was_current_actor_reconstructed)
    except Exception:  # noqa: BLE001 - outside an actor
        return False


# --- the driver's side ----------------------------------------------------------------------------------------


def replica_names(name: str = DEFAULT_NAME, namespace: str = DEFAULT_NAMESPACE) -> list[str]:
    """The named actors of the replicas (``{name}-{i}`` in ``namespace``), in index order."""
    ray = _ray()
    pattern = re.compile(re.escape(name) + r"-(\d+)")
    found = []
    for entry in ray.util.list_named_actors(all_namespaces=True):
        n, ns = (entry.get("name"), entry.get("namespace")) if isinstance(entry, dict) else (entry, namespace)
        m = pattern.fullmatch(n or "")
        if m and ns == namespace:
            found.append((int(m.group(1)), str(n)))
    return [n for _, n in sorted(found)]


def membership(name: str = DEFAULT_NAME, namespace: str = DEFAULT_NAMESPACE, timeout: float = 10.0,
               own: tuple[str, str] | None = None) -> list[str]:
    """The URLs of the replicas that answer now (named actors asked for their URL; ``own``: (name, url) of the
    caller, not asked)."""
    ray = _ray()
    names = replica_names(name, namespace)
    refs = {}
    urls: dict[str, str] = {}
    for n in names:
        if own is not None and n == own[0]:
            urls[n] = own[1]
            continue
        try:
            refs[n] = ray.get_actor(n, namespace=namespace).url.remote()
        except ValueError:  # gone between the listing and now
            continue
    for n, ref in refs.items():
        try:
            urls[n] = ray.get(ref, timeout=timeout)
        except Exception:  # noqa: BLE001 - dead or restarting: not a member now
            continue
    return [urls[n] for n in names if n in urls]


def set_peers(urls: list[str], timeout: float = 5.0) -> int:
    """``PUT /replicas/peers {"peers": urls}`` on every replica of ``urls``; how many accepted."""
    ok = 0
    for u in urls:
        try:
            _http("PUT", u + "/replicas/peers", {"peers": list(urls)}, timeout=timeout)
            ok += 1
        except (OSError, ValueError) as e:
            log.warning("PUT %s/replicas/peers failed: %s", u, e)
    return ok


def launch_replicas(num_replicas: int, router_args: list[str], name: str = DEFAULT_NAME,
                    namespace: str = DEFAULT_NAMESPACE, port: int = DEFAULT_PORT, *, num_cpus: float = 1.0,
                    startup_timeout: float = 180.0, detached: bool = False) -> list[str]:
    """Start ``num_replicas`` replica actors (``{name}-{i}`` in ``namespace``, replica ``i`` on ``port + i`` of its
    node), wait until all answer, set their membership; their URLs, in index order. Ray must be initialized (or is,
    locally, with ``ray.init()``). The actors live as long as this driver (``detached``: until ``stop_replicas``)."""
    ray = _ray()
    if num_replicas < 1:
        raise ValueError("num_replicas must be at least 1")
    if not ray.is_initialized():
        ray.init()
    actor_cls = ray.remote(Replica)
    actors = []
    for i in range(num_replicas):
        opts: dict[str, Any] = {"name": f"{name}-{i}", "namespace": namespace, "max_restarts": -1,
                                "max_task_retries": -1, "scheduling_strategy": "SPREAD", "num_cpus": num_cpus}
        if detached:
            opts["lifetime"] = "detached"
        actors.append(actor_cls.options(**opts).remote(i, list(router_args), port + i, name, namespace,
                                                       startup_timeout))
    _HANDLES[(namespace, name)] = actors
    urls = ray.get([a.url.remote() for a in actors], timeout=startup_timeout + 60)
    accepted = set_peers(urls)
    if accepted != len(urls):
        raise RuntimeError(f"only {accepted} of {len(urls)} replicas accepted their membership (PUT /replicas/peers)")
    return list(urls)


def stop_replicas(name: str = DEFAULT_NAME, namespace: str = DEFAULT_NAMESPACE) -> int:
    """Stop every replica actor of ``name`` in ``namespace`` (no restart); how many."""
    ray = _ray()
    names = replica_names(name, namespace)
    for n in names:
        try:
            actor = ray.get_actor(n, namespace=namespace)
        except ValueError:
            continue
        try:
            ray.get(actor.stop.remote(), timeout=60)
        except Exception:  # noqa: BLE001 - killed below anyway
            pass
        ray.kill(actor, no_restart=True)
    _HANDLES.pop((namespace, name), None)
    return len(names)


def haproxy_servers(urls: list[str]) -> str:
    """The ``server`` lines of the shipped HAProxy config's backends for these replicas (``r0``, ``r1``, ...)."""
    from slime_router_testing.haproxy import _address

    return "\n".join(f"    server r{i} {_address(u)}" for i, u in enumerate(urls))


def write_haproxy_config(urls: list[str], path: str, port: int = 30000, template: str | None = None) -> str:
    """Write the shipped HAProxy configuration (``deploy/haproxy/haproxy.cfg``, or ``template``) with these replicas
    as its servers and its frontend on ``port``; the text written."""
    from pathlib import Path

    from slime_router_testing.haproxy import REPO_CONFIG, render_config

    src = Path(template) if template else REPO_CONFIG
    if not src.exists():
        raise FileNotFoundError(f"{src}: no HAProxy configuration template; pass template= the path of "
                                f"deploy/haproxy/haproxy.cfg from the slime-router repository")
    text = render_config(src.read_text(), urls, port, "/run/haproxy/slime-router.sock", host="0.0.0.0")
    Path(path).write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    import argparse

    args = list(sys.argv[1:] if argv is None else argv)
    router_args: list[str] = []
    if "--" in args:
        cut = args.index("--")
        args, router_args = args[:cut], args[cut + 1:]
    ap = argparse.ArgumentParser(prog="python -m slime_router_plugins.replicas.ray_launcher",
                                 description="Router replicas as Ray actors (docs/scale-out.md). The arguments "
                                             "after -- go to every `slime-router serve`.")
    ap.add_argument("--replicas", type=int, required=True)
    ap.add_argument("--address", default=None, help="Ray cluster address (auto: the running cluster). "
                                                     "Default: a local Ray instance.")
    ap.add_argument("--name", default=DEFAULT_NAME)
    ap.add_argument("--namespace", default=DEFAULT_NAMESPACE)
    ap.add_argument("--port", type=int, default=DEFAULT_PORT, help="replica i listens on PORT+i of its node")
    ap.add_argument("--num-cpus", type=float, default=1.0, help="CPUs reserved per replica actor")
    ap.add_argument("--haproxy-config", metavar="PATH", help="write the HAProxy config for these replicas here")
    ap.add_argument("--haproxy-port", type=int, default=30000, help="the port of that config's frontend")
    ap.add_argument("--detached", action="store_true",
                    help="leave the replicas running when this command exits (stop them with --stop)")
    ap.add_argument("--stop", action="store_true", help="stop the replicas of --name/--namespace and exit")
    a = ap.parse_args(args)
    ray = _ray()
    ray.init(address=a.address, namespace=a.namespace, **({} if a.address else {"include_dashboard": False}))
    try:
        if a.stop:
            print(f"stopped {stop_replicas(a.name, a.namespace)} replica(s)")
            return 0
        urls = launch_replicas(a.replicas, router_args, a.name, a.namespace, a.port, num_cpus=a.num_cpus,
                               detached=a.detached)
        print(f"{len(urls)} replicas ({a.namespace}/{a.name}-0..{len(urls) - 1}): {' '.join(urls)}")
        print("HAProxy backend servers:\n" + haproxy_servers(urls), flush=True)
        if a.haproxy_config:
            write_haproxy_config(urls, a.haproxy_config, a.haproxy_port)
            print(f"wrote {a.haproxy_config} (frontend on port {a.haproxy_port})", flush=True)
        if a.detached:
            return 0
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        print("serving; Ctrl-C stops the replicas", flush=True)
        stop.wait()
        stop_replicas(a.name, a.namespace)
        return 0
    finally:
        ray.shutdown()


def free_port_range(n: int) -> int:
    """A base port whose next ``n`` ports are free on this machine now (for ``port=`` on one machine)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = int(s.getsockname()[1])
        if base + n < 65536 and all(_port_free(base + i) for i in range(n)):
            return base
    raise RuntimeError("no free port range")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
