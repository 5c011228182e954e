"""A faithful mock SGLang worker for tests, demos and agent development."""

from .app import (
    EOS_TOKEN_ID,
    MockWorkerConfig,
    MockWorkerState,
    create_mock_worker_app,
    serve_mock_worker,
)
from .cli import main, mock_worker_command

__all__ = [
    "EOS_TOKEN_ID",
    "MockWorkerConfig",
    "MockWorkerState",
    "create_mock_worker_app",
    "main",
    "mock_worker_command",
    "serve_mock_worker",
]
