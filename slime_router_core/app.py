"""Builds the ASGI app from settings and loaded plugins.

The outer app is a tiny dispatcher: ``POST /generate`` goes to the raw-ASGI hot path, every
other request to a FastAPI app (admin API, plugin routes, OpenAPI docs). Every route, the core's own
included, comes from a plugin's ``register_routes``: the core's are the built-in plugin ``core``
(``slime_router_core.admin``). What is left here is the wiring: components, error handlers, lifespan, and the
ASGI wrappers plugins add (``Router.asgi_wrappers``: a plugin that decides before the dispatch, e.g. replicas).
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

from . import speedups
from .access import AccessControl, deny
from .admin import REQUEST_ERROR, ErrorResponse
from .contracts import TOKENIZER
from .engines import split_engine
from .errors import HTTPError, PluginLoadError
from .plugins import PluginManager
from .proxy import GenerateHandler, method_not_allowed_error, unknown_route_error
from .router import RequestHooks, Router, maybe_await
from .scoped import PREFIX as SCOPED_PREFIX
from .scoped import unscope
from .settings import OptionRegistry, Settings
from .tokenizers import load_tokenizer
from .workers import WorkerAllowlist

log = logging.getLogger("slime_router")

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
        if scope["type"] == "http":
            path = scope["path"]
            if path == "/generate" and scope["method"] == "POST":
                await self.generate(scope, receive, send)
                return
            if path.startswith(SCOPED_PREFIX):
                scope = unscope(scope)
                if scope["path"] == "/generate" and scope["method"] == "POST":
                    await self.generate(scope, receive, send)
                    return
        await self.fastapi(scope, receive, send)


class GuardedSlimeRouterApp(SlimeRouterApp):
    """The app when an API key is configured: the key is checked on the scope before dispatch (``access.py``),
    so a refused request reaches neither the hot path nor FastAPI. Without a key ``SlimeRouterApp`` serves, and
    its dispatch is exactly what it was before access control existed."""

    def __init__(self, router: Router, fastapi: FastAPI, access: AccessControl) -> None:
        super().__init__(router, fastapi)
        self.access = access

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "http":
            if scope["path"].startswith(SCOPED_PREFIX):
                scope = unscope(scope)
            denied = self.access.check(scope)
            if denied is not None:
                await deny(send, denied)
                return
            if scope["path"] == "/generate" and scope["method"] == "POST":
                await self.generate(scope, receive, send)
                return
        elif kind == "websocket" and self.access.check(scope) is not None:  # no route uses one; closed unheard
            await send({"type": "websocket.close", "code": 1008})
            return
        await self.fastapi(scope, receive, send)


class WrappedSlimeRouterApp(SlimeRouterApp):
    """The app when a plugin wrapped it (``Router.asgi_wrappers``, e.g. the replicas plugin): every request goes
    to the outermost wrapper, which handles it or passes it on, down to ``inner`` (the app as built without
    wrappers, whose dispatch -- access control, ``/sessions/{sid}/`` rewriting, the /generate hot path -- is
    unchanged). ``router``, ``fastapi`` and ``access`` are the inner app's."""

    def __init__(self, inner: SlimeRouterApp, outer: Any) -> None:  # no super().__init__: the inner app's parts
        self.router = inner.router
        self.fastapi = inner.fastapi
        self.generate = inner.generate
        self.access: AccessControl | None = getattr(inner, "access", None)
        self.inner = inner
        self.outer = outer

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        await self.outer(scope, receive, send)


def wrap_app(app: SlimeRouterApp, router: Router) -> SlimeRouterApp:
    """``app`` inside the ASGI wrappers plugins added to ``router.asgi_wrappers`` (the first added outermost);
    ``app`` itself when there are none."""
    outer: Any = app
    for wrap in reversed(router.asgi_wrappers):
        outer = wrap(outer)
    return app if outer is app else WrappedSlimeRouterApp(app, outer)


