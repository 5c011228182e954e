"""Workers that misbehave never hurt (issue 14, part 2): a clear 502/504 for the client, nothing false recorded in
the trajectory cache, in-flight counts back to zero, the failure counted against the worker. A stream that goes
wrong after it began (an unusable chunk, an error chunk, a worker silent for --request-timeout) ends with an error
event then ``data: [DONE]``, and the router closes the upstream connection (the worker aborts the generation).

The misbehaving worker is a small Starlette app on a real socket; each test sets how it misbehaves. Waits are for
events (the worker seeing the router hang up, the router's counters), not for wall-clock guesses.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from slime_router_core import Settings
from slime_router_core.tokenizers import BUILTIN_CHECKPOINT, load_tokenizer

PROMPT = "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n"
TEXT = " Paris."


@pytest.fixture(scope="module")
def tok() -> Any:
    return load_tokenizer(BUILTIN_CHECKPOINT)


class BadWorker:
    def __init__(self, tok: Any) -> None:
        self.mode = "ok"
        self.ids = tok.encode(TEXT, add_special_tokens=False) + [tok.eos_token_id]
        self.hung_up = threading.Event()  # the router closed the connection of a stream still going on
        self.app = Starlette(routes=[Route("/generate", self.generate, methods=["POST"]),
                                     Route("/health", self.info), Route("/get_model_info", self.info)])

    def reply(self, ids: list[int] | None = None, finished: bool = True) -> dict[str, Any]:
        ids = self.ids if ids is None else ids
        return {"text": TEXT, "output_ids": ids, "meta_info": {
            "id": "r", "finish_reason": {"type": "stop"} if finished else None, "prompt_tokens": 12,
            "completion_tokens": len(ids), "weight_version": "v1",
            "output_token_logprobs": [[-0.25, i, None] for i in ids]}}

    async def info(self, request: Request) -> Response:
        return Response(b'{"model_path": "bad"}', media_type="application/json")

    async def generate(self, request: Request) -> Response:
        body = json.loads(await request.body())
        mode = self.mode
        if mode == "hang":
            await asyncio.sleep(3600)
        if body.get("stream"):
            async def events() -> Any:
                if mode != "hang_before_first_chunk":
                    yield sse(self.reply(finished=False))
                if mode in STREAM_FAULTS:  # the last chunk is bad; a worker still generating after it
                    yield sse(STREAM_FAULTS[mode](self))
                if mode in ("hang_mid_stream", "hang_before_first_chunk", *STREAM_FAULTS):
                    while (await request.receive())["type"] != "http.disconnect":  # silent until the router hangs up
                        pass
                    self.hung_up.set()
                    return
                if mode == "slow_chunks":  # 2.5 s in all, more than --request-timeout, 0.5 s between two chunks
                    for _ in range(5):
                        await asyncio.sleep(0.5)
                        yield sse(self.reply(finished=False))
                if mode == "error_chunk":  # SGLang's answer to an error mid-stream: an error event, then [DONE]
                    yield sse({"error": {"message": "CUDA out of memory"}}) + b"data: [DONE]\n\n"
                elif mode != "truncated_sse":
                    yield sse(self.reply()) + b"data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        if mode == "invalid_json":
            return Response(b"{not json", media_type="application/json")
        if mode == "error_body":
            return Response(b'{"error": {"message": "CUDA out of memory"}}', media_type="application/json")
        reply = self.reply()
        if mode == "length_mismatch":
            reply["meta_info"]["output_token_logprobs"].pop()
        elif mode == "out_of_vocab":
            reply = self.reply(ids=[10**9] + self.ids[1:])
        return Response(json.dumps(reply).encode(), media_type="application/json")


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def _mismatched(worker: BadWorker) -> dict[str, Any]:
    reply = worker.reply()
    reply["meta_info"]["output_token_logprobs"].pop()
    return reply


# The bad last chunk of a stream (cumulative, like SGLang 0.5.10+ and the mock worker's default).
STREAM_FAULTS = {
    "out_of_vocab_chunk": lambda w: w.reply(ids=[10**9] + w.ids[1:]),
    "length_mismatch_chunk": _mismatched,
}


@pytest.fixture
def bad_with(tok: Any, router: Any) -> Iterator[Any]:
    """Factory: a misbehaving worker behind a router with these plugins (--request-timeout 2 s, no retries)."""
    from slime_router_testing import ServerThread

    servers: list[Any] = []

    def make(plugins: list[str]) -> dict[str, Any]:
        worker = BadWorker(tok)
        server = ServerThread(worker.app).start()
        servers.append(server)
        r = router(plugins=plugins, settings=Settings(hf_checkpoint=BUILTIN_CHECKPOINT, worker_urls=[server.url],
                                                      request_timeout=2.0, max_attempts=1))
        return {"worker": worker, "router": r, "url": r.url}

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def bad(bad_with: Any) -> dict[str, Any]:
    return bad_with(["radix_tree"])


def generated_recorded(url: str) -> int:
    got = httpx.post(url + "/retrieve_from_text", json={"text": PROMPT + TEXT}, timeout=30).json()
    return sum(got["loss_mask"])


def settled(r: Any) -> list[tuple[int, int]]:
    return [(w.inflight, w.failures) for w in r.app.router.pool]


def settled_stream(r: Any) -> list[tuple[int, int]]:
    """``settled`` once the stream's books are closed (the client may see its last event a moment before the
    router's handler releases the worker and its admission slot); the deadline only guards against a hang."""
    deadline = time.monotonic() + 30
    while any(w.inflight for w in r.app.router.pool) or r.app.router.admission.in_flight:
        assert time.monotonic() < deadline, settled(r)
        time.sleep(0.01)
    return settled(r)


