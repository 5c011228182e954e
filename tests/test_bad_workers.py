"""Workers that misbehave never hurt (issue 14, part 2): a clear 502/504 for the client, nothing false recorded in
the trajectory cache, in-flight counts back to zero, the failure counted against the worker.

The misbehaving worker is a small Starlette app on a real socket; each test sets how it misbehaves.
"""

from __future__ import annotations

import asyncio
import json
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
                yield b"data: " + json.dumps(self.reply(finished=False)).encode() + b"\n\n"
                if mode != "truncated_sse":
                    yield b"data: " + json.dumps(self.reply()).encode() + b"\n\ndata: [DONE]\n\n"
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


@pytest.fixture
def bad(tok: Any, router: Any) -> Iterator[dict[str, Any]]:
    from slime_router_testing import ServerThread

    worker = BadWorker(tok)
    server = ServerThread(worker.app).start()
    r = router(plugins=["radix_tree"], settings=Settings(hf_checkpoint=BUILTIN_CHECKPOINT, worker_urls=[server.url],
                                                         request_timeout=2.0, max_attempts=1))
    yield {"worker": worker, "router": r, "url": r.url}
    server.stop()


def generated_recorded(url: str) -> int:
    got = httpx.post(url + "/retrieve_from_text", json={"text": PROMPT + TEXT}, timeout=30).json()
    return sum(got["loss_mask"])


def settled(r: Any) -> list[tuple[int, int]]:
    return [(w.inflight, w.failures) for w in r.app.router.pool]


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
