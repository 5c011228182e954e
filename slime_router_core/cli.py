"""The ``slime-router`` command line: ``serve``, ``plugins``, ``new-plugin``, ``mock-worker``.

Plugins add flags to ``serve`` through the ``add_options`` hook; so the plugin selection flags
(``--plugin``, ``--no-plugin``, ``--slime-router-middleware-paths`` and their environment
variables) are read first, then the selected plugins are loaded and their flags added.
"""

from __future__ import annotations

import enum
import inspect
import json
import logging
import os
import socket
import sys
import typing
from pathlib import Path
from typing import Any, Optional

import typer

from .errors import PluginLoadError
from .plugins import load_plugins
from .server import DEFAULT_SHUTDOWN_GRACE_SECONDS
from .settings import Settings

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="slime-router: a rollout gateway for RL post-training in front of SGLang workers.")

ENV = "SLIME_ROUTER_"

# The embedded demo's mock workers reply like a thinking Qwen3 (the bundled mock's realistic mode): every
# reply opens with a <think> block (reasoning_content on the OpenAI API), and when the prompt offers tools,
# the answer is tool calls with probability DEMO_TOOL_CALL_RATE (now and then parallel ones, sometimes after
# a sentence of content) — so the README's chat with `tools` shows tool_calls, a plain chat shows reasoning.
DEMO_MODE = "think"
DEMO_TOOL_CALL_RATE = 0.8


def demo_worker_knobs(i: int) -> dict[str, Any]:
    """MockWorkerConfig fields of the embedded demo's worker ``i`` (passed to the mock as ``--flags``)."""
    return {"seed": i, "realistic": True, "mode": DEMO_MODE, "tool_call_rate": DEMO_TOOL_CALL_RATE}


def _split(values: list[str] | None) -> list[str]:
    out: list[str] = []
    for v in values or []:
        out += [x.strip() for x in v.split(",") if x.strip()]
    return out


def _prescan(argv: list[str]) -> tuple[list[str], list[str], list[str]]:
    """Read the plugin-selection flags (and env vars) before the full parse."""
    select: list[str] = []
    block: list[str] = []
    dotted: list[str] = []
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
    hf_checkpoint: str | None = typer.Option(None, "--hf-checkpoint", envvar=ENV + "HF_CHECKPOINT",
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
    request_timeout: float | None = typer.Option(
        None, "--request-timeout", envvar=ENV + "REQUEST_TIMEOUT", min=0, show_default=False,
        help="Seconds a worker may take to answer a generation; beyond, 504 and the generation is aborted on the "
             "worker. For a stream, it bounds the wait for the headers and then the gap between two chunks: a worker "
             "silent that long mid-stream ends the stream with an error event (and the generation is aborted). "
             "Default: no limit (generations take as long as they take)."),
    max_concurrent_requests: int = typer.Option(
        0, "--max-concurrent-requests", envvar=ENV + "MAX_CONCURRENT_REQUESTS", min=0,
        help="Generations in flight through the router (/generate, streams, OpenAI routes); more wait in a queue. "
             "0: unlimited."),
    max_queued_requests: int = typer.Option(
        1024, "--max-queued-requests", envvar=ENV + "MAX_QUEUED_REQUESTS", min=0,
        help="With --max-concurrent-requests reached, how many requests wait for a slot; beyond: 429 with "
             "Retry-After."),
    queue_timeout: float = typer.Option(
        30.0, "--queue-timeout", envvar=ENV + "QUEUE_TIMEOUT", min=0,
        help="Seconds a request may wait in that queue before it is answered 429 with Retry-After."),
    demo_workers: int = typer.Option(2, "--demo-workers", envvar=ENV + "DEMO_WORKERS",
                                     help="How many mock workers the embedded demo starts."),
    demo_engine: str = typer.Option("sglang", "--demo-engine", envvar=ENV + "DEMO_ENGINE",
                                    help="The engine the embedded demo's mock workers speak: sglang or vllm (the "
                                         "vllm plugin translates)."),
    shutdown_grace_seconds: float = typer.Option(
        DEFAULT_SHUTDOWN_GRACE_SECONDS, "--shutdown-grace-seconds", envvar=ENV + "SHUTDOWN_GRACE_SECONDS", min=0,
        help="On SIGTERM/SIGINT, how long running requests may finish; then open streams are closed and the "
             "router exits. A second signal exits at once."),
    api_key: str | None = typer.Option(
        None, "--api-key", envvar=ENV + "API_KEY", show_default=False,
        help="Require 'Authorization: Bearer <key>' on every route but /health (data plane). Unset: open."),
    admin_api_key: str | None = typer.Option(
        None, "--admin-api-key", envvar=ENV + "ADMIN_API_KEY", show_default=False,
        help="Require this key (Bearer) on the state-changing routes (/add_worker, /remove_worker, weight updates, "
             "/pause, /resume, /abort_request, /flush_cache ...); the data key there is refused (403). It also "
             "works on data routes. Unset: those routes take --api-key, or are open without one."),
    worker_allowlist: list[str] = typer.Option(
        [], "--worker-allowlist", envvar=ENV + "WORKER_ALLOWLIST",
        help="Only workers at these hosts, host:port or CIDRs (repeatable or comma-separated; e.g. "
             "10.0.0.0/8,gpu-node-1) may be added (--worker-url, /add_worker; others: 403). Hostnames match "
             "literally, CIDRs match IP addresses; nothing is resolved. Unset: any worker."),
    verbose: bool = typer.Option(False, "--verbose", "-v", envvar=ENV + "VERBOSE",
                                 help="Log every request with its timing breakdown."),
    replicas: int = typer.Option(
        1, "--replicas", envvar=ENV + "REPLICAS", min=1,
        help="Run N router processes sharing --port (Linux, SO_REUSEPORT), each owning the sessions hashed to it "
             "(the replicas plugin, --replica-routing proxy); a replica that dies is restarted. Every other flag "
             "goes to each replica. docs/scale-out.md."),
    reuse_port_listen: str | None = typer.Option(None, "--reuse-port-listen", hidden=True,
                                                 help="(set by --replicas) also listen on HOST:PORT, SO_REUSEPORT."),
) -> None:
    """Run the router (no workers and no --hf-checkpoint: the embedded demo). Plugin flags have their own panels."""
    raise NotImplementedError  # pragma: no cover - only its signature is used, see _serve_command


