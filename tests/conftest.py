"""Shared fixtures: real servers on free loopback ports, told to stop after each test."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import settings

from slime_router_core.tokenizers import BUILTIN_CHECKPOINT
from slime_router_testing import ServerThread, start_mock_worker_process, start_router
from slime_router_testing.tokenizer import builtin_tokenizer_dir

# Property tests explore new examples on every local run; CI (CI=true) replays a fixed set, so a submission's
# verdict does not depend on the luck of the draw. A failure found locally is kept in .hypothesis/ and replayed.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(scope="session")
def tokenizer_dir() -> str:
    """The bundled Qwen3 tokenizer, built offline once."""
    return str(builtin_tokenizer_dir())


@pytest.fixture(scope="session", autouse=True)
def _one_default_ssl_context_for_httpx() -> Iterator[None]:
    """Every httpx client builds an SSL context, parsing a whole CA bundle: ~18 ms of CPU, 20 times what a
    loopback request costs, and the tests make ~1000 one-off clients (``httpx.get``/``post``, OpenAI clients).
    The default one (verify=True, no client cert) is built once per SSL_CERT_FILE/SSL_CERT_DIR setting and shared
    for the session; any other ``verify``/``cert`` is served as httpx does."""
    try:
        import httpx._transports.default as transports  # where the transports look the function up
        original = transports.create_ssl_context
    except (ImportError, AttributeError):  # another httpx layout: every client builds its own, as before
        yield
        return
    shared: dict[tuple, Any] = {}

    def create_ssl_context(verify: Any = True, cert: Any = None, trust_env: bool = True) -> Any:
        if verify is not True or cert is not None:
            return original(verify=verify, cert=cert, trust_env=trust_env)
        key = (os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR")) if trust_env else (None, None)
        if key not in shared:
            shared[key] = original(verify=verify, cert=cert, trust_env=trust_env)
        return shared[key]

    transports.create_ssl_context = create_ssl_context
    yield
    transports.create_ssl_context = original


# In-thread servers told to exit and not joined yet. A uvicorn shutdown is ~0.2 s of sleeping (up to a 0.1 s
# tick before it notices, then a fixed 0.1 s grace sleep), which most tests would spend waiting for their
# router and workers to go. They go while the next tests run instead: a test's servers stop accepting at once
# (``should_exit``), at most MAX_STOPPING stay unjoined, and all are joined before the session ends.
_stopping: list[Any] = []
MAX_STOPPING = 16


def stop_soon(servers: list[Any]) -> None:
    """Tell ``servers`` (``ServerThread``-like: ``.server`` a uvicorn server, ``.thread``, ``.stop()``) to exit,
    all at once; join those that have finished by now, and the oldest ones while too many are pending."""
    for s in servers:
        s.server.should_exit = True
    _stopping.extend(servers)
    still = []
    for s in _stopping:
        if s.thread.is_alive():
            still.append(s)
        else:
            s.stop()  # joins at once (and whatever else its stop does)
    while len(still) > MAX_STOPPING:
        still.pop(0).stop()
    _stopping[:] = still


@pytest.fixture(scope="session", autouse=True)
def _join_stopping_servers() -> Iterator[None]:
    yield
    while _stopping:
        _stopping.pop().stop()


@pytest.fixture
def servers_to_stop() -> Iterator[list[Any]]:
    """The in-thread servers a test started (``router`` and ``mock_worker`` add theirs; a test module's own
    factory may add its ``ServerThread``-like ones): told to exit together after the test (``stop_soon``)."""
    started: list[Any] = []
    yield started
    stop_soon(started)


# --- engines ------------------------------------------------------------------------------------------------
# A module with ``ENGINES = ("sglang", "vllm")`` runs each test that uses a mock worker (the ``mock_worker`` /
# ``router`` factories, or ``worker_engine`` itself) once per engine: the mock worker speaks that engine's protocol
# and the router loads the vllm plugin. A test marked ``@pytest.mark.engines("sglang")`` names what it needs
# (an SGLang-only feature: the reason is in the marker's ``reason=``).


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    engines = getattr(metafunc.module, "ENGINES", None)
    if not engines or "worker_engine" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("engines")
    if marker is not None:
        engines = tuple(e for e in engines if e in marker.args)
    metafunc.parametrize("worker_engine", engines, indirect=True)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "engines(*names, reason=...): the engines this test applies to")


@pytest.fixture
def worker_engine(request: pytest.FixtureRequest) -> str:
    """The engine of the mock workers and the router's engine plugins for this test (default: sglang)."""
    return getattr(request, "param", "sglang")


