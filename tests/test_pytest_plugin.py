"""The pytest plugin slime-router ships (``slime_router_testing.pytest_plugin``, entry point ``pytest11``): its
fixtures are active in this very session, next to this repository's own (``router``, ``mock_worker``...)."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from slime_router_core import HTTPError, hookimpl


def test_the_plugin_is_registered_through_the_pytest11_entry_point(pytestconfig):
    (ep,) = [ep for ep in entry_points(group="pytest11") if ep.name == "slime_router"]
    assert ep.value == "slime_router_testing.pytest_plugin"
    assert pytestconfig.pluginmanager.has_plugin("slime_router")  # loaded by pytest itself, not by a conftest


def test_the_fixture_names_do_not_clash_with_this_repositorys_own(request):
    from slime_router_testing import pytest_plugin

    ours = {name for name in vars(pytest_plugin) if name.startswith("slime_")}
    assert ours == {"slime_router", "slime_mock_worker", "slime_mock_worker_factory", "slime_tokenizer",
                    "slime_tokenizer_dir", "slime_client"}
    conftest = {"router", "mock_worker", "mock_worker_process", "tokenizer_dir", "servers_to_stop"}
    assert not ours & conftest
    for name in ours:  # each resolves to the plugin's definition
        defs = request._fixturemanager.getfixturedefs(name, request.node)
        assert defs and defs[-1].func.__module__ == "slime_router_testing.pytest_plugin", name


class Shout:
    """A plugin that is not installed, given to the router in code."""

    @hookimpl
    def pre_request(self, ctx):
        if ctx.headers.get("x-refuse"):
            raise HTTPError(403, "refused by shout")
        ctx.body.setdefault("sampling_params", {})["max_new_tokens"] = 2


def test_a_router_with_a_plugin_in_code_in_front_of_the_mock_worker(slime_router, slime_mock_worker):
    slime_mock_worker.configure(stop_at_eos=0.0)
    r = slime_router(plugins=[], extra=[("shout", Shout())])
    assert r.plugins() == ["core", "shout"]
    assert r.router.pool.urls() == [slime_mock_worker.url]
    got = r.client.post("/generate", json={"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 30}})
    assert got.status_code == 200 and len(got.json()["output_ids"]) == 2
    (rec,) = slime_mock_worker.records()  # the truth: what the worker received and produced
    assert rec["input_ids"] == [5, 6, 7] and rec["output_ids"] == got.json()["output_ids"]
    refused = r.client.post("/generate", json={"input_ids": [5]}, headers={"x-refuse": "1"})
    assert refused.status_code == 403 and refused.json()["error"]["message"] == "refused by shout"
    assert len(slime_mock_worker.records()) == 1
    slime_mock_worker.clear_records()
    assert slime_mock_worker.records() == []


def test_chosen_installed_plugins_with_the_bundled_tokenizer(slime_router, slime_mock_worker, slime_tokenizer,
                                                             slime_client):
    r = slime_router(plugins=["radix_tree"])
    assert r.plugins() == ["core", "radix_tree"]
    reply = slime_client.post(r.url + "/generate", json={"text": "Hello there"}).json()
    (rec,) = slime_mock_worker.records()
    assert rec["input_ids"] == slime_tokenizer.encode("Hello there")  # the router sent the tokenizer's ids
    got = slime_client.post(r.url + "/retrieve_from_text", json={"text": "Hello there" + reply["text"]}).json()
    assert got["tokens"] == rec["input_ids"] + rec["output_ids"]


def test_plugin_options_and_several_workers(slime_router, slime_mock_worker_factory):
    workers = [slime_mock_worker_factory(seed=i) for i in range(2)]
    r = slime_router(plugins=["metrics"], worker_urls=[w.url for w in workers],
                     extra_settings={"metrics_recent_requests": 7})
    assert sorted(r.router.pool.urls()) == sorted(w.url for w in workers)
    assert r.router.settings.metrics_recent_requests == 7
    for _ in range(4):
        assert r.client.post("/generate", json={"input_ids": [1, 2]}).status_code == 200
    assert [len(w.records()) for w in workers] == [2, 2]


def test_every_server_a_fixture_started_is_stopped_after_the_test(pytester_like_run):
    """Run in a child pytest session (as an outside project would): the fixtures come through the entry point,
    no conftest; after the test, the router and the worker no longer answer."""
    out = pytester_like_run('''
import httpx, pytest

URLS = []

def test_uses_them(slime_router, slime_mock_worker):
    r = slime_router(plugins=[])
    URLS.extend([r.url, slime_mock_worker.url])
    assert r.client.post("/generate", json={"input_ids": [1]}).status_code == 200

def test_they_are_gone():
    for url in URLS:
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health", timeout=2)
''')
    assert out.returncode == 0 and "2 passed" in out.stdout, out.stdout[-3000:] + out.stderr[-2000:]
    off = pytester_like_run("def test_x(slime_router):\n    pass\n", "-p", "no:slime_router")
    assert off.returncode != 0 and "fixture 'slime_router' not found" in off.stdout


def _run(tmp_path, source: str, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_outside.py").write_text(source)
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args,
                           str(tmp_path / "test_outside.py")], cwd=tmp_path, capture_output=True, text=True,
                          env=env, timeout=120)


@pytest.fixture
def pytester_like_run(tmp_path):
    return lambda source, *args: _run(tmp_path, source, *args)