def _listen_socket(host: str, port: int) -> socket.socket:
    """Bind the router's address now (as uvicorn would), so a busy port is reported before any slow start-up
    work (demo workers, tokenizer). uvicorn listens on it once the app has started."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except (OSError, OverflowError) as e:  # OverflowError: a port outside 0-65535
        sock.close()
        _fail(_bind_error(host, port, e), code=1)
    return sock


def _bind_error(host: str, port: int, e: Exception) -> str:
    why = getattr(e, "strerror", None) or str(e)
    if getattr(e, "errno", None) in (48, 98, 10048):  # EADDRINUSE (macOS, Linux, Windows)
        return (f"cannot listen on {host}:{port}: address already in use (another process listens on port "
                f"{port}; stop it or choose another port with --port)")
    return f"cannot listen on {host}:{port}: {why}"


PASSED_TO_SETTINGS = ("max_concurrent_requests", "max_queued_requests", "queue_timeout",  # Settings fields
                   "request_timeout")


def _run_serve(plugins: Any, plugin_opts: dict[str, Any], *, host: str, port: int, worker_url: list[str],
               hf_checkpoint: str | None, verbose: bool, max_body_size: int, max_attempts: int,
               demo_workers: int, shutdown_grace_seconds: float, demo_engine: str = "sglang", replicas: int = 1,
               reuse_port_listen: str | None = None, **_: Any) -> None:
    if replicas > 1:  # the parent of N router processes (slime_router_plugins/replicas/launch.py)
        from slime_router_plugins.replicas.launch import serve_replicas

        try:
            code = serve_replicas(replicas, _SERVE_ARGV, host=host, port=port, plugin_names=plugins.names(),
                                  worker_urls=_split(worker_url), hf_checkpoint=hf_checkpoint,
                                  demo_workers=demo_workers, demo_engine=demo_engine, out=typer.echo)
        except ValueError as e:
            _fail(str(e))
        raise typer.Exit(code)
    import uvicorn

    from .app import build_app
    from .errors import HTTPError, MissingDependency, require
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
    access = _access_settings(_, urls)  # a bad key or allowlist entry, a worker outside it: said before start-up
    demo = not urls and not hf_checkpoint
    needs_tokenizer = any("tokenizer" in (impl.function() or [])
                          for impl in plugins.pm.hook.required_components.get_hookimpls())
    if demo or hf_checkpoint is not None:
        try:  # the tokenizer stack (the "trajectory" extra): said before anything starts
            require("A tokenizer (--hf-checkpoint, the demo)" if not demo else "The embedded demo", "trajectory")
        except MissingDependency as e:
            _fail(f"{e}. A pass-through router needs none of it: give --worker-url.")
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
    sock = _listen_socket(host, port)  # first: a busy port is reported at once, not after the start-up work
    port = sock.getsockname()[1]  # --port 0: the port the system chose
    sockets = [sock]
    if reuse_port_listen:  # a child of --replicas: the shared public port too
        from slime_router_plugins.replicas.launch import reuse_port_socket, split_address

        try:
            sockets.append(reuse_port_socket(*split_address(reuse_port_listen)))
        except (OSError, ValueError) as e:
            sock.close()
            _fail(f"--reuse-port-listen {reuse_port_listen}: {e}", code=1)
    settings = Settings(host=host, port=port, worker_urls=urls, hf_checkpoint=hf_checkpoint, verbose=verbose,
                        max_body_size=max_body_size, max_attempts=max_attempts, extra=dict(plugin_opts),
                        **{k: v for k, v in _.items() if k in PASSED_TO_SETTINGS}, **access)
    procs = []
    if demo:
        from slime_router_testing import start_mock_worker_process, wait_http
        from slime_router_testing.servers import ready_path

        if demo_engine not in ("sglang", "vllm"):
            _fail(f"--demo-engine {demo_engine!r}: choose sglang or vllm")
        if demo_engine == "vllm" and "vllm" not in plugins.names():
            _fail("--demo-engine vllm needs the vllm plugin (it is blocked or not selected)")
        # started together, waited for together: each imports transformers and loads the tokenizer
        procs = [start_mock_worker_process(hf_checkpoint=BUILTIN_CHECKPOINT, wait=False, engine=demo_engine,
                                           **demo_worker_knobs(i))
                 for i in range(demo_workers)]
        for proc in procs:
            wait_http(proc.url + ready_path(demo_engine), timeout=120, proc=proc.proc)
            settings.worker_urls.append(proc.url)
    try:
        application = build_app(settings, plugins)
    except (PluginLoadError, RuntimeError, ValueError) as e:
        for p in procs:
            p.stop()
        sock.close()
        _fail(str(e))
    application.router.on_close.extend(p.stop for p in procs)

    def banner() -> None:
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else f"[{host}]" if ":" in host else host
        base = f"http://{shown}:{port}"
        typer.echo(f"slime-router serving on {base}  plugins: {', '.join(plugins.names()) or 'none'}")
        typer.echo(f"workers: {', '.join(settings.worker_urls) or 'none yet (POST /add_worker?url=...)'}")
        guard = getattr(application, "access", None)  # never the keys themselves
        if guard is not None or settings.worker_allowlist:
            typer.echo(" ".join(filter(None, [guard.describe() if guard is not None else "",
                                              f"worker allowlist: {', '.join(settings.worker_allowlist)}"
                                              if settings.worker_allowlist else ""])))
        if demo:
            kind = "vLLM" if demo_engine == "vllm" else "SGLang"
            typer.echo(f"embedded demo: mock {kind} workers (realistic: they reason and call tools) + built-in "
                       "Qwen3 tokenizer. Try:")
            for line in demo_curls(base, "openai_compat" in plugins.names()):
                typer.echo("  " + line)
            if "inspector" in plugins.names():
                typer.echo(f"trajectory inspector: {base}/inspector (sessions: send X-Session-ID, or use "
                           f"{base}/sessions/<id>/v1 as an OpenAI base URL)")

    # No X-Forwarded-* rewriting and no Server header: per-request work a router doesn't need.
    config = uvicorn.Config(application, host=host, port=port, log_level="info" if verbose else "warning",
                            loop=_best("uvloop", "auto"), http=http_protocol(), access_log=verbose,
                            proxy_headers=False, server_header=False)
    server = _announcing_server(config, banner, shutdown_grace_seconds)
    try:
        server.run(sockets=sockets)
    except OSError as e:  # listen() failed: another process took the port after we bound it
        if server.started:
            raise
        _fail(_bind_error(host, port, e), code=1)
    finally:
        for s in sockets:
            s.close()
        for p in procs:
            p.stop()
    if not server.started:  # start-up failed (uvicorn logged why); never reported as serving
        _fail("start-up failed (see the log above); not serving", code=3)


def _access_settings(given: dict[str, Any], urls: list[str]) -> dict[str, Any]:
    """The access-control Settings fields from the parsed flags, checked: a key no client could send, a bad
    --worker-allowlist entry or a --worker-url outside it stops start-up (the keys never appear in a message)."""
    from .access import AccessControl
    from .workers import WorkerAllowlist

    api_key: str | None = given.get("api_key")
    admin_api_key: str | None = given.get("admin_api_key")
    entries = _split(given.get("worker_allowlist"))
    try:
        if api_key is not None or admin_api_key is not None:
            AccessControl(api_key, admin_api_key)
        allowlist = WorkerAllowlist.parse(entries)
        for url in urls:
            allowlist.check_startup(url)
    except ValueError as e:
        _fail(str(e))
    return {"api_key": api_key, "admin_api_key": admin_api_key, "worker_allowlist": entries}


DEMO_TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def demo_curls(base: str, openai: bool = True) -> list[str]:
    """The embedded demo's example commands (the banner prints them; the README shows the same)."""
    def curl(path: str, body: dict) -> str:  # JSON has no single quote: safe inside the shell's '...'
        return f"curl -s {base}{path} -H 'Content-Type: application/json' -d '{json.dumps(body)}'"

    lines = [curl("/generate", {"text": "Hello, my name is", "sampling_params": {"max_new_tokens": 16}}),
             curl("/retrieve_from_text", {"text": "Hello, my name is"})]
    if openai:
        lines += [curl("/v1/chat/completions", {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}),
                  curl("/v1/chat/completions", {"model": "demo", "tools": DEMO_TOOLS, "messages": [
                      {"role": "user", "content": "Weather in Paris?"}]})]
    return lines