def mock_worker_app(engine: str, config: Any) -> Any:
    """The mock worker app of ``engine`` (same generation, same records of truth)."""
    from slime_router_testing.mock_worker import create_mock_vllm_worker_app, create_mock_worker_app

    return create_mock_vllm_worker_app(config) if engine == "vllm" else create_mock_worker_app(config)


def with_engine(engine: str, plugins: list[str] | None) -> list[str] | None:
    """The plugins a router needs in front of workers of ``engine``."""
    if engine == "vllm" and plugins is not None and "vllm" not in plugins:
        return [*plugins, "vllm"]
    return plugins


@pytest.fixture
def mock_worker(tokenizer_dir: str, servers_to_stop: list[Any], worker_engine: str) -> Callable[..., ServerThread]:
    """Factory: ``mock_worker(**MockWorkerConfig fields)`` → an in-thread mock worker with ``.url`` (SGLang, or
    the engine of the test's ``worker_engine``)."""
    from slime_router_testing.mock_worker import MockWorkerConfig

    def make(**config: Any) -> ServerThread:
        config.setdefault("hf_checkpoint", BUILTIN_CHECKPOINT)
        server = ServerThread(mock_worker_app(worker_engine, MockWorkerConfig(**config))).start()
        servers_to_stop.append(server)
        return server

    return make


@pytest.fixture
def mock_worker_process(tokenizer_dir: str) -> Iterator[Callable[..., Any]]:
    """Factory: a mock worker in its own process (can be killed)."""
    started: list[Any] = []

    def make(**knobs: Any) -> Any:
        proc = start_mock_worker_process(hf_checkpoint=BUILTIN_CHECKPOINT, **knobs)
        started.append(proc)
        return proc

    yield make
    for p in started:
        p.kill()


@pytest.fixture
def router(servers_to_stop: list[Any], worker_engine: str) -> Callable[..., ServerThread]:
    """Factory: ``router(plugins=[...], worker_urls=[...], **Settings fields)`` → a served router (with the engine
    plugin of the test's ``worker_engine``)."""

    def make(**kw: Any) -> ServerThread:
        kw["plugins"] = with_engine(worker_engine, kw.get("plugins"))
        server = start_router(**kw)
        servers_to_stop.append(server)
        return server

    return make


# The fast local subset (`pytest -m "not slow"`) leaves out what starts extra processes or explores many examples:
# the cache in its own process (each start loads the tokenizer in a child), the real CLI in a subprocess, the
# property tests over whole conversations. CI runs everything.
SLOW_MODULES = {"test_cli_demo.py", "test_cli_demo_tools.py", "test_cli_startup.py", "test_radix_tree_process.py",
                "test_openai_history_property.py", "test_shutdown.py", "test_faults.py"}
