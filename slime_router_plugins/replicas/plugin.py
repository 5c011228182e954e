"""replicas plugin: N router processes ("replicas", on one machine or many) that each own the sessions they serve.

Inert unless ``--replica-url`` is given: without it the plugin unregisters itself while the app is built, so no
hook, route or ASGI wrapper of it exists (the app is the one served without the plugin). With it:

- membership (``membership.py``): ``--replica-peers``, ``PUT /replicas/peers``, ``GET /health`` checks of the
  peers every ``--replica-check-interval`` seconds; ``GET /replicas`` shows it (``?session=SID``: the owner);
- ownership: rendezvous hashing of the session id over the live replicas; ``--replica-routing`` says what a replica
  does with a generation of a session it does not own (``lb``: serve it, a load balancer routes sessions;
  ``proxy``: forward it once to the owner; ``redirect``: 307 to the owner) -- the ASGI front (``front.py``);
- the control plane on every replica: the admin calls of ``front.FANOUT``, one merged answer; a replica that
  (re)joins takes the newest control-plane state of its live peers (``sync.py``, ``GET /replicas/state``);
  ``POST /abort_session`` aborts a session's in-flight requests wherever they run; ``GET /replicas/metrics`` sums
  the replicas' ``/metrics``; a session's trajectories can be read from any replica.

Hooks when active: ``pre_request`` / ``request_finished`` track the in-flight requests that carry a session id
(a ``rid`` is added to a body without one, so that it can be aborted), ``startup`` / ``shutdown`` run the checks
and the state syncs.
docs/replicas.md is the guide.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import aiohttp
import orjson
from fastapi import Body, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from slime_router_core import HTTPError, hookimpl
from slime_router_core.access import declare_admin_paths
from slime_router_core.context import StashKey
from slime_router_core.contracts import SESSIONS
from slime_router_core.settings import PluginConfig, at_least, option

from .front import GENERATION, HOP_HEADER, RESPONSE_SKIP, ReplicaFront, Reply, call_app, parsed
from .membership import Membership, parse_urls, replica_url
from .sync import Reconciler, ReplicaState, SyncReport

if TYPE_CHECKING:  # pragma: no cover
    from fastapi import FastAPI

    from slime_router_core.context import RequestContext
    from slime_router_core.registry import ComponentRegistry
    from slime_router_core.router import Router
    from slime_router_core.settings import OptionRegistry

log = logging.getLogger("slime_router.replicas")

COMPONENT = "replicas"
ROUTINGS = ("lb", "proxy", "redirect")
MAX_TRACKED = 200_000  # in-flight session requests tracked at most (a caller that never finishes its contexts)
_SID: StashKey[str] = StashKey("replicas.session")


@dataclass(frozen=True)
class ReplicasConfig(PluginConfig):
    flag_prefix = "--replica-"
    url: str | None = option(
        None, check=lambda v: _problem(replica_url, v),
        help="This replica's address as its peers reach it (scheme://host:port). Turns the plugin on; "
             "without it the plugin does nothing.")
    peers: str | None = option(
        None, check=lambda v: _problem(parse_urls, v),
        help="Every replica's address, comma-separated (self included or not); also settable at run time with "
             "PUT /replicas/peers.")
    routing: str = option(
        "lb", choices=ROUTINGS,
        help="A generation of a session another live replica owns: lb = served here (a load balancer hashing "
             "X-Session-ID routes sessions), proxy = forwarded once to the owner, redirect = 307 to the owner.")
    check_interval: float = option(
        2.0, check=at_least(0),
        help="Seconds between GET /health checks of the peers (2 failed in a row: out of the live set; 1 good: "
             "back). 0: no checks (every peer stays live).")
    timeout: float = option(
        120.0, check=at_least(0.1),
        help="Seconds a replica waits for a peer's answer to a fanned-out admin call, a metrics or session "
             "lookup (a peer that does not answer in time is reported as failed).")


def _problem(parse: Any, value: Any) -> str | None:
    """What ``parse`` refuses in ``value`` (for an option's ``check``), or None."""
    try:
        parse(value)
    except ValueError as e:
        return str(e).split(": ", 1)[-1]
    return None


@hookimpl
def add_options(options: OptionRegistry) -> None:
    options.add_config(ReplicasConfig)


class Replicas:
    """Per-app state (component ``"replicas"``): membership, the in-flight session requests, peer calls."""

    def __init__(self, router: Router, config: ReplicasConfig) -> None:
        assert config.url is not None
        self.router = router
        self.config = config
        self_url = replica_url(config.url)
        self.membership = Membership(self_url, parse_urls(config.peers or ""), config.check_interval,
                                     timeout=min(5.0, max(1.0, config.check_interval)))
        self.inner: Any = None  # the app inside the front (set when the front is built)
        self.inflight: dict[str, dict[RequestContext, None]] = {}
        self.tracked = 0
        self.proxied = 0
        self.proxy_failures = 0
        self.sync = Reconciler(self)
        self.membership.on_live = self.peer_live

    def peer_live(self, url: str) -> None:
        """A peer back from dead (or newly set): this replica may have missed control-plane calls; sync."""
        if self.sync.started:
            self.sync.request(f"peer {url} live")

    def session(self) -> aiohttp.ClientSession:
        assert self.router.session is not None, "router not started"
        return self.router.session

    # --- calls to peers --------------------------------------------------------------------------------------

    async def peer(self, url: str, method: str, target: str, headers: Any, body: bytes | None,
                   timeout: float | None = None) -> Reply:
        """One request to a peer; an unreachable or silent peer is a 502 answer (never raised)."""
        try:
            async with self.session().request(method, url + target, data=body or None, headers=headers,
                                              timeout=aiohttp.ClientTimeout(total=timeout or self.config.timeout)
                                              ) as resp:
                data = await resp.read()
                hdrs = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in resp.headers.items()
                        if k.lower() not in RESPONSE_SKIP and k.lower() != "content-length"]
                return resp.status, hdrs, data
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            if isinstance(e, asyncio.TimeoutError) and not str(e):
                message = f"Replica {url} did not answer within {timeout or self.config.timeout:g} s"
            else:
                message = f"Replica {url} unreachable: {type(e).__name__}: {e}"
            error = {"message": message, "type": "upstream_error", "param": None, "code": "replica_unreachable"}
            return 502, [(b"content-type", b"application/json")], orjson.dumps({"error": error})

    def hop_headers(self, request: Request | None = None, **extra: str) -> dict[str, str]:
        headers = {HOP_HEADER: self.membership.self_url, **extra}
        if request is not None and "authorization" in request.headers:
            headers["Authorization"] = request.headers["authorization"]
        return headers

    # --- where sessions are held -------------------------------------------------------------------------------

    def has_sessions(self) -> bool:
        """Whether the sessions plugin serves here (else there is nothing to look up elsewhere)."""
        return self.router.registry.find(SESSIONS) is not None

    def holds_locally(self, sid: str) -> bool:
        """Whether this replica's session store knows ``sid`` (open, or finished/expired: it answers for it)."""
        store = self.router.registry.find(SESSIONS)
        if store is None:
            return False
        try:
            return store.get(sid) is not None
        except Exception:  # finished or expired here: this replica's answer (409/404) is the one to give
            return True

    async def find_holders(self, sids: list[str], headers: dict[str, str] | None = None) -> dict[str, str]:
        """{session id: the live peer holding it} for the sessions some live peer holds. proxy/redirect: each
        session's owner is asked first; lb (and what the owners lack): every live peer, the owner preferred."""
        m = self.membership
        found: dict[str, str] = {}
        payload = orjson.dumps({"sessions": sids})
        hdrs = {**(headers or {}), HOP_HEADER: m.self_url, "Content-Type": "application/json"}

        async def ask(url: str, asked: bytes) -> tuple[str, set[str]]:
            status, _, data = await self.peer(url, "POST", "/replicas/holds", hdrs, asked)
            answer = parsed(data) if status == 200 else None
            held = answer.get("held") if isinstance(answer, dict) else None
            return url, {s for s in held if isinstance(s, str)} if isinstance(held, list) else set()

        rest = list(sids)
        if self.config.routing != "lb":
            by_owner: dict[str, list[str]] = {}
            for s in sids:
                owner = m.owner(s.encode("utf-8", "surrogateescape"))
                if owner != m.self_url:
                    by_owner.setdefault(owner, []).append(s)
            for url, held in await asyncio.gather(*(ask(u, orjson.dumps({"sessions": g}))
                                                    for u, g in by_owner.items())):
                for s in held:
                    found[s] = url
            rest = [s for s in sids if s not in found]
            if not rest:
                return found
            payload = orjson.dumps({"sessions": rest})
        peers = m.live_others()
        answers = dict(await asyncio.gather(*(ask(u, payload) for u in peers)))
        for s in rest:
            owner = m.owner(s.encode("utf-8", "surrogateescape"))
            holders = [u for u in peers if s in answers[u]]
            if holders:
                found[s] = owner if owner in holders else holders[0]
        return found

    async def find_holder(self, sid: str, headers: dict[str, str] | None = None) -> str | None:
        return (await self.find_holders([sid], headers)).get(sid)

    # --- in-flight session requests (for /abort_session) -----------------------------------------------------

    def track(self, sid: str, ctx: RequestContext) -> None:
        if self.tracked >= MAX_TRACKED:
            return
        self.inflight.setdefault(sid, {})[ctx] = None
        self.tracked += 1
        ctx.stash[_SID] = sid

    def untrack(self, ctx: RequestContext) -> None:
        sid = ctx.stash.pop(_SID, None)
        if sid is None:
            return
        held = self.inflight.get(sid)
        if held is not None and held.pop(ctx, 0) is None:
            self.tracked -= 1
            if not held:
                del self.inflight[sid]

    async def abort_session(self, sid: str) -> tuple[bool, dict[str, Any]]:
        """Abort every in-flight request of ``sid`` on this replica: each rid sent to the worker serving it (or,
        not selected yet, to every worker) as ``/abort_request``."""
        router = self.router
        rids: list[str] = []
        results: dict[str, Any] = {}
        ok = True
        for ctx in list(self.inflight.get(sid, ())):
            body = ctx.body if isinstance(ctx.body, dict) else {}
            rid = body.get("rid")
            for r in [rid] if isinstance(rid, str) else [x for x in rid or [] if isinstance(x, str)]:
                worker = ctx.worker
                urls = [worker.url] if worker is not None and router.pool.get(worker.url) is not None else None
                answers = await router.broadcast("POST", "/abort_request", {"rid": r}, urls=urls)
                rids.append(r)
                for url, (status, resp) in answers.items():
                    results.setdefault(r, {})[url] = {"status": status, "response": resp}
                    ok = ok and 200 <= status < 300
        return ok, {"session_id": sid, "aborted": len(rids), "rids": rids, "workers": results}


