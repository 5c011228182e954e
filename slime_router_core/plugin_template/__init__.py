"""The template ``slime-router new-plugin NAME`` renders: a plugin package with its entry point, README and a test.

The files are in ``files/`` (``package/`` becomes the plugin's import package); in them ``{{name}}`` is the plugin's
name (``my_plugin``), ``{{dashed}}`` its dashed form (``my-plugin``), ``{{package}}`` the import package
(``slime_router_my_plugin``), ``{{dist}}`` the distribution (``slime-router-my-plugin``) and ``{{version}}`` the
slime-router version the plugin was made with.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any

NAME = re.compile(r"^[a-z][a-z0-9]*(?:[_-][a-z0-9]+)*$")
RESERVED = {"core"}


def names(name: str) -> dict[str, str]:
    """The substitutions for a plugin ``name`` (ValueError for one that is not a lower-case identifier)."""
    if not NAME.match(name) or name.replace("-", "_") in RESERVED:
        raise ValueError(f"Invalid plugin name {name!r}: use lower-case letters, digits, '_' or '-', starting with a "
                         f"letter (e.g. my_plugin){'; core is the built-in plugin' if name == 'core' else ''}")
    under = name.replace("-", "_")
    package = under if under.startswith("slime_router_") else f"slime_router_{under}"
    return {"name": under, "dashed": under.replace("_", "-"), "package": package,
            "dist": package.replace("_", "-"), "version": _version()}


def render(name: str, target: Path) -> list[Path]:
    """Write the plugin package for ``name`` into the new directory ``target``; the files written."""
    subs = names(name)
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{target} exists and is not empty")
    root = resources.files(__name__).joinpath("files")
    written = []
    for source, relative in _walk(root, ""):
        for key, value in subs.items():
            relative = relative.replace("{{" + key + "}}", value)
        path = target / relative.replace("package", subs["package"], 1).removesuffix(".tmpl")
        path.parent.mkdir(parents=True, exist_ok=True)
        text = source.read_text(encoding="utf-8")
        for key, value in subs.items():
            text = text.replace("{{" + key + "}}", value)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def _walk(node: Any, prefix: str) -> list[tuple[Any, str]]:
    """(file, path relative to the template root) of every ``.tmpl`` file (``node``: an importlib Traversable)."""
    out: list[tuple[Any, str]] = []
    for child in sorted(node.iterdir(), key=lambda c: c.name):
        relative = f"{prefix}{child.name}"
        if child.is_dir():
            out += _walk(child, relative + "/")
        elif child.name.endswith(".tmpl"):
            out.append((child, relative))
    return out


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("slime-router")
    except Exception:  # pragma: no cover - a source tree that is not installed
        return "0"
