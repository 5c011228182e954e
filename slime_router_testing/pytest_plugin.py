"""pytest fixtures for slime-router plugin authors, shipped through the ``pytest11`` entry point.

Installing slime-router makes them available in every pytest session (no ``conftest.py`` needed); ``-p
no:slime_router`` turns them off. Every name starts with ``slime_`` so they never clash with a project's own.

- ``slime_tokenizer`` (session): the bundled Qwen3 tokenizer (a ``transformers`` tokenizer, built offline);
  ``slime_tokenizer_dir`` its directory. Needs the ``trajectory`` extra.
- ``slime_mock_worker``: a running mock SGLang worker (``MockWorker``: ``.url``, ``.records()`` -- exactly what it
  received and generated --, ``.configure(**knobs)``, ``.clear_records()``); ``slime_mock_worker_factory(**config)``
  starts more, with ``MockWorkerConfig`` fields.
- ``slime_router``: a factory, ``slime_router(plugins=["my_plugin"], **settings)`` -> a ``RunningRouter`` serving
  on a free loopback port (``.url``, ``.app``, ``.router``, ``.client``), in front of ``slime_mock_worker`` unless
  ``worker_urls`` are given, with the bundled tokenizer unless ``hf_checkpoint`` is given.
- ``slime_client``: an ``httpx.Client`` (closed after the test).

Everything started by a fixture is stopped when the test ends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

__all__ = ["MockWorker", "RunningRouter"]


class MockWorker:
    """A mock SGLang worker serving in a thread, and its records of truth."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.url: str = server.url

    def records(self) -> list[dict[str, Any]]:
        """Every sequence the worker generated, in order: ``input_ids`` it received, ``output_ids``,
        ``output_logprobs``, ``weight_version(s)``, ``finish_reason``, ``text``..."""
        return _http("GET", self.url + "/mock/records")

    def clear_records(self) -> None:
        _http("DELETE", self.url + "/mock/records")

    def configure(self, **knobs: Any) -> dict[str, Any]:
        """Change the worker's behaviour at run time (``MockWorkerConfig`` fields: ``stop_at_eos``, ``latency``,
        ``fail_first_n``, ``weight_version``...)."""
        return _http("POST", self.url + "/mock/configure", knobs)

    def stop(self) -> None:
        self.server.stop()


class RunningRouter:
    """A router serving on a free loopback port."""

    def __init__(self, server: Any, client: Any) -> None:
        self.server = server
        self.url: str = server.url
        self.app = server.app
        self.router = server.app.router  # the runtime: .registry, .pool, .settings, .plugins
        self.client = client  # an httpx.Client with base_url=url

    def plugins(self) -> list[str]:
        return self.router.plugins.names()

    def stop(self) -> None:
        self.client.close()
        self.server.stop()


def _http(method: str, url: str, body: Any = None) -> Any:
    """The standard library only (the mock's control routes need no HTTP client dependency)."""
    import json
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as reply:
        raw = reply.read()
    return json.loads(raw) if raw else None


@pytest.fixture(scope="session")
def slime_tokenizer_dir() -> str:
    """The bundled Qwen3 tokenizer's directory (``builtin:qwen3``), built offline once per session."""
    from slime_router_testing.tokenizer import builtin_tokenizer_dir

    return str(builtin_tokenizer_dir())


@pytest.fixture(scope="session")
def slime_tokenizer(slime_tokenizer_dir: str) -> Any:
    """The bundled Qwen3 tokenizer, as the router loads it for ``--hf-checkpoint builtin:qwen3``."""
    from slime_router_core.tokenizers import BUILTIN_CHECKPOINT, load_tokenizer

    return load_tokenizer(BUILTIN_CHECKPOINT)


@pytest.fixture
def slime_mock_worker_factory(slime_tokenizer_dir: str) -> Iterator[Callable[..., MockWorker]]:
    """``slime_mock_worker_factory(**MockWorkerConfig fields)`` -> a started ``MockWorker``."""
    from slime_router_core.tokenizers import BUILTIN_CHECKPOINT
    from slime_router_testing.mock_worker import MockWorkerConfig, create_mock_worker_app
    from slime_router_testing.servers import ServerThread

    started: list[MockWorker] = []

    def make(**config: Any) -> MockWorker:
        config.setdefault("hf_checkpoint", BUILTIN_CHECKPOINT)
        worker = MockWorker(ServerThread(create_mock_worker_app(MockWorkerConfig(**config))).start())
        started.append(worker)
        return worker

    yield make
    for worker in started:
        worker.stop()


@pytest.fixture
def slime_mock_worker(slime_mock_worker_factory: Callable[..., MockWorker]) -> MockWorker:
    """A running mock SGLang worker with the default configuration."""
    return slime_mock_worker_factory()


@pytest.fixture
def slime_router(request: pytest.FixtureRequest) -> Iterator[Callable[..., RunningRouter]]:
    """``slime_router(plugins=None, block=None, extra=None, **Settings fields)`` -> a ``RunningRouter``.

    ``plugins``: the plugins to load (``None``: every installed one, ``[]``: only the core); ``block``: names never
    loaded; ``extra``: ``(name, object)`` pairs registered directly (a plugin not installed yet). Without
    ``worker_urls`` the router fronts ``slime_mock_worker``; without ``hf_checkpoint`` it loads the bundled Qwen3
    tokenizer (the trajectory cache and the OpenAI routes need one). Plugin options go in ``extra_settings``:
    ``slime_router(plugins=["x"], extra_settings={"x_flag": 3})`` is ``--x-flag 3``.
    """
    import httpx

    from slime_router_core.settings import Settings
    from slime_router_core.tokenizers import BUILTIN_CHECKPOINT
    from slime_router_testing.servers import start_router

    started: list[RunningRouter] = []

    def make(plugins: list[str] | None = None, block: list[str] | None = None,
             extra: list[tuple[str, Any]] | None = None, extra_settings: dict[str, Any] | None = None,
             **settings: Any) -> RunningRouter:
        if "worker_urls" not in settings:
            settings["worker_urls"] = [request.getfixturevalue("slime_mock_worker").url]
        if "hf_checkpoint" not in settings:
            request.getfixturevalue("slime_tokenizer_dir")
            settings["hf_checkpoint"] = BUILTIN_CHECKPOINT
        server = start_router(Settings(host="127.0.0.1", extra=dict(extra_settings or {}), **settings),
                              plugins=plugins, block=block, extra=extra)
        running = RunningRouter(server, httpx.Client(base_url=server.url, timeout=60))
        started.append(running)
        return running

    yield make
    for running in started:
        running.stop()


@pytest.fixture
def slime_client() -> Iterator[Any]:
    """An ``httpx.Client`` (60 s timeout), closed after the test."""
    import httpx

    with httpx.Client(timeout=60) as client:
        yield client
