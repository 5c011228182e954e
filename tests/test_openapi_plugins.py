"""The plugins' routes declare their request and response models, so ``/openapi.json`` describes the real API.

- The document: every plugin route answers 200 with a schema that declares fields (or the text it serves), has a
  ``requestBody`` schema where it takes a body, and every ``$ref`` resolves.
- The OpenAI routes keep their hand parser (``openai_compat/schema.py``: OpenAI's error shape, naming the
  parameter) and describe their bodies with the models of ``openai_compat/models.py``: on generated bodies,
  valid and invalid, the models accept exactly what the parser accepts (and refuse every error case of
  test_openai_errors.py).
- Real answers of the routes validate against the model each route declares (streams: every event).
- The balancing routes' bodies are parsed by FastAPI into their models: a bad field is the project's 400 naming it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest
from fastapi.routing import APIRoute
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from slime_router_core import HTTPError
from slime_router_core.app import build_app
from slime_router_core.plugins import load_plugins
from slime_router_core.settings import Settings
from slime_router_core.tokenizers import BUILTIN_CHECKPOINT
from slime_router_plugins.openai_compat import models as oa
from slime_router_plugins.openai_compat.schema import (
    parse_body,
    validate_chat,
    validate_completion,
    validate_retrieve,
)
from test_openai_errors import CHAT_CASES, COMPLETION_CASES

PLUGINS = ["radix_tree", "openai_compat", "metrics", "balancing"]
TAKES_NO_BODY = {("POST", "/resume")}  # every other POST route of a plugin takes a JSON body
REF = "#/components/schemas/"


@pytest.fixture(scope="module")
def app() -> Any:
    return build_app(Settings(hf_checkpoint=BUILTIN_CHECKPOINT), load_plugins(PLUGINS))


@pytest.fixture(scope="module")
def doc(app) -> dict[str, Any]:
    return app.fastapi.openapi()


def plugin_routes(app: Any, plugin: str) -> list[tuple[str, str, APIRoute]]:
    return [(method, r.path, r) for r in app.fastapi.routes if isinstance(r, APIRoute)
            and r.endpoint.__module__.startswith(f"slime_router_plugins.{plugin}.") for method in sorted(r.methods)]


def resolve(doc: dict, schema: dict) -> dict:
    while "$ref" in schema:
        assert schema["$ref"].startswith(REF), schema
        schema = doc["components"]["schemas"][schema["$ref"][len(REF):]]
    return schema


def declares_fields(doc: dict, schema: dict | None) -> bool:
    """An object schema naming its fields (a bare ``{}`` or ``{"type": "object"}`` says nothing); an optional
    body (``anyOf: [model, null]``) or a union answer: every alternative but null does."""
    if schema is None:
        return False
    schema = resolve(doc, schema)
    alternatives = [s for s in schema.get("anyOf", []) if s != {"type": "null"}]
    if alternatives:
        return all(declares_fields(doc, s) for s in alternatives)
    return bool(schema.get("properties"))


@pytest.mark.parametrize("plugin", PLUGINS)
def test_every_plugin_route_declares_its_answer_and_body(app, doc, plugin):
    routes = plugin_routes(app, plugin)
    assert routes, f"no routes found for plugin {plugin}"
    problems = []
    for method, path, _ in routes:
        op = doc["paths"][path][method.lower()]
        content = op["responses"].get("200", {}).get("content", {})
        if "application/json" in content:
            if not declares_fields(doc, content["application/json"].get("schema")):
                problems.append(f"{method} {path}: the 200 JSON answer has no schema naming its fields")
        elif not any(c.get("schema", {}).get("type") == "string" for c in content.values()):
            problems.append(f"{method} {path}: no 200 answer schema")
        body = op.get("requestBody")
        if method == "POST" and (method, path) not in TAKES_NO_BODY:
            schema = (body or {}).get("content", {}).get("application/json", {}).get("schema")
            if not declares_fields(doc, schema):
                problems.append(f"{method} {path}: no requestBody schema naming its fields")
        elif body is not None:
            problems.append(f"{method} {path}: a requestBody on a route that takes none")
    assert not problems, "\n".join(problems)


def test_streamed_answers_are_documented_as_event_streams(doc):
    for path, chunk in (("/v1/chat/completions", "ChatCompletionChunk"), ("/v1/completions", "CompletionChunk")):
        stream = doc["paths"][path]["post"]["responses"]["200"]["content"]["text/event-stream"]
        refs = stream["itemSchema"]["properties"]["data"]["contentSchema"]["anyOf"]
        assert {"$ref": REF + chunk} in refs and declares_fields(doc, refs[0])


def test_every_ref_resolves(doc):
    def refs(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "$ref":
                    yield v
                else:
                    yield from refs(v)
        elif isinstance(node, list):
            for v in node:
                yield from refs(v)

    found = set(refs(doc))
    assert found and all(r.startswith(REF) for r in found)
    assert {r[len(REF):] for r in found} <= set(doc["components"]["schemas"])


HAND_PARSED = [("/v1/chat/completions", oa.ChatCompletionRequest), ("/v1/completions", oa.CompletionRequest),
               ("/retrieve_from_messages", oa.RetrieveFromMessagesRequest)]


@pytest.mark.parametrize("path,model", HAND_PARSED, ids=[p for p, _ in HAND_PARSED])
def test_hand_parsed_bodies_are_documented_by_their_models(doc, path, model):
    body = doc["paths"][path]["post"]["requestBody"]
    assert body["required"] is True
    assert body["content"]["application/json"]["schema"] == {"$ref": REF + model.__name__}
    schema = model.model_json_schema(ref_template=REF + "{model}")
    components = doc["components"]["schemas"]
    for name, sub in schema.pop("$defs", {}).items():
        assert components[name] == sub, name
    assert components[model.__name__] == schema


# --- the models and the hand parser accept the same bodies ------------------------------------------------


def parser_accepts(validate: Callable[[dict], None], raw: bytes) -> bool:
    try:
        validate(parse_body(raw))
    except HTTPError as e:
        assert e.status == 400 and e.to_dict()["error"]["type"] == "invalid_request_error"
        return False
    return True


def model_accepts(model: type[BaseModel], raw: bytes) -> bool:
    try:
        model.model_validate_json(raw)
    except ValidationError:
        return False
    return True


def agree(validate: Callable[[dict], None], model: type[BaseModel], body: Any) -> bool:
    raw = orjson.dumps(body)
    by_parser, by_model = parser_accepts(validate, raw), model_accepts(model, raw)
    assert by_parser == by_model, f"parser {'accepts' if by_parser else 'refuses'}, model " \
                                  f"{'accepts' if by_model else 'refuses'}: {raw.decode()}"
    return by_parser


# JSON values of every type, around the bounds the rules use (ints stay within 64 bits, as orjson reads them)
scalars = st.one_of(st.none(), st.booleans(), st.sampled_from([0, 1, 2, 5, 6, 20, 21, 32, 33, 128, 129, -1, -2, -3]),
                    st.integers(-2**63, 2**63 - 1), st.sampled_from([0.0, 0.5, 1.0, 1.5, 2.0, 2.5, -0.5, -100.5]),
                    st.floats(-300, 300, allow_nan=False), st.text(max_size=4),
                    st.sampled_from(["none", "auto", "required", "function", "text", "raw", "template", "f"]))
junk = st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(st.text(max_size=3), scalars, max_size=2))


def pick(*choices: st.SearchStrategy) -> st.SearchStrategy:
    """One of ``choices``, each as likely (``st.one_of`` flattens nested alternatives: junk's many would win)."""
    return st.sampled_from(choices).flatmap(lambda s: s)


def mostly(valid: st.SearchStrategy, invalid: st.SearchStrategy = junk) -> st.SearchStrategy:
    """Usually a well-formed value (so the rules deeper inside it are reached), sometimes anything."""
    return pick(valid, valid, valid, invalid)


names = st.one_of(st.sampled_from(["f", "get_weather", "a.b:c-d_1", "bad name!", "f\n", "", "x" * 64, "x" * 65]),
                  st.text(alphabet="ab_.:-! \n", min_size=0, max_size=6))
num = st.one_of(st.floats(-3, 3, allow_nan=False), st.integers(-3, 3))


def text_or(other: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(st.text(max_size=3), other)


part = pick(st.text(max_size=3), junk, st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "input_text", "output_text", "refusal", "image_url"])},
    optional={"text": text_or(scalars), "refusal": scalars}))
