"""The router runtime: worker pool, registry, upstream connections, and the request path.

route -> pre_request hooks (may rewrite the body that is sent) -> select worker -> upstream
      -> post_response hooks (record, reshape) -> client

Plugins use ``Router.generate`` / ``Router.generate_stream`` / ``Router.request`` / ``Router.broadcast``
to reach workers through the same selection, in-flight accounting, retries and hooks as ``/generate``.
There is one select-and-retry loop (``Router._send``); the core's forwarded worker endpoints
(``/get_model_info`` ...) use it through ``Router.request`` too.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import aiohttp
import orjson

from .admission import Admission
from .context import RequestContext
from .contracts import TOKENIZER, Engine
from .engines import SGLANG, Engines, EngineStream, refusal, split_engine
from .errors import HTTPError
from .plugins import PluginManager
from .registry import ComponentRegistry
from .settings import Settings
from .sglang import chunk_problem, reply_problem
from .sse import END, OPAQUE, EventSplitter, parse_event
from .upstream import StreamReply, UpstreamPool
from .workers import Worker, WorkerAllowlist, WorkerPool, normalize_worker_url

log = logging.getLogger("slime_router")

# Hooks on the request path: whether any plugin implements them is computed once.
REQUEST_HOOKS = ("pre_request", "select_worker", "worker_selected", "should_retry", "upstream_failed",
                 "stream_chunk", "post_response", "request_finished")

JSON_CT = "application/json"
CONNECTION_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError, OSError)


class BadChunk(ValueError):
    """A streamed chunk that ``sglang.chunk_problem`` refuses (``Router.check_chunk``): the message says why."""


class StreamIdleTimeout(TimeoutError):
    """A streaming worker sent nothing for ``--request-timeout`` seconds (``Router.stream_chunks``)."""


# What ends a stream after it began as the worker's failure (``Router.stream_failed``): a broken connection, a
# truncated stream, an idle timeout (a TimeoutError: an OSError), an unusable chunk.
STREAM_ERRORS = (*CONNECTION_ERRORS, BadChunk)


def error_message(data: bytes | Any) -> str:
    """The human message in an upstream error body (SGLang's several shapes), or the raw text."""
    try:
        obj = orjson.loads(data) if isinstance(data, (bytes, bytearray, str)) else data
    except orjson.JSONDecodeError:
        return data.decode(errors="replace")[:500] if isinstance(data, (bytes, bytearray)) else str(data)[:500]
    if isinstance(obj, dict):
        err = obj.get("error", obj.get("detail", obj.get("message")))
        if isinstance(err, dict):
            return str(err.get("message", err))
        if err is not None:
            return str(err)
    return str(obj)[:500]


class UpstreamError(HTTPError):
    """A worker's own error answer (status and body passed on to the client)."""

    def __init__(self, status: int, body: bytes, worker: Worker, content_type: str = JSON_CT) -> None:
        super().__init__(status, f"Worker {worker.url} answered {status}: {error_message(body)}",
                         type="upstream_error")
        self.body = body
        self.worker = worker
        self.content_type = content_type


async def maybe_await(results: list[Any]) -> None:
    for i, r in enumerate(results):
        if inspect.isawaitable(r):
            try:
                await r
            except BaseException:  # the hooks after it will not run: close their coroutines (no "never awaited")
                for rest in results[i + 1:]:
                    if inspect.iscoroutine(rest):
                        rest.close()
                raise


def _fast_caller(hook: Any, firstresult: bool) -> Any:
    """Call a hook's implementations directly, in pluggy's order, with pluggy's result semantics.

    pluggy re-validates arguments and builds call frames on every call; on the request path that
    is measurable, so plain implementations are called directly. Wrappers keep pluggy's caller.
    """
    impls = hook.get_hookimpls()
    if not impls:
        return None
    if any(getattr(i, "hookwrapper", False) or getattr(i, "wrapper", False) for i in impls):
        return hook
    calls = [(impl.function, tuple(impl.argnames)) for impl in reversed(impls)]

    if firstresult:
        def call_first(**kwargs: Any) -> Any:
            for func, names in calls:
                result = func(*[kwargs[n] for n in names])
                if result is not None:
                    return result
            return None
        return call_first

    def call_all(**kwargs: Any) -> list[Any]:
        results = []
        for func, names in calls:
            result = func(*[kwargs[n] for n in names])
            if result is not None:
                results.append(result)
        return results
    return call_all


# The request-path hooks as ``RequestHooks`` holds them: called with the hookspec's arguments as keywords. A
# plain hook answers the list of its implementations' non-None results, a ``firstresult`` hook the first one.
class _PreRequest(Protocol):
    def __call__(self, *, ctx: RequestContext) -> list[Awaitable[None]]: ...


class _SelectWorker(Protocol):
    def __call__(self, *, ctx: RequestContext, workers: list[Worker]) -> Worker | None: ...


class _WorkerSelected(Protocol):
    def __call__(self, *, ctx: RequestContext, worker: Worker) -> list[Any]: ...


class _ShouldRetry(Protocol):
    def __call__(self, *, ctx: RequestContext, worker: Worker, status: int | None, error: BaseException | None,
                 attempt: int) -> bool | float | None: ...


class _UpstreamFailed(Protocol):
    def __call__(self, *, ctx: RequestContext, worker: Worker, status: int | None,
                 error: BaseException | None) -> list[Any]: ...


class _StreamChunk(Protocol):
    def __call__(self, *, ctx: RequestContext, chunk: dict[str, Any]) -> list[Awaitable[None]]: ...


class _PostResponse(Protocol):
    def __call__(self, *, ctx: RequestContext, response: Any) -> list[Awaitable[None]]: ...


class _RequestFinished(Protocol):
    def __call__(self, *, ctx: RequestContext) -> list[Any]: ...


class RequestHooks:
    """The request-path hooks as plain callables; ``None`` where no plugin implements one (free)."""

    __slots__ = REQUEST_HOOKS
    # set in __init__ by name (one per entry of REQUEST_HOOKS)
    pre_request: _PreRequest | None
    select_worker: _SelectWorker | None
    worker_selected: _WorkerSelected | None
    should_retry: _ShouldRetry | None
    upstream_failed: _UpstreamFailed | None
    stream_chunk: _StreamChunk | None
    post_response: _PostResponse | None
    request_finished: _RequestFinished | None

    def __init__(self, plugins: PluginManager) -> None:
        for name in REQUEST_HOOKS:
            hook = getattr(plugins.hook, name)
            setattr(self, name, _fast_caller(hook, bool(hook.spec and hook.spec.opts.get("firstresult"))))


class Router:
    def __init__(self, settings: Settings, plugins: PluginManager) -> None:
        self.settings = settings
        self.plugins = plugins
        self.hook = plugins.hook
        self.registry = ComponentRegistry()
        self.pool = WorkerPool()
        self.session: aiohttp.ClientSession | None = None  # control plane: health checks, broadcasts
        self.upstream: UpstreamPool | None = None  # the generation path
        self.on_close: list[Any] = []  # sync callables run at shutdown (e.g. stop the demo's workers)
        self.hooks = RequestHooks(plugins)
        self.started_at = time.time()
        # --max-concurrent-requests: every generation (/generate, generate, generate_stream) holds a slot
        self.admission = Admission(settings.max_concurrent_requests, settings.max_queued_requests,
                                   settings.queue_timeout)
        self.engines = Engines()  # engines other than SGLang, registered by plugins (engines.py)
        self.foreign_workers = 0  # workers whose engine is not SGLang: 0 keeps the SGLang path untouched
        # ASGI wrappers a plugin adds while the app is built (from register_components or register_routes): each
        # ``wrap(app) -> asgi_app`` sees every request before the app's own dispatch (``app.build_app`` applies
        # them; none added: the app is served exactly as without them, at no cost per request)
        self.asgi_wrappers: list[Callable[[Any], Any]] = []

    # --- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        if self.upstream is None:
            self.upstream = UpstreamPool(connect_timeout=self.settings.connect_timeout)
        if self.session is None:
            # The control plane's long-lived pool (health checks, broadcasts, plugin calls). No total
            # timeout (--request-timeout bounds generations only): weight updates take as long as they take;
            # dead workers fail on connect.
            connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=60)
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.settings.connect_timeout)
            self.session = aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False,
                                                 skip_auto_headers=("User-Agent",),
                                                 json_serialize=lambda o: orjson.dumps(o).decode())

    async def close(self) -> None:
        for callback in self.on_close:
            callback()
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None
        if self.session is not None:
            await self.session.close()
            self.session = None

    # --- worker pool -------------------------------------------------------------------------

    def add_worker(self, url: str, engine: Engine | None = None) -> tuple[Worker, bool]:
        """Add a worker (idempotent) of ``engine`` (None: SGLang; see ``add_worker_detected`` for the engine read
        from the worker). With ``--worker-allowlist``, a URL outside it is refused (HTTPError 403) and the pool is
        left unchanged: every request the router makes goes to a pool worker."""
        if self.settings.worker_allowlist:
            url = normalize_worker_url(url)  # what the pool would store, and connect to, is what is checked
            WorkerAllowlist.parse(self.settings.worker_allowlist).check(url)
        worker, created = self.pool.add(url)
        if created:
            worker.engine = engine
            if engine is not None:
                self.foreign_workers += 1
            log.info("worker added: %s (%s)", worker.url, engine.name if engine is not None else SGLANG)
            self.hook.worker_added(worker=worker, router=self)
        return worker, created

    async def add_worker_detected(self, url: str, engine: str | None = None) -> tuple[Worker, bool]:
        """``add_worker`` with the worker's engine: ``engine`` by name, else read from the worker
        (``Engines.detect``; SGLang when no engine plugin is loaded, without asking the worker). A non-SGLang
        worker is ``attach``ed (e.g. its weight version read) before it joins the pool."""
        url, named = split_engine(url)
        engine = engine or named
        known = self.pool.get(url)
        if known is not None:
            return known, False
        if self.settings.worker_allowlist:  # refused before the router sends it anything, even a probe
            WorkerAllowlist.parse(self.settings.worker_allowlist).check(normalize_worker_url(url))
        if engine is not None:
            adapter = self.engines.named(engine)
        else:
            assert self.session is not None, "router not started"
            adapter = await self.engines.detect(normalize_worker_url(url), self.session)
        if adapter is not None:
            probe = Worker(normalize_worker_url(url))
            try:
                await adapter.attach(probe, self)
            except HTTPError:
                raise
            except Exception as e:
                raise HTTPError(502, f"Worker {probe.url} ({adapter.name}) could not be attached: "
                                     f"{type(e).__name__}: {e}", param="url") from e
            worker, created = self.add_worker(url, adapter)
            if created:
                worker.state.update(probe.state)
            return worker, created
        return self.add_worker(url)

    def remove_worker(self, url: str) -> Worker:
        worker = self.pool.remove(url)
        if worker.engine is not None:
            self.foreign_workers -= 1
        log.info("worker removed: %s (in flight: %d)", worker.url, worker.inflight)
        self.hook.worker_removed(worker=worker, router=self)
        return worker

    # --- hooks ---------------------------------------------------------------------------------

    async def run_pre_request(self, ctx: RequestContext) -> None:
        ctx.router = self
        if self.hooks.pre_request:
            t = time.perf_counter()
            await maybe_await(self.hooks.pre_request(ctx=ctx))
            ctx.timings["pre_request"] = time.perf_counter() - t

    async def run_post_response(self, ctx: RequestContext, response: Any) -> Any:
        """Run post_response hooks; returns the (possibly replaced) response."""
        ctx.response = response
        if self.hooks.post_response:
            t = time.perf_counter()
            await maybe_await(self.hooks.post_response(ctx=ctx, response=response))
            ctx.timings["post_response"] = time.perf_counter() - t
        return ctx.response

    def finish(self, ctx: RequestContext, status: int, error: str | None = None) -> None:
        """Close the books on a request: exactly once per request."""
        ctx.router = self
        ctx.status = status
        if error is not None:
            ctx.error = error
        ctx.timings["total"] = time.perf_counter() - ctx.started
        if self.hooks.request_finished:
            try:
                self.hooks.request_finished(ctx=ctx)
            except Exception:  # a metrics bug must not turn a served request into an error
                log.exception("request_finished hook failed")
        if self.settings.verbose:
            log.info("%s status=%s worker=%s attempts=%d timings=%s", ctx.route, status,
                     ctx.worker.url if ctx.worker else None, ctx.attempts,
                     {k: round(v * 1000, 3) for k, v in ctx.timings.items()})

    # --- selection and retries -----------------------------------------------------------------

    def select(self, ctx: RequestContext, generation: bool = False) -> Worker:
        """Pick a worker not yet tried by this request and count it in flight (no await inside). A generation
        in a mixed fleet only goes to workers whose engine can serve its body (``Engine.unsupported``)."""
        candidates = [w for w in self.pool.available() if w not in ctx.tried]
        if generation and self.foreign_workers and candidates and isinstance(ctx.body, dict):
            able = [w for w in candidates if w.engine is None or w.engine.unsupported(ctx.body) is None]
            if not able:
                why = refusal([(w, w.engine) for w in candidates], ctx.body)
                raise HTTPError(400, f"No available worker can serve this request: {why}. Send it where an SGLang "
                                     f"worker is available, or drop the feature.", type="invalid_request_error")
            candidates = able
        if not candidates:
            if len(self.pool) == 0:
                raise HTTPError(503, "No workers registered. Add one with POST /add_worker?url=http://HOST:PORT "
                                     "or start the router with --worker-url.")
            raise HTTPError(503, f"No available worker: all {len(self.pool)} registered workers are unhealthy, "
                                 f"removed or already failed this request ({[w.url for w in ctx.tried]}).")
        worker = None
        if self.hooks.select_worker:
            worker = self.hooks.select_worker(ctx=ctx, workers=candidates)
        if worker is None:
            worker = self.pool.round_robin(candidates)
        worker.acquire()
        ctx.worker = worker
        ctx.tried.append(worker)
        ctx.attempts += 1
        if self.hooks.worker_selected:
            self.hooks.worker_selected(ctx=ctx, worker=worker)
        return worker

    async def _retry_or_raise(self, ctx: RequestContext, worker: Worker, status: int | None,
                              error: BaseException | None, final: HTTPError) -> None:
        """After a failed attempt: return to retry (maybe after a delay), or raise ``final``."""
        worker.failures += 1
        if self.hooks.upstream_failed:
            self.hooks.upstream_failed(ctx=ctx, worker=worker, status=status, error=error)
        decision: bool | float | None = False
        if ctx.attempts < self.settings.max_attempts and not ctx.sent_to_client:
            decision = None
            if self.hooks.should_retry:
                decision = self.hooks.should_retry(ctx=ctx, worker=worker, status=status, error=error,
                                                  attempt=ctx.attempts)
            if decision is None:
                decision = error is not None  # core default: only unreachable workers are retried
        if decision is False or decision is None:
            raise final
        if not any(w.available and w not in ctx.tried for w in self.pool):
            raise final
        log.warning("attempt %d on %s failed (%s); retrying on another worker", ctx.attempts, worker.url,
                    status if status is not None else f"{type(error).__name__}: {error}")
        if decision is not True and float(decision) > 0:
            await asyncio.sleep(float(decision))

    @staticmethod
    def _unreachable(worker: Worker, e: BaseException) -> HTTPError:
        return HTTPError(502, f"Worker {worker.url} unreachable: {type(e).__name__}: {e}", type="upstream_error")

    async def _send(self, ctx: RequestContext, payload: bytes | None, stream: bool,
                    method: str | None = None) -> tuple[int, bytes, StreamReply | None, Worker, str]:
        """The one select-and-retry loop: send to selected workers until one answers below 400.

        Every way of reaching *one* worker goes through here (``/generate``, plugins' ``generate``,
        the forwarded control-plane endpoints): ``select_worker`` hooks and in-flight accounting,
        ``upstream_failed`` on each failed attempt, ``should_retry`` and ``--max-attempts``.
        ``method`` None: a generation, POSTed by the lean upstream client. ``method`` given: a
        control-plane request (any method, through the aiohttp session).

        Returns (status, body, stream reply, worker, content type). Non-streaming: the whole body,
        the worker already released. Streaming: the open reply with the worker still counted in
        flight (end both with ``release_stream``). A non-2xx answer that is not retried is raised
        as ``UpstreamError``.
        """
        assert self.upstream is not None, "router not started"
        content_type = JSON_CT
        timeout = self.settings.request_timeout
        while True:
            worker = self.select(ctx, generation=method is None)
            t = time.perf_counter()
            reply: StreamReply | None = None
            engine = worker.engine
            path, body = ctx.upstream_path, payload
            try:
                if engine is not None:  # not SGLang: the engine's own call (contracts.Engine)
                    if method is None:
                        call = engine.call(worker, ctx.body, stream)
                        path, body = call.path, call.payload
                    else:
                        op_body = orjson.loads(payload) if payload else None
                        op = engine.operation(worker, method, path, op_body)
                        if op is None:
                            raise HTTPError(501, f"{ctx.upstream_path} has no equivalent on {engine.name} worker "
                                                 f"{worker.url}.", type="upstream_error")
                        method, path, sent = op
                        body = orjson.dumps(sent) if sent is not None else None
                if method is not None:
                    status, data, content_type = await self._control(method, worker.url + path, body)
                    if engine is not None and status < 400:
                        status, answer = engine.operation_done(worker, ctx.upstream_path, op_body, status,
                                                               orjson.loads(data) if data else None)
                        data = orjson.dumps(answer)
                elif stream:
                    opening = self.upstream.stream(worker.url, path, body)  # type: ignore[arg-type]
                    reply = await (asyncio.wait_for(opening, timeout) if timeout else opening)
                    status = reply.status
                    if status < 400:
                        ctx.timings["upstream_headers"] = time.perf_counter() - t
                        if engine is not None:
                            reply = EngineStream(reply, engine.stream(worker, call, reply.iter_chunks()))  # type: ignore[assignment]
                        return status, b"", reply, worker, content_type
                    data = await reply.read()
                else:
                    posting = self.upstream.post(worker.url, path, body)  # type: ignore[arg-type]
                    status, data = await (asyncio.wait_for(posting, timeout) if timeout else posting)
                    if engine is not None and status < 400:
                        data = self._engine_reply(ctx, worker, engine, call, data)
            except asyncio.TimeoutError as e:
                if method is not None:  # the control plane's own (aiohttp) timeouts: as unreachable
                    worker.release()
                    await self._retry_or_raise(ctx, worker, None, e, self._unreachable(worker, e))
                    continue
                # a generation that outlived --request-timeout: its connection is closed (the worker aborts it);
                # not retried (a second worker would be given the same long generation)
                worker.release()
                self.worker_failed(ctx, worker, e)
                raise HTTPError(504, f"Worker {worker.url} did not answer within {timeout:g} s (--request-timeout); "
                                     f"the generation was aborted on the worker.", type="upstream_error",
                                code="upstream_timeout") from None
            except CONNECTION_ERRORS as e:
                worker.release()
                await self._retry_or_raise(ctx, worker, None, e, self._unreachable(worker, e))
                continue
            except BaseException:
                if reply is not None:
                    reply.release()
                worker.release()
                raise
            worker.release()
            ctx.timings["upstream"] = time.perf_counter() - t
            if status < 400:
                return status, data, None, worker, content_type
            err = UpstreamError(status, data, worker, content_type)
            if status >= 500:
                await self._retry_or_raise(ctx, worker, status, None, err)
                continue
            raise err

    def _engine_reply(self, ctx: RequestContext, worker: Worker, engine: Engine, call: Any, data: bytes) -> bytes:
        """A non-SGLang worker's 200 answer in SGLang's shape; one the engine cannot read is the worker's failure
        (502), like an unusable SGLang reply."""
        try:
            return engine.reply(worker, call, data)
        except HTTPError:
            raise
        except (ValueError, KeyError, TypeError, IndexError, orjson.JSONDecodeError) as e:
            problem = f"{type(e).__name__}: {e}"
        self.worker_failed(ctx, worker, ValueError(problem))
        raise HTTPError(502, f"Worker {worker.url} ({engine.name}) answered with an unusable reply: {problem}. "
                             f"Nothing was recorded.", type="upstream_error", code="bad_worker_reply")

    async def _control(self, method: str, url: str, payload: bytes | None) -> tuple[int, bytes, str]:
        """One control-plane request on the aiohttp session: (status, body, content type).

        aiohttp, not the generation client: that one only POSTs JSON bodies (the hot path's needs).
        """
        assert self.session is not None, "router not started"
        headers = {"Content-Type": JSON_CT} if payload is not None else None
        try:
            async with self.session.request(method, url, data=payload, headers=headers) as resp:
                return resp.status, await resp.read(), resp.headers.get("Content-Type", JSON_CT)
        except CONNECTION_ERRORS:
            raise
        except aiohttp.ClientError as e:  # e.g. a malformed reply: the worker is as good as unreachable
            raise ConnectionError(f"{type(e).__name__}: {e}") from e

    async def send_json(self, ctx: RequestContext, payload: bytes) -> tuple[int, bytes, Worker]:
        """Non-streaming POST with retries; returns (status, body, worker)."""
        status, data, _, worker, _ = await self._send(ctx, payload, False)
        return status, data, worker

    async def open_stream(self, ctx: RequestContext, payload: bytes) -> tuple[StreamReply, Worker]:
        """Streaming POST with retries until the headers arrive. The caller must ``release_stream``."""
        _, _, reply, worker, _ = await self._send(ctx, payload, True)
        assert reply is not None
        return reply, worker

    async def request(self, ctx: RequestContext, method: str = "GET", path: str | None = None,
                      payload: bytes | None = None) -> tuple[int, bytes, str, Worker]:
        """Any request to one worker (``path``, default ``ctx.upstream_path``) with the same selection,
        hooks and retries as a generation; returns (status, body, content type, worker).

        Answers >= 400 that are not retried are raised as ``UpstreamError`` (carrying the worker's
        body and content type). The caller closes the books with ``finish``.
        """
        if path is not None:
            ctx.upstream_path = path
        status, data, _, worker, content_type = await self._send(ctx, payload, False, method)
        return status, data, content_type, worker

    @functools.cached_property
    def vocab_size(self) -> int | None:
        """The tokenizer's vocabulary size (with added tokens) when one is registered: token ids are checked
        against it (read on first use, after start-up registered the components)."""
        tok = self.registry.find(TOKENIZER)
        return len(tok) if tok is not None else None

    def read_reply(self, ctx: RequestContext, worker: Worker, data: bytes) -> Any:
        """A worker's 200 /generate reply, parsed and checked (``sglang.reply_problem``): an unusable one --
        not JSON, an error, ids that disagree with their logprobs or lie outside the vocabulary -- counts as the
        worker's failure and is answered 502, before any plugin (the trajectory cache) sees it."""
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError as e:
            problem: str | None = f"the reply is not valid JSON ({e})"
        else:
            problem = reply_problem(obj, self.vocab_size)
            if problem is None:
                return obj
        self.worker_failed(ctx, worker, ValueError(problem))
        raise HTTPError(502, f"Worker {worker.url} answered with an unusable reply: {problem}. Nothing was "
                             f"recorded.", type="upstream_error", code="bad_worker_reply")

    def check_chunk(self, obj: Any) -> None:
        """A parsed stream chunk, checked like a reply (``sglang.chunk_problem``) before any ``stream_chunk`` hook
        (the trajectory cache) sees it; raises ``BadChunk`` (the relay then ends the stream: ``stream_failed``)."""
        problem = chunk_problem(obj, self.vocab_size)
        if problem is not None:
            raise BadChunk(problem)

    def stream_chunks(self, reply: StreamReply) -> AsyncIterator[bytes]:
        """A stream's body as it arrives (``reply.iter_chunks()``). With ``--request-timeout``, a worker that sends
        nothing for that long -- before its first chunk or between two -- ends it with ``StreamIdleTimeout``;
        the caller's ``release_stream`` then closes the connection (the worker aborts the generation). Only the
        wait for the worker counts, not the time the caller spends with a chunk (a slow client, a hook)."""
        timeout = self.settings.request_timeout
        return _idle_bounded(reply, timeout) if timeout else reply.iter_chunks()

    def stream_failed(self, ctx: RequestContext, worker: Worker, error: BaseException) -> dict[str, Any]:
        """A stream that went wrong after it began (one of ``STREAM_ERRORS``): counted as the worker's failure
        (``worker_failed``), the reason kept in ``ctx.error``; returns the error event that ends the client's
        stream (followed by ``data: [DONE]``). The caller passes nothing more on and records nothing."""
        self.worker_failed(ctx, worker, error)
        if isinstance(error, BadChunk):
            ctx.error = (f"Worker {worker.url} sent an unusable chunk mid-stream: {error}. The stream was cut there; "
                         f"the chunk was neither passed on nor recorded.")
        else:
            ctx.error = f"Worker {worker.url} failed mid-stream: {type(error).__name__}: {error}"
        return {"error": {"message": ctx.error, "type": "upstream_error"}}

    def worker_failed(self, ctx: RequestContext, worker: Worker, error: BaseException) -> None:
        """A worker failed after it answered (a broken or truncated stream, an unusable reply, a timeout): not
        retried, but it counts as a failure (``upstream_failed`` hooks: the circuit breaker, metrics)."""
        worker.failures += 1
        if self.hooks.upstream_failed:
            self.hooks.upstream_failed(ctx=ctx, worker=worker, status=None, error=error)

    @staticmethod
    def release_stream(reply: StreamReply, worker: Worker) -> None:
        reply.release()  # unfinished: the connection is dropped and the worker aborts the request
        worker.release()

    # --- the API plugins use -------------------------------------------------------------------

    async def generate(self, ctx: RequestContext) -> Any:
        """Send ``ctx.body`` (non-streaming) through hooks, selection and retries; returns the reply.

        Holds a ``--max-concurrent-requests`` slot throughout; refused, it raises ``HTTPError(429)`` (with
        ``Retry-After`` in its ``headers``).
        """
        admission = self.admission
        if not admission.try_acquire():
            await admission.wait()
        try:
            await self.run_pre_request(ctx)
            _, data, worker = await self.send_json(ctx, orjson.dumps(ctx.body))
            ctx.raw_response = data
            return await self.run_post_response(ctx, self.read_reply(ctx, worker, data))
        finally:
            admission.release()

    async def generate_stream(self, ctx: RequestContext) -> AsyncIterator[dict[str, Any]]:
        """Stream ``ctx.body`` upstream; yields each parsed SSE object (after ``stream_chunk``).

        ``ctx.inspect_stream`` is forced on so that hooks and the caller see every chunk. A worker
        error after the stream began (a broken or truncated stream, an unusable chunk, no data for
        ``--request-timeout`` seconds) is yielded as ``{"error": {...}}``, last. Closing the generator early
        (client gone) closes the upstream connection, which aborts the request in the worker.

        Holds a ``--max-concurrent-requests`` slot from the first ``__anext__`` until the generator ends or is
        closed; refused, the first ``__anext__`` raises ``HTTPError(429)`` (``Retry-After`` in its ``headers``).
        """
        admission = self.admission
        if not admission.try_acquire():
            await admission.wait()
        try:
            await self.run_pre_request(ctx)
            ctx.inspect_stream = True
            resp, worker = await self.open_stream(ctx, orjson.dumps(ctx.body))
            completed = False
            chunks: list[dict[str, Any]] = []
            try:
                async for obj in iter_sse(self.stream_chunks(resp)):
                    if obj is None:
                        completed = True
                        break
                    self.check_chunk(obj)
                    if self.hooks.stream_chunk:
                        pending = self.hooks.stream_chunk(ctx=ctx, chunk=obj)
                        if pending:
                            await maybe_await(pending)
                    chunks.append(obj)
                    if not ctx.sent_to_client:
                        ctx.timings["first_chunk"] = time.perf_counter() - ctx.started
                    ctx.sent_to_client = True
                    yield obj
                if not completed:  # the worker closed the stream without its [DONE]
                    raise ConnectionError("the stream ended without its final data: [DONE] event")
            except STREAM_ERRORS as e:
                yield self.stream_failed(ctx, worker, e)
            finally:
                self.release_stream(resp, worker)
            if completed:
                await self.run_post_response(ctx, chunks)
        finally:
            admission.release()

    async def broadcast(self, method: str, path: str, body: Any = None,
                        urls: list[str] | None = None) -> dict[str, tuple[int, Any]]:
        """Send one request to every worker (or ``urls``) concurrently: {url: (status, parsed body)}.

        Unreachable workers are reported with status 502 and a message, not raised. A worker of another engine
        gets the engine's equivalent (``Engine.operation``; 501 where there is none) and its answer as SGLang's.
        """
        assert self.session is not None, "router not started"
        session = self.session
        targets = urls if urls is not None else self.pool.urls()

        async def one(url: str) -> tuple[str, tuple[int, Any]]:
            worker = self.pool.get(url) if self.foreign_workers else None
            engine = worker.engine if worker is not None else None
            m, p, b = method, path, body
            if engine is not None:
                assert worker is not None
                op = engine.operation(worker, method, path, body)
                if op is None:
                    return url, (501, {"error": {"message": f"{path} has no equivalent on {engine.name} worker "
                                                            f"{url}."}})
                m, p, b = op
            try:
                async with session.request(m, url + p, json=b) as resp:
                    data = await resp.read()
                    try:
                        parsed: Any = orjson.loads(data) if data else None
                    except orjson.JSONDecodeError:
                        parsed = data.decode(errors="replace")
                    if engine is not None and resp.status < 400:
                        assert worker is not None
                        return url, engine.operation_done(worker, path, body, resp.status, parsed)
                    return url, (resp.status, parsed)
            except CONNECTION_ERRORS as e:
                return url, (502, {"error": {"message": f"Worker {url} unreachable: {type(e).__name__}: {e}"}})

        return dict(await asyncio.gather(*(one(u) for u in targets)))


