"""The third-party plugin examples (``examples/plugins/``), as their users meet them.

- Each example's own tests pass with the example installed (a site directory with its dist-info and entry point on
  ``PYTHONPATH``: discovered exactly as pip would make it, without pip).
- ``slime-router plugins`` describes a third-party plugin (distribution, version, hooks, options, components it
  provides and requires), and start-up refuses a component nobody provides or two plugins provide.
- Slow: each is ``pip install``ed into a fresh virtualenv; there, its tests pass, ``slime-router plugins`` lists
  it, ``slime-router serve`` loads it and it works on a real request, and ``--no-plugin`` blocks it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import httpx
import pytest

from slime_router_core import PluginLoadError, Settings, hookimpl
from slime_router_core.app import build_app
from slime_router_core.plugins import load_plugins
from slime_router_testing import free_port, start_mock_worker_process, stop_process_group, wait_http

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "plugins"
# example directory -> (entry-point name, package)
PLUGINS = {
    "slime-router-rollout-logger": ("rollout_logger", "slime_router_rollout_logger"),
    "slime-router-tenant-limits": ("tenant_limits", "slime_router_tenant_limits"),
}


def pyproject(example: str) -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((EXAMPLES / example / "pyproject.toml").read_text())


def install_on_path(example: str, site: Path) -> Path:
    """What ``pip install`` leaves in site-packages, written by hand: the package and a dist-info whose
    ``entry_points.txt`` is the example's own ``[project.entry-points]``."""
    meta = pyproject(example)["project"]
    _, package = PLUGINS[example]
    shutil.copytree(EXAMPLES / example / package, site / package)
    info = site / f"{meta['name'].replace('-', '_')}-{meta['version']}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {meta['name']}\nVersion: {meta['version']}\n")
    groups = meta["entry-points"]
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) + "\n" for group, eps in groups.items()))
    return site


# --- what `slime-router plugins` shows, and the start-up checks ------------------------------------------------


class Provides:
    def __init__(self, name: str, tryfirst: bool = False) -> None:
        self.component = name
        marker = hookimpl(tryfirst=True) if tryfirst else hookimpl

        def register_components(registry):
            registry.register(self.component, object())

        self.register_components = marker(register_components)


class Requires:
    def __init__(self, *names: str) -> None:
        self.names = list(names)

    @hookimpl
    def required_components(self):
        return self.names


def test_two_plugins_providing_one_component_stop_start_up_naming_both():
    pm = load_plugins([], extra=[("first", Provides("index")), ("second", Provides("index"))])
    with pytest.raises(PluginLoadError) as e:
        build_app(Settings(), pm)
    msg = str(e.value)
    assert "Component 'index' is already registered by" in msg
    assert "plugins 'first' and 'second' both provide it" in msg or "plugins 'second' and 'first' both provide it" \
        in msg


def test_a_required_component_nobody_provides_stops_start_up_saying_what_to_do():
    pm = load_plugins([], extra=[("needs", Requires("index"))])
    with pytest.raises(PluginLoadError) as e:
        build_app(Settings(), pm)
    assert "Plugin 'needs' cannot start: Required component 'index' not found" in str(e.value)
    assert "No loaded plugin provides 'index'" in str(e.value) and "--no-plugin needs" in str(e.value)
    # provided: it starts, and each plugin's info says who provides and who requires what
    pm = load_plugins([], extra=[("needs", Requires("index")), ("has", Provides("index"))])
    build_app(Settings(), pm)
    assert pm.infos["has"].provides == ["index"] and pm.infos["needs"].requires == ["index"]
    assert pm.infos["needs"].provides == [] and pm.infos["has"].requires == []


def test_a_cache_registered_tryfirst_still_replaces_the_first_party_one(tokenizer_dir):
    """radix_tree yields to a trajectory cache another plugin registered first: not a duplicate."""
    from slime_router_core.contracts import TRAJECTORY_CACHE
    from slime_router_core.tokenizers import BUILTIN_CHECKPOINT, load_tokenizer
    from slime_router_plugins.radix_tree.cache import TrajectoryCache

    class MyCache:
        @hookimpl(tryfirst=True)
        def register_components(self, registry):
            registry.register(TRAJECTORY_CACHE, TrajectoryCache(load_tokenizer(BUILTIN_CHECKPOINT)))

    pm = load_plugins(["radix_tree"], extra=[("my_cache", MyCache())])
    app = build_app(Settings(hf_checkpoint=BUILTIN_CHECKPOINT), pm)
    assert app.router.registry.owner(TRAJECTORY_CACHE) == "my_cache"
    assert pm.infos["my_cache"].provides == ["radix_tree"] and pm.infos["radix_tree"].provides == []


def test_a_hookimpl_with_a_name_that_is_no_hook_is_refused_with_a_suggestion():
    class Typo:
        @hookimpl
        def pre_requets(self, ctx):
            pass

    with pytest.raises(PluginLoadError) as e:
        load_plugins([], extra=[("typo", Typo())])
    assert "Plugin 'typo' (registered in code) implements 'pre_requets', which is not a hook." in str(e.value)
    assert "Did you mean 'pre_request'?" in str(e.value)


