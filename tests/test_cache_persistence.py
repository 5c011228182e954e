"""--cache-snapshot: the trajectory cache survives restarts (snapshot) and crashes (write-ahead journal)."""

from __future__ import annotations

import asyncio
import glob
import logging
import os
import random
import signal
import subprocess
import sys
import time

import httpx
import pytest

from slime_router_core.tokenizers import BUILTIN_CHECKPOINT, load_tokenizer
from slime_router_plugins.radix_tree import TrajectoryCache
from slime_router_plugins.radix_tree import persist as persist_mod
from slime_router_plugins.radix_tree.process import CacheProcessClient

EOS = 151645
FAST = {"snapshot_interval": 3600.0, "journal_interval": 0.05}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(BUILTIN_CHECKPOINT)


def reply(tok, text: str, version: str, seed: int, spans=None) -> dict:
    """A worker reply for ``text`` (+ EOS) with distinct logprobs per sample and optional version spans."""
    ids = tok.encode(text, add_special_tokens=False) + [EOS]
    rnd = random.Random(seed)
    meta = {"finish_reason": {"type": "stop", "matched": EOS}, "weight_version": version,
            "output_token_logprobs": [[-rnd.random(), t, None] for t in ids]}
    if spans:
        meta["weight_versions"] = spans
    return {"text": text, "output_ids": ids, "meta_info": meta}


async def aworkload(tok, cache, tag: str = "") -> list[str]:
    """Multi-turn conversations, sibling samples of one prompt (shared prefix, own logprobs and versions), and a
    version change with per-token spans; returns the trajectory texts to compare (every turn's full text)."""
    texts: list[str] = []
    for c in range(4):
        text = f"<|im_start|>user\nConversation {tag}{c}: topic {c * 7}<|im_end|>\n<|im_start|>assistant\n"
        for turn in range(4):
            if turn:
                text += f"<|im_end|>\n<|im_start|>user\nand turn {turn}?<|im_end|>\n<|im_start|>assistant\n"
            p = await cache.prepare(text)
            out = f" Answer {turn} of {c}: the value is {c * 100 + turn}."
            spans = [{"start": 0, "end": 3, "version": "v1"}] if (c + turn) % 3 == 0 else None
            assert await cache.record(p, reply(tok, out, "v2" if turn > 1 else "v1", c * 10 + turn, spans), "w1")
            text += out
            texts.append(text)
    prompt = f"<|im_start|>user\nSample me {tag}<|im_end|>\n<|im_start|>assistant\n"
    for k in range(5):  # siblings: same prompt, branches sharing their first words
        p = await cache.prepare(prompt)
        out = f" Sure, here is sample number {k}" + (" with more" if k % 2 else "")
        assert await cache.record(p, reply(tok, out, f"v{1 + k % 2}", 1000 + k), f"w{k % 2}")
        texts.append(prompt + out)
    p = await cache.prepare_ids(tok.encode(f"ids prompt {tag}: hello", add_special_tokens=False))
    assert await cache.record(p, reply(tok, " world", "v2", 7), "w2")
    texts.append(f"ids prompt {tag}: hello world")
    return texts


KEYS = ("tokens", "loss_mask", "rollout_logp", "weight_versions", "exact_tokens", "fresh_tokens", "worker_url",
        "evicted")


async def aretrieve_all(cache, texts: list[str]) -> list[dict]:
    out = []
    for t in texts:
        r = await cache.retrieve(t)
        out.append({k: r[k] for k in KEYS})
    return out


def workload(tok, cache, tag: str = "") -> list[str]:
    return asyncio.run(aworkload(tok, cache, tag))


def retrieve_all(cache, texts: list[str]) -> list[dict]:
    return asyncio.run(aretrieve_all(cache, texts))


def assert_exact(before: list[dict], after: list[dict]) -> None:
    assert len(before) == len(after)
    assert sum(sum(r["loss_mask"]) for r in before) > 10 * len(before)  # generated tokens, recorded
    for i, (a, b) in enumerate(zip(before, after)):
        assert a["fresh_tokens"] == 0, (i, a)
        for k in a:
            assert a[k] == b[k], (i, k)


