"""The replicas plugin's ASGI front: what it decides before the app's own dispatch.

It reads the path, the ``X-Session-ID`` header (or the ``/sessions/{sid}/`` base URL) and the hop header only --
never a generation's body -- and then:

- generation routes (``/generate``, ``/v1/chat/completions``, ``/v1/completions``) of a session owned by another
  live replica: ``proxy`` mode forwards the request once to the owner (body as bytes, the answer -- a stream too --
  passed through as it arrives), ``redirect`` mode answers 307 with ``Location`` at the owner; ``lb`` mode (and a
  request without a session) is served here, untouched;
- the admin calls of ``FANOUT``: applied here and on every other replica concurrently, one merged answer; those of
  ``CONTROL`` (and the hop-marked ones a peer fans out) are stamped with a generation and wait for a running state
  sync (``sync.py``);
- ``GET``/``PATCH``/``DELETE /sessions/{sid}`` and ``POST /retrieve_batch`` with ``sessions``, for sessions this
  replica does not hold: answered by the replica that holds them.

A request carrying ``X-Slime-Replica-Hop`` was sent by a replica: it is always served here (no loops).
Everything else goes to the app without a look beyond one set lookup of the path.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from multidict import CIMultiDict

from slime_router_core.access import deny
from slime_router_core.errors import HTTPError
from slime_router_core.proxy import cancel_on_disconnect, read_body
from slime_router_core.scoped import HEADER as SESSION_HEADER
from slime_router_core.scoped import PREFIX, unscope
from slime_router_plugins.sessions import columnar

if TYPE_CHECKING:  # pragma: no cover
    from .plugin import Replicas

log = logging.getLogger("slime_router.replicas")

HOP = b"x-slime-replica-hop"
HOP_HEADER = "X-Slime-Replica-Hop"
STAMP = b"x-slime-replica-generation"  # the stamp of a fanned-out control-plane call (sync.py)
GENERATION_HEADER = "X-Slime-Replica-Generation"
GENERATION = frozenset({"/generate", "/v1/chat/completions", "/v1/completions"})
# Admin calls applied on every replica (method by path). Not here, on purpose: the calls that go to the workers
# (/update_weights_from_disk, /flush_cache, /pause_generation, /continue_generation, /get_load, the forwarded
# GETs): the workers are shared, so the replica asked sends them once; and PUT /replicas/peers: a launcher sets
# each replica's membership itself.
FANOUT = {"/add_worker": "POST", "/remove_worker": "POST", "/pause": "POST", "/resume": "POST",
          "/update_weight_version": "POST", "/abort_request": "POST", "/abort_session": "POST"}
# The fanned-out calls that change the state a replica shares (GET /replicas/state): stamped with a generation.
CONTROL = frozenset({"/add_worker", "/remove_worker", "/pause", "/resume", "/update_weight_version"})
# Not passed between client, replica and peer (hop-by-hop, or set by whoever sends).
REQUEST_SKIP = frozenset({b"host", b"content-length", b"connection", b"keep-alive", b"transfer-encoding", b"te",
                          b"trailer", b"upgrade", b"proxy-connection", b"expect", HOP, STAMP})
RESPONSE_SKIP = frozenset({"transfer-encoding", "connection", "keep-alive", "date", "server"})
JSON = [(b"content-type", b"application/json")]

Reply = tuple[int, list[tuple[bytes, bytes]], bytes]  # status, headers, body


def parsed(body: bytes) -> Any:
    try:
        return orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        return body.decode(errors="replace")[:2000]


async def answer(send: Any, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*(JSON if headers is None else headers), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _forward_headers(scope: dict[str, Any], self_url: str) -> CIMultiDict[str]:
    headers: CIMultiDict[str] = CIMultiDict(
        (k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"] if k not in REQUEST_SKIP)
    headers[HOP_HEADER] = self_url
    return headers


def _target(scope: dict[str, Any]) -> str:
    """The path and query of a request as received (percent-encoding kept)."""
    raw = scope.get("raw_path") or scope["path"].encode("utf-8", "surrogateescape")
    qs = scope.get("query_string") or b""
    return (raw + (b"?" + qs if qs else b"")).decode("latin-1")


class ReplicaFront:
    """ASGI wrapper around the router app (``Router.asgi_wrappers``)."""

    def __init__(self, app: Any, replicas: Replicas) -> None:
        self.app = app
        self.replicas = replicas
        self.access = getattr(app, "access", None)
        paths = set(FANOUT) | {"/retrieve_batch"}
        if replicas.config.routing != "lb":
            paths |= GENERATION | {"/sessions"}
        self.paths = frozenset(paths)
        replicas.inner = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            if path in self.paths or path.startswith(PREFIX):
                await self.handle(scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def handle(self, original: dict[str, Any], receive: Any, send: Any) -> None:
        scope = unscope(original) if original["path"].startswith(PREFIX) else original
        path, method = scope["path"], scope["method"]
        sid: bytes | None = None
        for k, v in scope["headers"]:
            if k == HOP:  # sent by a replica: served here, whatever it is
                if path in CONTROL and FANOUT[path] == method:
                    await self.control(scope, receive, send)
                else:
                    await self.app(scope, receive, send)
                return
            if k == SESSION_HEADER:
                sid = v
        try:
            if path in GENERATION:
                if sid and method == "POST" and self.replicas.config.routing != "lb":
                    owner = self.replicas.membership.owner(sid)
                    if owner != self.replicas.membership.self_url:
                        if not self._allowed(scope):
                            await deny(send, self.access.check(scope))  # type: ignore[union-attr]
                        elif self.replicas.config.routing == "redirect":
                            await self.redirect(original, send, owner, sid)
                        else:
                            await self.proxy(original, scope, receive, send, owner)
                        return
            elif path == "/sessions" and method == "POST":  # only intercepted in proxy and redirect modes
                if self._allowed(scope):
                    await self.open_session(scope, receive, send)
                    return
            elif FANOUT.get(path) == method:
                if not self._allowed(scope):
                    await deny(send, self.access.check(scope))  # type: ignore[union-attr]
                    return
                await self.fanout(original, scope, receive, send)
                return
            elif path == "/retrieve_batch" and method == "POST":
                if self._allowed(scope):
                    await self.batch(scope, receive, send)
                    return
            elif path.startswith(PREFIX) and method in ("GET", "PATCH", "DELETE"):
                key = path[len(PREFIX):]
                if key and "/" not in key and self._allowed(scope):
                    await self.session_call(scope, receive, send, key)
                    return
        except HTTPError as e:
            await answer(send, e.status, orjson.dumps(e.to_dict()))
            return
        except ConnectionAbortedError:
            return
        await self.app(scope, receive, send)

    def _allowed(self, scope: dict[str, Any]) -> bool:
        return self.access is None or self.access.check(scope) is None

    # --- generations: redirect or proxy to the owner ---------------------------------------------------

    async def redirect(self, original: dict[str, Any], send: Any, owner: str, sid: bytes) -> None:
        location = owner + _target(original)
        body = orjson.dumps({"error": {"message": f"Session {sid.decode('latin-1')!r} is served by replica "
                                                  f"{owner} (--replica-routing redirect): repeat the request "
                                                  f"there.", "type": "redirect", "param": None,
                                       "code": "session_elsewhere"}})
        await answer(send, 307, body, [*JSON, (b"location", location.encode("latin-1"))])

    async def proxy(self, original: dict[str, Any], scope: dict[str, Any], receive: Any, send: Any,
                    owner: str, body: bytes | None = None) -> None:
        """The request once to ``owner``, its answer passed through as it arrives. An owner that cannot be
        reached (before anything was answered) counts as a failed check (when checks run), and the request is
        served here."""
        replicas = self.replicas
        if body is None:
            body = await read_body(original, receive, replicas.router.settings.max_body_size)
        session = replicas.session()
        started = False
        task = asyncio.current_task()
        # a client that goes away cancels this task: leaving the request's block closes the owner's connection,
        # which aborts the generation there
        watcher = asyncio.create_task(cancel_on_disconnect(receive, task))
        try:
            try:
                async with session.request(original["method"], owner + _target(original), data=body,
                                           headers=_forward_headers(original, replicas.membership.self_url)) as resp:
                    headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in resp.headers.items()
                               if k.lower() not in RESPONSE_SKIP]
                    await send({"type": "http.response.start", "status": resp.status, "headers": headers})
                    started = True
                    replicas.proxied += 1
                    async for chunk in resp.content.iter_any():
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                if started:  # the owner failed mid-answer: the client's answer is cut (as a worker's would be)
                    log.warning("replica %s failed mid-answer: %s", owner, e)
                    return
                if replicas.membership.interval > 0:  # without checks nothing would bring it back
                    replicas.membership.record(owner, f"proxy: {type(e).__name__}: {e}")
                replicas.proxy_failures += 1
                log.warning("replica %s unreachable (%s): serving the request here", owner, e)
                await self.app(scope, _replay(body), send)
        except asyncio.CancelledError:  # the client went away
            uncancel = getattr(task, "uncancel", None)  # Python >= 3.11
            if task is not None and uncancel is not None:
                uncancel()
        finally:
            watcher.cancel()

    async def open_session(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """``POST /sessions`` in proxy / redirect mode: a session named by the client is opened on its owner
        (proxied, or 307); one the router names gets an id this replica owns, so its requests stay here."""
        replicas = self.replicas
        m = replicas.membership
        raw = await read_body(scope, receive, replicas.router.settings.max_body_size)
        try:
            req = orjson.loads(raw) if raw.strip() else {}
        except orjson.JSONDecodeError:
            req = None
        if isinstance(req, dict) and req.get("session_id") is None:
            for _ in range(1000):  # each draw is ours with probability 1/live replicas
                sid = uuid.uuid4().hex
                if m.owner(sid.encode()) == m.self_url:
                    break
            raw = orjson.dumps({**req, "session_id": sid})
        elif isinstance(req, dict) and isinstance(req["session_id"], str):
            owner = m.owner(req["session_id"].encode("utf-8", "surrogateescape"))
            if owner != m.self_url:
                if replicas.config.routing == "redirect":
                    await self.redirect(scope, send, owner, req["session_id"].encode("utf-8", "surrogateescape"))
                else:
                    await self.proxy(scope, scope, receive, send, owner, raw)
                return
        await self.app(_with_length(scope, len(raw)), _replay(raw), send)

    # --- admin calls on every replica --------------------------------------------------------------------

    async def fanout(self, original: dict[str, Any], scope: dict[str, Any], receive: Any, send: Any) -> None:
        replicas = self.replicas
        body = await read_body(original, receive, replicas.router.settings.max_body_size)
        membership = replicas.membership
        targets = membership.others()
        headers = _forward_headers(original, membership.self_url)
        target = _target(original)
        if scope["path"] in CONTROL:  # one stamp for every replica that applies it
            stamp = time.time_ns()
            headers[GENERATION_HEADER] = str(stamp)
            here = self.local_control(scope, body, stamp)
        else:
            here = self.local(scope, body)
        replies = await asyncio.gather(here,
                                       *(replicas.peer(url, original["method"], target, headers, body)
                                         for url in targets))
        out: dict[str, Any] = {}
        failed = []
        for url, (status, _, data) in zip([membership.self_url, *targets], replies):
            out[url] = {"status": status, "response": parsed(data)}
            if not 200 <= status < 300:
                failed.append(url)
        merged = {"success": not failed, "failed": failed, "replicas": out}
        await answer(send, 200 if not failed else 502, orjson.dumps(merged))

    async def local(self, scope: dict[str, Any], body: bytes) -> Reply:
        """The request served by this replica's app with ``body``, answer captured (no network)."""
        return await call_app(self.app, _with_length(scope, len(body)), body)

    async def local_control(self, scope: dict[str, Any], body: bytes, stamp: int | None) -> Reply:
        """A control-plane call (``CONTROL``) applied here: after a running state sync, stamped with its
        generation (``stamp``: the one of the replica that fanned it out; None: now)."""
        sync = self.replicas.sync
        if not sync.idle.is_set():
            sync.waiting += 1
            try:
                await sync.idle.wait()
            finally:
                sync.waiting -= 1
        sync.stamp(stamp)
        reply = await self.local(scope, body)
        sync.applied(scope["path"], body, reply[0])
        return reply

    async def control(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """A hop-marked control-plane call (a peer's fan-out): applied here, with the peer's stamp."""
        if not self._allowed(scope):  # refused before it counts as a change
            await deny(send, self.access.check(scope))  # type: ignore[union-attr]
            return
        try:
            body = await read_body(scope, receive, self.replicas.router.settings.max_body_size)
        except HTTPError as e:
            await answer(send, e.status, orjson.dumps(e.to_dict()))
            return
        stamp = None
        for k, v in scope["headers"]:
            if k == STAMP:
                try:
                    stamp = int(v)
                except ValueError:
                    stamp = None
        status, headers, data = await self.local_control(scope, body, stamp)
        await answer(send, status, data, headers)

    # --- sessions held by another replica --------------------------------------------------------------

    async def session_call(self, scope: dict[str, Any], receive: Any, send: Any, sid: str) -> None:
        replicas = self.replicas
        if not replicas.has_sessions() or replicas.holds_locally(sid):
            await self.app(scope, receive, send)
            return
        body = await read_body(scope, receive, replicas.router.settings.max_body_size)
        holder = await replicas.find_holder(sid, _auth(scope))
        if holder is None:  # nobody has it: the local route answers (a write-behind store, or 404)
            await self.app(scope, _replay(body), send)
            return
        status, headers, data = await replicas.peer(holder, scope["method"], _target(scope),
                                                    _forward_headers(scope, replicas.membership.self_url), body)
        await answer(send, status, data, headers)

    async def batch(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """``POST /retrieve_batch`` with ``sessions``: each session read where it is held, in the order asked."""
        replicas = self.replicas
        raw = await read_body(scope, receive, replicas.router.settings.max_body_size)
        try:
            req = orjson.loads(raw)
        except orjson.JSONDecodeError:
            req = None
        sids = req.get("sessions") if isinstance(req, dict) and replicas.has_sessions() else None
        if not isinstance(sids, list) or not all(isinstance(s, str) for s in sids):
            await self.app(scope, _replay(raw), send)  # texts, messages, or a bad body: the local route answers
            return
        missing = [s for s in dict.fromkeys(sids) if not replicas.holds_locally(s)]
        where = await replicas.find_holders(missing, _auth(scope)) if missing else {}
        if not where:
            await self.app(scope, _replay(raw), send)
            return
        columnar = req.get("format") == "columnar"
        groups: dict[str | None, list[str]] = {}
        for s in dict.fromkeys(sids):
            groups.setdefault(where.get(s), []).append(s)
        headers = _forward_headers(scope, replicas.membership.self_url)

        async def ask(url: str | None, group: list[str]) -> Reply:
            payload = orjson.dumps(dict(req, sessions=group))
            if url is None:
                return await self.local(scope, payload)
            return await replicas.peer(url, "POST", _target(scope), headers, payload)

        keys = list(groups)
        replies = await asyncio.gather(*(ask(k, groups[k]) for k in keys))
        for (status, hdrs, data) in replies:
            if status != 200:  # a refusal (bad format...) or a replica gone meanwhile: its answer, as it is
                await answer(send, status, data, hdrs)
                return
        try:
            items = {k: (_columnar_items(r[2]) if columnar else _jsonl_items(r[2])) for k, r in zip(keys, replies)}
        except ValueError as e:
            raise HTTPError(502, f"A replica answered /retrieve_batch with an unusable payload: {e}") from None
        # every asked session's item, in the order asked (a session asked twice is read once, placed twice)
        queues: dict[str, list[Any]] = {}
        for k in keys:
            for sid, item in zip(groups[k], items[k]):
                queues.setdefault(sid, []).append(item)
        ordered = [queues[s][0] for s in sids]
        if columnar:
            await answer(send, 200, _columnar(ordered), [(b"content-type", b"application/vnd.slime-router.columnar")])
        else:
            await answer(send, 200, b"".join(orjson.dumps(i[0]) + b"\n" for i in ordered),
                         [(b"content-type", b"application/x-ndjson")])


# --- helpers ----------------------------------------------------------------------------------------------


def _with_length(scope: dict[str, Any], n: int) -> dict[str, Any]:
    """``scope`` for a body of ``n`` bytes."""
    headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
    return dict(scope, headers=[*headers, (b"content-length", str(n).encode())])


def _auth(scope: dict[str, Any]) -> dict[str, str]:
    """The caller's credentials, for the requests a replica makes on its behalf."""
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"}


def _replay(body: bytes) -> Any:
    """An ASGI ``receive`` that gives ``body`` once, then waits (for ever: until the app stops listening)."""
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()
        return {"type": "http.disconnect"}  # pragma: no cover

    return receive


async def call_app(app: Any, scope: dict[str, Any], body: bytes) -> Reply:
    """Serve ``scope`` with ``body`` by ``app`` and capture the answer."""
    status = 500
    headers: list[tuple[bytes, bytes]] = []
    chunks: list[bytes] = []

    async def send(message: dict[str, Any]) -> None:
        nonlocal status, headers
        if message["type"] == "http.response.start":
            status = message["status"]
            headers = [(k, v) for k, v in message.get("headers", ()) if k != b"content-length"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, _replay(body), send)
    return status, headers, b"".join(chunks)


def _jsonl_items(data: bytes) -> list[tuple[dict[str, Any], None]]:
    return [(orjson.loads(line), None) for line in data.splitlines() if line.strip()]


def _columnar_items(data: bytes) -> list[tuple[dict[str, Any], tuple[bytes | memoryview, ...]]]:
    """The items of a columnar payload (``slime_router_plugins/sessions/columnar.py``'s layout), each with its
    own slices of the three arrays (offsets made relative to the item)."""
    header, ids, lps, mask = columnar.split(data)
    out: list[tuple[dict[str, Any], tuple[bytes | memoryview, ...]]] = []
    for item in header["items"]:
        trajs = item.get("trajectories") or []
        if not trajs:
            out.append((item, (b"", b"", b"")))
            continue
        first = min(t["offset"] for t in trajs)
        last = max(t["offset"] + t["token_length"] for t in trajs)
        for t in trajs:
            t["offset"] -= first
        out.append((item, (ids[4 * first:4 * last], lps[4 * first:4 * last], mask[first:last])))
    return out


def _columnar(items: list[tuple[dict[str, Any], Any]]) -> bytes:
    """One columnar payload from items read from several payloads (``_columnar_items``), in this order."""
    header_items, ids, lps, mask = [], [], [], []
    offset = 0
    for item, arrays in items:
        item = orjson.loads(orjson.dumps(item))  # a session asked twice is placed twice: each its own offsets
        for t in item.get("trajectories") or []:
            t["offset"] += offset
        header_items.append(item)
        if arrays is not None:
            ids.append(arrays[0])
            lps.append(arrays[1])
            mask.append(arrays[2])
            offset += len(arrays[2])
    return columnar.join({"total_tokens": offset, "items": header_items}, b"".join(ids), b"".join(lps),
                         b"".join(mask))
