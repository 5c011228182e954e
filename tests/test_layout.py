"""Package layout (issue 13): the core is the framework; the mock worker, the tokenizer builder and the server
helpers for tests live in ``slime_router_testing``, which the core never imports at import time."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import slime_router_core

REPO = Path(__file__).resolve().parents[1]


def test_importing_the_core_imports_nothing_from_slime_router_testing():
    code = ("import json, sys\n"
            "import slime_router_core, slime_router_core.app, slime_router_core.cli, slime_router_core.tokenizers\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'slime_router_testing')))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_the_core_has_no_test_support_submodules():
    for name in ("mock_worker", "testing"):
        assert importlib.util.find_spec(f"slime_router_core.{name}") is None, name
        assert not any((Path(p) / name).exists() or (Path(p) / f"{name}.py").exists()
                       for p in slime_router_core.__path__), name


def test_the_test_support_package_has_the_moved_code():
    import slime_router_testing
    from slime_router_testing.mock_worker import MockWorkerConfig, create_mock_worker_app
    from slime_router_testing.tokenizer import QWEN3_CHAT_TEMPLATE, builtin_tokenizer_dir

    assert callable(create_mock_worker_app) and MockWorkerConfig().hf_checkpoint
    assert callable(builtin_tokenizer_dir) and "<|im_start|>" in QWEN3_CHAT_TEMPLATE
    for name in ("free_port", "wait_http", "ServerThread", "stop_process_group", "WorkerProcess",
                 "start_mock_worker_process", "start_router"):
        assert name in slime_router_testing.__all__ and hasattr(slime_router_testing, name), name
    assert importlib.util.find_spec("slime_router_testing.mock_worker.__main__") is not None