content = pick(st.text(max_size=5), st.lists(part, max_size=3), junk)
function_call = mostly(st.fixed_dictionaries(
    {}, optional={"name": st.one_of(names, scalars),
                  "arguments": st.one_of(st.just("{}"), st.dictionaries(st.text(max_size=2), scalars), scalars)}))
tool_call = mostly(st.fixed_dictionaries(
    {"function": function_call}, optional={"type": mostly(st.just("function"), scalars), "id": scalars}))
message = mostly(st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant", "assistant", "tool", "function", "bot"])},
    optional={"content": content, "name": text_or(scalars), "tool_calls": mostly(st.lists(tool_call, max_size=2)),
              "reasoning_content": text_or(scalars), "tool_call_id": text_or(scalars)}))
messages = mostly(st.lists(message, min_size=1, max_size=3))
tool = mostly(st.fixed_dictionaries(
    {"type": mostly(st.just("function"), scalars),
     "function": mostly(st.fixed_dictionaries({"name": names}, optional={
         "parameters": mostly(st.just({"type": "object"})), "description": st.text(max_size=3)}))}))
tools = mostly(st.lists(tool, min_size=1, max_size=2))
tool_choice = pick(st.sampled_from(["none", "auto", "required", "always"]), junk, st.fixed_dictionaries(
    {"type": mostly(st.just("function"), scalars)},
    optional={"function": mostly(st.fixed_dictionaries({"name": st.one_of(names, scalars)}))}))
