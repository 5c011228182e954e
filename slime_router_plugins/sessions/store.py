"""Sessions: every turn of a trajectory id, kept as the exact tokens the worker consumed and produced.

A session is what one agent episode sent under one ``X-Session-ID`` (or ``/sessions/{sid}/...`` base URL). Each
turn is stored from the request the worker received (its ``input_ids``: the cache's recorded prefix + fresh
tokens) and the worker's reply (output ids, logprobs, weight versions) -- the same bytes the trajectory cache
records, so retrieval by session equals retrieval by text, and stays exact even when the cache evicts.

Turns are folded into *segments*, one trainer-ready trajectory each (tokens, loss mask, logprobs, versions from
token 0):

- a turn whose prompt starts with a segment's tokens continues that segment (the usual multi-turn case);
- otherwise it starts a new segment, which says why: ``"new"`` (it shares at most part of a segment's first prompt:
  a system prompt, the template's first tokens), ``"branch"`` (its prompt is a prefix of a segment's tokens: a
  sibling sample of a turn already taken, e.g. the 2nd..nth sample of a GRPO group), or ``"rewrite"`` (it shares a
  segment's whole first prompt and departs later, from a generated token on: the agent changed or dropped
  history). The segment copies the shared prefix from its ``parent`` (so generated
  tokens there keep loss mask 1) and records ``diverges_at`` (the first token that differs).

Memory: 9 bytes per stored token (id int32, logprob float32, mask byte) plus the version runs; finishing a
session (``DELETE``) or its TTL frees it. A segment's tokens are copied from its parent (GRPO siblings each hold
their prompt).
"""

from __future__ import annotations

import threading
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from slime_router_core.speedups import typed_array


@dataclass
class Turn:
    """One generation of a segment: where it starts and what it added."""

    request_id: str
    prompt_tokens: int  # tokens of the prompt the worker received
    output_tokens: int
    finish_reason: Any
    time: float
    group: str | None  # the request's group of samples (n > 1 or a batch), else None

    def as_dict(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "prompt_tokens": self.prompt_tokens,
                "output_tokens": self.output_tokens, "finish_reason": self.finish_reason, "time": self.time,
                "group": self.group}


@dataclass
class Segment:
    """One trajectory from token 0: ids, float32 logprobs (0.0 where there is none: prompt tokens, as
    ``/retrieve_from_text`` answers), loss mask, and the weight version of every token as runs
    ``[count, version]``."""

    index: int
    reason: str  # "new" | "branch" | "rewrite"
    parent: int | None
    diverges_at: int | None
    ids: array = field(default_factory=lambda: array("i"))
    logp: array = field(default_factory=lambda: array("f"))
    mask: bytearray = field(default_factory=bytearray)
    versions: list[list[Any]] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def nbytes(self) -> int:
        return 9 * len(self.ids) + 64 * len(self.versions) + 200 * len(self.turns) + 200

    def _add_versions(self, count: int, version: str) -> None:
        if count <= 0:
            return
        if self.versions and self.versions[-1][1] == version:
            self.versions[-1][0] += count
        else:
            self.versions.append([count, version])

    def _copy_prefix(self, other: Segment, n: int) -> None:
        self.ids = other.ids[:n]
        self.logp = other.logp[:n]
        self.mask = other.mask[:n]
        left = n
        for count, v in other.versions:
            if left <= 0:
                break
            self._add_versions(min(count, left), v)
            left -= count

    def version_list(self) -> list[str]:
        out: list[str] = []
        for count, v in self.versions:
            out += [v] * count
        return out

    def as_dict(self, arrays: bool = True) -> dict[str, Any]:
        gen = self.mask.count(1)
        d: dict[str, Any] = {"index": self.index, "reason": self.reason, "parent": self.parent,
                             "diverges_at": self.diverges_at, "token_length": len(self.ids), "generated_tokens": gen,
                             "turns": [t.as_dict() for t in self.turns]}
        if arrays:
            d["tokens"] = self.ids.tolist()
            d["loss_mask"] = list(self.mask)
            d["rollout_logp"] = self.logp.tolist()
            d["weight_versions"] = self.version_list()
        return d


