"""Write-behind of sessions to Valkey/Redis (``--session-store-url``): a router replica that never saw a session
continues it exactly.

What is written: one entry per finished request of a session (``RPUSH`` onto ``slime-router:session:{sid}``, the
key's TTL reset to ``--session-ttl``), holding what the request added:

- the session's turns as ``Session.add_turn`` got them, the prompt as ``(segment, k, ids after k)`` (its first k
  ids are that segment's: only new ids are written), the output ids, logprobs, weight versions (runs), request id,
  finish reason, group and time; the gaps it added; the request count; the metadata when it changed;
- the trajectory-cache records the request made (``contracts.RecordedChain``: text, ids, widths, logprobs, loss
  mask, versions, optional spans, worker), each as ``(an earlier record of the session, k tokens, L characters)`` +
  what follows, when its first k tokens and L characters are exactly that record's (checked by a digest): the
  next turn of a conversation costs its new tokens, not the whole conversation again;
- the exact-history entries of the OpenAI layer (``contracts.HistoryTransfer``, implemented by openai_compat), as
  its listener hands them over, so that chat messages sent back render as they would have on the first replica.

``DELETE /sessions/{sid}`` replaces the key by a ``finish`` entry (kept ``max(--session-ttl, 1 day)``), so another
replica answers 409 too. Entries are numbered per session: a reader replays them in order and stops at a missing
one (a write dropped when the queue was full): the session is then loaded up to there with a gap saying so.

Off the request path: a request appends its entry to a queue; one background task encodes the entries in order
(records' chains built in a worker thread), another writes them in pipelined batches. At most ``QUEUE_MAX`` entries
wait (queued, encoded or being written); beyond, an entry is dropped, counted, and the session marked ``broken`` so
that readers know its history is incomplete. A failed write is retried (backoff up to ``BACKOFF_MAX`` s) and
counted; requests never wait for it.

Entry encoding: ``MAGIC | u32 header length | header (JSON) | blob``; arrays (ids int32, logprobs float32,
widths) and texts (UTF-8) are in the blob, little-endian, referenced from the header as ``{"$a": [typecode,
offset, count]}`` / ``{"$t": [offset, bytes]}``.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import struct
import sys
import time
from array import array
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from slime_router_core.contracts import ChainTransfer, HistoryTransfer, RecordedChain
from slime_router_core.errors import MissingDependency

from .store import Session, SessionGone, SessionStore

log = logging.getLogger("slime_router.sessions.store")

MAGIC = b"SLRSW1\n"
_U32 = struct.Struct("<I")
KEY = "slime-router:session:{}"
QUEUE_MAX = 10_000  # entries waiting to be written (each one request's additions)
BATCH_MAX = 256  # entries per pipelined write
BACKOFF_MAX = 5.0
FINISHED_TTL_MIN = 86400  # seconds a finish entry is kept at least
HEADS = 16  # records of a session a new record may continue (the last ones written)
LOG_INTERVAL = 30.0
FAILED_FOR = 5.0  # seconds a failed read is not retried for the same session
_BIG = sys.byteorder == "big"


# --- encoding -------------------------------------------------------------------------------------------------


class _Text(str):
    """A string that goes into the blob (UTF-8, lone surrogates kept) instead of the JSON header."""


def pack(obj: Any) -> bytes:
    blobs: list[bytes] = []
    off = 0

    def walk(o: Any) -> Any:
        nonlocal off
        if isinstance(o, array):
            a = o
            if _BIG:
                a = array(o.typecode, o)
                a.byteswap()
            b = a.tobytes()
            blobs.append(b)
            off += len(b)
            return {"$a": [o.typecode, off - len(b), len(o)]}
        if isinstance(o, _Text):
            b = o.encode("utf-8", "surrogatepass")
            blobs.append(b)
            off += len(b)
            return {"$t": [off - len(b), len(b)]}
        if isinstance(o, dict):
            return {k: walk(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [walk(v) for v in o]
        return o

    header = orjson.dumps(walk(obj))
    return MAGIC + _U32.pack(len(header)) + header + b"".join(blobs)


def unpack(data: bytes) -> Any:
    if not data.startswith(MAGIC):
        raise ValueError("not a slime-router session entry")
    (hlen,) = _U32.unpack_from(data, len(MAGIC))
    start = len(MAGIC) + 4
    header = orjson.loads(data[start:start + hlen])
    blob = memoryview(data)[start + hlen:]

    def walk(o: Any) -> Any:
        if isinstance(o, dict):
            if "$a" in o and len(o) == 1:
                tc, off, n = o["$a"]
                a = array(tc)
                a.frombytes(blob[off:off + n * a.itemsize])
                if _BIG:
                    a.byteswap()
                return a
            if "$t" in o and len(o) == 1:
                off, n = o["$t"]
                return bytes(blob[off:off + n]).decode("utf-8", "surrogatepass")
            return {k: walk(v) for k, v in o.items()}
        if isinstance(o, list):
            return [walk(v) for v in o]
        return o

    return walk(header)


def _uint_array(values: Any) -> array:
    a = array("i", values)
    if not len(a) or max(a) < 256:
        return array("B", a)
    if max(a) < 65536:
        return array("H", a)
    return a


def _runs(values: list[Any]) -> list[list[Any]]:
    return [[len(list(g)), v] for v, g in itertools.groupby(values)]


def _expand(runs: list[list[Any]]) -> list[Any]:
    out: list[Any] = []
    for cnt, v in runs:
        out += [v] * cnt
    return out


def chain_digest(c: RecordedChain, k: int, chars: int) -> bytes:
    """A digest of the first ``k`` tokens and ``chars`` characters of a chain (everything a record holds)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(c.text[:chars].encode("utf-8", "surrogatepass"))
    h.update(b"\x00ids")
    h.update(array("i", c.ids[:k]).tobytes())
    h.update(b"\x00w")
    h.update(array("i", c.widths[:k]).tobytes())
    h.update(b"\x00lp")
    h.update(array("f", c.logprobs[:k]).tobytes())
    h.update(b"\x00m")
    h.update(bytes(c.loss_mask[:k]))
    h.update(b"\x00v")
    h.update("\x00".join(c.versions[:k]).encode("utf-8", "surrogatepass"))
    h.update(b"\x00mk")
    h.update(repr(sorted(m for m in c.markers if m[0] + len(m[1]) <= chars)).encode("utf-8", "surrogatepass"))
    return h.digest()


