"""Command-line entry points for the mock worker.

* ``main(argv)``: argparse, used by ``python -m slime_router_testing.mock_worker``.
* ``mock_worker_command(...)``: a typer-friendly function (``app.command("mock-worker")(mock_worker_command)``).
"""

from __future__ import annotations

import argparse
import json

import typer

from slime_router_core.tokenizers import BUILTIN_CHECKPOINT

from .app import MODES, STREAM_MODES, MockWorkerConfig, serve_mock_worker
from .vllm import serve_mock_vllm_worker

__all__ = ["build_parser", "main", "mock_worker_command"]

_D = MockWorkerConfig()
ENGINES = ("sglang", "vllm")
_RATES = ("leading_whitespace_rate", "trailing_whitespace_rate", "split_rate", "tool_call_rate",
          "parallel_tool_call_rate")


def build_parser() -> argparse.ArgumentParser:
    d = MockWorkerConfig()
    p = argparse.ArgumentParser(prog="python -m slime_router_testing.mock_worker", description="Mock SGLang worker")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--hf-checkpoint", default=d.hf_checkpoint, help=f"tokenizer dir, or {BUILTIN_CHECKPOINT}")
    p.add_argument("--model-path", default=d.model_path)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--weight-version", default=d.weight_version)
    p.add_argument("--stream-mode", choices=STREAM_MODES, default=d.stream_mode)
    p.add_argument("--mode", choices=MODES, default=d.mode)
    p.add_argument("--reply-text", default=None)
    p.add_argument("--think-text", default=None)
    p.add_argument("--tool-name", default=d.tool_name)
    p.add_argument("--tool-arguments", default=None, help="JSON object")
    p.add_argument("--stop-at-eos", type=float, default=d.stop_at_eos)
    p.add_argument("--max-random-tokens", type=int, default=d.max_random_tokens)
    p.add_argument("--no-strict-sampling-params", action="store_true")
    p.add_argument("--latency", type=float, default=d.latency)
    p.add_argument("--token-latency", type=float, default=d.token_latency)
    p.add_argument("--prefill-time-per-token", type=float, default=d.prefill_time_per_token)
    p.add_argument("--fail-first-n", type=int, default=d.fail_first_n)
    p.add_argument("--failure-rate", type=float, default=d.failure_rate)
    p.add_argument("--fail-status", type=int, default=d.fail_status)
    p.add_argument("--crash-after-n", type=int, default=d.crash_after_n)
    p.add_argument("--health-status", type=int, default=d.health_status)
    p.add_argument("--unhealthy-after", type=float, default=None)
    p.add_argument("--version-every", type=int, default=d.version_every,
                   help="bump the weight version every N sequences (0 = never)")
    p.add_argument("--realistic", action="store_true", help="reply like a real model (see MockWorkerConfig)")
    p.add_argument("--realistic-seed", type=int, default=None, help="reproducible realistic randomness")
    for name in _RATES:
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    p.add_argument("--shared-prefix-min", type=int, default=d.shared_prefix_min)
    p.add_argument("--shared-prefix-max", type=int, default=d.shared_prefix_max)
    p.add_argument("--engine", choices=ENGINES, default="sglang",
                   help="the protocol it speaks: sglang (/generate) or vllm (/inference/v1/generate, /v1/completions)")
    p.add_argument("--no-generate-endpoint", action="store_true",
                   help="vllm: an older server without /inference/v1/generate (only /v1/completions)")
    return p