def test_the_plugins_command_shows_distribution_version_hooks_options_and_components(monkeypatch):
    from click.testing import CliRunner

    from slime_router_core.cli import build_cli

    monkeypatch.syspath_prepend(str(ROOT / "tests" / "fixtures" / "site"))  # the installed 'hello' fixture plugin
    args = ["plugins", "--plugin", "hello,metrics"]
    out = CliRunner().invoke(build_cli(args), args)
    sys.modules.pop("slime_router_hello", None)
    assert out.exit_code == 0, out.output
    hello = out.output[out.output.index("hello\n"):out.output.index("metrics\n")]
    assert hello == ("hello\n  source: entry point slime_router_hello (slime-router-hello 0.1)\n"
                     "  hooks:  add_options, pre_request, register_components, register_routes\n"
                     "  distribution: slime-router-hello 0.1\n"
                     "  options: --hello-greeting (default: hello)\n"
                     "  provides: greeting\n"
                     "  requires: -\n")
    assert "  distribution: slime-router " in out.output  # core and metrics: the router's own distribution
    assert "--metrics-recent-requests (default: 100)" in out.output


def test_the_plugins_command_reports_a_start_up_that_would_fail(monkeypatch):
    from click.testing import CliRunner

    from slime_router_core.cli import build_cli

    monkeypatch.syspath_prepend(str(ROOT / "tests" / "fixtures" / "site"))
    monkeypatch.setattr("slime_router_core.cli.load_plugins", lambda select, block, *dotted: load_plugins(
        select, block, extra=[("needs", Requires("index"))]))
    args = ["plugins", "--plugin", "hello"]
    out = CliRunner().invoke(build_cli(args), args)
    sys.modules.pop("slime_router_hello", None)
    assert out.exit_code == 1
    assert "needs\n  source: registered in code" in out.output and "  requires: index" in out.output
    assert "start-up would fail: Plugin 'needs' cannot start: Required component 'index' not found" in out.output


def test_each_example_is_its_own_distribution_with_an_entry_point_readme_and_tests():
    assert sorted(p.name for p in EXAMPLES.iterdir() if p.is_dir()) == sorted(PLUGINS)
    for example, (name, package) in PLUGINS.items():
        meta = pyproject(example)["project"]
        assert meta["entry-points"]["slime_router"] == {name: package}
        assert (EXAMPLES / example / "README.md").read_text().count(f"--no-plugin {name}") >= 1
        tests = list((EXAMPLES / example / "tests").glob("test_*.py"))
        assert tests
        for test in tests:  # the examples test themselves with the shipped fixtures only
            source = test.read_text()
            assert "slime_router(" in source and "conftest" not in source
            assert "slime_router_testing" not in source and "slime_router_core" not in source, test
        assert not (EXAMPLES / example / "tests" / "conftest.py").exists()


@pytest.mark.parametrize("example", sorted(PLUGINS))
def test_the_examples_own_tests_pass_with_it_installed(example, tmp_path):
    site = install_on_path(example, tmp_path / "site")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                          str(EXAMPLES / example / "tests")], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "failed" not in out.stdout and "error" not in out.stdout.lower()


# --- slow: pip install into a fresh virtualenv -----------------------------------------------------------


def fresh_venv(path: Path) -> Path:
    """A new virtualenv that sees this environment's packages (slime-router and its dependencies: nothing heavy is
    reinstalled), through a ``.pth`` that adds this interpreter's site-packages as a site directory (so its own
    ``.pth`` files, e.g. an editable install's, work). Returns its python."""
    venv.create(path, with_pip=False, symlinks=True)
    python = path / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    parent = sysconfig.get_paths()["purelib"]
    Path(purelib, "_parent_environment.pth").write_text(f"import site; site.addsitedir({parent!r})\n")
    return python


def pip_install(python: Path, target: Path, editable: bool = False) -> None:
    """``pip install --no-deps`` (slime-router is already there) of ``target`` into ``python``'s environment, with
    this environment's pip (the new one has none) and setuptools from the package index as usual."""
    out = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q",
                          *(["-e"] if editable else []), str(target)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]


def cli(python: Path, *args: str, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-m", "slime_router_core.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=_clean_env(), cwd=cwd or python.parent)


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIME_ROUTER_")}
    env.pop("PYTHONPATH", None)
    return env


