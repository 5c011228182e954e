"""The openai_compat plugin's options, declared once (``--served-model-name``, ``--openai-*``)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from slime_router_core.settings import PluginConfig, Settings, at_least, option

from .render import HISTORY_MODES

# The accepted values of the enumerated flags (and HISTORY_MODES): anything else is refused at start-up.
REASONING_PARSERS = ("qwen3", "none")
TOOL_PARSERS = ("qwen", "none")


@dataclass(frozen=True)
class OpenAIConfig(PluginConfig):
    flag_prefix = "--openai-"
    served_model_name: str | None = option(
        None, flag="--served-model-name",
        help="Model name listed by /v1/models and used when a request has no 'model' (default: the basename of "
             "--hf-checkpoint).")
    history: str = option(
        "template", choices=HISTORY_MODES,
        help="How assistant turns in the request history are rendered: 'template' (the chat template, reasoning "
             "restored for turns the router produced) or 'raw' (the exact text the model generated, so no generated "
             "token is lost). Per request: 'history_mode'.")
    history_size: int = option(100_000, check=at_least(1),
                               help="How many generated assistant turns to remember for exact history rendering.")
    reasoning_parser: str = option(
        "qwen3", choices=REASONING_PARSERS,
        help="'qwen3' splits <think>...</think> into reasoning_content; 'none' keeps it in content.")
    tool_parser: str = option(
        "qwen", choices=TOOL_PARSERS,
        help="'qwen' parses <tool_call>{json}</tool_call> into tool_calls (when the request has tools); 'none' "
             "disables it.")
    default_max_tokens: int | None = option(
        None, check=at_least(1),
        help="max_new_tokens when a request sets neither max_tokens nor max_completion_tokens (default: the "
             "worker's own default).")


def served_model_name(settings: Settings) -> str:
    """``--served-model-name``, else the checkpoint's directory name."""
    name = settings.config(OpenAIConfig).served_model_name
    if name:
        return name
    ckpt = settings.hf_checkpoint
    if ckpt:
        return os.path.basename(str(ckpt).rstrip("/\\")) or str(ckpt)
    return "default"
