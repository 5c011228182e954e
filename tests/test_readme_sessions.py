"""The README's sessions quick start runs as printed, against a real router and mock worker."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

from slime_router_core import Settings
from slime_router_core.tokenizers import BUILTIN_CHECKPOINT
from slime_router_testing import ServerThread, start_router
from slime_router_testing.mock_worker import MockWorkerConfig, create_mock_worker_app

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_readme_sessions_example_runs(servers_to_stop):
    text = README.read_text()
    section = text[text.index("### Sessions and the Python client"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]
    worker = ServerThread(create_mock_worker_app(MockWorkerConfig(hf_checkpoint=BUILTIN_CHECKPOINT,
                                                                  max_random_tokens=12))).start()
    router = start_router(plugins=["radix_tree", "openai_compat", "sessions"], settings=Settings(
        hf_checkpoint=BUILTIN_CHECKPOINT, worker_urls=[worker.url]))
    servers_to_stop += [router, worker]
    out = io.StringIO()
    scope: dict = {}
    with contextlib.redirect_stdout(out):
        exec(code.replace("http://127.0.0.1:30000", router.url), scope)  # noqa: S102 -- the README's own code
    lines = out.getvalue().split("\n")
    assert lines[0].startswith("new ") and int(lines[0].split()[1]) > 0 and int(lines[0].split()[2]) > 0
    assert set(scope["batch"]) == {"ep-1", "ep-2"}  # never opened: each an error, not raised
    assert all(getattr(v, "status", None) == 404 for v in scope["batch"].values())