def _replicas(router: Router | None) -> Replicas | None:
    found = router.registry.find(COMPONENT) if router is not None else None
    return found if isinstance(found, Replicas) else None


@hookimpl
def register_components(registry: ComponentRegistry, router: Router) -> None:
    config = router.settings.config(ReplicasConfig)
    if not config.url:
        if config.peers:
            raise ValueError("--replica-peers needs --replica-url (this replica's own address, as its peers reach "
                             "it)")
        router.plugins.pm.unregister(sys.modules[__name__])  # inert: no hook, route or wrapper of it exists
        return
    replicas = Replicas(router, config)
    registry.register(COMPONENT, replicas, owner="replicas")
    router.asgi_wrappers.append(lambda app: ReplicaFront(app, replicas))
    log.info("replicas: %s of %s, routing %s", replicas.membership.self_url, list(replicas.membership.peers),
             config.routing)


@hookimpl
def startup(router: Router) -> None:
    replicas = _replicas(router)
    if replicas is not None:
        replicas.membership.start(replicas.session())
        replicas.sync.start()  # in the background, after the app's own start-up


@hookimpl
async def shutdown(router: Router) -> None:
    replicas = _replicas(router)
    if replicas is not None:
        await replicas.sync.stop()
        await replicas.membership.stop()


