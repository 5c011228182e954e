"""sessions plugin: trajectories keyed by a session id, retrieved whole by the trainer.

A request belongs to session ``sid`` when it carries ``X-Session-ID: sid`` or is sent under the session's base URL
``/sessions/{sid}/...`` (e.g. ``/sessions/{sid}/v1/chat/completions``, ``/sessions/{sid}/generate``: the core
rewrites the path and sets the header, ``slime_router_core.scoped``). Requests without one behave as before.

Hooks (routes ``/generate``, ``/v1/chat/completions``, ``/v1/completions``):
- pre_request (tryfirst: before any other plugin works on the request): refuses a bad id (400), a finished (409)
  or expired (404) session, opens the session; ``X-Session-Metadata`` (a JSON object) is merged into its metadata.
- stream_chunk (tryfirst: before logprobs the client did not ask for are stripped): keeps each chunk.
- post_response (tryfirst, same reason): folds each finished sequence into the session (``store.py``), with the
  prompt ids of the body that was sent (the trajectory cache replaced a text prompt with them); what cannot be
  stored exactly (an aborted generation, a prompt that was not tokenized by the router) is listed in the session's
  ``gaps``; request_finished lists a request that ended without a complete reply (failed, client gone).

With ``--session-store-url`` (``write_behind.py``) each request's additions are queued and written behind to
Valkey/Redis, and a session this replica does not hold is read from there before it is used (``/generate``: in
pre_request, before the trajectory cache prepares the prompt; the OpenAI routes: an ASGI middleware, as they
prepare their prompt before the request hooks run; the routes below: before they answer).

Routes: ``POST /sessions`` (open, with metadata), ``GET /sessions`` (summaries and counters), ``GET``/``PATCH``/
``DELETE /sessions/{sid}`` (trajectories / merge metadata / finish: hand over and free), ``POST /retrieve_batch``
(many sessions, texts or message lists at once, as JSON lines).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import sys
import uuid
from array import array
from collections.abc import AsyncIterator, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import orjson
from fastapi import Body
from fastapi import Response as FastAPIResponse
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from slime_router_core import HTTPError, hookimpl
from slime_router_core.context import StashKey
from slime_router_core.contracts import (
    OPENAI_COMPAT,
    SESSIONS,
    TRAJECTORY_CACHE,
    CacheUnavailable,
    ChainTransfer,
    HistoryTransfer,
    RecordedChain,
)
from slime_router_core.settings import PluginConfig, at_least, option
from slime_router_core.sglang import merge_stream, output_ids_and_logprobs, weight_version_spans
from slime_router_core.speedups import typed_array

from . import columnar
from .store import Session, SessionGone, SessionStore
from .write_behind import WriteBehind, history_unavailable_gap

if TYPE_CHECKING:  # pragma: no cover
    from fastapi import FastAPI

    from slime_router_core.context import RequestContext
    from slime_router_core.registry import ComponentRegistry
    from slime_router_core.router import Router
    from slime_router_core.settings import OptionRegistry

log = logging.getLogger("slime_router.sessions")

SESSION_HEADER = "x-session-id"
METADATA_HEADER = "x-session-metadata"
ROUTES = frozenset({"/generate", "/v1/chat/completions", "/v1/completions"})
NOT_FOUND = "No session {sid!r}: none was opened (POST /sessions) and no request carried it."
SESSION_ID = re.compile(r"[A-Za-z0-9._:@=+-]{1,128}")
FINISHED = ("stop", "length")


@dataclass(frozen=True)
class SessionsConfig(PluginConfig):
    flag_prefix = "--session-"
    ttl: float = option(3600.0, check=at_least(0),
                        help="Seconds after its last request an abandoned session is dropped (its memory freed; "
                             "later requests for it get 404). 0: never.")
    max: int = option(100_000, check=at_least(0),
                      help="Open sessions at most (a new one beyond it gets 429). 0: no limit.")
    store_url: str | None = option(
        None, check=lambda v: None if v is None or v.startswith(("redis://", "rediss://", "unix://")) else
        "must be a redis://HOST:PORT/DB (or rediss://, unix://) URL",
        help="Write each session's turns behind to this Valkey/Redis server (redis://HOST:PORT/DB), off the request "
             "path, so that another router replica continues a session this one served exactly (its turns, "
             "trajectory-cache records and chat history). Needs the 'redis' extra of slime-router; not with "
             "--radix-tree-process. Off by default.")
    store_timeout: float = option(2.0, check=at_least(0.01),
                                  help="Seconds to wait for the session store when reading a session this replica "
                                       "does not hold (then it goes on as a new session, flagged).")


@dataclass
class _Turn:
    session: Session
    request_id: str
    chunks: list[dict] = field(default_factory=list)
    folded: bool = False  # its replies went into the session (post_response)
    chains: list[Callable[[], RecordedChain]] = field(default_factory=list)  # cache records made (write-behind)
    closed: bool = False


_TURN: StashKey[_Turn] = StashKey("sessions.turn")
# The request's turn, for the trajectory cache's record listener and the chat-history listener (write-behind
# only): they are called on the request's task (or a thread it started), which has no ctx to hand.
_CURRENT: ContextVar[_Turn | None] = ContextVar("slime_router_sessions_turn", default=None)


def check_session_id(sid: str) -> str:
    if not SESSION_ID.fullmatch(sid):
        raise HTTPError(400, f"Session id {sid[:200]!r} is not valid: use 1-128 characters of letters, digits and "
                             f". _ : @ = + - (e.g. a UUID).", param="X-Session-ID")
    return sid


def _metadata(raw: str | None) -> dict[str, Any] | None:
    if not raw:
        return None
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise HTTPError(400, f"X-Session-Metadata must be a JSON object: {e}", param="X-Session-Metadata") from None
    if not isinstance(value, dict):
        raise HTTPError(400, f"X-Session-Metadata must be a JSON object, got {type(value).__name__}",
                        param="X-Session-Metadata")
    return value


def _gone(e: SessionGone) -> HTTPError:
    return HTTPError(e.status, e.message, code=e.code)


def _store(router: Router | None) -> SessionStore | None:
    store = router.registry.find(SESSIONS) if router is not None else None
    return store if isinstance(store, SessionStore) else None


@hookimpl
def add_options(options: OptionRegistry) -> None:
    options.add_config(SessionsConfig)


@hookimpl(trylast=True)  # after the plugin that registers the trajectory cache
def register_components(registry: ComponentRegistry, router: Router) -> None:
    if not registry.has(TRAJECTORY_CACHE):  # e.g. the tokenizer extra is not installed: no exact tokens to keep
        if router.settings.config(SessionsConfig).store_url:
            raise ValueError("--session-store-url needs sessions, which need a trajectory cache: load the radix_tree "
                             "plugin and pass --hf-checkpoint")
        log.info("sessions: off (no trajectory cache is registered; load the radix_tree plugin and pass "
                 "--hf-checkpoint to key trajectories by session)")
        router.plugins.pm.unregister(sys.modules[__name__])  # stand down: no hook of it on the request path
        return
    cfg = router.settings.config(SessionsConfig)
    store = SessionStore(cfg.ttl, cfg.max)
    if cfg.store_url:
        cache = registry.get(TRAJECTORY_CACHE)
        if not isinstance(cache, ChainTransfer):
            raise ValueError(f"--session-store-url needs a trajectory cache whose records can be copied to another "
                             f"replica ({type(cache).__name__} cannot: --radix-tree-process is not supported with the "
                             f"session store; run the cache in the router's process)")
        store.write_behind = WriteBehind(cfg.store_url, store, cache, None, cfg.store_timeout)
    registry.register(SESSIONS, store, owner="sessions")


_sweepers: dict[int, asyncio.Task] = {}


@hookimpl
async def startup(router: Router) -> None:
    store = _store(router)
    if store is None:
        return
    wb = store.write_behind
    if wb is not None:
        if wb.cache is not None:
            wb.cache.add_record_listener(_on_record)
        openai = router.registry.find(OPENAI_COMPAT)
        if isinstance(openai, HistoryTransfer):
            wb.history = openai
            openai.add_history_listener(_on_history)
        elif openai is not None:
            log.warning("sessions: the OpenAI layer (%s) does not implement contracts.HistoryTransfer: chat "
                        "sessions continued on another replica get their turns and records, not the exact text "
                        "of earlier answers (their next prompt is rendered from the messages)", type(openai).__name__)
        wb.start()
        log.info("sessions: writing sessions behind to %s (queue of %d entries)", wb.url.split("@")[-1],
                 wb.stats()["queue_max"])
    if not store.ttl:
        return

    async def sweep() -> None:
        while True:
            await asyncio.sleep(min(30.0, max(0.05, store.ttl / 4)))
            n = store.expire()
            if n:
                log.info("sessions: %d session(s) unused for %g s expired (--session-ttl)", n, store.ttl)

    _sweepers[id(router)] = asyncio.create_task(sweep())


@hookimpl
async def shutdown(router: Router) -> None:
    task = _sweepers.pop(id(router), None)
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    store = _store(router)
    wb = store.write_behind if store is not None else None
    if wb is not None:
        if wb.cache is not None:
            wb.cache.remove_record_listener(_on_record)
        await wb.close()


def _on_record(build: Callable[[], RecordedChain]) -> None:
    """The trajectory cache recorded (write-behind): keep the record with the request's turn, if in a session."""
    turn = _CURRENT.get()
    if turn is not None and not turn.closed:
        turn.chains.append(build)


