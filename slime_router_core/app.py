"""Builds the ASGI app from settings and loaded plugins.

The outer app is a tiny dispatcher: ``POST /generate`` goes to the raw-ASGI hot path, every
other request to a FastAPI app (admin API, plugin routes, OpenAPI docs).
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .context import RequestContext
from .errors import HTTPError, PluginLoadError
from .plugins import PluginManager
from .proxy import GenerateHandler, method_not_allowed_error, parse_json, unknown_route_error
from .router import Router, UpstreamError, maybe_await
from .settings import OptionRegistry, Settings
from .tokenizers import load_tokenizer

log = logging.getLogger("slime_router")

# Worker endpoints the router forwards. One worker answers reads; these go to every worker.
FORWARD_TO_ONE = {"/get_model_info": "GET", "/model_info": "GET", "/get_server_info": "GET",
                  "/server_info": "GET", "/v1/models": "GET"}
BROADCAST = {"/flush_cache": "POST", "/abort_request": "POST", "/get_load": "GET",
             "/update_weights_from_disk": "POST", "/update_weight_version": "POST",
             "/pause_generation": "POST", "/continue_generation": "POST"}


def collect_options(plugins: PluginManager) -> OptionRegistry:
    """Every plugin's flags (through the ``add_options`` hook), attributed to the plugin."""
    registry = OptionRegistry()
    for impl in plugins.pm.hook.add_options.get_hookimpls():
        registry.owner = impl.plugin_name
        try:
            impl.function(options=registry)
        except Exception as e:
            raise PluginLoadError(f"Plugin {impl.plugin_name!r} failed to declare its options: "
                                  f"{type(e).__name__}: {e}") from e
    return registry


class SlimeRouterApp:
    """The ASGI application. ``router`` is the runtime; ``fastapi`` serves everything but /generate."""

    def __init__(self, router: Router, fastapi: FastAPI) -> None:
        self.router = router
        self.fastapi = fastapi
        self.generate = GenerateHandler(router)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/generate" and scope["method"] == "POST":
            await self.generate(scope, receive, send)
        else:
            await self.fastapi(scope, receive, send)


def _url_from(request: Request, body: bytes) -> Any:
    url = request.query_params.get("url")
    if url is None and body:
        data = parse_json(body)
        if not isinstance(data, dict):
            raise HTTPError(400, 'Body must be a JSON object like {"url": "http://127.0.0.1:30001"}')
        url = data.get("url")
    if url is None:
        raise HTTPError(400, "Missing worker url: use ?url=http://HOST:PORT or a JSON body {\"url\": ...}",
                        param="url")
    return url