response_format = mostly(st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "json_object", "json_schema", "xml"])},
    optional={"json_schema": mostly(st.fixed_dictionaries(
        {}, optional={"name": text_or(scalars), "schema": mostly(st.just({"type": "object"}), scalars)}))}))
token_ids = st.lists(st.integers(-2, 100), max_size=3)
logit_bias = mostly(st.dictionaries(st.sampled_from(["5", "17", "x", "", "-1", "1.5", "\u00b2", "\u0663"]),
                                    st.one_of(st.integers(-150, 150), num, scalars), min_size=1, max_size=2))

SAMPLING = {
    "model": text_or(scalars), "temperature": st.one_of(num, scalars), "top_p": st.one_of(num, scalars),
    "min_p": st.one_of(num, scalars), "top_k": st.one_of(st.integers(-3, 50), scalars), "max_tokens": scalars,
    "max_completion_tokens": scalars, "min_tokens": scalars, "presence_penalty": st.one_of(num, scalars),
    "frequency_penalty": st.one_of(num, scalars), "repetition_penalty": st.one_of(num, scalars), "n": scalars,
    "seed": scalars, "user": scalars, "stream": st.one_of(st.booleans(), scalars), "ignore_eos": scalars,
    "regex": scalars, "ebnf": scalars, "stop_token_ids": mostly(token_ids), "logit_bias": logit_bias,
    "stream_options": mostly(st.fixed_dictionaries({}, optional={"include_usage": scalars})),
    "stop": pick(st.text(max_size=3), st.lists(st.text(max_size=2), max_size=3), st.just(["x"] * 33), junk),
    "response_format": response_format,
}
TOOLS_FIELDS = {"tools": tools, "tool_choice": tool_choice}
CHAT_ONLY = {"logprobs": scalars, "top_logprobs": st.one_of(st.integers(-1, 22), scalars),
             "chat_template_kwargs": mostly(st.just({"enable_thinking": False})), "separate_reasoning": scalars,
             "history_mode": scalars, "parallel_tool_calls": junk}
CHAT = {**SAMPLING, **TOOLS_FIELDS, **CHAT_ONLY, "messages": messages}
COMPLETION_ONLY = {"prompt": pick(st.text(max_size=4), st.lists(st.text(max_size=2), max_size=2), token_ids, junk),
                   "logprobs": st.one_of(st.integers(-1, 6), scalars), "echo": scalars, "suffix": scalars,
                   "best_of": scalars}
COMPLETION = {**SAMPLING, **COMPLETION_ONLY}
RETRIEVE = {**TOOLS_FIELDS, "messages": messages, "chat_template_kwargs": CHAT_ONLY["chat_template_kwargs"],
            "history_mode": scalars, "strict": scalars, "add_generation_prompt": scalars, "return_text": scalars,
            "temperature": junk}