def build_app(settings: Settings, plugins: PluginManager) -> SlimeRouterApp:
    """Create the router, let plugins register components and routes, check requirements."""
    settings.with_defaults(collect_options(plugins))
    if not speedups.COMPILED:
        log.warning("the C module slime_router_core._speedups was not built when slime-router was installed (no C "
                    "compiler?): replies are checked and split by the pure-Python references, slower. Reinstall with "
                    "gcc (or cc) and the Python headers present to build it.")
    access = AccessControl.from_settings(settings)  # a bad key: ValueError naming the flag (never the key)
    allowlist = WorkerAllowlist.parse(settings.worker_allowlist)  # a bad entry: ValueError naming it
    for url in settings.worker_urls:
        allowlist.check_startup(split_engine(url)[0])
    router = Router(settings, plugins)
    hook = plugins.hook

    infos = plugins.infos
    if settings.hf_checkpoint:
        router.registry.register(TOKENIZER, load_tokenizer(settings.hf_checkpoint), owner="core")
        if "core" in infos:
            infos["core"].provides = ["tokenizer"]
    for impl in reversed(hook.register_components.get_hookimpls()):  # pluggy's call order (tryfirst first)
        before = set(router.registry.names())
        router.registry.registering = impl.plugin_name
        try:
            impl.function(**_kwargs(impl, registry=router.registry, router=router))
        except Exception as e:
            raise PluginLoadError(f"Plugin {impl.plugin_name!r} failed to register its components: "
                                  f"{type(e).__name__}: {e}") from e
        finally:
            router.registry.registering = ""
        if impl.plugin_name in infos:
            infos[impl.plugin_name].provides = sorted(set(router.registry.names()) - before)
    for impl in hook.required_components.get_hookimpls():
        needed = list(impl.function() or [])
        if impl.plugin_name in infos:
            infos[impl.plugin_name].requires = needed
        for name in needed:
            if not router.registry.has(name):
                hint = (" Pass --hf-checkpoint (a HuggingFace checkpoint directory, or builtin:qwen3)."
                        if name == "tokenizer" else
                        f" No loaded plugin provides {name!r}: install or select the plugin that does, or block "
                        f"{impl.plugin_name!r} (--no-plugin {impl.plugin_name}).")
                raise PluginLoadError(
                    f"Plugin {impl.plugin_name!r} cannot start: Required component '{name}' not found. "
                    f"Available components: {router.registry.names()}.{hint}")
    # a plugin may have stood down while registering (nothing to do in this configuration, e.g. sessions without a
    # trajectory cache): the request path calls only the hooks of the plugins still registered
    router.hooks = RequestHooks(plugins)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await router.open()
        for url in settings.worker_urls:
            await router.add_worker_detected(url)
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
    app = SlimeRouterApp(router, api) if access is None else GuardedSlimeRouterApp(router, api, access)
    api.state.router = router

    @api.exception_handler(HTTPError)
    async def _http_error(_: Request, e: HTTPError) -> Response:
        return Response(orjson.dumps(e.to_dict()), status_code=e.status, headers=e.headers or None,
                        media_type="application/json")

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
        loc = first.get("loc", ())
        param = ".".join(str(p) for p in loc[1:]) or None
        if first.get("type") == "json_invalid":  # FastAPI's JSON parse: answered as the hot path answers it
            at = f" (at character {loc[1]})" if len(loc) > 1 else ""
            param, message = None, f"Malformed JSON body: {(first.get('ctx') or {}).get('error')}{at}"
        elif first.get("type") == REQUEST_ERROR:  # a project validator's message, as written
            message = first.get("msg", "")
        elif param:
            message = f"Invalid request: {param}: {first.get('msg')}"
        else:
            message = f"Invalid request: {first.get('msg')}"
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": param,
                                       "code": None}}, status_code=400)

    # Every route comes from a plugin: the core's own admin API first (the built-in plugin "core", tryfirst),
    # the worker endpoints no plugin serves last (its trylast implementation).
    hook.register_routes(app=api, router=router)
    _openapi_in_project_shape(api)
    return wrap_app(app, router)


def _openapi_in_project_shape(api: FastAPI) -> None:
    """/openapi.json as the router answers: a request FastAPI's validation refuses is a 400 in the project's error
    shape (the handler above), not FastAPI's 422 ``HTTPValidationError``."""
    build = api.openapi

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            schema = build()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            if "ErrorResponse" not in components:
                error_schema = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(error_schema.pop("$defs", {}))
                components["ErrorResponse"] = error_schema
            error_400 = {"description": "Invalid request",
                         "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    responses = operation.get("responses", {})
                    ref = responses.get("422", {}).get("content", {}).get("application/json", {}).get("schema", {})
                    if ref.get("$ref") == "#/components/schemas/HTTPValidationError":
                        del responses["422"]
                        responses.setdefault("400", error_400)
            text = orjson.dumps(schema.get("paths", {}))
            for name in ("HTTPValidationError", "ValidationError"):
                if f"#/components/schemas/{name}".encode() not in text:
                    components.pop(name, None)
            api.openapi_schema = schema
        return api.openapi_schema

    api.openapi = openapi  # type: ignore[method-assign]


def _kwargs(impl: Any, **available: Any) -> dict[str, Any]:
    return {name: available[name] for name in impl.argnames if name in available}


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("slime-router")
    except Exception:  # pragma: no cover
        return "0"
