"""A verl-style agent loop: a multi-turn tool agent whose training data comes from a slime-router session.

A verl agent loop runs one episode and returns an ``AgentLoopOutput``: ``prompt_ids``, ``response_ids``,
``response_mask`` (1 on tokens the model generated, 0 on tool responses), ``response_logprobs``, ``num_turns`` and
``metrics``. Usually the loop tokenizes every tool response itself to build these. Here the agent is written
against the OpenAI API (``AsyncSession.openai()``: an ``openai.AsyncOpenAI`` bound to the session), and the
output is read back from the session's trajectory, split at its first generated token (``prompt_length``):
the exact ids the worker consumed and produced, with its logprobs.

Run it against the embedded demo (``slime-router serve`` in another terminal)::

    python examples/sessions/verl_agent_loop.py                   # http://127.0.0.1:30000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from slime_router_client import AsyncClient

DEFAULT_ROUTER = "http://127.0.0.1:30000"

TOOLS = [{"type": "function", "function": {
    "name": "get_weather",
    "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}}]


def get_weather(city: str) -> dict[str, Any]:
    """The local tool: a made-up forecast."""
    return {"city": city, "temp_c": 10 + sum(map(ord, city)) % 20, "sky": "clear"}


async def call_tool(name: str, arguments: str) -> str:
    """Run one tool call (async, as verl's tools are); its result (or error) as the tool message's content."""
    try:
        args = json.loads(arguments or "{}")
        if name != "get_weather" or not isinstance(args, dict):
            raise ValueError(f"unknown tool {name!r}")
        result: Any = get_weather(str(args.get("city", "")))
    except (ValueError, TypeError) as e:
        result = {"error": str(e)}
    return json.dumps(result, ensure_ascii=False)


@dataclass
class AgentLoopOutput:
    """One episode, as a verl agent loop returns it.

    ``prompt_ids``: the tokens before the first generated one (the rendered first prompt). ``response_ids``: every
    token after, generated or not (tool responses, the chat template between turns). ``response_mask`` and
    ``response_logprobs`` are aligned with ``response_ids`` (mask 1 / the rollout logprob on generated tokens, 0 /
    0.0 elsewhere). ``num_turns``: chat messages added by the episode (assistant + tool), as verl counts turns.
    ``metrics``: timings (``generate_sequences``, ``tool_calls`` in seconds) and counts. ``extra_fields``: the
    session id, the number of chat calls and of trajectories the session held.
    """

    prompt_ids: list[int]
    response_ids: list[int]
    response_mask: list[int]
    response_logprobs: list[float]
    num_turns: int
    metrics: dict[str, float] = field(default_factory=dict)
    extra_fields: dict[str, Any] = field(default_factory=dict)


def openai_params(sampling_params: Mapping[str, Any]) -> dict[str, Any]:
    """verl-style sampling params (``temperature``, ``top_p``, ``max_tokens`` or ``max_new_tokens``...) as chat
    parameters."""
    out: dict[str, Any] = {}
    max_tokens = sampling_params.get("max_tokens", sampling_params.get("max_new_tokens"))
    if max_tokens is not None:
        out["max_tokens"] = max_tokens
    for k in ("temperature", "top_p", "stop", "seed"):
        if sampling_params.get(k) is not None:
            out[k] = sampling_params[k]
    return out


async def run(client: AsyncClient, messages: list[dict[str, Any]], sampling_params: Mapping[str, Any],
              max_turns: int = 4) -> AgentLoopOutput:
    """Run the tool agent on ``messages`` in a fresh session of ``client``'s router (at most ``max_turns`` chat
    calls), finish the session and return its trajectory as an ``AgentLoopOutput``."""
    session = await client.session(metadata={"agent": "verl_agent_loop"})
    llm = session.openai()  # openai.AsyncOpenAI, base_url .../sessions/{id}/v1, max_retries=0
    history: list[Any] = list(messages)
    params = openai_params(sampling_params)
    calls = tool_calls = 0
    t_gen = t_tool = 0.0
    try:
        while calls < max_turns:
            t0 = time.perf_counter()
            reply = await llm.chat.completions.create(model="default", messages=history, tools=TOOLS, **params)
            t_gen += time.perf_counter() - t0
            calls += 1
            message = reply.choices[0].message
            history.append(message)  # as the SDK returned it: the router renders it as the model wrote it
            if not message.tool_calls or reply.choices[0].finish_reason == "length" or calls == max_turns:
                break  # answered, cut off, or out of turns (tool results no generation reads are not run)
            t0 = time.perf_counter()
            results = await asyncio.gather(*(call_tool(c.function.name, c.function.arguments)
                                             for c in message.tool_calls))
            t_tool += time.perf_counter() - t0
            for c, content in zip(message.tool_calls, results):
                tool_calls += 1
                history.append({"role": "tool", "tool_call_id": c.id, "content": content})
    finally:
        await llm.close()
        data = await session.finish_data()  # DELETE: the trajectories once, then freed on the router
    # the trajectory of the last generation: the only one for an agent that only appends to its history
    trajs = [t for t in data.trajectories if t.turns]
    if not trajs:  # every generation failed or was aborted: the session lists them in its gaps
        raise RuntimeError(f"session {session.id} has no trajectory (gaps: {data.gaps})")
    traj = max(trajs, key=lambda t: t.turns[-1].time)
    return AgentLoopOutput(
        prompt_ids=list(traj.prompt_tokens),
        response_ids=list(traj.response_tokens),
        response_mask=list(traj.response_loss_mask),
        response_logprobs=list(traj.response_logprobs),
        num_turns=len(history) - len(messages),
        metrics={"generate_sequences": t_gen, "tool_calls": t_tool, "num_tool_calls": float(tool_calls)},
        extra_fields={"session_id": session.id, "chat_calls": calls, "trajectories": len(data.trajectories),
                      "turns": traj.turns},
    )


async def _demo(router: str, max_turns: int) -> None:
    async with AsyncClient(router) as client:
        out = await run(client, [{"role": "user", "content": "What is the weather in Paris and in Oslo?"}],
                        {"temperature": 1.0, "max_tokens": 256}, max_turns=max_turns)
    print(f"session {out.extra_fields['session_id']}: {out.num_turns} turns ({out.extra_fields['chat_calls']} chat "
          f"calls), prompt {len(out.prompt_ids)} tokens, response {len(out.response_ids)} of which "
          f"{sum(out.response_mask)} generated; metrics {out.metrics}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("router", nargs="?", default=DEFAULT_ROUTER, help=f"router URL (default {DEFAULT_ROUTER})")
    p.add_argument("--max-turns", type=int, default=4)
    a = p.parse_args(argv)
    asyncio.run(_demo(a.router, a.max_turns))


if __name__ == "__main__":
    main()