@st.composite
def bodies(draw: Any, fields: dict[str, st.SearchStrategy], base: dict[str, Any]) -> Any:
    """A valid base body with a few fields set (each to a valid or an invalid value) or removed; now and then
    not an object at all."""
    if draw(st.integers(0, 30)) == 0:
        return draw(junk)
    body = dict(base)
    for key in draw(st.lists(st.sampled_from(sorted(fields)), max_size=4, unique=True)):
        if draw(st.integers(0, 5)) == 0:
            body.pop(key, None)
        else:
            body[key] = draw(fields[key])
    return body


USER = [{"role": "user", "content": "hi"}]
PROPERTY = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# each body varies the fields of one group (so each group's rules are reached often), or of all of them
CHAT_GROUPS = {"messages": {"messages": messages}, "tools": TOOLS_FIELDS, "sampling": SAMPLING,
               "chat": CHAT_ONLY, "all": CHAT}
COMPLETION_GROUPS = {"prompt": COMPLETION_ONLY, "sampling": SAMPLING, "all": COMPLETION}


@pytest.mark.parametrize("group", CHAT_GROUPS)
@PROPERTY
@given(data=st.data())
def test_chat_body_model_accepts_what_the_parser_accepts(group, data):
    body = data.draw(bodies(CHAT_GROUPS[group], {"model": "m", "messages": USER}))
    agree(validate_chat, oa.ChatCompletionRequest, body)


@pytest.mark.parametrize("group", COMPLETION_GROUPS)
@PROPERTY
@given(data=st.data())
def test_completion_body_model_accepts_what_the_parser_accepts(group, data):
    body = data.draw(bodies(COMPLETION_GROUPS[group], {"prompt": "Once upon a time"}))
    agree(validate_completion, oa.CompletionRequest, body)


@PROPERTY
@given(bodies(RETRIEVE, {"messages": USER}))
def test_retrieve_body_model_accepts_what_the_parser_accepts(body):
    agree(validate_retrieve, oa.RetrieveFromMessagesRequest, body)


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                           "parameters": {"type": "object", "properties": {"city": {}}}}}]
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}
VALID_CHATS = [
    {"messages": USER},
    {"model": "m", "messages": [{"role": "system", "content": "be brief"}, *USER,
                                {"role": "assistant", "content": None, "tool_calls": [CALL]},
                                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}],
     "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
     "parallel_tool_calls": False},
    {"messages": [{"role": "developer", "content": [{"type": "text", "text": "a"}, "b"]},
                  {"role": "user", "content": [{"type": "input_text", "text": "hi"}], "name": "ann"},
                  {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}], "reasoning_content": "r"}],
     "temperature": 0, "top_p": 1, "top_k": -1, "min_p": 0.1, "max_tokens": 8, "max_completion_tokens": 9,
     "min_tokens": 0, "presence_penalty": -2, "frequency_penalty": 2, "repetition_penalty": 1.1, "n": 128,
     "seed": 3, "stop": ["x"] * 32, "stop_token_ids": [0, 151643], "ignore_eos": True, "logit_bias": {"5": -100},
     "user": "u", "stream": True, "stream_options": {"include_usage": True}, "logprobs": True, "top_logprobs": 20,
     "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object"}}},
     "chat_template_kwargs": {"enable_thinking": False}, "separate_reasoning": False, "history_mode": "raw"},
    {"messages": USER, "tools": TOOLS, "tool_choice": "required", "stop": "x", "regex": "a+",
     "response_format": {"type": "json_object"}},
]
VALID_COMPLETIONS = [{"prompt": "x"}, {"prompt": ["x"], "logprobs": 5, "echo": False, "suffix": None, "best_of": 1},
                     {"prompt": [1, 2, 0], "stream": True, "stream_options": {}, "response_format": {"type": "text"}}]


