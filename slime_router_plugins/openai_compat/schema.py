"""Request validation for the OpenAI routes → 400 in OpenAI's error shape, naming the parameter.

``{"error": {"message": ..., "type": "invalid_request_error", "param": "temperature", "code": ...}}``.
Unknown top-level keys are ignored (clients such as LangChain send extras like ``parallel_tool_calls``).
"""

from __future__ import annotations

import re
from typing import Any

from slime_router_core import HTTPError
from slime_router_core.proxy import parse_json

MAX_STOP = 32  # SGLang's limit (OpenAI's is 4); documented in README.md
MAX_TOP_LOGPROBS = 20
MAX_N = 128
ROLES = ("system", "developer", "user", "assistant", "tool")
_FN_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


def bad(message: str, param: str | None, code: str | None = "invalid_value") -> HTTPError:
    return HTTPError(400, message, type="invalid_request_error", param=param, code=code)


def parse_body(raw: bytes) -> dict[str, Any]:
    """The request's JSON object, read by the router's one body parser (``parse_json``); refusals in OpenAI's
    error shape with code ``invalid_json``. (The routes' documented bodies are the models in ``models.py``.)"""
    try:
        body = parse_json(raw)
    except HTTPError as e:
        raise bad(e.message, None, "invalid_json") from None
    if not isinstance(body, dict):
        raise bad("The request body must be a JSON object.", None, "invalid_json")
    return body


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def number(body: dict, key: str, lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> None:
    v = body.get(key)
    if v is None:
        return
    if not _is_num(v):
        raise bad(f"Invalid type for '{key}': expected a number, but got {type(v).__name__}.", key, "invalid_type")
    if (lo is not None and (v < lo or (lo_open and v == lo))) or (hi is not None and v > hi):
        lo_s = f"greater than {lo}" if lo_open else f"at least {lo}"
        rng = f"{lo_s} and at most {hi}" if hi is not None else lo_s
        raise bad(f"Invalid '{key}': {v} is out of range; it must be {rng}.", key)


def integer(body: dict, key: str, lo: int | None = None, hi: int | None = None) -> None:
    v = body.get(key)
    if v is None:
        return
    if not _is_int(v):
        raise bad(f"Invalid type for '{key}': expected an integer, but got {type(v).__name__}.", key, "invalid_type")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise bad(f"Invalid '{key}': {v} is out of range; it must be {rng}.", key)


def boolean(body: dict, key: str) -> None:
    v = body.get(key)
    if v is not None and not isinstance(v, bool):
        raise bad(f"Invalid type for '{key}': expected a boolean, but got {type(v).__name__}.", key, "invalid_type")


def string(body: dict, key: str) -> None:
    v = body.get(key)
    if v is not None and not isinstance(v, str):
        raise bad(f"Invalid type for '{key}': expected a string, but got {type(v).__name__}.", key, "invalid_type")


def _content_ok(content: Any, param: str) -> None:
    if isinstance(content, str):
        return
    if isinstance(content, list):
        for j, part in enumerate(content):
            if isinstance(part, str):
                continue
            if not isinstance(part, dict) or "type" not in part:
                raise bad(f"Invalid '{param}[{j}]': a content part must be an object with a 'type'.",
                          f"{param}[{j}]", "invalid_type")
            if part["type"] in ("text", "input_text", "output_text"):
                if not isinstance(part.get("text"), str):
                    raise bad(f"Missing required parameter: '{param}[{j}].text'.", f"{param}[{j}].text",
                              "missing_required_parameter")
            elif part["type"] == "refusal":
                continue
            else:
                raise bad(f"Invalid '{param}[{j}].type': content parts of type {part['type']!r} are not supported "
                          f"(text only).", f"{param}[{j}].type")
        return
    raise bad(f"Invalid type for '{param}': expected a string or an array of content parts, but got "
              f"{type(content).__name__}.", param, "invalid_type")


def _tool_calls_ok(calls: Any, param: str) -> None:
    if not isinstance(calls, list):
        raise bad(f"Invalid type for '{param}': expected an array.", param, "invalid_type")
    for j, c in enumerate(calls):
        p = f"{param}[{j}]"
        if not isinstance(c, dict):
            raise bad(f"Invalid type for '{p}': expected an object.", p, "invalid_type")
        if c.get("type", "function") != "function":
            raise bad(f"Invalid '{p}.type': only 'function' tool calls are supported.", f"{p}.type")
        f = c.get("function")
        if not isinstance(f, dict):
            raise bad(f"Missing required parameter: '{p}.function'.", f"{p}.function", "missing_required_parameter")
        if not isinstance(f.get("name"), str) or not f["name"]:
            raise bad(f"Missing required parameter: '{p}.function.name'.", f"{p}.function.name",
                      "missing_required_parameter")
        args = f.get("arguments")
        if args is not None and not isinstance(args, (str, dict)):
            raise bad(f"Invalid type for '{p}.function.arguments': expected a JSON string.",
                      f"{p}.function.arguments", "invalid_type")


def validate_messages(messages: Any, param: str = "messages") -> None:
    if messages is None:
        raise bad(f"Missing required parameter: '{param}'.", param, "missing_required_parameter")
    if not isinstance(messages, list):
        raise bad(f"Invalid type for '{param}': expected an array of message objects.", param, "invalid_type")
    if not messages:
        raise bad(f"Invalid '{param}': empty array. Expected an array with minimum length 1.", param,
                  "empty_array")
    for i, m in enumerate(messages):
        p = f"{param}[{i}]"
        if not isinstance(m, dict):
            raise bad(f"Invalid type for '{p}': expected a message object.", p, "invalid_type")
        role = m.get("role")
        if role is None:
            raise bad(f"Missing required parameter: '{p}.role'.", f"{p}.role", "missing_required_parameter")
        if role not in ROLES:
            raise bad(f"Invalid value: {role!r}. Supported values for '{p}.role' are: {', '.join(ROLES)}.",
                      f"{p}.role")
        if m.get("name") is not None and not isinstance(m["name"], str):
            raise bad(f"Invalid type for '{p}.name': expected a string.", f"{p}.name", "invalid_type")
        content = m.get("content")
        if role == "assistant":
            if m.get("tool_calls") is not None:
                _tool_calls_ok(m["tool_calls"], f"{p}.tool_calls")
            if content is None and not m.get("tool_calls"):
                raise bad(f"Missing required parameter: '{p}.content' (an assistant message needs content or "
                          f"tool_calls).", f"{p}.content", "missing_required_parameter")
            if content is not None:
                _content_ok(content, f"{p}.content")
            rc = m.get("reasoning_content")
            if rc is not None and not isinstance(rc, str):
                raise bad(f"Invalid type for '{p}.reasoning_content': expected a string.",
                          f"{p}.reasoning_content", "invalid_type")
        else:
            if content is None:
                raise bad(f"Missing required parameter: '{p}.content'.", f"{p}.content", "missing_required_parameter")
            _content_ok(content, f"{p}.content")
            if role == "tool" and m.get("tool_call_id") is not None and not isinstance(m["tool_call_id"], str):
                raise bad(f"Invalid type for '{p}.tool_call_id': expected a string.", f"{p}.tool_call_id",
                          "invalid_type")


def validate_tools(body: dict) -> None:
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise bad("Invalid type for 'tools': expected an array of tool objects.", "tools", "invalid_type")
        for i, t in enumerate(tools):
            p = f"tools[{i}]"
            if not isinstance(t, dict):
                raise bad(f"Invalid type for '{p}': expected an object.", p, "invalid_type")
            if t.get("type") != "function":
                raise bad(f"Invalid value for '{p}.type': only 'function' tools are supported.", f"{p}.type")
            f = t.get("function")
            if not isinstance(f, dict):
                raise bad(f"Missing required parameter: '{p}.function'.", f"{p}.function",
                          "missing_required_parameter")
            name = f.get("name")
            if not isinstance(name, str) or not _FN_NAME.fullmatch(name):
                raise bad(f"Invalid '{p}.function.name': a function name is 1-64 characters of a-z, A-Z, 0-9, "
                          f"'_', '-', '.', ':'.", f"{p}.function.name")
            if f.get("parameters") is not None and not isinstance(f["parameters"], dict):
                raise bad(f"Invalid type for '{p}.function.parameters': expected a JSON schema object.",
                          f"{p}.function.parameters", "invalid_type")
    tc = body.get("tool_choice")
    if tc is None:
        return
    names = [t["function"]["name"] for t in tools or []]
    if isinstance(tc, str):
        if tc not in ("none", "auto", "required"):
            raise bad(f"Invalid value: {tc!r}. Supported values for 'tool_choice' are: 'none', 'auto', 'required', "
                      f"or an object naming a function.", "tool_choice")
        if tc != "none" and not tools:
            raise bad("Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are specified.",
                      "tool_choice")
        return
    if not isinstance(tc, dict) or tc.get("type") != "function" or not isinstance(tc.get("function"), dict) \
            or not isinstance(tc["function"].get("name"), str):
        raise bad("Invalid 'tool_choice': expected 'none', 'auto', 'required' or "
                  "{\"type\": \"function\", \"function\": {\"name\": ...}}.", "tool_choice")
    if tc["function"]["name"] not in names:
        raise bad(f"Invalid 'tool_choice': function {tc['function']['name']!r} is not among the provided tools "
                  f"{names}.", "tool_choice")


def validate_stop(body: dict) -> None:
    stop = body.get("stop")
    if stop is None:
        return
    if isinstance(stop, str):
        return
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise bad("Invalid type for 'stop': expected a string or an array of strings.", "stop", "invalid_type")
    if len(stop) > MAX_STOP:
        raise bad(f"Invalid 'stop': at most {MAX_STOP} stop sequences are supported, got {len(stop)}.", "stop")


def validate_sampling(body: dict) -> None:
    """The sampling parameters shared by /v1/chat/completions and /v1/completions."""
    string(body, "model")
    number(body, "temperature", 0, 2)
    number(body, "top_p", 0, 1, lo_open=True)
    integer(body, "max_tokens", 1)
    integer(body, "max_completion_tokens", 1)
    integer(body, "min_tokens", 0)
    boolean(body, "stream")
    so = body.get("stream_options")
    if so is not None:
        if not isinstance(so, dict):
            raise bad("Invalid type for 'stream_options': expected an object.", "stream_options", "invalid_type")
        if not body.get("stream"):
            raise bad("Invalid 'stream_options': 'stream_options' is only allowed when 'stream' is true.",
                      "stream_options")
        if so.get("include_usage") is not None and not isinstance(so["include_usage"], bool):
            raise bad("Invalid type for 'stream_options.include_usage': expected a boolean.",
                      "stream_options.include_usage", "invalid_type")
    validate_stop(body)
    number(body, "presence_penalty", -2, 2)
    number(body, "frequency_penalty", -2, 2)
    number(body, "repetition_penalty", 0, 2, lo_open=True)
    number(body, "min_p", 0, 1)
    v = body.get("top_k")
    if v is not None and (not _is_int(v) or (v < 1 and v != -1)):
        raise bad(f"Invalid 'top_k': {v!r}; it must be a positive integer, or -1 for no limit.", "top_k")
    integer(body, "n", 1, MAX_N)
    integer(body, "seed")
    string(body, "user")
    boolean(body, "ignore_eos")
    string(body, "regex")
    string(body, "ebnf")
    sti = body.get("stop_token_ids")
    if sti is not None and (not isinstance(sti, list) or not all(_is_int(t) and t >= 0 for t in sti)):
        raise bad("Invalid type for 'stop_token_ids': expected an array of non-negative integers.",
                  "stop_token_ids", "invalid_type")
    lb = body.get("logit_bias")
    if lb is not None:
        if not isinstance(lb, dict):
            raise bad("Invalid type for 'logit_bias': expected an object of token id → bias.", "logit_bias",
                      "invalid_type")
        for k, b in lb.items():
            if not (str(k).isascii() and str(k).isdigit()) or not _is_num(b) or not -100 <= b <= 100:
                raise bad(f"Invalid 'logit_bias': entry {k!r}: {b!r}; keys are token ids and biases lie within "
                          f"[-100, 100].", "logit_bias")


def validate_response_format(body: dict) -> None:
    rf = body.get("response_format")
    if rf is None:
        return
    if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
        raise bad("Invalid 'response_format': expected {\"type\": \"text\" | \"json_object\" | \"json_schema\"}.",
                  "response_format")
    if rf["type"] == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict):
            raise bad("Missing required parameter: 'response_format.json_schema'.", "response_format.json_schema",
                      "missing_required_parameter")
        if not isinstance(js.get("name"), str):
            raise bad("Missing required parameter: 'response_format.json_schema.name'.",
                      "response_format.json_schema.name", "missing_required_parameter")
        if js.get("schema") is not None and not isinstance(js["schema"], dict):
            raise bad("Invalid type for 'response_format.json_schema.schema': expected an object.",
                      "response_format.json_schema.schema", "invalid_type")


