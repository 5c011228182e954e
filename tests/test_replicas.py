"""The replicas plugin: several in-process routers ("replicas") on real sockets over shared mock workers.

Ownership (rendezvous hashing over the live replicas) agrees everywhere; proxy / redirect routing serve a session's
turns on its owner, exactly (checked against the mock worker's records); the hop header stops loops; a dead replica
leaves the live set and only its sessions move; admin calls reach every replica (a dead one is reported); a replica
that (re)joins takes the newest control-plane state of its peers without an admin call; abort by session; metrics
summed; trajectories read from any replica. Every wait is a poll for an event.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from slime_router_core import PluginLoadError, Settings
from slime_router_core.app import SlimeRouterApp
from slime_router_core.tokenizers import BUILTIN_CHECKPOINT
from slime_router_plugins.replicas.membership import rendezvous_owner
from slime_router_plugins.sessions import columnar
from slime_router_testing import ServerThread, free_port, start_router
from slime_router_testing.mock_worker import MockWorkerConfig, create_mock_vllm_worker_app, create_mock_worker_app

PLUGINS = ["radix_tree", "openai_compat", "sessions", "balancing", "metrics", "replicas"]
TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
HOP = "X-Slime-Replica-Hop"


@pytest.fixture(scope="module")
def worker() -> Iterator[str]:
    w = ServerThread(create_mock_worker_app(MockWorkerConfig(hf_checkpoint=BUILTIN_CHECKPOINT,
                                                             max_random_tokens=12))).start()
    yield w.url
    w.stop()


@pytest.fixture
def replicas(worker: str, servers_to_stop: list[Any]) -> Callable[..., list[ServerThread]]:
    """Factory: ``replicas(n, routing=..., workers=[...], peers=True, interval=0, **extra settings)`` -> n started
    replicas that know each other (``peers=False``: each knows only itself). ``interval`` is
    --replica-check-interval: 0 (no checks, every peer stays live) unless a test is about liveness."""
    httpx.delete(worker + "/mock/records")

    def make(n: int, routing: str = "lb", workers: list[str] | None = None, peers: bool = True,
             interval: float = 0, **extra: Any) -> list[ServerThread]:
        ports = [free_port() for _ in range(n)]
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        out = []
        for port in ports:
            r = start_replica(port, urls if peers else [], workers or [worker], routing=routing, interval=interval,
                              **extra)
            servers_to_stop.append(r)
            out.append(r)
        if peers:  # a replica that checked a peer not started yet left it out for a moment: wait for agreement
            for r in out:
                wait_until(lambda r=r: httpx.get(r.url + "/replicas").json()["live"] == sorted(urls),
                           f"{r.url} to see every replica live")
        return out

    return make


def start_replica(port: int, peers: list[str], workers: list[str], routing: str = "lb", interval: float = 0,
                  plugins: list[str] = PLUGINS, **extra: Any) -> ServerThread:
    """One replica on ``port`` (``--replica-url http://127.0.0.1:port``, ``--replica-peers`` = ``peers``, the
    command line's ``--worker-url``s = ``workers``), started (the caller stops it)."""
    keys = {k: extra.pop(k) for k in ("api_key", "admin_api_key") if k in extra}
    settings = Settings(hf_checkpoint=BUILTIN_CHECKPOINT, worker_urls=list(workers), **keys,
                        extra={"replica_url": f"http://127.0.0.1:{port}", "replica_routing": routing,
                               "replica_check_interval": interval,
                               **({"replica_peers": ",".join(peers)} if peers else {}), **extra})
    return start_router(plugins=plugins, port=port, settings=settings)


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = condition()
        if got:
            return got
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def owner(r: ServerThread, sid: str) -> str:
    got = httpx.get(r.url + "/replicas", params={"session": sid})
    assert got.status_code == 200, got.text
    return got.json()["owner"]


def owned_by(r: ServerThread, target: ServerThread, prefix: str) -> str:
    """A session id ``r`` says ``target`` owns."""
    return next(s for s in (f"{prefix}-{i}" for i in range(200)) if owner(r, s) == target.url)


def local_session(r: ServerThread, sid: str) -> httpx.Response:
    """The replica's own answer for the session (the hop header: no lookup elsewhere)."""
    return httpx.get(f"{r.url}/sessions/{sid}", headers={HOP: "test"})


def records(worker: str) -> list[dict]:
    return httpx.get(worker + "/mock/records").json()


def truth(recs: list[dict]) -> tuple[list[int], list[int]]:
    """The last record's prompt + output, and the mask: every record's output 1."""
    seq = recs[-1]["input_ids"] + recs[-1]["output_ids"]
    mask = [0] * len(seq)
    for rec in recs:
        a = len(rec["input_ids"])
        assert seq[:a + len(rec["output_ids"])] == rec["input_ids"] + rec["output_ids"]
        mask[a:a + len(rec["output_ids"])] = [1] * len(rec["output_ids"])
    return seq, mask


def turn(url: str, path: str, text: str, headers: dict | None = None, stream: bool = False,
         follow: bool = False) -> str:
    body = {"text": text, "sampling_params": {"max_new_tokens": 16}, "stream": stream}
    if not stream:
        r = httpx.post(url + path, json=body, headers=headers, timeout=30, follow_redirects=follow)
        assert r.status_code == 200, r.text
        return r.json()["text"]
    out, done = "", False
    with httpx.stream("POST", url + path, json=body, headers=headers, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data:"):
                if line[5:].strip() == "[DONE]":
                    done = True
                else:
                    out = orjson.loads(line[5:])["text"]  # cumulative text
    assert done
    return out


def conversation(url: str, sid: str, turns: int = 1, scoped: bool = False, stream: bool = False) -> str:
    text = TEMPLATE.format(f"Session {sid}: hello")
    for t in range(turns):
        if t:
            text += "<|im_end|>\n" + TEMPLATE.format(f"and turn {t}")
        if scoped:
            text += turn(url, f"/sessions/{sid}/generate", text, stream=stream)
        else:
            text += turn(url, "/generate", text, {"X-Session-ID": sid}, stream=stream)
    return text


# --- ownership -----------------------------------------------------------------------------------------------


def test_every_replica_computes_the_same_owner_and_each_owns_some(replicas):
    rs = replicas(3, interval=0.05)  # checking each other: they still agree
    sids = [f"ep-{i}" for i in range(48)]
    owners = [[owner(r, s) for s in sids] for r in rs]
    assert owners[0] == owners[1] == owners[2]
    assert set(owners[0]) == {r.url for r in rs}
    assert owners[0] == [rendezvous_owner(s.encode(), [r.url for r in rs]) for s in sids]
    view = httpx.get(rs[0].url + "/replicas").json()
    assert view["self"] == rs[0].url and view["routing"] == "lb"
    assert view["peers"] == view["live"] == sorted(r.url for r in rs)


def test_without_its_flags_the_plugin_is_not_there(worker, router):
    r = router(plugins=PLUGINS, settings=Settings(hf_checkpoint=BUILTIN_CHECKPOINT, worker_urls=[worker]))
    assert type(r.app) is SlimeRouterApp  # the app as served without the plugin: nothing per request
    assert not r.app.router.plugins.pm.is_registered(sys.modules["slime_router_plugins.replicas.plugin"])
    assert httpx.get(r.url + "/replicas").status_code == 404
    with pytest.raises(PluginLoadError, match="--replica-peers needs --replica-url"):
        router(plugins=PLUGINS, settings=Settings(hf_checkpoint=BUILTIN_CHECKPOINT,
                                                  extra={"replica_peers": "http://127.0.0.1:1"}))


def test_peers_set_at_run_time_by_a_launcher(replicas):
    rs = replicas(3, peers=False)
    assert httpx.get(rs[1].url + "/replicas").json()["peers"] == [rs[1].url]
    for r in rs:  # the launcher tells each replica (not fanned out: each answers for itself)
        got = httpx.put(r.url + "/replicas/peers", json={"peers": [x.url + "/" for x in rs]})
        assert got.status_code == 200, got.text
        assert got.json()["peers"] == got.json()["live"] == sorted(x.url for x in rs)
    sids = [f"set-{i}" for i in range(16)]
    assert len({tuple(owner(r, s) for s in sids) for r in rs}) == 1
    bad = httpx.put(rs[0].url + "/replicas/peers", json={"peers": ["ftp://nowhere"]})
    assert bad.status_code == 400 and "scheme" in bad.json()["error"]["message"]
    assert httpx.get(rs[0].url + "/replicas").json()["peers"] == sorted(x.url for x in rs)  # unchanged


# --- routing -------------------------------------------------------------------------------------------------


def test_proxy_mode_serves_a_sessions_turns_exactly_on_its_owner(replicas, worker):
    rs = replicas(2, routing="proxy")
    near, far = rs
    sid = owned_by(near, far, "px")
    text = TEMPLATE.format("Proxy me")
    text += turn(near.url, "/generate", text, {"X-Session-ID": sid})                            # header
    text += "<|im_end|>\n" + TEMPLATE.format("again")
    text += turn(near.url, f"/sessions/{sid}/generate", text)                                    # base URL
    text += "<|im_end|>\n" + TEMPLATE.format("and streamed")
    text += turn(near.url, "/generate", text, {"X-Session-ID": sid}, stream=True)                # stream
    assert local_session(near, sid).status_code == 404  # nothing of it here
    held = local_session(far, sid)
    assert held.status_code == 200
    s = held.json()
    assert s["requests"] == 3 and s["gaps"] == []
    (traj,) = s["trajectories"]
    seq, mask = truth(records(worker))
    assert traj["tokens"] == seq and traj["loss_mask"] == mask and len(traj["turns"]) == 3
    assert httpx.get(f"{near.url}/sessions/{sid}").json() == s  # read through the non-owner: the owner's answer
    assert httpx.get(near.url + "/replicas").json()["proxied"] == 3
    # a session the near replica owns, and a request without a session, are served where they land
    mine = owned_by(near, near, "px-mine")
    conversation(near.url, mine)
    assert local_session(near, mine).status_code == 200
    turn(near.url, "/generate", TEMPLATE.format("no session"))
    assert httpx.get(near.url + "/replicas").json()["proxied"] == 3


def test_proxy_mode_opens_a_session_on_its_owner(replicas):
    near, far = replicas(2, routing="proxy")
    sid = owned_by(near, far, "open")
    opened = httpx.post(near.url + "/sessions", json={"session_id": sid, "metadata": {"episode": 7}})
    assert opened.status_code == 201, opened.text
    conversation(near.url, sid)
    assert local_session(near, sid).status_code == 404
    held = local_session(far, sid).json()
    assert held["metadata"] == {"episode": 7} and held["requests"] == 1
    named = httpx.post(near.url + "/sessions", json={"metadata": {"episode": 8}})  # the router names it
    assert named.status_code == 201 and owner(far, named.json()["session_id"]) == near.url
    assert local_session(near, named.json()["session_id"]).json()["metadata"] == {"episode": 8}


def test_redirect_mode_answers_307_at_the_owner(replicas):
    near, far = replicas(2, routing="redirect")
    sid = owned_by(near, far, "rd")
    body = {"text": TEMPLATE.format("Redirect me"), "sampling_params": {"max_new_tokens": 8}}
    r = httpx.post(f"{near.url}/sessions/{sid}/generate?x=1", json=body)
    assert r.status_code == 307 and r.headers["location"] == f"{far.url}/sessions/{sid}/generate?x=1"
    assert r.json()["error"]["code"] == "session_elsewhere"
    followed = httpx.post(near.url + "/generate", json=body, headers={"X-Session-ID": sid}, follow_redirects=True)
    assert followed.status_code == 200 and str(followed.url).startswith(far.url)
    assert local_session(far, sid).json()["requests"] == 1 and local_session(near, sid).status_code == 404


def test_the_hop_header_serves_locally_so_disagreeing_replicas_do_not_loop(replicas):
    a, b = replicas(2, routing="proxy", peers=False)
    b_alias_of_a = a.url.replace("127.0.0.1", "localhost")  # the same replica under another name: hashes apart
    assert httpx.put(a.url + "/replicas/peers", json={"peers": [b.url]}, headers={HOP: "t"}).status_code == 200
    assert httpx.put(b.url + "/replicas/peers", json={"peers": [b_alias_of_a]}, headers={HOP: "t"}).status_code == 200
    # a session A says B owns and B says A (under its alias) owns: without the hop header it would bounce for ever
    sid = next(s for s in (f"loop-{i}" for i in range(400))
               if owner(a, s) == b.url and owner(b, s) == b_alias_of_a)
    conversation(a.url, sid)
    assert local_session(b, sid).json()["requests"] == 1 and local_session(a, sid).status_code == 404
    # a hop-marked request is served where it lands, owner or not
    turn(a.url, "/generate", TEMPLATE.format("hop"), {"X-Session-ID": sid, HOP: "elsewhere"})
    assert local_session(a, sid).json()["requests"] == 1


def test_a_dead_replica_leaves_the_live_set_and_only_its_sessions_move(replicas):
    rs = replicas(3, routing="proxy", interval=0.05)
    a, b, dead = rs
    sids = [f"mv-{i}" for i in range(48)]
    before = {s: owner(a, s) for s in sids}
    assert dead.url in before.values()
    dead.stop()
    for r in (a, b):
        wait_until(lambda r=r: httpx.get(r.url + "/replicas").json()["live"] == sorted([a.url, b.url]),
                   f"{r.url} to drop the dead replica")
    after = {s: owner(a, s) for s in sids}
    assert after == {s: owner(b, s) for s in sids}
    moved = [s for s in sids if before[s] == dead.url]
    assert moved and all(after[s] == before[s] for s in sids if s not in moved)
    assert all(after[s] == rendezvous_owner(s.encode(), [a.url, b.url]) for s in moved)
    # a moved session's turn, sent to the replica that is not its successor, is served by the successor
    sid = next(s for s in moved if after[s] == b.url)
    conversation(a.url, sid)
    assert local_session(b, sid).json()["requests"] == 1


def test_an_unreachable_owner_counts_as_a_failed_check_and_the_request_is_served_here(replicas):
    near, far = replicas(2, routing="proxy", interval=3600)  # no check before the test ends: the requests notice
    sid = owned_by(near, far, "gone")
    far.stop()
    for i in range(3):
        turn(near.url, "/generate", TEMPLATE.format(f"turn {i}"), {"X-Session-ID": sid})
        view = httpx.get(near.url + "/replicas").json()
        assert view["proxy_failures"] == min(i + 1, 2)  # the 3rd: far left the live set, near owns it now
    assert view["live"] == [near.url] and owner(near, sid) == near.url
    assert local_session(near, sid).json()["requests"] == 3


def test_a_client_leaving_a_proxied_stream_aborts_the_generation_on_the_worker(replicas, mock_worker):
    slow = mock_worker(token_latency=0.05, min_random_tokens=400, max_random_tokens=400, stop_at_eos=0)
    near, far = replicas(2, routing="proxy", workers=[slow.url])
    sid = owned_by(near, far, "leave")
    body = {"text": TEMPLATE.format("long"), "sampling_params": {"max_new_tokens": 400}, "stream": True}
    with httpx.stream("POST", near.url + "/generate", json=body, headers={"X-Session-ID": sid}, timeout=30) as r:
        assert r.status_code == 200
        next(line for line in r.iter_lines() if line.startswith("data:"))  # streaming through the near replica
    recs = wait_until(lambda: [x for x in records(slow.url) if x.get("aborted")], "the worker to abort it")
    assert len(recs) == 1 and len(recs[0]["output_ids"]) < 400


# --- the control plane -------------------------------------------------------------------------------------


def test_admin_calls_reach_every_replica_and_a_dead_one_is_reported(replicas, mock_worker, worker):
    rs = replicas(3)
    w2 = mock_worker()
    got = httpx.post(rs[0].url + "/add_worker", params={"url": w2.url})
    assert got.status_code == 200, got.text
    assert got.json()["success"] and set(got.json()["replicas"]) == {r.url for r in rs}
    for r in rs:
        assert w2.url in httpx.get(r.url + "/list_workers").json()["urls"]
    assert httpx.post(rs[1].url + "/pause", json={"wait": False}).status_code == 200
    assert all(httpx.get(r.url + "/workers/state").json()["paused"] for r in rs)
    assert httpx.post(rs[2].url + "/resume").status_code == 200
    assert not any(httpx.get(r.url + "/workers/state").json()["paused"] for r in rs)
    got = httpx.post(rs[0].url + "/update_weight_version", json={"new_version": "7"})
    assert got.status_code == 200 and got.json()["success"]
    assert {httpx.get(u + "/get_model_info").json()["weight_version"] for u in (worker, w2.url)} == {"7"}
    got = httpx.post(rs[0].url + "/remove_worker", json={"url": w2.url})
    assert got.status_code == 200 and all(w2.url not in httpx.get(r.url + "/list_workers").json()["urls"]
                                          for r in rs)
    # not fanned out: the workers are shared, the replica asked sends it once
    flushed = httpx.post(rs[0].url + "/flush_cache")
    assert flushed.status_code == 200 and "replicas" not in flushed.json()
    rs[2].stop()
    got = httpx.post(rs[0].url + "/resume")
    assert got.status_code == 502
    answer = got.json()
    assert answer["success"] is False and answer["failed"] == [rs[2].url]
    assert answer["replicas"][rs[2].url]["status"] == 502 and answer["replicas"][rs[1].url]["status"] == 200


def test_admin_fan_out_passes_the_callers_key(replicas):
    rs = replicas(2, admin_api_key="admin-key-1")
    refused = httpx.post(rs[0].url + "/resume")
    assert refused.status_code == 401 and "replicas" not in refused.json()
    got = httpx.post(rs[0].url + "/resume", headers={"Authorization": "Bearer admin-key-1"})
    assert got.status_code == 200 and got.json()["success"] and len(got.json()["replicas"]) == 2


# --- state reconciliation on (re)join ------------------------------------------------------------------------


def settled(rs: list[ServerThread]) -> None:
    """Wait for each replica's state sync to have read every peer (a start-up sync that found a peer not started
    yet is repeated), so that what follows starts the syncs a test is about."""
    for r in rs:
        wait_until(lambda r=r: (httpx.get(r.url + "/replicas").json()["last_sync"] or {}).get("failed") == {},
                   f"{r.url}'s start-up sync")


def port_of(r: ServerThread) -> int:
    return int(r.url.rsplit(":", 1)[1])


def worker_urls(r: ServerThread) -> list[str]:
    return sorted(httpx.get(r.url + "/list_workers").json()["urls"])


def test_a_new_replica_takes_the_peers_state_without_an_admin_call(replicas, mock_worker, worker, servers_to_stop):
    key = {"Authorization": "Bearer admin-key-2"}
    a, b = replicas(2, admin_api_key="admin-key-2")
    w2 = mock_worker()
    assert httpx.get(a.url + "/replicas/state").status_code == 401  # an admin route
    assert httpx.post(a.url + "/add_worker", params={"url": w2.url}, headers=key).status_code == 200
    assert httpx.post(b.url + "/pause", json={"wait": False, "mode": "reject"}, headers=key).status_code == 200
    assert httpx.post(a.url + "/update_weight_version", json={"new_version": "9"}, headers=key).status_code == 200
    sa, sb = (httpx.get(r.url + "/replicas/state", headers=key).json() for r in (a, b))
    assert sa["generation"] == sb["generation"] > 0  # one stamp for every replica that applied the call
    assert sa["paused"] and sa["drain_mode"] == "reject" and sa["weight_version"] == "9"
    assert sorted(w["url"] for w in sa["workers"]) == sorted([worker, w2.url])
    # a new replica with the same peers and only the original --worker-url: no admin call is sent to it
    port = free_port()
    c = start_replica(port, [a.url, b.url, f"http://127.0.0.1:{port}"], [worker], admin_api_key="admin-key-2")
    servers_to_stop.append(c)
    wait_until(lambda: w2.url in worker_urls(c), "the new replica to add the worker added at run time")
    view = httpx.get(c.url + "/replicas").json()
    sync = view["last_sync"]
    assert sync["outcome"] == "applied" and sync["reason"] == "start-up" and sync["peer"] in (a.url, b.url)
    assert sync["changes"]["added_workers"] == [w2.url] and sync["changes"]["paused"] == "reject"
    assert sync["changes"]["weight_version"] == "9" and view["generation"] == sa["generation"]
    sc = httpx.get(c.url + "/replicas/state", headers=key).json()
    assert sc["paused"] and sc["drain_mode"] == "reject" and sc["weight_version"] == "9"
    assert sorted(w["url"] for w in sc["workers"]) == sorted([worker, w2.url])
    body = {"text": TEMPLATE.format("paused?"), "sampling_params": {"max_new_tokens": 4}}
    assert httpx.post(c.url + "/generate", json=body).status_code == 503  # paused in reject mode, as its peers
    got = httpx.post(c.url + "/resume", headers=key)  # one call: every replica resumed
    assert got.status_code == 200 and set(got.json()["replicas"]) == {a.url, b.url, c.url}
    assert not any(httpx.get(r.url + "/workers/state").json()["paused"] for r in (a, b, c))
    assert httpx.post(c.url + "/generate", json=body).status_code == 200
    # a replica started with no peer keeps its own state; the peers a launcher then sets are read at once
    port = free_port()
    d = start_replica(port, [], [worker], admin_api_key="admin-key-2")
    servers_to_stop.append(d)
    assert wait_until(lambda: httpx.get(d.url + "/replicas").json()["last_sync"], "d's start-up sync")[
        "outcome"] == "no live peer"
    assert worker_urls(d) == [worker]
    got = httpx.put(d.url + "/replicas/peers", json={"peers": [a.url, b.url, c.url]}, headers=key)
    assert got.status_code == 200
    wait_until(lambda: worker_urls(d) == sorted([worker, w2.url]), "d to take its new peers' state")
    sd = httpx.get(d.url + "/replicas/state", headers=key).json()
    assert not sd["paused"] and sd["weight_version"] == "9"
    assert sd["generation"] == httpx.get(a.url + "/replicas/state", headers=key).json()["generation"]  # /resume's
    assert "peer" in httpx.get(d.url + "/replicas").json()["last_sync"]["reason"]


def test_a_restarted_replica_catches_up_with_the_calls_it_missed(replicas, mock_worker, worker, servers_to_stop):
    a, b = replicas(2, interval=0.05)
    settled([a, b])
    w2 = mock_worker()
    b.stop()
    wait_until(lambda: httpx.get(a.url + "/replicas").json()["live"] == [a.url], "a to drop b")
    got = httpx.post(a.url + "/add_worker", params={"url": w2.url})
    assert got.status_code == 502 and got.json()["failed"] == [b.url]  # b missed it
    back = start_replica(port_of(b), [a.url, b.url], [worker], interval=0.05)  # same URL, same command line
    servers_to_stop.append(back)
    wait_until(lambda: worker_urls(back) == sorted([worker, w2.url]), "the restarted replica to catch up")
    sync = httpx.get(back.url + "/replicas").json()["last_sync"]
    assert sync["outcome"] == "applied" and sync["peer"] == a.url and sync["changes"] == {"added_workers": [w2.url]}
    # a saw b come back and read its state too: not newer than its own, so a kept it
    def a_synced() -> bool:
        sync = httpx.get(a.url + "/replicas").json()["last_sync"] or {}
        return f"peer {b.url} live" in (sync.get("reason") or "") and sync["outcome"] == "up to date"

    wait_until(a_synced, "a to sync when b returned")
    assert worker_urls(a) == sorted([worker, w2.url])
    # the peers' list wins, command-line workers included: removed while b was down, removed on b's return
    back.stop()
    wait_until(lambda: httpx.get(a.url + "/replicas").json()["live"] == [a.url], "a to drop b again")
    assert httpx.post(a.url + "/remove_worker", json={"url": worker}).status_code == 502
    again = start_replica(port_of(b), [a.url, b.url], [worker], interval=0.05)
    servers_to_stop.append(again)
    wait_until(lambda: worker_urls(again) == [w2.url], "the restarted replica to drop the removed worker")


def test_a_live_replica_that_missed_a_call_catches_up_when_a_peer_returns(replicas, mock_worker, worker,
                                                                           servers_to_stop):
    a, b, c = replicas(3, interval=0.05)
    settled([a, b, c])
    w2 = mock_worker()
    for r in (a, c):  # applied on a and c only: as if b had been cut off while the call was fanned out
        got = httpx.post(r.url + "/add_worker", params={"url": w2.url}, headers={HOP: "test"})
        assert got.status_code == 200 and "replicas" not in got.json()
    assert worker_urls(b) == [worker]
    c.stop()
    wait_until(lambda: c.url not in httpx.get(b.url + "/replicas").json()["live"], "b to drop c")
    back = start_replica(port_of(c), [a.url, b.url, c.url], [worker], interval=0.05)
    servers_to_stop.append(back)
    wait_until(lambda: worker_urls(b) == sorted([worker, w2.url]), "b to catch up when c returned")
    sync = httpx.get(b.url + "/replicas").json()["last_sync"]
    assert f"peer {c.url} live" in sync["reason"] and sync["outcome"] == "applied"
    assert sync["changes"] == {"added_workers": [w2.url]}
    assert worker_urls(back) == sorted([worker, w2.url])


def test_a_new_replica_takes_the_weight_version_its_peers_track_for_a_vllm_worker(servers_to_stop):
    w = ServerThread(create_mock_vllm_worker_app(MockWorkerConfig(hf_checkpoint=BUILTIN_CHECKPOINT))).start()
    servers_to_stop.append(w)
    ports = [free_port() for _ in range(3)]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    plugins = [*PLUGINS, "vllm"]
    for port in ports[:2]:
        servers_to_stop.append(start_replica(port, urls[:2], [w.url + "#engine=vllm"], plugins=plugins))
    assert httpx.post(urls[0] + "/update_weight_version", json={"new_version": "5"}).json()["success"]
    state = httpx.get(urls[1] + "/replicas/state").json()
    assert state["weight_version"] == "5" and state["workers"] == [{"url": w.url, "engine": "vllm",
                                                                      "weight_version": "5"}]
    # the worker reports another version when the new replica reads it: the version the peers stamp on their
    # replies is the one it takes (no call to the worker)
    assert httpx.post(w.url + "/mock/configure", json={"weight_version": "default"}).status_code == 200
    c = start_replica(ports[2], urls, [w.url + "#engine=vllm"], plugins=plugins)
    servers_to_stop.append(c)
    sync = wait_until(lambda: httpx.get(c.url + "/replicas").json()["last_sync"], "the new replica's sync")
    assert sync["changes"] == {"weight_version": "5", "worker_versions": {w.url: "5"}}
    assert httpx.get(c.url + "/replicas/state").json()["workers"][0]["weight_version"] == "5"
    body = {"text": TEMPLATE.format("version?"), "sampling_params": {"max_new_tokens": 4}}
    assert httpx.post(c.url + "/generate", json=body).json()["meta_info"]["weight_version"] == "5"


def test_a_control_call_that_arrives_during_a_sync_is_applied_after_it(worker, servers_to_stop):
    release = threading.Event()
    asked = threading.Event()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # a peer whose state is newer (its clock ahead) and answered only when the test says so
    state = {"replica": "", "generation": time.time_ns() + 3600 * 10**9, "workers": [{"url": worker}],
             "paused": True, "drain_mode": "wait", "weight_version": None}

    async def replica_state(request: Any) -> JSONResponse:
        asked.set()
        while not release.is_set():
            await asyncio.sleep(0.01)
        return JSONResponse(state)

    async def health(request: Any) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    peer = ServerThread(Starlette(routes=[Route("/replicas/state", replica_state),
                                          Route("/health", health)])).start()
    servers_to_stop.append(peer)
    state["replica"] = peer.url
    r = start_replica(port, [url, peer.url], [worker])
    servers_to_stop.append(r)
    wait_until(asked.is_set, "the start-up sync to ask the peer")
    answers: list[httpx.Response] = []
    call = threading.Thread(target=lambda: answers.append(
        httpx.post(url + "/resume", headers={HOP: peer.url}, timeout=30)))  # the peer's fan-out reaching r
    call.start()
    wait_until(lambda: httpx.get(url + "/replicas").json()["calls_waiting_for_sync"] == 1, "the call to wait")
    release.set()
    call.join(30)
    assert answers[0].status_code == 200
    sync = httpx.get(url + "/replicas").json()["last_sync"]
    assert sync["outcome"] == "applied" and sync["changes"] == {"paused": "wait"}
    assert not httpx.get(url + "/workers/state").json()["paused"]  # the call came after: not undone
    assert httpx.get(url + "/replicas").json()["generation"] > state["generation"]


def test_abort_by_session_reaches_the_replica_running_it(replicas, mock_worker):
    slow = mock_worker(token_latency=0.05, min_random_tokens=400, max_random_tokens=400, stop_at_eos=0)
    a, b = replicas(2, workers=[slow.url])
    sid = "abort-me"
    finish: list[Any] = []

    def run() -> None:
        body = {"text": TEMPLATE.format("long"), "sampling_params": {"max_new_tokens": 400}, "stream": True}
        with httpx.stream("POST", b.url + "/generate", json=body, headers={"X-Session-ID": sid}, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data:") and line[5:].strip() != "[DONE]":
                    finish[:] = [orjson.loads(line[5:])["meta_info"]["finish_reason"]]

    t = threading.Thread(target=run)
    t.start()
    wait_until(lambda: httpx.get(b.url + "/replicas").json()["in_flight_sessions"] == 1, "the request in flight")
    wait_until(lambda: finish, "the first chunk")
    got = httpx.post(a.url + "/abort_session", json={"session_id": sid})
    assert got.status_code == 200, got.text
    per = got.json()["replicas"]
    assert per[b.url]["response"]["aborted"] == 1 and per[a.url]["response"]["aborted"] == 0
    t.join(30)
    assert finish[0]["type"] == "abort"
    wait_until(lambda: httpx.get(b.url + "/replicas").json()["in_flight_sessions"] == 0, "the request to end")
    assert httpx.post(a.url + "/sessions/abort-me/abort_session").json()["success"]  # the base-URL form


def test_metrics_of_every_replica_summed(replicas):
    a, b = replicas(2)
    for r, n in ((a, 2), (b, 3)):
        for i in range(n):
            turn(r.url, "/generate", TEMPLATE.format(f"metrics {i}"))
    got = httpx.get(a.url + "/replicas/metrics")
    assert got.status_code == 200
    m = got.json()
    assert m["replicas"] == 2 and set(m["snapshots"]) == {a.url, b.url} and m["failed"] == {}
    totals = [s["requests"]["total"] for s in m["snapshots"].values()]
    assert m["sum"]["requests"]["total"] == sum(totals) >= 5
    assert m["sum"]["requests"]["completion_tokens"] == sum(s["requests"]["completion_tokens"]
                                                            for s in m["snapshots"].values())
    assert m["sum"]["uptime_s"] == max(s["uptime_s"] for s in m["snapshots"].values())  # not a counter


# --- trajectories from any replica -----------------------------------------------------------------------


def test_a_session_is_read_finished_and_batched_from_a_replica_that_does_not_hold_it(replicas):
    a, b, c = replicas(3)  # lb: each session stays where its requests landed
    conversation(b.url, "held-b", turns=2)
    conversation(c.url, "held-c")
    conversation(a.url, "held-a")
    assert local_session(a, "held-b").status_code == 404
    got = httpx.get(a.url + "/sessions/held-b")
    assert got.status_code == 200 and got.json() == local_session(b, "held-b").json()
    assert got.json()["requests"] == 2
    patched = httpx.patch(a.url + "/sessions/held-b", json={"metadata": {"reward": 1.5}})
    assert patched.status_code == 200 and local_session(b, "held-b").json()["metadata"] == {"reward": 1.5}
    asked = ["held-c", "held-a", "nobody", "held-b"]
    lines = httpx.post(a.url + "/retrieve_batch", json={"sessions": asked}).text.splitlines()
    items = [orjson.loads(x) for x in lines]
    assert [i["session_id"] for i in items] == asked
    assert items[2]["error"]["status"] == 404
    for i, r in ((0, c), (1, a), (3, b)):
        assert items[i] == local_session(r, asked[i]).json()
    payload = httpx.post(a.url + "/retrieve_batch", json={"sessions": asked, "format": "columnar"}).content
    decoded = columnar.decode(payload)
    for i in (0, 1, 3):
        assert [t["tokens"] for t in decoded[i]["trajectories"]] == [t["tokens"] for t in items[i]["trajectories"]]
        assert [t["loss_mask"] for t in decoded[i]["trajectories"]] == \
            [t["loss_mask"] for t in items[i]["trajectories"]]
    finished = httpx.delete(a.url + "/sessions/held-b")
    assert finished.status_code == 200 and finished.json()["requests"] == 2
    assert local_session(b, "held-b").status_code == 409
    assert httpx.get(a.url + "/sessions/nobody").status_code == 404  # nobody has it: the local answer