CHAT_PARSE = (validate_chat, oa.ChatCompletionRequest)
COMPLETION_PARSE = (validate_completion, oa.CompletionRequest)
RETRIEVE_PARSE = (validate_retrieve, oa.RetrieveFromMessagesRequest)
EDGES = [  # where a loose reading (Python's truthiness, re.match's "$", str.isdigit, 1.0 == 1) would differ
    (CHAT_PARSE, {"messages": USER, "tools": [{"type": "function", "function": {"name": "f\n"}}]}),
    (CHAT_PARSE, {"messages": USER, "logit_bias": {"\u00b2": 1}}),
    (CHAT_PARSE, {"messages": USER, "top_k": -1.0}),
    (CHAT_PARSE, {"messages": USER, "n": 2.0}),
    (CHAT_PARSE, {"messages": USER, "temperature": True}),
    (CHAT_PARSE, {"messages": USER, "stream": False, "stream_options": None}),
    (CHAT_PARSE, {"messages": [*USER, {"role": "assistant", "tool_calls": []}]}),
    (CHAT_PARSE, {"messages": [{"role": "user", "content": [{"type": ["text"], "text": "x"}]}]}),
    (COMPLETION_PARSE, {"prompt": "x", "echo": 0}),
    (COMPLETION_PARSE, {"prompt": "x", "echo": ""}),
    (COMPLETION_PARSE, {"prompt": [0.0]}),
    (RETRIEVE_PARSE, {"messages": USER, "return_text": 1}),
    (RETRIEVE_PARSE, {"messages": USER, "add_generation_prompt": "yes"}),
]


@pytest.mark.parametrize("parse,body", EDGES, ids=[orjson.dumps(b).decode()[:60] for _, b in EDGES])
def test_edge_bodies_get_the_same_verdict(parse, body):
    agree(*parse, body)


@pytest.mark.parametrize("body", VALID_CHATS)
def test_representative_chat_bodies_pass_both(body):
    assert agree(validate_chat, oa.ChatCompletionRequest, body)


@pytest.mark.parametrize("body", VALID_COMPLETIONS)
def test_representative_completion_bodies_pass_both(body):
    assert agree(validate_completion, oa.CompletionRequest, body)


@pytest.mark.parametrize("body,param", CHAT_CASES, ids=[p for _, p in CHAT_CASES])
def test_the_chat_error_cases_are_refused_by_the_model_too(body, param):
    assert not agree(validate_chat, oa.ChatCompletionRequest, body)


@pytest.mark.parametrize("body,param", COMPLETION_CASES, ids=[p for _, p in COMPLETION_CASES])
def test_the_completion_error_cases_are_refused_by_the_model_too(body, param):
    assert not agree(validate_completion, oa.CompletionRequest, body)


# --- real answers validate against the declared models ----------------------------------------------------


def declared_model(app: Any, method: str, path: str) -> type[BaseModel]:
    """The model a route declares for its 200 answer (``response_model=``, or ``responses={200: {"model"}}``)."""
    for r in app.fastapi.routes:
        if isinstance(r, APIRoute) and r.path == path and method in r.methods:
            model = r.response_model if isinstance(r.response_model, type) else r.responses.get(200, {}).get("model")
            assert isinstance(model, type) and issubclass(model, BaseModel), f"{method} {path} declares no model"
            return model
    raise AssertionError(f"no route {method} {path}")


def events(resp: httpx.Response) -> list[Any]:
    out = []
    for block in resp.text.split("\n\n"):
        if block.startswith("data: ") and block != "data: [DONE]":
            out.append(json.loads(block[len("data: "):]))
    assert resp.text.endswith("data: [DONE]\n\n")
    return out


@pytest.fixture
def served(router, mock_worker) -> dict[str, Any]:
    worker = mock_worker()
    r = router(plugins=PLUGINS, hf_checkpoint=BUILTIN_CHECKPOINT, worker_urls=[worker.url])
    return {"router": r, "worker": worker, "url": r.url, "app": r.app}


def check(served: dict, method: str, path: str, expect_status: int = 200, **kw: Any) -> dict:
    resp = httpx.request(method, served["url"] + path, timeout=30, **kw)
    assert resp.status_code == expect_status, resp.text
    declared_model(served["app"], method, path).model_validate_json(resp.content)
    return resp.json()