def stream_events(url: str, body: dict[str, Any]) -> list[str]:
    """The data of each event of a streamed answer."""
    resp = httpx.post(url, json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    return [e[len("data: "):] for e in resp.text.split("\n\n") if e.startswith("data: ")]


@pytest.mark.parametrize("mode,status,words", [
    ("invalid_json", 502, "not valid JSON"),
    ("error_body", 502, "CUDA out of memory"),
    ("length_mismatch", 502, "output_token_logprobs"),
    ("out_of_vocab", 502, "vocabulary"),
    ("hang", 504, "--request-timeout"),
])
def test_a_bad_reply_is_a_clear_error_and_records_nothing(bad, mode, status, words):
    bad["worker"].mode = mode
    resp = httpx.post(bad["url"] + "/generate", json={"text": PROMPT}, timeout=30)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert words in err["message"] and bad["worker"].app is not None
    assert generated_recorded(bad["url"]) == 0
    assert settled(bad["router"]) == [(0, 1)]


def test_a_truncated_stream_ends_with_an_error_event_and_records_nothing(bad):
    bad["worker"].mode = "truncated_sse"
    resp = httpx.post(bad["url"] + "/generate", json={"text": PROMPT, "stream": True}, timeout=30)
    events = [e for e in resp.text.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and "error" in json.loads(events[-2][len("data: "):])
    assert generated_recorded(bad["url"]) == 0
    assert settled(bad["router"]) == [(0, 1)]


def test_a_good_worker_is_recorded(bad):  # the harness itself: the same worker, well-behaved, is recorded
    resp = httpx.post(bad["url"] + "/generate", json={"text": PROMPT}, timeout=30)
    assert resp.status_code == 200 and generated_recorded(bad["url"]) == len(bad["worker"].ids)


STREAM_CASES = [
    ("out_of_vocab_chunk", "outside the vocabulary"),
    ("length_mismatch_chunk", "disagree"),
    ("error_chunk", "CUDA out of memory"),
    ("hang_mid_stream", "--request-timeout"),
    ("hang_before_first_chunk", "--request-timeout"),
]


@pytest.mark.parametrize("mode,words", STREAM_CASES)
def test_a_bad_chunk_or_a_silent_worker_ends_the_stream_with_an_error_event_and_records_nothing(bad, mode, words):
    worker = bad["worker"]
    worker.mode = mode
    events = stream_events(bad["url"] + "/generate", {"text": PROMPT, "stream": True})
    assert events[-1] == "[DONE]"
    err = json.loads(events[-2])["error"]
    assert words in err["message"] and err["type"] == "upstream_error", err
    good = [json.loads(e) for e in events[:-2]]  # the chunks before the bad one, none after it
    assert all("error" not in c and c["meta_info"]["finish_reason"] is None for c in good)
    assert len(good) == (0 if mode == "hang_before_first_chunk" else 1)
    if mode != "error_chunk":  # (SGLang ends its stream after an error chunk: nothing left to abort)
        assert worker.hung_up.wait(30), "the router did not close the upstream connection"
    assert generated_recorded(bad["url"]) == 0
    assert settled_stream(bad["router"]) == [(0, 1)]


@pytest.mark.parametrize("mode,words", [STREAM_CASES[0], STREAM_CASES[2], STREAM_CASES[3]])
def test_router_generate_stream_ends_the_same_way(bad_with, mode, words):
    # the OpenAI layer reads streams through Router.generate_stream: the same checks, the same idle bound
    bad = bad_with(["radix_tree", "openai_compat"])
    bad["worker"].mode = mode
    chat = {"model": "m", "messages": [{"role": "user", "content": "Capital of France?"}], "stream": True}
    events = stream_events(bad["url"] + "/v1/chat/completions", chat)
    assert events[-1] == "[DONE]"
    err = json.loads(events[-2])["error"]
    assert words in err["message"] and err["type"] == "upstream_error", err
    assert not any(c.get("choices") and c["choices"][0].get("finish_reason") for c in map(json.loads, events[:-2]))
    if mode != "error_chunk":
        assert bad["worker"].hung_up.wait(30), "the router did not close the upstream connection"
    assert generated_recorded(bad["url"]) == 0
    assert settled_stream(bad["router"]) == [(0, 1)]


def test_a_silent_worker_ends_a_byte_relayed_stream_too(bad_with):
    # no plugin reads the chunks: the stream is relayed as bytes, unchecked, but --request-timeout still bounds it
    bad = bad_with([])
    bad["worker"].mode = "hang_mid_stream"
    events = stream_events(bad["url"] + "/generate", {"text": PROMPT, "stream": True})
    assert events[-1] == "[DONE]" and "--request-timeout" in json.loads(events[-2])["error"]["message"]
    assert bad["worker"].hung_up.wait(30), "the router did not close the upstream connection"
    assert settled_stream(bad["router"]) == [(0, 1)]


def test_a_stream_slower_than_the_timeout_in_total_but_not_between_chunks_is_served(bad):
    # --request-timeout bounds the gap between chunks, not the whole stream
    bad["worker"].mode = "slow_chunks"
    events = stream_events(bad["url"] + "/generate", {"text": PROMPT, "stream": True})
    assert events[-1] == "[DONE]" and not any("error" in json.loads(e) for e in events[:-1])
    assert generated_recorded(bad["url"]) == len(bad["worker"].ids)
    assert settled_stream(bad["router"]) == [(0, 0)]
