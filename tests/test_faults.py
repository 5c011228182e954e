"""Faults under load, against real processes on real sockets: the trajectory cache's child process SIGKILLed while
clients run multi-turn conversations, and the whole router SIGKILLed mid-load then restarted from its snapshot and
write-ahead journal (--cache-snapshot, --cache-journal-interval).

Every client notes, for each reply it got, when it arrived, the trajectory text, the token ids and logprobs the
reply carried, and a strict retrieval of the text made right after it. After the fault the same texts are
retrieved again and compared: what was committed (a reply that reached its client several commit intervals before
the kill) must come back exactly; what was not may be missing, never different.

A worker SIGKILLed under load, the trajectory cache on: no request fails, every turn is recorded exactly (the
same without the cache, in-thread workers and the router: tests/test_balancing.py::
test_killed_worker_mid_run_fails_no_request).
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import threading
import time
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from pprint import pformat
from typing import Any

import httpx
import pytest

from slime_router_core.tokenizers import BUILTIN_CHECKPOINT
from slime_router_testing.servers import free_port, stop_process_group, wait_http

pytestmark = pytest.mark.slow

# What a retrieval must give back exactly (test_cache_persistence.py's KEYS but worker_url: that is the worker of the
# newest record through the text, for affinity, and the conversation's next turn may have gone to the other one).
KEYS = ("tokens", "loss_mask", "rollout_logp", "weight_versions", "exact_tokens", "fresh_tokens", "evicted")
CLIENTS = 8
TURNS = 5  # turns per conversation; then the client starts a new one (the texts stay short)
COMMITTED = 0.5  # s: a reply that reached its client this long before a kill is committed (5 journal intervals)
JOURNAL_INTERVAL = "0.1"
EOS = 151645  # <|im_end|>


def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"not in {timeout} s: {what}"
        time.sleep(0.05)


def serve(workers: list[str], snapshot: str | None, *extra: str) -> tuple[subprocess.Popen, str]:
    """The real CLI in its own session (``os.killpg`` ends it and its cache process)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIME_ROUTER_")}
    cmd = [sys.executable, "-m", "slime_router_core.cli", "serve", "--hf-checkpoint", BUILTIN_CHECKPOINT,
           "--plugin", "radix_tree", "--host", "127.0.0.1", "--port", str(port)]
    for w in workers:
        cmd += ["--worker-url", w]
    if snapshot:
        cmd += ["--cache-snapshot", snapshot, "--cache-journal-interval", JOURNAL_INTERVAL]
    proc = subprocess.Popen(cmd + list(extra), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health", timeout=120, proc=proc)
    except BaseException:
        kill_group(proc)
        raise
    return proc, url


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@dataclass
class Turn:
    """One reply as its client saw it."""

    client: int
    text: str  # the trajectory: prompt + the reply's text
    sent: float  # time.monotonic() when the request went out
    arrived: float  # ... and when its reply was read
    out_ids: list[int]  # what the reply carried
    out_logp: list[float]
    first_status: int | None = None  # strict retrieval right after the reply (None: not made, the router died)
    first: dict | None = None  # its KEYS when 200


def pick(body: dict) -> dict:
    return {k: body[k] for k in KEYS}


class Load:
    """``CLIENTS`` threads, each with its own connection, running multi-turn conversations on /generate and
    retrieving (strict) every trajectory right after its reply."""

    def __init__(self, url: str, tag: str) -> None:
        self.url, self.tag = url, tag
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.turns: list[Turn] = []
        self.failures: list[tuple[float, str]] = []  # (when, what): a /generate that did not answer 200
        self.cut: list[tuple[float, str]] = []  # ... a retrieval right after a reply that did not answer
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(CLIENTS)]

    def start(self) -> Load:
        self.t0 = time.monotonic()
        for t in self.threads:
            t.start()
        return self

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)
            assert not t.is_alive(), "a client thread hangs"

    def wait(self, cond: Callable[[], bool], timeout: float, what: str) -> None:
        """``wait_until(cond)``, or until a client failed (it stopped: the caller asserts there is no failure)."""
        wait_until(lambda: bool(self.failures) or cond(), timeout, what)

    def count(self, since: float = 0.0) -> int:
        """Replies to requests sent at ``since`` or later."""
        with self.lock:
            return sum(1 for t in self.turns if t.sent >= since)

    def committed(self) -> int:
        """Replies that reached their client at least COMMITTED seconds ago."""
        now = time.monotonic()
        with self.lock:
            return sum(1 for t in self.turns if t.arrived < now - COMMITTED)

    def clients(self, since: float) -> int:
        """Clients that got a reply to a request sent at ``since`` or later."""
        with self.lock:
            return len({t.client for t in self.turns if t.sent >= since})

    def _client(self, i: int) -> None:
        with httpx.Client(timeout=60) as c:
            conv = 0
            while not self.stop.is_set():
                text = f"<|im_start|>user\nClient {self.tag}{i}, conversation {conv}: tell me a story.<|im_end|>\n" \
                       f"<|im_start|>assistant\n"
                for turn in range(TURNS):
                    if self.stop.is_set():
                        return
                    if turn:
                        text += f"<|im_end|>\n<|im_start|>user\nAnd then, part {turn}?<|im_end|>\n" \
                                f"<|im_start|>assistant\n"
                    sent = time.monotonic()
                    try:
                        r = c.post(self.url + "/generate", json={
                            "text": text, "return_logprob": True, "sampling_params": {"max_new_tokens": 12}})
                    except httpx.HTTPError as e:
                        with self.lock:
                            self.failures.append((time.monotonic(), f"client {i}: {type(e).__name__}: {e}"))
                        return
                    arrived = time.monotonic()
                    if r.status_code != 200:
                        with self.lock:
                            self.failures.append((arrived, f"client {i}: {r.status_code} {r.text[:300]}"))
                        return
                    body = r.json()
                    text += body["text"]
                    lps = body["meta_info"]["output_token_logprobs"]
                    # the cache keeps logprobs as float32
                    t = Turn(i, text, sent, arrived, [x[1] for x in lps], list(array("f", [x[0] for x in lps])))
                    assert t.out_ids == body["output_ids"]
                    with self.lock:
                        self.turns.append(t)
                    try:
                        q = c.post(self.url + "/retrieve_from_text", json={"text": text, "strict": True})
                    except httpx.HTTPError as e:  # the router died after the reply: retrieved after its restart
                        with self.lock:
                            self.cut.append((time.monotonic(), f"client {i}: retrieval {type(e).__name__}: {e}"))
                        return
                    t.first_status = q.status_code
                    if q.status_code == 200:
                        t.first = pick(q.json())
                conv += 1


