"""ComponentRegistry: named objects plugins share (``tokenizer``, ``radix_tree``, ...)."""

from __future__ import annotations

from typing import Any


class ComponentRegistry:
    def __init__(self) -> None:
        self._components: dict[str, Any] = {}
        self._owners: dict[str, str] = {}

    def register(self, name: str, obj: Any, owner: str = "") -> None:
        """Register ``obj`` under ``name``. Registering a name twice is an error."""
        if not isinstance(name, str) or not name:
            raise ValueError("Component name must be a non-empty string")
        if name in self._components:
            by = f" by {self._owners[name]!r}" if self._owners.get(name) else ""
            raise ValueError(f"Component {name!r} is already registered{by}; component names must be unique")
        self._components[name] = obj
        self._owners[name] = owner

    def get(self, name: str) -> Any:
        try:
            return self._components[name]
        except KeyError:
            raise RuntimeError(
                f"Required component '{name}' not found. Available components: {sorted(self._components)}"
            ) from None

    def find(self, name: str) -> Any | None:
        """The component, or None when nothing is registered under ``name`` (one lookup on hot paths)."""
        return self._components.get(name)

    def has(self, name: str) -> bool:
        return name in self._components

    def names(self) -> list[str]:
        return sorted(self._components)

    def __contains__(self, name: str) -> bool:
        return name in self._components