def common_prefix(a: array, b: array) -> int:
    """Length of the common prefix of two int arrays (bisection on slice equality: C-speed compares)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class Session:
    def __init__(self, sid: str, metadata: dict[str, Any] | None = None) -> None:
        self.id = sid
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.created = time.time()
        self.last_used = time.monotonic()
        self.segments: list[Segment] = []
        self.gaps: list[dict[str, Any]] = []  # turns that could not be stored exactly, each with why
        self.requests = 0
        self.wb: Any = None  # the write-behind's state (--session-store-url), else None
        # the last add_turn's prompt as (segment index or -1, k, ids after k): prompt[:k] == that segment's ids[:k]
        self.last_ref: tuple[int, int] = (-1, 0)

    def add_turn(self, prompt_ids: Sequence[int], out_ids: list[int], out_logp: list[float | None],
                 out_versions: list[str], prompt_version: str, request_id: str, finish_reason: Any,
                 group: str | None) -> Segment:
        """Fold one generation into the session's segments; returns the segment it went to. ``prompt_ids``: a list,
        or an int32 array (taken as is, not changed)."""
        prompt = (prompt_ids if isinstance(prompt_ids, array) and prompt_ids.typecode == "i"
                  else typed_array("i", prompt_ids))
        n = len(prompt)
        seg = None
        best = -1
        for s in self.segments:  # the longest segment this prompt continues
            k = len(s.ids)
            if k <= n and k > best and (k == 0 or (s.ids[k - 1] == prompt[k - 1] and s.ids == prompt[:k])):
                seg, best = s, k
        if seg is not None:
            self.last_ref = (seg.index, best)
        else:
            parent, shared = None, 0
            for s in self.segments:
                c = common_prefix(s.ids, prompt)
                if c > shared:
                    parent, shared = s, c
            self.last_ref = (parent.index, shared) if parent is not None else (-1, 0)
            if parent is not None and shared < n:
                first_generated = parent.mask.find(1)
                if first_generated < 0 or shared < first_generated:
                    parent = None  # it shares only part of the first prompt (a system prompt, the template): new
            if parent is None:
                reason, diverges = "new", None
            else:
                reason, diverges = ("branch" if shared == n else "rewrite"), shared
            seg = Segment(len(self.segments), reason, parent.index if parent else None, diverges)
            if parent is not None:  # the shared prefix as the parent holds it (its generated tokens keep mask 1)
                seg._copy_prefix(parent, shared)
            self.segments.append(seg)
        start = len(seg.ids)
        fresh = n - start
        seg.ids.extend(prompt[start:])
        seg.logp.extend(array("f", bytes(4 * fresh)))
        seg.mask.extend(bytes(fresh))
        seg._add_versions(fresh, prompt_version)
        seg.ids.extend(typed_array("i", out_ids))
        seg.logp.extend(array("f", [0.0 if x is None else x for x in out_logp]))
        seg.mask.extend(b"\x01" * len(out_ids))
        for v in out_versions:  # runs: consecutive equal versions merge
            seg._add_versions(1, v)
        seg.turns.append(Turn(request_id, n, len(out_ids), finish_reason, time.time(), group))
        return seg

    def nbytes(self) -> int:
        return 500 + sum(s.nbytes() for s in self.segments)

    def summary(self) -> dict[str, Any]:
        return {"session_id": self.id, "metadata": self.metadata, "created": self.created,
                "requests": self.requests, "segments": len(self.segments),
                "tokens": sum(len(s) for s in self.segments), "gaps": len(self.gaps)}

    def as_dict(self, arrays: bool = True) -> dict[str, Any]:
        d = self.summary()
        d["gaps"] = list(self.gaps)
        d["trajectories"] = [s.as_dict(arrays) for s in self.segments]
        return d


class SessionGone(Exception):
    """A session id that cannot be used: ``status``, ``code`` and ``message`` -- 409 ``session_finished``, 404
    ``session_expired``, 429 ``too_many_sessions`` (opening one more would pass ``--session-max``)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class SessionStore:
    """Live sessions by id, the memory they hold, their TTL, and tombstones of finished/expired ids (so a late
    request for one is refused instead of silently starting an empty session)."""

    TOMBSTONES = 100_000

    def __init__(self, ttl: float, max_sessions: int) -> None:
        self.ttl = ttl
        self.max_sessions = max_sessions
        self.sessions: dict[str, Session] = {}
        self.gone: dict[str, tuple[str, float]] = {}  # id -> ("finished" | "expired", when), oldest first
        self.lock = threading.Lock()
        self.counters = {"created": 0, "finished": 0, "expired": 0, "turns": 0, "gaps": 0, "refused_gone": 0}
        self.write_behind: Any = None  # write_behind.WriteBehind with --session-store-url

    def _check_gone(self, sid: str) -> None:
        g = self.gone.get(sid)
        if g is not None:
            self.counters["refused_gone"] += 1
            what, when = g
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))
            if what == "finished":
                raise SessionGone(409, "session_finished",
                                  f"Session {sid!r} was finished (DELETE /sessions/{sid}) at {stamp}; its trajectories "
                                  f"were handed over and freed. Use a new session id.")
            raise SessionGone(404, "session_expired",
                              f"Session {sid!r} expired at {stamp} after {self.ttl:g} s without a request "
                              f"(--session-ttl); its trajectories were freed. Use a new session id.")

    def get(self, sid: str) -> Session | None:
        with self.lock:
            s = self.sessions.get(sid)
            if s is None:
                self._check_gone(sid)
            return s

    def open(self, sid: str, metadata: dict[str, Any] | None = None) -> tuple[Session, bool]:
        """The live session ``sid`` (created when new); raises ``SessionGone`` for a finished/expired id."""
        with self.lock:
            s = self.sessions.get(sid)
            if s is not None:
                if metadata:
                    s.metadata.update(metadata)
                s.last_used = time.monotonic()
                return s, False
            self._check_gone(sid)
            if self.max_sessions and len(self.sessions) >= self.max_sessions:
                raise SessionGone(429, "too_many_sessions",
                                  f"{len(self.sessions):,} sessions are open, the limit (--session-max); finish "
                                  f"sessions (DELETE /sessions/{{sid}}) when their trajectories are retrieved, or "
                                  f"raise the limit.")
            s = self.sessions[sid] = Session(sid, metadata)
            self.counters["created"] += 1
            return s, True

    def knows(self, sid: str) -> bool:
        """Is ``sid`` live here, or finished / expired here?"""
        return sid in self.sessions or sid in self.gone

    def adopt(self, session: Session) -> Session:
        """Put a session rebuilt elsewhere (the write-behind's load) among the live ones; the live one if ``sid``
        got opened meanwhile."""
        with self.lock:
            s = self.sessions.get(session.id)
            if s is not None:
                return s
            self._check_gone(session.id)
            session.last_used = time.monotonic()
            self.sessions[session.id] = session
            self.counters["created"] += 1
            return session

    def bury(self, sid: str, what: str, when: float) -> None:
        """Remember ``sid`` as finished/expired at ``when`` (read from the write-behind's store)."""
        with self.lock:
            if sid not in self.sessions:
                self._bury(sid, what, when)

    def _bury(self, sid: str, what: str, when: float | None = None) -> None:
        self.gone[sid] = (what, time.time() if when is None else when)
        while len(self.gone) > self.TOMBSTONES:
            del self.gone[next(iter(self.gone))]

    def finish(self, sid: str) -> Session:
        with self.lock:
            s = self.sessions.pop(sid, None)
            if s is None:
                self._check_gone(sid)
                raise KeyError(sid)
            self._bury(sid, "finished")
            self.counters["finished"] += 1
            return s

    def expire(self, now: float | None = None) -> int:
        """Drop the sessions unused for longer than the TTL; returns how many."""
        if not self.ttl:
            return 0
        now = time.monotonic() if now is None else now
        with self.lock:
            old = [sid for sid, s in self.sessions.items() if now - s.last_used > self.ttl]
            for sid in old:
                del self.sessions[sid]
                self._bury(sid, "expired")
            self.counters["expired"] += len(old)
        return len(old)

    def overview(self, limit: int) -> list[dict[str, Any]]:
        """The ``limit`` most recent sessions: their summaries and each trajectory's structure (reason, parent,
        diverges_at, lengths, the weight versions it holds, its turns' groups), no token lists."""
        with self.lock:
            live = sorted(self.sessions.values(), key=lambda x: x.created, reverse=True)[:limit]
        out = []
        for sess in live:
            d = sess.summary()
            d["trajectories"] = [{
                "index": t.index, "reason": t.reason, "parent": t.parent, "diverges_at": t.diverges_at,
                "token_length": len(t.ids), "generated_tokens": t.mask.count(1), "turns": len(t.turns),
                "weight_versions": sorted({str(v) for _, v in t.versions}),
                "groups": sorted({str(turn.group) for turn in t.turns if turn.group})} for t in list(sess.segments)]
            out.append(d)
        return out

    def stats(self) -> dict[str, Any]:
        with self.lock:
            live = list(self.sessions.values())
        return {"sessions": len(live), "tokens": sum(len(g) for s in live for g in s.segments),
                "bytes": sum(s.nbytes() for s in live), "ttl_seconds": self.ttl, "max_sessions": self.max_sessions,
                **self.counters, **({"store": self.write_behind.stats()} if self.write_behind is not None else {})}
