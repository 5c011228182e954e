"""Meta-tests for the plugin documentation (after datasette's): the hook reference in ``docs/plugins/hooks.md`` is
checked against the hookspecs, every hookspec is documented and exercised by a named test, every example runs,
and no document names a hook that does not exist or a file outside the repository.

The reference's facts (arguments, return type, first-result, sync or awaitable, the docstring) sit between
``<!-- generated: NAME -->`` and ``<!-- end generated -->`` markers; after changing a hookspec, regenerate them with
``python tests/test_plugin_docs.py`` (the examples and "Tested by" lines around them are written by hand).
"""

from __future__ import annotations

import ast
import inspect
import re
import sys
import textwrap
import types
from pathlib import Path

import httpx
import pytest

from slime_router_core import PluginLoadError, hookspecs
from slime_router_core.plugins import PluginManager

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
REFERENCE = DOCS / "plugins" / "hooks.md"
HOOKS = sorted(name for name, f in vars(hookspecs).items() if inspect.isfunction(f) and hasattr(f, "slime_router_spec"))
GENERATED = re.compile(r"<!-- generated: (\w+) -->\n(.*?)<!-- end generated -->\n", re.S)
SECTION = re.compile(r"^## `(\w+)\(([^)]*)\)`\n(.*?)(?=^## |\Z)", re.S | re.M)
TESTED_BY = re.compile(r"^\*\*Tested by:\*\* (.+)$", re.M)


def spec_of(name: str) -> object:
    return getattr(hookspecs, name)


def generated_block(name: str) -> str:
    """The facts of one hook, from its hookspec: what the reference must say between its markers."""
    spec = spec_of(name)
    sig = inspect.signature(spec)  # type: ignore[arg-type]
    args = "; ".join(f"`{p.name}: {p.annotation}`" for p in sig.parameters.values()) or "none"
    returns = str(sig.return_annotation)
    firstresult = spec.slime_router_spec["firstresult"]  # type: ignore[attr-defined]
    if "Awaitable" in returns:
        mode = "may return an awaitable (an `async def` implementation is fine): the core awaits it"
    else:
        mode = "synchronous: the core does not await what it returns (no `async def`)"
    result = ("**firstresult**: implementations are called in order until one returns something other than "
              "`None`; that answer wins and the rest are not called" if firstresult else
              "every implementation is called; the core uses their results as described below" if returns not in (
                  "None", "Awaitable[None] | None") else "every implementation is called; results are ignored")
    doc = textwrap.dedent(spec.__doc__ or "").strip()  # type: ignore[attr-defined]
    first, _, rest = doc.partition("\n")
    doc = first.strip() + ("\n" + textwrap.dedent(rest) if rest else "")
    quoted = "\n".join(("> " + line).rstrip() for line in doc.splitlines())
    cell = f"`{returns}`".replace("|", "\\|")  # a literal | inside a table cell
    args = args.replace("|", "\\|")
    return (f"| | |\n|---|---|\n| arguments | {args} |\n| returns | {cell} |\n| calls | {result} |\n"
            f"| sync or async | {mode} |\n\nFrom the hookspec's docstring:\n\n{quoted}\n\n")


def regenerate(text: str) -> str:
    return GENERATED.sub(lambda m: f"<!-- generated: {m.group(1)} -->\n{generated_block(m.group(1))}"
                                   f"<!-- end generated -->\n", text)


def sections() -> dict[str, tuple[str, str]]:
    return {m.group(1): (m.group(2), m.group(3)) for m in SECTION.finditer(REFERENCE.read_text())}


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


def documents() -> list[Path]:
    return sorted(DOCS.rglob("*.md")) + sorted((ROOT / "examples" / "plugins").rglob("README.md"))


def run_as_module(source: str, name: str) -> types.ModuleType:
    """Execute a documentation example as a module (in ``sys.modules`` while it runs: dataclasses look it up)."""
    module = types.ModuleType(name)
    sys.modules[name] = module
    try:
        exec(compile(source, name, "exec"), module.__dict__)
    finally:
        del sys.modules[name]
    return module


