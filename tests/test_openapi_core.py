"""The core's wire contracts, as declared: /openapi.json describes every core route (request bodies, 200 schemas,
errors in the project's shape); ``GenerateRequest`` accepts exactly what the hot path's ``validate_generate``
accepts; ``GenerateResponse`` describes SGLang's replies; the SSE framing splits a stream however it is chunked."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st
from pydantic import ValidationError

from slime_router_core import HTTPError, Settings
from slime_router_core.admin import BROADCAST, FORWARD_TO_ONE
from slime_router_core.app import build_app
from slime_router_core.plugins import load_plugins
from slime_router_core.proxy import GenerateRequest, GenerateResponse, validate_generate
from slime_router_core.sse import DONE, END, OPAQUE, EventSplitter, encode_event, parse_event

# --- /openapi.json ----------------------------------------------------------------------------------------

ADMIN = {("GET", "/health"): False, ("POST", "/add_worker"): True, ("POST", "/remove_worker"): True,
         ("GET", "/list_workers"): False, ("GET", "/plugins"): False, ("POST", "/generate"): True}
CORE_ROUTES = {**ADMIN, **{("GET", p): False for p in FORWARD_TO_ONE},
               **{(m, p): m == "POST" for p, m in BROADCAST.items()}}  # (method, path) -> takes a JSON body


@pytest.fixture(scope="module")
def openapi() -> dict:
    app = build_app(Settings(), load_plugins([]))
    resp = TestClient(app.fastapi).get("/openapi.json")
    assert resp.status_code == 200
    return resp.json()


def _refs(schema: Any) -> set[str]:
    """The component names a schema refers to (directly or inside anyOf/items...)."""
    if isinstance(schema, dict):
        found = {schema["$ref"].rsplit("/", 1)[-1]} if "$ref" in schema else set()
        return found.union(*(_refs(v) for k, v in schema.items() if k != "$ref"))
    if isinstance(schema, list):
        return set().union(*(_refs(v) for v in schema))
    return set()


def _declared(openapi: dict, name: str) -> dict:
    component = openapi["components"]["schemas"][name]
    assert component.get("properties") or component.get("anyOf"), (name, component)
    return component


@pytest.mark.parametrize("method,path", sorted(CORE_ROUTES))
def test_every_core_route_declares_its_body_and_200_schema(openapi, method, path):
    operation = openapi["paths"][path][method.lower()]
    ok = operation["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok != {} and _refs(ok), (path, ok)  # a declared model, not "any JSON"
    for name in _refs(ok):
        _declared(openapi, name)
    if CORE_ROUTES[(method, path)]:
        body = operation["requestBody"]["content"]["application/json"]["schema"]
        assert _refs(body), (path, body)
        for name in _refs(body):
            assert openapi["components"]["schemas"][name]["type"] == "object"
    else:
        assert "requestBody" not in operation
    # validation errors are the router's 400 in the project's shape, not FastAPI's 422
    assert "422" not in operation["responses"]
    for status, response in operation["responses"].items():
        if status != "200":
            assert _refs(response["content"]["application/json"]["schema"]) == {"ErrorResponse"}, (path, status)


def test_openapi_generate_documents_the_hot_path(openapi):
    operation = openapi["paths"]["/generate"]["post"]
    assert operation["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/GenerateRequest"}
    assert operation["requestBody"]["required"] is True
    assert _refs(operation["responses"]["200"]["content"]["application/json"]["schema"]) == {"GenerateResponse"}
    assert "text/event-stream" in operation["responses"]["200"]["content"]
    request = _declared(openapi, "GenerateRequest")
    assert {"text", "input_ids", "input_embeds", "sampling_params", "stream", "return_logprob",
            "return_text_in_logprobs", "rid"} <= set(request["properties"])
    assert request.get("additionalProperties") is True  # other SGLang fields pass through
    meta = _declared(openapi, "GenerateMetaInfo")
    assert {"id", "finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens", "weight_version",
            "e2e_latency", "output_token_logprobs"} <= set(meta["properties"])
    assert {"HTTPValidationError", "ValidationError"}.isdisjoint(openapi["components"]["schemas"])


def test_add_worker_documents_both_forms(openapi):
    operation = openapi["paths"]["/add_worker"]["post"]
    assert [p["name"] for p in operation["parameters"]] == ["url", "engine"]
    assert all(p["in"] == "query" for p in operation["parameters"])
    assert operation["requestBody"].get("required") is not True  # ?url= alone is enough
    assert set(_declared(openapi, "WorkerURL")["properties"]) == {"url", "engine"}


# --- GenerateRequest == validate_generate ------------------------------------------------------------------

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-(2**70), 2**70),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=5))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)), max_leaves=6)
ints = st.one_of(st.integers(0, 200_000), st.integers(-(2**70), 2**70))
# values a lax validator would coerce (to bool, int or str): the hot path refuses them
coercible = st.sampled_from([0, 1, -1, 0.0, 1.0, 2.0, "0", "1", "true", "false", "yes", "off", "7", True, False])
not_ints = st.one_of(coercible, st.floats(allow_nan=False), st.text(max_size=3), st.none(), st.just([1]))
objects = st.dictionaries(st.text(max_size=6), json_values, max_size=3)

FIELDS = {
    "text": st.one_of(st.text(max_size=8), coercible, st.lists(st.text(max_size=4), max_size=3),
                      st.lists(st.one_of(st.text(max_size=3), json_scalars), max_size=3), json_values),
    "input_ids": st.one_of(st.lists(ints, max_size=4), st.lists(st.lists(ints, max_size=3), max_size=3),
                           st.lists(st.one_of(ints, not_ints), max_size=4),
                           st.lists(st.lists(st.one_of(ints, not_ints), max_size=3), max_size=3),
                           st.lists(st.one_of(st.lists(ints, max_size=2), ints), max_size=3), json_values),
    "input_embeds": st.one_of(st.lists(st.lists(st.floats(allow_nan=False), max_size=2), max_size=2), json_values),
    "sampling_params": st.one_of(objects, st.lists(objects, max_size=3),
                                 st.lists(st.one_of(objects, json_scalars), max_size=3), json_values),
    "stream": st.one_of(st.booleans(), coercible, json_values),
    "return_logprob": st.one_of(st.booleans(), coercible, json_values),
    "return_text_in_logprobs": st.one_of(st.booleans(), coercible, json_values),
    "rid": st.one_of(st.text(max_size=6), coercible, st.lists(json_values, max_size=3), json_values),
}
OTHERS = {k: v for k, v in FIELDS.items() if k not in ("text", "input_ids", "input_embeds")}
EXTRA = {"logprob_start_len": json_values, "lora_path": json_values, "custom_field": json_values}
good_prompts = st.one_of(  # exactly one valid prompt: the other fields decide
    st.fixed_dictionaries({"text": st.one_of(st.text(max_size=6), st.lists(st.text(max_size=3), min_size=1,
                                                                           max_size=3))}),
    st.fixed_dictionaries({"input_ids": st.one_of(st.lists(ints, min_size=1, max_size=4),
                                                  st.lists(st.lists(ints, min_size=1, max_size=3), min_size=1,
                                                           max_size=3))}),
    st.fixed_dictionaries({"input_embeds": json_values.filter(lambda v: v is not None)}),
)
edge_prompts = st.one_of(  # one prompt just outside (or inside) what is allowed
    st.fixed_dictionaries({"text": st.sampled_from([[], [""], "", [None], ["a", 1], None])}),
    st.fixed_dictionaries({"input_ids": st.sampled_from([[], [[]], [[1], []], [0], [[0]], [True], [1.0], [[1, 2], 3],
                                                         [-1], [2**63], None])}),
    st.fixed_dictionaries({"input_embeds": st.sampled_from([[], [[]], 0, "", False, None])}),
)
bodies = st.one_of(
    st.builds(lambda prompt, rest: {**rest, **prompt}, st.one_of(good_prompts, edge_prompts),
              st.fixed_dictionaries({}, optional={**OTHERS, **EXTRA})),
    st.fixed_dictionaries({}, optional={**FIELDS, **EXTRA}),  # any mix, prompts included
    json_values,  # not an object, mostly
)


def _hot_path_accepts(body: Any) -> bool:
    try:
        validate_generate(body)
    except HTTPError as e:
        assert e.status == 400
        return False
    return True


def _schema_accepts(body: Any) -> bool:
    try:
        GenerateRequest.model_validate(body)
    except ValidationError:
        return False
    return True


@hyp_settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies)
@example({"text": "Hi"})
@example({"text": ["a", "b"], "sampling_params": [{}, {"max_new_tokens": 3}], "rid": ["x", 5]})
@example({"input_ids": [[1, 2], [3]], "stream": True, "return_logprob": False, "return_text_in_logprobs": None})
@example({"input_embeds": 5, "text": None, "extra": {"anything": [1]}})
@example({"input_ids": [1, True]})
@example({"input_ids": [1.0]})
@example({"input_ids": [[1], []]})
@example({"input_ids": [2**70]})
@example({"text": []})
@example({"text": "a", "input_ids": [1]})
@example({"text": "a", "sampling_params": []})
@example({"text": "a", "sampling_params": [1]})
@example({"text": "a", "stream": 1})
@example({"text": "a", "rid": {"a": 1}})
@example({"sampling_params": {}})
@example([1, 2])
@example(None)
def test_generate_request_accepts_exactly_what_validate_generate_accepts(body):
    assert _schema_accepts(body) == _hot_path_accepts(body), body


def test_generate_request_agrees_on_the_hot_paths_own_examples():
    # the bodies tests/test_core_proxy.py sends to /generate, and good ones
    for raw, ok in [(b"[1, 2]", False), (b'{"sampling_params": {}}', False), (b'{"text": 5}', False),
                    (b'{"text": []}', False), (b'{"input_ids": ["a"]}', False), (b'{"input_ids": []}', False),
                    (b'{"text": "a", "input_ids": [1]}', False), (b'{"text": "a", "sampling_params": "hot"}', False),
                    (b'{"text": "a", "stream": "yes"}', False), (b'{"text": "a", "return_logprob": 1}', False),
                    (b'{"text": "a", "rid": 5}', False), (b'{"text": "a", "sampling_params": {"n": 2}}', True),
                    (b'{"input_ids": [1, 2], "stream": true, "rid": "r"}', True)]:
        body = orjson.loads(raw)
        assert _hot_path_accepts(body) is ok and _schema_accepts(body) is ok, raw


# --- GenerateResponse describes SGLang's replies -------------------------------------------------------------

SGLANG_DOC_REPLY = {  # ../shared/sglang-worker-api.md, "Non-streaming response"
    "text": "...", "output_ids": [123, 456, 151645],
    "meta_info": {"id": "9ee9", "finish_reason": {"type": "stop", "matched": 151645}, "prompt_tokens": 17,
                  "completion_tokens": 3, "cached_tokens": 0, "weight_version": "default", "e2e_latency": 1.23,
                  "output_token_logprobs": [[-0.11, 123, None], [-0.52, 456, None], [-0.01, 151645, None]]}}


def test_generate_response_describes_sglang_replies(router, mock_worker):
    GenerateResponse.model_validate(SGLANG_DOC_REPLY)
    with pytest.raises(ValidationError):
        GenerateResponse.model_validate({"text": "x", "meta_info": {"id": "1"}})  # token counts are always there
    w = mock_worker()
    r = router(plugins=[], worker_urls=[w.url])
    for body in [{"text": "Hello", "sampling_params": {"max_new_tokens": 5}},
                 {"text": "Hello", "return_logprob": True, "return_text_in_logprobs": True, "logprob_start_len": 0,
                  "top_logprobs_num": 2, "sampling_params": {"max_new_tokens": 4}},
                 {"input_ids": [[1, 2], [3]], "sampling_params": {"max_new_tokens": 2}},
                 {"text": "Hi", "sampling_params": {"max_new_tokens": 2, "n": 2}}]:
        reply = httpx.post(r.url + "/generate", json=body).json()
        for one in reply if isinstance(reply, list) else [reply]:
            meta = GenerateResponse.model_validate(one).meta_info
            assert meta.completion_tokens == len(one["output_ids"])
        with httpx.stream("POST", r.url + "/generate", json={**body, "stream": True}) as resp:
            events = EventSplitter()
            values = [parse_event(e) for chunk in resp.iter_bytes() for e in events.feed(chunk)]
        assert values[-1] is END and events.rest == b""
        for chunk in values[:-1]:
            GenerateResponse.model_validate(chunk)


# --- SSE framing -------------------------------------------------------------------------------------------


def test_encode_and_parse_are_inverse_and_done_ends():
    obj = {"text": "a\n\nb", "meta_info": {"id": "x", "finish_reason": None}}
    assert encode_event(obj) == b"data: " + orjson.dumps(obj) + b"\n\n"
    assert DONE == b"data: [DONE]\n\n"
    assert parse_event(encode_event(obj)[:-2]) == obj  # JSON escapes newlines: one line per event
    assert parse_event(DONE[:-2]) is END and parse_event(b"data:[DONE]") is END
    for opaque in (b": keep-alive", b"event: ping", b"id: 3\ndata: {}", b"data: {not json", b""):
        assert parse_event(opaque) is OPAQUE, opaque
    assert parse_event(b'data: {"a":\ndata: 1}') == {"a": 1}  # several data lines are one value


wire_values = st.recursive(  # what orjson writes (64-bit integers)
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False,
              allow_infinity=False), st.text(max_size=5)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=6)
event_objects = st.dictionaries(st.text(max_size=5), wire_values, max_size=3)
events = st.lists(st.one_of(event_objects.map(encode_event), st.just(b": ping\n\n"), st.just(DONE)), max_size=6)


@hyp_settings(max_examples=300, deadline=None)
@given(events, st.data())
def test_splitting_does_not_depend_on_chunking(stream_events, data):
    stream = b"".join(stream_events)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
    splitter = EventSplitter()
    got = [e for c in chunks for e in splitter.feed(c)]
    assert splitter.rest == b""
    assert [e + b"\n\n" for e in got] == stream_events
    assert [parse_event(e) for e in got] == [OPAQUE if e.startswith(b":") else END if e == DONE
                                             else orjson.loads(e[6:]) for e in stream_events]