def _announcing_server(config: Any, on_started: Any, shutdown_grace_seconds: float) -> Any:
    """A ``uvicorn.Server`` that calls ``on_started()`` once it listens and the app's start-up has completed
    (uvicorn's ``started``), so "serving on ..." is never printed for a server that is not serving."""
    from .server import GracefulServer  # bounded graceful shutdown, a second signal exits now

    class AnnouncingServer(GracefulServer):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            if self.started and not self.should_exit:
                on_started()

    return AnnouncingServer(config, shutdown_grace_seconds)


def _best(module: str, fallback: str) -> str:
    try:
        __import__(module)
        return module
    except ImportError:  # pragma: no cover
        return fallback


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(code)


@app.command("plugins")
def plugins_command(
    plugin: list[str] = typer.Option([], "--plugin", help="Only these plugins."),
    no_plugin: list[str] = typer.Option([], "--no-plugin", help="Skip these plugins."),
    hf_checkpoint: str | None = typer.Option(
        None, "--hf-checkpoint", envvar=ENV + "HF_CHECKPOINT",
        help="The tokenizer to check start-up with. Default: the bundled one (builtin:qwen3) when a plugin needs a "
             "tokenizer and the 'trajectory' extra is installed."),
) -> None:
    """List discovered plugins: where each comes from (distribution, version), its hooks and options, the components
    it provides and requires. The app is built (not served) to check start-up: a component nobody provides, or
    provided twice, is reported (exit code 1)."""
    from .app import collect_options

    try:
        pm = load_plugins(_split(plugin) or None, _split(no_plugin))
        options = collect_options(pm)
    except PluginLoadError as e:
        _fail(str(e))
    problem = _check_startup(pm, hf_checkpoint)
    by_owner: dict[str, list[str]] = {}
    for opt in options.options.values():
        by_owner.setdefault(opt.owner, []).append(opt.flag if opt.is_flag or opt.default in (None, "", [])
                                                  else f"{opt.flag} (default: {opt.default})")
    for info in pm.infos.values():
        dist = f"{info.distribution} {info.version or ''}".strip() if info.distribution else "-"
        typer.echo(f"{info.name}\n  source: {info.source}\n  hooks:  {', '.join(info.hooks) or '-'}\n"
                   f"  distribution: {dist}\n"
                   f"  options: {', '.join(by_owner.get(info.name, [])) or '-'}\n"
                   f"  provides: {', '.join(info.provides) or '-'}\n"
                   f"  requires: {', '.join(info.requires) or '-'}")
    for name, why in pm.skipped.items():
        typer.echo(f"{name}\n  skipped: {why}")
    if problem:
        _fail(f"start-up would fail: {problem}", code=1)


