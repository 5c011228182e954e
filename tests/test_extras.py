"""A pass-through install (no "trajectory" extra): the plugins that need the tokenizer stack are skipped, saying
which extra to install, and the rest serves. The stack is hidden from a child interpreter (sys.modules[name] =
None makes every import of it fail, as on a machine where it is not installed)."""

from __future__ import annotations

import json
import subprocess
import sys

from slime_router_core.errors import TRAJECTORY_MODULES

CHILD = """
import json, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
for name in %(hidden)r:
    sys.modules[name] = None

import httpx  # the test extra's client, not part of the stack
from slime_router_core.errors import PluginLoadError
from slime_router_core.plugins import load_plugins
from slime_router_testing import start_router

class Worker(BaseHTTPRequestHandler):  # an SGLang-shaped worker in the standard library
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        out = json.dumps({"text": " ok", "output_ids": [1], "meta_info": {"echo": body}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    def log_message(self, *a):
        pass

worker = ThreadingHTTPServer(("127.0.0.1", 0), Worker)
threading.Thread(target=worker.serve_forever, daemon=True).start()
pm = load_plugins()
result = {"loaded": pm.names(), "skipped": pm.skipped}
try:
    load_plugins(["radix_tree"])
except PluginLoadError as e:
    result["explicit"] = str(e)
router = start_router(worker_urls=["http://127.0.0.1:%%d" %% worker.server_port])
try:
    reply = httpx.post(router.url + "/generate", json={"text": "hi"}, timeout=30)
    result["generate"] = [reply.status_code, reply.json()["meta_info"]["echo"]]
    result["metrics"] = httpx.get(router.url + "/metrics", timeout=30).status_code
finally:
    router.stop()
result["stack_imported"] = [m for m in %(hidden)r if sys.modules.get(m) is not None]
print(json.dumps(result))
"""


def test_a_pass_through_router_runs_without_the_trajectory_extra():
    proc = subprocess.run([sys.executable, "-c", CHILD % {"hidden": list(TRAJECTORY_MODULES)}], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(got["skipped"]) == {"radix_tree", "openai_compat"}
    hint = "pip install 'slime-router[trajectory]'"
    assert all(hint in why for why in got["skipped"].values())
    assert {"core", "balancing", "metrics"} <= set(got["loaded"]) and "radix_tree" not in got["loaded"]
    assert "cannot load" in got["explicit"] and hint in got["explicit"]
    assert got["generate"] == [200, {"text": "hi"}] and got["metrics"] == 200  # passed through untouched
    assert got["stack_imported"] == []
    assert "plugin 'radix_tree' skipped" in proc.stderr
