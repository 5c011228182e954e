"""Access control (issue 14, part 4): --api-key / --admin-api-key checked before dispatch, /health open, and
--worker-allowlist on what may enter the worker pool. Real routers on real sockets."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from slime_router_core import access
from slime_router_core.access import ADMIN_PATHS, AccessControl, classify, declare_admin_paths
from slime_router_core.app import GuardedSlimeRouterApp, SlimeRouterApp
from slime_router_core.settings import Settings
from slime_router_core.tokenizers import BUILTIN_CHECKPOINT
from slime_router_core.workers import WorkerAllowlist, normalize_worker_url

DATA_KEY = "data-key-7f3a9c"
ADMIN_KEY = "admin-key-1b2e4d"
WRONG_KEY = "not-the-key"

# The brief's classification: these change state and need the admin key; /health needs none; the rest are data.
ADMIN = {"/add_worker", "/remove_worker", "/update_weights_from_disk", "/update_weight_version", "/pause", "/resume",
         "/abort_request", "/flush_cache", "/pause_generation", "/continue_generation"}
OPEN = {"/health", "/inspector", "/inspector/static/name"}  # probes; the inspector page and its files

KEYS: dict[str, dict[str, str]] = {
    "no key": {},
    "wrong key": {"Authorization": f"Bearer {WRONG_KEY}"},
    "data key": {"Authorization": f"Bearer {DATA_KEY}"},
    "admin key": {"Authorization": f"Bearer {ADMIN_KEY}"},
}


def _routes(app: Any) -> list[tuple[str, str]]:
    """(method, path) of every route the app serves (FastAPI's own /docs etc. included), /generate included."""
    out = set()
    for route in app.fastapi.routes:
        for method in sorted(getattr(route, "methods", None) or ["GET"]):
            if method != "HEAD":
                out.add((method, route.path.replace("{", "").replace("}", "")))
    out.add(("POST", "/generate"))
    return sorted(out)


def _expected(path: str, key: str) -> str:
    if path in OPEN:
        return "allowed"
    if key in ("no key", "wrong key"):
        return "401"
    if path in ADMIN and key == "data key":
        return "403"
    return "allowed"


@pytest.fixture
def keyed(router):
    """Every installed plugin, both keys, no workers (nothing reaches a worker; state changes are harmless)."""
    return router(hf_checkpoint=BUILTIN_CHECKPOINT, api_key=DATA_KEY, admin_api_key=ADMIN_KEY)


def test_every_route_times_every_key(keyed):
    routes = _routes(keyed.app)
    paths = {p for _, p in routes}
    # the matrix covers the whole OpenAPI document, and the admin classification matches the app's routes exactly
    assert {p.replace("{", "").replace("}", "") for p in keyed.app.fastapi.openapi()["paths"]} <= paths
    assert {p for p in paths if classify(p) == "admin"} == ADMIN, "admin routes"
    assert {p for p in paths if classify(p) == "open"} == OPEN
    assert {"/v1/chat/completions", "/retrieve_from_text", "/metrics", "/list_workers", "/plugins", "/docs",
            "/openapi.json", "/workers/state", "/get_model_info", "/radix_tree/stats"} <= paths
    wrong = []
    with httpx.Client(base_url=keyed.url, timeout=10) as c:  # one keep-alive connection: refusals leave it usable
        for method, path in routes:
            for key, headers in KEYS.items():
                resp = c.request(method, path, headers=headers)
                got = str(resp.status_code) if resp.status_code in (401, 403) else "allowed"
                if got != _expected(path, key):
                    wrong.append((method, path, key, resp.status_code, resp.text[:200]))
                if got == "401":
                    assert resp.headers["www-authenticate"].startswith("Bearer"), (path, key)
        c.post("/resume", headers=KEYS["admin key"])  # the matrix paused it
    assert not wrong, wrong


def test_refusals_say_which_key_and_how_to_send_it(keyed):
    url = keyed.url
    resp = httpx.post(url + "/generate", json={"text": "hi"})
    assert resp.status_code == 401 and resp.headers["www-authenticate"] == 'Bearer realm="slime-router"'
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "authentication_error" and err["code"] == "missing_api_key"
    assert "Authorization: Bearer <key>" in err["message"] and "--api-key" in err["message"]
    assert "X-API-Key" in err["message"]

    resp = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {WRONG_KEY}"})
    assert resp.status_code == 401 and 'error="invalid_token"' in resp.headers["www-authenticate"]
    assert resp.json()["error"]["code"] == "invalid_api_key"
    assert "not valid" in resp.json()["error"]["message"]

    # an admin route: the message names the admin key
    resp = httpx.post(url + "/add_worker", params={"url": "http://127.0.0.1:1"})
    assert resp.status_code == 401
    msg = resp.json()["error"]["message"]
    assert "--admin-api-key" in msg and "SLIME_ROUTER_ADMIN_API_KEY" in msg and "POST /add_worker" in msg
    assert "Authorization: Bearer <key>" in msg

    # the data key on an admin route: authenticated but not allowed (403), and the pool is unchanged
    resp = httpx.post(url + "/add_worker", params={"url": "http://127.0.0.1:1"}, headers=KEYS["data key"])
    assert resp.status_code == 403
    err = resp.json()["error"]
    assert err["type"] == "permission_error" and err["code"] == "admin_key_required"
    assert "--admin-api-key" in err["message"] and "data-plane key" in err["message"]
    assert httpx.get(url + "/list_workers", headers=KEYS["admin key"]).json()["urls"] == []

    # X-API-Key is not read; other schemes are refused; a key in the query string is not read
    for headers, params in [({"X-API-Key": DATA_KEY}, {}), ({"Authorization": f"Basic {DATA_KEY}"}, {}),
                            ({"Authorization": DATA_KEY}, {}), ({"Authorization": "Bearer"}, {}),
                            ({}, {"api_key": DATA_KEY, "key": DATA_KEY})]:
        resp = httpx.get(url + "/list_workers", headers=headers, params=params)
        assert resp.status_code == 401, headers
        assert resp.headers["www-authenticate"].startswith("Bearer")
    assert "X-API-Key header is not read" in httpx.get(url + "/list_workers",
                                                       headers={"X-API-Key": DATA_KEY}).json()["error"]["message"]
    # scheme case-insensitive (RFC 7235); unknown paths still need a key before they are answered 404
    assert httpx.get(url + "/list_workers", headers={"Authorization": f"bearer {DATA_KEY}"}).status_code == 200
    assert httpx.get(url + "/nope").status_code == 401
    assert httpx.get(url + "/nope", headers=KEYS["data key"]).status_code == 404
    # trailing-slash variants of admin paths are admin too
    assert httpx.post(url + "/add_worker/", headers=KEYS["data key"]).status_code == 403
    # no answer carries a key
    for key, headers in KEYS.items():
        for path in ("/add_worker", "/plugins", "/list_workers", "/generate"):
            text = httpx.post(url + path, headers=headers).text + httpx.get(url + path, headers=headers).text
            assert DATA_KEY not in text and ADMIN_KEY not in text, (key, path)


def test_health_is_open(keyed):
    resp = httpx.get(keyed.url + "/health")
    assert resp.status_code == 200 and resp.json()["status"] == "ok"
    assert httpx.get(keyed.url + "/health", headers=KEYS["wrong key"]).status_code == 200


def test_data_key_works_on_generate_and_with_the_openai_client(router, mock_worker):
    w = mock_worker()
    r = router(plugins=["openai_compat"], hf_checkpoint=BUILTIN_CHECKPOINT, worker_urls=[w.url],
               api_key=DATA_KEY, admin_api_key=ADMIN_KEY)
    body = {"text": "Hello, my name is", "sampling_params": {"max_new_tokens": 4}}
    with httpx.Client(base_url=r.url, timeout=30) as c:
        # a refusal before the body is read, then the same connection serves the keyed request
        assert c.post("/generate", json=body).status_code == 401
        got = c.post("/generate", json=body, headers=KEYS["data key"])
        assert got.status_code == 200 and "text" in got.json(), got.text
        assert c.post("/generate", json=body, headers=KEYS["admin key"]).status_code == 200
        with c.stream("POST", "/generate", json={**body, "stream": True}, headers=KEYS["data key"]) as s:
            assert s.status_code == 200 and b"[DONE]" in s.read()
    client = OpenAI(base_url=r.url + "/v1", api_key=DATA_KEY, max_retries=0)
    reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=8)
    assert reply.choices[0].message is not None
    assert [m.id for m in client.models.list()]
    with pytest.raises(openai.AuthenticationError) as e:
        OpenAI(base_url=r.url + "/v1", api_key=WRONG_KEY, max_retries=0).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=8)
    assert "Authorization: Bearer" in str(e.value)