def new_cache(tok, path, **kw) -> TrajectoryCache:
    cache = TrajectoryCache(tok, snapshot=str(path), **{**FAST, **kw})
    asyncio.run(cache.start())
    return cache


# --- in process ---------------------------------------------------------------------------------------------


def test_snapshot_round_trip_is_exact(tok, tmp_path):
    path = tmp_path / "cache.snap"
    cache = new_cache(tok, path)
    texts = workload(tok, cache)
    before = retrieve_all(cache, texts)
    assert sum(sum(r["loss_mask"]) for r in before) > 200
    asyncio.run(cache.close())
    assert path.exists() and os.path.exists(f"{path}.journal")
    again = new_cache(tok, path)
    assert again.tree.size == cache.tree.size and again.persist.restored_records == 0  # all from the snapshot
    again.tree.check()
    assert_exact(before, retrieve_all(again, texts))
    # and the restored cache keeps recording: a new turn continues a restored trajectory
    more = workload(tok, again, "m")
    more_before = retrieve_all(again, more)
    asyncio.run(again.close())
    third = new_cache(tok, path)
    assert_exact(before, retrieve_all(third, texts))
    assert_exact(more_before, retrieve_all(third, more))
    asyncio.run(third.close())


def test_journal_replay_after_a_crash_is_exact(tok, tmp_path, caplog):
    path = tmp_path / "cache.snap"
    cache = new_cache(tok, path)
    half = workload(tok, cache, "s")
    cache.persist.snapshot()  # some records in the snapshot, the rest only in the journal
    texts = workload(tok, cache, "j")
    before = retrieve_all(cache, texts)
    half_before = retrieve_all(cache, half)
    cache.persist.flush()  # what the writer thread does every journal_interval
    cache.persist.crash()  # kill -9: no snapshot, nothing more written
    with caplog.at_level(logging.INFO, logger="slime_router.radix_tree.persist"):
        again = new_cache(tok, path)
    assert again.persist.restored_records >= len(texts)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # no record skipped
    again.tree.check()
    assert_exact(before, retrieve_all(again, texts))
    assert_exact(half_before, retrieve_all(again, half))
    asyncio.run(again.close())


async def along_conversations(tok, cache, tag: str, turns: int, snapshot_at: int | None = None) -> list[str]:
    """Interleaved conversations of ~600 characters per turn (long enough for the journal's text references)."""
    texts, convs = [], [f"<|im_start|>system\nYou are agent {tag}{c}.<|im_end|>\n<|im_start|>user\n"
                        f"{'Tell me a long story about rivers. ' * 8}<|im_end|>\n<|im_start|>assistant\n"
                        for c in range(3)]
    for turn in range(turns):
        if turn == snapshot_at:
            await asyncio.to_thread(cache.persist.snapshot)  # a new journal: references start again
        for c in range(3):
            p = await cache.prepare(convs[c])
            out = f" Turn {turn} of {tag}{c}: " + "the river runs on and on, " * 20
            assert await cache.record(p, reply(tok, out, "v1", 100 * c + turn), "w")
            convs[c] += out
            texts.append(convs[c])
            convs[c] += f"<|im_end|>\n<|im_start|>user\nGo on ({turn}).<|im_end|>\n<|im_start|>assistant\n"
    return texts


@pytest.mark.parametrize("budget", [None, 1000])
def test_journal_writes_a_turn_as_its_new_text_and_replays_exactly(tok, tmp_path, monkeypatch, budget):
    """A turn that continues a conversation is journaled as a reference to the previous turn's record plus its new
    text; replay rebuilds the whole text. With a reference budget too small to keep any text, every record is
    written out whole, and replay is exact too."""
    from slime_router_plugins.radix_tree import persist

    if budget is not None:
        monkeypatch.setattr(persist, "REF_BUDGET_CHARS", budget)
    path = tmp_path / "cache.snap"
    cache = new_cache(tok, path)
    texts = asyncio.run(along_conversations(tok, cache, "a", 6, snapshot_at=3))
    before = retrieve_all(cache, texts)
    cache.persist.flush()
    written, total = cache.persist.journal_text_chars, sum(len(t) for t in texts)
    if budget is None:
        assert written < total / 2, (written, total)  # each turn once, not the whole conversation again
    else:
        assert written >= total  # nothing referenced: every text whole
    cache.persist.crash()
    again = new_cache(tok, path)
    assert again.persist.restored_records > 0
    again.tree.check()
    assert_exact(before, retrieve_all(again, texts))
    asyncio.run(again.close())


