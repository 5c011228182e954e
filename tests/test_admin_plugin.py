"""The core's own API is the built-in plugin ``core`` (slime_router_core.admin), registered through the same hooks
as every plugin: always loaded, first, never blockable; its worker endpoints step aside for a plugin's own."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest
from fastapi import FastAPI

from slime_router_core import PluginLoadError, Settings, hookimpl
from slime_router_core import admin as core_plugin
from slime_router_core.app import build_app
from slime_router_core.plugins import load_plugins
from slime_router_core.workers import Worker

ADMIN_ROUTES = {("GET", "/health"), ("POST", "/add_worker"), ("POST", "/remove_worker"), ("GET", "/list_workers"),
                ("GET", "/plugins"), ("POST", "/generate")}
WORKER_ROUTES = {(m, p) for p, m in {**core_plugin.FORWARD_TO_ONE, **core_plugin.BROADCAST}.items()}


def _routes(app) -> list[tuple[str, str, object]]:
    return [(m, r.path, r.endpoint) for r in app.fastapi.routes if hasattr(r, "methods")
            for m in r.methods if m != "HEAD"]


def _owner(app, method: str, path: str) -> str:
    endpoints = [e for m, p, e in _routes(app) if (m, p) == (method, path)]
    assert len(endpoints) == 1, (method, path, endpoints)  # one route: nothing registered twice
    return endpoints[0].__module__


# --- loading ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("select", [None, [], ["metrics"], ["core"], ["core", "metrics"]])
def test_core_is_registered_first_whatever_the_selection(select):
    pm = load_plugins(select)
    assert pm.names()[0] == "core"
    info = pm.infos["core"]
    assert info.source == "built-in" and info.obj is core_plugin and info.hooks == ("register_routes",)
    assert pm.names().count("core") == 1


def test_core_cannot_be_blocked_and_says_why():
    for block in (["core"], ["metrics", "core"]):
        with pytest.raises(PluginLoadError) as e:
            load_plugins(block=block)
        msg = str(e.value)
        assert "'core' cannot be blocked (--no-plugin core)" in msg and "built in" in msg
        assert "/add_worker" in msg and "cannot be administered" in msg
    # blocking anything else still works; unknown names are still refused
    assert load_plugins(block=["metrics"]).names()[0] == "core"
    with pytest.raises(PluginLoadError, match=r"Unknown plugin\(s\) \['cor'\] to block"):
        load_plugins(block=["cor"])
    with pytest.raises(PluginLoadError, match=r"Unknown plugin\(s\) \['nope'\]: not installed"):
        load_plugins(["core", "nope"])


def test_cli_refuses_no_plugin_core():
    out = subprocess.run([sys.executable, "-m", "slime_router_core.cli", "plugins", "--no-plugin", "core"],
                         capture_output=True, text=True, timeout=60, env=dict(os.environ))
    assert out.returncode != 0 and "'core' cannot be blocked" in out.stderr, out.stderr
    out = subprocess.run([sys.executable, "-m", "slime_router_core.cli", "plugins", "--plugin", "metrics"],
                         capture_output=True, text=True, timeout=60, env=dict(os.environ))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("core\n  source: built-in\n  hooks:  register_routes\n"), out.stdout
    assert "metrics" in out.stdout


def test_get_plugins_lists_core_first(router):
    r = router(plugins=["metrics"])
    listed = httpx.get(r.url + "/plugins").json()
    assert [p["name"] for p in listed] == ["core", "metrics"]
    assert listed[0] == {"name": "core", "source": "built-in", "hooks": ["register_routes"]}


# --- the order pluggy calls register_routes in ---------------------------------------------------------------


class ServesWorkerPaths:
    """A plugin serving two of the paths the core would forward or broadcast, and trying to shadow /health."""

    def __init__(self) -> None:
        self.seen: list[set[str]] = []  # the paths registered when its register_routes ran

    @hookimpl
    def register_routes(self, app: FastAPI) -> None:
        self.serve(app)

    def serve(self, app: FastAPI) -> None:
        self.seen.append({getattr(r, "path", "") for r in app.routes})

        @app.get("/get_model_info")
        async def model_info() -> dict:
            return {"model_path": "from-plugin"}

        @app.post("/flush_cache")
        async def flush() -> dict:
            return {"flushed": "by-plugin"}

        @app.get("/health")
        async def health() -> dict:
            return {"status": "shadowed"}


class ServesWorkerPathsFirst(ServesWorkerPaths):
    @hookimpl(tryfirst=True)
    def register_routes(self, app: FastAPI) -> None:
        self.serve(app)


class ServesWorkerPathsLast(ServesWorkerPaths):
    @hookimpl(trylast=True)
    def register_routes(self, app: FastAPI) -> None:
        self.serve(app)


class ServesWorkerPathsWrapper(ServesWorkerPaths):
    @hookimpl(wrapper=True)
    def register_routes(self, app: FastAPI):
        self.serve(app)
        return (yield)


class Records:
    def __init__(self, log: list[str], name: str) -> None:
        self.log, self.name = log, name

    @hookimpl(trylast=True)
    def register_routes(self) -> None:
        self.log.append(self.name)


def test_pluggy_calls_the_trylast_impl_registered_last_last():
    """Why the core's hook is a wrapper: with ``trylast``, the plugin registered *last* is called last, so a core
    registered first with a ``trylast`` impl would run before a plugin's own ``trylast`` one."""
    log: list[str] = []
    pm = load_plugins([], extra=[("a", Records(log, "a")), ("b", Records(log, "b"))])
    pm.hook.register_routes(app=FastAPI(), router=None)
    assert log == ["a", "b"]


