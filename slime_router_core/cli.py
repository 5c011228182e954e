"""The ``slime-router`` command line: ``serve``, ``plugins``, ``mock-worker``.

Plugins add flags to ``serve`` through the ``add_options`` hook; so the plugin selection flags
(``--plugin``, ``--no-plugin``, ``--slime-router-middleware-paths`` and their environment
variables) are read first, then the selected plugins are loaded and their flags added.
"""

from __future__ import annotations

import logging
import os
import inspect
import sys
import typing
from pathlib import Path
from typing import Any, Optional

import typer

from .errors import PluginLoadError
from .plugins import load_plugins
from .settings import Settings

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="slime-router: a rollout gateway for RL post-training in front of SGLang workers.")

ENV = "SLIME_ROUTER_"


def _split(values: list[str] | None) -> list[str]:
    out: list[str] = []
    for v in values or []:
        out += [x.strip() for x in v.split(",") if x.strip()]
    return out


def _prescan(argv: list[str]) -> tuple[list[str], list[str], list[str]]:
    """Read the plugin-selection flags (and env vars) before the full parse."""
    select, block, dotted = [], [], []
    for i in range(len(argv)):
        arg = argv[i]
        for flag, dest in (("--plugin", select), ("--no-plugin", block), ("--slime-router-middleware-paths", dotted)):
            if arg == flag and i + 1 < len(argv):
                dest.append(argv[i + 1])
            elif arg.startswith(flag + "="):
                dest.append(arg.split("=", 1)[1])
    if not select and os.environ.get(ENV + "PLUGINS"):
        select = [os.environ[ENV + "PLUGINS"]]
    if not block and os.environ.get(ENV + "NO_PLUGINS"):
        block = [os.environ[ENV + "NO_PLUGINS"]]
    if not dotted and os.environ.get(ENV + "MIDDLEWARE_PATHS"):
        dotted = [os.environ[ENV + "MIDDLEWARE_PATHS"]]
    if "--enable-openai-chat-completion" in argv and select and "openai_compat" not in select:
        select.append("openai_compat")
    return _split(select), _split(block), _split(dotted)


def serve(
    host: str = typer.Option("0.0.0.0", "--host", "--sglang-router-ip", envvar=ENV + "HOST",
                             help="Address to listen on."),
    port: int = typer.Option(30000, "--port", "--sglang-router-port", envvar=ENV + "PORT", help="Port to listen on."),
    worker_url: list[str] = typer.Option([], "--worker-url", envvar=ENV + "WORKER_URLS",
                                         help="SGLang worker URL (repeatable). None given and no --hf-checkpoint: "
                                              "runs the embedded demo (two mock workers, built-in tokenizer)."),
    hf_checkpoint: Optional[str] = typer.Option(None, "--hf-checkpoint", envvar=ENV + "HF_CHECKPOINT",
                                                help="HuggingFace checkpoint directory with the tokenizer and chat "
                                                     "template, or 'builtin:qwen3' for the bundled Qwen3 tokenizer."),
    plugin: list[str] = typer.Option([], "--plugin", envvar=ENV + "PLUGINS",
                                     help="Load only these plugins (repeatable or comma-separated). Default: all."),
    no_plugin: list[str] = typer.Option([], "--no-plugin", envvar=ENV + "NO_PLUGINS",
                                        help="Never load this plugin (repeatable)."),
    middleware_paths: list[str] = typer.Option([], "--slime-router-middleware-paths", envvar=ENV + "MIDDLEWARE_PATHS",
                                               help="Extra plugins by dotted path, comma-separated."),
    enable_openai: bool = typer.Option(False, "--enable-openai-chat-completion", envvar=ENV + "ENABLE_OPENAI",
                                       help="Alias: make sure the openai_compat plugin is loaded."),
    max_body_size: int = typer.Option(64 * 1024 * 1024, "--max-body-size", envvar=ENV + "MAX_BODY_SIZE",
                                      help="Largest request body accepted, in bytes (larger: 413)."),
    max_attempts: int = typer.Option(3, "--max-attempts", envvar=ENV + "MAX_ATTEMPTS",
                                     help="Upper bound on upstream attempts per request (retries on other workers)."),
    demo_workers: int = typer.Option(2, "--demo-workers", envvar=ENV + "DEMO_WORKERS",
                                     help="How many mock workers the embedded demo starts."),
    verbose: bool = typer.Option(False, "--verbose", "-v", envvar=ENV + "VERBOSE",
                                 help="Log every request with its timing breakdown."),
) -> None:
    """Run the router (no workers and no --hf-checkpoint: the embedded demo). Plugin flags have their own panels."""
    raise NotImplementedError  # pragma: no cover - only its signature is used, see _serve_command


