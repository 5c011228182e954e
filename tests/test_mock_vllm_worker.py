"""The mock vLLM worker, exercised over real HTTP (uvicorn on a loopback port)."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from slime_router_core.tokenizers import BUILTIN_CHECKPOINT
from slime_router_testing import ServerThread
from slime_router_testing.mock_worker import (
    EOS_TOKEN_ID,
    MockWorkerConfig,
    create_mock_vllm_worker_app,
    create_mock_worker_app,
)

GEN = "/inference/v1/generate"
PROMPT = [151644, 872, 198, 9707, 151645, 198, 151644, 77091, 198]  # <|im_start|>user\nHello<|im_end|>\n...


@pytest.fixture
def make_worker(tokenizer_dir: str, servers_to_stop: list[Any]):
    clients: list[httpx.Client] = []

    def make(generate_endpoint: bool = True, **config: Any) -> httpx.Client:
        config.setdefault("hf_checkpoint", BUILTIN_CHECKPOINT)
        app = create_mock_vllm_worker_app(MockWorkerConfig(**config), generate_endpoint=generate_endpoint)
        server = ServerThread(app).start()
        servers_to_stop.append(server)
        c = httpx.Client(base_url=server.url, timeout=10)
        c.state = app.state.mock  # type: ignore[attr-defined]
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.close()


@pytest.fixture
def w(make_worker):
    return make_worker()


def generate(c: httpx.Client, token_ids=PROMPT, **sp: Any) -> dict:
    r = c.post(GEN, json={"token_ids": token_ids, "sampling_params": sp})
    assert r.status_code == 200, r.text
    return r.json()


def completion(c: httpx.Client, **body: Any) -> dict:
    body.setdefault("prompt", PROMPT)
    r = c.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def sse(c: httpx.Client, path: str, body: dict) -> list[dict]:
    """The parsed chunks of a streamed reply, asserting the SSE framing and the final ``data: [DONE]``."""
    with c.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    assert raw.endswith("data: [DONE]\n\n")
    blocks = [b for b in raw.split("\n\n") if b]
    assert all(b.startswith("data: ") for b in blocks)
    assert blocks[-1] == "data: [DONE]" and "data: [DONE]" not in blocks[:-1]
    return [json.loads(b[len("data: "):]) for b in blocks[:-1]]


def records(c: httpx.Client) -> list[dict]:
    return c.get("/mock/records").json()


def wait_for(pred, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def bad_request(r: httpx.Response, param: str | None = None, type_: str = "BadRequestError") -> dict:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert list(err) == ["message", "type", "param", "code"]
    assert err["code"] == 400 and err["type"] == type_ and isinstance(err["message"], str)
    if param is not None:
        assert err["param"] == param
    return err


# ------------------------------------------------------------------ /inference/v1/generate


def test_generate_reply_shape(w):
    out = w.post(GEN, json={"request_id": "req-1", "token_ids": PROMPT,
                            "sampling_params": {"max_tokens": 7, "ignore_eos": True}}).json()
    assert list(out) == ["request_id", "model", "created", "choices", "usage", "prompt_logprobs",
                         "kv_transfer_params"]
    assert out["request_id"] == "req-1" and out["model"] == "mock-qwen3" and isinstance(out["created"], int)
    assert out["prompt_logprobs"] is None and out["kv_transfer_params"] is None
    (ch,) = out["choices"]
    assert list(ch) == ["index", "token_ids", "logprobs", "finish_reason"]  # no text, no stop_reason
    assert ch["index"] == 0 and ch["logprobs"] is None and ch["finish_reason"] == "length"
    assert len(ch["token_ids"]) == 7 and all(isinstance(t, int) for t in ch["token_ids"])
    assert out["usage"] == {"prompt_tokens": len(PROMPT), "total_tokens": len(PROMPT) + 7, "completion_tokens": 7,
                            "prompt_tokens_details": None}
    assert "weight_version" not in json.dumps(out)
    # max_tokens defaults to 16 (vLLM's SamplingParams default); a request id is made up when absent
    out = generate(w, ignore_eos=True)
    assert len(out["choices"][0]["token_ids"]) == 16 and out["request_id"]
    assert generate(w, ignore_eos=True)["request_id"] != out["request_id"]


def test_generate_logprobs_shape(w):
    assert generate(w, max_tokens=4, seed=1)["choices"][0]["logprobs"] is None
    for k in (0, 1, 3):
        ch = generate(w, max_tokens=6, seed=1, ignore_eos=True, logprobs=k)["choices"][0]
        content = ch["logprobs"]["content"]
        assert list(ch["logprobs"]) == ["content"] and len(content) == len(ch["token_ids"]) == 6
        for tid, entry in zip(ch["token_ids"], content):
            assert list(entry) == ["token", "logprob", "bytes", "top_logprobs"]
            assert entry["token"] == f"token_id:{tid}" and entry["bytes"] is None
            assert isinstance(entry["logprob"], float) and entry["logprob"] <= 0
            tops = entry["top_logprobs"]
            assert len(tops) == max(k, 1)  # vLLM keeps max(logprobs, 1) entries, the sampled token first
            assert tops[0] == {"token": f"token_id:{tid}", "logprob": entry["logprob"], "bytes": None}
            assert [t["logprob"] for t in tops] == sorted((t["logprob"] for t in tops), reverse=True)


def test_generate_is_deterministic_per_seed_and_matches_the_sglang_mock(w, servers_to_stop):
    a = generate(w, max_tokens=12, seed=5, ignore_eos=True, logprobs=0)["choices"][0]
    b = generate(w, max_tokens=12, seed=5, ignore_eos=True, logprobs=0)["choices"][0]
    c = generate(w, max_tokens=12, seed=6, ignore_eos=True)["choices"][0]
    assert a == b and a["token_ids"] != c["token_ids"]
    # the same machinery as the SGLang mock: same prompt ids + seed -> same tokens and logprobs
    sg = ServerThread(create_mock_worker_app(MockWorkerConfig(hf_checkpoint=BUILTIN_CHECKPOINT))).start()
    servers_to_stop.append(sg)
    r = httpx.post(f"{sg.url}/generate", json={"input_ids": PROMPT, "return_logprob": True, "sampling_params": {
        "max_new_tokens": 12, "sampling_seed": 5, "ignore_eos": True}}).json()
    assert r["output_ids"] == a["token_ids"]
    assert [lp for lp, _, _ in r["meta_info"]["output_token_logprobs"]] == [e["logprob"] for e in
                                                                             a["logprobs"]["content"]]


@pytest.mark.parametrize("logprobs", [None, 2])
def test_generate_stream_deltas_concatenate_to_the_full_reply(w, logprobs):
    sp: dict[str, Any] = {"max_tokens": 20, "seed": 9, "ignore_eos": True}
    if logprobs is not None:
        sp["logprobs"] = logprobs
    full = generate(w, **sp)["choices"][0]
    chunks = sse(w, GEN, {"request_id": "s-1", "token_ids": PROMPT, "sampling_params": sp})
    assert len(chunks) == 20  # one engine step per chunk
    ids: list[int] = []
    content: list[dict] = []
    for i, ch in enumerate(chunks):
        assert ch["request_id"] == "s-1" and "usage" not in ch
        (c,) = ch["choices"]
        assert c["index"] == 0 and c["token_ids"]
        assert c["finish_reason"] == ("length" if i == len(chunks) - 1 else None)
        ids += c["token_ids"]
        if logprobs is None:
            assert c["logprobs"] is None
        else:
            assert len(c["logprobs"]["content"]) == len(c["token_ids"])
            content += c["logprobs"]["content"]
    assert ids == full["token_ids"]
    if logprobs is not None:
        assert content == full["logprobs"]["content"]


def test_generate_stream_usage_chunk(w):
    body = {"token_ids": PROMPT, "sampling_params": {"max_tokens": 5, "ignore_eos": True},
            "stream_options": {"include_usage": True}}
    chunks = sse(w, GEN, body)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {
        "prompt_tokens": len(PROMPT), "total_tokens": len(PROMPT) + 5, "completion_tokens": 5}
    assert sum(len(c["choices"][0]["token_ids"]) for c in chunks[:-1]) == 5
    body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    chunks = sse(w, GEN, body)
    assert [c["usage"]["completion_tokens"] for c in chunks[:-1]] == [1, 2, 3, 4, 5]


def test_generate_bad_requests(w):
    err = bad_request(w.post(GEN, json={"sampling_params": {}}), "body.token_ids", "Bad Request")
    assert err["message"].startswith("1 validation error:") and "Field required" in err["message"]
    bad_request(w.post(GEN, json={"token_ids": [1, 2]}), "body.sampling_params", "Bad Request")
    bad_request(w.post(GEN, json={"token_ids": [], "sampling_params": {}}), "body.token_ids", "Bad Request")
    bad_request(w.post(GEN, json={"token_ids": [1, -2], "sampling_params": {}}), "body.token_ids.1", "Bad Request")
    bad_request(w.post(GEN, json={"token_ids": [1, "x"], "sampling_params": {}}), "body.token_ids.1", "Bad Request")
    bad_request(w.post(GEN, json={"token_ids": "12", "sampling_params": {}}), "body.token_ids", "Bad Request")
    bad_request(w.post(GEN, content=b"{not json", headers={"content-type": "application/json"}), "body",
                "Bad Request")
    # sampling errors: n > 1 is rejected on this endpoint, and out-of-range values
    err = bad_request(w.post(GEN, json={"token_ids": [1], "sampling_params": {"n": 2}}), "sampling_params.n")
    assert "n" in err["message"]
    bad_request(w.post(GEN, json={"token_ids": [1], "sampling_params": {"max_tokens": 0}}),
                "sampling_params.max_tokens")
    bad_request(w.post(GEN, json={"token_ids": [1], "sampling_params": {"temperature": -1}}),
                "sampling_params.temperature")
    bad_request(w.post(GEN, json={"token_ids": [1], "sampling_params": {"logprobs": -3}}),
                "sampling_params.logprobs")
    bad_request(w.post(GEN, json={"token_ids": [10**7], "sampling_params": {}}))
    # unknown sampling keys are dropped silently (SGLang's max_new_tokens is not a vLLM field)
    out = generate(w, max_new_tokens=3, ignore_eos=True, not_a_field=1)
    assert len(out["choices"][0]["token_ids"]) == 16
    r = w.post(GEN, json={"token_ids": [1], "sampling_params": {}, "model": "other"})
    assert r.status_code == 404 and r.json()["error"]["type"] == "NotFoundError"
    assert generate(w, max_tokens=2)["model"] == "mock-qwen3"
    assert w.get("/mock/stats").json()["sequences_generated"] == 2  # rejected requests generate nothing


# ------------------------------------------------------------------ stops


def test_eos_stays_in_token_ids(make_worker):
    w = make_worker(mode="reply_text", reply_text="Hello there.")
    ch = generate(w, max_tokens=50)["choices"][0]
    assert ch["token_ids"][-1] == EOS_TOKEN_ID and ch["finish_reason"] == "stop"
    c = completion(w, max_tokens=50, return_token_ids=True)["choices"][0]
    assert c["token_ids"] == ch["token_ids"] and c["text"] == "Hello there."
    assert c["finish_reason"] == "stop" and c["stop_reason"] is None  # None for EOS
    # ignore_eos runs to max_tokens
    ch = generate(w, max_tokens=30, ignore_eos=True)["choices"][0]
    assert ch["finish_reason"] == "length" and len(ch["token_ids"]) == 30 and EOS_TOKEN_ID not in ch["token_ids"]


def test_stop_token_ids_stay_and_are_the_stop_reason(w):
    base = generate(w, max_tokens=16, seed=4, ignore_eos=True)["choices"][0]["token_ids"]
    stop_id = base[5]
    cut = base.index(stop_id) + 1
    ch = generate(w, max_tokens=16, seed=4, ignore_eos=True, stop_token_ids=[stop_id])["choices"][0]
    assert ch["token_ids"] == base[:cut] and ch["finish_reason"] == "stop"
    c = completion(w, max_tokens=16, seed=4, ignore_eos=True, stop_token_ids=[stop_id], return_token_ids=True)
    c = c["choices"][0]
    assert c["token_ids"] == base[:cut] and c["stop_reason"] == stop_id and c["finish_reason"] == "stop"
    assert c["text"] == w.state.decode(base[: cut - 1])  # the stop token's text is not in the text


def test_stop_string_truncates_text_not_ids(make_worker):
    w = make_worker(mode="reply_text", reply_text="Alpha beta gamma delta epsilon.")
    c = completion(w, max_tokens=50, stop=[" gamma"], return_token_ids=True)["choices"][0]
    assert c["text"] == "Alpha beta" and c["stop_reason"] == " gamma" and c["finish_reason"] == "stop"
    ids = c["token_ids"]
    assert w.state.decode(ids).startswith("Alpha beta gamma")  # the ids run through the stop string
    g = generate(w, max_tokens=50, stop=[" gamma"])["choices"][0]
    assert g["token_ids"] == ids and g["finish_reason"] == "stop"
    inc = completion(w, max_tokens=50, stop=[" gamma"], include_stop_str_in_output=True)["choices"][0]
    assert inc["text"] == "Alpha beta gamma"
    # streamed: the text deltas hold back a partial stop string and concatenate to the truncated text
    chunks = sse(w, "/v1/completions", {"prompt": PROMPT, "max_tokens": 50, "stop": [" gamma"],
                                        "return_token_ids": True})
    assert "".join(ch["choices"][0]["text"] for ch in chunks) == "Alpha beta"
    assert [t for ch in chunks for t in ch["choices"][0]["token_ids"]] == ids
    assert chunks[-1]["choices"][0]["stop_reason"] == " gamma"


# ------------------------------------------------------------------ /v1/completions


def test_completions_reply_shape_and_token_ids(w):
    out = completion(w, max_tokens=5, ignore_eos=True, seed=2, request_id="abc")
    assert list(out) == ["id", "object", "created", "model", "choices", "service_tier", "system_fingerprint",
                         "usage", "kv_transfer_params"]
    assert out["id"] == "cmpl-abc" and out["object"] == "text_completion"
    (ch,) = out["choices"]
    assert list(ch) == ["index", "text", "logprobs", "finish_reason", "stop_reason", "token_ids", "prompt_logprobs",
                        "prompt_token_ids"]
    assert ch["token_ids"] is None and ch["prompt_token_ids"] is None and ch["logprobs"] is None
    assert ch["finish_reason"] == "length" and ch["stop_reason"] is None and ch["text"]
    with_ids = completion(w, max_tokens=5, ignore_eos=True, seed=2, return_token_ids=True)["choices"][0]
    assert with_ids["prompt_token_ids"] == PROMPT and len(with_ids["token_ids"]) == 5
    assert with_ids["text"] == ch["text"] == w.state.decode(with_ids["token_ids"])
    # the same tokens as /inference/v1/generate for the same seed
    assert generate(w, max_tokens=5, ignore_eos=True, seed=2)["choices"][0]["token_ids"] == with_ids["token_ids"]
    # max_tokens defaults to 16; a text prompt is tokenized
    d = completion(w, prompt="Hello world", ignore_eos=True, return_token_ids=True)["choices"][0]
    assert d["prompt_token_ids"] == w.state.encode("Hello world") and len(d["token_ids"]) == 16


def test_completions_logprobs(w):
    ch = completion(w, max_tokens=6, ignore_eos=True, seed=3, logprobs=2, return_token_ids=True)["choices"][0]
    lp = ch["logprobs"]
    assert list(lp) == ["text_offset", "token_logprobs", "tokens", "top_logprobs"]
    ids = ch["token_ids"]
    assert lp["tokens"] == [w.state.token_text(t) for t in ids]
    assert "".join(lp["tokens"]) == ch["text"]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(ids))]
    for tok, v, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert top[tok] == v and 1 <= len(top) <= 3  # the sampled token + up to k others
    as_ids = completion(w, max_tokens=6, ignore_eos=True, seed=3, logprobs=0,
                        return_tokens_as_token_ids=True)["choices"][0]["logprobs"]
    assert as_ids["tokens"] == [f"token_id:{t}" for t in ids]  # how servers without return_token_ids are read
    assert as_ids["token_logprobs"] == lp["token_logprobs"]
    assert as_ids["top_logprobs"] == [{f"token_id:{t}": v} for t, v in zip(ids, lp["token_logprobs"])]
    # generate's logprobs are the same numbers
    g = generate(w, max_tokens=6, ignore_eos=True, seed=3, logprobs=0)["choices"][0]["logprobs"]["content"]
    assert [e["logprob"] for e in g] == lp["token_logprobs"]


def test_completions_n_and_batch(w):
    out = completion(w, max_tokens=6, ignore_eos=True, n=3, return_token_ids=True)
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    assert len({tuple(c["token_ids"]) for c in out["choices"]}) == 3
    assert out["usage"]["completion_tokens"] == 18 and out["usage"]["prompt_tokens"] == len(PROMPT)
    out = completion(w, prompt=[[1, 2, 3], [4, 5]], max_tokens=2, ignore_eos=True, return_token_ids=True)
    assert [c["prompt_token_ids"] for c in out["choices"]] == [[1, 2, 3], [4, 5]]
    assert out["usage"]["prompt_tokens"] == 5


def test_completions_stream(w):
    body = {"prompt": PROMPT, "max_tokens": 12, "ignore_eos": True, "seed": 8, "return_token_ids": True,
            "logprobs": 0, "return_tokens_as_token_ids": True, "stream_options": {"include_usage": True}}
    full = completion(w, **{k: v for k, v in body.items() if k != "stream_options"})["choices"][0]
    chunks = sse(w, "/v1/completions", body)
    usage = chunks.pop()
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 12
    choices = [c["choices"][0] for c in chunks]
    assert choices[0]["prompt_token_ids"] == PROMPT
    assert all(c["prompt_token_ids"] is None for c in choices[1:])  # prompt ids on the first chunk only
    assert [t for c in choices for t in c["token_ids"]] == full["token_ids"]
    assert "".join(c["text"] for c in choices) == full["text"]
    assert [t for c in choices for t in c["logprobs"]["tokens"]] == full["logprobs"]["tokens"]
    assert [c["finish_reason"] for c in choices] == [None] * (len(choices) - 1) + ["length"]
    # n > 1 streams interleaved choices, each one's deltas concatenating to its own ids
    chunks = sse(w, "/v1/completions", {"prompt": PROMPT, "max_tokens": 5, "ignore_eos": True, "n": 2,
                                        "return_token_ids": True})
    per: dict[int, list[int]] = {0: [], 1: []}
    for ch in chunks:
        per[ch["choices"][0]["index"]] += ch["choices"][0]["token_ids"]
    recs = {r["index"]: r["output_ids"] for r in records(w)[-2:]}
    assert per == recs and all(len(v) == 5 for v in per.values())


def test_completions_bad_requests(w):
    bad_request(w.post("/v1/completions", json={"max_tokens": 3}), "body", "Bad Request")
    bad_request(w.post("/v1/completions", json={"prompt": [1, -1]}), "body.prompt.1", "Bad Request")
    bad_request(w.post("/v1/completions", json={"prompt": [1], "suffix": "x"}))
    bad_request(w.post("/v1/completions", json={"prompt": [1], "stream_options": {"include_usage": True}}),
                "stream_options")
    bad_request(w.post("/v1/completions", json={"prompt": [1], "max_tokens": 0}), "max_tokens")


# ------------------------------------------------------------------ records of truth


def test_records_equal_what_the_replies_carried(w):
    w.delete("/mock/records")
    g = w.post(GEN, json={"request_id": "g1", "token_ids": PROMPT,
                          "sampling_params": {"max_tokens": 8, "logprobs": 0, "ignore_eos": True}}).json()
    s = sse(w, GEN, {"request_id": "g2", "token_ids": PROMPT[:4], "sampling_params": {"max_tokens": 6,
                                                                                      "logprobs": 0}})
    c = completion(w, request_id="c1", max_tokens=5, logprobs=0, return_token_ids=True, ignore_eos=True)
    recs = {r["rid"]: r for r in records(w)}
    assert set(recs) == {"g1", "g2", "cmpl-c1-0"}
    r = recs["g1"]
    assert set(r) >= {"rid", "index", "input_ids", "output_ids", "output_logprobs", "weight_version",
                      "weight_versions", "finish_reason", "stream", "aborted", "text", "path", "cached_tokens",
                      "prompt_tokens"}
    assert r["input_ids"] == PROMPT and r["output_ids"] == g["choices"][0]["token_ids"]
    assert r["output_logprobs"] == [e["logprob"] for e in g["choices"][0]["logprobs"]["content"]]
    assert r["path"] == GEN and r["stream"] is False and r["aborted"] is False
    assert r["weight_versions"] == [{"version": "default", "start": 0, "end": 8}]
    assert r["finish_reason"] == {"type": "length", "length": 8}
    r = recs["g2"]
    assert r["input_ids"] == PROMPT[:4] and r["stream"] is True
    assert r["output_ids"] == [t for ch in s for t in ch["choices"][0]["token_ids"]]
    assert r["output_logprobs"] == [e["logprob"] for ch in s for e in ch["choices"][0]["logprobs"]["content"]]
    r = recs["cmpl-c1-0"]
    ch = c["choices"][0]
    assert r["path"] == "/v1/completions" and r["output_ids"] == ch["token_ids"] and r["text"] == ch["text"]
    assert r["output_logprobs"] == ch["logprobs"]["token_logprobs"]
    assert w.delete("/mock/records").json() == {"success": True} and records(w) == []


# ------------------------------------------------------------------ older vLLM: no /inference/v1/generate


def test_older_server_without_generate_endpoint(make_worker):
    old = make_worker(generate_endpoint=False)
    new = make_worker()
    paths = old.get("/openapi.json").json()["paths"]
    assert GEN not in paths and "/v1/completions" in paths and "post" in paths["/v1/completions"]
    assert GEN in new.get("/openapi.json").json()["paths"]
    r = old.post(GEN, json={"token_ids": [1], "sampling_params": {}})
    assert r.status_code == 404 and r.json() == {"detail": "Not Found"}
    assert old.get("/no/such/path").json() == {"detail": "Not Found"}
    # the fallback still carries token ids (return_token_ids, or logprobs as token ids)
    ch = completion(old, max_tokens=4, ignore_eos=True, seed=1, return_token_ids=True)["choices"][0]
    assert ch["token_ids"] == generate(new, max_tokens=4, ignore_eos=True, seed=1)["choices"][0]["token_ids"]
    lp = completion(old, max_tokens=4, ignore_eos=True, seed=1, logprobs=0, return_tokens_as_token_ids=True)
    assert [int(t.split(":")[1]) for t in lp["choices"][0]["logprobs"]["tokens"]] == ch["token_ids"]


# ------------------------------------------------------------------ operations


def test_abort_requests(make_worker):
    w = make_worker(token_latency=0.01)
    ctl = httpx.Client(base_url=str(w.base_url), timeout=5)
    chunks = []
    body = {"request_id": "job-1", "token_ids": PROMPT, "stream": True,
            "sampling_params": {"max_tokens": 500, "ignore_eos": True}}
    with w.stream("POST", GEN, json=body) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunks.append(json.loads(line[6:]))
            if len(chunks) == 3:
                assert ctl.post("/abort_requests", json={"request_ids": ["other"]}).json() == {
                    "status": "aborted", "aborted": 0}
                assert ctl.post("/abort_requests", json={"request_ids": ["job-1"]}).json() == {
                    "status": "aborted", "aborted": 1}
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks)  # an abort ends the stream silently
    rec = records(w)[-1]
    assert rec["rid"] == "job-1" and rec["aborted"] is True and rec["finish_reason"]["type"] == "abort"
    assert rec["output_ids"] == [t for c in chunks for t in c["choices"][0]["token_ids"]] and len(chunks) < 100
    # none / empty: abort all; a non-streaming reply says finish_reason "abort"
    with ThreadPoolExecutor(3) as ex:
        futs = [ex.submit(w.post, GEN, json={"token_ids": [i + 1], "sampling_params": {"max_tokens": 500,
                                                                                       "ignore_eos": True}})
                for i in range(2)]
        futs.append(ex.submit(w.post, "/v1/completions", json={"prompt": [7], "max_tokens": 500, "ignore_eos": True,
                                                                "request_id": "cmp"}))
        wait_for(lambda: len(w.state.running) == 3)
        assert ctl.post("/abort_requests", json={"request_ids": ["cmpl-cmp-0"]}).json()["aborted"] == 1
        wait_for(lambda: len(w.state.running) == 2)
        assert ctl.post("/abort_requests", json={}).json() == {"status": "aborted", "aborted": 2}
        outs = [f.result().json() for f in futs]
    assert [o["choices"][0]["finish_reason"] for o in outs] == ["abort"] * 3
    assert all(0 < len(o["choices"][0]["token_ids"] or []) < 500 for o in outs[:2])
    assert outs[2]["choices"][0]["stop_reason"] is None
    ctl.close()
    assert w.get("/mock/stats").json()["aborted"] == 4


def test_client_disconnect_aborts(make_worker):
    w = make_worker(token_latency=0.02)
    with w.stream("POST", GEN, json={"token_ids": PROMPT, "stream": True,
                                     "sampling_params": {"max_tokens": 500, "ignore_eos": True}}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 4:
                break
    wait_for(lambda: len(records(w)) == 1)
    rec = records(w)[0]
    assert rec["aborted"] is True and rec["finish_reason"]["message"] == "Client disconnected"
    # a non-streaming request is aborted too when its client goes away
    sock = socket.create_connection(("127.0.0.1", w.base_url.port))
    body = json.dumps({"token_ids": PROMPT, "sampling_params": {"max_tokens": 500, "ignore_eos": True}}).encode()
    sock.sendall(b"POST " + GEN.encode() + b" HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                 b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    wait_for(lambda: len(w.state.running) == 1)
    sock.close()
    wait_for(lambda: len(records(w)) == 2)
    rec = records(w)[1]
    assert rec["aborted"] is True and 0 < len(rec["output_ids"]) < 500
    wait_for(lambda: w.get("/mock/stats").json()["in_flight"] == 0)


def test_pause_keep_freezes_and_resume_continues(make_worker):
    w = make_worker(token_latency=0.01)
    assert w.get("/is_paused").json() == {"is_paused": False}
    with ThreadPoolExecutor(2) as ex:
        f1 = ex.submit(generate, w, PROMPT, max_tokens=40, ignore_eos=True)
        wait_for(lambda: len(w.state.running) == 1 and len(next(iter(w.state.running.values())).output_ids) > 2)
        assert w.post("/pause", params={"mode": "keep"}).json() == {"status": "paused"}
        assert w.get("/is_paused").json() == {"is_paused": True}
        frozen = len(next(iter(w.state.running.values())).output_ids)
        f2 = ex.submit(generate, w, [5, 6], max_tokens=3, ignore_eos=True)  # waits while paused
        time.sleep(0.2)
        assert not f1.done() and not f2.done()
        assert len(next(iter(w.state.running.values())).output_ids) <= frozen + 1
        assert w.post("/resume").json() == {"status": "resumed"}
        o1, o2 = f1.result(), f2.result()
    assert w.get("/is_paused").json() == {"is_paused": False}
    assert o1["choices"][0]["finish_reason"] == "length" and len(o1["choices"][0]["token_ids"]) == 40
    assert len(o2["choices"][0]["token_ids"]) == 3


def test_pause_abort_and_wait(make_worker):
    w = make_worker(token_latency=0.01)
    with ThreadPoolExecutor(2) as ex:
        f1 = ex.submit(generate, w, PROMPT, max_tokens=300, ignore_eos=True)
        wait_for(lambda: len(w.state.running) == 1)
        assert w.post("/pause").json() == {"status": "paused"}  # default mode: abort
        out = f1.result()
        assert out["choices"][0]["finish_reason"] == "abort" and records(w)[-1]["aborted"] is True
        f2 = ex.submit(generate, w, PROMPT, max_tokens=3)
        time.sleep(0.1)
        assert not f2.done()
        w.post("/resume")
        assert len(f2.result()["choices"][0]["token_ids"]) <= 3
    # wait: the reply comes once in-flight requests have finished
    with ThreadPoolExecutor(1) as ex:
        f = ex.submit(generate, w, PROMPT, max_tokens=20, ignore_eos=True)
        wait_for(lambda: len(w.state.running) == 1)
        assert w.post("/pause", params={"mode": "wait"}).json() == {"status": "paused"}
        assert not w.state.running and records(w)[-1]["finish_reason"]["type"] == "length"  # drained first
        assert f.result()["choices"][0]["finish_reason"] == "length"
    w.post("/resume")
    bad_request(w.post("/pause", params={"mode": "later"}), "query.mode", "Bad Request")


def test_weight_version(make_worker):
    w = make_worker(token_latency=0.01)
    assert w.get("/weight_info").json() == {"weight_version": "default"}
    assert w.post("/update_weight_version", json={"new_version": "v7"}).json() == {"success": True,
                                                                                  "new_version": "v7"}
    assert w.get("/weight_info").json() == {"weight_version": "v7"}
    generate(w, max_tokens=3, ignore_eos=True)
    assert records(w)[-1]["weight_versions"] == [{"version": "v7", "start": 0, "end": 3}]
    bad_request(w.post("/update_weight_version", json={}), "body.new_version", "Bad Request")
    bad_request(w.post("/update_weight_version", json={"new_version": 8}), "body.new_version", "Bad Request")
    # an update during a generation does not abort it: the record splits the tokens by version
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(generate(w, max_tokens=40, ignore_eos=True)))
    t.start()
    wait_for(lambda: w.state.running and len(next(iter(w.state.running.values())).output_ids) >= 5)
    w.post("/update_weight_version", json={"new_version": "v8"})
    t.join()
    assert result["choices"][0]["finish_reason"] == "length" and "weight_version" not in json.dumps(result)
    spans = records(w)[-1]["weight_versions"]
    assert [s["version"] for s in spans] == ["v7", "v8"] and spans[0]["start"] == 0 and spans[-1]["end"] == 40
    assert spans[0]["end"] == spans[1]["start"]
    # version_every bumps the version the way the SGLang mock does
    w.post("/mock/configure", json={"version_every": 1, "token_latency": 0})
    generate(w, max_tokens=2)
    generate(w, max_tokens=2)
    assert [r["weight_version"] for r in records(w)[-2:]] == ["v8", "v9"]


def test_health_cache_openapi_and_mock_endpoints(make_worker):
    w = make_worker()
    r = w.get("/health")
    assert r.status_code == 200 and r.content == b""
    generate(w, max_tokens=2)
    assert w.get("/mock/stats").json()["prefix_cache_tokens"] > 0
    r = w.post("/reset_prefix_cache")
    assert r.status_code == 200 and r.content == b""
    assert w.get("/mock/stats").json()["prefix_cache_tokens"] == 0
    spec = w.get("/openapi.json").json()
    assert spec["openapi"].startswith("3.")
    for path, method in [(GEN, "post"), ("/v1/completions", "post"), ("/abort_requests", "post"), ("/pause", "post"),
                         ("/resume", "post"), ("/is_paused", "get"), ("/update_weight_version", "post"),
                         ("/weight_info", "get"), ("/reset_prefix_cache", "post"), ("/health", "get")]:
        assert method in spec["paths"][path], path
    assert w.post("/mock/configure", json={"health_status": 503}).json()["health_status"] == 503
    assert w.get("/health").status_code == 503
    assert w.post("/mock/configure", json={"nope": 1}).status_code == 400
    stats = w.get("/mock/stats").json()
    assert stats["requests_by_path"][GEN] == 1 and stats["weight_version"] == "default"
    assert w.delete("/mock/stats").json() == {"success": True}


def test_injected_failures_and_latency(make_worker):
    w = make_worker(fail_first_n=1, fail_status=503)
    r = w.post(GEN, json={"token_ids": [1], "sampling_params": {}})
    assert r.status_code == 503
    err = r.json()["error"]
    assert err["code"] == 503 and "injected failure" in err["message"] and err["param"] is None
    assert w.post("/v1/completions", json={"prompt": [1], "max_tokens": 2}).status_code == 200
    assert w.get("/mock/stats").json()["failures_injected"] == 1
    w.post("/mock/configure", json={"latency": 0.2})
    t = time.monotonic()
    generate(w, max_tokens=1)
    assert time.monotonic() - t >= 0.2


def test_realistic_and_tool_call_modes_carry_over(make_worker):
    w = make_worker(mode="tool_call", tool_name="get_weather", tool_arguments={"city": "Paris"})
    c = completion(w, max_tokens=100, return_token_ids=True, skip_special_tokens=False)["choices"][0]
    assert "<tool_call>" in c["text"] and '"get_weather"' in c["text"] and c["token_ids"][-1] == EOS_TOKEN_ID
    w = make_worker(mode="think", realistic=True, realistic_seed=3)
    ch = generate(w, max_tokens=200)["choices"][0]
    assert w.state.decode(ch["token_ids"]).startswith("<think>")
    assert records(w)[-1]["output_ids"] == ch["token_ids"] and "shared_prefix_tokens" in records(w)[-1]