def build_app(settings: Settings, plugins: PluginManager) -> SlimeRouterApp:
    """Create the router, let plugins register components and routes, check requirements."""
    settings.with_defaults(collect_options(plugins))
    router = Router(settings, plugins)
    hook = plugins.hook

    if settings.hf_checkpoint:
        router.registry.register("tokenizer", load_tokenizer(settings.hf_checkpoint), owner="core")
    for impl in reversed(hook.register_components.get_hookimpls()):  # pluggy's call order (tryfirst first)
        try:
            impl.function(**_kwargs(impl, registry=router.registry, router=router))
        except Exception as e:
            raise PluginLoadError(f"Plugin {impl.plugin_name!r} failed to register its components: "
                                  f"{type(e).__name__}: {e}") from e
    for impl in hook.required_components.get_hookimpls():
        for name in impl.function() or []:
            if not router.registry.has(name):
                hint = (" Pass --hf-checkpoint (a HuggingFace checkpoint directory, or builtin:qwen3)."
                        if name == "tokenizer" else "")
                raise PluginLoadError(
                    f"Plugin {impl.plugin_name!r} cannot start: Required component '{name}' not found. "
                    f"Available components: {router.registry.names()}.{hint}")

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await router.open()
        for url in settings.worker_urls:
            router.add_worker(url)
        await maybe_await(hook.startup(router=router))
        # Start-up objects (tokenizer, plugins, framework) live forever: keep them out of the cyclic
        # GC's generations so collections during serving only walk what requests allocate.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            await maybe_await(hook.shutdown(router=router))
            await router.close()

    api = FastAPI(title="slime-router", version=_version(), lifespan=lifespan,
                  description="Rollout gateway for RL post-training in front of SGLang workers.")
    app = SlimeRouterApp(router, api)
    api.state.router = router

    @api.exception_handler(HTTPError)
    async def _http_error(_: Request, e: HTTPError) -> Response:
        return Response(orjson.dumps(e.to_dict()), status_code=e.status, media_type="application/json")

    @api.exception_handler(StarletteHTTPException)
    async def _routing_error(request: Request, e: StarletteHTTPException) -> Response:
        """Starlette's own answers (unknown path 404, wrong method 405; fastapi.HTTPException from a plugin) in
        the project's error shape instead of ``{"detail": ...}``; headers (``Allow``) kept."""
        headers = dict(e.headers or {})
        if e.status_code == 404 and e.detail == "Not Found":  # routing found no route
            err = unknown_route_error(request.method, request.url.path)
        elif e.status_code == 405:
            err = method_not_allowed_error(request.method, request.url.path, headers.get("Allow"))
        else:
            err = HTTPError(e.status_code, e.detail if isinstance(e.detail, str) else orjson.dumps(e.detail).decode())
        if e.status_code in (204, 304) or e.status_code < 200:  # no body allowed
            return Response(status_code=e.status_code, headers=headers)
        return Response(orjson.dumps(err.to_dict()), status_code=e.status_code, headers=headers,
                        media_type="application/json")

    @api.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError) -> Response:
        errors = e.errors()
        first = errors[0] if errors else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = f"Invalid request: {param}: {first.get('msg')}" if param else f"Invalid request: {first.get('msg')}"
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": param,
                                       "code": None}}, status_code=400)

    @api.get("/health")
    async def health() -> dict:
        """The router's own health (not the workers')."""
        return {"status": "ok", "workers": len(router.pool), "available_workers": len(router.pool.available())}

    @api.post("/add_worker")
    async def add_worker(request: Request) -> dict:
        """Add a worker: ``?url=http://host:port`` or JSON ``{"url": ...}``. Idempotent."""
        worker, created = router.add_worker(_url_from(request, await request.body()))
        return {"status": "added" if created else "already_registered", "url": worker.url,
                "urls": router.pool.urls()}

    @api.post("/remove_worker")
    async def remove_worker(request: Request) -> dict:
        """Remove a worker (same two forms). In-flight requests on it finish. Unknown URL: 404."""
        worker = router.remove_worker(_url_from(request, await request.body()))
        return {"status": "removed", "url": worker.url, "in_flight": worker.inflight, "urls": router.pool.urls()}

    @api.get("/list_workers")
    async def list_workers() -> dict:
        return {"urls": router.pool.urls(), "workers": [w.to_dict() for w in router.pool]}

    @api.get("/plugins")
    async def list_plugins() -> list[dict]:
        return [{"name": i.name, "source": i.source, "hooks": list(i.hooks)} for i in plugins.infos.values()]

    def forward_one(path: str):
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

    def broadcast(path: str, method: str):
        async def handler(request: Request) -> Response:
            raw = await request.body()
            body = parse_json(raw) if raw else None
            if not len(router.pool):
                raise HTTPError(503, "No workers registered. Add one with POST /add_worker?url=http://HOST:PORT")
            results = await router.broadcast(method, path, body)
            ok = all(200 <= s < 300 for s, _ in results.values())
            status = 200 if ok else max(s for s, _ in results.values())
            return JSONResponse({"success": ok, "workers": {u: {"status": s, "response": r}
                                                           for u, (s, r) in results.items()}},
                                status_code=status)
        handler.__name__ = "broadcast" + path.replace("/", "_")
        handler.__doc__ = f"Sent to every worker: {method} {path}; answers per worker."
        return handler

    hook.register_routes(app=api, router=router)

    # Worker endpoints a plugin doesn't serve itself are forwarded.
    existing = {getattr(r, "path", None) for r in api.routes}
    for path in FORWARD_TO_ONE:
        if path not in existing:
            api.add_api_route(path, forward_one(path), methods=["GET"])
    for path, method in BROADCAST.items():
        if path not in existing:  # a plugin (balancing) may serve these more precisely
            api.add_api_route(path, broadcast(path, method), methods=[method])

    @api.post("/generate")
    async def generate_doc() -> None:  # pragma: no cover - served by the raw-ASGI handler
        """Proxied to a worker (SGLang's /generate). Served by the lean hot path; listed for the docs."""

    return app


def _kwargs(impl: Any, **available: Any) -> dict[str, Any]:
    return {name: available[name] for name in impl.argnames if name in available}


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("slime-router")
    except Exception:  # pragma: no cover
        return "0"
