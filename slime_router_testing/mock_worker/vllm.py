"""A mock vLLM worker: vLLM's token-in/token-out HTTP surface over the mock SGLang worker's generation.

The protocol is the one in ``vllm-engine-api.md`` (the notes read from vLLM's source):

- ``POST /inference/v1/generate``: ``token_ids`` in, ``token_ids`` (+ ``logprobs`` in the chat shape) out; no text,
  no ``stop_reason``, no weight version. Streaming sends the delta ids per step.
- ``POST /v1/completions`` with a token-id (or text) prompt, ``return_token_ids``, ``logprobs``,
  ``return_tokens_as_token_ids``: the fallback of servers without ``/inference/v1/generate``
  (``generate_endpoint=False`` builds such an "older vLLM").
- Operations: ``/abort_requests``, ``/pause``, ``/resume``, ``/is_paused``, ``/update_weight_version``,
  ``/weight_info``, ``/reset_prefix_cache``, ``/health``, ``/openapi.json``.

Tokens, logprobs, think/tool-call/realistic modes, latencies, injected failures, weight versions (``version_every``)
and the records of truth (``GET /mock/records``, same format as the SGLang mock's) come from the same
``MockWorkerState``/``Sequence`` machinery: for the same config, prompt ids and seed, both mocks generate the
same tokens. Errors use vLLM's shapes: ``{"error": {"message", "type", "param", "code"}}``; request validation
errors are 400 (not FastAPI's 422); unknown paths answer FastAPI's ``{"detail": "Not Found"}``.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from .app import (
    MODEL_VOCAB_SIZE,
    MockWorkerConfig,
    MockWorkerState,
    Sequence,
    _hash_int,
    _Params,
    _sse,
    interleave,
    mock_control_routes,
)

__all__ = [
    "GENERATE_PATH",
    "MAX_MODEL_LEN",
    "create_mock_vllm_worker_app",
    "serve_mock_vllm_worker",
]

GENERATE_PATH = "/inference/v1/generate"
COMPLETIONS_PATH = "/v1/completions"
MAX_MODEL_LEN = 40960
PAUSE_MODES = ("abort", "wait", "keep")
_STATUS_TYPES = {400: "BadRequestError", 404: "NotFoundError", 500: "InternalServerError",
                 503: "ServiceUnavailableError"}


# --------------------------------------------------------------------------- errors


class _VError(Exception):
    """A vLLM ``ErrorResponse``: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, type_: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param = message, status, param
        self.type = type_ or _STATUS_TYPES.get(status, "BadRequestError" if status < 500 else "InternalServerError")

    def response(self) -> Response:
        return _json({"error": {"message": self.message, "type": self.type, "param": self.param,
                                "code": self.status}}, self.status)


def _validation_error(loc: str, type_: str, msg: str, value: Any) -> _VError:
    """What vLLM's RequestValidationError handler answers (400, "Bad Request", the cleaned loc as param)."""
    if isinstance(value, (list, tuple, dict, set)):
        shown: Any = f"<{type(value).__name__} of {len(value)} items>"
    else:
        shown = value if isinstance(value, str) else str(value)
    err = {"type": type_, "loc": loc, "msg": msg, "input": shown}
    return _VError(f"1 validation error:\n  {err}", 400, param=loc, type_="Bad Request")


def _json(obj: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(obj), status_code=status, media_type="application/json")


async def _read_body(request: Request) -> dict:
    raw = await request.body()
    try:
        obj = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError as e:
        raise _validation_error("body", "json_invalid", f"JSON decode error: {e}", "") from e
    if not isinstance(obj, dict):
        raise _validation_error("body", "model_attributes_type",
                                "Input should be a valid dictionary or object to extract fields from", obj)
    return obj


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --------------------------------------------------------------------------- sequences


class _VSequence(Sequence):
    """A ``Sequence`` that records the vLLM path it served and the ids an abort may name."""

    record_path = GENERATE_PATH
    abort_keys: frozenset[str] = frozenset()

    def record(self, path: str) -> dict:
        return super().record(self.record_path)

    @property
    def vllm_finish_reason(self) -> str | None:
        fr = self.finish_reason
        return None if fr is None else str(fr["type"])

    @property
    def stop_reason(self) -> int | str | None:
        """vLLM's ``stop_reason``: the stop string or stop token id; None for EOS, length and abort."""
        fr = self.finish_reason
        if not fr or fr.get("type") != "stop":
            return None
        matched = fr.get("matched")
        if isinstance(matched, int) and matched in self.state.eos_ids and matched not in self.p.stop_token_ids:
            return None
        return matched