def _make_config(**kw) -> MockWorkerConfig:
    args = kw.pop("tool_arguments", None)
    cfg = MockWorkerConfig(**kw)
    if args:
        cfg.tool_arguments = json.loads(args) if isinstance(args, str) else args
    cfg.validate()
    return cfg


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    cfg = _make_config(
        hf_checkpoint=a.hf_checkpoint, model_path=a.model_path, seed=a.seed, weight_version=a.weight_version,
        stream_mode=a.stream_mode, mode=a.mode, reply_text=a.reply_text, think_text=a.think_text,
        tool_name=a.tool_name, tool_arguments=a.tool_arguments, stop_at_eos=a.stop_at_eos,
        max_random_tokens=a.max_random_tokens, strict_sampling_params=not a.no_strict_sampling_params,
        latency=a.latency, token_latency=a.token_latency, prefill_time_per_token=a.prefill_time_per_token,
        fail_first_n=a.fail_first_n, failure_rate=a.failure_rate, fail_status=a.fail_status,
        crash_after_n=a.crash_after_n, health_status=a.health_status, unhealthy_after=a.unhealthy_after,
        version_every=a.version_every, realistic=a.realistic, realistic_seed=a.realistic_seed,
        shared_prefix_min=a.shared_prefix_min, shared_prefix_max=a.shared_prefix_max,
        **{name: getattr(a, name) for name in _RATES},
    )
    if a.engine == "vllm":
        serve_mock_vllm_worker(a.host, a.port, cfg, generate_endpoint=not a.no_generate_endpoint)
        return
    serve_mock_worker(a.host, a.port, cfg)