def _on_history(item: list[Any]) -> None:
    turn = _CURRENT.get()
    if turn is not None and not turn.closed and turn.session.wb is not None:
        turn.session.wb.history.append(item)


# --- recording ---------------------------------------------------------------------------------------


@hookimpl(tryfirst=True)  # first: a finished session or a bad id is refused before any other plugin works on it
def pre_request(ctx: RequestContext) -> Any:
    if ctx.route not in ROUTES:
        return None
    sid = ctx.headers.get(SESSION_HEADER)
    if not sid:
        return None  # no session: nothing more on this request's path
    store = _store(ctx.router)
    if store is None:
        return None
    check_session_id(sid)
    meta = _metadata(ctx.headers.get(METADATA_HEADER))
    wb = store.write_behind
    if wb is not None and not store.knows(sid):  # another replica's session? read it first (awaited before the
        return _load_then_open(ctx, store, wb, sid, meta)  # trajectory cache's pre_request prepares the prompt)
    _open(ctx, store, sid, meta, None)
    return None


async def _load_then_open(ctx: RequestContext, store: SessionStore, wb: WriteBehind, sid: str,
                          meta: dict[str, Any] | None) -> None:
    _open(ctx, store, sid, meta, await wb.ensure(sid))


def _open(ctx: RequestContext, store: SessionStore, sid: str, meta: dict[str, Any] | None, loaded: str | None
          ) -> None:
    try:
        session, created = store.open(sid, meta)
    except SessionGone as e:
        raise _gone(e) from None
    session.requests += 1
    body = ctx.body
    rid = body.get("rid") if isinstance(body, dict) else None
    turn = ctx.stash[_TURN] = _Turn(session, rid if isinstance(rid, str) else uuid.uuid4().hex)
    wb = store.write_behind
    if wb is not None:
        _opened(wb, session, created, sid, loaded)
        _CURRENT.set(turn)
    if ctx.stream:
        ctx.inspect_stream = True