def test_no_key_configured_everything_is_open_and_dispatch_is_unchanged(router):
    r = router(hf_checkpoint=BUILTIN_CHECKPOINT)
    assert type(r.app) is SlimeRouterApp  # the no-key path: exactly the dispatch there was before access control
    with httpx.Client(base_url=r.url, timeout=10) as c:
        for method, path in _routes(r.app):
            resp = c.request(method, path)
            assert resp.status_code not in (401, 403), (method, path, resp.text)
            assert "www-authenticate" not in resp.headers
        c.post("/resume")
        # no CORS: a browser preflight or a cross-origin request gets no Access-Control-* header
        for resp in (c.options("/generate", headers={"Origin": "http://evil.example",
                                                     "Access-Control-Request-Method": "POST"}),
                     c.get("/list_workers", headers={"Origin": "http://evil.example"})):
            assert not [h for h in resp.headers if h.lower().startswith("access-control-")], resp.headers


def test_only_api_key_guards_admin_routes_too(router):
    r = router(plugins=[], api_key=DATA_KEY)
    assert isinstance(r.app, GuardedSlimeRouterApp)
    assert httpx.post(r.url + "/add_worker").status_code == 401
    assert httpx.post(r.url + "/add_worker", headers=KEYS["data key"]).status_code == 400  # reached the route
    assert httpx.get(r.url + "/list_workers").status_code == 401
    assert httpx.get(r.url + "/health").status_code == 200


