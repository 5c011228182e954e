"""The core's own HTTP API, as a built-in plugin.

``load_plugins`` registers this module first, under the name ``core`` (source ``built-in``), through the same hooks
as every other plugin (the way pytest builds itself from its own plugins). It cannot be blocked: without it the
router cannot be administered.

Its one hook, ``register_routes``, is a wrapper around every other plugin's ``register_routes``:

- before them: the admin routes ``/health``, ``/add_worker``, ``/remove_worker``, ``/list_workers``, ``/plugins``,
  and the documentation of ``POST /generate`` (served by the raw-ASGI hot path, ``proxy.GenerateHandler``); being
  first, a plugin's route cannot shadow them;
- after them: the worker endpoints the router passes on, for the paths no plugin serves itself:
  ``FORWARD_TO_ONE`` (one worker, through ``Router.request``) and ``BROADCAST`` (every worker).

A wrapper, not ``tryfirst``/``trylast`` implementations: pluggy calls the ``trylast`` implementation registered
*last* last (and the ``tryfirst`` one registered last first), so the core, registered first, would run before a
plugin's own ``trylast`` ``register_routes`` and forward the paths that plugin then serves. A wrapper's code after
its ``yield`` runs after every non-wrapper implementation, whatever their ``tryfirst``/``trylast``; ``tryfirst``
makes it the outermost wrapper too (unless a plugin's own wrapper also asks for ``tryfirst``).
tests/test_admin_plugin.py checks these orders.

Every route declares its request and response models, so ``/openapi.json`` describes the real API. Errors have the
project's shape (``ErrorResponse``); a body the models refuse is answered 400 in that shape by the app's
validation handler, with the message of ``request_error`` when a validator here raised one.
"""

from __future__ import annotations

import math
from collections.abc import Generator
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import orjson
from fastapi import Body, FastAPI, Query
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from .context import RequestContext
from .errors import HTTPError
from .hookspecs import hookimpl
from .proxy import GenerateRequest, GenerateResponse
from .router import UpstreamError
from .workers import normalize_worker_url

if TYPE_CHECKING:  # pragma: no cover
    from .router import Router

SOURCE = "built-in"  # its source in GET /plugins (its name, "core": plugins.CORE)

# Worker endpoints the router forwards. One worker answers reads; these go to every worker.
FORWARD_TO_ONE = {"/get_model_info": "GET", "/model_info": "GET", "/get_server_info": "GET",
                  "/server_info": "GET", "/v1/models": "GET"}
BROADCAST = {"/flush_cache": "POST", "/abort_request": "POST", "/get_load": "GET",
             "/update_weights_from_disk": "POST", "/update_weight_version": "POST",
             "/pause_generation": "POST", "/continue_generation": "POST"}

# The ``type`` of a validation error whose message is the answer as written (see ``request_error``).
REQUEST_ERROR = "slime_router_request_error"


def request_error(message: str) -> PydanticCustomError:
    """A validation error the app's handler answers with ``message`` unchanged (400, the project's shape)."""
    return PydanticCustomError(REQUEST_ERROR, message)


# --- errors -----------------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str = Field(description="What went wrong and, where possible, how to fix it.")
    type: str = Field(description="invalid_request_error, not_found_error, service_unavailable, upstream_error, "
                                  "request_too_large, internal_error...")
    param: str | None = Field(None, description="The request field at fault, if one is.")
    code: str | int | None = None


class ErrorResponse(BaseModel):
    """Every error the router answers itself (the OpenAI error shape, which SGLang clients also read)."""

    error: ErrorDetail


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    described = {400: "Invalid request", 404: "Not found", 502: "A worker was unreachable",
                 503: "No (available) worker"}
    return {s: {"model": ErrorResponse, "description": described[s]} for s in statuses}


# --- request bodies ---------------------------------------------------------------------------------------