def retrieve(c: httpx.Client, url: str, text: str) -> tuple[int, dict | None]:
    r = c.post(url + "/retrieve_from_text", json={"text": text, "strict": True})
    assert r.status_code in (200, 404), r.text  # 404: not recorded (410 would be evicted: never, at this size)
    return r.status_code, pick(r.json()) if r.status_code == 200 else None


def recorded_exactly(t: Turn, got: dict) -> bool:
    """``got`` (a retrieval of ``t.text``) holds the reply as generated: its ids, mask 1, the reply's logprobs,
    after a prompt recorded before (no fresh tokens); and equals the retrieval made right after the reply."""
    n = len(t.out_ids)
    ok = (got["fresh_tokens"] == 0 and got["tokens"][-n:] == t.out_ids and got["loss_mask"][-n:] == [1] * n
          and got["rollout_logp"][-n:] == t.out_logp)
    return ok and (t.first is None or got == t.first)


def classify(t: Turn, status: int, got: dict | None) -> str:
    """exact | absent (strict 404: never recorded, or lost) | prompt (not recorded as a reply, or lost, then
    recorded as the prompt of the conversation's next turn: the same ids, with loss_mask 0 and no logprob, which
    the trainer does not train on) | WRONG (anything else: different ids, mask, logprobs or versions)."""
    if status == 404:
        return "absent"
    assert got is not None
    if recorded_exactly(t, got):
        return "exact"
    # the reply's text is in the tree only as a prompt: its ids (but the EOS, whose text "<|im_end|>" is not in
    # t.text), freshly tokenized when the next turn came (the mock's replies tokenize back to the same ids)
    n = len(t.out_ids) - (t.out_ids[-1] == EOS)
    tail_ok = (got["fresh_tokens"] == 0 and got["tokens"][len(got["tokens"]) - n:] == t.out_ids[:n]
               and not any(got["loss_mask"][-n:]) and not any(got["rollout_logp"][-n:]))
    if tail_ok and t.first is not None:  # and all before the reply is as it was
        k = len(t.first["tokens"]) - len(t.out_ids)
        tail_ok = len(got["tokens"]) - n == k and all(got[key][:k] == t.first[key][:k] for key in KEYS[:4])
    return "prompt" if tail_ok else "WRONG"


