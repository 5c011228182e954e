"""The vLLM engine: what is particular to vLLM workers (the shared behaviour runs against both engines in the
exactness, OpenAI, LangChain, balancing and metrics modules: ``ENGINES`` / ``engine`` there).

Real sockets: the router in front of the bundled mock vLLM worker (slime_router_testing/mock_worker/vllm.py) and,
for mixed fleets, the mock SGLang worker; the mocks' records of truth say what each worker received and produced.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from slime_router_core import Settings
from slime_router_core.tokenizers import BUILTIN_CHECKPOINT
from slime_router_testing import ServerThread, start_router
from slime_router_testing.mock_worker import MockWorkerConfig, create_mock_vllm_worker_app, create_mock_worker_app

PROMPT = "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n"
PLUGINS = ["radix_tree", "openai_compat", "balancing", "vllm"]


def vllm_worker(servers_to_stop: list, generate_endpoint: bool = True, **cfg: Any) -> ServerThread:
    cfg.setdefault("max_random_tokens", 12)
    w = ServerThread(create_mock_vllm_worker_app(MockWorkerConfig(hf_checkpoint=BUILTIN_CHECKPOINT, **cfg),
                                                 generate_endpoint=generate_endpoint)).start()
    servers_to_stop.append(w)
    return w


def sglang_worker(servers_to_stop: list, **cfg: Any) -> ServerThread:
    cfg.setdefault("max_random_tokens", 12)
    w = ServerThread(create_mock_worker_app(MockWorkerConfig(hf_checkpoint=BUILTIN_CHECKPOINT, **cfg))).start()
    servers_to_stop.append(w)
    return w


def router(servers_to_stop: list, urls: list[str], plugins: list[str] | None = None,
           hf: str | None = BUILTIN_CHECKPOINT) -> ServerThread:
    r = start_router(plugins=plugins or PLUGINS, settings=Settings(hf_checkpoint=hf, worker_urls=urls))
    servers_to_stop.append(r)
    return r


def records(w: ServerThread) -> list[dict]:
    return httpx.get(w.url + "/mock/records").json()


def exact(c: httpx.Client, url: str, w: ServerThread, text: str) -> dict:
    got = c.post(url + "/retrieve_from_text", json={"text": text, "strict": True})
    assert got.status_code == 200, got.text
    rec = records(w)[-1]
    got_json = got.json()
    assert got_json["tokens"] == rec["input_ids"] + rec["output_ids"]
    assert got_json["loss_mask"][len(rec["input_ids"]):] == [1] * len(rec["output_ids"])
    return got_json


@pytest.mark.parametrize("generate_endpoint", [True, False], ids=["inference-generate", "older-completions"])
def test_detected_by_its_openapi_and_exact_on_either_endpoint(servers_to_stop, generate_endpoint):
    w = vllm_worker(servers_to_stop, generate_endpoint=generate_endpoint)
    r = router(servers_to_stop, [w.url])
    with httpx.Client(timeout=30) as c:
        (info,) = c.get(r.url + "/list_workers").json()["workers"]
        assert info["engine"] == "vllm"
        text = PROMPT
        for turn in range(3):
            reply = c.post(r.url + "/generate", json={"text": text, "return_logprob": True,
                                                      "sampling_params": {"max_new_tokens": 10}})
            assert reply.status_code == 200, reply.text
            body = reply.json()
            rec = records(w)[-1]
            assert rec["path"] == ("/inference/v1/generate" if generate_endpoint else "/v1/completions")
            assert body["output_ids"] == rec["output_ids"]
            assert [x[0] for x in body["meta_info"]["output_token_logprobs"]] == pytest.approx(
                rec["output_logprobs"])
            done = text + body["text"]
            text = done + f"<|im_end|>\n<|im_start|>user\nturn {turn}<|im_end|>\n<|im_start|>assistant\n"
            if turn:  # the next turn's prompt was sent as the recorded ids + the new text's
                prev = records(w)[-2]
                assert rec["input_ids"][:len(prev["input_ids"]) + len(prev["output_ids"])] == \
                    prev["input_ids"] + prev["output_ids"]
        exact(c, r.url, w, done)


def test_explicit_engine_and_worker_url_form(servers_to_stop):
    w = vllm_worker(servers_to_stop)
    r = router(servers_to_stop, [w.url + "#engine=vllm"])
    w2 = vllm_worker(servers_to_stop)
    with httpx.Client(timeout=30) as c:
        assert c.post(r.url + "/add_worker", params={"url": w2.url, "engine": "vllm"}).status_code == 200
        engines = {x["url"]: x["engine"] for x in c.get(r.url + "/list_workers").json()["workers"]}
        assert engines == {w.url: "vllm", w2.url: "vllm"}
        bad = c.post(r.url + "/add_worker", params={"url": "http://127.0.0.1:9", "engine": "tgi"})
        assert bad.status_code == 400 and "sglang" in bad.json()["error"]["message"]


def test_weight_version_is_the_one_known_at_dispatch(servers_to_stop):
    """vLLM does not stamp replies: the router reads /weight_info when the worker joins and follows every
    /update_weight_version it forwards; the version lands in the reply and the trajectory cache."""
    w = vllm_worker(servers_to_stop, weight_version="step-3")
    r = router(servers_to_stop, [w.url])
    with httpx.Client(timeout=30) as c:
        first = c.post(r.url + "/generate", json={"text": PROMPT, "sampling_params": {"max_new_tokens": 6}}).json()
        assert first["meta_info"]["weight_version"] == "step-3"
        up = c.post(r.url + "/update_weight_version", json={"new_version": "step-4"})
        assert up.status_code == 200, up.text
        assert httpx.get(w.url + "/weight_info").json()["weight_version"] == "step-4"
        text = PROMPT + first["text"] + "<|im_end|>\n<|im_start|>user\nagain<|im_end|>\n<|im_start|>assistant\n"
        second = c.post(r.url + "/generate", json={"text": text, "sampling_params": {"max_new_tokens": 6}}).json()
        assert second["meta_info"]["weight_version"] == "step-4"
        got = exact(c, r.url, w, text + second["text"])
        generated = [v for v, m in zip(got["weight_versions"], got["loss_mask"]) if m]
        assert generated == ["step-3"] * len(first["output_ids"]) + ["step-4"] * len(second["output_ids"])


async def test_abort_pause_resume_and_flush_are_mapped(servers_to_stop):
    w = vllm_worker(servers_to_stop, token_latency=0.2)
    r = router(servers_to_stop, [w.url])
    async with httpx.AsyncClient(timeout=30) as c:
        job = asyncio.ensure_future(c.post(r.url + "/generate", json={
            "text": PROMPT, "rid": "job-1", "sampling_params": {"max_new_tokens": 200, "ignore_eos": True}}))
        while not httpx.get(w.url + "/mock/stats").json().get("in_flight"):
            await asyncio.sleep(0.02)
        aborted = await c.post(r.url + "/abort_request", json={"rid": "job-1"})
        assert aborted.status_code == 200, aborted.text
        out = (await job).json()
        assert out["meta_info"]["finish_reason"]["type"] == "abort"
        assert len(out["output_ids"]) < 200
        assert (await c.post(r.url + "/pause_generation", json={})).status_code == 200
        assert httpx.get(w.url + "/is_paused").json()["is_paused"] is True
        assert (await c.post(r.url + "/continue_generation", json={})).status_code == 200
        assert httpx.get(w.url + "/is_paused").json()["is_paused"] is False
        flushed = await c.post(r.url + "/flush_cache")
        assert flushed.status_code == 200 and flushed.json()["success"] is True


def test_mixed_fleet_sends_sglang_only_features_to_sglang_workers(servers_to_stop):
    v = vllm_worker(servers_to_stop)
    s = sglang_worker(servers_to_stop)
    r = router(servers_to_stop, [v.url, s.url], plugins=["balancing", "vllm"])
    with httpx.Client(timeout=30) as c:
        engines = {x["url"]: x["engine"] for x in c.get(r.url + "/list_workers").json()["workers"]}
        assert engines == {v.url: "vllm", s.url: "sglang"}
        plain = {"input_ids": [9707, 11, 1879], "sampling_params": {"max_new_tokens": 4}}
        for _ in range(6):
            assert c.post(r.url + "/generate", json=plain).status_code == 200
        assert records(v) and records(s)  # both engines serve ordinary requests
        sglang_only = {**plain, "return_hidden_states": True}
        before = len(records(v))
        for _ in range(4):
            assert c.post(r.url + "/generate", json=sglang_only).status_code == 200
        assert len(records(v)) == before  # never sent to the vLLM worker
        assert c.post(r.url + "/remove_worker", params={"url": s.url}).status_code == 200
        refused = c.post(r.url + "/generate", json=sglang_only)
        assert refused.status_code == 400 and "return_hidden_states" in refused.json()["error"]["message"]


def test_no_tokenizer_text_goes_through_completions(servers_to_stop):
    w = vllm_worker(servers_to_stop)
    r = router(servers_to_stop, [w.url], plugins=["balancing", "vllm"], hf=None)
    with httpx.Client(timeout=30) as c:
        reply = c.post(r.url + "/generate", json={"text": "Once upon a time", "sampling_params": {
            "max_new_tokens": 8, "n": 2}})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        recs = records(w)
        assert [rec["path"] for rec in recs] == ["/v1/completions"] * 2
        assert sorted(b["output_ids"] for b in body) == sorted(rec["output_ids"] for rec in recs)
        assert all(b["text"] for b in body)
