"""Sibling trajectories end to end (issue 12, section 2): samples of one prompt from the realistic worker share
their first generated tokens but not their logprobs, and a weight update lands between them (a new version every
sequence). Through /generate (streamed and not) and through the OpenAI API (``n`` samples, every history mode),
the cache in the router's process and in its own: every sample retrieves its own logprobs and weight versions for
every generated token."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from openai import OpenAI

from slime_router_core import Settings
from slime_router_core.tokenizers import BUILTIN_CHECKPOINT
from slime_router_testing import ServerThread, start_router
from slime_router_testing.mock_worker import MockWorkerConfig, create_mock_worker_app


@pytest.fixture(scope="module")
def worker() -> Iterator[str]:
    w = ServerThread(create_mock_worker_app(MockWorkerConfig(
        hf_checkpoint=BUILTIN_CHECKPOINT, realistic=True, realistic_seed=7, version_every=1, shared_prefix_min=3,
        shared_prefix_max=8, min_random_tokens=12, max_random_tokens=20))).start()
    yield w.url
    w.stop()


@pytest.fixture(scope="module", params=["in_process", "own_process"])
def url(worker: str, request: Any) -> Iterator[str]:
    r = start_router(plugins=["radix_tree", "openai_compat"], settings=Settings(
        hf_checkpoint=BUILTIN_CHECKPOINT, worker_urls=[worker],
        # a weight version per sequence: keep them all (GC of old versions is tested elsewhere)
        extra={"radix_tree_process": request.param == "own_process", "radix_tree_gc_k": 1000}))
    yield r.url
    r.stop()


def records(worker: str) -> list[dict]:
    return httpx.get(worker + "/mock/records").json()


def expected_versions(rec: dict) -> list[str]:
    versions = [rec["weight_version"]] * len(rec["output_ids"])
    for span in rec["weight_versions"]:
        versions[span["start"]:span["end"]] = [span["version"]] * (span["end"] - span["start"])
    return versions


def check_own(got: dict, rec: dict) -> None:
    """The retrieval holds this very sample: its prompt ids, its output ids with mask 1, its logprobs, versions."""
    start, n = len(rec["input_ids"]), len(rec["output_ids"])
    assert got["tokens"][:start + n] == rec["input_ids"] + rec["output_ids"]
    assert got["loss_mask"][start:start + n] == [1] * n
    assert got["rollout_logp"][start:start + n] == pytest.approx(rec["output_logprobs"], abs=1e-5)
    assert got["weight_versions"][start:start + n] == expected_versions(rec)


def distinct_siblings(recs: list[dict]) -> list[dict]:
    """Samples whose text no other sample repeats (the very same text twice keeps only the latest record), and
    the check that some of them share generated tokens (what the issue is about)."""
    texts = [r["text"] for r in recs]
    out = [r for r in recs if texts.count(r["text"]) == 1]
    assert any(a["output_ids"][:3] == b["output_ids"][:3] and a["output_logprobs"][:3] != b["output_logprobs"][:3]
               for i, a in enumerate(out) for b in out[i + 1:]), "no siblings with shared first tokens"
    return out


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_generate_siblings_each_retrieve_their_own_values(url, worker, stream):
    httpx.delete(worker + "/mock/records")
    prompt = f"<|im_start|>user\nTell me something ({uuid.uuid4().hex[:6]})<|im_end|>\n<|im_start|>assistant\n"
    for _ in range(6):
        body = {"text": prompt, "sampling_params": {"max_new_tokens": 32}, "stream": stream}
        r = httpx.post(url + "/generate", json=body, timeout=30)
        assert r.status_code == 200, r.text
    recs = records(worker)
    assert len({r["weight_version"] for r in recs}) > 1
    for rec in distinct_siblings(recs):
        got = httpx.post(url + "/retrieve_from_text", json={"text": prompt + rec["text"], "strict": True}).json()
        check_own(got, rec)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("mode", ["template", "raw"])
def test_openai_samples_each_retrieve_their_own_values(url, worker, mode, stream):
    httpx.delete(worker + "/mock/records")
    client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    msgs = [{"role": "user", "content": f"Say something ({uuid.uuid4().hex[:6]})"}]
    extra = {"history_mode": mode}
    answers: list[dict] = []
    for _ in range(3):  # 3 requests of n=2: GRPO-style groups, a new weight version every sequence
        if stream:
            parts: dict[int, str] = {}
            for ch in client.chat.completions.create(model="m", messages=msgs, n=2, max_tokens=24, stream=True,
                                                     extra_body=extra):
                for c in ch.choices:
                    parts[c.index] = parts.get(c.index, "") + (c.delta.content or "")
            answers += [{"role": "assistant", "content": parts[i]} for i in sorted(parts)]
        else:
            r = client.chat.completions.create(model="m", messages=msgs, n=2, max_tokens=24, extra_body=extra)
            answers += [c.message.model_dump(exclude_none=True) for c in r.choices]
    recs = sorted(records(worker), key=lambda x: (x["rid"], x["index"]))
    assert len(recs) == 6
    for rec in distinct_siblings(recs):
        msg = next(a for a in answers if (a.get("content") or "").strip() == rec["text"].strip())
        got = httpx.post(url + "/retrieve_from_messages",
                         json={"messages": msgs + [msg], "history_mode": mode, "strict": True}).json()
        check_own(got, rec)
        # what the template writes after the final turn: "\n" (and "<|im_end|>" when the sample hit max_tokens)
        assert got["fresh_tokens"] == (1 if rec["output_ids"][-1] == 151645 else 2)
