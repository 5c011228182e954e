"""openai_compat: /v1/chat/completions, /v1/completions, /v1/models, /retrieve_from_messages.

See README.md in this directory for the behaviour and the policies (history, tool_choice, stop...).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.responses import StreamingResponse

from slime_router_core import hookimpl

from .schema import bad, parse_body, validate_chat, validate_completion, validate_messages, validate_tools
from .service import OpenAIService, StreamJob

COMPONENT = "openai_compat"
# The accepted values of the enumerated flags: anything else is refused at start-up, naming these.
HISTORY_MODES = ("template", "raw")
REASONING_PARSERS = ("qwen3", "none")
TOOL_PARSERS = ("qwen", "none")


@hookimpl
def add_options(options: Any) -> None:
    options.add("--served-model-name", default=None,
                help="Model name listed by /v1/models and used when a request has no 'model' "
                     "(default: the basename of --hf-checkpoint).")
    options.add("--openai-history", default="template", choices=HISTORY_MODES,
                help="How assistant turns in the request history are rendered: 'template' (the chat template, "
                     "reasoning restored for turns the router produced) or 'raw' (the exact text the model "
                     "generated, so no generated token is lost). Per request: 'history_mode'.")
    options.add("--openai-history-size", type=int, default=100_000,
                help="How many generated assistant turns to remember for exact history rendering.")
    options.add("--openai-reasoning-parser", default="qwen3", choices=REASONING_PARSERS,
                help="'qwen3' splits <think>...</think> into reasoning_content; 'none' keeps it in content.")
    options.add("--openai-tool-parser", default="qwen", choices=TOOL_PARSERS,
                help="'qwen' parses <tool_call>{json}</tool_call> into tool_calls (when the request has tools); "
                     "'none' disables it.")
    options.add("--openai-default-max-tokens", type=int, default=None,
                help="max_new_tokens when a request sets neither max_tokens nor max_completion_tokens "
                     "(default: the worker's own default).")


@hookimpl
def required_components() -> list[str]:
    return ["tokenizer"]


@hookimpl
def register_components(registry: Any, router: Any) -> None:
    if registry.has("tokenizer"):  # otherwise required_components reports it clearly
        registry.register(COMPONENT, OpenAIService(router), owner=COMPONENT)


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
        import orjson

        return Response(orjson.dumps(result), media_type="application/json")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        """OpenAI Chat Completions over the workers' /generate (token-exact through the trajectory cache)."""
        body = parse_body(await request.body())
        validate_chat(body)
        return answer(await svc().chat(body, _headers(request)))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        """OpenAI (legacy) Completions: a text prompt (or token ids) through the same path."""
        body = parse_body(await request.body())
        validate_completion(body)
        return answer(await svc().completion(body, _headers(request)))

    @app.get("/v1/models")
    async def models() -> dict:
        """The served model (``--served-model-name`` or the checkpoint's basename)."""
        s = svc()
        return {"object": "list", "data": [{"id": s.model_name, "object": "model", "created": int(router.started_at),
                                            "owned_by": "slime-router", "root": router.settings.hf_checkpoint}]}

    @app.post("/retrieve_from_messages")
    async def retrieve_from_messages(request: Request) -> Response:
        """Training data for a chat conversation: tokens, loss_mask, rollout_logp, weight versions.

        Body: ``{"messages", "tools"?, "chat_template_kwargs"?, "strict"?, "history_mode"?, "return_text"?}``.
        Says ``history_rewritten`` when the chat template re-rendered earlier generated turns.
        """
        body = parse_body(await request.body())
        validate_messages(body.get("messages"))
        validate_tools(body)
        if body.get("chat_template_kwargs") is not None and not isinstance(body["chat_template_kwargs"], dict):
            raise bad("Invalid type for 'chat_template_kwargs': expected an object.", "chat_template_kwargs",
                      "invalid_type")
        if body.get("history_mode") not in (None, "template", "raw"):
            raise bad(f"Invalid 'history_mode': {body['history_mode']!r}; expected 'template' or 'raw'.",
                      "history_mode")
        if body.get("strict") is not None and not isinstance(body["strict"], bool):
            raise bad("Invalid type for 'strict': expected a boolean.", "strict", "invalid_type")
        return answer(await svc().retrieve_messages(body))

    @app.get("/openai_compat/stats")
    async def openai_stats() -> dict:
        """Counters: requests, streams, disconnects, recorded turns, history rewrites found by retrievals."""
        return svc().stats()

