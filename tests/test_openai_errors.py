"""Every bad input to the openai_compat routes: HTTP 400 in OpenAI's error shape, naming the parameter.
(Rejected before any worker is contacted: the router here has a worker URL that nothing listens on.)"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from slime_router_core.tokenizers import BUILTIN_CHECKPOINT
from slime_router_testing import free_port, start_router

U = [{"role": "user", "content": "hi"}]
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    router = start_router(plugins=["openai_compat"], hf_checkpoint=BUILTIN_CHECKPOINT,
                          worker_urls=[f"http://127.0.0.1:{free_port()}"])
    yield router.url
    router.stop()


def chat(**kw: Any) -> dict:
    return {"model": "m", "messages": U, **kw}


CHAT_CASES = [
    # (body, param)
    ({"model": "m"}, "messages"),
    (chat(messages="hi"), "messages"),
    (chat(messages=[]), "messages"),
    (chat(messages=["hi"]), "messages[0]"),
    (chat(messages=[{"content": "x"}]), "messages[0].role"),
    (chat(messages=[{"role": "bot", "content": "x"}]), "messages[0].role"),
    (chat(messages=[{"role": "function", "content": "x"}]), "messages[0].role"),
    (chat(messages=[{"role": "user"}]), "messages[0].content"),
    (chat(messages=[{"role": "user", "content": None}]), "messages[0].content"),
    (chat(messages=[{"role": "system", "content": 5}]), "messages[0].content"),
    (chat(messages=U + [{"role": "tool"}]), "messages[1].content"),
    (chat(messages=U + [{"role": "assistant", "content": None}]), "messages[1].content"),
    (chat(messages=U + [{"role": "assistant", "tool_calls": "x"}]), "messages[1].tool_calls"),
    (chat(messages=U + [{"role": "assistant", "tool_calls": [{"type": "function"}]}]),
     "messages[1].tool_calls[0].function"),
    (chat(messages=U + [{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}]),
     "messages[1].tool_calls[0].function.name"),
    (chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     "messages[0].content[0].type"),
    (chat(messages=[{"role": "user", "content": [{"type": "text"}]}]), "messages[0].content[0].text"),
    (chat(messages=[{"role": "user", "content": "x", "name": 3}]), "messages[0].name"),
    (chat(model=5), "model"),
    (chat(temperature=2.5), "temperature"),
    (chat(temperature=-0.1), "temperature"),
    (chat(temperature="hot"), "temperature"),
    (chat(top_p=0), "top_p"),
    (chat(top_p=1.5), "top_p"),
    (chat(max_tokens=0), "max_tokens"),
    (chat(max_tokens="10"), "max_tokens"),
    (chat(max_tokens=1.5), "max_tokens"),
    (chat(max_completion_tokens=0), "max_completion_tokens"),
    (chat(n=0), "n"),
    (chat(n=1000), "n"),
    (chat(presence_penalty=2.5), "presence_penalty"),
    (chat(frequency_penalty=-3), "frequency_penalty"),
    (chat(repetition_penalty=0), "repetition_penalty"),
    (chat(top_k=0), "top_k"),
    (chat(min_p=1.5), "min_p"),
    (chat(seed="x"), "seed"),
    (chat(user=5), "user"),
    (chat(stream="yes"), "stream"),
    (chat(stream_options={"include_usage": True}), "stream_options"),
    (chat(stream=True, stream_options={"include_usage": "yes"}), "stream_options.include_usage"),
    (chat(stop=["x"] * 33), "stop"),
    (chat(stop=[1]), "stop"),
    (chat(stop_token_ids=[-1]), "stop_token_ids"),
    (chat(logprobs="yes"), "logprobs"),
    (chat(logprobs=True, top_logprobs=21), "top_logprobs"),
    (chat(top_logprobs=2), "top_logprobs"),
    (chat(logit_bias={"5": 200}), "logit_bias"),
    (chat(tools="x"), "tools"),
    (chat(tools=[{"type": "retrieval"}]), "tools[0].type"),
    (chat(tools=[{"type": "function"}]), "tools[0].function"),
    (chat(tools=[{"type": "function", "function": {"name": "bad name!"}}]), "tools[0].function.name"),
    (chat(tools=[{"type": "function", "function": {"name": "f", "parameters": "x"}}]), "tools[0].function.parameters"),
    (chat(tools=TOOLS, tool_choice="always"), "tool_choice"),
    (chat(tool_choice="required"), "tool_choice"),
    (chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "g"}}), "tool_choice"),
    (chat(tools=TOOLS, tool_choice={"type": "function"}), "tool_choice"),
    (chat(response_format={"type": "xml"}), "response_format"),
    (chat(response_format={"type": "json_schema"}), "response_format.json_schema"),
    (chat(response_format={"type": "json_schema", "json_schema": {"schema": {}}}), "response_format.json_schema.name"),
    (chat(chat_template_kwargs="x"), "chat_template_kwargs"),
    (chat(history_mode="other"), "history_mode"),
]


def check_error(r: httpx.Response, param: str | None, code: str | None = None) -> dict:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    assert isinstance(err["message"], str) and err["message"]
    if param:
        assert param.split(".")[-1].split("[")[0] in err["message"]
    if code:
        assert err["code"] == code
    return err


@pytest.mark.parametrize("body,param", CHAT_CASES, ids=[p for _, p in CHAT_CASES])
def test_chat_bad_input(url, body, param):
    check_error(httpx.post(url + "/v1/chat/completions", json=body), param)


@pytest.mark.parametrize("raw", [b"{bad json", b"", b"[1, 2]", b"null"])
def test_bad_json_body(url, raw):
    for route in ("/v1/chat/completions", "/v1/completions", "/retrieve_from_messages"):
        check_error(httpx.post(url + route, content=raw, headers={"content-type": "application/json"}), None,
                    "invalid_json")


COMPLETION_CASES = [
    ({"model": "m"}, "prompt"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": "x", "logprobs": 6}, "logprobs"),
    ({"prompt": "x", "echo": True}, "echo"),
    ({"prompt": "x", "suffix": "y"}, "suffix"),
    ({"prompt": "x", "best_of": 2}, "best_of"),
    ({"prompt": "x", "temperature": 9}, "temperature"),
    ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
]


@pytest.mark.parametrize("body,param", COMPLETION_CASES, ids=[p for _, p in COMPLETION_CASES])
def test_completion_bad_input(url, body, param):
    check_error(httpx.post(url + "/v1/completions", json=body), param)


@pytest.mark.parametrize("body,param", [
    ({}, "messages"),
    ({"messages": [{"role": "x", "content": "y"}]}, "messages[0].role"),
    ({"messages": U, "strict": "yes"}, "strict"),
    ({"messages": U, "tools": "x"}, "tools"),
    ({"messages": U, "chat_template_kwargs": []}, "chat_template_kwargs"),
    ({"messages": U, "history_mode": "x"}, "history_mode"),
])
def test_retrieve_from_messages_bad_input(url, body, param):
    check_error(httpx.post(url + "/retrieve_from_messages", json=body), param)


def test_retrieve_without_cache_says_so(url):
    r = httpx.post(url + "/retrieve_from_messages", json={"messages": U})
    assert r.status_code == 501 and "radix_tree" in r.json()["error"]["message"]


def test_sdk_raises_bad_request_with_param(url):
    c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="m", messages=U, temperature=5)
    assert e.value.status_code == 400 and e.value.param == "temperature"
    assert e.value.type == "invalid_request_error"


def test_no_worker_is_503_in_error_shape(url):
    r = httpx.post(url + "/v1/chat/completions", json=chat())
    assert r.status_code in (502, 503)
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