def _run_serve(plugins: Any, plugin_opts: dict[str, Any], *, host: str, port: int, worker_url: list[str],
               hf_checkpoint: Optional[str], verbose: bool, max_body_size: int, max_attempts: int,
               demo_workers: int, **_: Any) -> None:
    import uvicorn

    from .app import build_app
    from .errors import HTTPError
    from .server import http_protocol
    from .tokenizers import BUILTIN_CHECKPOINT
    from .workers import normalize_worker_url

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("slime_router").setLevel(logging.INFO)
    urls = _split(worker_url)
    try:
        urls = [normalize_worker_url(u) for u in urls]
    except HTTPError as e:
        _fail(e.message)
    demo = not urls and not hf_checkpoint
    needs_tokenizer = any("tokenizer" in (impl.function() or [])
                          for impl in plugins.pm.hook.required_components.get_hookimpls())
    if demo:
        hf_checkpoint = BUILTIN_CHECKPOINT
    elif hf_checkpoint is None:
        if needs_tokenizer:
            _fail("Missing required argument: --hf-checkpoint")
    elif hf_checkpoint != BUILTIN_CHECKPOINT:
        path = Path(hf_checkpoint)
        if not path.exists():
            _fail(f"--hf-checkpoint {hf_checkpoint}: no such directory")
        if not path.is_dir():
            _fail(f"--hf-checkpoint {hf_checkpoint}: not a directory (give the checkpoint folder that holds "
                  f"tokenizer.json / tokenizer_config.json)")
    settings = Settings(host=host, port=port, worker_urls=urls, hf_checkpoint=hf_checkpoint, verbose=verbose,
                        max_body_size=max_body_size, max_attempts=max_attempts, extra=dict(plugin_opts))
    procs = []
    if demo:
        from .testing import start_mock_worker_process, wait_http

        # started together, waited for together: each imports transformers and loads the tokenizer
        procs = [start_mock_worker_process(hf_checkpoint=BUILTIN_CHECKPOINT, wait=False, seed=i)
                 for i in range(demo_workers)]
        for proc in procs:
            wait_http(proc.url + "/get_model_info", timeout=120, proc=proc.proc)
            settings.worker_urls.append(proc.url)
    try:
        application = build_app(settings, plugins)
    except (PluginLoadError, RuntimeError, ValueError) as e:
        for p in procs:
            p.stop()
        _fail(str(e))
    application.router.on_close.extend(p.stop for p in procs)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    typer.echo(f"slime-router serving on http://{shown}:{port}  plugins: {', '.join(plugins.names()) or 'none'}")
    typer.echo(f"workers: {', '.join(settings.worker_urls) or 'none yet (POST /add_worker?url=...)'}")
    if demo:
        typer.echo("embedded demo: mock SGLang workers + built-in Qwen3 tokenizer. Try:")
        typer.echo(f"  curl -s http://{shown}:{port}/generate -H 'Content-Type: application/json' "
                   f"-d '{{\"text\": \"Hello, my name is\", \"sampling_params\": {{\"max_new_tokens\": 16}}}}'")
        typer.echo(f"  curl -s http://{shown}:{port}/retrieve_from_text -H 'Content-Type: application/json' "
                   f"-d '{{\"text\": \"Hello, my name is\"}}'")
    try:
        # No X-Forwarded-* rewriting and no Server header: per-request work a router doesn't need.
        uvicorn.run(application, host=host, port=port, log_level="info" if verbose else "warning",
                    loop=_best("uvloop", "auto"), http=http_protocol(), access_log=verbose,
                    proxy_headers=False, server_header=False)
    finally:
        for p in procs:
            p.stop()


def _best(module: str, fallback: str) -> str:
    try:
        __import__(module)
        return module
    except ImportError:  # pragma: no cover
        return fallback


def _fail(message: str) -> None:
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(2)


@app.command("plugins")
def plugins_command(
    plugin: list[str] = typer.Option([], "--plugin", help="Only these plugins."),
    no_plugin: list[str] = typer.Option([], "--no-plugin", help="Skip these plugins."),
) -> None:
    """List discovered plugins, where they come from and the hooks they implement."""
    try:
        pm = load_plugins(_split(plugin) or None, _split(no_plugin))
    except PluginLoadError as e:
        _fail(str(e))
    if not pm.infos:
        typer.echo("no plugins installed")
    for info in pm.infos.values():
        typer.echo(f"{info.name}\n  source: {info.source}\n  hooks:  {', '.join(info.hooks) or '-'}")


def _serve_command(plugins: Any, options: Any) -> Any:
    """The ``serve`` command: the core flags of ``serve`` plus every loaded plugin's flags.

    Typer builds commands from function signatures, so this one gets a generated signature.
    """
    hints = typing.get_type_hints(serve)
    params = [p.replace(annotation=hints[p.name]) for p in inspect.signature(serve).parameters.values()]
    annotations = {p.name: p.annotation for p in params}
    for dest, opt in options.options.items():
        kind: Any = bool if opt.is_flag else opt.type
        annotation = list[kind] if opt.multiple else (kind if opt.default is not None or opt.is_flag
                                                      else Optional[kind])
        default = list(opt.default or []) if opt.multiple else opt.default
        info = typer.Option(default, opt.flag, *opt.aliases, envvar=opt.envvar, help=opt.help,
                            rich_help_panel=f"Plugin {opt.owner}", show_default=True)
        params.append(inspect.Parameter(dest, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=annotation))
        annotations[dest] = annotation

    def command(**kwargs: Any) -> None:
        plugin_opts = {k: kwargs.pop(k) for k in list(kwargs) if k in options.options}
        _run_serve(plugins, plugin_opts, **kwargs)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = annotations
    command.__doc__ = serve.__doc__
    command.__name__ = "serve"
    return command


def build_cli(argv: list[str]) -> Any:
    """The click command, with ``serve`` carrying the selected plugins' flags."""
    from .app import collect_options
    from .mock_worker import mock_worker_command

    app.command("mock-worker", help="Run the bundled mock SGLang worker (for tests and demos).")(mock_worker_command)
    select, block, dotted = _prescan(argv[argv.index("serve") + 1:] if "serve" in argv else [])
    try:
        plugins = load_plugins(select or None, block, dotted)
        options = collect_options(plugins)
    except PluginLoadError as e:
        if "serve" in argv:
            typer.echo(f"Error: {e}", err=True)
            raise SystemExit(2)
        plugins = load_plugins([])  # `plugins` and `--help` still work; `serve` reports the error above
        options = collect_options(plugins)
    app.command("serve", context_settings={"help_option_names": ["-h", "--help"]})(_serve_command(plugins, options))
    return typer.main.get_command(app)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    build_cli(args).main(args=args, prog_name="slime-router")


if __name__ == "__main__":  # pragma: no cover
    main()