def _heads(seq: int, c: RecordedChain) -> list[tuple[int, int, int, bytes]]:
    """The prefixes of chain ``seq`` a later record may continue: the whole chain, and its prompt."""
    n = len(c.ids)
    out = [(seq, n, len(c.text), chain_digest(c, n, len(c.text)))]
    p = c.prompt_tokens
    if 0 < p < n:
        chars = sum(c.widths[:p])
        out.append((seq, p, chars, chain_digest(c, p, chars)))
    return out


def encode_chain(c: RecordedChain, seq: int, heads: list[tuple[int, int, int, bytes]]) -> list[Any]:
    """``[seq, base, k, chars, text after, ids, widths, logprobs, runs (count, version, mask), optional spans,
    worker, prompt tokens]``: ``base`` an earlier record whose first k tokens / chars this one starts with
    (-1: none, the whole chain is written)."""
    base, k, chars = -1, 0, 0
    ends: list[int] | None = None
    for hseq, hk, hchars, dg in reversed(heads):
        if hk > len(c.ids) or hchars > len(c.text) or hk <= k:
            continue
        if ends is None:
            ends = list(itertools.accumulate(c.widths))
        if ends[hk - 1] != hchars or chain_digest(c, hk, hchars) != dg:
            continue
        base, k, chars = hseq, hk, hchars
    mask, versions = c.loss_mask[k:], c.versions[k:]
    runs = [[len(list(g)), v, m] for (v, m), g in itertools.groupby(zip(versions, mask))]
    markers = [[a, b] for a, b in c.markers if a + len(b) > chars]
    return [seq, base, k, chars, _Text(c.text[chars:]), array("i", c.ids[k:]), _uint_array(c.widths[k:]),
            array("f", c.logprobs[k:]), runs, markers, c.worker, c.prompt_tokens]


