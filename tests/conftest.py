"""Shared fixtures: real servers on free loopback ports, torn down after each test."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import settings

from slime_router_core.testing import ServerThread, start_mock_worker_process, start_router
from slime_router_core.tokenizers import BUILTIN_CHECKPOINT, builtin_tokenizer_dir

# Property tests explore new examples on every local run; CI (CI=true) replays a fixed set, so a submission's
# verdict does not depend on the luck of the draw. A failure found locally is kept in .hypothesis/ and replayed.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(scope="session")
def tokenizer_dir() -> str:
    """The bundled Qwen3 tokenizer, built offline once."""
    return str(builtin_tokenizer_dir())


@pytest.fixture
def mock_worker(tokenizer_dir: str) -> Iterator[Callable[..., ServerThread]]:
    """Factory: ``mock_worker(**MockWorkerConfig fields)`` → an in-thread mock SGLang worker with ``.url``."""
    from slime_router_core.mock_worker import MockWorkerConfig, create_mock_worker_app

    started: list[ServerThread] = []

    def make(**config: Any) -> ServerThread:
        config.setdefault("hf_checkpoint", BUILTIN_CHECKPOINT)
        server = ServerThread(create_mock_worker_app(MockWorkerConfig(**config))).start()
        started.append(server)
        return server

    yield make
    for s in started:
        s.stop()


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
def router() -> Iterator[Callable[..., ServerThread]]:
    """Factory: ``router(plugins=[...], worker_urls=[...], **Settings fields)`` → a served router."""
    started: list[ServerThread] = []

    def make(**kw: Any) -> ServerThread:
        server = start_router(**kw)
        started.append(server)
        return server

    yield make
    for s in started:
        s.stop()


# The fast local subset (`pytest -m "not slow"`) leaves out what starts extra processes or explores many examples:
# the cache in its own process (each start loads the tokenizer in a child), the real CLI in a subprocess, the
# property tests over whole conversations. CI runs everything.
SLOW_MODULES = {"test_cli_demo.py", "test_cli_demo_tools.py", "test_cli_startup.py", "test_radix_tree_process.py",
                "test_openai_history_property.py", "test_shutdown.py"}


def pytest_collection_modifyitems(config: Any, items: list) -> None:
    for item in items:
        if item.path.name in SLOW_MODULES or "own_process" in item.nodeid:
            item.add_marker(pytest.mark.slow)