def hookimpls_in(source: str) -> list[tuple[str, list[str]]]:
    """(name, argument names) of every function decorated with ``hookimpl`` / ``hookimpl(...)`` in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for dec in node.decorator_list:
                target = dec.func if isinstance(dec, ast.Call) else dec
                if (isinstance(target, ast.Name) and target.id == "hookimpl") or (
                        isinstance(target, ast.Attribute) and target.attr == "hookimpl"):
                    found.append((node.name, [a.arg for a in node.args.args if a.arg != "self"]))
    return found


# --- the reference and the hookspecs ----------------------------------------------------------------------


def test_every_hookspec_has_a_section_with_its_signature_and_no_section_names_another_hook():
    got = sections()
    assert sorted(got) == HOOKS, f"missing: {set(HOOKS) - set(got)}; not hooks: {set(got) - set(HOOKS)}"
    for name, (params, _) in got.items():
        assert params == ", ".join(inspect.signature(spec_of(name)).parameters), name  # type: ignore[arg-type]


def test_each_section_carries_its_generated_facts_and_they_match_the_hookspecs():
    text = REFERENCE.read_text()
    for name, (_, body) in sections().items():
        assert f"<!-- generated: {name} -->" in body, f"{name}: no generated block"
    assert [m.group(1) for m in GENERATED.finditer(text)] == [m.group(1) for m in SECTION.finditer(text)]
    assert regenerate(text) == text, "docs/plugins/hooks.md is out of date: run `python tests/test_plugin_docs.py`"


def test_the_generated_facts_say_firstresult_and_awaitable_as_the_specs_declare():
    """The generator itself: a firstresult hook, an awaitable one and a synchronous one read as they are."""
    assert "**firstresult**" in generated_block("select_worker")
    assert "**firstresult**" not in generated_block("post_response")
    assert "may return an awaitable" in generated_block("pre_request")
    assert "synchronous" in generated_block("select_worker")
    assert "> Choose the worker for this attempt" in generated_block("select_worker")


# --- examples -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", HOOKS)
def test_each_hook_has_an_example_implementing_it_that_registers_with_the_real_plugin_manager(name):
    _, body = sections()[name]
    blocks = python_blocks(body)
    assert blocks, f"{name}: no example"
    implemented = {impl for block in blocks for impl, _ in hookimpls_in(block)}
    assert name in implemented, f"{name}: its example implements {implemented}"
    for i, block in enumerate(blocks):
        module = run_as_module(block, f"hooks_md_{name}_{i}")
        manager = PluginManager()
        manager.register(module, module.__name__)  # pluggy refuses an unknown argument...
        manager.pm.check_pending()  # ... and this an unknown hook


def test_no_document_names_a_hook_that_does_not_exist():
    for path in documents() + [ROOT / "README.md"]:
        text = path.read_text()
        for block in python_blocks(text):
            for impl, args in hookimpls_in(block):
                assert impl in HOOKS, f"{path.relative_to(ROOT)}: @hookimpl {impl} is not a hook"
                allowed = set(inspect.signature(spec_of(impl)).parameters)  # type: ignore[arg-type]
                assert set(args) <= allowed, f"{path.relative_to(ROOT)}: {impl}({args}) takes unknown arguments"
        for named in re.findall(r"`(\w+)(?:\([^)`]*\))?` hook|hook `(\w+)", text):
            for hook in filter(None, named):
                assert hook in HOOKS, f"{path.relative_to(ROOT)} names the hook {hook!r}, which does not exist"


def test_the_checks_above_catch_a_made_up_hook():
    """The checks fail on what they are meant to catch (so they are not vacuous)."""
    bad = "from slime_router_core import hookimpl\n\n@hookimpl\ndef pre_requets(ctx):\n    pass\n"
    assert hookimpls_in(bad) == [("pre_requets", ["ctx"])] and "pre_requets" not in HOOKS
    with pytest.raises(PluginLoadError, match="implements 'pre_requets', which is not a hook"):
        PluginManager().register(run_as_module(bad, "bad"), "bad")


# --- every hook is exercised by a test --------------------------------------------------------------------


@pytest.mark.parametrize("name", HOOKS)
def test_every_hook_names_tests_that_exist_and_implement_it(name):
    """Each section's "Tested by" names ``path::test``; the test must exist and its module implement the hook (a
    ``@hookimpl`` of that name) -- for a test of an example plugin, the example's package does --, so deleting the
    test or the implementation fails here."""
    _, body = sections()[name]
    lines = TESTED_BY.findall(body)
    assert lines, f"{name}: no **Tested by:** line"
    refs = re.findall(r"`([\w/.\-]+\.py)::(\w+)`", lines[0])
    assert refs, f"{name}: Tested by names no `path::test`"
    for path, test in refs:
        source = (ROOT / path).read_text()
        tree = ast.parse(source)
        tests = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        assert test in tests, f"{name}: {path}::{test} does not exist"
        parts = Path(path).parts
        if parts[:2] == ("examples", "plugins"):  # the example's own package implements it
            source = "\n".join(p.read_text() for p in (ROOT / Path(*parts[:3])).rglob("*.py") if "tests" not in p.parts)
        assert name in {impl for impl, _ in hookimpls_in(source)}, f"{name}: {path} implements no {name}"


# --- documents stay inside the repository -----------------------------------------------------------------


def test_no_document_links_to_a_file_outside_the_repository_or_to_a_missing_one():
    for path in documents() + [ROOT / "docs" / "token-exactness.md"]:
        text = path.read_text()
        assert "../shared" not in text, path
        for target in re.findall(r"\]\(([^)#\s\"'`]+)(?:#[^)]*)?\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            resolved = (path.parent / target).resolve()
            assert resolved.is_relative_to(ROOT), f"{path.relative_to(ROOT)} links outside the repository: {target}"
            assert resolved.exists(), f"{path.relative_to(ROOT)} links to a missing file: {target}"


# --- "write your first plugin", run as printed --------------------------------------------------------------

FIRST = DOCS / "plugins" / "first-plugin.md"


def first_plugin_files() -> dict[str, str]:
    """The page's files: each code block whose first line is ``# <file name>``."""
    blocks = re.findall(r"```(?:python|toml)\n# ([\w.]+)\n(.*?)```", FIRST.read_text(), re.S)
    return {name: body for name, body in blocks}


