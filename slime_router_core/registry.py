"""ComponentRegistry: named objects plugins share (``tokenizer``, ``radix_tree``, ...).

Shared components are registered and looked up by the typed ``ComponentKey``s of ``slime_router_core.contracts``
(``registry.get(TRAJECTORY_CACHE)`` is a ``TrajectoryCache``); registering an object that lacks a member of the
key's protocol is refused at start-up, naming what is missing. Plain string names remain for components
private to a plugin.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, TypeVar, overload

if TYPE_CHECKING:  # pragma: no cover
    from .contracts import ComponentKey

T = TypeVar("T")


def missing_members(obj: Any, protocol: type) -> list[str]:
    """The members of ``protocol`` that ``obj`` lacks, or has as a plain function where the protocol wants a
    coroutine (an ``async def``): the same contract must hold in process and across one."""
    problems = []
    for name in sorted(getattr(protocol, "__protocol_attrs__", None) or _protocol_attrs(protocol)):
        if not hasattr(obj, name):
            problems.append(name)
            continue
        want = getattr(protocol, name, None)
        if inspect.iscoroutinefunction(want) and not inspect.iscoroutinefunction(getattr(obj, name)):
            problems.append(f"{name} (must be async)")
    return problems


def _protocol_attrs(protocol: type) -> set[str]:  # Python < 3.12 keeps no __protocol_attrs__
    attrs: set[str] = set()
    for base in protocol.__mro__[:-1]:
        if base.__name__ in ("Protocol", "Generic"):
            continue
        attrs.update(getattr(base, "__annotations__", {}))
        attrs.update(k for k in vars(base) if not k.startswith("_"))
    return attrs


class ComponentRegistry:
    def __init__(self) -> None:
        self._components: dict[str, Any] = {}
        self._owners: dict[str, str] = {}
        # the plugin whose ``register_components`` runs now (set by ``build_app``): the owner of what it registers
        # without naming one, so that "two plugins provide X" can name both
        self.registering = ""

    def register(self, key: str | ComponentKey[Any], obj: Any, owner: str = "") -> None:
        """Register ``obj`` under ``key``. Registering a name twice is an error; so is an object that does not
        implement the protocol of a ``ComponentKey``."""
        from .contracts import KEYS  # (contracts imports nothing of the registry: no cycle, but keep it lazy)

        name = key if isinstance(key, str) else key.name
        owner = owner or self.registering
        if isinstance(key, str) and key in KEYS:
            key = KEYS[key]
        if not isinstance(key, str):
            missing = missing_members(obj, key.protocol)
            if missing:
                raise TypeError(f"Component {name!r} ({type(obj).__name__}{f', by {owner!r}' if owner else ''}) "
                                f"does not implement {key.protocol.__module__}.{key.protocol.__name__}: missing "
                                f"{', '.join(missing)}")
        if not isinstance(name, str) or not name:
            raise ValueError("Component name must be a non-empty string")
        if name in self._components:
            first = self._owners.get(name)
            by = f" by {first!r}" if first else ""
            both = (f": plugins {first!r} and {owner!r} both provide it; load only one of them (--no-plugin NAME)"
                    if first and owner and first != owner else "; component names must be unique")
            raise ValueError(f"Component {name!r} is already registered{by}{both}")
        self._components[name] = obj
        self._owners[name] = owner

    @overload
    def get(self, key: ComponentKey[T]) -> T: ...

    @overload
    def get(self, key: str) -> Any: ...

    def get(self, key: str | ComponentKey[Any]) -> Any:
        name = key if isinstance(key, str) else key.name
        try:
            return self._components[name]
        except KeyError:
            raise RuntimeError(
                f"Required component '{name}' not found. Available components: {sorted(self._components)}"
            ) from None

    @overload
    def find(self, key: ComponentKey[T]) -> T | None: ...

    @overload
    def find(self, key: str) -> Any | None: ...

    def find(self, key: str | ComponentKey[Any]) -> Any | None:
        """The component, or None when nothing is registered under ``key`` (one lookup on hot paths)."""
        return self._components.get(key if isinstance(key, str) else key.name)

    def has(self, key: str | ComponentKey[Any]) -> bool:
        return (key if isinstance(key, str) else key.name) in self._components

    def owner(self, key: str | ComponentKey[Any]) -> str:
        """The plugin that registered ``key`` ("" when unknown)."""
        return self._owners.get(key if isinstance(key, str) else key.name, "")

    def names(self) -> list[str]:
        return sorted(self._components)

    def __contains__(self, key: str | ComponentKey[Any]) -> bool:
        return self.has(key)