class JSONObjectBody(BaseModel):
    """A JSON object body. Sent without a JSON content type (``curl -d``), FastAPI hands it over as bytes: it is
    parsed here, as the router always did, so both ways of sending it work."""

    not_an_object: ClassVar[str] = "Body must be a JSON object"

    @model_validator(mode="before")
    @classmethod
    def _json_object(cls, data: Any) -> Any:
        if isinstance(data, (bytes, bytearray)):
            try:
                data = orjson.loads(data)
            except orjson.JSONDecodeError as e:
                raise request_error(f"Malformed JSON body: {e}") from None
        if not isinstance(data, (dict, BaseModel)):
            raise request_error(cls.not_an_object)
        if isinstance(data, dict):
            problem = unsendable(data)
            if problem:
                raise request_error(problem)
        return data


def unsendable(value: Any, path: str = "body") -> str | None:
    """Why ``value`` (parsed by FastAPI's ``json``, which takes any integer, NaN and Infinity) cannot be sent on
    as JSON to a worker, or None: orjson -- and the workers' parsers -- take 64-bit integers and finite numbers."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return None
    if isinstance(value, int):
        return None if -(2**63) <= value < 2**64 else f"{path}: the integer {value} does not fit in 64 bits"
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{path}: {value} is not a JSON number (NaN and Infinity are not)"
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for k, v in items:
        problem = unsendable(v, f"{path}.{k}" if isinstance(k, str) else f"{path}[{k}]")
        if problem:
            return problem
    return None


class WorkerURL(JSONObjectBody):
    """A worker's address: the JSON form of ``/add_worker`` and ``/remove_worker`` (``?url=`` is the other)."""

    not_an_object: ClassVar[str] = 'Body must be a JSON object like {"url": "http://127.0.0.1:30001"}'

    url: str | None = Field(None, description="The worker's scheme://host:port (http or https, nothing else).",
                            examples=["http://127.0.0.1:30001"])
    engine: str | None = Field(None, description="Its inference engine (sglang, or one a plugin adds, e.g. vllm); "
                                                 "omitted: read from its /openapi.json", examples=["vllm"])

    @field_validator("url", mode="before")
    @classmethod
    def _valid_url(cls, value: Any) -> Any:
        if value is None:
            return None
        try:
            return normalize_worker_url(value)
        except HTTPError as e:
            raise request_error(e.message) from None


class WorkerCommand(JSONObjectBody):
    """A JSON object sent to every worker as it is (e.g. ``/abort_request``: ``{"rid": "...", "abort_all": false}``;
    ``/update_weight_version``: ``{"new_version": "7"}``); see SGLang's API for each endpoint's fields."""

    model_config = ConfigDict(extra="allow")
    not_an_object: ClassVar[str] = "Body must be a JSON object (it is sent to every worker as it is)"


# --- responses --------------------------------------------------------------------------------------------


class Health(BaseModel):
    status: Literal["ok"]
    workers: int = Field(description="Registered workers.")
    available_workers: int = Field(description="Workers a request may be sent to (healthy, circuit closed).")
    in_flight: int | None = Field(None, description="Generations holding a slot now (/generate, streams, plugins' "
                                                    "generations), as --max-concurrent-requests counts them.")
    queued: int | None = Field(None, description="Generations waiting for a slot (--max-queued-requests).")
    max_concurrent_requests: int | None = Field(None, description="The limit of in_flight (--max-concurrent-"
                                                                  "requests); 0: unlimited.")


class WorkerAdded(BaseModel):
    status: Literal["added", "already_registered"]
    url: str = Field(description="The worker's normalized URL.")
    urls: list[str] = Field(description="Every registered worker.")


class WorkerRemoved(BaseModel):
    status: Literal["removed"]
    url: str
    in_flight: int = Field(description="Requests still running on it; they finish.")
    urls: list[str] = Field(description="The workers left.")


class WorkerInfo(BaseModel):
    url: str
    engine: str = Field(description="Its inference engine: sglang, or one a plugin adds (e.g. vllm).")
    in_flight: int
    requests: int = Field(description="Requests sent to it since it was added.")
    failures: int = Field(description="Failed attempts (connection errors, status >= 500, broken streams).")
    healthy: bool = Field(description="As last seen by a health-checking plugin (true without one).")
    available: bool = Field(description="Healthy, not removed, circuit not open.")


class WorkerList(BaseModel):
    urls: list[str]
    workers: list[WorkerInfo]