def decode_chain(item: list[Any], chains: dict[int, RecordedChain]) -> RecordedChain:
    seq, base, k, chars, text, ids, widths, lps, runs, markers, worker, prompt_tokens = item
    mk = [(int(a), str(b)) for a, b in markers]
    ids = array("i", ids)
    widths = array("i", widths)
    lps = array("f", lps)
    mask = bytearray()
    versions: list[str] = []
    for cnt, v, m in runs:
        mask += bytes([m]) * cnt
        versions += [v] * cnt
    if base >= 0:
        b = chains[base]  # KeyError: a record it continues is missing
        text = b.text[:chars] + text
        ids = array("i", b.ids[:k]) + ids
        widths = array("i", b.widths[:k]) + widths
        lps = array("f", b.logprobs[:k]) + lps
        mask = bytearray(b.loss_mask[:k]) + mask
        versions = list(b.versions[:k]) + versions
        mk = [m for m in b.markers if m[0] + len(m[1]) <= chars] + mk
    return RecordedChain(text, ids, widths, lps, bytes(mask), versions, sorted(mk), worker, prompt_tokens)


# --- per-session state ------------------------------------------------------------------------------------------


@dataclass
class SessionState:
    """What the write-behind keeps per session (``Session.wb``)."""

    n: int = 0  # the number of the next entry
    reset: bool = True  # the next entry replaces the key (a session this replica started, not loaded)
    gaps_written: int = 0
    meta_written: bytes | None = None
    requests_written: int = -1
    broken: bool = False  # an entry was dropped: later ones are useless to a reader
    broken_marked: bool = False
    turns: list[list[Any]] = field(default_factory=list)  # folded, not queued yet
    history: list[list[Any]] = field(default_factory=list)
    # the writer's (only the background task touches these)
    chain_seq: int = 0
    heads: list[tuple[int, int, int, bytes]] = field(default_factory=list)


@dataclass
class Job:
    session: Session
    state: SessionState
    entry: dict[str, Any]
    chains: list[Callable[[], RecordedChain]]
    ttl: int  # seconds, 0: none
    reset: bool
    finish: bool = False