def test_openai_answers_match_their_declared_models(served):
    w = served["worker"].url
    httpx.post(w + "/mock/configure", json={"mode": "tool_call"}).raise_for_status()
    chat = {"model": "m", "messages": USER, "tools": TOOLS, "logprobs": True, "top_logprobs": 2, "n": 2}
    out = check(served, "POST", "/v1/chat/completions", json=chat)
    assert out["choices"][0]["message"]["tool_calls"] and out["trajectory"] is not None
    assert out["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    streamed = events(httpx.post(served["url"] + "/v1/chat/completions", timeout=30,
                                 json={**chat, "stream": True, "stream_options": {"include_usage": True}}))
    for e in streamed:
        (oa.ErrorResponse if "error" in e else oa.ChatCompletionChunk).model_validate(e)
    assert any(c["delta"].get("tool_calls") for e in streamed for c in e["choices"]) and streamed[-1]["usage"]

    httpx.post(w + "/mock/configure", json={"mode": "think"}).raise_for_status()
    out = check(served, "POST", "/v1/chat/completions", json={"messages": USER, "max_tokens": 16})
    message = out["choices"][0]["message"]
    assert message["reasoning_content"] is not None
    retrieval = check(served, "POST", "/retrieve_from_messages",
                      json={"messages": [*USER, {"role": "assistant", "content": message["content"]},
                                         {"role": "user", "content": "and?"}], "return_text": True})
    assert retrieval["tokens"] and retrieval["text"]

    out = check(served, "POST", "/v1/completions", json={"prompt": "Once", "logprobs": 2, "max_tokens": 8})
    assert out["choices"][0]["logprobs"]["tokens"]
    for e in events(httpx.post(served["url"] + "/v1/completions", timeout=30,
                               json={"prompt": [1, 2, 3], "stream": True, "logprobs": 1, "max_tokens": 8})):
        (oa.ErrorResponse if "error" in e else oa.CompletionChunk).model_validate(e)
    check(served, "GET", "/v1/models")
    stats = check(served, "GET", "/openai_compat/stats")
    assert stats["chat_requests"] == 3 and "rewritten_turns_template_rule" in stats  # extras kept
    err = httpx.post(served["url"] + "/v1/chat/completions", json={"messages": USER, "temperature": 9})
    assert err.status_code == 400
    oa.ErrorResponse.model_validate_json(err.content)


def test_metrics_and_balancing_answers_match_their_declared_models(served):
    httpx.post(served["url"] + "/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 4}})
    snapshot = check(served, "GET", "/metrics")
    assert snapshot["cache"] is not None and snapshot["audit"] is not None
    assert check(served, "GET", "/metrics/requests")["requests"]
    assert check(served, "GET", "/workers/state")["workers"]
    assert check(served, "POST", "/pause", json={"mode": "reject", "wait": False})["paused"]
    assert check(served, "POST", "/resume") == {"paused": False, "released": 0}
    assert check(served, "POST", "/abort_request", json={"rid": "nobody"})["routed"] == "broadcast"
    report = check(served, "POST", "/update_weight_version", json={"new_version": "3"})
    assert report["success"] is True
    check(served, "POST", "/update_weights_from_disk", json={"model_path": "/ckpt/4", "weight_version": "4"})


@pytest.mark.parametrize("path,body,param", [
    ("/pause", {"mode": "later"}, "mode"),
    ("/pause", {"timeout": "soon"}, "timeout"),
    ("/abort_request", {"rid": 5}, "rid"),
    ("/abort_request", {}, "rid"),
    ("/update_weight_version", {"new_version": ["7"]}, "new_version"),
])
def test_balancing_bodies_are_parsed_by_their_models(served, path, body, param):
    resp = httpx.post(served["url"] + path, json=body)
    assert resp.status_code == 400
    err = resp.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and param in err["message"]


def test_balancing_bodies_sent_as_curl_does_are_parsed_too(served):
    # curl -d sends application/x-www-form-urlencoded: the body is still read as JSON, as it always was
    form = {"content-type": "application/x-www-form-urlencoded"}
    resp = httpx.post(served["url"] + "/pause", content=b'{"wait": false, "mode": "reject"}', headers=form)
    assert resp.status_code == 200 and resp.json()["mode"] == "reject", resp.text
    assert httpx.post(served["url"] + "/resume").json()["paused"] is False
    resp = httpx.post(served["url"] + "/pause", content=b'{"wait": fal', headers=form)
    assert resp.status_code == 400 and "Malformed JSON" in resp.json()["error"]["message"]


def test_trajectory_cache_answers_match_their_declared_models(served):
    prompt = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    reply = httpx.post(served["url"] + "/generate", json={"text": prompt}, timeout=30).json()
    got = check(served, "POST", "/retrieve_from_text", json={"text": prompt + reply["text"]})
    assert got["generated_tokens"] > 0 and got["evicted"] is False
    stats = check(served, "GET", "/radix_tree/stats")
    assert stats["records"] == 1 and stats["retrievals"] == 1