def explain(t: Turn, status: int, got: dict | None) -> dict:
    """What a WRONG retrieval looks like (for the assertion message)."""
    out: dict[str, Any] = {"text_tail": t.text[-60:], "first_status": t.first_status, "status": status,
                           "out_ids": t.out_ids, "out_logp": t.out_logp}
    if got is not None:
        n = len(t.out_ids)
        out.update(got_tail={k: got[k][-n - 2:] for k in ("tokens", "loss_mask", "rollout_logp", "weight_versions")},
                   got_fresh=got["fresh_tokens"])
        if t.first is not None:
            out["differs_from_first"] = [k for k in KEYS if got[k] != t.first[k]]
    return out


Row = tuple[str, Turn, str, int, "dict | None"]  # group, turn, classify(), retrieval status, retrieval


def report(name: str, rows: list[Row]) -> Counter:
    counts = Counter((r[0], r[2]) for r in rows)
    print(f"\n{name}: " + ", ".join(f"{g}/{k}={v}" for (g, k), v in sorted(counts.items())))
    return counts


# --- the cache process SIGKILLed under load ----------------------------------------------------------------


def test_cache_process_killed_under_load(tmp_path: Path, mock_worker_process: Callable[..., Any]) -> None:
    """--radix-tree-process with --cache-snapshot: the cache's child process is SIGKILLed while 8 clients run
    multi-turn conversations. No /generate fails (while the child is down or restarting, requests pass through
    unrecorded); the restarted child restores the snapshot and journal, so what was committed before the kill is
    served exactly, and the conversations going on after the restart are recorded exactly again."""
    workers = [mock_worker_process(seed=s, max_random_tokens=12, latency=0.01).url for s in (1, 2)]
    proc, url = serve(workers, str(tmp_path / "c.snap"), "--radix-tree-process")
    load = None
    try:
        with httpx.Client(timeout=60) as c:
            def stats() -> dict:
                return c.get(url + "/radix_tree/stats").json()["process"]

            load = Load(url, "k").start()
            load.wait(lambda: load.committed() >= 30, 30, "30 replies COMMITTED seconds before the kill")
            assert not load.failures, load.failures
            pid = stats()["pid"]
            t_kill = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda: (s := stats())["restarts"] == 1 and s["running"] and s["pid"] != pid, 60,
                       "the cache process restarted")
            t_restarted = time.monotonic()
            # the load goes on: every client completes turns sent after the restart (recorded by the new child)
            load.wait(lambda: load.clients(t_restarted) == CLIENTS and load.count(t_restarted) >= 2 * CLIENTS, 30,
                      "turns after the restart")
            load.join()
            assert not load.failures, load.failures  # zero failed /generate, during the whole run
            assert stats()["restarts"] == 1

            rows: list[Row] = []
            for t in load.turns:
                status, got = retrieve(c, url, t.text)
                kind = classify(t, status, got)
                if t.arrived < t_kill - COMMITTED:
                    group = "committed"  # must be exact
                    assert t.first_status == 200 and t.first is not None and t.first["fresh_tokens"] == 0, t
                elif t.sent >= t_restarted:
                    group = "after"  # recorded by the restarted child: exact, right away and now
                    assert t.first_status == 200 and t.first is not None, t
                    assert t.first["fresh_tokens"] == 0 and sum(t.first["loss_mask"]) >= len(t.out_ids)
                else:
                    group = "around"
                rows.append((group, t, kind, status, got))
        counts = report("cache process killed", rows)
        during = sum(1 for t in load.turns if t_kill <= t.arrived < t_restarted)
        print(f"replies: {len(load.turns)} ({during} arrived between the kill and the restart seen); the cache "
              f"process was down or restarting for {t_restarted - t_kill:.2f} s")
        wrong = [(g, explain(t, st, got)) for g, t, k, st, got in rows if k == "WRONG"]
        assert not wrong, f"{len(wrong)} WRONG:\n" + pformat(wrong[:3], width=120)  # never different ids
        bad = [(g, k, explain(t, st, got)) for g, t, k, st, got in rows if g != "around" and k != "exact"]
        assert not bad, f"{len(bad)} committed or new trajectories not exact:\n" + pformat(bad[:3], width=120)
        assert counts["committed", "exact"] >= 30 and counts["after", "exact"] >= 2 * CLIENTS
    finally:
        if load is not None:
            load.stop.set()
        stop_process_group(proc)