def test_journal_is_committed_by_the_writer_thread_within_the_interval(tok, tmp_path):
    path = tmp_path / "cache.snap"
    cache = new_cache(tok, path, journal_interval=0.05)
    texts = workload(tok, cache)
    before = retrieve_all(cache, texts)
    time.sleep(0.5)  # > the commit interval: the writer thread has fsynced every record
    cache.persist.crash()
    again = new_cache(tok, path)
    assert_exact(before, retrieve_all(again, texts))
    asyncio.run(again.close())


def test_truncated_journal_tail_replays_what_is_whole(tok, tmp_path, caplog):
    path = tmp_path / "cache.snap"
    cache = new_cache(tok, path)
    workload(tok, cache)
    cache.persist.flush()
    cache.persist.crash()
    jpath = f"{path}.journal"
    whole = os.path.getsize(jpath)
    with open(jpath, "ab") as f:  # a frame whose write kill -9 interrupted
        f.write(persist_mod._FRAME.pack(5000, 0) + b"\x80\x05partial")
    with caplog.at_level(logging.INFO, logger="slime_router.radix_tree.persist"):
        again = new_cache(tok, path)
    assert again.persist.restored_records > 0
    msg = [r for r in caplog.records if "partial frame" in r.getMessage()]
    assert msg and msg[0].levelno == logging.INFO and f"{jpath}" in msg[0].getMessage()
    assert "replayed" in msg[0].getMessage()
    assert os.path.getsize(jpath) < whole + 10  # restarted after the new snapshot
    asyncio.run(again.close())


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "format", "tokenizer"])
def test_unusable_snapshot_is_set_aside_and_the_cache_starts_empty(tok, tmp_path, caplog, monkeypatch, damage):
    path = tmp_path / "cache.snap"
    cache = new_cache(tok, path)
    texts = workload(tok, cache)
    asyncio.run(cache.close())
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[:len(data) // 2])
        reason = "truncated"
    elif damage == "flip":
        path.write_bytes(data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:])
        reason = "checksum"
    elif damage == "garbage":
        path.write_bytes(b"hello, not a snapshot at all" * 10)
        reason = "not a slime-router trajectory snapshot"
    elif damage == "format":
        m = len(persist_mod.SNAP_MAGIC)
        path.write_bytes(data[:m] + persist_mod._U32.pack(99) + data[m + 4:])
        reason = "format version 99"
    else:
        monkeypatch.setattr(persist_mod, "tokenizer_fingerprint", lambda t: "another-tokenizer")
        import slime_router_plugins.radix_tree.cache as cache_mod
        monkeypatch.setattr(cache_mod, "tokenizer_fingerprint", lambda t: "another-tokenizer")
        reason = "another tokenizer"
    with caplog.at_level(logging.INFO, logger="slime_router.radix_tree.persist"):
        again = new_cache(tok, path)
    assert again.tree.size == 0
    bad = glob.glob(f"{path}.bad-*")
    assert len(bad) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(str(path) in e and reason in e and bad[0] in e and "starts empty" in e for e in errors), errors
    assert all(r["exact_tokens"] == 0 for r in retrieve_all(again, texts))
    asyncio.run(again.close())
    # the new snapshot (of the empty cache) is usable
    third = new_cache(tok, path)
    assert third.tree.size == 0 and len(glob.glob(f"{path}.bad-*")) == 1
    asyncio.run(third.close())