class PluginDescription(BaseModel):
    name: str
    source: str = Field(description='"built-in", "entry point <module> (<dist> <version>)", "dotted path"...')
    hooks: list[str] = Field(description="The hooks it implements.")


class WorkerAnswer(BaseModel):
    status: int = Field(description="The worker's HTTP status (502 if it was unreachable).")
    response: Any = Field(description="Its reply, parsed as JSON when it is JSON.")


class BroadcastResult(BaseModel):
    """The status is 200 when every worker answered 2xx, else the highest status a worker answered."""

    success: bool
    workers: dict[str, WorkerAnswer] = Field(description="Each worker's answer, by URL.")


class ModelInfo(BaseModel):
    """SGLang's ``/get_model_info`` (``/model_info``), passed through from one worker."""

    model_config = ConfigDict(extra="allow")
    model_path: str
    tokenizer_path: str | None = None
    is_generation: bool | None = None
    weight_version: str | None = Field(None, description="SGLang >= 0.5.1; 'default' unless set.")


class ServerInfo(BaseModel):
    """SGLang's ``/get_server_info`` (``/server_info``): every server argument plus scheduler state, passed
    through from one worker."""

    model_config = ConfigDict(extra="allow")
    model_path: str | None = None
    tp_size: int | None = None
    dp_size: int | None = None
    version: str | None = None


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    object: str = "model"
    created: int | None = None
    owned_by: str | None = None
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    """The worker's OpenAI model list, passed through."""

    model_config = ConfigDict(extra="allow")
    object: Literal["list"] = "list"
    data: list[ModelCard]


FORWARD_MODELS: dict[str, type[BaseModel]] = {"/get_model_info": ModelInfo, "/model_info": ModelInfo,
                                              "/get_server_info": ServerInfo, "/server_info": ServerInfo,
                                              "/v1/models": ModelList}

NO_WORKERS = "No workers registered. Add one with POST /add_worker?url=http://HOST:PORT"
URLQuery = Annotated[str | None, Query(description="The worker's scheme://host:port (or send a JSON body "
                                                  "{\"url\": ...}).", examples=["http://127.0.0.1:30001"])]


EngineQuery = Annotated[str | None, Query(description="The worker's inference engine (sglang, or one a plugin adds, "
                                                     "e.g. vllm); omitted: read from its /openapi.json",
                                         examples=["vllm"])]


def _url_from(url: str | None, body: WorkerURL | None) -> str:
    if url is None and body is not None:
        url = body.url
    if url is None:
        raise HTTPError(400, "Missing worker url: use ?url=http://HOST:PORT or a JSON body {\"url\": ...}",
                        param="url")
    return url


# --- the hooks --------------------------------------------------------------------------------------------


@hookimpl(wrapper=True, tryfirst=True)
def register_routes(app: FastAPI, router: Router) -> Generator[None, list[None], list[None]]:
    """The admin routes, then every other plugin's routes, then the worker endpoints none of them serves."""
    _admin_routes(app, router)
    result = yield
    _worker_routes(app, router)
    return result