def validate_chat(body: dict) -> None:
    validate_messages(body.get("messages"))
    validate_sampling(body)
    boolean(body, "logprobs")
    integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if body.get("top_logprobs") is not None and not body.get("logprobs"):
        raise bad("Invalid 'top_logprobs': 'logprobs' must be set to true when 'top_logprobs' is used.",
                  "top_logprobs")
    validate_tools(body)
    validate_response_format(body)
    ctk = body.get("chat_template_kwargs")
    if ctk is not None and not isinstance(ctk, dict):
        raise bad("Invalid type for 'chat_template_kwargs': expected an object.", "chat_template_kwargs",
                  "invalid_type")
    boolean(body, "separate_reasoning")
    hm = body.get("history_mode")
    if hm is not None and hm not in ("template", "raw"):
        raise bad(f"Invalid 'history_mode': {hm!r}; expected 'template' or 'raw'.", "history_mode")


def validate_completion(body: dict) -> None:
    prompt = body.get("prompt")
    if prompt is None:
        raise bad("Missing required parameter: 'prompt'.", "prompt", "missing_required_parameter")
    ok = isinstance(prompt, str) or (isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str)) \
        or (isinstance(prompt, list) and prompt and all(_is_int(t) and t >= 0 for t in prompt))
    if not ok:
        raise bad("Invalid 'prompt': expected a string (or a list holding one string) or a non-empty array of "
                  "token ids. Batches of prompts are not supported: send one request per prompt.", "prompt")
    validate_sampling(body)
    v = body.get("logprobs")
    if v is not None and (not _is_int(v) or not 0 <= v <= 5):
        raise bad(f"Invalid 'logprobs': {v!r}; it must be an integer between 0 and 5.", "logprobs")
    echo = body.get("echo")
    if echo is not None and echo is not False:  # only false (or absent) passes: not 0, not ""
        raise bad("'echo' is not supported.", "echo", "unsupported_parameter")
    if body.get("suffix") is not None:
        raise bad("'suffix' is not supported.", "suffix", "unsupported_parameter")
    integer(body, "best_of", 1, 1)
    validate_response_format(body)


def validate_retrieve(body: dict) -> None:
    """``POST /retrieve_from_messages``: the conversation as for a chat request, and the retrieval's flags."""
    validate_messages(body.get("messages"))
    validate_tools(body)
    if body.get("chat_template_kwargs") is not None and not isinstance(body["chat_template_kwargs"], dict):
        raise bad("Invalid type for 'chat_template_kwargs': expected an object.", "chat_template_kwargs",
                  "invalid_type")
    if body.get("history_mode") not in (None, "template", "raw"):
        raise bad(f"Invalid 'history_mode': {body['history_mode']!r}; expected 'template' or 'raw'.",
                  "history_mode")
    if body.get("strict") is not None and not isinstance(body["strict"], bool):
        raise bad("Invalid type for 'strict': expected a boolean.", "strict", "invalid_type")
    boolean(body, "add_generation_prompt")
    boolean(body, "return_text")