def _opened(wb: WriteBehind, session: Session, created: bool, sid: str, loaded: str | None) -> None:
    wb.state(session)
    if created and (loaded == "failed" or sid in wb.failed):
        wb.failed.pop(sid, None)
        session.gaps.append(history_unavailable_gap(wb.url))


def _int_array(ids: Any) -> array | None:
    """``ids`` as the int32 array the session stores, or None when they are not all integers of that size: one
    C-level pass (checking each element's type in Python cost twice as much on a 2,000-token prompt)."""
    if not isinstance(ids, list) or not ids:
        return None
    try:
        return typed_array("i", ids)
    except (TypeError, OverflowError):
        return None


def _prompts(body: Any) -> tuple[list[array] | None, int]:
    """The prompt ids the worker received (one array per prompt; None when they were not token ids) and the
    samples per prompt (0: they differ per prompt), read from the body that was sent (after the trajectory cache
    replaced a text prompt with its ids)."""
    if not isinstance(body, dict):
        return None, 1
    ids = body.get("input_ids")
    prompts: list[array] | None = None
    if isinstance(ids, list) and ids and not isinstance(ids[0], list):
        one = _int_array(ids)
        prompts = [one] if one is not None else None
    elif isinstance(ids, list) and ids and all(isinstance(x, list) for x in ids):
        arrays = [_int_array(x) for x in ids]
        prompts = None if None in arrays else arrays  # type: ignore[assignment]
    sp = body.get("sampling_params")
    if isinstance(sp, list):
        ns = {int(x.get("n", 1) or 1) if isinstance(x, dict) else 1 for x in sp}
        return prompts, (ns.pop() if len(ns) == 1 else 0)
    return prompts, (int(sp.get("n", 1) or 1) if isinstance(sp, dict) else 1)


