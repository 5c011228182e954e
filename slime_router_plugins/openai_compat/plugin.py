"""openai_compat: /v1/chat/completions, /v1/completions, /v1/models, /retrieve_from_messages.

See README.md in this directory for the behaviour and the policies (history, tool_choice, stop...).
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.responses import StreamingResponse

from slime_router_core import hookimpl
from slime_router_core.contracts import OPENAI_COMPAT

from .config import OpenAIConfig
from .models import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    CompletionChunk,
    CompletionRequest,
    ErrorResponse,
    MessagesRetrieval,
    OpenAIStats,
    RetrieveFromMessagesRequest,
    ServedModelList,
    TextCompletion,
    add_schemas,
    request_body,
    streamed_answer,
)
from .schema import parse_body, validate_chat, validate_completion
from .service import OpenAIService, StreamJob

COMPONENT = "openai_compat"


@hookimpl
def add_options(options: Any) -> None:
    options.add_config(OpenAIConfig)


@hookimpl
def required_components() -> list[str]:
    return ["tokenizer"]


@hookimpl
def register_components(registry: Any, router: Any) -> None:
    if registry.has("tokenizer"):  # otherwise required_components reports it clearly
        registry.register(OPENAI_COMPAT, OpenAIService(router), owner=COMPONENT)


class JobResponse(StreamingResponse):
    """SSE response that always closes the upstream stream and the request's books."""

    def __init__(self, job: StreamJob) -> None:
        super().__init__(job.body(), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job = job

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.job.close(False)  # no-op when the body generator already closed it


def _headers(request: Request) -> dict[str, str]:
    return {k.lower(): v for k, v in request.headers.items()}


@hookimpl
def register_routes(app: FastAPI, router: Any) -> None:
    if not router.registry.has(COMPONENT):
        return

    def svc() -> OpenAIService:
        return router.registry.get(COMPONENT)

    def answer(result: Any) -> Response:
        if isinstance(result, StreamJob):
            return JobResponse(result)
        return Response(orjson.dumps(result), media_type="application/json")

    # The bodies are read by the hand parser of schema.py (OpenAI's error shape, naming the parameter); the
    # models of models.py describe them (request_body) and the answers, which are serialized with orjson.
    add_schemas(app, ChatCompletionRequest, CompletionRequest, RetrieveFromMessagesRequest, ChatCompletionChunk,
                CompletionChunk, ErrorResponse)
    errors: dict[int | str, dict[str, Any]] = {
        400: {"model": ErrorResponse, "description": "Invalid request (OpenAI's error shape, naming the parameter)"}}

    @app.post("/v1/chat/completions", response_class=Response, openapi_extra=request_body(ChatCompletionRequest),
              responses={200: streamed_answer(ChatCompletion, ChatCompletionChunk, "A chat.completion object, or "
                                              "server-sent chat.completion.chunk events with \"stream\": true"),
                         **errors})
    async def chat_completions(request: Request) -> Response:
        """OpenAI Chat Completions over the workers' /generate (token-exact through the trajectory cache)."""
        body = parse_body(await request.body())
        validate_chat(body)
        return answer(await svc().chat(body, _headers(request)))

    @app.post("/v1/completions", response_class=Response, openapi_extra=request_body(CompletionRequest),
              responses={200: streamed_answer(TextCompletion, CompletionChunk, "A text_completion object, or "
                                              "server-sent text_completion events with \"stream\": true"),
                         **errors})
    async def completions(request: Request) -> Response:
        """OpenAI (legacy) Completions: a text prompt (or token ids) through the same path."""
        body = parse_body(await request.body())
        validate_completion(body)
        return answer(await svc().completion(body, _headers(request)))

    @app.get("/v1/models", response_model=ServedModelList)
    async def models() -> dict:
        """The served model (``--served-model-name`` or the checkpoint's basename)."""
        s = svc()
        return {"object": "list", "data": [{"id": s.model_name, "object": "model", "created": int(router.started_at),
                                            "owned_by": "slime-router", "root": router.settings.hf_checkpoint}]}

    @app.post("/retrieve_from_messages", response_class=Response,
              openapi_extra=request_body(RetrieveFromMessagesRequest),
              responses={200: {"model": MessagesRetrieval}, **errors,
                         404: {"model": ErrorResponse, "description": "strict: part of it was never recorded"},
                         410: {"model": ErrorResponse, "description": "strict: part of it was evicted"},
                         501: {"model": ErrorResponse, "description": "The radix_tree plugin is not loaded"}})
    async def retrieve_from_messages(request: Request) -> Response:
        """Training data for a chat conversation: tokens, loss_mask, rollout_logp, weight versions.

        Body: ``{"messages", "tools"?, "chat_template_kwargs"?, "strict"?, "history_mode"?, "return_text"?}``.
        Says ``history_rewritten`` when the chat template re-rendered earlier generated turns.
        """
        return answer(await svc().retrieve_messages(parse_body(await request.body())))

    @app.get("/openai_compat/stats", response_model=OpenAIStats)
    async def openai_stats() -> dict:
        """Counters: requests, streams, disconnects, recorded turns, history rewrites found by retrievals."""
        return svc().stats()
