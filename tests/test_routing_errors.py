"""Unknown routes (404) and wrong methods (405) answer the project's error shape, not FastAPI's ``{"detail": ...}``.

The shape is the README's: ``{"error": {"message", "type", "param", "code"}}``. Covered: core FastAPI routes, a
plugin's route, and ``/generate`` (served by the raw-ASGI hot path for POST; any other method is a 405 that
keeps the ``Allow`` header).
"""

from __future__ import annotations

import httpx
import pytest

SHAPE = {"message", "type", "param", "code"}


def _error(r: httpx.Response) -> dict:
    assert r.headers["content-type"].startswith("application/json"), r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == SHAPE, body
    return body["error"]


@pytest.fixture
def core(router):
    return router(plugins=[])


@pytest.mark.parametrize("method,path", [("GET", "/no/such/route"), ("POST", "/v1/chat/completions"),
                                         ("DELETE", "/generat")])
def test_unknown_route_is_404_naming_the_path_and_where_routes_are_listed(core, method, path):
    r = httpx.request(method, core.url + path)
    assert r.status_code == 404
    err = _error(r)
    assert path in err["message"] and method in err["message"]
    assert "GET /plugins" in err["message"] and "README" in err["message"]
    assert err["type"] == "not_found_error" and err["code"] == "unknown_route"


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
def test_wrong_method_on_generate_is_405_with_allow_header(core, method):
    r = httpx.request(method, core.url + "/generate")
    assert r.status_code == 405
    assert r.headers["allow"] == "POST"
    err = _error(r)
    assert f"{method} is not allowed on /generate" in err["message"] and "POST" in err["message"]
    assert err["type"] == "invalid_request_error" and err["code"] == "method_not_allowed"


def test_head_on_generate_is_405_with_allow_header_and_no_body(core):
    r = httpx.head(core.url + "/generate")
    assert r.status_code == 405 and r.headers["allow"] == "POST" and r.content == b""


@pytest.mark.parametrize("method,path,allow", [("GET", "/add_worker", "POST"), ("POST", "/health", "GET"),
                                               ("DELETE", "/list_workers", "GET")])
def test_wrong_method_on_core_routes_is_405_in_the_project_shape(core, method, path, allow):
    r = httpx.request(method, core.url + path)
    assert r.status_code == 405 and r.headers["allow"] == allow
    err = _error(r)
    assert path in err["message"] and f"allowed: {allow}" in err["message"]


def test_wrong_method_on_a_plugin_route_is_405_in_the_project_shape(router):
    r = router(plugins=["metrics"])
    resp = httpx.post(r.url + "/metrics/prometheus")
    assert resp.status_code == 405 and "GET" in resp.headers["allow"]
    assert "/metrics/prometheus" in _error(resp)["message"]


def test_post_generate_still_reaches_the_hot_path(core):
    # the raw handler's own answers are unchanged: malformed JSON is its 400, no worker its 503
    r = httpx.post(core.url + "/generate", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "Malformed JSON" in _error(r)["message"]
    r = httpx.post(core.url + "/generate", json={"text": "hi"})
    assert r.status_code == 503 and _error(r)["type"] == "service_unavailable"