def _sampling(sp: dict, *, allow_n: bool, max_tokens_default: int | None, prompt_len: int,
              param_prefix: str = "") -> tuple[_Params, int | None, int]:
    """vLLM ``SamplingParams`` field names -> the mock's ``_Params`` (+ logprobs, n). Unknown keys are dropped."""

    def bad(msg: str, name: str) -> _VError:
        return _VError(msg, 400, param=param_prefix + name)

    p = _Params()
    mt = sp.get("max_tokens", max_tokens_default)
    if mt is None:  # vLLM: whatever the context leaves
        mt = max(1, MAX_MODEL_LEN - prompt_len)
    if not _int(mt) or mt < 1:
        raise bad(f"max_tokens must be at least 1, got {mt}.", "max_tokens")
    if prompt_len + mt > MAX_MODEL_LEN:
        raise bad(f"This model's maximum context length is {MAX_MODEL_LEN} tokens. However, you requested "
                  f"{mt} output tokens and your prompt contains {prompt_len} input tokens, for a total of "
                  f"{prompt_len + mt} tokens. Please reduce the length of the input prompt or the number of "
                  f"requested output tokens.", "max_tokens")
    p.max_new_tokens = mt
    mn = sp.get("min_tokens") or 0
    if not _int(mn) or mn < 0 or mn > mt:
        raise bad(f"min_tokens must be in [0, max_tokens={mt}], got {mn}.", "min_tokens")
    p.min_new_tokens = mn
    stop = sp.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) for s in stop)):
        raise bad("stop must be a string or a list of strings.", "stop")
    if stop and any(s == "" for s in stop):
        raise bad("stop cannot contain an empty string.", "stop")
    p.stop = list(stop or [])
    sti = sp.get("stop_token_ids") or []
    if not isinstance(sti, list) or not all(_int(t) for t in sti):
        raise bad("stop_token_ids must be a list of integers.", "stop_token_ids")
    p.stop_token_ids = frozenset(sti)
    p.ignore_eos = bool(sp.get("ignore_eos", False))
    p.skip_special_tokens = bool(sp.get("skip_special_tokens", True))
    p.no_stop_trim = bool(sp.get("include_stop_str_in_output", False))
    seed = sp.get("seed")
    if seed is not None and not _int(seed):
        raise bad(f"seed must be an integer, got {seed!r}.", "seed")
    p.sampling_seed = seed
    temp = sp.get("temperature")
    if temp is not None and (not isinstance(temp, (int, float)) or isinstance(temp, bool) or temp < 0):
        raise bad(f"temperature must be non-negative, got {temp}.", "temperature")
    top_p = sp.get("top_p")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise bad(f"top_p must be in (0, 1], got {top_p}.", "top_p")
    lp = sp.get("logprobs")
    if lp is not None and (not _int(lp) or lp < 0):
        raise bad(f"logprobs must be a non-negative integer, got {lp}.", "logprobs")
    n = sp.get("n", 1)
    if n is None:
        n = 1
    if not _int(n) or n < 1:
        raise bad(f"n must be at least 1, got {n}.", "n")
    if n > 1 and not allow_n:
        raise bad(f"n > 1 is not supported by {GENERATE_PATH}, got n={n}.", "n")
    return p, lp, n


def _check_ids(ids: Any, loc: str) -> list[int]:
    if not isinstance(ids, list):
        raise _validation_error(loc, "list_type", "Input should be a valid list", ids)
    for i, t in enumerate(ids):
        if not _int(t):
            raise _validation_error(f"{loc}.{i}", "int_type", "Input should be a valid integer", t)
        if t < 0:
            raise _validation_error(f"{loc}.{i}", "greater_than_equal", "Input should be greater than or equal to 0", t)
    if not ids:
        raise _validation_error(loc, "too_short", "List should have at least 1 item after validation, not 0", ids)
    for t in ids:
        if t >= MODEL_VOCAB_SIZE:
            raise _VError(f"Token id {t} is out of vocabulary", 400, param=loc.split(".")[-1])
    return ids


# --------------------------------------------------------------------------- rendering