@hookimpl(trylast=True)  # after the plugins that rewrite the body: the rid it adds is the one sent
def pre_request(ctx: RequestContext) -> None:
    if ctx.route not in GENERATION:
        return
    sid = ctx.headers.get("x-session-id")
    if not sid:
        return
    replicas = _replicas(ctx.router)
    if replicas is None:
        return
    body = ctx.body
    if isinstance(body, dict) and body.get("rid") is None:
        body["rid"] = uuid.uuid4().hex  # so that /abort_session can name it
    replicas.track(sid, ctx)


@hookimpl
def request_finished(ctx: RequestContext) -> None:
    if ctx.stash.get(_SID) is not None:
        replicas = _replicas(ctx.router)
        if replicas is not None:
            replicas.untrack(ctx)


# --- routes ------------------------------------------------------------------------------------------------


class Peers(BaseModel):
    model_config = ConfigDict(extra="forbid")
    peers: list[StrictStr] = Field(description="Every replica's address (scheme://host:port), self included or "
                                               "not")


class SessionList(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sessions: list[StrictStr]


class AbortSession(BaseModel):
    model_config = ConfigDict(extra="forbid")
    session_id: StrictStr | None = Field(None, description="The session (or an X-Session-ID header, or the "
                                                           "/sessions/{sid}/abort_session URL)")


class PeerCheck(BaseModel):
    live: bool
    consecutive_failures: int
    last_error: str | None


class ReplicasView(BaseModel):
    """``GET /replicas``: this replica's view of the replica set."""

    self: str = Field(description="This replica (--replica-url)")
    peers: list[str] = Field(description="Every member, self included")
    live: list[str] = Field(description="The members sessions are hashed over")
    routing: str = Field(description="lb, proxy or redirect (--replica-routing)")
    check_interval_s: float
    check_rounds: int
    live_set_changes: int
    checks: dict[str, PeerCheck] = Field(description="Each peer's health checks")
    proxied: int = Field(description="Generations forwarded to their owner")
    proxy_failures: int = Field(description="Forwards that found the owner unreachable (served here)")
    in_flight_sessions: int = Field(description="Sessions with requests running here")
    generation: int = Field(description="This replica's control-plane generation (GET /replicas/state)")
    last_sync: SyncReport | None = Field(None, description="The last reconciliation with the peers' state")
    calls_waiting_for_sync: int = Field(description="Control-plane calls here waiting for a running sync to end")
    session: str | None = Field(None, description="With ?session=SID: the session asked about")
    owner: str | None = Field(None, description="With ?session=SID: the live replica owning it")


class Held(BaseModel):
    held: list[str] = Field(description="The sessions asked about that this replica's session store knows")


class SessionAborted(BaseModel):
    session_id: str
    aborted: int = Field(description="Request ids aborted here")
    rids: list[str]
    workers: dict[str, dict[str, Any]] = Field(description="Per rid, each worker's answer to /abort_request")


class ReplicaMetrics(BaseModel):
    replicas: int = Field(description="Live replicas whose snapshot was read")
    sum: dict[str, Any] = Field(description="The snapshots merged: counters and additive gauges summed, the rest "
                                            "(latencies, rates, settings) the largest value")
    snapshots: dict[str, Any] = Field(description="Each replica's GET /metrics JSON")
    failed: dict[str, Any] = Field(description="Replicas whose snapshot could not be read, and why")


def _json(obj: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(obj), status_code=status, media_type="application/json")


@hookimpl
def register_routes(app: FastAPI, router: Router) -> None:
    replicas = _replicas(router)
    if replicas is None:
        return
    declare_admin_paths("/replicas/peers", "/abort_session", "/replicas/state")
    m = replicas.membership

    def view() -> dict[str, Any]:
        return {**m.view(), "routing": replicas.config.routing, "proxied": replicas.proxied,
                "proxy_failures": replicas.proxy_failures, "in_flight_sessions": len(replicas.inflight),
                "generation": replicas.sync.generation, "last_sync": replicas.sync.last_sync,
                "calls_waiting_for_sync": replicas.sync.waiting}

    @app.get("/replicas", response_model=ReplicasView)
    async def get_replicas(session: Annotated[str | None, Query(description="A session id: its owner")] = None
                           ) -> Response:
        """This replica, its peers, the live set, the routing mode; with ``?session=SID`` the replica owning it
        (rendezvous hashing over the live set)."""
        out = view()
        if session is not None:
            out["session"] = session
            out["owner"] = m.owner(session.encode("utf-8", "surrogateescape"))
        return _json(out)

    @app.put("/replicas/peers", response_model=ReplicasView)
    async def put_peers(body: Peers) -> Response:
        """Set this replica's membership (a launcher, after starting the replicas, calls every replica; this
        call is not fanned out). Answers the new ``GET /replicas`` view."""
        try:
            peers = [replica_url(u, "peers") for u in body.peers]
        except ValueError as e:
            raise HTTPError(400, str(e), param="peers") from None
        m.set_peers(peers)
        log.warning("replicas: membership set to %s", list(m.peers))
        return _json(view())

    @app.get("/replicas/state", response_model=ReplicaState)
    async def replica_state() -> Response:
        """This replica's shareable control-plane state: its workers, paused and drain mode, the last weight
        version set through ``/update_weight_version``, and its ``generation`` (the stamp of the last control-plane
        call applied here). Local (never fanned out): a (re)joining replica reads it from each live peer and takes
        the newest. An admin route."""
        return _json(replicas.sync.state())

    @app.post("/replicas/holds")
    async def holds(body: SessionList) -> Held:
        """Which of these sessions this replica's session store knows (how replicas find a session's holder)."""
        return Held(held=[s for s in body.sessions if replicas.holds_locally(s)])

    @app.post("/abort_session", response_model=SessionAborted)
    async def abort_session(request: Request, body: Annotated[AbortSession | None, Body()] = None) -> Response:
        """Abort every in-flight request of a session (``{"session_id": ...}``, or the ``X-Session-ID`` header:
        ``POST /sessions/{sid}/abort_session``). Without the hop header: on every replica, one merged answer."""
        sid = (body.session_id if body is not None else None) or request.headers.get("x-session-id")
        if not sid:
            raise HTTPError(400, "Give the session: {\"session_id\": ...}, an X-Session-ID header, or POST "
                                 "/sessions/{sid}/abort_session.", param="session_id")
        ok, out = await replicas.abort_session(sid)
        return _json(out, 200 if ok else 502)

    @app.get("/replicas/metrics", response_model=ReplicaMetrics)
    async def replica_metrics(request: Request) -> Response:
        """Every live replica's ``GET /metrics`` JSON: ``sum`` adds their numbers (counters and additive gauges;
        rates, latencies, ages and settings take the largest replica's value instead, ``hit_rate`` is recomputed),
        ``replicas`` lists each snapshot (or why it is missing)."""
        headers = replicas.hop_headers(request, Accept="application/json")
        local_scope = {k: v for k, v in request.scope.items()
                       if k in ("type", "asgi", "http_version", "scheme", "server", "client", "root_path", "state")}
        local_scope.update(method="GET", path="/metrics", raw_path=b"/metrics", query_string=b"",
                           headers=[(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()])
        peers = m.live_others()
        replies = await asyncio.gather(call_app(replicas.inner, local_scope, b""),
                                       *(replicas.peer(u, "GET", "/metrics", headers, None) for u in peers))
        snapshots: dict[str, Any] = {}
        failed: dict[str, Any] = {}
        for url, (status, _, data) in zip([m.self_url, *peers], replies):
            answer = parsed(data)
            if status == 200 and isinstance(answer, dict):
                snapshots[url] = answer
            else:
                failed[url] = {"status": status, "response": answer}
        return _json({"replicas": len(snapshots), "sum": sum_snapshots(list(snapshots.values())),
                      "snapshots": snapshots, "failed": failed})


# --- metrics -----------------------------------------------------------------------------------------------

# Numbers that do not add up across replicas: the largest replica's value is given instead.
NOT_ADDITIVE_SUFFIXES = ("_s", "_ms", "rate", "ratio", "_k", "threshold", "_pct", "percent")
NOT_ADDITIVE_KEYS = frozenset({"active_workers", "uptime", "max_weight_versions", "capacity"})


def additive(key: str) -> bool:
    return key not in NOT_ADDITIVE_KEYS and not key.endswith(NOT_ADDITIVE_SUFFIXES)


def sum_snapshots(snapshots: list[Any], key: str = "") -> Any:
    """Objects merged key by key; numbers summed (``additive``) or the largest taken; anything else (strings,
    booleans, lists) left out: it is in each replica's snapshot."""
    if snapshots and all(isinstance(s, dict) for s in snapshots):
        keys: dict[str, None] = {}
        for s in snapshots:
            keys.update(dict.fromkeys(s))
        out = {}
        for k in keys:
            merged = sum_snapshots([s[k] for s in snapshots if k in s], k)
            if merged is not None:
                out[k] = merged
        hits, misses = out.get("cache_hits"), out.get("cache_misses")
        if "hit_rate" in out and isinstance(hits, (int, float)) and isinstance(misses, (int, float)):
            out["hit_rate"] = hits / (hits + misses) if hits + misses else 0.0
        return out
    numbers = [s for s in snapshots if isinstance(s, (int, float)) and not isinstance(s, bool)]
    if not numbers or len(numbers) != len(snapshots):
        return None
    return sum(numbers) if additive(key) else max(numbers)