@pytest.mark.parametrize("plugin_class", [ServesWorkerPaths, ServesWorkerPathsFirst, ServesWorkerPathsLast,
                                          ServesWorkerPathsWrapper])
def test_the_core_adds_admin_routes_before_and_worker_routes_after_every_plugin(plugin_class):
    plugin = plugin_class()
    app = build_app(Settings(), load_plugins(["balancing", "metrics"], extra=[("mine", plugin)]))  # and others
    # the plugin saw the admin routes (registered before it) but none of the forwarded ones (registered after)
    assert len(plugin.seen) == 1
    assert {"/health", "/add_worker", "/remove_worker", "/list_workers", "/plugins"} <= plugin.seen[0]
    assert not plugin.seen[0] & {"/get_model_info", "/flush_cache", "/model_info", "/get_load"}
    routes = {(m, p) for m, p, _ in _routes(app)}
    assert ADMIN_ROUTES | WORKER_ROUTES <= routes
    assert _owner(app, "GET", "/get_model_info") == __name__  # the plugin's, not forwarded
    assert _owner(app, "POST", "/flush_cache") == __name__
    assert _owner(app, "GET", "/model_info") == "slime_router_core.admin"  # the rest: the core's
    assert _owner(app, "GET", "/get_load") == "slime_router_core.admin"
    # /health: both registered, the core's first, so the core's answers
    from fastapi.testclient import TestClient

    assert TestClient(app.fastapi).get("/health").json()["status"] == "ok"


def test_balancing_serves_its_broadcast_paths_and_the_core_the_others():
    app = build_app(Settings(), load_plugins(["balancing"]))
    for path in ("/abort_request", "/update_weights_from_disk", "/update_weight_version"):
        assert _owner(app, "POST", path) == "slime_router_plugins.balancing.plugin"
    for path in ("/flush_cache", "/pause_generation", "/continue_generation"):
        assert _owner(app, "POST", path) == "slime_router_core.admin"
    assert _owner(app, "GET", "/get_load") == "slime_router_core.admin"


def test_core_alone_serves_every_core_route():
    app = build_app(Settings(), load_plugins([]))
    routes = {(m, p) for m, p, _ in _routes(app)}
    assert ADMIN_ROUTES | WORKER_ROUTES == routes - {("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/redoc"),
                                                     ("GET", "/docs/oauth2-redirect")}


# --- the admin routes' bodies, parsed by FastAPI, answered in the project's shape -------------------------------


