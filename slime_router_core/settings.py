"""Settings: the core's and the plugins' flags, read from the command line or the environment.

A plugin declares its options once, as the fields of a ``PluginConfig`` dataclass (type, default, help, choices,
parsing, validation), and reads them back as one typed object::

    @dataclass(frozen=True)
    class RadixTreeConfig(PluginConfig):
        flag_prefix = "--radix-tree-"
        max_size: int = option(DEFAULT_MAX_TOKENS, help="...", check=positive)   # --radix-tree-max-size

    @hookimpl
    def add_options(options): options.add_config(RadixTreeConfig)

    config = router.settings.config(RadixTreeConfig)   # in register_components: typed, validated, cached
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

C = TypeVar("C", bound="PluginConfig")
_OPTION = "slime_router_option"


@dataclass(frozen=True)
class OptionSpec:
    """How one ``PluginConfig`` field is given on the command line (see ``option``)."""

    help: str
    flag: str | None = None
    aliases: tuple[str, ...] = ()
    choices: tuple[str, ...] | None = None
    parse: Callable[[Any], Any] | None = None
    check: Callable[[Any], str | None] | None = None
    envvar: str | None = None


def option(default: Any = None, *, help: str, flag: str | None = None, aliases: tuple[str, ...] = (),
           choices: tuple[str, ...] | None = None, parse: Callable[[Any], Any] | None = None,
           check: Callable[[Any], str | None] | None = None, envvar: str | None = None) -> Any:
    """A ``PluginConfig`` field that is a command-line option.

    ``flag``: default ``flag_prefix`` + the field name with dashes. The value's type is the field's annotation
    (``int``, ``float``, ``str``, ``bool`` -- a switch --, optionally ``| None``); ``parse`` turns the raw value
    (a string from the command line or the environment, or whatever code put in ``Settings.extra``) into it
    instead; ``check`` answers an error message for a bad value, or ``None``.
    """
    spec = OptionSpec(help=help, flag=flag, aliases=tuple(aliases), choices=choices, parse=parse, check=check,
                      envvar=envvar)
    return field(default=default, metadata={_OPTION: spec})


def at_least(n: float) -> Callable[[float], str | None]:
    """An ``option(check=...)`` for a lower bound."""
    return lambda v: None if v >= n else f"must be at least {n:g}"


def _scalar(tp: Any) -> tuple[Any, bool]:
    """(the base type, whether None is allowed) of an annotation like ``int`` or ``float | None``."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else Any), True
    return tp, False


class PluginConfig:
    """Base of a plugin's typed configuration (a frozen dataclass whose ``option`` fields are its flags)."""

    flag_prefix: ClassVar[str] = ""

    @classmethod
    def options(cls) -> list[tuple[dataclasses.Field, OptionSpec, str, Any, bool]]:
        """(field, spec, flag, base type, optional) for every option field."""
        hints = typing.get_type_hints(cls)
        out = []
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            spec = f.metadata.get(_OPTION)
            if spec is None:
                continue
            base, optional = _scalar(hints[f.name])
            out.append((f, spec, spec.flag or cls.flag_prefix + f.name.replace("_", "-"), base, optional))
        return out

    @classmethod
    def from_settings(cls: type[C], settings: Settings) -> C:
        """The config from ``settings`` (defaults for what is not given), every value converted and checked; a bad
        value raises ValueError naming the flag, the value and what is expected."""
        values = {}
        for f, spec, flag, base, optional in cls.options():
            dest = flag.lstrip("-").replace("-", "_")
            raw = settings.extra.get(dest)
            if raw is None:
                value = f.default
            else:
                try:
                    value = spec.parse(raw) if spec.parse is not None else _convert(raw, base)
                except (TypeError, ValueError) as e:
                    raise ValueError(f"Invalid value for {flag}: {raw!r} ({e})") from None
            if value is None and not optional and f.default is not None:
                value = f.default
            if spec.choices is not None and value not in spec.choices:
                raise ValueError(f"Invalid value for {flag}: {value!r}. Valid values: {', '.join(spec.choices)}")
            problem = spec.check(value) if spec.check is not None and value is not None else None
            if problem:
                raise ValueError(f"Invalid value for {flag}: {value!r}: {problem}")
            values[f.name] = value
        return cls(**values)


def _convert(raw: Any, base: Any) -> Any:
    if base is bool:
        if isinstance(raw, str):
            low = raw.strip().lower()
            if low not in ("1", "true", "yes", "on", "0", "false", "no", "off", ""):
                raise ValueError("expected a boolean (true/false)")
            return low in ("1", "true", "yes", "on")
        return bool(raw)
    if base is int:
        if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
            raise ValueError("expected a whole number")
        return int(raw)
    if base is float:
        if isinstance(raw, bool):
            raise ValueError("expected a number")
        return float(raw)
    if base is str:
        return str(raw)
    return raw


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

    def add_config(self, config: type[PluginConfig]) -> None:
        """Declare every option field of a ``PluginConfig`` (each flag once, with its type, default and help)."""
        for f, spec, flag, base, _ in config.options():
            default, help = f.default, spec.help
            plain = spec.parse is None and base in (int, float, str, bool)
            if not plain:
                # given as text and parsed into the field's type: the command line's default is "not given" (the
                # field's default applies), shown in the help as text
                shown = ",".join(sorted(map(str, default))) if isinstance(default, (set, frozenset, list, tuple)) \
                    else default
                default, help = None, f"{help} [default: {shown}]"
            self.add(flag, type=base if plain else str, default=default, help=help, aliases=spec.aliases,
                     is_flag=base is bool, envvar=spec.envvar, choices=spec.choices)


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
    max_concurrent_requests: int = 0  # generations in flight through the router; 0: unlimited
    max_queued_requests: int = 1024  # beyond the limit, how many wait for a slot (then 429)
    queue_timeout: float = 30.0  # seconds a request may wait in that queue (then 429)
    connect_timeout: float = 5.0
    request_timeout: float | None = None  # --request-timeout; None: generations may take as long as they take
    # access control (slime_router_core/access.py); the keys are never shown (repr, logs, errors)
    api_key: str | None = field(default=None, repr=False)  # data plane: Authorization: Bearer <key>
    admin_api_key: str | None = field(default=None, repr=False)  # state-changing routes
    worker_allowlist: list[str] = field(default_factory=list)  # hosts, host:port, CIDRs a worker may be at
    extra: dict[str, Any] = field(default_factory=dict)
    _configs: dict[type, Any] = field(default_factory=dict, repr=False, compare=False)

    def config(self, config: type[C]) -> C:
        """The plugin's typed config (built and checked on first use, then cached)."""
        got = self._configs.get(config)
        if got is None:
            got = self._configs[config] = config.from_settings(self)
        return got

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
