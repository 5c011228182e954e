"""A slime-style custom rollout function: a multi-turn tool-using agent run through a slime-router session.

slime calls a custom ``generate(args, sample, sampling_params)`` once per sample and trains on what it returns:
``tokens`` (prompt + response ids), ``response_length``, ``loss_mask`` and ``rollout_log_probs`` over the
response, the ``weight_versions`` that generated it, a ``status`` and free ``metadata``. Here the agent talks
OpenAI chat through the session (``AsyncSession.chat``) and never touches a token: when the episode is over the
session is finished and its trajectory *is* the sample -- the ids the worker saw and produced, loss mask 1 exactly on
generated tokens (0 on tool results and on the chat template between turns), the worker's logprobs.

Samples are plain dicts here (field names as slime's ``Sample``) so the example runs without slime installed;
in slime, set the same attributes on the ``Sample`` it passes in.

``generate_group`` is the GRPO side: ``n`` samples of one prompt from one ``/generate`` request (``n`` in the
sampling params) in one session, returned as ``n`` samples whose trajectories form one group (the first
``"new"``, the others ``"branch"``es of it).

Run it against the embedded demo (``slime-router serve`` in another terminal)::

    python examples/sessions/slime_rollout.py                     # http://127.0.0.1:30000

``args`` is what slime passes around; this module reads ``args.router_url`` if set, else
``http://{args.sglang_router_ip}:{args.sglang_router_port}``, plus ``args.max_turns`` (default 4) and
``args.router_api_key`` (default none).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Mapping
from typing import Any

from slime_router_client import AsyncClient, SessionData, Trajectory

DEFAULT_ROUTER = "http://127.0.0.1:30000"
COMPLETED, TRUNCATED = "completed", "truncated"

TOOLS = [{"type": "function", "function": {
    "name": "get_weather",
    "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}}]


def get_weather(city: str) -> dict[str, Any]:
    """The local tool: a made-up forecast."""
    return {"city": city, "temp_c": 10 + sum(map(ord, city)) % 20, "sky": "clear"}


def execute_tool_call(name: str, arguments: str) -> str:
    """Run one tool call; its result (or error) as the tool message's content."""
    try:
        args = json.loads(arguments or "{}")
        if name != "get_weather" or not isinstance(args, dict):
            raise ValueError(f"unknown tool {name!r}")
        result: Any = get_weather(str(args.get("city", "")))
    except (ValueError, TypeError) as e:
        result = {"error": str(e)}
    return json.dumps(result, ensure_ascii=False)


def router_url(args: Any) -> str:
    """The router's URL from slime's arguments."""
    url = getattr(args, "router_url", None)
    return url or f"http://{args.sglang_router_ip}:{args.sglang_router_port}"


def chat_params(sampling_params: Mapping[str, Any]) -> dict[str, Any]:
    """slime's SGLang sampling params as OpenAI chat parameters (the ones chat has; others are dropped)."""
    out: dict[str, Any] = {}
    if "max_new_tokens" in sampling_params:
        out["max_tokens"] = sampling_params["max_new_tokens"]
    for k in ("temperature", "top_p", "stop", "presence_penalty", "frequency_penalty", "seed"):
        if sampling_params.get(k) is not None:
            out[k] = sampling_params[k]
    return out


def turn_versions(t: Trajectory) -> list[str]:
    """The weight version of each generation in the trajectory (that of its first generated token), as slime's
    ``Sample.weight_versions`` lists one per generation call."""
    return [t.weight_versions[turn.prompt_tokens] for turn in t.turns
            if turn.output_tokens and turn.prompt_tokens < len(t.weight_versions)]


def sample_fields(t: Trajectory) -> dict[str, Any]:
    """The training fields of a slime ``Sample`` from one trajectory, split at its first generated token."""
    return {
        "tokens": list(t.tokens),                        # prompt + response ids
        "response_length": t.response_length,            # generated tokens + later prompts (tool results...)
        "loss_mask": list(t.response_loss_mask),         # over the response: 1 generated, 0 tool results/template
        "rollout_log_probs": list(t.response_logprobs),  # over the response (0.0 where the mask is 0)
        "weight_versions": turn_versions(t),
    }


def last_trajectory(data: SessionData) -> Trajectory:
    """The trajectory the episode's last generation is in: the only one for an agent that only appends to its
    history (one that edits or drops history makes ``"rewrite"`` trajectories next to the first)."""
    trajs = [t for t in data.trajectories if t.turns]
    if not trajs:  # every generation failed or was aborted: the session lists them in its gaps
        raise RuntimeError(f"session {data.session_id} has no trajectory (gaps: {data.gaps})")
    return max(trajs, key=lambda t: t.turns[-1].time)


def _is_length(finish_reason: Any) -> bool:
    reason = finish_reason.get("type") if isinstance(finish_reason, dict) else finish_reason
    return reason == "length"