class WriteBehind:
    """The queue, the writer task, and the loads of sessions this replica does not hold."""

    def __init__(self, url: str, store: SessionStore, cache: Any, history: HistoryTransfer | None,
                 timeout: float = 2.0) -> None:
        try:
            import redis.asyncio as aioredis
        except ImportError:
            raise MissingDependency("--session-store-url", ["redis"], "redis") from None
        self.url = url
        self.store = store
        self.cache: ChainTransfer | None = cache if isinstance(cache, ChainTransfer) else None
        self.history = history
        self.timeout = timeout
        self.client = aioredis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                              health_check_interval=30)
        # entries go: queue (as submitted) -> encoder task -> encoded (bytes: the records' builders let go of, so a
        # store that is down holds no trajectory alive) -> writer task; QUEUE_MAX bounds all three together
        self.queue: asyncio.Queue[Job] = asyncio.Queue()
        self.encoded: deque[tuple[Job, bytes]] = deque()
        self._have = asyncio.Event()
        self.tasks: list[asyncio.Task] = []
        self.loading: dict[str, asyncio.Future[str]] = {}
        # sessions whose load failed (monotonic time), not opened yet: they get a gap when they are, and are not read
        # again for FAILED_FOR seconds (an OpenAI request's middleware and its pre_request hook: one read)
        self.failed: dict[str, float] = {}
        self.counters = {"entries_queued": 0, "entries_written": 0, "bytes_written": 0, "write_errors": 0,
                         "write_retries": 0, "entries_dropped": 0, "loads": 0, "loaded": 0, "load_misses": 0,
                         "load_errors": 0, "load_incomplete": 0, "loaded_turns": 0, "loaded_records": 0,
                         "record_errors": 0, "history_errors": 0}
        self._last_log = 0.0
        self._unlogged = 0
        self.writing = 0  # entries being written now

    # --- life cycle ---------------------------------------------------------------------------------------

    def start(self) -> None:
        if not self.tasks:
            self.tasks = [asyncio.create_task(self._encoder()), asyncio.create_task(self._writer())]

    def pending(self) -> int:
        """Entries submitted and not written yet."""
        return self.queue.qsize() + len(self.encoded) + self.writing

    async def close(self, wait: float = 5.0) -> None:
        """Write what is queued (for up to ``wait`` seconds), then stop."""
        deadline = time.monotonic() + wait
        while self.pending() and time.monotonic() < deadline and self.tasks and not any(t.done() for t in self.tasks):
            await asyncio.sleep(0.02)
        for task in self.tasks:
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        self.tasks = []
        try:
            await self.client.aclose()
        except Exception:  # pragma: no cover
            pass

    def stats(self) -> dict[str, Any]:
        return {"queued": self.pending(), "queue_max": QUEUE_MAX, **self.counters}

    # --- the request path: queue ----------------------------------------------------------------------------

    def state(self, session: Session) -> SessionState:
        st = session.wb
        if st is None:
            st = session.wb = SessionState()
        return st

    def submit(self, session: Session, chains: list[Callable[[], RecordedChain]], finish: bool = False) -> None:
        """Queue an entry with what ``session`` gained since its last one (never waits)."""
        st = self.state(session)
        if st.broken and not finish:  # an entry was dropped: tell readers once, then write nothing more
            if not st.broken_marked and self._put(Job(session, st, {"n": st.n, "k": "broken"}, [], self._ttl(),
                                                      False)):
                st.broken_marked = True
                st.n += 1
            return
        entry: dict[str, Any] = {"n": st.n, "k": "finish" if finish else "add", "requests": session.requests}
        if st.reset:
            entry["created"] = session.created
        if finish:
            entry["time"] = time.time()
        else:
            meta = orjson.dumps(session.metadata)
            if meta != st.meta_written:
                entry["meta"] = orjson.loads(meta)  # a copy: encoded on another thread
            if st.turns:
                entry["turns"] = st.turns
            gaps = session.gaps[st.gaps_written:]
            if gaps:
                entry["gaps"] = gaps
            if st.history:
                entry["hist"] = st.history
            if not (gaps or st.turns or chains or st.history or "meta" in entry or st.reset
                    or session.requests != st.requests_written):
                return
        job = Job(session, st, entry, chains, self._ttl(), st.reset, finish)
        if not self._put(job):
            st.broken = True
            return
        st.n += 1
        st.reset = False
        if not finish:
            st.meta_written = orjson.dumps(session.metadata)
            st.gaps_written = len(session.gaps)
            st.requests_written = session.requests
            st.turns = []
            st.history = []

    def _ttl(self) -> int:
        return int(self.store.ttl + 0.999) if self.store.ttl else 0

    def _put(self, job: Job) -> bool:
        if self.pending() >= QUEUE_MAX:
            self.counters["entries_dropped"] += 1
            self._warn("sessions: the write-behind queue is full (%d entries: the store is down or too slow); an "
                       "entry of session %r was dropped: another replica would load that session only up to "
                       "its earlier entries", QUEUE_MAX, job.session.id)
            return False
        self.queue.put_nowait(job)
        self.counters["entries_queued"] += 1
        return True

    def _warn(self, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last_log >= LOG_INTERVAL:
            more = f" (and {self._unlogged} more such since the last warning)" if self._unlogged else ""
            log.warning(msg + more, *args)
            self._last_log, self._unlogged = now, 0
        else:
            self._unlogged += 1

    # --- the writer -----------------------------------------------------------------------------------------

    def _encode(self, job: Job) -> bytes:
        entry = job.entry
        st = job.state
        if job.chains:
            out = []
            for build in job.chains:
                try:
                    c = build()
                except Exception:
                    self.counters["record_errors"] += 1
                    log.exception("sessions: a trajectory record could not be read for the store")
                    continue
                seq = st.chain_seq
                st.chain_seq += 1
                out.append(encode_chain(c, seq, st.heads))
                st.heads.extend(_heads(seq, c))
                del st.heads[:-HEADS]
            entry["chains"] = out
        return pack(entry)

    async def _encoder(self) -> None:
        """Entries in order -> bytes. An entry with trajectory records is encoded in a worker thread (building a
        record's chain walks its tokens; the event loop serves requests meanwhile); one at a time, in order (each
        session's records are written relative to its earlier ones)."""
        while True:
            job = await self.queue.get()
            try:
                data = await asyncio.to_thread(self._encode, job) if job.chains else self._encode(job)
            except Exception:
                self.counters["record_errors"] += 1
                job.state.broken = True
                log.exception("sessions: an entry of session %r could not be encoded", job.session.id)
                continue
            finally:
                job.chains = []
            self.encoded.append((job, data))
            self._have.set()

    async def _writer(self) -> None:
        while True:
            while not self.encoded:
                self._have.clear()
                await self._have.wait()
            writes = [self.encoded.popleft() for _ in range(min(BATCH_MAX, len(self.encoded)))]
            self.writing = len(writes)
            backoff = 0.05
            while writes:
                try:
                    await self._write(writes)
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    self.counters["write_errors"] += 1
                    self._warn("sessions: writing %d session entries to %s failed (%s: %s); retrying in %.2g s "
                               "(requests are not delayed)", len(writes), self._where(), type(e).__name__, e,
                               backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(BACKOFF_MAX, backoff * 2)
                    self.counters["write_retries"] += 1
                    continue
                self.counters["entries_written"] += len(writes)
                self.counters["bytes_written"] += sum(len(b) for _, b in writes)
                break
            self.writing = 0

    async def _write(self, writes: list[tuple[Job, bytes]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for job, data in writes:
            key = KEY.format(job.session.id)
            if job.finish:
                pipe.delete(key)
                pipe.rpush(key, data)
                pipe.expire(key, max(job.ttl, FINISHED_TTL_MIN))
                continue
            if job.reset:
                pipe.delete(key)
            pipe.rpush(key, data)
            if job.ttl:
                pipe.expire(key, job.ttl)
            else:
                pipe.persist(key)
        await pipe.execute()

    def _where(self) -> str:
        return self.url.split("@")[-1]

    # --- reading --------------------------------------------------------------------------------------------

    async def ensure(self, sid: str) -> str:
        """Load ``sid`` from the store unless this replica knows it (live, or a tombstone); concurrent callers share
        one load. Answers "local", "loaded", "missing" (not in the store) or "failed" (the store could not be
        read: logged, counted)."""
        if self.store.knows(sid):
            return "local"
        failed = self.failed.get(sid)
        if failed is not None and time.monotonic() - failed < FAILED_FOR:
            return "failed"
        fut = self.loading.get(sid)
        if fut is not None:
            result = await asyncio.shield(fut)
            return await self.ensure(sid) if result == "retry" else result
        fut = self.loading[sid] = asyncio.get_running_loop().create_future()
        try:
            result = await self._load(sid)
        except BaseException:  # the loading request was cancelled (its client left): another one reads instead
            self.loading.pop(sid, None)
            fut.set_result("retry")
            raise
        if result == "failed":
            self.failed[sid] = time.monotonic()
            while len(self.failed) > 10_000:
                del self.failed[next(iter(self.failed))]
        fut.set_result(result)
        self.loading.pop(sid, None)
        return result

    async def _load(self, sid: str) -> str:
        self.counters["loads"] += 1
        try:
            raw: list[Any] = await asyncio.wait_for(self.client.lrange(KEY.format(sid), 0, -1), self.timeout)
        except Exception as e:
            self.counters["load_errors"] += 1
            self._warn("sessions: session %r could not be read from %s (%s: %s); it goes on as a new session, with "
                       "a gap saying its history is missing", sid, self._where(), type(e).__name__, e)
            return "failed"
        if not raw:
            self.counters["load_misses"] += 1
            return "missing"
        try:
            session, chains, finished, history = self._rebuild(sid, raw)
        except Exception as e:
            self.counters["load_errors"] += 1
            log.exception("sessions: session %r in %s could not be rebuilt", sid, self._where())
            self._warn("sessions: session %r could not be rebuilt (%s)", sid, e)
            return "failed"
        if finished is not None:
            self.store.bury(sid, "finished", finished)
            self.counters["loaded"] += 1
            return "loaded"
        if chains and self.cache is not None:
            await self.cache.import_chains(chains)
        if history and self.history is not None:
            try:
                self.history.import_history(history)
            except Exception:  # the session's turns and records are loaded all the same
                self.counters["history_errors"] += 1
                log.exception("sessions: the chat history of session %r could not be imported", sid)
        try:
            self.store.adopt(session)
        except SessionGone:
            return "local"
        self.counters["loaded"] += 1
        self.counters["loaded_turns"] += sum(len(s.turns) for s in session.segments)
        self.counters["loaded_records"] += len(chains)
        return "loaded"

    def _rebuild(self, sid: str, raw: list[Any]
                 ) -> tuple[Session, list[RecordedChain], float | None, list[list[Any]]]:
        entries: dict[int, dict[str, Any]] = {}
        for data in raw:
            e = unpack(data)
            if e.get("k") == "finish":
                return Session(sid), [], float(e.get("time") or time.time()), []
            if e.get("created") is not None:  # a reset: what came before belongs to an older life of the key
                entries = {}
            entries.setdefault(int(e["n"]), e)  # a retried write may repeat an entry
        session = Session(sid)
        st = SessionState(reset=False)
        session.wb = st
        chains: dict[int, RecordedChain] = {}
        history: list[list[Any]] = []
        n = 0
        first = True
        incomplete = None
        while n in entries:
            e = entries[n]
            if e["k"] == "broken":
                incomplete = "an entry was dropped before it was written (the replica's queue was full)"
                break
            if first and e.get("created") is not None:
                session.created = float(e["created"])
            first = False
            if "meta" in e:
                session.metadata = dict(e["meta"])
            session.requests = int(e.get("requests", session.requests))
            for t in e.get("turns", ()):
                rid, fr, group, when, ref_seg, ref_k, rest, out, lp, vruns, pv = t
                prompt = (session.segments[ref_seg].ids[:ref_k] if ref_seg >= 0 else array("i")) + rest
                seg = session.add_turn(prompt.tolist(), out.tolist(), lp.tolist(), _expand(vruns), pv, rid, fr, group)
                seg.turns[-1].time = when
            session.gaps += e.get("gaps", ())
            history += e.get("hist", ())
            new_chains = []
            for item in e.get("chains", ()):
                c = decode_chain(item, chains)
                chains[item[0]] = c
                new_chains.append((item[0], c))
            if new_chains:
                st.heads = [h for seq, c in new_chains for h in _heads(seq, c)][-HEADS:]
                st.chain_seq = new_chains[-1][0] + 1
            n += 1
        if incomplete is None and entries and n <= max(entries):
            incomplete = f"entry {n} of the store is missing"
        if incomplete is not None:
            self.counters["load_incomplete"] += 1
            session.gaps.append({"request_id": None, "index": None, "reason": "history_incomplete",
                                 "message": f"This session was loaded from the session store only in part: "
                                            f"{incomplete}; later turns are not in it."})
            st.broken = True
            st.broken_marked = True
        st.n = max(entries) + 1 if entries else 0
        st.gaps_written = len(session.gaps)
        st.meta_written = orjson.dumps(session.metadata)
        st.requests_written = session.requests
        return session, list(chains.values()), None, history


def history_unavailable_gap(url: str) -> dict[str, Any]:
    return {"request_id": None, "index": None, "reason": "history_unavailable",
            "message": f"This replica had not seen this session and could not read it from the session store "
                       f"({url.split('@')[-1]}): it went on as a new session, without its earlier turns."}
