"""The README's main job: `slime-router serve` with no workers runs the embedded demo end to end."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import httpx

from slime_router_testing import free_port, wait_http


def _slime_router() -> list[str]:
    exe = shutil.which("slime-router", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "slime_router_core.cli"]


def test_embedded_demo_serves_generate_cache_openai_and_metrics(tokenizer_dir):
    port = free_port()
    # every flag is also an environment variable: the port comes from SLIME_ROUTER_PORT here
    env = dict(os.environ, SLIME_ROUTER_PORT=str(port), SLIME_ROUTER_HOST="127.0.0.1")
    proc = subprocess.Popen(_slime_router() + ["serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health", timeout=120, proc=proc)
        workers = httpx.get(url + "/list_workers").json()["urls"]
        assert len(workers) == 2
        prompt = "Hello, my name is"
        gen = httpx.post(url + "/generate", json={"text": prompt, "sampling_params": {"max_new_tokens": 16}},
                         timeout=30).json()
        assert gen["output_ids"] and gen["meta_info"]["finish_reason"]["type"] in ("stop", "length")
        full = prompt + gen["text"]
        got = httpx.post(url + "/retrieve_from_text", json={"text": full}, timeout=30).json()
        assert got["tokens"][-len(gen["output_ids"]):] == gen["output_ids"]
        assert got["loss_mask"][-len(gen["output_ids"]):] == [1] * len(gen["output_ids"])
        chat = httpx.post(url + "/v1/chat/completions", timeout=30, json={
            "model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}).json()
        assert chat["object"] == "chat.completion" and chat["model"] == "demo"
        metrics = httpx.get(url + "/metrics").json()
        assert metrics["router"]["active_workers"] == 2 and "cache" in metrics
    finally:
        proc.send_signal(signal.SIGTERM)  # the router alone: it must stop its demo workers itself
        try:
            out, _ = proc.communicate(timeout=30)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert f"slime-router serving on http://127.0.0.1:{port}" in out
    assert "curl -s" in out  # the banner tells a newcomer what to try
    # the demo's mock workers are gone with it
    for w in workers:
        try:
            httpx.get(w + "/health", timeout=1)
            raise AssertionError(f"demo worker {w} still running")
        except httpx.HTTPError:
            pass


def test_mock_worker_command_is_part_of_the_cli():
    out = subprocess.run(_slime_router() + ["mock-worker", "--help"], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, COLUMNS="200"))
    assert out.returncode == 0 and "--stream-mode" in out.stdout and "--fail-first-n" in out.stdout


def test_embedded_demo_on_vllm_workers(tokenizer_dir):
    """``--demo-engine vllm``: the demo's mock workers speak vLLM's protocol; the router translates."""
    port = free_port()
    proc = subprocess.Popen(_slime_router() + ["serve", "--demo-engine", "vllm", "--demo-workers", "1", "--host",
                                               "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health", timeout=120, proc=proc)
        (worker,) = httpx.get(url + "/list_workers").json()["workers"]
        assert worker["engine"] == "vllm"
        prompt = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        gen = httpx.post(url + "/generate", json={"text": prompt, "sampling_params": {"max_new_tokens": 16}},
                         timeout=30).json()
        rec = httpx.get(worker["url"] + "/mock/records").json()[-1]
        assert rec["path"] == "/inference/v1/generate" and gen["output_ids"] == rec["output_ids"]
        got = httpx.post(url + "/retrieve_from_text", json={"text": prompt + gen["text"]}, timeout=30).json()
        assert got["tokens"] == rec["input_ids"] + rec["output_ids"] and got["fresh_tokens"] == 0
        chat = httpx.post(url + "/v1/chat/completions", timeout=30, json={
            "model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8})
        assert chat.status_code == 200, chat.text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=30)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert "embedded demo: mock vLLM workers" in out
