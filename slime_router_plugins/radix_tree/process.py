"""The trajectory cache in its own process (``--radix-tree-process``): the tree on another core.

The router process keeps the HTTP side (parsing, routing, the upstream call, the reply); a child process owns
the ``TrajectoryCache`` (tokenizer, trie, alignment) and answers over a Unix socket pair. On a 2-core box the
cache's pure-Python work then runs next to the router's instead of after it.

Wire: frames of ``<u32 length><pickle>`` both ways. Router -> child ``(op, rid, *args)``:
``p`` prepare(text), ``i`` prepare_ids(ids), ``R`` record a /generate reply (the worker's bytes) for the
prepares of one request and forget them, ``r`` record one reply, ``x`` forget a prepare (the last three have
no answer), ``q`` retrieve(text, strict), ``s`` stats, ``c`` the tree's self-check (tests). Child -> router
``(rid, ok, value)``. Frames written in one pass of the event loop go out in one write.

Ordering is the one guarantee the cache needs: one socket, one reader, requests handled in the order sent.
A turn's record is queued before its reply is written to the client, and the queue is flushed by a ready
callback, which runs before the event loop polls its sockets again; so the next turn's request cannot be read,
let alone its prepare sent, before the record is on the socket, and the child handles it first.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import os
import pickle
import socket
import struct
import subprocess
import sys
from typing import Any

from orjson import loads as orjson_loads

from slime_router_core import HTTPError
from slime_router_core.contracts import CacheUnavailable

from .cache import record_tokens, reply_pairs
from .trie import DEFAULT_MAX_TOKENS, max_record_tokens

log = logging.getLogger("slime_router.radix_tree")

_LEN = struct.Struct("<I")
_DUMPS = pickle.dumps
_LOADS = pickle.loads
PROTO = pickle.HIGHEST_PROTOCOL
# Every prepare is let go of by its record ("R") or by the router dropping it ("x"); this bound only guards against a
# leak. Beyond it the oldest is dropped (its record, should it still come, is skipped), with a warning.
MAX_OPEN_PREPARES = 1 << 20


def _frame(obj: Any) -> bytes:
    data = _DUMPS(obj, PROTO)
    return _LEN.pack(len(data)) + data


def _unframe(buf: bytearray) -> list:
    """The whole frames at the start of ``buf``, decoded; they are removed from it (a partial one stays)."""
    msgs, pos, n = [], 0, len(buf)
    while n - pos >= 4:
        (size,) = _LEN.unpack_from(buf, pos)
        end = pos + 4 + size
        if end > n:
            break
        msgs.append(_LOADS(memoryview(buf)[pos + 4:end]))
        pos = end
    del buf[:pos]
    return msgs


class RemotePrepared:
    """The router-side view of a prompt prepared in the cache process (what hooks and openai_compat read)."""

    __slots__ = ("rid", "input_ids", "cached_tokens", "fresh_tokens", "worker_url", "_client", "_open")

    def __init__(self, client: CacheProcessClient, rid: int, input_ids: list[int], cached: int, fresh: int,
                 worker_url: str | None) -> None:
        self.rid, self.input_ids, self.cached_tokens, self.fresh_tokens = rid, input_ids, cached, fresh
        self.worker_url = worker_url
        self._client = client
        self._open = True  # the child still holds this prepare

    def __len__(self) -> int:
        return len(self.input_ids)

    def __del__(self) -> None:  # the child holds the alignment data until told to let go
        if self._open and self._client.transport is not None:
            try:
                self._client._send(("x", self.rid))
            except Exception:
                pass


class CacheProcessClient(asyncio.Protocol):
    """The ``TRAJECTORY_CACHE`` contract (``slime_router_core.contracts``) answered by a child process that owns
    a ``TrajectoryCache``; ``stats()`` answers the snapshot of the last ``refresh()``.

    If the child dies, it is started again (its records are lost, which is logged); meanwhile calls raise
    ``CacheUnavailable`` and the plugin passes requests through unrecorded.
    """

    def __init__(self, checkpoint: str, max_size: int = DEFAULT_MAX_TOKENS, gc_k: int = 5, verbose: bool = False,
                 snapshot: str | None = None, snapshot_interval: float = 300.0, journal_interval: float = 1.0
                 ) -> None:
        self.max_record_tokens = max_record_tokens(max_size)
        self.args = [sys.executable, "-m", "slime_router_plugins.radix_tree.process",
                     "--checkpoint", str(checkpoint), "--max-size", str(max_size), "--gc-k", str(gc_k)]
        if verbose:
            self.args.append("--verbose")
        # --cache-snapshot: the child restores, journals and snapshots the cache it owns
        self.snapshot = os.path.abspath(snapshot) if snapshot else None
        if self.snapshot:
            self.args += ["--snapshot", self.snapshot, "--snapshot-interval", str(snapshot_interval),
                          "--journal-interval", str(journal_interval)]
        self.proc: subprocess.Popen | None = None
        self.transport: asyncio.Transport | None = None
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._buf = bytearray()
        self._out: list[bytes] = []
        self._failure = "the trajectory cache process is not running"
        self._closing = False
        self._restart_task: asyncio.Task | None = None
        self.restarts = 0
        self.unavailable = 0  # calls refused while the process was down
        self._stats: dict[str, Any] = {}
        self.loop: asyncio.AbstractEventLoop | None = None  # the router's loop (tests call in from other threads)

    # --- life cycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the child and wait until it has loaded the tokenizer (raises if it cannot)."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.proc = subprocess.Popen(self.args + ["--fd", str(child.fileno())], pass_fds=(child.fileno(),))
        finally:
            child.close()
        loop = self.loop = asyncio.get_running_loop()
        self._buf.clear()
        await loop.create_unix_connection(lambda: self, sock=parent)
        ready = loop.create_future()
        self._waiting[0] = ready
        try:  # restoring a large snapshot takes longer than loading the tokenizer
            self._stats = await asyncio.wait_for(ready, 600 if self.snapshot else 120)
        except BaseException:
            await self._stop_child()
            raise
        log.info("radix_tree: trajectory cache process %d ready", self.proc.pid)

    async def close(self) -> None:
        self._closing = True
        if self._restart_task is not None:
            self._restart_task.cancel()
        await self._stop_child()

    async def _stop_child(self) -> None:
        if self.transport is not None:
            self.transport.close()  # the child exits when its socket closes
            self.transport = None
        proc, self.proc = self.proc, None
        if proc is not None:
            try:  # with --cache-snapshot the child writes its snapshot before it exits: give it the time
                await asyncio.to_thread(proc.wait, 600 if self.snapshot else 10)
            except subprocess.TimeoutExpired:
                log.error("radix_tree: the trajectory cache process %d did not exit in time; killed", proc.pid)
                proc.kill()

    async def _restart(self) -> None:
        delay = 0.5
        while not self._closing:
            await asyncio.sleep(delay)
            try:
                await self._stop_child()
                await self.start()
                self.restarts += 1
                return
            except Exception as e:
                log.error("radix_tree: restarting the trajectory cache process failed (%s: %s); retrying in %.0f s",
                          type(e).__name__, e, delay)
                delay = min(delay * 2, 30.0)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        waiting, self._waiting = self._waiting, {}
        if self._closing:
            for fut in waiting.values():
                if not fut.done():
                    fut.set_exception(CacheUnavailable("the router is shutting down"))
            return
        code = self.proc.poll() if self.proc is not None else None
        self._failure = (f"the trajectory cache process exited (code {code})" if code is not None
                         else "the trajectory cache process closed its socket")
        for fut in waiting.values():
            if not fut.done():
                fut.set_exception(CacheUnavailable(self._failure))
        if 0 not in waiting:  # died while serving (not during start-up, whose caller sees the error)
            log.error("radix_tree: %s; %s. Restarting it; requests pass through unrecorded meanwhile.",
                      self._failure, "it restores its snapshot and journal (the records of its last journal commit "
                      "interval are lost)" if self.snapshot else "its records are lost")
            if self._restart_task is None or self._restart_task.done():
                self._restart_task = asyncio.get_running_loop().create_task(self._restart())

    def data_received(self, data: bytes) -> None:
        self._buf += data
        for rid, ok, value in _unframe(self._buf):
            fut = self._waiting.pop(rid, None)
            if fut is None or fut.done():
                continue
            if ok:
                fut.set_result(value)
            elif isinstance(value, tuple):  # an HTTPError raised in the child: same status, same message
                fut.set_exception(HTTPError(value[0], value[1], **value[2]))
            else:
                fut.set_exception(RuntimeError(f"trajectory cache process: {value}"))

    # --- calls ----------------------------------------------------------------------------------

    def _send(self, msg: tuple) -> None:
        if self.transport is None:
            self.unavailable += 1
            raise CacheUnavailable(self._failure)
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        self._out.append(_frame(msg))

    def _flush(self) -> None:
        out, self._out = self._out, []
        if self.transport is not None:
            self.transport.write(b"".join(out))

    def _call(self, op: str, *args: Any) -> tuple[int, asyncio.Future]:
        rid = next(self._ids)
        self._send((op, rid, *args))
        fut = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        return rid, fut

    async def prepare(self, text: str) -> RemotePrepared:
        if not isinstance(text, str):
            raise HTTPError(400, "'text' must be a string", param="text")
        rid, fut = self._call("p", text)
        recorded, fresh_ids, worker = await fut
        ids = recorded.tolist()
        cached = len(ids)
        ids += fresh_ids
        return RemotePrepared(self, rid, ids, cached, len(fresh_ids), worker)

    async def prepare_ids(self, ids: list[int]) -> RemotePrepared:
        ids = [int(x) for x in ids]
        rid, fut = self._call("i", ids)
        cached, fresh, worker = await fut
        return RemotePrepared(self, rid, ids, cached, fresh, worker)

    async def record(self, prepared: RemotePrepared, response: dict, worker_url: str | None) -> bool:
        """Queued on the socket, not waited for (the child handles it before any later call: the ordering the
        contract asks for); False when the child will refuse it as too large (``max_record_tokens``): the rule is
        applied here on the same numbers, as the child applies it (and counts and logs it)."""
        self._send(("r", prepared.rid, response, worker_url))
        return record_tokens(prepared, response) <= self.max_record_tokens

    async def record_replies(self, prepared: list[RemotePrepared], replies: list[Any], n: int,
                             worker_url: str | None, raw: bytes | None = None) -> list[tuple[dict, int]]:
        """Record a whole /generate reply and let go of its prepares; ``raw`` (the worker's bytes, as they came)
        goes to the child instead of re-serialized ``replies`` when given."""
        self._send(("R", [p.rid for p in prepared], raw if raw is not None else replies, worker_url, n))
        for p in prepared:
            p._open = False
        limit = self.max_record_tokens
        if raw is not None and len(raw) + sum(p.fresh_tokens for p in prepared) <= limit:
            return []  # each generated token takes at least one byte of the reply: none can be too large
        return [(r, k) for p, r in reply_pairs(prepared, replies, n) if (k := record_tokens(p, r)) > limit]

    async def retrieve(self, text: str, strict: bool = False) -> dict:
        return await self._call("q", text, strict)[1]

    async def refresh(self) -> None:
        """Fetch the child's statistics (``stats()`` answers them until the next refresh)."""
        try:
            self._stats = await self._call("s")[1]
        except CacheUnavailable:
            pass

    async def check_tree(self) -> None:
        """Run the tree's structural self-check in the child (tests); raises what it raises."""
        await self._call("c")[1]

    def stats(self) -> dict:
        return {**self._stats, "process": {"pid": self.proc.pid if self.proc is not None else None,
                                           "running": self.transport is not None, "restarts": self.restarts,
                                           "requests_passed_through": self.unavailable}}


# --- the child ------------------------------------------------------------------------------------------


def serve(sock: socket.socket, cache: Any) -> None:
    """Answer frames until the router closes the socket. Each answer goes out as soon as it is ready: the
    router works on the first requests of a burst while the later ones are still being prepared here."""
    prepared: dict[int, Any] = {}
    prepare, prepare_ids = cache.prepare_sync, cache.prepare_ids_sync
    record, retrieve = cache.record_sync, cache.retrieve_sync
    buf = bytearray()
    recv, sendall = sock.recv_into, sock.sendall
    chunk = bytearray(1 << 20)
    view = memoryview(chunk)
    sock.sendall(_frame((0, True, cache.stats())))  # ready
    while True:
        got = recv(chunk)
        if not got:
            return
        buf += view[:got]
        for msg in _unframe(buf):
            op, rid = msg[0], msg[1]
            try:
                if op == "R":
                    ps = [prepared.pop(r, None) for r in msg[1]]
                    reply = orjson_loads(msg[2]) if isinstance(msg[2], bytes) else msg[2]
                    if None not in ps:
                        for p, one in reply_pairs(ps, reply, msg[4]):
                            record(p, one, msg[3])
                    continue
                if op == "r":
                    p = prepared.get(rid)
                    if p is not None:
                        record(p, msg[2], msg[3])
                    continue
                if op == "x":
                    prepared.pop(rid, None)
                    continue
                if op == "p":
                    p = prepare(msg[2])
                    value: Any = (p.match.raw_ids, p.fresh_ids, p.worker_url)
                elif op == "i":
                    p = prepare_ids(msg[2])
                    value = (p.cached_tokens, p.fresh_tokens, p.worker_url)
                elif op == "q":
                    value = retrieve(msg[2], msg[3])
                elif op == "s":
                    value = {**cache.stats(), "open_prepares": len(prepared)}
                elif op == "c":
                    cache.tree.check()
                    value = None
                else:
                    raise ValueError(f"unknown operation {op!r}")
                if op in ("p", "i"):
                    prepared[rid] = p
                    if len(prepared) > MAX_OPEN_PREPARES:
                        del prepared[next(iter(prepared))]
                        log.warning("radix_tree process: more than %d prompts prepared and not recorded; the oldest "
                                    "was dropped", MAX_OPEN_PREPARES)
                sendall(_frame((rid, True, value)))
            except HTTPError as e:
                sendall(_frame((rid, False, (e.status, e.message, {"type": e.type, "param": e.param, "code": e.code}))))
            except Exception as e:  # the router logs it; a record that failed has no one waiting
                log.exception("radix_tree process: %r failed", op)
                if op not in ("R", "r", "x"):
                    sendall(_frame((rid, False, f"{type(e).__name__}: {e}")))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="slime-router trajectory cache process (started by the router)")
    ap.add_argument("--fd", type=int, required=True)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--max-size", type=int, required=True)
    ap.add_argument("--gc-k", type=int, required=True)
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--snapshot", default=None)
    ap.add_argument("--snapshot-interval", type=float, default=300.0)
    ap.add_argument("--journal-interval", type=float, default=1.0)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s [cache process]: %(message)s")
    logging.getLogger("slime_router.radix_tree.persist").setLevel(logging.INFO)
    if a.snapshot:  # the router ends this process by closing the socket (after which the snapshot is written)
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from slime_router_core.tokenizers import load_tokenizer

    from .cache import TrajectoryCache

    sock = socket.socket(fileno=a.fd)
    cache = TrajectoryCache(load_tokenizer(a.checkpoint), max_size=a.max_size, gc_k=a.gc_k, verbose=a.verbose,
                            snapshot=a.snapshot, snapshot_interval=a.snapshot_interval,
                            journal_interval=a.journal_interval)
    code = 0
    try:
        cache.start_sync()  # restore the snapshot and the journal (before answering "ready")
        import gc

        from slime_router_core.memory import release_free_heap

        release_free_heap()
        gc.freeze()
        serve(sock, cache)
    except (BrokenPipeError, ConnectionResetError):
        pass
    except Exception:
        log.exception("radix_tree process: failed")
        code = 1
    finally:
        sock.close()
        try:
            cache.close_sync()  # the final snapshot
        except Exception:
            log.exception("radix_tree process: writing the trajectory cache snapshot failed")
            code = 1
        os._exit(code)


if __name__ == "__main__":
    main()
