"""The plugin framework: discovery through entry points, selection, blocking, dotted paths, registry."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from slime_router_core import ComponentRegistry, PluginLoadError, Settings, hookimpl
from slime_router_core.app import build_app
from slime_router_core.plugins import load_plugins

FIXTURES = Path(__file__).parent / "fixtures"
FIRST_PARTY = {"radix_tree", "openai_compat", "metrics", "balancing"}


@pytest.fixture
def third_party(monkeypatch):
    """Make the fixture distribution 'installed' (on sys.path with its dist-info and entry point)."""
    monkeypatch.syspath_prepend(str(FIXTURES / "site"))
    yield
    sys.modules.pop("slime_router_hello", None)


def test_all_installed_plugins_load_by_default_including_third_party(third_party):
    pm = load_plugins()
    assert FIRST_PARTY | {"hello"} <= set(pm.names())
    info = pm.infos["hello"]
    assert "slime-router-hello 0.1" in info.source
    assert {"add_options", "register_components", "register_routes", "pre_request"} <= set(info.hooks)
    # first-party plugins come from the same entry-point group
    assert "entry point slime_router_plugins.radix_tree.plugin" in pm.infos["radix_tree"].source


def test_plugin_selection_and_blocking(third_party):
    assert load_plugins(["hello"]).names() == ["core", "hello"]  # core: the built-in plugin, always
    assert load_plugins(["hello", "metrics"]).names() == ["core", "hello", "metrics"]
    blocked = load_plugins(block=["hello", "metrics"]).names()
    assert "hello" not in blocked and "metrics" not in blocked and "radix_tree" in blocked
    with pytest.raises(PluginLoadError, match=r"Unknown plugin\(s\) \['nope'\]: not installed"):
        load_plugins(["nope"])


def test_plugin_that_fails_to_import_stops_startup_naming_it(monkeypatch):
    monkeypatch.syspath_prepend(str(FIXTURES / "broken_site"))
    with pytest.raises(PluginLoadError) as e:
        load_plugins()
    assert "Plugin 'broken'" in str(e.value) and "ModuleNotFoundError" in str(e.value)
    assert "slime_router_broken_missing_module" in str(e.value)
    # blocking it lets the rest start
    assert "broken" not in load_plugins(block=["broken"]).names()


class DottedPlugin:
    """Loaded by dotted path: a class is instantiated with no arguments."""

    @hookimpl
    def register_components(self, registry):
        registry.register("dotted_marker", True)


def test_dotted_path_loading_and_slime_aliases():
    pm = load_plugins(["metrics"], dotted_paths=["test_core_plugins.DottedPlugin"])
    assert pm.names() == ["core", "metrics", "test_core_plugins.DottedPlugin"]
    assert pm.infos["test_core_plugins.DottedPlugin"].source == "dotted path"
    # the original slime radix middleware path is an alias for the radix_tree plugin
    pm = load_plugins(["metrics"], dotted_paths=[
        "slime.router.middleware_hub.radix_tree_middleware.RadixTreeMiddleware"])
    assert pm.names() == ["core", "metrics", "radix_tree"]
    with pytest.raises(PluginLoadError, match="'no.such.module.Thing' \\(dotted path\\) failed to import"):
        load_plugins([], dotted_paths=["no.such.module.Thing"])


def test_registry_errors_have_the_documented_shape():
    reg = ComponentRegistry()
    reg.register("my_index", object())  # a plugin's own component: no contract to check
    assert reg.has("my_index") and not reg.has("tokenizer")
    with pytest.raises(RuntimeError) as e:
        reg.get("tokenizer")
    assert str(e.value) == "Required component 'tokenizer' not found. Available components: ['my_index']"
    with pytest.raises(ValueError, match="already registered"):
        reg.register("my_index", object())


class NeedsTokenizer:
    @hookimpl
    def required_components(self):
        return ["tokenizer"]


def test_missing_required_component_fails_at_startup_not_first_request():
    pm = load_plugins([], extra=[("needs_tok", NeedsTokenizer())])
    with pytest.raises(PluginLoadError) as e:
        build_app(Settings(), pm)
    msg = str(e.value)
    assert "Plugin 'needs_tok' cannot start" in msg
    assert "Required component 'tokenizer' not found. Available components: []" in msg


def test_third_party_plugin_serves_its_route_option_and_rewrite(third_party, router, mock_worker):
    worker = mock_worker()
    r = router(plugins=["hello"], worker_urls=[worker.url])
    assert httpx.get(r.url + "/hello").json() == {"greeting": "hello"}
    # the rewritten body is what the worker receives
    httpx.post(worker.url + "/mock/configure", json={"stop_at_eos": 0.0})
    got = httpx.post(r.url + "/generate", json={"text": "Hi", "sampling_params": {"max_new_tokens": 20}},
                     headers={"x-hello-short": "1"}).json()
    assert got["meta_info"]["completion_tokens"] == 3
    records = httpx.get(worker.url + "/mock/records").json()
    assert len(records[-1]["output_ids"]) == 3


def _cli(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "slime_router_core.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def test_cli_plugins_lists_sources_and_hooks_of_an_installed_third_party_plugin():
    out = _cli("plugins", env={"PYTHONPATH": str(FIXTURES / "site")})
    assert out.returncode == 0, out.stderr
    assert "hello\n  source: entry point slime_router_hello (slime-router-hello 0.1)" in out.stdout
    assert "pre_request" in out.stdout and "radix_tree" in out.stdout


def test_cli_serve_help_lists_plugin_flags_and_selection_hides_others():
    out = _cli("serve", "--help", env={"PYTHONPATH": str(FIXTURES / "site"), "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    assert "--hello-greeting" in out.stdout and "--sglang-router-port" in out.stdout
    assert "--balancing-seed" in out.stdout
    only = _cli("serve", "--plugin", "metrics", "--help", env={"PYTHONPATH": str(FIXTURES / "site"),
                                                                "COLUMNS": "200"})
    assert "--hello-greeting" not in only.stdout


def test_cli_hf_checkpoint_validation_messages(tmp_path):
    out = _cli("serve", "--worker-url", "http://127.0.0.1:1")
    assert out.returncode != 0
    assert "Error: Missing required argument: --hf-checkpoint" in out.stderr
    out = _cli("serve", "--worker-url", "http://127.0.0.1:1", "--hf-checkpoint", str(tmp_path / "nope"))
    assert out.returncode != 0 and str(tmp_path / "nope") in out.stderr
    f = tmp_path / "file.txt"
    f.write_text("x")
    out = _cli("serve", "--worker-url", "http://127.0.0.1:1", "--hf-checkpoint", str(f))
    assert out.returncode != 0 and "not a directory" in out.stderr and str(f) in out.stderr
    out = _cli("serve", "--worker-url", "ftp://nowhere")
    assert out.returncode != 0 and "scheme must be http or https" in out.stderr
    out = _cli("serve", "--plugin", "nope")
    assert out.returncode != 0 and "Unknown plugin(s) ['nope']" in out.stderr
