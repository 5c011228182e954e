"""``slime-router new-plugin NAME``: a plugin package whose own test passes, installed as a user would install it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from slime_router_core import Settings
from slime_router_core.cli import build_cli
from slime_router_core.plugin_template import names


def new_plugin(*args: str) -> object:
    argv = ["new-plugin", *args]
    return CliRunner().invoke(build_cli(argv), argv)


def install_on_path(project: Path, site: Path) -> Path:
    """A site directory where the generated package is installed as pip would (its dist-info's entry points are
    the pyproject's), without pip."""
    tomllib = pytest.importorskip("tomllib")
    meta = tomllib.loads((project / "pyproject.toml").read_text())["project"]
    package = meta["entry-points"]["slime_router"]
    site.mkdir(parents=True)
    for module in package.values():
        (site / module).symlink_to(project / module)
    info = site / f"{meta['name'].replace('-', '_')}-{meta['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {meta['name']}\nVersion: {meta['version']}\n")
    (info / "entry_points.txt").write_text("[slime_router]\n" + "".join(f"{k} = {v}\n" for k, v in package.items()))
    return site


def test_new_plugin_writes_a_package_with_entry_point_readme_and_test(tmp_path):
    out = new_plugin("my-plugin", "--dir", str(tmp_path / "p"))
    assert out.exit_code == 0, out.output
    root = tmp_path / "p"
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) == [
        "README.md", "pyproject.toml", "slime_router_my_plugin/__init__.py", "tests/test_my_plugin.py"]
    pyproject = (root / "pyproject.toml").read_text()
    assert '[project.entry-points.slime_router]\nmy_plugin = "slime_router_my_plugin"' in pyproject
    assert 'name = "slime-router-my-plugin"' in pyproject
    for path in root.rglob("*"):
        if path.is_file():
            assert "{{" not in path.read_text(), path  # every placeholder filled in
    assert "--my-plugin-tag" in (root / "README.md").read_text()


def test_the_default_directory_is_the_distribution_name_and_nothing_is_overwritten(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert new_plugin("thing").exit_code == 0
    assert (tmp_path / "slime-router-thing" / "slime_router_thing" / "__init__.py").exists()
    again = new_plugin("thing")
    assert again.exit_code == 2 and "exists and is not empty" in again.output


@pytest.mark.parametrize("bad", ["My Plugin", "1st", "core", "a__b", "x_", "x-"])
def test_a_name_that_cannot_be_a_plugin_name_is_refused(bad, tmp_path):
    out = new_plugin(bad, "--dir", str(tmp_path / "p"))
    assert out.exit_code == 2 and "Invalid plugin name" in out.output
    assert not (tmp_path / "p").exists()


def test_names_derived_from_the_plugin_name():
    assert names("my-plugin") | {"version": ""} == {"name": "my_plugin", "dashed": "my-plugin",
                                                   "package": "slime_router_my_plugin",
                                                   "dist": "slime-router-my-plugin", "version": ""}
    assert names("slime_router_x")["package"] == "slime_router_x"  # not slime_router_slime_router_x


def test_the_generated_plugin_loads_and_works_in_process(tmp_path, monkeypatch, router, mock_worker):
    """The generated plugin, discovered through its entry point, does what its README says (fast, no pip)."""
    assert new_plugin("tagger", "--dir", str(tmp_path / "p")).exit_code == 0
    monkeypatch.syspath_prepend(str(install_on_path(tmp_path / "p", tmp_path / "site")))
    try:
        w = mock_worker()
        r = router(plugins=["tagger"], settings=Settings(worker_urls=[w.url], extra={"tagger_tag": "t1"}))
        got = httpx.post(r.url + "/generate", json={"input_ids": [1, 2, 3]}).json()
        assert got["meta_info"]["tagger"] == "t1"  # --tagger-tag t1
        assert httpx.get(r.url + "/tagger/status").json() == {"plugin": "tagger", "workers": [w.url]}
    finally:
        sys.modules.pop("slime_router_tagger", None)


def test_the_generated_plugins_own_tests_pass(tmp_path):
    """Slow: its test file, run by pytest in a child process with the package installed (on a path)."""
    assert new_plugin("tagger", "--dir", str(tmp_path / "p")).exit_code == 0
    site = install_on_path(tmp_path / "p", tmp_path / "site")
    env = dict(os.environ, PYTHONPATH=str(site))
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
                         cwd=tmp_path / "p", capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and "3 passed" in out.stdout, out.stdout[-3000:] + out.stderr[-2000:]


def test_the_generated_plugin_in_a_fresh_virtualenv(tmp_path):
    """Slow: ``pip install`` of the generated package in a new virtualenv; its tests pass there and
    ``slime-router plugins`` lists it with its option."""
    from test_example_plugins import _clean_env, cli, fresh_venv, pip_install

    assert new_plugin("tagger", "--dir", str(tmp_path / "p")).exit_code == 0
    python = fresh_venv(tmp_path / "venv")
    pip_install(python, tmp_path / "p")
    out = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], cwd=tmp_path / "p",
                         capture_output=True, text=True, env=_clean_env(), timeout=120)
    assert out.returncode == 0 and "3 passed" in out.stdout, out.stdout[-3000:] + out.stderr[-2000:]
    listed = cli(python, "plugins", "--plugin", "tagger")
    assert listed.returncode == 0, listed.stderr
    assert "tagger\n  source: entry point slime_router_tagger (slime-router-tagger 0.1.0)" in listed.stdout
    assert "--tagger-tag (default: tagger)" in listed.stdout