def mock_worker_command(
    port: int = typer.Option(30000, "--port", envvar="SLIME_MOCK_PORT", help="Port to listen on."),
    host: str = typer.Option("127.0.0.1", "--host", envvar="SLIME_MOCK_HOST", help="Host to bind."),
    hf_checkpoint: str = typer.Option(BUILTIN_CHECKPOINT, "--hf-checkpoint", envvar="SLIME_MOCK_HF_CHECKPOINT",
                                      help=f"Tokenizer directory, or {BUILTIN_CHECKPOINT}."),
    model_path: str = typer.Option("mock-qwen3", "--model-path", envvar="SLIME_MOCK_MODEL_PATH"),
    seed: int = typer.Option(0, "--seed", envvar="SLIME_MOCK_SEED"),
    weight_version: str = typer.Option("default", "--weight-version", envvar="SLIME_MOCK_WEIGHT_VERSION"),
    stream_mode: str = typer.Option("cumulative", "--stream-mode", envvar="SLIME_MOCK_STREAM_MODE",
                                    help="cumulative | incremental | legacy"),
    mode: str = typer.Option("random", "--mode", envvar="SLIME_MOCK_MODE",
                             help="random | think | tool_call | reply_text"),
    reply_text: str | None = typer.Option(None, "--reply-text", envvar="SLIME_MOCK_REPLY_TEXT"),
    think_text: str | None = typer.Option(None, "--think-text", envvar="SLIME_MOCK_THINK_TEXT"),
    tool_name: str = typer.Option("get_weather", "--tool-name", envvar="SLIME_MOCK_TOOL_NAME"),
    tool_arguments: str | None = typer.Option(None, "--tool-arguments", envvar="SLIME_MOCK_TOOL_ARGUMENTS",
                                                 help="JSON object."),
    stop_at_eos: float = typer.Option(1.0, "--stop-at-eos", envvar="SLIME_MOCK_STOP_AT_EOS"),
    max_random_tokens: int = typer.Option(48, "--max-random-tokens", envvar="SLIME_MOCK_MAX_RANDOM_TOKENS"),
    strict_sampling_params: bool = typer.Option(True, "--strict-sampling-params/--no-strict-sampling-params",
                                                envvar="SLIME_MOCK_STRICT_SAMPLING_PARAMS"),
    latency: float = typer.Option(0.0, "--latency", envvar="SLIME_MOCK_LATENCY"),
    token_latency: float = typer.Option(0.0, "--token-latency", envvar="SLIME_MOCK_TOKEN_LATENCY"),
    prefill_time_per_token: float = typer.Option(0.0, "--prefill-time-per-token",
                                                 envvar="SLIME_MOCK_PREFILL_TIME_PER_TOKEN"),
    fail_first_n: int = typer.Option(0, "--fail-first-n", envvar="SLIME_MOCK_FAIL_FIRST_N"),
    failure_rate: float = typer.Option(0.0, "--failure-rate", envvar="SLIME_MOCK_FAILURE_RATE"),
    fail_status: int = typer.Option(500, "--fail-status", envvar="SLIME_MOCK_FAIL_STATUS"),
    crash_after_n: int = typer.Option(0, "--crash-after-n", envvar="SLIME_MOCK_CRASH_AFTER_N"),
    health_status: int = typer.Option(200, "--health-status", envvar="SLIME_MOCK_HEALTH_STATUS"),
    unhealthy_after: float | None = typer.Option(None, "--unhealthy-after", envvar="SLIME_MOCK_UNHEALTHY_AFTER"),
    version_every: int = typer.Option(_D.version_every, "--version-every", envvar="SLIME_MOCK_VERSION_EVERY",
                                      help="Bump the weight version every N sequences (0 = never)."),
    realistic: bool = typer.Option(False, "--realistic", envvar="SLIME_MOCK_REALISTIC",
                                   help="Reply like a real model: whitespace, non-canonical splits, odd tool-call "
                                        "JSON, per-request logprobs, branches sharing a prefix."),
    realistic_seed: int | None = typer.Option(None, "--realistic-seed", envvar="SLIME_MOCK_REALISTIC_SEED",
                                                 help="Seed the realistic randomness (default: os.urandom)."),
    leading_whitespace_rate: float = typer.Option(_D.leading_whitespace_rate, "--leading-whitespace-rate"),
    trailing_whitespace_rate: float = typer.Option(_D.trailing_whitespace_rate, "--trailing-whitespace-rate"),
    split_rate: float = typer.Option(_D.split_rate, "--split-rate"),
    tool_call_rate: float = typer.Option(_D.tool_call_rate, "--tool-call-rate"),
    parallel_tool_call_rate: float = typer.Option(_D.parallel_tool_call_rate, "--parallel-tool-call-rate"),
    shared_prefix_min: int = typer.Option(_D.shared_prefix_min, "--shared-prefix-min"),
    shared_prefix_max: int = typer.Option(_D.shared_prefix_max, "--shared-prefix-max"),
    engine: str = typer.Option("sglang", "--engine", envvar="SLIME_MOCK_ENGINE",
                               help="The protocol it speaks: sglang (/generate) or vllm (/inference/v1/generate, "
                                    "/v1/completions; the same generation and records of truth)."),
    generate_endpoint: bool = typer.Option(True, "--generate-endpoint/--no-generate-endpoint",
                                           help="vllm: serve /inference/v1/generate (off: an older server with "
                                                "only /v1/completions)."),
) -> None:
    """Run a mock SGLang (or vLLM) worker (real Qwen3 tokenizer, deterministic text, failure knobs)."""
    if engine not in ENGINES:
        raise typer.BadParameter(f"{engine!r}: choose one of {', '.join(ENGINES)}", param_hint="--engine")
    cfg = _make_config(
        hf_checkpoint=hf_checkpoint, model_path=model_path, seed=seed, weight_version=weight_version,
        stream_mode=stream_mode, mode=mode, reply_text=reply_text, think_text=think_text, tool_name=tool_name,
        tool_arguments=tool_arguments, stop_at_eos=stop_at_eos, max_random_tokens=max_random_tokens,
        strict_sampling_params=strict_sampling_params, latency=latency, token_latency=token_latency,
        prefill_time_per_token=prefill_time_per_token, fail_first_n=fail_first_n, failure_rate=failure_rate,
        fail_status=fail_status, crash_after_n=crash_after_n, health_status=health_status,
        unhealthy_after=unhealthy_after, version_every=version_every, realistic=realistic,
        realistic_seed=realistic_seed, leading_whitespace_rate=leading_whitespace_rate,
        trailing_whitespace_rate=trailing_whitespace_rate, split_rate=split_rate, tool_call_rate=tool_call_rate,
        parallel_tool_call_rate=parallel_tool_call_rate, shared_prefix_min=shared_prefix_min,
        shared_prefix_max=shared_prefix_max,
    )
    if engine == "vllm":
        serve_mock_vllm_worker(host, port, cfg, generate_endpoint=generate_endpoint)
        return
    serve_mock_worker(host, port, cfg)


if __name__ == "__main__":
    main()
