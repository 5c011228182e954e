"""Each plugin declares its options once (a PluginConfig) and reads them back typed and checked."""

from __future__ import annotations

import dataclasses

import pytest

from slime_router_core import PluginLoadError, Settings
from slime_router_core.app import build_app, collect_options
from slime_router_core.plugins import load_plugins
from slime_router_core.settings import OptionRegistry, PluginConfig, option
from slime_router_core.tokenizers import BUILTIN_CHECKPOINT
from slime_router_plugins.balancing.plugin import BalancingConfig
from slime_router_plugins.metrics.plugin import MetricsConfig
from slime_router_plugins.openai_compat.config import OpenAIConfig
from slime_router_plugins.radix_tree.plugin import RadixTreeConfig

CONFIGS = {"radix_tree": RadixTreeConfig, "balancing": BalancingConfig, "metrics": MetricsConfig,
           "openai_compat": OpenAIConfig}


def test_every_first_party_option_comes_from_its_plugins_config():
    options = collect_options(load_plugins(list(CONFIGS))).options
    for plugin, config in CONFIGS.items():
        declared = {opt.dest: opt for opt in options.values() if opt.owner == plugin}
        from_config = {flag.lstrip("-").replace("-", "_"): (f, spec) for f, spec, flag, _, _ in config.options()}
        assert set(declared) == set(from_config), plugin  # nothing declared by hand beside the config
        for dest, (f, spec) in from_config.items():
            # the default lives in one place: the command line's is the field's (or, for a value parsed from text,
            # "not given", so that the field's applies)
            assert declared[dest].default == (None if spec.parse else f.default), dest
        built = Settings().with_defaults(collect_options(load_plugins([plugin]))).config(config)
        assert built == config(), plugin


@pytest.mark.parametrize("extra,message", [
    ({"radix_tree_max_size": 0}, r"--radix-tree-max-size: 0: must be at least 1"),
    ({"radix_tree_gc_k": "five"}, r"--radix-tree-gc-k: 'five'"),
    ({"metrics_recent_requests": -1}, r"--metrics-recent-requests: -1: must be at least 0"),
    ({"openai_history_size": 0}, r"--openai-history-size: 0: must be at least 1"),
    ({"health_check_timeout": "soon"}, r"--health-check-timeout: 'soon'"),
])
def test_a_bad_value_stops_start_up_naming_the_flag(extra, message):
    with pytest.raises(PluginLoadError, match=message):
        build_app(Settings(hf_checkpoint=BUILTIN_CHECKPOINT, extra=dict(extra)), load_plugins(list(CONFIGS)))


def test_values_are_converted_from_strings_and_cached_per_settings():
    s = Settings(extra={"radix_tree_max_size": "1000", "radix_tree_process": "yes", "balancing_seed": "7",
                        "retry_status_codes": "502 503", "openai_default_max_tokens": None})
    radix = s.config(RadixTreeConfig)
    assert (radix.max_size, radix.gc_k, radix.process) == (1000, 5, True)
    assert s.config(RadixTreeConfig) is radix
    balancing = s.config(BalancingConfig)
    assert balancing.seed == 7 and balancing.retry_status_codes == frozenset({502, 503})
    assert s.config(OpenAIConfig).default_max_tokens is None
    with pytest.raises(ValueError, match="expected a boolean"):
        Settings(extra={"radix_tree_process": "maybe"}).config(RadixTreeConfig)


def test_a_third_party_config_gets_flags_env_vars_and_choices():
    @dataclasses.dataclass(frozen=True)
    class Mine(PluginConfig):
        flag_prefix = "--mine-"
        mode: str = option("a", choices=("a", "b"), help="which")
        limit: float | None = option(None, help="how much")

    registry = OptionRegistry(owner="mine")
    registry.add_config(Mine)
    assert {o.flag: (o.default, o.choices, o.envvar) for o in registry.options.values()} == {
        "--mine-mode": ("a", ("a", "b"), "SLIME_ROUTER_MINE_MODE"), "--mine-limit": (None, None,
                                                                                     "SLIME_ROUTER_MINE_LIMIT")}
    assert Settings(extra={"mine_limit": "2.5"}).config(Mine) == Mine(mode="a", limit=2.5)
    with pytest.raises(ValueError, match=r"Invalid value for --mine-mode: 'c'. Valid values: a, b"):
        Settings(extra={"mine_mode": "c"}).config(Mine)