async def generate(args: Any, sample: dict[str, Any], sampling_params: dict[str, Any]) -> dict[str, Any]:
    """slime's custom generate: run the agent on ``sample["prompt"]`` (a list of chat messages, or a user text)
    in a fresh session, finish the session, and return the sample with its training fields filled in.

    ``status`` is ``"completed"`` when the model answered without a tool call and stopped on its own,
    ``"truncated"`` when it hit ``max_new_tokens`` or ``args.max_turns`` chat calls were made without an answer.
    ``metadata`` gets ``session_id``, ``num_turns`` (chat calls), ``tool_calls`` (tool calls run),
    ``trajectories`` (how many the session held; 1 for an agent that only appends to its history) and
    ``messages`` (the conversation); ``response`` is the final answer's text ("" when truncated).
    """
    prompt = sample["prompt"]
    messages: list[dict[str, Any]] = ([{"role": "user", "content": prompt}] if isinstance(prompt, str)
                                      else [dict(m) for m in prompt])
    max_turns = int(getattr(args, "max_turns", 4))
    params = chat_params(sampling_params)
    turns = tool_calls = 0
    status = TRUNCATED
    answer = ""
    async with AsyncClient(router_url(args), api_key=getattr(args, "router_api_key", None)) as client:
        session = await client.session(metadata={"index": sample.get("index"), "group": sample.get("group_index")})
        try:
            while turns < max_turns:
                reply = await session.chat(messages, tools=TOOLS, **params)
                turns += 1
                choice = reply.choices[0]
                message = choice.message
                # chat() sends JSON: the reply goes back as a dict, reasoning_content included (the router renders
                # it as the model wrote it, so the next prompt continues the recorded ids).
                messages.append(message.model_dump(exclude_none=True))
                if _is_length(choice.finish_reason):
                    break  # cut off mid-answer: truncated
                if not message.tool_calls:
                    status, answer = COMPLETED, message.content or ""
                    break
                if turns == max_turns:
                    break  # out of turns: the tool results would reach no generation (nor the trajectory)
                for call in message.tool_calls:
                    tool_calls += 1
                    messages.append({"role": "tool", "tool_call_id": call.id,
                                     "content": execute_tool_call(call.function.name, call.function.arguments)})
        finally:
            data = await session.finish_data()  # DELETE: the trajectories once, then the router frees them
    traj = last_trajectory(data)
    return {**sample, **sample_fields(traj), "response": answer, "status": status,
            "metadata": {**(sample.get("metadata") or {}), "session_id": session.id, "num_turns": turns,
                         "tool_calls": tool_calls, "trajectories": len(data.trajectories), "messages": messages}}


async def generate_group(args: Any, sample: dict[str, Any], sampling_params: dict[str, Any],
                         n: int = 4) -> list[dict[str, Any]]:
    """GRPO: ``n`` samples of one prompt in one session, from one ``/generate`` request with ``n`` in the sampling
    params. ``sample["prompt"]`` is the prompt text with the chat template applied (slime's
    ``--apply-chat-template``). Returns ``n`` samples; their trajectories are one group: the first ``"new"``, the
    others ``"branch"``es of it (``metadata``: ``session_id``, ``group`` -- the request that made them --,
    ``reason``, ``parent``, ``num_turns``)."""
    async with AsyncClient(router_url(args), api_key=getattr(args, "router_api_key", None)) as client:
        session = await client.session(metadata={"index": sample.get("index"), "group": sample.get("group_index")})
        try:
            await session.generate(sample["prompt"], sampling_params={**sampling_params, "n": n})
        finally:
            data = await session.finish_data()
    out = []
    for t in data.trajectories:
        last = t.turns[-1]
        out.append({**sample, **sample_fields(t), "status": TRUNCATED if _is_length(last.finish_reason) else COMPLETED,
                    "metadata": {**(sample.get("metadata") or {}), "session_id": session.id, "group": last.group,
                                 "reason": t.reason, "parent": t.parent, "num_turns": len(t.turns)}})
    return out


QWEN_PROMPT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


async def _demo(router: str, max_turns: int) -> None:
    args = argparse.Namespace(router_url=router, max_turns=max_turns)
    s = await generate(args, {"index": 0, "prompt": "What is the weather in Paris?"}, {"max_new_tokens": 256})
    m = s["metadata"]
    print(f"agent sample: status {s['status']}, {m['num_turns']} turns, {m['tool_calls']} tool calls, session "
          f"{m['session_id']}: {len(s['tokens'])} tokens, response {s['response_length']} of which "
          f"{sum(s['loss_mask'])} generated; weight versions {s['weight_versions']}")
    group = await generate_group(args, {"index": 1, "prompt": QWEN_PROMPT.format("Solve 2+2.")},
                                 {"max_new_tokens": 64, "temperature": 1.0}, n=4)
    for g in group:
        print(f"group sample ({g['metadata']['reason']}, group {g['metadata']['group']}): status {g['status']}, "
              f"response {g['response_length']} tokens")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("router", nargs="?", default=DEFAULT_ROUTER, help=f"router URL (default {DEFAULT_ROUTER})")
    p.add_argument("--max-turns", type=int, default=4)
    a = p.parse_args(argv)
    asyncio.run(_demo(a.router, a.max_turns))


if __name__ == "__main__":
    main()