def test_only_admin_key_leaves_data_routes_open(router):
    r = router(plugins=[], admin_api_key=ADMIN_KEY)
    assert httpx.get(r.url + "/list_workers").status_code == 200
    assert httpx.post(r.url + "/generate", json={"text": "x"}).status_code == 503  # open: no workers
    resp = httpx.post(r.url + "/add_worker", headers=KEYS["data key"])  # no data key configured: just wrong
    assert resp.status_code == 401 and "--admin-api-key" in resp.json()["error"]["message"]
    assert httpx.post(r.url + "/add_worker", headers=KEYS["admin key"]).status_code == 400


def test_a_plugin_declares_its_admin_paths(router):
    r = router(plugins=[], api_key=DATA_KEY, admin_api_key=ADMIN_KEY)

    async def reset() -> dict:
        return {"reset": True}

    r.app.fastapi.add_api_route("/my_plugin/reset", reset, methods=["POST"])
    r.app.fastapi.add_api_route("/my_plugin/admin/x", reset, methods=["POST"])
    assert httpx.post(r.url + "/my_plugin/reset", headers=KEYS["data key"]).status_code == 200  # data until declared
    try:
        declare_admin_paths("/my_plugin/reset")
        declare_admin_paths("/my_plugin/admin/", prefix=True)
        for path in ("/my_plugin/reset", "/my_plugin/admin/x"):
            assert httpx.post(r.url + path, headers=KEYS["data key"]).status_code == 403
            assert httpx.post(r.url + path, headers=KEYS["admin key"]).json() == {"reset": True}
        assert classify("/snapshot") == "admin" and classify("/snapshot/restore") == "admin"
        with pytest.raises(ValueError, match="open"):
            declare_admin_paths("/health")
        with pytest.raises(ValueError, match="start with"):
            declare_admin_paths("my_plugin")
    finally:
        ADMIN_PATHS.discard("/my_plugin/reset")
        access.ADMIN_PREFIXES.discard("/my_plugin/admin/")
        declare_admin_paths()  # rebuild the prefix tuple


