"""The ``/generate`` hot path as a lean raw-ASGI handler.

No framework work per request: read the body, validate it, run the hooks that exist, forward
the original bytes when nothing rewrote them, and pass the worker's answer (or stream) through.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .context import RequestContext
from .errors import HTTPError
from .router import STREAM_ERRORS, BadChunk, Router, UpstreamError, maybe_await
from .sse import DONE, END, OPAQUE, EventSplitter, encode_event, parse_event

log = logging.getLogger("slime_router")

Send = Callable[[dict], Awaitable[None]]
Receive = Callable[[], Awaitable[dict]]

PROMPT_KEYS = ("text", "input_ids", "input_embeds")
JSON_HEADERS = [(b"content-type", b"application/json")]
SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]


async def send_bytes(send: Send, status: int, body: bytes) -> None:
    # content-length spares the server chunked framing
    await send({"type": "http.response.start", "status": status,
                "headers": [*JSON_HEADERS, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def error_body(e: HTTPError) -> bytes:
    return orjson.dumps(e.to_dict())


# The answers to a request no route serves (off the hot path: only POST /generate reaches the handler below;
# every other method on /generate, and every unknown path, is answered through the app's error handlers).
def unknown_route_error(method: str, path: str) -> HTTPError:
    """404 for a path no route (core or loaded plugin) serves."""
    return HTTPError(404, f"Unknown endpoint: {method} {path}. The endpoints are listed at GET /docs and in the "
                          f"README's Endpoints table; a plugin's endpoints exist only when it is loaded "
                          f"(GET /plugins lists the loaded plugins).", code="unknown_route")


def method_not_allowed_error(method: str, path: str, allowed: str | None) -> HTTPError:
    """405 for a known path asked with a method it does not serve (the answer keeps the ``Allow`` header)."""
    return HTTPError(405, f"Method {method} is not allowed on {path}; allowed: {allowed or 'none'}.",
                     code="method_not_allowed")


async def read_body(scope: dict, receive: Receive, limit: int) -> bytes:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                if int(value) > limit:
                    raise HTTPError(413, f"Request body of {int(value)} bytes exceeds the limit of {limit} bytes "
                                         f"(raise it with --max-body-size)")
            except ValueError:
                raise HTTPError(400, "Invalid Content-Length header") from None
            break
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionAbortedError("client disconnected while sending the body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise HTTPError(413, f"Request body exceeds the limit of {limit} bytes (raise it with --max-body-size)")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _is_int_list(v: Any) -> bool:
    return isinstance(v, list) and all(type(x) is int for x in v)


def validate_generate(body: Any) -> None:
    """The checks SGLang would make, answered before a worker is bothered."""
    if not isinstance(body, dict):
        raise HTTPError(400, "Request body must be a JSON object like {\"text\": \"...\", \"sampling_params\": {...}}")
    given = [k for k in PROMPT_KEYS if body.get(k) is not None]
    if not given:
        raise HTTPError(400, "Either text, input_ids or input_embeds should be provided.", param="text")
    if len(given) > 1:
        raise HTTPError(400, f"Provide exactly one of text, input_ids or input_embeds (got {given}).", param=given[1])
    text = body.get("text")
    if text is not None and not (isinstance(text, str) or (isinstance(text, list) and text
                                                            and all(isinstance(t, str) for t in text))):
        raise HTTPError(400, "'text' must be a string or a non-empty list of strings.", param="text")
    ids = body.get("input_ids")
    if ids is not None and not (_is_int_list(ids) and ids or (isinstance(ids, list) and ids and all(
            _is_int_list(x) and x for x in ids))):
        raise HTTPError(400, "'input_ids' must be a non-empty list of integers or a list of such lists.",
                        param="input_ids")
    sp = body.get("sampling_params")
    if sp is not None and not isinstance(sp, dict) and not (isinstance(sp, list) and all(isinstance(x, dict)
                                                                                         for x in sp)):
        raise HTTPError(400, "'sampling_params' must be an object (or a list of objects for a batch).",
                        param="sampling_params")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise HTTPError(400, "'stream' must be a boolean.", param="stream")
    for key in ("return_logprob", "return_text_in_logprobs"):
        if body.get(key) is not None and not isinstance(body[key], bool):
            raise HTTPError(400, f"'{key}' must be a boolean.", param=key)
    rid = body.get("rid")
    if rid is not None and not isinstance(rid, (str, list)):
        raise HTTPError(400, "'rid' must be a string (or a list of strings for a batch).", param="rid")



# --- the schema of /generate, for the OpenAPI document (the hot path above never builds these models) ----------
# GenerateRequest accepts exactly the bodies validate_generate accepts (tests/test_openapi_core.py checks it on
# generated bodies): change both together.

NonEmptyIntList = Annotated[list[int], Field(min_length=1)]


class GenerateRequest(BaseModel):
    """The body of ``POST /generate`` (SGLang's ``GenerateReqInput``), as the router checks it before a worker sees
    it: exactly one of ``text``, ``input_ids`` or ``input_embeds``. Every other SGLang field (``logprob_start_len``,
    ``top_logprobs_num``, ``lora_path``, ``extra_key``, ``priority``...) is passed to the worker as it is."""

    model_config = ConfigDict(extra="allow", strict=True)

    text: str | Annotated[list[str], Field(min_length=1)] | None = Field(
        None, description="The prompt; a list of prompts is a batch (the reply is then a list).")
    input_ids: NonEmptyIntList | Annotated[list[NonEmptyIntList], Field(min_length=1)] | None = Field(
        None, description="The prompt as token ids; a list of such lists is a batch.")
    input_embeds: Any = Field(None, description="The prompt as embeddings (SGLang: a list of vectors, or a list of "
                                                "such lists for a batch); passed to the worker unchecked.")
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = Field(
        None, description="SGLang's sampling parameters (max_new_tokens 128, temperature 1.0, top_p, top_k, "
                          "min_p, stop, stop_token_ids, n, ignore_eos, skip_special_tokens, no_stop_trim, "
                          "json_schema/regex/ebnf, sampling_seed...); a list gives each prompt of a batch its own. "
                          "The worker checks the keys.")
    stream: bool | None = Field(None, description="Server-sent events, one per chunk, then data: [DONE] "
                                                  "(default false).")
    return_logprob: bool | None = Field(None, description="Add meta_info.output_token_logprobs (default false).")
    return_text_in_logprobs: bool | None = Field(None, description="Fill the token text in each logprob entry.")
    rid: str | list[Any] | None = Field(None, description="Request id (a list for a batch); SGLang makes one "
                                                          "when absent. POST /abort_request matches it by prefix.")

    @model_validator(mode="after")
    def _one_prompt(self) -> GenerateRequest:
        given = [k for k in PROMPT_KEYS if getattr(self, k) is not None]
        if not given:
            raise ValueError("Either text, input_ids or input_embeds should be provided.")
        if len(given) > 1:
            raise ValueError(f"Provide exactly one of text, input_ids or input_embeds (got {given}).")
        return self


# [logprob, token id, token text (with return_text_in_logprobs) or null]
LogprobEntry = tuple[float | None, int, str | None]


class FinishReason(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str = Field(description="stop (EOS, stop token or stop string), length, or abort.")
    matched: int | str | None = Field(None, description="stop: the token id or stop string that matched.")
    length: int | None = Field(None, description="length: the limit reached.")
    message: str | None = Field(None, description="abort: why.")


class WeightVersionSpan(BaseModel):
    version: str
    start: int = Field(description="First output token generated with this version.")
    end: int = Field(description="One past the last.")


class GenerateMetaInfo(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str = Field(description="The request id (rid).")
    finish_reason: FinishReason | None = Field(description="null until the last chunk of a stream.")
    prompt_tokens: int
    completion_tokens: int = Field(description="Cumulative, also in streams; equals len(output_ids).")
    cached_tokens: int | None = Field(None, description="Prompt tokens served from the worker's prefix cache.")
    weight_version: str | None = Field(None, description="The weights that produced the reply (SGLang >= 0.5.1).")
    weight_versions: list[WeightVersionSpan] | None = Field(
        None, description="SGLang 0.5.23, when the weights changed during the generation: each version's span.")
    e2e_latency: float | None = Field(None, description="Seconds; in a stream only on the last chunk.")
    output_token_logprobs: list[LogprobEntry] | None = Field(None, description="With return_logprob.")
    input_token_logprobs: list[LogprobEntry] | None = Field(
        None, description="With return_logprob and logprob_start_len >= 0; the first logprob is null.")
    output_top_logprobs: list[list[LogprobEntry] | None] | None = Field(None, description="With top_logprobs_num.")
    input_top_logprobs: list[list[LogprobEntry] | None] | None = None


class GenerateResponse(BaseModel):
    """One sequence of SGLang's reply (a streamed chunk has the same shape)."""

    model_config = ConfigDict(extra="allow")
    text: str = Field(description="The output text, special tokens skipped, a matched stop string cut off.")
    output_ids: list[int] | None = Field(
        None, description="The output token ids, never trimmed (EOS / stop token included); absent in SGLang 0.4.")
    meta_info: GenerateMetaInfo
    index: int | None = Field(None, description="Which sequence of a batch stream this chunk belongs to.")

def parse_json(raw: bytes) -> Any:
    if not raw:
        raise HTTPError(400, "Empty request body: send a JSON object")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise HTTPError(400, f"Malformed JSON body: {e}") from None


class GenerateHandler:
    """Raw ASGI handler for ``POST /generate``."""

    def __init__(self, router: Router) -> None:
        self.router = router

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        router = self.router
        admission = router.admission
        admitted = False
        ctx: RequestContext | None = None
        status = 500
        error: str | None = None
        try:
            raw = await read_body(scope, receive, router.settings.max_body_size)
            body = parse_json(raw)
            validate_generate(body)
            ctx = RequestContext("/generate", body, raw, router=router)
            ctx._raw_headers = scope["headers"]
            # --max-concurrent-requests: a slot from here to the response's end (no await when one is free)
            admitted = admission.try_acquire()
            if not admitted:
                await self._queue(ctx, receive)
                admitted = True
            if router.hooks.pre_request:
                await router.run_pre_request(ctx)
                payload = orjson.dumps(ctx.body)  # what the hooks made of it is what is sent
            else:
                payload = raw
            if ctx.stream:
                status = await self._stream(ctx, payload, receive, send)
            else:
                status = await self._plain(ctx, payload, send)
        except UpstreamError as e:
            status, error = e.status, e.message
            if not (ctx and ctx.sent_to_client):
                await send_bytes(send, e.status, e.body or error_body(e))
        except HTTPError as e:
            status, error = e.status, e.message
            if not (ctx and ctx.sent_to_client):
                if getattr(e, "headers", None):  # e.g. a 429's Retry-After
                    await self._send_error_with_headers(send, e)
                else:
                    await send_bytes(send, e.status, error_body(e))
        except ConnectionAbortedError as e:
            status, error = 499, str(e)
        except asyncio.CancelledError:
            status, error = 499, "client disconnected"
            task = asyncio.current_task()
            uncancel = getattr(task, "uncancel", None)  # Python >= 3.11
            if task is not None and uncancel:
                uncancel()
        except Exception as e:  # a plugin bug: answer 500 with the cause, keep serving
            log.exception("error handling /generate")
            status, error = 500, f"{type(e).__name__}: {e}"
            if not (ctx and ctx.sent_to_client):
                await send_bytes(send, 500, error_body(HTTPError(500, f"Internal error: {error}",
                                                                 type="internal_error")))
        finally:
            if admitted:
                admission.release()
            if ctx is not None:
                router.finish(ctx, status, error)

    async def _queue(self, ctx: RequestContext, receive: Receive) -> None:
        """Wait for a slot (``Admission.wait``: 429 when refused); a client that leaves meanwhile cancels it."""
        admission = self.router.admission
        if admission.queued >= admission.max_queued:
            await admission.wait()  # the queue is full: refused at once, no need to watch the client
        t = time.perf_counter()
        watcher = asyncio.create_task(cancel_on_disconnect(receive, asyncio.current_task()))
        try:
            await admission.wait()
        finally:
            watcher.cancel()
            ctx.timings["queued"] = time.perf_counter() - t

    @staticmethod
    async def _send_error_with_headers(send: Send, e: HTTPError) -> None:
        body = error_body(e)
        headers = [*JSON_HEADERS, (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in e.headers.items()]
        await send({"type": "http.response.start", "status": e.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _plain(self, ctx: RequestContext, payload: bytes, send: Send) -> int:
        router = self.router
        status, data, worker = await router.send_json(ctx, payload)
        if router.hooks.post_response:  # a plugin reads the reply: it is checked first (bytes pass through unread)
            ctx.raw_response = data
            response = await router.run_post_response(ctx, router.read_reply(ctx, worker, data))
            data = orjson.dumps(response)
        ctx.sent_to_client = True
        await send_bytes(send, status, data)
        return status

    async def _stream(self, ctx: RequestContext, payload: bytes, receive: Receive, send: Send) -> int:
        router = self.router
        resp, worker = await router.open_stream(ctx, payload)
        # A client that goes away cancels this task; closing the upstream connection then makes
        # the worker abort the generation.
        watcher = asyncio.create_task(cancel_on_disconnect(receive, asyncio.current_task()))
        completed = False
        chunks: list[dict] = []
        try:
            await send({"type": "http.response.start", "status": resp.status, "headers": SSE_HEADERS})
            ctx.sent_to_client = True
            try:
                if not ctx.inspect_stream:  # a byte relay (bounded by --request-timeout between chunks)
                    tail = b""
                    async for data in router.stream_chunks(resp):
                        if "first_chunk" not in ctx.timings:
                            ctx.timings["first_chunk"] = time.perf_counter() - ctx.started
                        tail = (tail + data)[-32:] if len(data) < 32 else data[-32:]
                        await send({"type": "http.response.body", "body": data, "more_body": True})
                    done = tail.rstrip().endswith(b"data: [DONE]")
                else:
                    done = await self._relay_inspected(ctx, resp, send, chunks)
                if not done:  # the worker closed the stream without its final event: not a complete reply
                    raise ConnectionError("the stream ended without its final data: [DONE] event")
                completed = True
            except STREAM_ERRORS as e:  # the worker's failure: an error event, then [DONE]; nothing recorded
                err = router.stream_failed(ctx, worker, e)
                await send({"type": "http.response.body", "body": encode_event(err) + DONE, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watcher.cancel()
            router.release_stream(resp, worker)
        if completed:
            await router.run_post_response(ctx, chunks)
        return resp.status

    async def _relay_inspected(self, ctx: RequestContext, resp: Any, send: Send, chunks: list[dict]) -> bool:
        """Parse each SSE event, check it (``Router.check_chunk``), let ``stream_chunk`` hooks see (and edit) it,
        re-serialize it. True when the stream ended with its ``[DONE]``. An unusable chunk raises ``BadChunk``
        after the events before it were passed on."""
        router = self.router
        stream_chunk = router.hooks.stream_chunk
        check_chunk = router.check_chunk
        splitter = EventSplitter()
        done = False
        async for data in router.stream_chunks(resp):
            out: list[bytes] = []
            for event in splitter.feed(data):
                obj = parse_event(event)
                if obj is OPAQUE:  # not a JSON data event: passed on as it came
                    out.append(event + b"\n\n")
                    continue
                if obj is END:
                    out.append(DONE)
                    done = True
                    continue
                try:
                    check_chunk(obj)
                except BadChunk:
                    if out:
                        await send({"type": "http.response.body", "body": b"".join(out), "more_body": True})
                    raise
                if stream_chunk:
                    pending = stream_chunk(ctx=ctx, chunk=obj)
                    if pending:  # e.g. a record that must land before this chunk reaches the client
                        await maybe_await(pending)
                chunks.append(obj)
                out.append(encode_event(obj))
            if out:
                if "first_chunk" not in ctx.timings:
                    ctx.timings["first_chunk"] = time.perf_counter() - ctx.started
                await send({"type": "http.response.body", "body": b"".join(out), "more_body": True})
        if splitter.rest.strip():
            await send({"type": "http.response.body", "body": splitter.rest, "more_body": True})
        return done


async def cancel_on_disconnect(receive: Receive, task: asyncio.Task | None) -> None:
    """Cancel ``task`` when the client goes away (run beside a handler that does not read the request any more)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            if task is not None:
                task.cancel()
            return