@app.command("new-plugin")
def new_plugin_command(
    name: str = typer.Argument(..., help="The plugin's name (lower case: my_plugin)."),
    directory: Path | None = typer.Option(None, "--dir", help="Where to create it. Default: ./slime-router-NAME"),
) -> None:
    """Create a plugin package: pyproject.toml with its entry point, the plugin module, a README and a passing test
    (with the pytest fixtures slime-router ships). Then: cd into it, pip install -e ., pytest."""
    from .plugin_template import names, render

    try:
        target = directory or Path(names(name)["dist"])
        written = render(name, target)
    except (ValueError, FileExistsError) as e:
        _fail(str(e))
    typer.echo(f"Created {target}/ (plugin {names(name)['name']!r}):")
    for path in written:
        typer.echo(f"  {path.relative_to(target)}")
    typer.echo(f"Next: cd {target} && pip install -e . && pytest && slime-router plugins")


def _check_startup(pm: Any, hf_checkpoint: str | None) -> str | None:
    """Build the app (nothing is served, no worker is contacted) so that every plugin registers its components and
    declares what it requires; the start-up error, if any."""
    from .app import build_app
    from .errors import MissingDependency, require
    from .tokenizers import BUILTIN_CHECKPOINT

    if hf_checkpoint is None and any("tokenizer" in (impl.function() or [])
                                     for impl in pm.pm.hook.required_components.get_hookimpls()):
        try:
            require("A tokenizer", "trajectory")
            hf_checkpoint = BUILTIN_CHECKPOINT
        except MissingDependency:
            pass
    try:
        build_app(Settings(hf_checkpoint=hf_checkpoint), pm)
    except (PluginLoadError, RuntimeError, ValueError, TypeError) as e:
        return str(e)
    return None