def test_journal_of_another_tokenizer_is_set_aside(tok, tmp_path, caplog, monkeypatch):
    path = tmp_path / "cache.snap"
    cache = new_cache(tok, path)
    workload(tok, cache)
    cache.persist.flush()
    cache.persist.crash()
    snap = path.read_bytes()
    import slime_router_plugins.radix_tree.cache as cache_mod
    monkeypatch.setattr(cache_mod, "tokenizer_fingerprint", lambda t: "another-tokenizer")
    with caplog.at_level(logging.INFO, logger="slime_router.radix_tree.persist"):
        again = new_cache(tok, path)
    assert again.tree.size == 0
    assert len(glob.glob(f"{path}.bad-*")) == 1 and len(glob.glob(f"{path}.journal.bad-*")) == 1
    assert open(glob.glob(f"{path}.bad-*")[0], "rb").read() == snap
    asyncio.run(again.close())


# --- the cache in its own process -------------------------------------------------------------------------


def test_own_process_round_trip_and_crash(tok, tmp_path):
    """--radix-tree-process: the child owns the cache, so it restores, journals and snapshots it."""
    path = tmp_path / "cache.snap"

    def client() -> CacheProcessClient:
        return CacheProcessClient(BUILTIN_CHECKPOINT, snapshot=str(path), snapshot_interval=3600,
                                  journal_interval=0.05)

    async def first() -> tuple[list[str], list[dict]]:
        c = client()
        await c.start()
        texts = await aworkload(tok, c, "p")
        before = await aretrieve_all(c, texts)
        await c.close()  # the child writes its snapshot before it exits
        return texts, before

    texts, before = asyncio.run(first())
    assert path.exists()

    async def second() -> tuple[list[str], list[dict], list[dict]]:
        c = client()
        await c.start()
        after = await aretrieve_all(c, texts)
        more = await aworkload(tok, c, "q")  # only in the journal
        more_before = await aretrieve_all(c, more)
        await asyncio.sleep(0.5)  # > one commit interval
        c._closing = True  # no restart: we kill it
        os.kill(c.proc.pid, signal.SIGKILL)
        await c.close()
        return after, more, more_before

    after, more, more_before = asyncio.run(second())
    assert_exact(before, after)

    async def third() -> tuple[list[dict], list[dict]]:
        c = client()
        await c.start()
        got = await aretrieve_all(c, texts), await aretrieve_all(c, more)
        await c.close()
        return got

    a, b = asyncio.run(third())
    assert_exact(before, a)
    assert_exact(more_before, b)


def test_own_process_child_killed_and_restarted_restores_its_records(tok, tmp_path):
    """A cache process that dies is restarted by the router; with --cache-snapshot the new one restores the records
    (all those committed to the journal before the death)."""
    path = tmp_path / "cache.snap"

    async def go() -> tuple[list[dict], list[dict]]:
        c = CacheProcessClient(BUILTIN_CHECKPOINT, snapshot=str(path), snapshot_interval=3600, journal_interval=0.05)
        await c.start()
        texts = await aworkload(tok, c, "r")
        before = await aretrieve_all(c, texts)
        await asyncio.sleep(0.5)  # > one commit interval
        old = c.proc.pid
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while not (c.restarts and c.transport is not None):
            assert time.monotonic() < deadline, "the cache process was not restarted"
            await asyncio.sleep(0.05)
        assert c.proc.pid != old
        after = await aretrieve_all(c, texts)
        await c.close()
        return before, after

    before, after = asyncio.run(go())
    assert_exact(before, after)