@hookimpl(tryfirst=True)
def stream_chunk(ctx: RequestContext, chunk: dict) -> None:
    turn = ctx.stash.get(_TURN)
    if turn is not None and isinstance(chunk, dict):
        meta = chunk.get("meta_info")
        saved = dict(chunk)
        if isinstance(meta, dict):
            saved["meta_info"] = dict(meta)
        turn.chunks.append(saved)


@hookimpl(tryfirst=True)
def post_response(ctx: RequestContext, response: Any) -> None:
    turn = ctx.stash.get(_TURN)
    if turn is None:
        return
    if ctx.stream:
        groups: dict[int, list[dict]] = {}
        for c in turn.chunks:
            groups.setdefault(int(c.get("index", 0) or 0), []).append(c)
        replies = [merge_stream(groups[k]) for k in sorted(groups)]
    else:
        replies = response if isinstance(response, list) else [response]
    _fold(turn, replies, *_prompts(ctx.body))


@hookimpl
def request_finished(ctx: RequestContext) -> None:
    turn = ctx.stash.get(_TURN)
    if turn is None:
        return
    if not turn.folded:  # failed, refused, or the client left mid-stream: say so
        turn.folded = True
        turn.session.gaps.append({"request_id": turn.request_id, "index": None, "reason": "not_finished",
                                  "status": ctx.status, "error": ctx.error,
                                  "message": "The request ended without a complete reply (it failed, or the client "
                                             "went away mid-stream): not part of any trajectory."})
    if turn.session.wb is not None and not turn.closed:  # write-behind: queue what the request added
        store = _store(ctx.router)
        if store is not None and store.write_behind is not None:
            turn.closed = True
            store.write_behind.submit(turn.session, turn.chains)


