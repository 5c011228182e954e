"""The embedded demo shows what the OpenAI API is for: a chat with ``tools`` gets tool calls, a chat reasons.

`slime-router serve` with no workers (the README's first command) runs in a subprocess; the test waits until it
answers, then sends the README's curls (and the banner's) as a newcomer would. The demo's mock workers are realistic
(random per request), so a tool call is asked for several times: one is expected (each reply calls a tool with
probability 0.8; twenty replies without one: 1e-14).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import threading

import httpx
import pytest

from slime_router_testing import free_port, stop_process_group, wait_http

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
ATTEMPTS = 20


@pytest.fixture(scope="module")
def demo(tokenizer_dir):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIME_ROUTER_")}
    port = free_port()
    # the module, not the console script: the code on PYTHONPATH is the code under test
    proc = subprocess.Popen([sys.executable, "-m", "slime_router_core.cli", "serve", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, stdin=subprocess.DEVNULL, start_new_session=True)
    lines: list[str] = []
    done = threading.Event()

    def read() -> None:  # the whole output, so the pipe never fills; `done` once the banner's curls are out
        for line in proc.stdout:
            lines.append(line)
            if "/v1/chat/completions" in line and '"tools"' in line:
                done.set()
        done.set()

    threading.Thread(target=read, daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health", timeout=180, proc=proc)
        done.wait(timeout=60)
        yield url, lines
    finally:
        stop_process_group(proc)


def _chat(url: str, body: dict) -> dict:
    r = httpx.post(url + "/v1/chat/completions", json={"model": "demo", **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_demo_chat_with_tools_yields_tool_calls(demo):
    url, _ = demo
    for _ in range(ATTEMPTS):
        reply = _chat(url, {"messages": [{"role": "user", "content": "What is the weather in Paris?"}],
                            "tools": TOOLS})
        choice = reply["choices"][0]
        calls = choice["message"].get("tool_calls")
        if calls:
            assert choice["finish_reason"] == "tool_calls"
            assert {c["function"]["name"] for c in calls} == {"get_weather"}
            for c in calls:
                assert isinstance(json.loads(c["function"]["arguments"])["city"], str)
            return
    raise AssertionError(f"no tool call in {ATTEMPTS} chats offering tools; last reply: {reply}")


def test_demo_streamed_chat_with_tools_yields_tool_call_deltas(demo):
    url, _ = demo
    for _ in range(ATTEMPTS):
        with httpx.stream("POST", url + "/v1/chat/completions", timeout=60, json={
                "model": "demo", "stream": True, "tools": TOOLS,
                "messages": [{"role": "user", "content": "Weather in Tokyo?"}]}) as r:
            assert r.status_code == 200
            events = [json.loads(line[6:]) for line in r.iter_lines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
        deltas = [c["delta"] for e in events for c in e.get("choices", [])]
        if any(d.get("tool_calls") for d in deltas):
            return
    raise AssertionError(f"no streamed tool call in {ATTEMPTS} chats offering tools")


def test_demo_plain_chat_reasons(demo):
    url, _ = demo
    for i in range(ATTEMPTS):
        reply = _chat(url, {"messages": [{"role": "user", "content": f"hi {i}"}]})
        message = reply["choices"][0]["message"]
        if message.get("reasoning_content"):
            assert "<think>" not in (message.get("content") or "")  # split off by the reasoning parser
            return
    raise AssertionError(f"no reasoning_content in {ATTEMPTS} plain chats; last reply: {reply}")


def test_demo_banner_offers_a_chat_with_tools_that_works_as_printed(demo):
    url, lines = demo
    curls = [line.strip() for line in lines if line.strip().startswith("curl -s")]
    with_tools = [c for c in curls if '"tools"' in c]
    assert with_tools, "".join(lines)
    argv = shlex.split(with_tools[0])
    body = json.loads(argv[argv.index("-d") + 1])  # the printed command's JSON, as the shell passes it
    assert argv[2] == url + "/v1/chat/completions" and body["tools"]
    for _ in range(ATTEMPTS):
        if _chat(url, body)["choices"][0]["message"].get("tool_calls"):
            return
    raise AssertionError(f"the banner's tools curl gave no tool call in {ATTEMPTS} tries")
