"""Persistence of the trajectory cache (``--cache-snapshot PATH``): a snapshot plus a write-ahead journal.

Files (all beside PATH, on one file system):

- ``PATH``: the snapshot. ``SNAP_MAGIC`` | u32 format | u32 header length | header (pickle: format, gen, tokenizer
  fingerprint, time, tokens, nodes) | frames ``<u32 length><u32 CRC-32><pickle>``: the tree's state without its
  nodes (version table, removal counters), then the nodes in chunks of ~256k tokens, then ``("end", nodes)``. The
  state is ``StringRadixTrie.export_state``: every node with its text, ids, widths, logprobs, mask/version values,
  recency and optional spans. Written atomically: a temporary file in the
  same directory, fsync, ``os.replace``, fsync of the directory.
- ``PATH.journal``: the write-ahead journal. ``JOURNAL_MAGIC`` | u32 format | u32 header length | header (pickle:
  format, gen, fingerprint, time) | frames ``<u32 length><u32 CRC-32><records>``, one per commit, each record
  ``<u32 length><pickle of the redo record>``. A redo record is what ``StringRadixTrie.insert_raw`` was given, with
  the anchor as (tokens, chain end, position): the record's text and only its *new* tokens (ids, widths,
  logprobs, mask/version runs, optional spans, worker). The text is written out only when it does not continue
  the text of an earlier record of the same journal: a multi-turn record whose anchor position is where an
  earlier record's text ends is written as ``(that record's number in the journal, the text after it)`` (format
  2; a turn of a long conversation then costs its new text, not the whole conversation again). While a snapshot is
  being written the journal that continues it is ``PATH.journal.<gen>``.

Generations: a snapshot of generation g holds every record of the journals of generations < g; restoring loads
the snapshot and replays the journals of generation >= g in order (so a crash at any point of a rotation neither
loses nor repeats records).

The request path only pickles the redo record (~10 us for a 150-token turn: cheaper than keeping its lists alive
until the writer takes them, which costs the garbage collector more) and appends the bytes to an in-memory list
(under the tree lock it holds anyway); a background thread writes them as one frame and fsyncs, every
``journal_interval`` seconds (group commit). A crash (kill -9, power loss) loses at most the records of the last
interval. Every ``snapshot_interval`` seconds and on close, a snapshot is written and the journal restarted.

A snapshot or journal that cannot be used (truncated, corrupt, another format version, written with another
tokenizer) is renamed ``<file>.bad-<UTC time>`` (never deleted), the reason is logged as an ERROR, and the cache
starts empty. A journal that ends in a partial frame (the write a kill -9 interrupted) is expected: replay stops
there, logged at INFO with the count replayed.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import pickle
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from typing import Any

from .trie import StringRadixTrie

log = logging.getLogger("slime_router.radix_tree.persist")

SNAPSHOT_FORMAT = 1
JOURNAL_FORMAT = 2  # 2: records may reference an earlier record's text
SNAP_MAGIC = b"SLRSNAP\n"
JOURNAL_MAGIC = b"SLRJRNL\n"
_U32 = struct.Struct("<I")
_FRAME = struct.Struct("<II")  # length, crc32
PROTO = 5
DEFAULT_SNAPSHOT_INTERVAL = 300.0
DEFAULT_JOURNAL_INTERVAL = 1.0
# A record's text is written as a reference to an earlier record's when its anchor is at least REF_MIN_CHARS in.
# The writer keeps the texts it may reference (the last text of each live conversation: a referenced text is let go
# of, the next turn references the new one) up to REF_BUDGET_CHARS characters, oldest dropped first (their next
# turn is then written out whole).
REF_MIN_CHARS = 256
REF_TAIL = 32
REF_BUDGET_CHARS = 32 << 20


class Unusable(Exception):
    """A snapshot or journal that cannot be used; the message is the reason."""


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of what decides token ids: vocabulary size, a sample of 512 tokens spread over the vocabulary, and
    the added tokens. Another tokenizer (another model, another vocabulary) gives another fingerprint."""
    h = hashlib.sha256()
    n = 0
    try:
        n = len(tokenizer)
    except Exception:
        n = int(getattr(tokenizer, "vocab_size", 0) or 0)
    h.update(f"{type(tokenizer).__name__}|{n}|".encode())
    conv = getattr(tokenizer, "convert_ids_to_tokens", None)
    for i in range(0, n, max(1, n // 512)):
        try:
            tok = conv(i) if conv is not None else tokenizer.decode([i])
        except Exception:
            tok = None
        h.update(repr(tok).encode("utf-8", "surrogatepass") + b"\x00")
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    for i in sorted(added):
        h.update(f"{i}={getattr(added[i], 'content', added[i])}\x00".encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:32]


# --- files ----------------------------------------------------------------------------------------


def _fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _header(magic: bytes, fmt: int, header: dict) -> bytes:
    h = pickle.dumps(header, PROTO)
    return magic + _U32.pack(fmt) + _U32.pack(len(h)) + h


def _read_header(f: Any, magic: bytes, formats: tuple[int, ...], fingerprint: str, what: str) -> dict:
    head = f.read(len(magic) + 8)
    if len(head) < len(magic) + 8:
        raise Unusable(f"truncated: {len(head)} bytes, not even a header")
    if head[:len(magic)] != magic:
        raise Unusable(f"not a slime-router trajectory {what} (unknown magic bytes {head[:len(magic)]!r})")
    (fmt,) = _U32.unpack_from(head, len(magic))
    if fmt not in formats:
        raise Unusable(f"format version {fmt}; this router reads version {' or '.join(map(str, formats))}")
    (hlen,) = _U32.unpack_from(head, len(magic) + 4)
    raw = f.read(hlen)
    if len(raw) < hlen:
        raise Unusable("truncated inside the header")
    try:
        header = pickle.loads(raw)
        gen = int(header["gen"])
        fp = header["fingerprint"]
    except Exception as e:
        raise Unusable(f"corrupt header ({type(e).__name__}: {e})") from None
    if fp != fingerprint:
        raise Unusable(f"written with another tokenizer (fingerprint {fp}, this router's tokenizer has "
                       f"{fingerprint}); its token ids would be wrong for this model")
    header["gen"] = gen
    return header


SNAPSHOT_CHUNK_TOKENS = 1 << 18  # nodes are pickled in chunks of about this many tokens (the GIL is let go between)


def write_snapshot(path: str, state: dict, fingerprint: str, gen: int) -> int:
    """Write the snapshot atomically; returns its size in bytes. The nodes go in chunks (frames of
    ``<u32 length><u32 CRC-32><pickle of a list of nodes>``) after a first frame with the rest of the state, and
    an end frame with the node count: the router's threads run between chunks, and a cut file is seen as such."""
    nodes = state["nodes"]
    meta = {k: v for k, v in state.items() if k != "nodes"}
    header = {"format": SNAPSHOT_FORMAT, "gen": gen, "fingerprint": fingerprint, "time": time.time(),
              "tokens": state.get("size", 0), "nodes": len(nodes)}
    tmp = f"{path}.tmp-{os.getpid()}"

    def frame(obj: Any) -> bytes:
        data = pickle.dumps(obj, PROTO)
        return _FRAME.pack(len(data), zlib.crc32(data)) + data

    with open(tmp, "wb") as f:
        f.write(_header(SNAP_MAGIC, SNAPSHOT_FORMAT, header))
        f.write(frame(meta))
        i, n = 0, len(nodes)
        while i < n:
            j, tokens = i, 0
            while j < n and tokens < SNAPSHOT_CHUNK_TOKENS:
                tokens += len(nodes[j][2]) + 16
                j += 1
            f.write(frame(nodes[i:j]))
            i = j
        f.write(frame(("end", n)))
        f.flush()
        os.fsync(f.fileno())
        size = f.tell()
    os.replace(tmp, path)
    _fsync_dir(path)
    return size


def read_snapshot(path: str, fingerprint: str) -> tuple[int, dict]:
    """(generation, tree state); raises ``Unusable`` with the reason."""
    with open(path, "rb") as f:
        header = _read_header(f, SNAP_MAGIC, (SNAPSHOT_FORMAT,), fingerprint, "snapshot")
        objs: list[Any] = []
        while True:
            head = f.read(_FRAME.size)
            if len(head) < _FRAME.size:
                raise Unusable(f"truncated: it ends after {len(objs)} of its parts, before the end mark "
                               f"({f.tell():,} bytes)")
            size, crc = _FRAME.unpack(head)
            data = f.read(size)
            if len(data) < size:
                raise Unusable(f"truncated: part {len(objs) + 1} has {len(data):,} of its {size:,} bytes")
            if zlib.crc32(data) != crc:
                raise Unusable(f"corrupt: the checksum of part {len(objs) + 1} (at byte {f.tell() - size:,}) does "
                               f"not match")
            try:
                obj = pickle.loads(data)
            except Exception as e:
                raise Unusable(f"corrupt part {len(objs) + 1} ({type(e).__name__}: {e})") from None
            if isinstance(obj, tuple) and obj[:1] == ("end",):
                break
            objs.append(obj)
    try:
        state = dict(objs[0])
        state["nodes"] = [nd for chunk in objs[1:] for nd in chunk]
        state["vtable"]  # noqa: B018 -- a key import_state needs
    except Exception as e:
        raise Unusable(f"corrupt contents ({type(e).__name__}: {e})") from None
    if len(state["nodes"]) != obj[1] or len(state["nodes"]) != header.get("nodes", obj[1]):
        raise Unusable(f"corrupt: {len(state['nodes'])} nodes read, {obj[1]} written")
    return header["gen"], state


def read_journal(path: str, fingerprint: str) -> tuple[int, list[list[tuple]], str | None]:
    """(generation, frames of redo records, why reading stopped before the end or None); raises ``Unusable``
    when the header cannot be used."""
    with open(path, "rb") as f:
        header = _read_header(f, JOURNAL_MAGIC, (JOURNAL_FORMAT,), fingerprint, "journal")
        data = f.read()
    frames: list[list[tuple]] = []
    pos, n = 0, len(data)
    stop = None
    while pos < n:
        if n - pos < _FRAME.size:
            stop = f"a partial frame header at byte {pos:,} of {n:,} (the last write was interrupted)"
            break
        size, crc = _FRAME.unpack_from(data, pos)
        body = data[pos + _FRAME.size:pos + _FRAME.size + size]
        if len(body) < size:
            stop = f"a partial frame at byte {pos:,} ({len(body):,} of {size:,} bytes; the last write was interrupted)"
            break
        if zlib.crc32(body) != crc:
            stop = f"a frame with a wrong checksum at byte {pos:,} of {n:,}"
            break
        try:
            frames.append(_records(body))
        except Exception as e:
            stop = f"an unreadable frame at byte {pos:,} ({type(e).__name__}: {e})"
            break
        pos += _FRAME.size + size
    return header["gen"], frames, stop


def _records(body: bytes) -> list[tuple]:
    out, pos, n = [], 0, len(body)
    view = memoryview(body)
    while pos < n:
        (size,) = _U32.unpack_from(body, pos)
        if pos + 4 + size > n:
            raise ValueError("a record runs past the end of its frame")
        out.append(pickle.loads(view[pos + 4:pos + 4 + size]))
        pos += 4 + size
    return out


def resolve_texts(frames: list[list[tuple]]) -> Iterator[tuple | None]:
    """The redo records of one journal, in order, with every text reference replaced by the whole text (None for
    a reference to a record this journal does not have). Keeps only the texts a later record references, each
    until its reference (the writer references each at most once)."""
    wanted = {rec[0][0] for frame in frames for rec in frame if type(rec[0]) is tuple}
    kept: dict[int, str] = {}
    seq = 0
    for frame in frames:
        for rec in frame:
            text = rec[0]
            if type(text) is tuple:
                base = kept.pop(text[0], None)
                if base is None:
                    seq += 1
                    yield None
                    continue
                text = base[:rec[3]] + text[1]
                rec = (text, *rec[1:])
            if seq in wanted:
                kept[seq] = text
            seq += 1
            yield rec


def set_aside(path: str, reason: str, what: str) -> str:
    """Rename an unusable file to ``<path>.bad-<UTC time>`` (never deleted); log why; returns the new name."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest, k = f"{path}.bad-{stamp}", 1
    while os.path.exists(dest):
        dest, k = f"{path}.bad-{stamp}-{k}", k + 1
    os.replace(path, dest)
    log.error("radix_tree: the trajectory cache %s %s cannot be used: %s. It was moved to %s (not deleted)%s.",
              what, path, reason, dest, "; the cache starts empty" if what == "snapshot" else "")
    return dest


# --- the journal writer ---------------------------------------------------------------------------------


class Persistence:
    """Snapshot + journal of one ``StringRadixTrie``: ``restore()`` then ``start()`` before serving, ``close()`` at
    the end. The tree's ``journal`` hook is the only thing on the request path (an in-memory append)."""

    def __init__(self, tree: StringRadixTrie, path: str, fingerprint: str,
                 snapshot_interval: float = DEFAULT_SNAPSHOT_INTERVAL,
                 journal_interval: float = DEFAULT_JOURNAL_INTERVAL) -> None:
        self.tree = tree
        self.path = os.path.abspath(path)
        self.journal_path = self.path + ".journal"
        self.fingerprint = fingerprint
        self.snapshot_interval = float(snapshot_interval)
        self.journal_interval = min(1.0, max(0.001, float(journal_interval)))
        self.gen = 0
        self._buf: list[bytes] = []  # pickled redo records not committed yet
        # the texts a record may reference: {number in the journal: text}, oldest first, and their numbers by
        # (length, last REF_TAIL characters) (templated conversations share these: every candidate is compared)
        self._texts: dict[int, str] = {}
        self._by_end: dict[tuple[int, str], list[int]] = {}
        self._text_chars = 0
        self._seq = 0  # the number of the next record in the current journal
        self.journal_text_chars = 0  # characters of text written out (referenced prefixes excluded)
        self.journal_errors = 0
        self._file: Any = None
        self._file_lock = threading.Lock()  # taken before the tree's lock, never after
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_snapshot = time.monotonic()
        self.restored_records = 0
        self.journal_frames = 0
        self.journal_records = 0
        self.journal_bytes = 0
        self.snapshots = 0
        self.last_snapshot: dict[str, Any] = {}
        self.closed = False
        self._lock_fd: int | None = None

    # --- restore ---------------------------------------------------------------------------------

    def _lock_files(self, wait: float = 60.0) -> None:
        """One cache per snapshot path: an exclusive lock on ``PATH.lock`` (released when the process ends)."""
        import fcntl

        fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._lock_fd = fd
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise RuntimeError(f"the trajectory cache snapshot {self.path} is in use by another process "
                                       f"(it holds {self.path}.lock); give each router its own --cache-snapshot") \
                        from None
                time.sleep(0.1)

    def _unlock_files(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)

    def _journals(self) -> list[str]:
        found = [self.journal_path] if os.path.exists(self.journal_path) else []
        found += [p for p in glob.glob(glob.escape(self.journal_path) + ".*") if p.rsplit(".", 1)[1].isdigit()]
        return found

    def restore(self) -> None:
        """Load the snapshot and replay the journals after it; then write a fresh snapshot and open a new journal.
        Anything unusable is set aside (and logged) and the cache starts empty."""
        tree = self.tree
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        self._lock_files()
        t0 = time.perf_counter()
        for tmp in glob.glob(glob.escape(self.path) + ".tmp-*"):  # a snapshot whose writing was interrupted
            os.unlink(tmp)
        snap_gen = 0
        have_snapshot = os.path.exists(self.path)
        if have_snapshot:
            try:
                snap_gen, state = read_snapshot(self.path, self.fingerprint)
                try:
                    tree.import_state(state)
                except Exception as e:
                    tree.import_state(StringRadixTrie(tree.max_tokens, tree.gc_k).export_state())  # empty again
                    raise Unusable(f"corrupt tree data ({type(e).__name__}: {e})") from None
                del state
                log.info("radix_tree: restored the trajectory cache snapshot %s (generation %d): %s tokens in %s "
                         "nodes, %.2f s", self.path, snap_gen, f"{tree.size:,}", f"{tree.node_count:,}",
                         time.perf_counter() - t0)
            except (Unusable, OSError) as e:
                set_aside(self.path, str(e), "snapshot")
                for j in self._journals():  # they continue the snapshot set aside: useless without it
                    set_aside(j, "it continues a snapshot that was set aside", "journal")
                self.gen = 1
                self._rotate(initial=True)
                return
        journals: list[tuple[int, str, list[list[tuple]], str | None]] = []
        for j in self._journals():
            try:
                gen, frames, stop = read_journal(j, self.fingerprint)
            except (Unusable, OSError) as e:
                set_aside(j, str(e), "journal")
                continue
            if gen < snap_gen:
                continue  # already in the snapshot (a rotation was interrupted after the snapshot was written)
            if not have_snapshot and gen > 0:
                set_aside(j, f"it continues a snapshot of generation {gen} that is missing", "journal")
                continue
            journals.append((gen, j, frames, stop))
        journals.sort(key=lambda x: x[0])
        # replay without evicting (each record was made on the state the records before it left; LRU order is not
        # journaled, so eviction could differ): the bound is applied once at the end
        tree._evict_to = lambda limit: None  # type: ignore[method-assign]
        top = snap_gen
        try:
            for gen, j, frames, stop in journals:
                done = skipped = 0
                for rec in resolve_texts(frames):
                    if rec is None:
                        skipped += 1  # it continued a text the journal does not have (cannot happen when written
                        continue  # by _append; a hand-edited file)
                    if tree.redo(rec):
                        done += 1
                    else:
                        skipped += 1
                self.restored_records += done
                top = max(top, gen)
                if stop is None:
                    log.info("radix_tree: replayed %d record(s) of the trajectory cache journal %s", done, j)
                elif stop.startswith("a partial"):
                    log.info("radix_tree: replayed %d record(s) of the trajectory cache journal %s; it ends in %s: "
                             "the records of that write are lost (at most one commit interval)", done, j, stop)
                else:
                    log.warning("radix_tree: replayed %d record(s) of the trajectory cache journal %s, then found %s; "
                                "the records after it are lost", done, j, stop)
                if skipped:
                    log.warning("radix_tree: %d journal record(s) of %s continued a trajectory that is not in the "
                                "cache and were skipped", skipped, j)
        finally:
            del tree._evict_to
            with tree.lock:
                tree._evict_to(tree.max_tokens)
        self.gen = top + 1
        self._rotate(initial=True)
        log.info("radix_tree: trajectory cache restored from %s: %s tokens (%d journal records replayed) in %.2f s; "
                 "journal %s, fsync every %.3g s, snapshot every %.0f s", self.path, f"{tree.size:,}",
                 self.restored_records, time.perf_counter() - t0, self.journal_path, self.journal_interval,
                 self.snapshot_interval)

    # --- running ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Attach the journal to the tree and start the writer thread (after ``restore``)."""
        with self.tree.lock:
            self.tree.journal = self._append
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="trajectory-journal", daemon=True)
        self._thread.start()

    def _append(self, rec: tuple) -> None:
        """The tree's journal hook (request path, under the tree lock): pickle, append; never raises."""
        text, pos = rec[0], rec[3]
        out, written = rec, len(text)
        texts, by_end = self._texts, self._by_end
        if pos >= REF_MIN_CHARS:  # the previous turn's text, when this record continues it where it ended
            key = (pos, text[pos - REF_TAIL:pos])
            for seq in by_end.get(key, ()):
                if text.startswith(texts[seq]):
                    self._forget(seq, key)
                    out, written = ((seq, text[pos:]), *rec[1:]), len(text) - pos
                    break
        try:
            data = pickle.dumps(out, PROTO)
        except Exception:
            self.journal_errors += 1
            if self.journal_errors == 1:
                log.exception("radix_tree: a trajectory record could not be journaled (it is in the cache, and in "
                              "the next snapshot)")
            return
        self._buf.append(_U32.pack(len(data)) + data)
        self.journal_text_chars += written
        seq = self._seq
        self._seq += 1
        texts[seq] = text
        by_end.setdefault((len(text), text[-REF_TAIL:]), []).append(seq)
        self._text_chars += len(text)
        while self._text_chars > REF_BUDGET_CHARS:
            old = next(iter(texts))
            self._forget(old, (len(texts[old]), texts[old][-REF_TAIL:]))

    def _forget(self, seq: int, key: tuple[int, str]) -> None:
        self._text_chars -= len(self._texts.pop(seq))
        seqs = self._by_end[key]
        seqs.remove(seq)
        if not seqs:
            del self._by_end[key]

    def _new_journal(self) -> None:
        """Records appended from now on go to a new journal (under the tree lock): numbered from 0, referencing
        only each other."""
        self._texts = {}
        self._by_end = {}
        self._text_chars = 0
        self._seq = 0

    def _take(self) -> list[bytes]:
        """The records appended since the last call (under the tree lock: none is lost or taken twice)."""
        with self.tree.lock:
            buf, self._buf = self._buf, []
        return buf

    def _write(self, records: list[bytes]) -> None:
        """One frame, fsynced (call with ``_file_lock`` held)."""
        if not records or self._file is None:
            return
        body = b"".join(records)
        self._file.write(_FRAME.pack(len(body), zlib.crc32(body)) + body)
        self._file.flush()
        os.fsync(self._file.fileno())
        self.journal_frames += 1
        self.journal_records += len(records)
        self.journal_bytes += len(body) + _FRAME.size

    def flush(self) -> None:
        """Commit the records appended so far (group commit: one write, one fsync)."""
        with self._file_lock:
            self._write(self._take())

    def _run(self) -> None:
        while not self._stop.wait(self.journal_interval):
            try:
                self.flush()
                if time.monotonic() - self._last_snapshot >= self.snapshot_interval:
                    self.snapshot()
            except Exception:
                log.exception("radix_tree: writing the trajectory cache journal / snapshot failed; retrying")

    def snapshot(self) -> None:
        """Write a snapshot and restart the journal (the journal keeps being written meanwhile)."""
        self._rotate(initial=False)

    def _rotate(self, initial: bool) -> None:
        tree = self.tree
        t0 = time.perf_counter()
        with self._file_lock:
            with tree.lock:
                t_lock = time.perf_counter()
                pending = self._take() if not initial else []
                self._new_journal()
                state = tree.export_state()
                t_export = time.perf_counter() - t_lock
            self._write(pending)  # the old journal holds them, in case the snapshot below does not get written
            gen = self.gen if initial else self.gen + 1
            nxt = f"{self.journal_path}.{gen}"
            f = open(nxt, "wb")
            f.write(_header(JOURNAL_MAGIC, JOURNAL_FORMAT, {"format": JOURNAL_FORMAT, "gen": gen,
                                                            "fingerprint": self.fingerprint, "time": time.time()}))
            f.flush()
            os.fsync(f.fileno())
            _fsync_dir(nxt)
            old, self._file = self._file, f
            if old is not None:
                old.close()
        size = write_snapshot(self.path, state, self.fingerprint, gen)
        del state
        os.replace(nxt, self.journal_path)
        _fsync_dir(self.journal_path)
        for stale in self._journals():
            if stale != self.journal_path:
                os.unlink(stale)  # older generations: in the snapshot now
        self.gen = gen
        self._last_snapshot = time.monotonic()
        self.snapshots += 1
        self.last_snapshot = {"bytes": size, "tokens": tree.size, "seconds": time.perf_counter() - t0,
                              "lock_seconds": t_export, "gen": gen}
        log.info("radix_tree: trajectory cache snapshot %s written: %s tokens, %.1f MB in %.2f s (tree locked "
                 "%.0f ms)", self.path, f"{tree.size:,}", size / 1e6, time.perf_counter() - t0, t_export * 1e3)

    def close(self) -> None:
        """Commit the journal, write a final snapshot, stop the writer."""
        if self.closed:
            return
        self.closed = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self.snapshot()
        finally:
            with self.tree.lock:
                self.tree.journal = None
            with self._file_lock:
                if self._file is not None:
                    self._file.close()
                    self._file = None
            self._unlock_files()

    def crash(self) -> None:
        """Stop as a kill -9 would (tests): the records not committed yet are dropped, no snapshot is written."""
        self.closed = True
        self._stop.set()
        with self.tree.lock:
            self.tree.journal = None
            self._buf = []
        if self._thread is not None:
            self._thread.join()
        with self._file_lock:
            if self._file is not None:
                self._file.close()
                self._file = None
        self._unlock_files()

    def stats(self) -> dict:
        return {"path": self.path, "gen": self.gen, "journal_records": self.journal_records,
                "journal_frames": self.journal_frames, "journal_bytes": self.journal_bytes,
                "snapshots": self.snapshots, "last_snapshot": dict(self.last_snapshot),
                "restored_records": self.restored_records, "journal_errors": self.journal_errors,
                "journal_text_chars": self.journal_text_chars, "referenceable_text_chars": self._text_chars}