class Serving:
    """``slime-router serve`` in the virtualenv, on a free port."""

    def __init__(self, python: Path, *args: str, cwd: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([str(python), "-m", "slime_router_core.cli", "serve", "--host", "127.0.0.1",
                                      "--port", str(self.port), *args], cwd=cwd, env=_clean_env(),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)

    def __enter__(self) -> Serving:
        try:
            wait_http(self.url + "/health", timeout=60, proc=self.proc)
        except Exception:
            stop_process_group(self.proc, timeout=5)
            raise AssertionError(self.proc.stdout.read() if self.proc.stdout else "") from None
        return self

    def __exit__(self, *exc: object) -> None:
        stop_process_group(self.proc, timeout=10)
        if self.proc.stdout:
            self.proc.stdout.close()


@pytest.fixture(scope="module")
def worker(tokenizer_dir):
    from slime_router_core.tokenizers import BUILTIN_CHECKPOINT

    proc = start_mock_worker_process(hf_checkpoint=BUILTIN_CHECKPOINT)
    yield proc
    proc.kill()


def _installed(example: str, tmp_path: Path) -> Path:
    """A fresh virtualenv with the example pip-installed (from a copy: a build leaves build/ and *.egg-info/ in the
    source directory, which must not appear in the repository)."""
    python = fresh_venv(tmp_path / "venv")
    source = shutil.copytree(EXAMPLES / example, tmp_path / "src" / example,
                             ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    pip_install(python, source)
    return python


def own_tests(python: Path, example: str, cwd: Path) -> subprocess.CompletedProcess:
    """The example's tests, run by pytest in ``python``'s environment."""
    tests = str(EXAMPLES / example / "tests")
    return subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", tests], capture_output=True,
                          text=True, timeout=120, cwd=cwd, env=_clean_env())


def _lists(python: Path, *args: str) -> str:
    out = cli(python, "plugins", *args)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_rollout_logger_in_a_fresh_virtualenv(tmp_path, worker):
    example = "slime-router-rollout-logger"
    python = _installed(example, tmp_path)
    # its own tests, in the new environment (the fixtures come through slime-router's pytest11 entry point)
    out = own_tests(python, example, tmp_path)
    assert out.returncode == 0 and " passed" in out.stdout, out.stdout[-3000:] + out.stderr[-2000:]
    listed = _lists(python, "--plugin", "rollout_logger,metrics")
    assert "rollout_logger\n  source: entry point slime_router_rollout_logger (slime-router-rollout-logger 0.1.0)" \
        in listed
    assert "--rollout-logger-dir (default: rollouts)" in listed and "  provides: rollout_logger" in listed
    assert "rollout_logger" not in _lists(python, "--plugin", "rollout_logger,metrics", "--no-plugin", "rollout_logger")
    # served with it: a request's trajectory is in rollouts/ (its default directory, under the working directory)
    # with the episode header; blocked: served, and nothing is written (the directory is not even created)
    for blocked, cwd in ((False, tmp_path / "loaded"), (True, tmp_path / "blocked")):
        cwd.mkdir()
        flags = ["--worker-url", worker.url, "--hf-checkpoint", "builtin:qwen3",
                 "--plugin", "rollout_logger,radix_tree"]
        with Serving(python, *flags, *(["--no-plugin", "rollout_logger"] if blocked else []), cwd=cwd) as s:
            names = [p["name"] for p in httpx.get(s.url + "/plugins").json()]
            assert ("rollout_logger" in names) is not blocked and "radix_tree" in names
            r = httpx.post(s.url + "/generate", json={"text": "Q: hi\nA:"}, headers={"X-Episode-ID": "venv-1"},
                           timeout=30)
            assert r.status_code == 200, r.text
        assert (cwd / "rollouts").exists() is not blocked
        if not blocked:
            (line,) = [json.loads(x) for x in (cwd / "rollouts" / "rollouts-000001.jsonl").read_text().splitlines()]
            assert line["metadata"] == {"x-episode-id": "venv-1"} and line["loss_mask"][-1] == 1


def test_tenant_limits_in_a_fresh_virtualenv(tmp_path, worker):
    example = "slime-router-tenant-limits"
    python = _installed(example, tmp_path)
    out = own_tests(python, example, tmp_path)
    assert out.returncode == 0 and " passed" in out.stdout, out.stdout[-3000:] + out.stderr[-2000:]
    listed = _lists(python, "--plugin", "tenant_limits,balancing")
    assert "tenant_limits\n  source: entry point slime_router_tenant_limits (slime-router-tenant-limits 0.1.0)" \
        in listed
    assert "--tenant-limits-burst (default: 20)" in listed
    assert "tenant_limits" not in _lists(python, "--plugin", "tenant_limits,balancing", "--no-plugin", "tenant_limits")
    base = ["--worker-url", worker.url, "--plugin", "tenant_limits,balancing"]

    def statuses(url: str) -> list[int]:
        return [httpx.post(url + "/generate", json={"input_ids": [1, 2, 3]}, headers={"X-Tenant": "a"},
                           timeout=30).status_code for _ in range(4)]

    with Serving(python, *base, "--tenant-limits-rate", "0.01", "--tenant-limits-burst", "2", cwd=tmp_path) as s:
        assert statuses(s.url) == [200, 200, 429, 429]
    with Serving(python, *base, "--no-plugin", "tenant_limits", cwd=tmp_path) as s:
        assert statuses(s.url) == [200, 200, 200, 200]
        assert "tenant_limits" not in [p["name"] for p in httpx.get(s.url + "/plugins").json()]
