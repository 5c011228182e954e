"""Plugin discovery and loading.

- Every plugin, first-party or not, comes from the ``slime_router`` entry-point group.
- No selection: every installed plugin loads (as pytest does). ``--plugin NAME`` (repeatable)
  loads only the named ones; ``--no-plugin NAME`` blocks one; ``SLIME_ROUTER_PLUGINS=a,b``
  selects from the environment.
- ``--slime-router-middleware-paths a.b.C`` loads extra plugins by dotted path; the original
  slime names of the radix middleware are aliases for the ``radix_tree`` plugin.
- A plugin that fails to import or register stops start-up with a message naming it and the cause.
- The core's own API is the built-in plugin ``core`` (``slime_router_core.admin``), registered first and
  always: selecting plugins does not drop it, blocking it is refused.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import logging
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

import pluggy

from . import hookspecs
from .errors import MissingDependency, PluginLoadError

log = logging.getLogger("slime_router")

ENTRY_POINT_GROUP = "slime_router"
CORE = "core"  # the built-in plugin: slime_router_core.admin

# The original slime router's middleware paths, accepted for compatibility.
MIDDLEWARE_ALIASES = {
    "slime.router.middleware_hub.radix_tree_middleware.RadixTreeMiddleware": "radix_tree",
    "slime.router.middleware_hub.radix_tree_middleware": "radix_tree",
    "slime_router.middleware_hub.radix_tree_middleware.RadixTreeMiddleware": "radix_tree",
}


@dataclass
class PluginInfo:
    name: str
    source: str  # "built-in", "entry point <module> (<dist> <version>)", "dotted path", "registered in code"
    obj: Any = None
    hooks: tuple[str, ...] = ()
    distribution: str | None = None  # the installed package that declares it (None: not from a distribution)
    version: str | None = None  # that distribution's version
    # filled in when an app is built (``build_app``): the registry components this plugin registered and the
    # ones it declared it needs (``required_components``)
    provides: list[str] = field(default_factory=list)
    requires: list[str] = field(default_factory=list)


def discover() -> dict[str, Any]:
    """All installed plugins' entry points by name (not imported yet)."""
    found: dict[str, Any] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep)
    return found


def _own_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("slime-router")
    except Exception:  # pragma: no cover - running from a source tree that is not installed
        return None


def _describe_ep(ep: Any) -> str:
    dist = getattr(ep, "dist", None)
    where = f" ({dist.name} {dist.version})" if dist is not None else ""
    return f"entry point {ep.value}{where}"


def import_dotted(path: str) -> Any:
    """Import ``pkg.module`` or ``pkg.module.Attr``; classes are instantiated with no arguments."""
    try:
        return importlib.import_module(path)
    except ModuleNotFoundError as e:
        if "." not in path or (e.name and not path.startswith(e.name)):
            raise
        module_path, _, attr = path.rpartition(".")
        obj = getattr(importlib.import_module(module_path), attr)
        return obj() if inspect.isclass(obj) else obj


