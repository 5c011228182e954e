"""Faithful mock SGLang and vLLM workers for tests, demos and agent development."""

from .app import (
    EOS_TOKEN_ID,
    MockWorkerConfig,
    MockWorkerState,
    create_mock_worker_app,
    serve_mock_worker,
)
from .cli import main, mock_worker_command
from .vllm import create_mock_vllm_worker_app, serve_mock_vllm_worker

__all__ = [
    "EOS_TOKEN_ID",
    "MockWorkerConfig",
    "MockWorkerState",
    "create_mock_vllm_worker_app",
    "create_mock_worker_app",
    "main",
    "mock_worker_command",
    "serve_mock_vllm_worker",
    "serve_mock_worker",
]