@pytest.mark.parametrize("kw, message", [
    ({"api_key": ""}, "--api-key: empty"),
    ({"admin_api_key": "has space"}, "--admin-api-key: a key must be printable ASCII"),
    ({"api_key": "clé"}, "--api-key: a key must be printable ASCII"),
    ({"api_key": "same-key", "admin_api_key": "same-key"}, "must differ from --api-key"),
])
def test_unusable_keys_stop_start_up_without_showing_them(router, kw, message):
    with pytest.raises(ValueError, match=message) as e:
        router(plugins=[], **kw)
    for value in kw.values():
        if value:
            assert value not in str(e.value)


def test_keys_are_never_shown():
    s = Settings(api_key=DATA_KEY, admin_api_key=ADMIN_KEY)
    assert DATA_KEY not in repr(s) and ADMIN_KEY not in repr(s)
    guard = AccessControl(DATA_KEY, ADMIN_KEY)
    assert DATA_KEY not in guard.describe() and ADMIN_KEY not in guard.describe()


# --- the worker allowlist -------------------------------------------------------------------------------------------


def test_allowlist_matching_rules():
    a = WorkerAllowlist.parse(["10.0.0.0/8,gpu-node-1", "GPU-Node-2:30001", "192.168.1.7", "[::1]:9000", "fd00::/8"])
    allowed = ["http://10.1.2.3:30001", "https://10.255.0.1:1", "http://gpu-node-1:5", "http://gpu-node-2:30001",
               "http://192.168.1.7:80", "http://[::1]:9000", "http://[fd00::5]:1"]
    refused = ["http://11.0.0.1:30001", "http://gpu-node-2:30002", "http://gpu-node-1.evil.com:5",
               "http://evil.gpu-node-1:5", "http://192.168.1.8:80", "http://[::1]:9001", "http://localhost:9000",
               "http://[::ffff:10.0.0.1]:1", "http://2130706433:30001", "http://0x0a000001:30001",
               "http://gpu-node-1@evil:5"]
    for url in allowed:
        assert a.allows(normalize_worker_url(url)), url
    for url in refused:
        assert not a.allows(normalize_worker_url(url)), url
    # hostnames match literally: an allowed IP does not allow a name that resolves to it, nor the reverse
    assert not WorkerAllowlist.parse(["127.0.0.1"]).allows("http://localhost:1")
    assert not WorkerAllowlist.parse(["localhost"]).allows("http://127.0.0.1:1")
    assert WorkerAllowlist.parse([]).allows("http://anything:1") and not WorkerAllowlist.parse([])
    for bad in ["http://10.0.0.1:1", "10.0.0.0/33", "host:notaport", "host:0", "a b", "[::1]x"]:
        with pytest.raises(ValueError, match="--worker-allowlist"):
            WorkerAllowlist.parse([bad])