class PluginManager:
    """pluggy's manager plus which plugins were loaded and from where."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}
        self.skipped: dict[str, str] = {}  # installed plugins not loaded because an extra is missing: why

    @property
    def hook(self) -> Any:
        return self.pm.hook

    def register(self, obj: Any, name: str, source: str = "registered in code", *, distribution: str | None = None,
                 version: str | None = None) -> None:
        if name in self.infos:
            raise PluginLoadError(f"Plugin {name!r} is loaded twice ({self.infos[name].source} and {source})")
        try:
            self.pm.register(obj, name=name)
        except Exception as e:  # pluggy validation: a hook's unknown argument...
            raise PluginLoadError(f"Plugin {name!r} ({source}) failed to register: {type(e).__name__}: {e}") from e
        hooks = tuple(sorted(h.name for h in (self.pm.get_hookcallers(obj) or [])))
        unknown = [h for h in hooks if h not in _hook_names()]
        if unknown:  # an @hookimpl whose name is no hook (a typo) would otherwise never be called, silently
            self.pm.unregister(obj, name=name)
            raise PluginLoadError(
                f"Plugin {name!r} ({source}) implements {', '.join(repr(h) for h in unknown)}, which "
                f"{'is not a hook' if len(unknown) == 1 else 'are not hooks'}.{_did_you_mean(unknown, _hook_names())} "
                f"Hooks: {', '.join(_hook_names())}")
        self.infos[name] = PluginInfo(name=name, source=source, obj=obj, hooks=hooks, distribution=distribution,
                                      version=version)

    def names(self) -> list[str]:
        return list(self.infos)

    def name_of(self, obj: Any) -> str:
        return self.pm.get_name(obj) or repr(obj)


def _hook_names() -> list[str]:
    return sorted(n for n, f in vars(hookspecs).items() if inspect.isfunction(f) and hasattr(f, "slime_router_spec"))


def _did_you_mean(unknown: list[str], names: Any) -> str:
    close = [m for n in unknown for m in difflib.get_close_matches(n, sorted(names), n=1)]
    return f" Did you mean {', '.join(repr(m) for m in close)}?" if close else ""


def load_plugins(select: list[str] | None = None, block: list[str] | None = None,
                 dotted_paths: list[str] | None = None, extra: list[tuple[str, Any]] | None = None) -> PluginManager:
    """Build a PluginManager from installed entry points and the selection flags.

    The built-in plugin ``core`` (the router's own API) is always registered, first, whatever the selection.
    ``select``: None = every installed plugin; else only these names (``[]``: none besides ``core``).
    ``block``: names never loaded (each must name an installed plugin, a dotted path or an ``extra`` one, else
    PluginLoadError lists the installed ones; ``core`` cannot be blocked). ``dotted_paths``: extra plugins by
    import path. ``extra``: ``(name, object)`` pairs registered directly (used by tests and embedding code).
    """
    from . import admin  # not at import time: admin imports the router, which imports this module

    if CORE in (block or []):
        raise PluginLoadError(
            f"Plugin {CORE!r} cannot be blocked (--no-plugin {CORE}): it is built in and serves the router's own API "
            f"(/health, /add_worker, /remove_worker, /list_workers, /plugins and the forwarded worker endpoints); "
            f"without it the router cannot be administered.")
    manager = PluginManager()
    manager.register(admin, CORE, admin.SOURCE, distribution="slime-router", version=_own_version())
    block_set = set(block or [])
    available = discover()
    wanted: list[str] = []
    dotted: list[str] = []
    for path in dotted_paths or []:
        path = path.strip()
        if not path:
            continue
        alias = MIDDLEWARE_ALIASES.get(path)
        if alias:
            wanted.append(alias)
        else:
            dotted.append(path)
    # a blocked name must name something: a typo would otherwise block nothing, silently
    known = set(available) | set(wanted) | set(dotted) | {name for name, _ in extra or []}
    unknown_blocked = [n for n in dict.fromkeys(block or []) if n not in known]
    if unknown_blocked:
        raise PluginLoadError(
            f"Unknown plugin(s) {unknown_blocked} to block (--no-plugin): not installed."
            f"{_did_you_mean(unknown_blocked, known)} Installed plugins: {sorted(available)}"
        )
    if select is not None:
        select = [n for n in select if n != CORE]  # always loaded
        unknown = [n for n in select if n not in available]
        if unknown:
            raise PluginLoadError(
                f"Unknown plugin(s) {unknown}: not installed.{_did_you_mean(unknown, available)} "
                f"Installed plugins: {sorted(available)} "
                f"(a plugin is installed by a package that declares a '{ENTRY_POINT_GROUP}' entry point)"
            )
        names = list(dict.fromkeys(list(select) + wanted))
    else:
        names = list(available)
        names += [n for n in wanted if n not in names]
    for name in names:
        if name in block_set:
            continue
        ep = available.get(name)
        if ep is None:
            raise PluginLoadError(f"Plugin {name!r} is not installed. Installed plugins: {sorted(available)}")
        source = _describe_ep(ep)
        try:
            obj = ep.load()
            if inspect.isclass(obj):
                obj = obj()
        except MissingDependency as e:
            if select is None:  # "every installed plugin": one whose extra is not installed is left out, said so
                manager.skipped[name] = str(e)
                log.warning("plugin %r skipped: %s", name, e)
                continue
            raise PluginLoadError(f"Plugin {name!r} ({source}) cannot load: {e}") from e
        except Exception as e:
            raise PluginLoadError(f"Plugin {name!r} ({source}) failed to import: {type(e).__name__}: {e}") from e
        dist = getattr(ep, "dist", None)
        manager.register(obj, name, source, distribution=getattr(dist, "name", None),
                         version=getattr(dist, "version", None))
    for path in dotted:
        if path in block_set:
            continue
        try:
            obj = import_dotted(path)
        except Exception as e:
            raise PluginLoadError(f"Plugin {path!r} (dotted path) failed to import: {type(e).__name__}: {e}") from e
        manager.register(obj, path, "dotted path")
    for name, obj in extra or []:
        if name not in block_set:
            manager.register(obj, name, "registered in code")
    return manager