# --- the router SIGKILLed mid-load, restarted from its snapshot and journal ----------------------------------


@pytest.mark.parametrize("mode", [(), ("--radix-tree-process",)], ids=["in_process", "cache_process"])
def test_router_sigkilled_mid_load_restarts_from_snapshot_and_journal(tmp_path: Path,
                                                                       mock_worker_process: Callable[..., Any],
                                                                       mode: tuple[str, ...]) -> None:
    """The real CLI SIGKILLed (its whole process group) while 8 clients have requests in flight, then restarted
    with the same --cache-snapshot: every trajectory whose reply reached its client COMMITTED seconds before the
    kill is served exactly (ids, loss mask, logprobs, versions); any later one is exact or absent."""
    workers = [mock_worker_process(seed=s, max_random_tokens=12, latency=0.01).url for s in (1, 2)]
    snap = str(tmp_path / "c.snap")
    for f in glob.glob(snap + "*"):
        os.unlink(f)
    proc, url = serve(workers, snap, *mode)
    load = None
    try:
        load = Load(url, "r").start()
        load.wait(lambda: load.committed() >= 60, 30, "60 replies COMMITTED seconds before the kill")
        assert not load.failures, load.failures
        t_kill = time.monotonic()
        kill_group(proc)  # mid-load: requests are in flight
        load.join()
        # the only failures are the connections the kill cut (or refused after it)
        assert not [f for f in load.failures + load.cut if f[0] < t_kill], load.failures + load.cut
        cut = len(load.failures) + len(load.cut)
        assert cut >= 1  # the kill met the clients mid-request
    finally:
        if load is not None:
            load.stop.set()
        kill_group(proc)

    proc, url = serve(workers, snap, *mode)
    try:
        rows: list[Row] = []
        with httpx.Client(timeout=60) as c:
            for t in load.turns:
                status, got = retrieve(c, url, t.text)
                if t.arrived < t_kill - COMMITTED:
                    assert t.first_status == 200 and t.first is not None and t.first["fresh_tokens"] == 0, t
                    rows.append(("committed", t, classify(t, status, got), status, got))
                else:
                    rows.append(("late", t, classify(t, status, got), status, got))
    finally:
        stop_process_group(proc)
    counts = report(f"router killed ({'cache process' if mode else 'in process'})", rows)
    recovered = sum(1 for r in rows if r[2] == "exact")
    committed = sum(1 for r in rows if r[0] == "committed")
    print(f"records recovered: {recovered} of {len(rows)} replies delivered ({committed} delivered >= "
          f"{COMMITTED} s before the kill: {counts['committed', 'exact']} exact)")
    print(f"{cut} client requests cut by the kill")
    # a late one is exact or absent: never different (no conversation went on after the restart)
    wrong = [(g, k, explain(t, st, got)) for g, t, k, st, got in rows if k not in ("exact", "absent")]
    assert not wrong, f"{len(wrong)} WRONG:\n" + pformat(wrong[:3], width=120)
    bad = [(k, explain(t, st, got)) for g, t, k, st, got in rows if g == "committed" and k != "exact"]
    assert not bad, (f"{len(bad)} of {committed} committed trajectories not exact after the restart:\n"
                     + pformat(bad[:3], width=120))
    assert committed >= 60