def _serve_command(plugins: Any, options: Any) -> Any:
    """The ``serve`` command: the core flags of ``serve`` plus every loaded plugin's flags.

    Typer builds commands from function signatures, so this one gets a generated signature.
    """
    hints = typing.get_type_hints(serve)
    params = [p.replace(annotation=hints[p.name]) for p in inspect.signature(serve).parameters.values()]
    annotations = {p.name: p.annotation for p in params}
    enums: dict[str, Any] = {}
    for dest, opt in options.options.items():
        kind: Any = bool if opt.is_flag else opt.type
        if opt.choices:  # an Enum: click refuses other values naming the valid ones, --help lists them
            kind = enums[dest] = enum.Enum(dest, [(c, c) for c in opt.choices], type=str)
        annotation = list[kind] if opt.multiple else (kind if opt.default is not None or opt.is_flag
                                                      else Optional[kind])  # noqa: UP045 -- a runtime annotation for typer: keep typing.Union, not types.UnionType
        default = list(opt.default or []) if opt.multiple else opt.default
        if dest in enums and default is not None:
            default = [enums[dest](d) for d in default] if opt.multiple else enums[dest](default)
        info = typer.Option(default, opt.flag, *opt.aliases, envvar=opt.envvar, help=opt.help,
                            rich_help_panel=f"Plugin {opt.owner}", show_default=True)
        params.append(inspect.Parameter(dest, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=annotation))
        annotations[dest] = annotation

    def command(**kwargs: Any) -> None:
        plugin_opts = {k: _plain(kwargs.pop(k)) for k in list(kwargs) if k in options.options}
        _run_serve(plugins, plugin_opts, **kwargs)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = annotations
    command.__doc__ = serve.__doc__
    command.__name__ = "serve"
    return command


def _plain(value: Any) -> Any:
    """A choice option's value as its plain string (typer hands Enum members over)."""
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value.value if isinstance(value, enum.Enum) else value


def build_cli(argv: list[str]) -> Any:
    """The click command, with ``serve`` carrying the selected plugins' flags."""
    from slime_router_testing.mock_worker import mock_worker_command

    from .app import collect_options

    app.command("mock-worker", help="Run the bundled mock SGLang worker (for tests and demos).")(mock_worker_command)
    select, block, dotted = _prescan(argv[argv.index("serve") + 1:] if "serve" in argv else [])
    try:
        plugins = load_plugins(select or None, block, dotted)
        options = collect_options(plugins)
    except PluginLoadError as e:
        if "serve" in argv:
            typer.echo(f"Error: {e}", err=True)
            raise SystemExit(2) from e
        plugins = load_plugins([])  # `plugins` and `--help` still work; `serve` reports the error above
        options = collect_options(plugins)
    app.command("serve", context_settings={"help_option_names": ["-h", "--help"]})(_serve_command(plugins, options))
    return typer.main.get_command(app)


_SERVE_ARGV: list[str] = []  # the arguments after "serve", as given: what --replicas passes on to each replica


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    _SERVE_ARGV[:] = args[args.index("serve") + 1:] if "serve" in args else []
    build_cli(args).main(args=args, prog_name="slime-router")


if __name__ == "__main__":  # pragma: no cover
    main()