def _error(resp: httpx.Response) -> dict:
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_add_worker_body_forms_and_their_errors(router, mock_worker):
    w1, w2, w3 = mock_worker(), mock_worker(), mock_worker()
    r = router(plugins=[])
    c = httpx.Client(base_url=r.url)
    # JSON body without a JSON content type (curl -d '{"url": ...}' sends form-urlencoded): parsed all the same
    got = c.post("/add_worker", content=b'{"url": "%s"}' % w1.url.encode(),
                 headers={"content-type": "application/x-www-form-urlencoded"})
    assert got.status_code == 200 and got.json() == {"status": "added", "url": w1.url, "urls": [w1.url]}
    got = c.post("/add_worker", content=b'{"url": "%s"}' % w2.url.encode(), headers={"content-type": ""})
    assert got.status_code == 200 and got.json()["url"] == w2.url
    # the query form wins over a body
    got = c.post("/add_worker", params={"url": w3.url}, json={"url": w1.url})
    assert got.json()["url"] == w3.url and got.json()["status"] == "added"
    # errors: the project's shape, the router's own messages
    for content, ctype, message, param in [
        (b"{not json", "application/json", "Malformed JSON body: ", None),
        (b"{not json", "text/plain", "Malformed JSON body: ", None),
        (b"[1, 2]", "application/json", 'Body must be a JSON object like {"url": "http://127.0.0.1:30001"}', None),
        (b'"http://x:1"', "application/json", "Body must be a JSON object like", None),
        (b'{"url": 5}', "application/json",
         "Worker url must be a non-empty string like 'http://127.0.0.1:30001'", "url"),
        (b'{"url": "ftp://a:1"}', "application/json", "Invalid worker url 'ftp://a:1': scheme must be http or https",
         "url"),
        (b"{}", "application/json", "Missing worker url: use ?url=http://HOST:PORT or a JSON body", "url"),
        (b"", "application/json", "Missing worker url", "url"),
    ]:
        for path in ("/add_worker", "/remove_worker"):
            resp = c.post(path, content=content, headers={"content-type": ctype})
            assert resp.status_code == 400, (path, content, resp.text)
            err = _error(resp)
            assert err["message"].startswith(message), (content, err)
            assert err["param"] == param and err["type"] == "invalid_request_error", err
    assert c.get("/list_workers").json()["urls"] == [w1.url, w2.url, w3.url]
    got = c.post("/remove_worker", content=b'{"url": "%s/"}' % w2.url.encode())
    assert got.json() == {"status": "removed", "url": w2.url, "in_flight": 0, "urls": [w1.url, w3.url]}


def test_list_workers_reports_every_worker_field(router, mock_worker):
    w = mock_worker()
    r = router(plugins=[], worker_urls=[w.url])
    listed = httpx.get(r.url + "/list_workers").json()
    assert listed["urls"] == [w.url]
    assert listed["workers"] == [Worker(w.url).to_dict()]  # nothing dropped by the response model


def test_broadcast_bodies_reach_every_worker_as_sent(router, mock_worker):
    w1, w2 = mock_worker(), mock_worker()
    r = router(plugins=[], worker_urls=[w1.url, w2.url])
    got = httpx.post(r.url + "/update_weight_version", json={"new_version": "7", "abort_all_requests": False})
    assert got.status_code == 200 and got.json()["success"] is True
    for w in (w1, w2):
        assert httpx.get(w.url + "/get_model_info").json()["weight_version"] == "7"
    # without a JSON content type too (curl -d)
    got = httpx.post(r.url + "/update_weight_version", content=b'{"new_version": "8"}',
                     headers={"content-type": "application/x-www-form-urlencoded"})
    assert got.status_code == 200 and httpx.get(w2.url + "/get_model_info").json()["weight_version"] == "8"
    bad = httpx.post(r.url + "/flush_cache", content=b"{nope", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and _error(bad)["message"].startswith("Malformed JSON body: ")
    assert httpx.post(r.url + "/flush_cache").json()["success"] is True  # no body: none sent
    assert set(httpx.get(r.url + "/get_load").json()["workers"]) == {w1.url, w2.url}