@dataclass
class _Step:
    """One streaming step of one sequence: output ids [lo, hi), its finish reason and text then."""

    seq: _VSequence
    lo: int
    hi: int
    finish_reason: str | None
    text: str


def _chat_logprobs(seq: _VSequence, lo: int, hi: int, k: int) -> dict:
    """``ChatCompletionLogProbs`` of output tokens [lo, hi): ``max(k, 1)`` top entries, the sampled one first."""
    content = []
    for pos in range(lo, hi):
        tid = seq.output_ids[pos]
        tops = seq.output_top[pos][: max(k, 1)] if pos < len(seq.output_top) else []
        content.append({
            "token": f"token_id:{tid}",
            "logprob": seq.output_logprobs[pos],
            "bytes": None,
            "top_logprobs": [{"token": f"token_id:{t}", "logprob": v, "bytes": None} for v, t, _ in tops],
        })
    return {"content": content}


def _completion_logprobs(seq: _VSequence, lo: int, hi: int, k: int, as_ids: bool, offset: int) -> dict:
    """``CompletionLogProbs``: tokens, their logprobs, text offsets, and up to k+1 top entries per position."""
    st = seq.state

    def name(t: int) -> str:
        return f"token_id:{t}" if as_ids else st.token_text(t)

    out: dict[str, list] = {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
    last = 0
    for pos in range(lo, hi):
        tid = seq.output_ids[pos]
        token = name(tid)
        out["tokens"].append(token)
        out["token_logprobs"].append(seq.output_logprobs[pos])
        tops: list = seq.output_top[pos] if pos < len(seq.output_top) else [[seq.output_logprobs[pos], tid, None]]
        top: dict[str, float] = {}
        for v, t, _ in tops[: k + 1]:
            top.setdefault(name(int(t)), float(v))
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset if not out["text_offset"] else out["text_offset"][-1] + last)
        last = len(token)
    return out


def _usage(prompt: int, completion: int, details: bool = True) -> dict:
    u: dict[str, Any] = {"prompt_tokens": prompt, "total_tokens": prompt + completion,
                         "completion_tokens": completion}
    if details:
        u["prompt_tokens_details"] = None
    return u


# --------------------------------------------------------------------------- app


