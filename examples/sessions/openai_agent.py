"""An agent written against the plain OpenAI SDK, recorded token-exactly by a slime-router session.

The agent knows nothing about slime-router: it is handed a base URL, ``{router}/sessions/{sid}/v1``, and runs an
ordinary tool loop (ask, execute the tool calls locally, append the results, ask again) until the model answers
without a tool call or ``max_turns`` chat calls were made. Every call it makes lands in session ``sid``.

The trainer side then asks the router for that session (``slime_router_client.Client``) and gets the exact token
ids the worker saw and produced, a loss mask (1 on generated tokens, 0 on the prompt, the tool results and the
chat template between turns), the rollout logprobs and the weight versions -- no re-tokenization of the chat.

Run it against the embedded demo (``slime-router serve`` in another terminal)::

    python examples/sessions/openai_agent.py                      # http://127.0.0.1:30000
    python examples/sessions/openai_agent.py http://host:port --question "Weather in Oslo?" --max-turns 4

Needs ``openai`` and ``slime-router[client]`` (httpx).
"""

from __future__ import annotations

import argparse
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from openai import OpenAI

from slime_router_client import Client, Trajectory

DEFAULT_ROUTER = "http://127.0.0.1:30000"

TOOLS = [{"type": "function", "function": {
    "name": "get_weather",
    "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}}]


def get_weather(city: str) -> dict[str, Any]:
    """The local tool: a made-up forecast (a real agent would call an API here)."""
    return {"city": city, "temp_c": 10 + sum(map(ord, city)) % 20, "sky": "clear"}


def execute_tool_call(name: str, arguments: str) -> str:
    """Run one tool call the model asked for; the result (or the error) as the tool message's content."""
    try:
        args = json.loads(arguments or "{}")
        if name != "get_weather" or not isinstance(args, dict):
            raise ValueError(f"unknown tool {name!r}")
        result: Any = get_weather(str(args.get("city", "")))
    except (ValueError, TypeError) as e:  # a malformed call is answered, not raised: the model may retry
        result = {"error": str(e)}
    return json.dumps(result, ensure_ascii=False)


@dataclass
class AgentRun:
    """What the agent itself knows after the loop: the conversation, how many chat calls it made, how many tool
    rounds (replies whose tool calls were run and answered) and tool calls it ran, and whether the model gave a
    final answer (False: stopped at ``max_turns`` or cut off by ``max_tokens``)."""

    messages: list[Any]
    turns: int = 0
    tool_rounds: int = 0
    tool_calls: int = 0
    answered: bool = False
    answer: str | None = None


def run_agent(base_url: str, question: str, max_turns: int = 5, model: str = "default",
              max_tokens: int = 256, api_key: str = "none") -> AgentRun:
    """The agent: a plain OpenAI tool loop against ``base_url`` (the session's ``.../sessions/{sid}/v1``): at most
    ``max_turns`` chat calls; the tools of the last one are not run (no call is left to read their results).

    ``max_retries=0``: a retried call that did reach the worker would be recorded a second time (as a branch).
    """
    llm = OpenAI(base_url=base_url, api_key=api_key, max_retries=0)
    run = AgentRun(messages=[{"role": "system", "content": "You are a helpful assistant. Use tools when useful."},
                             {"role": "user", "content": question}])
    while run.turns < max_turns:
        reply = llm.chat.completions.create(model=model, messages=run.messages, tools=TOOLS, max_tokens=max_tokens)
        run.turns += 1
        message = reply.choices[0].message
        # The message goes back as the SDK returned it (reasoning_content included): the router renders it
        # the way the model wrote it, so the next prompt continues the recorded ids.
        run.messages.append(message)
        if not message.tool_calls:
            run.answered = reply.choices[0].finish_reason == "stop"
            run.answer = message.content
            break
        if run.turns == max_turns:
            break  # no call left to show the model the results: they would be in no trajectory
        run.tool_rounds += 1
        for call in message.tool_calls:
            run.tool_calls += 1
            run.messages.append({"role": "tool", "tool_call_id": call.id,
                                 "content": execute_tool_call(call.function.name, call.function.arguments)})
    return run


@dataclass
class Episode:
    """One episode: the agent's view (``run``) and the trainer's (``trajectories``: exact tokens, loss mask,
    logprobs, weight versions, from token 0; one trajectory for a tool loop that only appends to its history)."""

    session_id: str
    run: AgentRun
    trajectories: list[Trajectory] = field(default_factory=list)


def run_episode(router: str, question: str = "What is the weather in Paris?", max_turns: int = 5,
                session_id: str | None = None, api_key: str | None = None, finish: bool = True) -> Episode:
    """Run the agent in a session of ``router``, then fetch the session as a trainer would.

    ``finish=True`` reads it with ``DELETE /sessions/{sid}`` (the data one last time, then the router frees it;
    any later use of the id gets 409). ``finish=False`` reads it with ``GET`` and leaves it open.
    """
    sid = session_id or f"openai-agent-{uuid.uuid4().hex}"
    # Agent side: only a base URL. The first request carrying a new id opens the session.
    run = run_agent(f"{router.rstrip('/')}/sessions/{sid}/v1", question, max_turns=max_turns,
                    api_key=api_key or "none")
    # Trainer side: the client of the sessions API.
    with Client(router, api_key=api_key) as client:
        session = client.get_session(sid)
        trajectories = session.finish() if finish else session.trajectories()
    return Episode(session_id=sid, run=run, trajectories=trajectories)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("router", nargs="?", default=DEFAULT_ROUTER, help=f"router URL (default {DEFAULT_ROUTER})")
    p.add_argument("--question", default="What is the weather in Paris?")
    p.add_argument("--max-turns", type=int, default=5)
    p.add_argument("--api-key", default=None, help="the router's --api-key, if it has one")
    a = p.parse_args(argv)
    ep = run_episode(a.router, a.question, max_turns=a.max_turns, api_key=a.api_key)
    print(f"session {ep.session_id}: {ep.run.turns} chat calls, {ep.run.tool_rounds} tool rounds "
          f"({ep.run.tool_calls} tool calls run), answered: {ep.run.answered}")
    print(f"answer: {ep.run.answer!r}")
    for t in ep.trajectories:
        print(f"trajectory {t.index} ({t.reason}): {t.token_length} tokens = prompt {t.prompt_length} + response "
              f"{t.response_length}, of which {sum(t.response_loss_mask)} generated (loss mask 1) in "
              f"{len(t.turns)} turns; weight versions {sorted(set(t.weight_versions))}")


if __name__ == "__main__":
    main()