async def iter_sse(chunks: AsyncIterator[bytes]) -> AsyncIterator[dict[str, Any] | None]:
    """Parse an SGLang SSE stream (``Router.stream_chunks``): yields each ``data:`` JSON object, ``None`` for
    ``[DONE]``."""
    splitter = EventSplitter()
    async for data in chunks:
        for event in splitter.feed(data):
            value = parse_event(event)
            if value is OPAQUE:
                if event.startswith(b"data:"):  # comments and keep-alives are skipped silently
                    log.warning("unparseable SSE data from worker: %r", event[:200])
                continue
            if value is END:
                yield None
                return
            yield value


class _IdleWatch:
    """One stream's idle timer: one loop timer, re-armed only when it fires (a chunk costs a clock read).

    ``task`` is set while the stream waits for the worker, ``None`` while the caller holds a chunk. Expired, it
    cancels the waiting task; ``_idle_bounded`` turns that cancellation into ``StreamIdleTimeout``.
    """

    __slots__ = ("loop", "timeout", "since", "task", "expired", "timer")

    def __init__(self, timeout: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.timeout = timeout
        self.since = self.loop.time()
        self.task: asyncio.Task[Any] | None = None
        self.expired = False
        self.timer = self.loop.call_at(self.since + timeout, self._check)

    def _check(self) -> None:
        now = self.loop.time()
        due = self.since + self.timeout
        if self.task is None or now + 0.001 < due:  # busy with a chunk, or data came since: not yet
            self.timer = self.loop.call_at(now + self.timeout if self.task is None else due, self._check)
            return
        self.expired = True
        self.task.cancel()


async def _idle_bounded(reply: StreamReply, timeout: float) -> AsyncIterator[bytes]:
    """``reply.iter_chunks()``, ended by ``StreamIdleTimeout`` after ``timeout`` seconds without data."""
    watch = _IdleWatch(timeout)
    chunks = reply.iter_chunks()
    try:
        while True:
            watch.since, watch.task = watch.loop.time(), asyncio.current_task()
            try:
                data = await chunks.__anext__()
            except StopAsyncIteration:
                return
            except asyncio.CancelledError:
                uncancel = getattr(watch.task, "uncancel", None)  # Python >= 3.11
                if not watch.expired or (uncancel is not None and uncancel() > 0):
                    raise  # not (only) ours: the client left, the server shuts down
                raise StreamIdleTimeout(f"no data for {timeout:g} s (--request-timeout bounds the wait for each "
                                        f"chunk of a stream); the generation was aborted on the worker") from None
            watch.task = None
            yield data
    finally:
        watch.timer.cancel()