def create_mock_vllm_worker_app(config: MockWorkerConfig | None = None, *, generate_endpoint: bool = True) -> Starlette:
    """Build the mock vLLM worker's ASGI app (state on ``app.state.mock``, like the SGLang mock).

    ``generate_endpoint=False`` serves an older vLLM without ``/inference/v1/generate`` (404, and absent from
    ``/openapi.json``): clients must fall back to ``/v1/completions`` with token ids.
    """
    config = config if config is not None else MockWorkerConfig()
    st = MockWorkerState(config)
    admission = asyncio.Event()  # cleared while paused: new requests wait before they start generating
    admission.set()
    active = [0]  # admitted requests still generating (what pause?mode=wait drains)

    def begin(path: str) -> int:
        c = st.config
        st.count_path(path)
        st.stats["requests_received"] += 1
        nreq = st.stats["requests_received"]
        if c.crash_after_n and nreq > c.crash_after_n:
            os._exit(1)
        st.stats["in_flight"] += 1
        st.stats["max_concurrent"] = max(st.stats["max_concurrent"], st.stats["in_flight"])
        return nreq

    async def before_generation(nreq: int) -> None:
        """Latency, injected failures: what the SGLang mock does before it parses a request."""
        c = st.config
        if c.latency > 0:
            await asyncio.sleep(c.latency)
        if nreq <= c.fail_first_n or (
            c.failure_rate > 0 and (_hash_int(c.seed, "fail", nreq) % 1_000_000) / 1_000_000 < c.failure_rate
        ):
            st.stats["failures_injected"] += 1
            raise _VError(f"mock worker: injected failure for request #{nreq}", int(c.fail_status))

    def check_model(body: dict) -> None:
        model = body.get("model")
        if model is not None and model != st.config.model_path:
            raise _VError(f"The model `{model}` does not exist.", 404, param="model")

    def new_seq(*, rid: str, index: int, ids: list[int], params: _Params, sample_idx: int, stream: bool,
                logprobs: int | None, cache_salt: Any, path: str, abort_keys: frozenset[str], t0: float) -> _VSequence:
        seq = _VSequence(
            st, rid=rid, index=index, input_ids=list(ids), params=params, sample_idx=sample_idx,
            partition=(None, None, cache_salt), stream=stream, return_logprob=logprobs is not None,
            logprob_start_len=-1, top_logprobs_num=0 if logprobs is None else logprobs + 1,
            return_text_in_logprobs=False, t0=t0,
        )
        seq.record_path = path
        seq.abort_keys = abort_keys | {rid}
        return seq

    async def admitted(run: Awaitable[Any]) -> Any:
        await admission.wait()
        active[0] += 1
        try:
            return await run
        finally:
            active[0] -= 1

    async def drain(seq: _VSequence) -> None:
        async for _ in seq.run():
            pass

    async def until_disconnect(request: Request, work: Awaitable[Any]) -> tuple[bool, Any]:
        """Run ``work``; cancel it when the client goes away (vLLM's ``with_cancellation``)."""
        task = asyncio.ensure_future(work)

        async def watch() -> None:
            while True:
                if (await request.receive())["type"] == "http.disconnect":
                    return

        watcher = asyncio.ensure_future(watch())
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
            watcher.cancel()
            await asyncio.gather(task, watcher, return_exceptions=True)
        if task.cancelled():
            return False, None
        return True, task.result()

    async def stream_steps(seqs: list[_VSequence], want_text: bool) -> AsyncIterator[_Step]:
        """A snapshot of a sequence at each of its streaming steps (several sequences: interleaved)."""

        async def pump(seq: _VSequence, put: Callable[[Any], Awaitable[None]]) -> None:
            gen = seq.run()
            sent = 0
            try:
                async for _ in gen:
                    final = seq.finish_reason is not None
                    n = len(seq.output_ids)
                    await put(_Step(seq, sent, n, seq.vllm_finish_reason, seq.text(final=final) if want_text else ""))
                    sent = n
                    await asyncio.sleep(0)  # let the consumer send it before the next step
            finally:
                await gen.aclose()

        async for item in interleave([functools.partial(pump, q) for q in seqs]):
            yield item

    def streaming(body_iter: AsyncIterator[bytes]) -> StreamingResponse:
        async def wrapped() -> AsyncIterator[bytes]:
            try:
                await admission.wait()
                active[0] += 1
                try:
                    async for chunk in body_iter:
                        yield chunk
                finally:
                    active[0] -= 1
            finally:
                st.stats["in_flight"] -= 1

        return StreamingResponse(wrapped(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def usage_flags(body: dict) -> tuple[bool, bool]:
        so = body.get("stream_options")
        if not isinstance(so, dict):
            return False, False
        return bool(so.get("include_usage")), bool(so.get("continuous_usage_stats"))

    # -- POST /inference/v1/generate
    async def generate(request: Request) -> Response:
        t0 = time.monotonic()
        nreq = begin(GENERATE_PATH)
        handed_off = False
        try:
            try:
                body = await _read_body(request)
                await before_generation(nreq)
                if "token_ids" not in body:
                    raise _validation_error("body.token_ids", "missing", "Field required", body)
                ids = _check_ids(body["token_ids"], "body.token_ids")
                if "sampling_params" not in body:
                    raise _validation_error("body.sampling_params", "missing", "Field required", body)
                sp = body["sampling_params"]
                if not isinstance(sp, dict):
                    raise _validation_error("body.sampling_params", "model_attributes_type",
                                            "Input should be a valid dictionary", sp)
                check_model(body)
                params, logprobs, _ = _sampling(sp, allow_n=False, max_tokens_default=16, prompt_len=len(ids),
                                                param_prefix="sampling_params.")
                rid = body.get("request_id")
                if rid is None:
                    rid = uuid.uuid4().hex
                if not isinstance(rid, str):
                    raise _validation_error("body.request_id", "string_type", "Input should be a valid string", rid)
            except _VError as e:
                return e.response()
            stream = bool(body.get("stream") or False)
            seq = new_seq(rid=rid, index=0, ids=ids, params=params, sample_idx=0, stream=stream, logprobs=logprobs,
                          cache_salt=body.get("cache_salt"), path=GENERATE_PATH, abort_keys=frozenset(), t0=t0)
            model, created = st.config.model_path, int(time.time())
            if not stream:
                finished, _ = await until_disconnect(request, admitted(drain(seq)))
                if not finished:
                    return _VError("Client disconnected").response()
                n_out = len(seq.output_ids)
                return _json({
                    "request_id": rid,
                    "model": model,
                    "created": created,
                    "choices": [{
                        "index": 0,
                        "token_ids": list(seq.output_ids),
                        "logprobs": None if logprobs is None else _chat_logprobs(seq, 0, n_out, logprobs),
                        "finish_reason": seq.vllm_finish_reason or "stop",
                    }],
                    "usage": _usage(len(ids), n_out),
                    "prompt_logprobs": None,
                    "kv_transfer_params": None,
                })
            include_usage, continuous = usage_flags(body)

            async def chunks() -> AsyncIterator[bytes]:
                async for step in stream_steps([seq], want_text=False):
                    lo, hi = step.lo, step.hi
                    if hi == lo:  # vLLM sends no chunk without new ids (an abort ends the stream silently)
                        continue
                    # tokens of the step before an abort went out as an ordinary step: no finish_reason
                    fr = None if step.finish_reason == "abort" else step.finish_reason
                    chunk: dict[str, Any] = {
                        "request_id": rid,
                        "model": model,
                        "created": created,
                        "choices": [{
                            "index": 0,
                            "token_ids": seq.output_ids[lo:hi],
                            "logprobs": None if logprobs is None else _chat_logprobs(seq, lo, hi, logprobs),
                            "finish_reason": fr,
                        }],
                    }
                    if continuous:
                        chunk["usage"] = _usage(len(ids), hi, details=False)
                    yield _sse(chunk)
                if include_usage:
                    yield _sse({"request_id": rid, "model": model, "created": created, "choices": [],
                                "usage": _usage(len(ids), len(seq.output_ids), details=False)})
                yield b"data: [DONE]\n\n"

            handed_off = True
            return streaming(chunks())
        finally:
            if not handed_off:
                st.stats["in_flight"] -= 1

    # -- POST /v1/completions
    async def completions(request: Request) -> Response:
        t0 = time.monotonic()
        nreq = begin(COMPLETIONS_PATH)
        handed_off = False
        try:
            try:
                body = await _read_body(request)
                await before_generation(nreq)
                prompt = body.get("prompt")
                if prompt is None or prompt == "":
                    raise _validation_error("body", "value_error",
                                            "Value error, Either prompt or prompt_embeds must be provided and "
                                            "non-empty.", body)
                if isinstance(prompt, str):
                    prompts = [st.encode(prompt)]
                elif isinstance(prompt, list) and prompt and all(isinstance(x, str) for x in prompt):
                    prompts = [st.encode(x) for x in prompt]
                elif isinstance(prompt, list) and prompt and all(isinstance(x, list) for x in prompt):
                    prompts = [_check_ids(x, f"body.prompt.{i}") for i, x in enumerate(prompt)]
                else:
                    prompts = [_check_ids(prompt, "body.prompt")]
                if any(not ids for ids in prompts):
                    raise _VError("The prompt is empty.", 400, param="prompt")
                check_model(body)
                if body.get("suffix") is not None:
                    raise _VError("suffix is not currently supported")
                if body.get("echo"):
                    raise _VError("echo is not supported by the mock vLLM worker", param="echo")
                if body.get("stream_options") and not body.get("stream"):
                    raise _VError("Stream options can only be defined when `stream=True`.", param="stream_options")
                parsed = [_sampling(body, allow_n=True, max_tokens_default=16, prompt_len=len(ids)) for ids in prompts]
                rid = body.get("request_id")
                if rid is None:
                    rid = uuid.uuid4().hex
                if not isinstance(rid, str):
                    raise _validation_error("body.request_id", "string_type", "Input should be a valid string", rid)
            except _VError as e:
                return e.response()
            stream = bool(body.get("stream") or False)
            want_ids = bool(body.get("return_token_ids"))
            as_ids = bool(body.get("return_tokens_as_token_ids"))
            cmpl_id = f"cmpl-{rid}"
            seqs: list[_VSequence] = []
            for i, (ids, (params, logprobs, n)) in enumerate(zip(prompts, parsed)):
                item = f"{cmpl_id}-{i}"
                for j in range(n):
                    seqs.append(new_seq(
                        rid=item if n == 1 else f"{j}_{item}", index=len(seqs), ids=ids, params=params,
                        sample_idx=j, stream=stream, logprobs=logprobs, cache_salt=body.get("cache_salt"),
                        path=COMPLETIONS_PATH, abort_keys=frozenset({rid, cmpl_id, item}), t0=t0,
                    ))
            logprobs = parsed[0][1]
            model, created = st.config.model_path, int(time.time())
            n_prompt = sum(len(ids) for ids in prompts)

            if not stream:
                async def run_all() -> None:
                    await asyncio.gather(*(drain(s) for s in seqs))

                finished, _ = await until_disconnect(request, admitted(run_all()))
                if not finished:
                    return _VError("Client disconnected").response()
                choices = []
                for s in seqs:
                    n_out = len(s.output_ids)
                    choices.append({
                        "index": s.index,
                        "text": s.text(final=True),
                        "logprobs": (None if logprobs is None
                                     else _completion_logprobs(s, 0, n_out, logprobs, as_ids, 0)),
                        "finish_reason": s.vllm_finish_reason,
                        "stop_reason": s.stop_reason,
                        "token_ids": list(s.output_ids) if want_ids else None,
                        "prompt_logprobs": None,
                        "prompt_token_ids": list(s.input_ids) if want_ids else None,
                    })
                return _json({
                    "id": cmpl_id,
                    "object": "text_completion",
                    "created": created,
                    "model": model,
                    "choices": choices,
                    "service_tier": None,
                    "system_fingerprint": None,
                    "usage": _usage(n_prompt, sum(len(s.output_ids) for s in seqs)),
                    "kv_transfer_params": None,
                })
            include_usage, continuous = usage_flags(body)

            async def chunks() -> AsyncIterator[bytes]:
                text_sent = {id(s): "" for s in seqs}
                first = {id(s): True for s in seqs}
                async for step in stream_steps(seqs, want_text=True):
                    s, lo, hi, text = step.seq, step.lo, step.hi, step.text
                    delta = text[len(text_sent[id(s)]):]
                    if not delta and hi == lo and step.finish_reason is None:
                        continue
                    text_sent[id(s)] = text
                    choice = {
                        "index": s.index,
                        "text": delta,
                        "logprobs": None if logprobs is None else _completion_logprobs(
                            s, lo, hi, logprobs, as_ids, len(text) - len(delta)),
                        "finish_reason": step.finish_reason,
                        "stop_reason": s.stop_reason if step.finish_reason else None,
                        "prompt_token_ids": list(s.input_ids) if want_ids and first[id(s)] else None,
                        "token_ids": s.output_ids[lo:hi] if want_ids else None,
                    }
                    first[id(s)] = False
                    chunk: dict[str, Any] = {"id": cmpl_id, "object": "text_completion", "created": created,
                                             "model": model, "choices": [choice], "usage": None}
                    if continuous:
                        chunk["usage"] = _usage(len(s.input_ids), hi)
                    yield _sse(chunk)
                if include_usage:
                    yield _sse({"id": cmpl_id, "object": "text_completion", "created": created, "model": model,
                                "choices": [], "usage": _usage(n_prompt, sum(len(s.output_ids) for s in seqs),
                                                               details=False)})
                yield b"data: [DONE]\n\n"

            handed_off = True
            return streaming(chunks())
        finally:
            if not handed_off:
                st.stats["in_flight"] -= 1

    # -- operations
    def abort_matching(ids: list[str] | None, message: str) -> int:
        n = 0
        for seq in list(st.running.values()):
            if seq.finish_reason is not None:
                continue
            keys = getattr(seq, "abort_keys", frozenset()) or frozenset({seq.rid})
            if not ids or any(r in keys for r in ids):
                seq.abort(message)
                n += 1
        return n

    async def abort_requests(request: Request) -> Response:
        st.count_path("/abort_requests")
        try:
            body = await _read_body(request) if await request.body() else {}
        except _VError as e:
            return e.response()
        ids = body.get("request_ids")
        if isinstance(ids, str):
            ids = [ids]
        if ids is not None and (not isinstance(ids, list) or not all(isinstance(r, str) for r in ids)):
            return _validation_error("body.request_ids", "list_type", "Input should be a valid list of strings",
                                     ids).response()
        n = abort_matching(ids or None, "Abort requested")
        st.stats.setdefault("abort_requests", []).append({"request_ids": ids or [], "matched": n})
        return _json({"status": "aborted", "aborted": n})

    async def pause(request: Request) -> Response:
        st.count_path("/pause")
        mode = request.query_params.get("mode", "abort")
        if mode not in PAUSE_MODES:
            return _validation_error("query.mode", "literal_error", "Input should be 'abort', 'wait' or 'keep'",
                                     mode).response()
        admission.clear()
        if mode == "abort":
            abort_matching(None, "Abort due to pause")
        elif mode == "wait":
            while active[0] > 0 or any(s.finish_reason is None for s in st.running.values()):
                await asyncio.sleep(0.005)
        else:  # keep: in-flight requests freeze where they are
            st.resume.clear()
        return _json({"status": "paused"})

    async def resume(request: Request) -> Response:
        st.count_path("/resume")
        st.resume.set()
        admission.set()
        return _json({"status": "resumed"})

    async def is_paused(request: Request) -> Response:
        return _json({"is_paused": not admission.is_set()})

    async def update_weight_version(request: Request) -> Response:
        st.count_path("/update_weight_version")
        try:
            body = await _read_body(request)
        except _VError as e:
            return e.response()
        if "new_version" not in body:
            return _validation_error("body.new_version", "missing", "Field required", body).response()
        v = body["new_version"]
        if not isinstance(v, str):
            return _validation_error("body.new_version", "string_type", "Input should be a valid string",
                                     v).response()
        st.config.weight_version = v
        return _json({"success": True, "new_version": v})

    async def weight_info(request: Request) -> Response:
        st.count_path("/weight_info")
        return _json({"weight_version": st.config.weight_version})

    async def reset_prefix_cache(request: Request) -> Response:
        st.count_path("/reset_prefix_cache")
        if not st.running:  # vLLM leaves the cache alone while requests run
            st.cache.clear()
        return Response(b"", status_code=200)

    async def health(request: Request) -> Response:
        st.count_path("/health")
        return Response(b"", status_code=st.healthy_status())

    async def models(request: Request) -> Response:
        c = st.config
        return _json({"object": "list", "data": [{
            "id": c.model_path, "object": "model", "created": int(time.time()), "owned_by": "vllm",
            "root": c.model_path, "parent": None, "max_model_len": MAX_MODEL_LEN, "permission": [],
        }]})

    async def version(request: Request) -> Response:
        return _json({"version": "0.0.0-mock"})

    routes: list[Route] = []
    if generate_endpoint:
        routes.append(Route(GENERATE_PATH, generate, methods=["POST"]))
    routes += [
        Route(COMPLETIONS_PATH, completions, methods=["POST"]),
        Route("/abort_requests", abort_requests, methods=["POST"]),
        Route("/pause", pause, methods=["POST"]),
        Route("/resume", resume, methods=["POST"]),
        Route("/is_paused", is_paused, methods=["GET"]),
        Route("/update_weight_version", update_weight_version, methods=["POST"]),
        Route("/weight_info", weight_info, methods=["GET"]),
        Route("/reset_prefix_cache", reset_prefix_cache, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/version", version, methods=["GET"]),
        *mock_control_routes(st),
    ]
    spec = _openapi(routes)

    async def openapi(request: Request) -> Response:
        return _json(spec)

    routes.append(Route("/openapi.json", openapi, methods=["GET"]))

    async def fastapi_style(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        detail = exc.detail if isinstance(exc, HTTPException) else "Internal Server Error"
        return _json({"detail": detail}, status)

    app = Starlette(routes=routes, exception_handlers={404: fastapi_style, 405: fastapi_style})
    app.state.mock = st
    app.state.generate_endpoint = generate_endpoint
    return app


def _openapi(routes: list[Route]) -> dict:
    """A minimal OpenAPI document: the served paths and methods (what a router probes)."""
    paths: dict[str, dict] = {}
    for r in routes:
        ops = paths.setdefault(r.path, {})
        for m in sorted(r.methods or ()):
            if m != "HEAD":
                ops[m.lower()] = {"summary": r.name, "responses": {"200": {"description": "Successful Response"}}}
    return {"openapi": "3.1.0", "info": {"title": "vLLM (mock)", "version": "0.0.0-mock"}, "paths": paths}


def serve_mock_vllm_worker(host: str, port: int, config: MockWorkerConfig | None = None, *,
                           generate_endpoint: bool = True) -> None:
    """Run a mock vLLM worker with uvicorn (blocking); uvloop/httptools when available."""
    import importlib.util

    import uvicorn

    app = create_mock_vllm_worker_app(config or MockWorkerConfig(), generate_endpoint=generate_endpoint)
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    uvicorn.run(app, host=host, port=port, loop=loop, http=http, log_level="warning", access_log=False)