# Single tests of the same kinds in otherwise fast modules ("module.py::test name", every parametrization): each
# spends seconds in a child Python process (the CLI or a mock worker started, then killed mid-run) or in
# hundreds of generated examples; their modules keep faster tests of the same plugin in the fast subset.
SLOW_TESTS = {
    # the CLI in a subprocess (each start imports the router and its plugins)
    "test_core_plugins.py::test_cli_plugins_lists_sources_and_hooks_of_an_installed_third_party_plugin",
    "test_core_plugins.py::test_cli_serve_help_lists_plugin_flags_and_selection_hides_others",
    "test_core_plugins.py::test_cli_hf_checkpoint_validation_messages",
    "test_admin_plugin.py::test_cli_refuses_no_plugin_core",
    "test_scaleout.py::test_serve_replicas_shares_one_port_keeps_sessions_on_their_owner_and_restarts_a_killed_child",
    "test_scaleout.py::test_serve_replicas_refuses_lb_routing_and_a_missing_plugin",
    # a local Ray cluster started and stopped
    "test_scaleout.py::test_ray_launcher_names_actors_sets_membership_and_reannounces_a_restarted_replica",
    "test_mock_worker.py::test_cli_crash_after_n",
    "test_mock_worker_realistic.py::test_cli_flags_enable_realistic_in_a_worker_process",
    # a mock worker process SIGKILLed while requests run on it; the cache in its own process
    "test_core_proxy.py::test_a_worker_dying_mid_stream_ends_the_stream_with_an_error_and_leaks_nothing",
    "test_balancing.py::test_killed_worker_mid_run_fails_no_request",
    "test_contracts.py::test_the_cache_process_keeps_the_same_contract",
    # property tests with hundreds of examples (1500; 400 for each of 9 parametrizations)
    "test_openapi_core.py::test_generate_request_accepts_exactly_what_validate_generate_accepts",
    "test_openapi_plugins.py::test_chat_body_model_accepts_what_the_parser_accepts",
    "test_openapi_plugins.py::test_completion_body_model_accepts_what_the_parser_accepts",
    "test_openapi_plugins.py::test_retrieve_body_model_accepts_what_the_parser_accepts",
    # the fuzz over every route (its hand-written cases stay fast), the full key x route matrix
    "test_fuzz.py::test_no_route_answers_5xx_or_changes_state_on_fuzzed_input",
    "test_access.py::test_every_route_times_every_key",
    # held by design: workers with 1 s latency, queue timeouts, a worker that hangs until --request-timeout
    "test_overload.py::test_a_client_leaving_the_queue_frees_its_place",
    "test_overload.py::test_bounded_limit_and_queue_serve_24_of_40_and_refuse_16_with_retry_after",
    "test_overload.py::test_openai_routes_take_slots_through_router_generate",
    "test_overload.py::test_a_stream_holds_its_slot_until_it_ends",
    # plugin authors' path: a child pytest session, or pip install into a fresh virtualenv (each 10-40 s)
    "test_pytest_plugin.py::test_every_server_a_fixture_started_is_stopped_after_the_test",
    "test_example_plugins.py::test_the_examples_own_tests_pass_with_it_installed",
    "test_example_plugins.py::test_rollout_logger_in_a_fresh_virtualenv",
    "test_example_plugins.py::test_tenant_limits_in_a_fresh_virtualenv",
    "test_scaffold.py::test_the_generated_plugins_own_tests_pass",
    "test_scaffold.py::test_the_generated_plugin_in_a_fresh_virtualenv",
    "test_plugin_docs.py::test_the_first_plugin_from_pip_install_to_a_request_in_a_fresh_virtualenv",
}


def pytest_collection_modifyitems(config: Any, items: list) -> None:
    # The engine adapter and the cache's process are independent (the cache sees SGLang-shaped replies either way):
    # the cache in its own process runs against SGLang workers only, which keeps the suite's time in bounds.
    both = [i for i in items if "own_process" in i.nodeid and "vllm" in i.nodeid]
    if both:
        config.hook.pytest_deselected(items=both)
        items[:] = [i for i in items if i not in both]
    for item in items:
        if (item.path.name in SLOW_MODULES or "own_process" in item.nodeid
                or f"{item.path.name}::{getattr(item, 'originalname', item.name)}" in SLOW_TESTS):
            item.add_marker(pytest.mark.slow)