def _fold(turn: _Turn, replies: list[Any], prompts: list[array] | None, samples: int) -> None:
    turn.folded = True
    session, n, rid = turn.session, max(1, samples), turn.request_id
    group = rid if (len(replies) > 1) else None
    for i, reply in enumerate(replies):
        if not isinstance(reply, dict):
            continue
        m = reply.get("meta_info")
        meta: dict[str, Any] = m if isinstance(m, dict) else {}
        fr = meta.get("finish_reason")
        kind = fr.get("type") if isinstance(fr, dict) else fr
        if prompts is None or samples == 0 or i // n >= len(prompts):
            session.gaps.append({"request_id": rid, "index": i, "reason": "prompt_not_token_ids",
                                 "message": "The prompt reached the worker as text (the trajectory cache did not "
                                            "tokenize it), so its exact tokens are unknown."})
            continue
        if kind not in FINISHED:
            session.gaps.append({"request_id": rid, "index": i, "reason": "not_finished", "finish_reason": fr,
                                 "message": "The generation did not finish (aborted or failed): not part of any "
                                            "trajectory."})
            continue
        try:
            out_ids, out_lp = output_ids_and_logprobs(reply)
            per = weight_version_spans(reply, len(out_ids))
        except (TypeError, ValueError, IndexError, KeyError) as e:
            session.gaps.append({"request_id": rid, "index": i, "reason": "unreadable_reply",
                                 "message": f"{type(e).__name__}: {e}"})
            continue
        default = str(meta.get("weight_version", "default"))
        prompt_version = per[0] if meta.get("weight_versions") and per else default
        prompt = prompts[i // n]
        seg = session.add_turn(prompt, out_ids, out_lp, per, prompt_version, rid, fr, group)
        st = session.wb
        if st is not None:  # write-behind: the turn as add_turn got it, its prompt after what it shares
            ref, k = session.last_ref
            st.turns.append([rid, fr, group, seg.turns[-1].time, ref, k, array("i", prompt[k:]), array("i", out_ids),
                             array("f", [0.0 if x is None else x for x in out_lp]),
                             [[len(list(g)), v] for v, g in itertools.groupby(per)], prompt_version])


# --- routes --------------------------------------------------------------------------------------------


class OpenSession(BaseModel):
    model_config = ConfigDict(extra="forbid")
    session_id: StrictStr | None = Field(None, description="Your id (1-128 of letters, digits, . _ : @ = + -); "
                                                           "omitted: a new UUID")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Any JSON: episode id, group id, ...")


class SessionMetadata(BaseModel):
    model_config = ConfigDict(extra="forbid")
    metadata: dict[str, Any] = Field(description="Merged into the session's metadata (e.g. the reward)")


class SessionOpened(BaseModel):
    session_id: str
    opened: bool = Field(description="True: opened now (201); False: it was already open, its metadata merged (200)")
    base_url: str = Field(description="Path prefix for an OpenAI SDK / agent that only knows a base URL")
    metadata: dict[str, Any]


class Trajectory(BaseModel):
    index: int
    reason: str = Field(description="new | branch (a sibling sample of a prompt already sampled) | rewrite "
                                    "(departs from the parent inside its tokens: history changed)")
    parent: int | None = Field(description="The segment it shares its first diverges_at tokens with")
    diverges_at: int | None
    token_length: int
    generated_tokens: int
    turns: list[dict[str, Any]]
    tokens: list[int] | None = None
    loss_mask: list[int] | None = None
    rollout_logp: list[float] | None = None
    weight_versions: list[str] | None = None


class SessionData(BaseModel):
    session_id: str
    metadata: dict[str, Any]
    created: float
    requests: int
    segments: int
    tokens: int
    gaps: list[dict[str, Any]] = Field(description="Turns that are not in any trajectory, each with why")
    trajectories: list[Trajectory]


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sessions: list[StrictStr] | None = Field(None, description="Session ids")
    texts: list[StrictStr] | None = Field(None, description="Trajectory texts (as /retrieve_from_text)")
    messages: list[list[dict[str, Any]]] | None = Field(None, description="Message lists (as "
                                                                            "/retrieve_from_messages)")
    finish: bool = Field(False, description="Sessions: finish each after reading it (hand over and free)")
    format: Literal["jsonl", "columnar"] = Field(
        "jsonl", description="jsonl: one JSON line per item; columnar (sessions only): flat int32/float32/uint8 "
                             "arrays after one JSON header (sessions/columnar.py), for large steps")


def _session_json(session: Session, arrays: bool = True) -> bytes:
    return orjson.dumps(session.as_dict(arrays))


OPENAI_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions"})
_HEADER = SESSION_HEADER.encode()


class _LoadFirst:
    """ASGI middleware (write-behind only): an OpenAI request of a session this replica does not hold waits for the
    session to be read from the store before the route renders and prepares its prompt (which happens before the
    request hooks run). /generate is served outside FastAPI: its pre_request hook loads."""

    def __init__(self, app: Any, store: SessionStore, wb: WriteBehind) -> None:
        self.app = app
        self.store = store
        self.wb = wb

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] in OPENAI_ROUTES:
            for k, v in scope.get("headers", ()):
                if k == _HEADER:
                    sid = v.decode("latin-1")
                    if SESSION_ID.fullmatch(sid) and not self.store.knows(sid):
                        await self.wb.ensure(sid)
                    break
        await self.app(scope, receive, send)