def first_plugin_listing() -> str:
    from importlib.metadata import version

    listing = re.search(r"```text\n(.*?)```", FIRST.read_text(), re.S)
    assert listing
    return listing.group(1).replace("VERSION", version("slime-router"))


def write_first_plugin(root: Path) -> Path:
    root.mkdir(parents=True)
    for name, body in first_plugin_files().items():
        (root / name).write_text(body)
    return root


def test_the_first_plugin_page_has_about_twenty_lines_of_plugin_code_and_its_package():
    files = first_plugin_files()
    assert sorted(files) == ["pyproject.toml", "token_count.py"]
    code = [ln for ln in files["token_count.py"].splitlines() if ln.strip()]
    assert 12 <= len(code) <= 25, len(code)
    assert "pip install -e .\nslime-router plugins --plugin token_count\n" in FIRST.read_text()


def test_the_first_plugin_works_as_the_page_says(tmp_path, monkeypatch, router, mock_worker):
    """The page's two files, installed (a dist-info with the page's entry point, on sys.path), listed by
    ``slime-router plugins`` exactly as printed, then serving a request."""
    from click.testing import CliRunner

    from slime_router_core.cli import build_cli

    tomllib = pytest.importorskip("tomllib")
    project = write_first_plugin(tmp_path / "token-count")
    meta = tomllib.loads((project / "pyproject.toml").read_text())["project"]
    info = tmp_path / f"{meta['name'].replace('-', '_')}-{meta['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {meta['name']}\nVersion: {meta['version']}\n")
    (info / "entry_points.txt").write_text("[slime_router]\n" + "".join(
        f"{k} = {v}\n" for k, v in meta["entry-points"]["slime_router"].items()))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(project))
    try:
        args = ["plugins", "--plugin", "token_count"]
        out = CliRunner().invoke(build_cli(args), args)
        assert out.exit_code == 0, out.output
        assert out.output == first_plugin_listing()
        w = mock_worker()
        r = router(plugins=["token_count"], worker_urls=[w.url])
        totals = [httpx.post(r.url + "/generate", json={"input_ids": [1, 2, 3]}, headers={"X-Episode-ID": "ep-1"})
                  .json()["meta_info"]["episode_tokens"] for _ in range(2)]
        generated = [len(rec["output_ids"]) for rec in httpx.get(w.url + "/mock/records").json()]
        assert totals == [generated[0], generated[0] + generated[1]]
        assert httpx.get(r.url + "/token_count").json() == {"ep-1": totals[1]}
    finally:
        sys.modules.pop("token_count", None)


def test_the_first_plugin_from_pip_install_to_a_request_in_a_fresh_virtualenv(tmp_path, mock_worker_process):
    """Slow: ``pip install -e .`` of the page's files in a new virtualenv; ``slime-router plugins`` prints what the
    page shows; ``slime-router serve`` answers with ``episode_tokens``."""
    from test_example_plugins import Serving, cli, fresh_venv, pip_install

    project = write_first_plugin(tmp_path / "token-count")
    python = fresh_venv(tmp_path / "venv")
    pip_install(python, project, editable=True)
    listed = cli(python, "plugins", "--plugin", "token_count")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout == first_plugin_listing()
    worker = mock_worker_process()
    with Serving(python, "--worker-url", worker.url, "--plugin", "token_count", cwd=tmp_path) as s:
        got = httpx.post(s.url + "/generate", json={"input_ids": [1, 2, 3]}, headers={"X-Episode-ID": "ep-1"},
                         timeout=30).json()
        assert got["meta_info"]["episode_tokens"] == len(got["output_ids"]) > 0
        assert httpx.get(s.url + "/token_count").json() == {"ep-1": len(got["output_ids"])}


if __name__ == "__main__":  # regenerate the reference's generated blocks
    REFERENCE.write_text(regenerate(REFERENCE.read_text()))
    print(f"regenerated {REFERENCE.relative_to(ROOT)}", file=sys.stderr)
