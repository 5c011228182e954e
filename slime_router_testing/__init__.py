"""Test and demo support for slime-router; the router itself (``slime_router_core``) never imports it at import time.

- ``slime_router_testing.mock_worker``: a faithful mock SGLang worker (``python -m slime_router_testing.mock_worker``,
  ``slime-router mock-worker``).
- ``slime_router_testing.tokenizer``: builds the bundled Qwen3 tokenizer directory offline (``builtin:qwen3``).
- ``slime_router_testing.servers`` (re-exported here): real servers on free loopback ports, for tests, demos and
  plugin authors.
"""

from .servers import (
    ServerThread,
    WorkerProcess,
    free_port,
    start_mock_worker_process,
    start_router,
    stop_process_group,
    wait_http,
)

__all__ = [
    "ServerThread",
    "WorkerProcess",
    "free_port",
    "start_mock_worker_process",
    "start_router",
    "stop_process_group",
    "wait_http",
]
