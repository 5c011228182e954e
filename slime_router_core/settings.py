"""Settings: the core's and the plugins' flags, read from the command line or the environment."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Option:
    flag: str  # "--radix-tree-max-size"
    type: Callable[[str], Any] = str
    default: Any = None
    help: str = ""
    aliases: tuple[str, ...] = ()
    is_flag: bool = False  # a boolean switch
    multiple: bool = False  # repeatable
    envvar: str = ""
    owner: str = ""
    choices: tuple[Any, ...] | None = None  # the accepted values (``--help`` lists them; others are refused)

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


class OptionRegistry:
    """Collects flags declared by plugins through the ``add_options`` hook."""

    def __init__(self, owner: str = "") -> None:
        self.options: dict[str, Option] = {}
        self.owner = owner

    def add(self, flag: str, *, type: Callable[[str], Any] = str, default: Any = None, help: str = "",
            aliases: list[str] | tuple[str, ...] = (), is_flag: bool = False, multiple: bool = False,
            envvar: str | None = None, choices: list[Any] | tuple[Any, ...] | None = None) -> None:
        if not flag.startswith("--"):
            raise ValueError(f"Option {flag!r} must start with '--'")
        if choices is not None:
            choices = tuple(choices)
            if is_flag or not choices or not all(isinstance(c, str) for c in choices):
                raise ValueError(f"Option {flag}: choices must be a non-empty list of strings (not for a flag)")
            if default is not None and not all(d in choices for d in (default if multiple else [default])):
                raise ValueError(f"Option {flag}: the default {default!r} is not one of its choices {list(choices)}")
        opt = Option(flag=flag, type=type, default=default, help=help, aliases=tuple(aliases), is_flag=is_flag,
                     multiple=multiple, owner=self.owner, choices=choices)
        opt.envvar = envvar or "SLIME_ROUTER_" + opt.dest.upper()
        if opt.dest in self.options:
            raise ValueError(f"Option {flag} is declared twice ({self.options[opt.dest].owner!r} and {self.owner!r})")
        self.options[opt.dest] = opt


@dataclass
class Settings:
    """All settings. Core fields are attributes; plugin flags live in ``extra`` and read as attributes."""

    host: str = "0.0.0.0"
    port: int = 30000
    worker_urls: list[str] = field(default_factory=list)
    hf_checkpoint: str | None = None
    verbose: bool = False
    max_body_size: int = 64 * 1024 * 1024
    max_attempts: int = 3
    connect_timeout: float = 5.0
    request_timeout: float | None = None  # None: generations may take as long as they take
    extra: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails: plugin options.
        extra = self.__dict__.get("extra", {})
        if name in extra:
            return extra[name]
        raise AttributeError(f"No setting {name!r} (is the plugin that declares it loaded?)")

    def get(self, name: str, default: Any = None) -> Any:
        try:
            return getattr(self, name)
        except AttributeError:
            return default

    def with_defaults(self, options: OptionRegistry) -> Settings:
        """Fill in defaults for plugin options not given (used when building apps in code/tests), and refuse a
        value that is not one of its option's ``choices`` (ValueError naming the flag and the valid values)."""
        for dest, opt in options.options.items():
            if dest not in self.extra:
                self.extra[dest] = list(opt.default or []) if opt.multiple else opt.default
            elif opt.choices is not None:
                value = self.extra[dest]
                for v in (value or []) if opt.multiple else [value]:
                    if v is not None and v not in opt.choices:
                        raise ValueError(f"Invalid value for {opt.flag}: {v!r}. Valid values: "
                                         f"{', '.join(opt.choices)} (plugin {opt.owner!r})")
        return self