@pytest.mark.slow
def test_cli_router_killed_with_sigkill_loses_nothing_committed(tmp_path, mock_worker_process):
    """The real CLI, SIGKILLed after the replies reached the client and a commit interval passed, then restarted
    with the same --cache-snapshot: every trajectory is retrieved exactly."""
    from slime_router_testing.servers import free_port, stop_process_group, wait_http

    worker = mock_worker_process(seed=0, max_random_tokens=12)
    path = tmp_path / "cache.snap"

    def serve(*extra: str) -> tuple[subprocess.Popen, str]:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLIME_ROUTER_")}
        proc = subprocess.Popen([sys.executable, "-m", "slime_router_core.cli", "serve", "--hf-checkpoint",
                                 BUILTIN_CHECKPOINT, "--worker-url", worker.url, "--cache-snapshot", str(path),
                                 "--cache-journal-interval", "0.1", "--host", "127.0.0.1", "--port", str(port),
                                 "--plugin", "radix_tree", *extra], env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/health", timeout=120, proc=proc)
        return proc, url

    def conversations(c: httpx.Client, url: str, tag: str) -> list[str]:
        texts = []
        for k in range(3):
            text = f"<|im_start|>user\nCLI conversation {tag}{k}<|im_end|>\n<|im_start|>assistant\n"
            for turn in range(3):
                if turn:
                    text += f"<|im_end|>\n<|im_start|>user\nturn {turn}<|im_end|>\n<|im_start|>assistant\n"
                r = c.post(url + "/generate", json={"text": text, "sampling_params": {"max_new_tokens": 8}})
                assert r.status_code == 200, r.text
                text += r.json()["text"]
                texts.append(text)
        return texts

    def retrieve(c: httpx.Client, url: str, texts: list[str]) -> list[dict]:
        out = []
        for t in texts:
            r = c.post(url + "/retrieve_from_text", json={"text": t})
            assert r.status_code == 200, r.text
            out.append({k: r.json()[k] for k in KEYS})
        return out

    for mode in ((), ("--radix-tree-process",)):
        for f in glob.glob(f"{path}*"):
            os.unlink(f)
        proc, url = serve(*mode)
        try:
            with httpx.Client(timeout=60) as c:
                texts = conversations(c, url, "a")
                before = retrieve(c, url, texts)
            time.sleep(0.5)  # > one commit interval after the last reply reached us
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc, url = serve(*mode)
        try:
            with httpx.Client(timeout=60) as c:
                assert_exact(before, retrieve(c, url, texts))
                more = conversations(c, url, "b")
                more_before = retrieve(c, url, more)
        finally:
            stop_process_group(proc)  # SIGTERM: a clean shutdown writes the snapshot
        assert proc.returncode == 0
        proc, url = serve(*mode)
        try:
            with httpx.Client(timeout=60) as c:
                assert_exact(before, retrieve(c, url, texts))
                assert_exact(more_before, retrieve(c, url, more))
        finally:
            stop_process_group(proc)


def test_the_contract_kit_passes_with_journaling_on(tok, tmp_path):
    from slime_router_testing.contracts import check_trajectory_cache

    cache = TrajectoryCache(tok, max_size=8_000, snapshot=str(tmp_path / "kit.snap"), **FAST)
    asyncio.run(cache.start())
    asyncio.run(check_trajectory_cache(cache, tok))
    size = cache.tree.size
    cache.persist.flush()
    cache.persist.crash()
    again = TrajectoryCache(tok, max_size=8_000, snapshot=str(tmp_path / "kit.snap"), **FAST)
    asyncio.run(again.start())
    assert again.tree.size == size
    again.tree.check()
    asyncio.run(again.close())


def test_flags(tmp_path):
    from slime_router_core import Settings
    from slime_router_plugins.radix_tree.plugin import RadixTreeConfig

    c = Settings(extra={"cache_snapshot": str(tmp_path / "s"), "cache_journal_interval": 0.5}).config(RadixTreeConfig)
    assert (c.snapshot, c.snapshot_interval, c.journal_interval) == (str(tmp_path / "s"), 300.0, 0.5)
    with pytest.raises(ValueError, match="--cache-journal-interval"):
        Settings(extra={"cache_journal_interval": 5}).config(RadixTreeConfig)


def test_one_cache_per_snapshot_path(tok, tmp_path):
    path = tmp_path / "cache.snap"
    cache = new_cache(tok, path)
    other = TrajectoryCache(tok, snapshot=str(path), **FAST)
    with pytest.raises(RuntimeError, match="in use by another process"):
        other.persist._lock_files(wait=0.2)
    asyncio.run(cache.close())
    other.persist._lock_files(wait=0.2)  # free again
    other.persist._unlock_files()
