"""The session examples (``examples/sessions/``) run end to end: a real router (radix_tree, openai_compat,
sessions) in front of a mock worker that answers like the embedded demo's (a thinking Qwen3 that calls the
prompt's tools with probability 0.8, realistic token splits and whitespace), on real sockets.

What each example returns is checked against the mock worker's record of truth (``GET /mock/records``: the ids
each generation received and produced, and the logprobs it drew): the tokens are the last generation's prompt +
output, the loss mask is 1 exactly on generated tokens (0 on tool results and the template), the logprobs are the
worker's (float32); at least one tool round happened; the session is finished afterwards (409).

The examples are loaded by path (``examples/`` is not a package). The worker is seeded (``realistic_seed``), so a
run is reproducible; a tool round is drawn with probability 0.8 per episode and up to ATTEMPTS episodes are run
until one has it (each checked for exactness).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from array import array
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import openai
import pytest

from slime_router_client import AsyncClient
from slime_router_core import Settings
from slime_router_core.tokenizers import BUILTIN_CHECKPOINT, load_tokenizer
from slime_router_testing import ServerThread, start_router
from slime_router_testing.mock_worker import MockWorkerConfig, create_mock_worker_app

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "sessions"
ATTEMPTS = 12  # episodes until one has a tool round (p = 0.2 each without one)
WORKER = {"realistic": True, "realistic_seed": 2026, "mode": "think", "tool_call_rate": 0.8}


def load_example(name: str) -> ModuleType:
    """``examples/sessions/<name>.py`` as a module (by path: the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f"examples_sessions_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


openai_agent = load_example("openai_agent")
slime_rollout = load_example("slime_rollout")
verl_agent_loop = load_example("verl_agent_loop")


@pytest.fixture(scope="module")
def worker() -> Iterator[str]:
    w = ServerThread(create_mock_worker_app(MockWorkerConfig(hf_checkpoint=BUILTIN_CHECKPOINT, **WORKER))).start()
    yield w.url
    w.stop()


@pytest.fixture(scope="module")
def router(worker: str) -> Iterator[str]:
    r = start_router(plugins=["radix_tree", "openai_compat", "sessions"], settings=Settings(
        hf_checkpoint=BUILTIN_CHECKPOINT, worker_urls=[worker]))
    yield r.url
    r.stop()


@pytest.fixture
def env(router: str, worker: str) -> Iterator[dict[str, str]]:
    """The shared router and worker, the worker configured as the demo's and its records cleared."""
    configure(worker, **WORKER)
    clear(worker)
    yield {"url": router, "worker": worker}
    configure(worker, **WORKER)


def configure(worker: str, **kw: Any) -> None:
    httpx.post(worker + "/mock/configure", json=kw).raise_for_status()


def clear(worker: str) -> None:
    httpx.delete(worker + "/mock/records").raise_for_status()


def records(worker: str) -> list[dict[str, Any]]:
    recs = httpx.get(worker + "/mock/records").json()
    assert recs and not any(r["aborted"] for r in recs)
    return recs


def truth(recs: list[dict[str, Any]]) -> tuple[list[int], list[int], list[float]]:
    """One chain of generations as the worker saw it: the last prompt + output, the loss mask (1 on every
    generation's output, 0 elsewhere) and the logprobs (each output's as float32, 0.0 elsewhere). Each prompt must
    continue the previous generations' exact ids."""
    last = recs[-1]
    seq = last["input_ids"] + last["output_ids"]
    mask = [0] * len(seq)
    logp = [0.0] * len(seq)
    for rec in recs:
        a = len(rec["input_ids"])
        assert seq[:a + len(rec["output_ids"])] == rec["input_ids"] + rec["output_ids"]
        for k, lp in enumerate(rec["output_logprobs"]):
            mask[a + k] = 1
            logp[a + k] = lp
    return seq, mask, array("f", logp).tolist()


def decode_masked_out(response: list[int], mask: list[int]) -> str:
    """The text of the response tokens with loss mask 0 (what the model did not generate)."""
    tok = load_tokenizer(BUILTIN_CHECKPOINT)
    return tok.decode([t for t, m in zip(response, mask) if m == 0], skip_special_tokens=False)


def assert_tool_results_masked(response: list[int], mask: list[int], tool_contents: list[str]) -> None:
    """Every tool result (the local get_weather's answer) is in the response, with loss mask 0."""
    assert tool_contents and 0 in mask and 1 in mask
    assert all("temp_c" in json.loads(c) for c in tool_contents), tool_contents
    outside = decode_masked_out(response, mask)
    assert outside.count("<tool_response>") == len(tool_contents)
    for content in tool_contents:
        assert content in outside


def assert_finished(url: str, sid: str) -> None:
    r = httpx.get(f"{url}/sessions/{sid}")
    assert r.status_code == 409 and r.json()["error"]["code"] == "session_finished", r.text


def answered(rec: dict[str, Any]) -> bool:
    """The generation ended the episode with an answer: it stopped on its own without calling a tool."""
    return rec["finish_reason"]["type"] == "stop" and "<tool_call>" not in rec["text"]


def tool_messages(messages: list[Any]) -> list[str]:
    return [m["content"] for m in messages if isinstance(m, dict) and m.get("role") == "tool"]


# --- openai_agent.py: the plain OpenAI SDK on a session base URL, then the trainer's Client ---------------------


def test_openai_agent_episode_is_the_workers_tokens(env):
    url, worker = env["url"], env["worker"]
    for _ in range(ATTEMPTS):
        clear(worker)
        ep = openai_agent.run_episode(url, "What is the weather in Paris?", max_turns=6)
        recs = records(worker)
        assert ep.run.turns == len(recs) >= 1
        (t,) = ep.trajectories
        seq, mask, logp = truth(recs)
        assert t.reason == "new" and len(t.turns) == len(recs)
        assert t.tokens == seq and t.loss_mask == mask and t.logprobs == logp
        assert t.prompt_length == len(recs[0]["input_ids"]) and t.prompt_tokens == recs[0]["input_ids"]
        assert t.response_tokens == seq[t.prompt_length:] and t.response_loss_mask == mask[t.prompt_length:]
        assert t.weight_versions == ["default"] * len(seq)
        assert_finished(url, ep.session_id)
        if ep.run.tool_rounds:
            break
    assert ep.run.tool_rounds >= 1 and ep.run.tool_calls >= ep.run.tool_rounds
    assert ep.run.answered == answered(recs[-1])
    assert not ep.run.answered or (isinstance(ep.run.answer, str) and ep.run.answer in recs[-1]["text"])
    assert_tool_results_masked(t.response_tokens, t.response_loss_mask, tool_messages(ep.run.messages))


def test_openai_agent_unfinished_session_stays_readable(env):
    url = env["url"]
    ep = openai_agent.run_episode(url, "Weather in Oslo?", max_turns=2, finish=False)
    seq, mask, _ = truth(records(env["worker"]))
    assert [t.tokens for t in ep.trajectories] == [seq]
    r = httpx.get(f"{url}/sessions/{ep.session_id}")
    assert r.status_code == 200 and r.json()["trajectories"][0]["loss_mask"] == mask
    assert httpx.delete(f"{url}/sessions/{ep.session_id}").status_code == 200
    assert_finished(url, ep.session_id)


# --- slime_rollout.py: slime's custom generate and a GRPO group ------------------------------------------------


def slime_args(url: str, max_turns: int = 6) -> Any:
    import argparse

    host, port = url.removeprefix("http://").split(":")
    return argparse.Namespace(sglang_router_ip=host, sglang_router_port=int(port), max_turns=max_turns)


def assert_slime_sample(s: dict[str, Any], recs: list[dict[str, Any]], url: str) -> None:
    seq, mask, logp = truth(recs)
    plen = len(recs[0]["input_ids"])
    assert s["tokens"] == seq and s["response_length"] == len(seq) - plen
    assert s["loss_mask"] == mask[plen:] and len(s["loss_mask"]) == s["response_length"]
    assert s["loss_mask"][0] == 1 and sum(s["loss_mask"]) == sum(len(r["output_ids"]) for r in recs)
    assert s["rollout_log_probs"] == logp[plen:]
    assert s["weight_versions"] == [r["weight_version"] for r in recs]
    assert s["metadata"]["num_turns"] == len(recs) and s["metadata"]["trajectories"] == 1
    assert_finished(url, s["metadata"]["session_id"])


async def test_slime_generate_returns_the_sample_of_the_session(env):
    url, worker = env["url"], env["worker"]
    args = slime_args(url)
    sample = {"index": 3, "group_index": 1, "prompt": [{"role": "user", "content": "Weather in Paris and Oslo?"}],
              "metadata": {"source": "test"}}
    for _ in range(ATTEMPTS):
        clear(worker)
        s = await slime_rollout.generate(args, dict(sample), {"max_new_tokens": 256, "temperature": 1.0})
        recs = records(worker)
        assert_slime_sample(s, recs, url)
        assert s["index"] == 3 and s["metadata"]["source"] == "test" and s["prompt"] == sample["prompt"]
        if s["metadata"]["tool_calls"]:
            break
    assert s["metadata"]["tool_calls"] >= 1
    assert s["status"] == ("completed" if answered(recs[-1]) else "truncated")
    assert_tool_results_masked(s["tokens"][-s["response_length"]:], s["loss_mask"],
                               tool_messages(s["metadata"]["messages"]))


async def test_slime_generate_truncated(env):
    url, worker = env["url"], env["worker"]
    # every reply calls a tool: the episode ends at max_turns without an answer
    configure(worker, tool_call_rate=1.0)
    s = await slime_rollout.generate(slime_args(url, max_turns=2), {"prompt": "Weather in Paris?"},
                                     {"max_new_tokens": 256})
    recs = records(worker)
    assert s["status"] == "truncated" and s["metadata"]["num_turns"] == 2 and s["metadata"]["tool_calls"] >= 1
    assert_slime_sample(s, recs, url)
    # the last call's tools were not run (no call left to read them): every tool result is in the trajectory
    messages = s["metadata"]["messages"]
    assert messages[-1]["role"] == "assistant" and messages[-1]["tool_calls"]
    assert_tool_results_masked(s["tokens"][-s["response_length"]:], s["loss_mask"], tool_messages(messages))
    # cut off by max_new_tokens: truncated after one turn
    clear(worker)
    s = await slime_rollout.generate(slime_args(url), {"prompt": "Weather in Paris?"}, {"max_new_tokens": 5})
    recs = records(worker)
    assert recs[-1]["finish_reason"]["type"] == "length" and len(recs[-1]["output_ids"]) == 5
    assert s["status"] == "truncated" and s["metadata"]["num_turns"] == 1 and s["response_length"] == 5
    assert_slime_sample(s, recs, url)


async def test_slime_grpo_group_is_n_trajectories_of_one_group(env):
    url, worker = env["url"], env["worker"]
    prompt = slime_rollout.QWEN_PROMPT.format("Solve 2+2.")
    group = await slime_rollout.generate_group(slime_args(url), {"index": 0, "prompt": prompt},
                                               {"max_new_tokens": 48, "temperature": 1.0}, n=4)
    recs = records(worker)
    assert len(group) == len(recs) == 4
    assert [g["metadata"]["reason"] for g in group] == ["new", "branch", "branch", "branch"]
    assert [g["metadata"]["parent"] for g in group] == [None, 0, 0, 0]
    groups = {g["metadata"]["group"] for g in group}
    assert len(groups) == 1 and None not in groups
    assert len({g["metadata"]["session_id"] for g in group}) == 1
    plen = len(recs[0]["input_ids"])
    assert all(r["input_ids"] == recs[0]["input_ids"] for r in recs)
    got = sorted((g["tokens"], g["loss_mask"], g["rollout_log_probs"]) for g in group)
    want = sorted((r["input_ids"] + r["output_ids"], [1] * len(r["output_ids"]),
                   array("f", r["output_logprobs"]).tolist()) for r in recs)
    assert got == want
    for g in group:
        assert g["response_length"] == len(g["tokens"]) - plen and g["metadata"]["num_turns"] == 1
        assert g["status"] == "completed" and g["weight_versions"] == ["default"]
    assert_finished(url, group[0]["metadata"]["session_id"])


# --- verl_agent_loop.py: AgentLoopOutput from the session's trajectory ----------------------------------------


async def test_verl_agent_loop_output_is_the_workers_tokens(env):
    url, worker = env["url"], env["worker"]
    messages = [{"role": "system", "content": "You check the weather."},
                {"role": "user", "content": "What is the weather in Tokyo?"}]
    async with AsyncClient(url) as client:
        for _ in range(ATTEMPTS):
            clear(worker)
            out = await verl_agent_loop.run(client, messages, {"temperature": 1.0, "max_tokens": 256}, max_turns=6)
            recs = records(worker)
            seq, mask, logp = truth(recs)
            plen = len(recs[0]["input_ids"])
            assert isinstance(out, verl_agent_loop.AgentLoopOutput)
            assert out.prompt_ids == recs[0]["input_ids"] and out.prompt_ids + out.response_ids == seq
            assert out.response_mask == mask[plen:] and out.response_logprobs == logp[plen:]
            assert len(out.response_ids) == len(out.response_mask) == len(out.response_logprobs)
            assert out.extra_fields["chat_calls"] == len(recs) and out.extra_fields["trajectories"] == 1
            assert len(out.extra_fields["turns"]) == len(recs)
            assert_finished(url, out.extra_fields["session_id"])
            if out.metrics["num_tool_calls"]:
                break
    tool_calls = int(out.metrics["num_tool_calls"])
    assert tool_calls >= 1 and out.num_turns == len(recs) + tool_calls
    assert out.metrics["generate_sequences"] > 0
    # the tool responses are in the response with mask 0; the messages were not changed by the loop
    outside = decode_masked_out(out.response_ids, out.response_mask)
    assert outside.count("<tool_response>") == tool_calls and '"temp_c"' in outside
    assert len(messages) == 2


async def test_verl_agent_loop_finishes_the_session_when_the_agent_fails(env):
    async with AsyncClient(env["url"]) as client:
        before = (await client.list_sessions())["stats"]
        with pytest.raises(openai.BadRequestError):  # the router refuses the chat: the loop raises...
            await verl_agent_loop.run(client, [{"role": "nobody", "content": "?"}], {"max_tokens": 8})
        after = await client.list_sessions()
    # ... after finishing the session it opened: nothing is left open on the router
    assert after["sessions"] == [] and after["stats"]["finished"] == before["finished"] + 1
    assert after["stats"]["created"] == before["created"] + 1
