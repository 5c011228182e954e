"""A real ``redis-server`` for tests: a free loopback port, a temporary directory, no persistence.

    with RedisServer() as r:
        r.url  # redis://127.0.0.1:PORT/0

``redis-server`` is the Debian package's binary (``/usr/bin/redis-server``; CI installs it); ``SLIME_REDIS_SERVER``
names another one (e.g. ``valkey-server``). ``RedisServer.available()`` says whether one is there.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Any

from .servers import free_port


def server_binary() -> str | None:
    name = os.environ.get("SLIME_REDIS_SERVER")
    if name:
        return shutil.which(name) or (name if os.path.exists(name) else None)
    for cand in ("redis-server", "/usr/bin/redis-server", "valkey-server"):
        found = shutil.which(cand) or (cand if os.path.isabs(cand) and os.path.exists(cand) else None)
        if found:
            return found
    return None


def ping(host: str, port: int, timeout: float = 0.5) -> bool:
    """Does a server answer ``PING`` with ``+PONG`` (raw RESP over a socket: no client library needed)?"""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """``redis-server`` on 127.0.0.1:``port`` (a free one by default), data in a temporary directory, no RDB/AOF."""

    def __init__(self, port: int | None = None, binary: str | None = None) -> None:
        found = binary or server_binary()
        if found is None:
            raise FileNotFoundError("redis-server not found: apt-get install redis-server (or set SLIME_REDIS_SERVER)")
        self.binary: str = found
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.dir: str | None = None
        self.proc: subprocess.Popen | None = None

    @staticmethod
    def available() -> bool:
        return server_binary() is not None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self, timeout: float = 20.0) -> RedisServer:
        self.dir = tempfile.mkdtemp(prefix="slime-redis-")
        cmd = [self.binary, "--port", str(self.port), "--bind", self.host, "--dir", self.dir, "--save", "",
               "--appendonly", "no", "--protected-mode", "no", "--daemonize", "no", "--loglevel", "warning",
               "--logfile", os.path.join(self.dir, "redis.log")]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not ping(self.host, self.port):
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"redis-server on port {self.port} did not answer PING within {timeout}s")
            time.sleep(0.02)
        return self

    def log(self) -> str:
        try:
            with open(os.path.join(self.dir or "", "redis.log")) as f:
                return f.read()[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and remove its directory."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def restart(self, timeout: float = 20.0) -> RedisServer:
        """Stop and start again on the same port (empty: no persistence)."""
        self.stop()
        return self.start(timeout)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