@hookimpl
def register_routes(app: FastAPI, router: Router) -> None:
    store = _store(router)
    if store is None:
        return

    wb = store.write_behind
    if wb is not None:
        app.add_middleware(_LoadFirst, store=store, wb=wb)

    async def load(sid: str) -> None:
        """Read a session this replica does not hold from the session store (write-behind), once."""
        if wb is not None and not store.knows(sid):
            if await wb.ensure(sid) == "failed":
                raise HTTPError(503, f"Session {sid!r} is not held by this replica and the session store could not "
                                     f"be read; retry.", code="session_store_unavailable")

    async def live(sid: str) -> Session:
        check_session_id(sid)
        await load(sid)
        try:
            s = store.get(sid)
        except SessionGone as e:
            raise _gone(e) from None
        if s is None:
            raise HTTPError(404, NOT_FOUND.format(sid=sid), code="session_not_found")
        return s

    @app.post("/sessions", status_code=201, responses={200: {"model": SessionOpened}})
    async def open_session(response: FastAPIResponse, body: OpenSession | None = None) -> SessionOpened:
        """Open a session (optional: the first request with a new id opens it too) with its metadata: 201, or
        200 when it was already open (its metadata merged)."""
        body = body or OpenSession(session_id=None)
        sid = check_session_id(body.session_id) if body.session_id else uuid.uuid4().hex
        if body.session_id:
            await load(sid)
        try:
            s, opened = store.open(sid, body.metadata)
        except SessionGone as e:
            raise _gone(e) from None
        if wb is not None:
            _opened(wb, s, opened, sid, None)
            wb.submit(s, [])
        if not opened:
            response.status_code = 200
        return SessionOpened(session_id=sid, opened=opened, base_url=f"/sessions/{sid}", metadata=s.metadata)

    @app.get("/sessions")
    async def list_sessions() -> dict[str, Any]:
        """Open sessions (id, metadata, counts) and the store's counters (memory held, created/finished/expired)."""
        with store.lock:
            items = [s.summary() for s in store.sessions.values()]
        return {"sessions": items, "stats": store.stats()}

    @app.get("/sessions/{sid}", response_class=Response, responses={200: {"model": SessionData}, 404: {},
                                                                      409: {}})
    async def get_session(sid: str, tokens: bool = True) -> Response:
        """Every trajectory of the session: exact tokens, loss mask, logprobs and weight versions from token 0,
        one per continuous chain (branches and rewrites separate, each saying why), its metadata and gaps.
        ``tokens=false``: the structure without the token lists."""
        return Response(_session_json(await live(sid), tokens), media_type="application/json")

    @app.patch("/sessions/{sid}")
    async def patch_session(sid: str, body: SessionMetadata) -> dict[str, Any]:
        """Merge metadata into a session (e.g. its reward once the episode is scored)."""
        s = await live(sid)
        s.metadata.update(body.metadata)
        if wb is not None:
            wb.submit(s, [])
        return {"session_id": sid, "metadata": s.metadata}

    @app.delete("/sessions/{sid}", response_class=Response, responses={200: {"model": SessionData}, 404: {},
                                                                         409: {}})
    async def finish_session(sid: str, tokens: bool = True) -> Response:
        """Finish a session: its trajectories are returned one last time and freed; later requests with this id
        get 409."""
        check_session_id(sid)
        await load(sid)
        try:
            s = store.finish(sid)
        except SessionGone as e:
            raise _gone(e) from None
        except KeyError:
            raise HTTPError(404, NOT_FOUND.format(sid=sid), code="session_not_found") from None
        if wb is not None:
            wb.submit(s, [], finish=True)
        return Response(_session_json(s, tokens), media_type="application/json")

    @app.post("/retrieve_batch", response_class=StreamingResponse,
              responses={200: {"content": {"application/x-ndjson": {}}}})
    async def retrieve_batch(body: BatchRequest = Body(...)) -> StreamingResponse:  # noqa: B008
        """Many trajectories in one call, streamed as JSON lines in the order asked: ``sessions`` (each line a
        ``GET /sessions/{sid}`` answer, or ``{"session_id", "error"}``), ``texts`` (each a
        ``/retrieve_from_text`` answer with ``"index"``), or ``messages`` (each a ``/retrieve_from_messages``
        answer with ``"index"``). An item that fails is an ``error`` line; the others are still sent."""
        given = [k for k in ("sessions", "texts", "messages") if getattr(body, k) is not None]
        if len(given) != 1:
            raise HTTPError(400, "Give exactly one of 'sessions', 'texts' or 'messages' (a list).",
                            param="sessions")
        if wb is not None and body.sessions:  # sessions this replica does not hold: read from the store first
            await asyncio.gather(*[wb.ensure(sid) for sid in dict.fromkeys(body.sessions)
                                   if SESSION_ID.fullmatch(sid) and not store.knows(sid)])
        if body.format == "columnar":
            if given[0] != "sessions":
                raise HTTPError(400, "\"format\": \"columnar\" is for 'sessions'; texts and message lists are "
                                     "answered as JSON lines.", param="format")
            return StreamingResponse(columnar.encode(_sessions(store, body)), media_type=columnar.MEDIA_TYPE)
        return StreamingResponse(_batch(router, store, body, given[0]), media_type="application/x-ndjson")


