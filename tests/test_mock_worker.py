"""The mock SGLang worker, exercised over real HTTP (uvicorn on a loopback port)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import uvicorn

from slime_router_core.tokenizers import BUILTIN_CHECKPOINT, load_tokenizer
from slime_router_testing.mock_worker import EOS_TOKEN_ID, MockWorkerConfig, create_mock_worker_app

REPO = Path(__file__).resolve().parents[1]


class _Server:
    def __init__(self, config: MockWorkerConfig):
        self.app = create_mock_worker_app(config)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off")
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self) -> _Server:
        self.thread.start()
        deadline = time.time() + 10
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("mock worker did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)
        self.sock.close()


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(BUILTIN_CHECKPOINT)


@pytest.fixture
def make_worker(servers_to_stop):
    clients: list[httpx.Client] = []

    def make(**kw):
        s = _Server(MockWorkerConfig(**kw)).start()
        servers_to_stop.append(s)  # stopped after the test, after the clients below are closed
        c = httpx.Client(base_url=s.url, timeout=10)
        clients.append(c)
        c.state = s.app.state.mock  # type: ignore[attr-defined]
        return c

    yield make
    for c in clients:
        c.close()


@pytest.fixture
def w(make_worker):
    return make_worker()


def gen(c, **body):
    r = c.post("/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def sse(c, body):
    """Return the list of parsed chunks of a streaming /generate (asserting the SSE framing)."""
    chunks, done = [], False
    with c.stream("POST", "/generate", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    assert "event:" not in raw
    for block in raw.split("\n\n"):
        if not block:
            continue
        assert block.startswith("data: ")
        payload = block[len("data: "):]
        if payload == "[DONE]":
            done = True
            continue
        assert not done
        chunks.append(json.loads(payload))
    assert done and raw.endswith("data: [DONE]\n\n")
    return chunks


# ------------------------------------------------------------------ basics


def test_text_prompt_basic(w, tok):
    out = gen(w, text="Hello world", sampling_params={"max_new_tokens": 128})
    assert set(out) == {"text", "output_ids", "meta_info"}
    m = out["meta_info"]
    assert len(m["id"]) == 32
    assert m["prompt_tokens"] == 2 and m["cached_tokens"] == 0 and m["weight_version"] == "default"
    assert m["completion_tokens"] == len(out["output_ids"]) and m["e2e_latency"] >= 0
    assert m["finish_reason"] == {"type": "stop", "matched": EOS_TOKEN_ID}
    assert out["output_ids"][-1] == EOS_TOKEN_ID
    assert out["text"] == tok.decode(out["output_ids"], skip_special_tokens=True)
    assert "<|im_end|>" not in out["text"] and out["text"].strip()
    # real words that re-tokenize to the same ids
    assert tok.encode(out["text"], add_special_tokens=False) == out["output_ids"][:-1]
    rec = w.get("/mock/records").json()
    assert len(rec) == 1
    assert rec[0]["input_ids"] == [9707, 1879] and rec[0]["output_ids"] == out["output_ids"]
    assert rec[0]["path"] == "/generate" and rec[0]["stream"] is False and rec[0]["aborted"] is False
    assert rec[0]["rid"] == m["id"] and len(rec[0]["output_logprobs"]) == len(out["output_ids"])


def test_special_tokens_in_text_and_ids_prompt(w):
    gen(w, text="<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n", rid="r1")
    gen(w, input_ids=[151644, 872, 198, 9707], rid="r2")
    recs = {r["rid"]: r for r in w.get("/mock/records").json()}
    assert recs["r1"]["input_ids"] == [151644, 872, 198, 9707, 151645, 198, 151644, 77091, 198]
    assert recs["r2"]["input_ids"] == [151644, 872, 198, 9707]


def test_missing_prompt_and_bad_params(make_worker):
    w = make_worker()
    r = w.post("/generate", json={"sampling_params": {}})
    assert r.status_code == 400
    assert r.json() == {"error": {"message": "Either text, input_ids or input_embeds should be provided."}}
    r = w.post("/generate", json={"text": "hi", "sampling_params": {"max_new_token": 3}})
    assert r.status_code == 400 and "max_new_token" in r.json()["error"]["message"]
    assert w.post("/generate", json={"text": "hi", "whatever_top_level": 1}).status_code == 200
    lax = make_worker(strict_sampling_params=False)
    assert lax.post("/generate", json={"text": "hi", "sampling_params": {"max_new_token": 3}}).status_code == 200


def test_batch_and_n(w):
    outs = gen(w, text=["Hello", "Hello world"], rid="b", sampling_params={"max_new_tokens": 4})
    assert [o["meta_info"]["id"] for o in outs] == ["b_0", "b_1"]
    assert [o["meta_info"]["prompt_tokens"] for o in outs] == [1, 2]
    outs = gen(w, input_ids=[[1, 2], [3, 4, 5]], sampling_params=[{"max_new_tokens": 2}, {"max_new_tokens": 3}])
    assert [o["meta_info"]["completion_tokens"] for o in outs] == [2, 3]
    outs = gen(w, text="Hello", rid="n", sampling_params={"max_new_tokens": 6, "n": 3})
    assert isinstance(outs, list) and [o["meta_info"]["id"] for o in outs] == ["n_0", "n_1", "n_2"]
    assert len({tuple(o["output_ids"]) for o in outs}) > 1  # samples differ
    single = gen(w, text="Hello", sampling_params={"max_new_tokens": 6})
    assert single["output_ids"] == outs[0]["output_ids"]
    assert len(w.get("/mock/records").json()) == 2 + 2 + 3 + 1


def test_length_eos_ignore_eos(w):
    out = gen(w, text="Hello", sampling_params={"max_new_tokens": 3})
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 3} and len(out["output_ids"]) == 3
    reasons = set()
    for i in range(30):
        o = gen(w, input_ids=[100 + i], sampling_params={"max_new_tokens": 20})
        reasons.add(o["meta_info"]["finish_reason"]["type"])
        if o["meta_info"]["finish_reason"]["type"] == "stop":
            assert o["output_ids"][-1] == EOS_TOKEN_ID
    assert reasons == {"stop", "length"}
    out = gen(w, text="Hello", sampling_params={"max_new_tokens": 150, "ignore_eos": True})
    assert out["meta_info"]["finish_reason"]["type"] == "length" and len(out["output_ids"]) == 150
    assert EOS_TOKEN_ID not in out["output_ids"]


def test_stop_strings_and_stop_token_ids(w, tok):
    full = gen(w, text="Tell me a story", sampling_params={"max_new_tokens": 100, "ignore_eos": True})
    words = full["text"].split()
    stop = " " + words[5]
    # expected: the first prefix of output ids whose decoded text contains the stop string
    k = next(i for i in range(1, 101) if stop in tok.decode(full["output_ids"][:i]))
    cut_text = tok.decode(full["output_ids"][:k])
    out = gen(w, text="Tell me a story",
              sampling_params={"max_new_tokens": 100, "ignore_eos": True, "stop": [stop, "zzz"]})
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert out["output_ids"] == full["output_ids"][:k]  # ids keep the stop string's tokens
    assert out["text"] == cut_text[: cut_text.find(stop)]  # text is trimmed
    assert out["meta_info"]["completion_tokens"] == k
    keep = gen(w, text="Tell me a story", sampling_params={"max_new_tokens": 100, "ignore_eos": True, "stop": stop,
                                                          "no_stop_trim": True})
    assert keep["text"] == cut_text and keep["text"].endswith(stop)
    # stop token id
    stop_id = full["output_ids"][3]
    j = full["output_ids"].index(stop_id)
    out = gen(w, text="Tell me a story", sampling_params={"max_new_tokens": 100, "ignore_eos": True,
                                                          "stop_token_ids": [stop_id]})
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_id}
    assert out["output_ids"] == full["output_ids"][: j + 1]
    assert out["text"] == tok.decode(full["output_ids"][:j])


def test_logprobs(w, tok):
    out = gen(w, text="Hello world", return_logprob=True, sampling_params={"max_new_tokens": 8})
    lps = out["meta_info"]["output_token_logprobs"]
    assert [t[1] for t in lps] == out["output_ids"]
    assert all(t[0] < 0 and t[2] is None for t in lps)
    assert "input_token_logprobs" not in out["meta_info"]
    out2 = gen(w, text="Hello world", return_logprob=True, logprob_start_len=0, top_logprobs_num=3,
               return_text_in_logprobs=True, sampling_params={"max_new_tokens": 8})
    m = out2["meta_info"]
    assert [t[:2] for t in m["output_token_logprobs"]] == [t[:2] for t in lps]  # deterministic
    assert [t[2] for t in m["output_token_logprobs"]] == [tok.decode([i]) for i in out2["output_ids"]]
    inp = m["input_token_logprobs"]
    assert [t[1] for t in inp] == [9707, 1879] and inp[0][0] is None and inp[1][0] < 0
    assert len(m["output_top_logprobs"]) == len(out2["output_ids"])
    for top, (lp, tid, _) in zip(m["output_top_logprobs"], m["output_token_logprobs"]):
        assert len(top) == 3 and [lp, tid] in [t[:2] for t in top]
        assert [t[0] for t in top] == sorted((t[0] for t in top), reverse=True)
    rec = w.get("/mock/records").json()[-1]
    assert rec["output_logprobs"] == [t[0] for t in m["output_token_logprobs"]]


def test_determinism(make_worker):
    a, b, other = make_worker(), make_worker(), make_worker(seed=7)
    body = {"input_ids": [1, 2, 3, 4], "return_logprob": True, "sampling_params": {"max_new_tokens": 40}}
    oa, ob, oc = gen(a, **body), gen(b, **body), gen(other, **body)
    assert oa["output_ids"] == ob["output_ids"] == gen(a, **body)["output_ids"]
    assert oa["meta_info"]["output_token_logprobs"] == ob["meta_info"]["output_token_logprobs"]
    assert oa["output_ids"] != oc["output_ids"]
    seeded = gen(a, **{**body, "sampling_params": {"max_new_tokens": 40, "sampling_seed": 5}})
    assert seeded["output_ids"] != oa["output_ids"]


def test_scripted_modes(make_worker, tok):
    w = make_worker(mode="tool_call")
    out = gen(w, text="weather?")
    expected = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert out["text"] == expected
    assert out["output_ids"] == tok.encode(expected, add_special_tokens=False) + [EOS_TOKEN_ID]
    assert out["output_ids"][0] == 151657
    w.post("/mock/configure", json={"tool_name": "search", "tool_arguments": {"q": "x"}})
    assert gen(w, text="q")["text"] == '<tool_call>\n{"name": "search", "arguments": {"q": "x"}}\n</tool_call>'
    w.post("/mock/configure", json={"mode": "reply_text", "reply_text": "你好，世界！"})
    out = gen(w, text="q")
    assert out["text"] == "你好，世界！" and out["output_ids"][-1] == EOS_TOKEN_ID
    w.post("/mock/configure", json={"mode": "think", "think_text": "Let me think.", "reply_text": "42"})
    out = gen(w, text="q")
    assert out["text"] == "<think>\nLet me think.\n</think>\n\n42"
    assert out["output_ids"][0] == 151667 and 151668 in out["output_ids"]
    w.post("/mock/configure", json={"think_text": None, "reply_text": None})
    out = gen(w, text="q")
    assert out["text"].startswith("<think>\n") and "\n</think>\n\n" in out["text"]
    assert w.post("/mock/configure", json={"mode": "nope"}).status_code == 400
    assert w.post("/mock/configure", json={"bogus": 1}).status_code == 400


# ------------------------------------------------------------------ streaming


STREAM_BODY = {
    "input_ids": [9707, 1879, 0, 1],
    "return_logprob": True,
    "sampling_params": {"max_new_tokens": 40, "ignore_eos": True},
}


def _check_stream_meta(chunks, final):
    for ch in chunks[:-1]:
        assert ch["meta_info"]["finish_reason"] is None and "e2e_latency" not in ch["meta_info"]
    last = chunks[-1]["meta_info"]
    assert last["finish_reason"] == final["meta_info"]["finish_reason"] and "e2e_latency" in last
    assert [c["meta_info"]["completion_tokens"] for c in chunks] == list(range(1, len(chunks) + 1))


@pytest.mark.parametrize("stop", [None, "STOPWORD"])
def test_stream_modes_match_non_streaming(make_worker, stop):
    w = make_worker()
    body = json.loads(json.dumps(STREAM_BODY))
    full = gen(w, **body)
    if stop:
        stop_word = " " + full["text"].split()[10]
        body["sampling_params"]["stop"] = stop_word
    final = gen(w, **body)
    n = len(final["output_ids"])

    w.post("/mock/configure", json={"stream_mode": "cumulative"})
    chunks = sse(w, body)
    assert len(chunks) == n
    _check_stream_meta(chunks, final)
    assert chunks[-1]["text"] == final["text"] and chunks[-1]["output_ids"] == final["output_ids"]
    assert chunks[-1]["meta_info"]["output_token_logprobs"] == final["meta_info"]["output_token_logprobs"]
    for a, b in zip(chunks, chunks[1:]):
        assert b["text"].startswith(a["text"]) and b["output_ids"][: len(a["output_ids"])] == a["output_ids"]

    w.post("/mock/configure", json={"stream_mode": "incremental"})
    chunks = sse(w, body)
    _check_stream_meta(chunks, final)
    assert "".join(c["text"] for c in chunks) == final["text"]
    assert sum((c["output_ids"] for c in chunks), []) == final["output_ids"]
    assert sum((c["meta_info"]["output_token_logprobs"] for c in chunks), []) == \
        final["meta_info"]["output_token_logprobs"]
    assert all(len(c["output_ids"]) == 1 for c in chunks)

    w.post("/mock/configure", json={"stream_mode": "legacy"})
    chunks = sse(w, body)
    _check_stream_meta(chunks, final)
    assert chunks[-1]["text"] == final["text"]
    assert sum((c["output_ids"] for c in chunks), []) == final["output_ids"]

    recs = w.get("/mock/records").json()
    assert [r["stream"] for r in recs] == [False, False, True, True, True]
    assert all(r["output_ids"] == final["output_ids"] for r in recs[1:])


def test_stream_interval_and_batch_stream(w):
    chunks = sse(w, {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 10, "ignore_eos": True,
                                                               "stream_interval": 4}})
    assert [c["meta_info"]["completion_tokens"] for c in chunks] == [4, 8, 10]
    chunks = sse(w, {"text": ["a", "b"], "rid": "s", "sampling_params": {"max_new_tokens": 5, "ignore_eos": True}})
    assert sorted({c["index"] for c in chunks}) == [0, 1]
    for i in (0, 1):
        mine = [c for c in chunks if c["index"] == i]
        assert len(mine) == 5 and all(c["meta_info"]["id"] == f"s_{i}" for c in mine)
        assert mine[-1]["meta_info"]["finish_reason"] == {"type": "length", "length": 5}


def test_stream_arrives_incrementally(make_worker):
    w = make_worker(token_latency=0.03)
    times = []
    with w.stream("POST", "/generate", json={"text": "x", "stream": True,
                                             "sampling_params": {"max_new_tokens": 6, "ignore_eos": True}}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                times.append(time.monotonic())
    assert len(times) == 7
    assert times[-2] - times[0] > 0.1  # chunks were not all delivered at once


# ------------------------------------------------------------------ weights, abort, cache


def test_weight_versions(w):
    assert w.get("/model_info").json()["weight_version"] == "default"
    r = w.post("/update_weights_from_disk", json={"model_path": "/ckpt/3", "weight_version": "3"})
    assert r.json() == {"success": True, "message": r.json()["message"], "num_paused_requests": 0}
    info = w.get("/get_model_info").json()
    assert info["weight_version"] == "3" and info["is_generation"] is True and info["model_path"]
    assert gen(w, text="hi", sampling_params={"max_new_tokens": 2})["meta_info"]["weight_version"] == "3"
    r = w.post("/update_weight_version", json={"new_version": "v4", "abort_all_requests": False})
    assert r.status_code == 200 and w.get("/model_info").json()["weight_version"] == "v4"


def test_weight_version_change_mid_generation(make_worker):
    w = make_worker(token_latency=0.01)
    with ThreadPoolExecutor(1) as ex:
        fut = ex.submit(gen, w, text="hi", sampling_params={"max_new_tokens": 30, "ignore_eos": True})
        time.sleep(0.12)
        w.post("/update_weight_version", json={"new_version": "v2", "abort_all_requests": False})
        out = fut.result()
    m = out["meta_info"]
    assert m["finish_reason"]["type"] == "length" and m["weight_version"] == "v2"
    spans = m["weight_versions"]
    assert [s["version"] for s in spans] == ["default", "v2"]
    assert spans[0]["start"] == 0 and spans[0]["end"] == spans[1]["start"] and spans[1]["end"] == 30


def test_abort_by_rid_prefix_on_slow_stream(make_worker):
    w = make_worker(token_latency=0.02)
    ctl = httpx.Client(base_url=str(w.base_url), timeout=5)
    chunks = []
    body = {"text": "x", "rid": "job-7-turn-1", "stream": True, "sampling_params": {"max_new_tokens": 500,
                                                                                     "ignore_eos": True}}
    with w.stream("POST", "/generate", json=body) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunks.append(json.loads(line[6:]))
            if len(chunks) == 3:
                assert w.get("/get_load").json()[0]["num_reqs"] == 1
                ctl.post("/abort_request", json={"rid": "other"})
                ctl.post("/abort_request", json={"rid": "job-7"})
    ctl.close()
    fr = chunks[-1]["meta_info"]["finish_reason"]
    assert fr["type"] == "abort" and fr["message"]
    assert len(chunks) < 20
    rec = w.get("/mock/records").json()[-1]
    assert rec["aborted"] is True and rec["rid"] == "job-7-turn-1" and rec["finish_reason"]["type"] == "abort"
    assert rec["output_ids"] == chunks[-1]["output_ids"]
    assert w.get("/get_load").json()[0]["num_reqs"] == 0


def test_abort_non_streaming_and_abort_all(make_worker):
    w = make_worker(token_latency=0.01)
    with ThreadPoolExecutor(2) as ex:
        f1 = ex.submit(gen, w, text="a", rid="a1", sampling_params={"max_new_tokens": 300, "ignore_eos": True})
        f2 = ex.submit(gen, w, text="b", rid="b1", sampling_params={"max_new_tokens": 300, "ignore_eos": True})
        time.sleep(0.1)
        w.post("/abort_request", json={"rid": "", "abort_all": True})
        o1, o2 = f1.result(), f2.result()
    assert o1["meta_info"]["finish_reason"]["type"] == "abort" == o2["meta_info"]["finish_reason"]["type"]
    assert 0 < len(o1["output_ids"]) < 300


def test_client_disconnect_aborts(make_worker):
    w = make_worker(token_latency=0.02)
    with w.stream("POST", "/generate", json={"text": "x", "stream": True,
                                             "sampling_params": {"max_new_tokens": 500, "ignore_eos": True}}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 4:
                break
    deadline = time.time() + 3
    while time.time() < deadline and not w.get("/mock/records").json():
        time.sleep(0.02)
    rec = w.get("/mock/records").json()
    assert len(rec) == 1 and rec[0]["aborted"] is True and len(rec[0]["output_ids"]) < 100
    assert w.get("/mock/stats").json()["in_flight"] == 0


def test_prefix_cache_and_flush(make_worker):
    w = make_worker(token_latency=0.005)
    first = gen(w, input_ids=[1, 2, 3, 4, 5], sampling_params={"max_new_tokens": 5, "ignore_eos": True})
    assert first["meta_info"]["cached_tokens"] == 0
    ids2 = [1, 2, 3, 4, 5] + first["output_ids"] + [7, 8]
    assert gen(w, input_ids=ids2, sampling_params={"max_new_tokens": 1})["meta_info"]["cached_tokens"] == 10
    assert gen(w, input_ids=[1, 2, 9], sampling_params={"max_new_tokens": 1})["meta_info"]["cached_tokens"] == 2
    # same prompt again: all but the last prompt token can be cached
    assert gen(w, input_ids=[1, 2, 3, 4, 5], sampling_params={"max_new_tokens": 1})["meta_info"]["cached_tokens"] == 4
    # extra_key partitions the cache
    assert gen(w, input_ids=[1, 2, 3, 4, 5], extra_key="k",
               sampling_params={"max_new_tokens": 1})["meta_info"]["cached_tokens"] == 0
    with ThreadPoolExecutor(1) as ex:
        fut = ex.submit(gen, w, text="x", sampling_params={"max_new_tokens": 60, "ignore_eos": True})
        time.sleep(0.1)
        assert w.post("/flush_cache").status_code == 400
        fut.result()
    assert w.post("/flush_cache").status_code == 200
    assert gen(w, input_ids=[1, 2, 3, 4, 5], sampling_params={"max_new_tokens": 1})["meta_info"]["cached_tokens"] == 0


def test_prefill_time_per_token(make_worker):
    w = make_worker(prefill_time_per_token=0.002)
    ids = list(range(1000, 1100))
    t = time.monotonic()
    gen(w, input_ids=ids, sampling_params={"max_new_tokens": 1})
    cold = time.monotonic() - t
    t = time.monotonic()
    gen(w, input_ids=ids, sampling_params={"max_new_tokens": 1})
    warm = time.monotonic() - t
    assert cold >= 0.19 and warm < cold / 2


# ------------------------------------------------------------------ failure knobs and info


def test_fail_first_n_and_failure_rate(make_worker):
    w = make_worker(fail_first_n=2, fail_status=503)
    codes = [w.post("/generate", json={"text": "x", "sampling_params": {"max_new_tokens": 1}}).status_code
             for _ in range(4)]
    assert codes == [503, 503, 200, 200]
    assert w.post("/mock/configure", json={"failure_rate": 1.0, "fail_status": 500}).status_code == 200
    assert w.post("/generate", json={"text": "x"}).status_code == 500
    w.post("/mock/configure", json={"failure_rate": 0.5})
    codes = [w.post("/generate", json={"text": "x", "sampling_params": {"max_new_tokens": 1}}).status_code
             for _ in range(40)]
    assert 5 < codes.count(500) < 35
    stats = w.get("/mock/stats").json()
    assert stats["requests_received"] == 45 and stats["failures_injected"] == 3 + codes.count(500)
    # deterministic from the seed
    w2 = make_worker(failure_rate=0.5)
    codes2 = [w2.post("/generate", json={"text": "x", "sampling_params": {"max_new_tokens": 1}}).status_code
              for _ in range(45)]
    w3 = make_worker(failure_rate=0.5)
    codes3 = [w3.post("/generate", json={"text": "x", "sampling_params": {"max_new_tokens": 1}}).status_code
              for _ in range(45)]
    assert codes2 == codes3


def test_latency_and_concurrency_stats(make_worker):
    w = make_worker(latency=0.2)
    t = time.monotonic()
    with ThreadPoolExecutor(4) as ex:
        list(ex.map(lambda _: gen(w, text="x", sampling_params={"max_new_tokens": 1}), range(4)))
    assert 0.2 <= time.monotonic() - t < 1.5
    s = w.get("/mock/stats").json()
    assert s["requests_received"] == 4 and s["in_flight"] == 0 and s["max_concurrent"] >= 2


def test_health_knobs(make_worker):
    w = make_worker()
    for path in ("/health", "/health_generate"):
        r = w.get(path)
        assert r.status_code == 200 and r.content == b""
    w.post("/mock/configure", json={"health_status": 503})
    assert w.get("/health").status_code == 503 and w.get("/health_generate").status_code == 503
    w2 = make_worker(unhealthy_after=0.2)
    assert w2.get("/health").status_code == 200
    time.sleep(0.25)
    assert w2.get("/health").status_code == 503


def test_info_endpoints_and_records(w):
    si = w.get("/get_server_info").json()
    assert si["dp_size"] == 1 and w.get("/server_info").status_code == 200
    load = w.get("/get_load").json()
    assert load == [{"dp_rank": 0, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0}]
    models = w.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "mock-qwen3"
    gen(w, text="x", sampling_params={"max_new_tokens": 1})
    assert len(w.get("/mock/records").json()) == 1
    assert w.delete("/mock/records").status_code == 200
    assert w.get("/mock/records").json() == []


def test_several_workers_have_separate_state(make_worker):
    a, b = make_worker(), make_worker(weight_version="7")
    gen(a, text="x", sampling_params={"max_new_tokens": 1})
    assert len(a.get("/mock/records").json()) == 1 and b.get("/mock/records").json() == []
    assert b.get("/model_info").json()["weight_version"] == "7"
    assert a.get("/model_info").json()["weight_version"] == "default"


def test_cli_crash_after_n(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "slime_router_testing.mock_worker", "--port", str(port), "--crash-after-n", "1",
         "--mode", "reply_text", "--reply-text", "pong"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 20
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline and proc.poll() is None, "CLI worker did not start"
            time.sleep(0.05)
        assert httpx.post(url + "/generate", json={"text": "ping"}).json()["text"] == "pong"
        with pytest.raises(httpx.HTTPError):
            httpx.post(url + "/generate", json={"text": "ping"}, timeout=5)
        assert proc.wait(timeout=5) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