def test_allowlist_hostname_and_cidr_on_add_worker(router, mock_worker):
    w1, w2 = mock_worker(), mock_worker()
    port1 = w1.url.rsplit(":", 1)[1]
    r = router(plugins=[], worker_allowlist=[f"localhost:{port1},127.0.0.0/30"], admin_api_key=ADMIN_KEY)
    c = httpx.Client(base_url=r.url, headers=KEYS["admin key"])
    # the CIDR: any port on 127.0.0.1
    assert c.post("/add_worker", params={"url": w2.url}).status_code == 200
    # the hostname: localhost on w1's port only
    assert c.post("/add_worker", params={"url": f"http://localhost:{port1}"}).status_code == 200
    before = c.get("/list_workers").json()["urls"]
    for url in [f"http://127.0.0.9:{port1}", "http://localhost:1", "http://10.0.0.1:30001",
                "http://169.254.169.254:80", f"http://LOCALHOST.:{port1}"]:
        resp = c.post("/add_worker", json={"url": url})
        assert resp.status_code == 403, (url, resp.text)
        err = resp.json()["error"]
        assert err["code"] == "worker_not_allowed" and err["param"] == "url" and err["type"] == "permission_error"
        assert f"--worker-allowlist localhost:{port1},127.0.0.0/30" in err["message"] and "not in the worker " \
            "allowlist" in err["message"]
    assert c.get("/list_workers").json()["urls"] == before == [w2.url, f"http://localhost:{port1}"]
    # a malformed URL is still a 400 (validated before the allowlist)
    assert c.post("/add_worker", json={"url": "ftp://x:1"}).status_code == 400
    # the pool's workers still serve
    assert c.post("/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 2}}).status_code == 200


@pytest.fixture
def cli_main():
    """``slime_router_core.cli.main`` in this process, its global state (commands, the log level) restored after."""
    import logging

    from slime_router_core import cli

    commands, level = list(cli.app.registered_commands), logging.getLogger("slime_router").level
    yield cli.main
    cli.app.registered_commands[:] = commands
    logging.getLogger("slime_router").setLevel(level)


def test_allowlist_refuses_worker_urls_at_start_up(router, mock_worker, capsys, cli_main):
    w = mock_worker()
    with pytest.raises(ValueError, match=r"--worker-url http://10\.9\.9\.9:30001: Worker http://10\.9\.9\.9:30001 "
                                         r"is not in the worker allowlist \(--worker-allowlist 127\.0\.0\.0/8\)"):
        router(plugins=[], worker_urls=[w.url, "http://10.9.9.9:30001"], worker_allowlist=["127.0.0.0/8"])
    r = router(plugins=[], worker_urls=[w.url], worker_allowlist=["127.0.0.0/8"])
    assert httpx.get(r.url + "/list_workers").json()["urls"] == [w.url]
    with pytest.raises(ValueError, match="Invalid value for --worker-allowlist: '10.0.0.0/99'"):
        router(plugins=[], worker_allowlist=["10.0.0.0/99"])

    # the command line: a clear error before anything starts (no port bound, no tokenizer loaded)
    for argv, message in [
        (["--worker-url", "http://10.9.9.9:30001", "--worker-allowlist", "127.0.0.0/8,gpu-1"],
         "Error: --worker-url http://10.9.9.9:30001: Worker http://10.9.9.9:30001 is not in the worker allowlist "
         "(--worker-allowlist 127.0.0.0/8,gpu-1)"),
        (["--worker-url", w.url, "--worker-allowlist", "http://x:1"], "Error: Invalid value for --worker-allowlist"),
        (["--worker-url", w.url, "--api-key", "a b"], "Error: Invalid value for --api-key"),
    ]:
        with pytest.raises(SystemExit) as e:
            cli_main(["serve", "--plugin", "balancing", "--port", "1", *argv])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert message in " ".join(err.split()), err
        assert "a b" not in err


def test_serve_help_lists_the_flags_and_no_key(monkeypatch, capsys, cli_main):
    monkeypatch.setenv("SLIME_ROUTER_API_KEY", DATA_KEY)
    monkeypatch.setenv("SLIME_ROUTER_ADMIN_API_KEY", ADMIN_KEY)
    monkeypatch.setenv("COLUMNS", "400")  # rich wraps --help to the terminal
    monkeypatch.setenv("TERMINAL_WIDTH", "400")
    with pytest.raises(SystemExit):
        cli_main(["serve", "--plugin", "balancing", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for flag in ("--api-key", "--admin-api-key", "--worker-allowlist", "SLIME_ROUTER_API_KEY",
                 "SLIME_ROUTER_ADMIN_API_KEY", "SLIME_ROUTER_WORKER_ALLOWLIST"):
        assert flag in out, flag
    assert DATA_KEY not in out and ADMIN_KEY not in out