# --- a worker SIGKILLed under load, with conversations affine to it -------------------------------------------


def test_worker_killed_under_load_fails_no_request(mock_worker_process: Callable[..., Any]) -> None:
    """What tests/test_balancing.py::test_killed_worker_mid_run_fails_no_request does not cover: the real CLI with
    the trajectory cache and cache_aware balancing (conversations go back to the worker holding their prefix), one
    of its two workers SIGKILLed while 8 clients run multi-turn conversations, one worker left. No /generate fails
    (the conversations affine to the dead worker are retried on the other), and every turn, before and after the
    kill, is recorded exactly."""
    victim, survivor = (mock_worker_process(seed=s, max_random_tokens=12, latency=0.01) for s in (1, 2))
    proc, url = serve([victim.url, survivor.url], None, "--plugin", "balancing", "--policy", "cache_aware")
    load = None
    try:
        load = Load(url, "w").start()
        # both workers serve: conversations started on the victim are affine to it
        load.wait(lambda: load.count() >= 40 and httpx.get(victim.url + "/mock/stats").json()["requests_received"]
                  >= 10, 30, "40 replies before the kill, 10 of them by the victim")
        assert not load.failures, load.failures
        t_kill = time.monotonic()
        victim.kill()  # SIGKILL: requests in flight on it see a dropped connection
        load.wait(lambda: load.clients(t_kill) == CLIENTS and load.count(t_kill) >= 3 * CLIENTS, 30,
                  "turns after the kill")
        load.join()
        assert not load.failures, load.failures  # zero failed /generate
        after = load.count(t_kill)
        with httpx.Client(timeout=60) as c:
            st = c.get(url + "/workers/state").json()
            failed = next(w for w in st["workers"] if w["url"] == victim.url)["failures"]
            assert st["retries"] >= 1 and failed >= 1, st  # requests met the dead worker and were retried
            rows: list[Row] = []
            for t in load.turns:
                assert t.first_status == 200 and t.first is not None, t  # recorded right away, before and after
                status, got = retrieve(c, url, t.text)
                rows.append(("after" if t.sent >= t_kill else "before", t, classify(t, status, got), status, got))
        counts = report("worker killed", rows)
        lat = sorted(t.arrived - t.sent for t in load.turns if t.sent >= t_kill)
        print(f"{failed} attempts failed on the killed worker, {st['retries']} retries")
        print(f"replies: {len(rows)}, {after} sent after the kill; load ran {t_kill - load.t0:.2f} s before it, "
              f"{max(t.arrived for t in load.turns) - t_kill:.2f} s after; latency after the kill: median "
              f"{lat[len(lat) // 2]:.3f} s, max {lat[-1]:.3f} s")
        bad = [(g, k, explain(t, st, got)) for g, t, k, st, got in rows if k != "exact"]
        assert not bad, f"{len(bad)} not exact:\n" + pformat(bad[:3], width=120)
        assert counts["after", "exact"] >= 3 * CLIENTS
    finally:
        if load is not None:
            load.stop.set()
        stop_process_group(proc)