def _admin_routes(app: FastAPI, router: Router) -> None:
    """The router's own API, and the documentation of ``POST /generate``."""

    @app.get("/health", responses=_errors())
    async def health() -> Health:
        """The router's own health (not the workers'), with its load: in_flight == max_concurrent_requests and a
        queue mean overload (new generations wait, then are refused with 429)."""
        load = router.admission.stats()  # the counters /metrics exports too
        return Health(status="ok", workers=len(router.pool), available_workers=len(router.pool.available()),
                      in_flight=load["in_flight"], queued=load["queued"],
                      max_concurrent_requests=load["max_concurrent_requests"])

    @app.post("/add_worker", responses=_errors(400))
    async def add_worker(url: URLQuery = None, body: Annotated[WorkerURL | None, Body()] = None,
                         engine: EngineQuery = None) -> WorkerAdded:
        """Add a worker: ``?url=http://host:port`` or JSON ``{"url": ...}``. Idempotent."""
        worker, created = await router.add_worker_detected(_url_from(url, body),
                                                           engine or (body.engine if body is not None else None))
        return WorkerAdded(status="added" if created else "already_registered", url=worker.url,
                           urls=router.pool.urls())

    @app.post("/remove_worker", responses=_errors(400, 404))
    async def remove_worker(url: URLQuery = None, body: Annotated[WorkerURL | None, Body()] = None) -> WorkerRemoved:
        """Remove a worker (same two forms). In-flight requests on it finish. Unknown URL: 404."""
        worker = router.remove_worker(_url_from(url, body))
        return WorkerRemoved(status="removed", url=worker.url, in_flight=worker.inflight, urls=router.pool.urls())

    @app.get("/list_workers")
    async def list_workers() -> WorkerList:
        """The registered workers and their counters."""
        return WorkerList(urls=router.pool.urls(), workers=[WorkerInfo(**w.to_dict()) for w in router.pool])

    @app.get("/plugins")
    async def list_plugins() -> list[PluginDescription]:
        """The loaded plugins (``core`` is this API), where each comes from and the hooks it implements."""
        return [PluginDescription(name=i.name, source=i.source, hooks=list(i.hooks))
                for i in router.plugins.infos.values()]

    @app.post("/generate", response_model=GenerateResponse | list[GenerateResponse],
              responses={200: {"description": "The worker's reply: one object, a list for a batch (or n > 1); "
                                              "with stream=true, server-sent events each carrying one such object, "
                                              "ending with data: [DONE].",
                               "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                         **_errors(400, 502, 503),
                         413: {"model": ErrorResponse, "description": "Body over --max-body-size"}})
    async def generate(body: GenerateRequest) -> None:  # pragma: no cover - served by the raw-ASGI handler
        """Proxied to a worker (SGLang's /generate). Served by the lean hot path; listed for the docs."""


def _worker_routes(app: FastAPI, router: Router) -> None:
    """The worker endpoints no plugin serves itself (a plugin such as balancing serves some more precisely)."""
    existing = {getattr(r, "path", None) for r in app.routes}
    for path in FORWARD_TO_ONE:
        if path not in existing:
            app.add_api_route(path, _forward_one(router, path), methods=["GET"], response_model=FORWARD_MODELS[path],
                              responses=_errors(502, 503))
    for path, method in BROADCAST.items():
        if path not in existing:
            app.add_api_route(path, _broadcast(router, path, method), methods=[method],
                              response_model=BroadcastResult,
                              responses=_errors(503) if method == "GET" else _errors(400, 503))


def _forward_one(router: Router, path: str) -> Any:
    async def handler() -> Response:
        # The router's one select-and-retry loop (hooks, in-flight, should_retry, --max-attempts).
        ctx = RequestContext(path, None, router=router)
        try:
            status, data, content_type, _ = await router.request(ctx, "GET")
        except UpstreamError as e:  # the worker's own error answer, passed through
            router.finish(ctx, e.status, e.message)
            return Response(e.body, status_code=e.status, media_type=e.content_type)
        except HTTPError as e:
            router.finish(ctx, e.status, e.message)
            raise
        router.finish(ctx, status)
        return Response(data, status_code=status, media_type=content_type)

    handler.__name__ = "forward" + path.replace("/", "_")
    handler.__doc__ = f"Forwarded to one available worker: GET {path}."
    return handler


def _broadcast(router: Router, path: str, method: str) -> Any:
    async def send(body: Any) -> Response:
        if not len(router.pool):
            raise HTTPError(503, NO_WORKERS)
        results = await router.broadcast(method, path, body)
        ok = all(200 <= s < 300 for s, _ in results.values())
        status = 200 if ok else max(s for s, _ in results.values())
        return JSONResponse({"success": ok, "workers": {u: {"status": s, "response": r}
                                                       for u, (s, r) in results.items()}},
                            status_code=status)

    async def without_body() -> Response:
        return await send(None)

    async def with_body(body: Annotated[WorkerCommand | None, Body()] = None) -> Response:
        return await send(None if body is None else body.model_extra)

    handler = without_body if method == "GET" else with_body
    handler.__name__ = "broadcast" + path.replace("/", "_")
    handler.__doc__ = f"Sent to every worker: {method} {path}; answers per worker."
    return handler