def _error(key: str, value: Any, status: int, message: str, code: str | int | None = None) -> dict[str, Any]:
    return {key: value, "error": {"status": status, "code": code, "message": message}}


def _sessions(store: SessionStore, body: BatchRequest) -> list[Session | dict[str, Any]]:
    """The sessions asked for, in order (finished if asked), or an error item for each one that is not there."""
    out: list[Session | dict[str, Any]] = []
    for sid in body.sessions or []:
        try:
            check_session_id(sid)
            s = store.finish(sid) if body.finish else store.get(sid)
            if s is None:
                raise KeyError(sid)
            if body.finish and store.write_behind is not None:
                store.write_behind.submit(s, [], finish=True)
        except (HTTPError, SessionGone) as e:
            out.append(_error("session_id", sid, e.status, e.message, e.code))
        except KeyError:
            out.append(_error("session_id", sid, 404, NOT_FOUND.format(sid=sid), "session_not_found"))
        else:
            out.append(s)
    return out


async def _batch(router: Router, store: SessionStore, body: BatchRequest, kind: str) -> AsyncIterator[bytes]:
    def error(key: str, value: Any, status: int, message: str, code: str | int | None = None) -> bytes:
        return orjson.dumps(_error(key, value, status, message, code)) + b"\n"

    if kind == "sessions":
        for k, item in enumerate(_sessions(store, body)):
            yield orjson.dumps(item) + b"\n" if isinstance(item, dict) else _session_json(item) + b"\n"
            if k % 64 == 63:
                await asyncio.sleep(0)  # let other requests run between chunks of a large batch
        return
    if kind == "texts":
        cache = router.registry.find(TRAJECTORY_CACHE)
        for i, text in enumerate(body.texts or []):
            try:
                if cache is None:
                    raise HTTPError(503, "No trajectory cache is registered.")
                r = await cache.retrieve(text)
            except HTTPError as e:
                yield error("index", i, e.status, e.message, e.code)
            except CacheUnavailable as e:
                yield error("index", i, 503, f"The trajectory cache is unavailable ({e}).")
            else:
                r["index"] = i
                yield orjson.dumps(r) + b"\n"
        return
    svc = router.registry.find(OPENAI_COMPAT)
    for i, messages in enumerate(body.messages or []):
        try:
            if svc is None:
                raise HTTPError(503, "The openai_compat plugin is not loaded: message lists cannot be rendered.")
            r = await svc.retrieve_messages({"messages": messages})  # checked there: a bad list is a 400 item
        except HTTPError as e:
            yield error("index", i, e.status, e.message, e.code)
        else:
            r = dict(r) if isinstance(r, dict) else {"result": r}
            r["index"] = i
            yield orjson.dumps(r) + b"\n"
