"""A slime-router plugin that appends every finished trajectory to JSON-lines files, rotated by size.

One line per generated sequence of a non-streaming ``/generate`` request::

    {"time": ..., "request_id": ..., "metadata": {"x-episode-id": "ep-7"}, "worker_url": ..., "prompt_tokens": 12,
     "tokens": [...], "loss_mask": [0, ..., 1, ...], "rollout_logp": [0.0, ..., -0.31, ...],
     "weight_versions": [null, ..., "v3", ...], "finish_reason": "stop", "source": "trajectory_cache"}

``tokens`` is the whole trajectory: prompt then generated tokens. With the trajectory cache loaded (the radix_tree
plugin, or any ``TRAJECTORY_CACHE`` provider), the line is what the cache retrieves for prompt + reply: the tokens
of earlier turns that the model generated keep loss mask 1, their logprobs and weight versions (``source``:
``trajectory_cache``). Without a cache it is the prompt ids sent to the worker followed by the reply's ids
(``source``: ``reply``; logprobs are asked from the worker and removed again unless the client asked for them).

Options: ``--rollout-logger-dir`` (default ``rollouts``), ``--rollout-logger-max-bytes`` (rotate beyond; default
64 MiB), ``--rollout-logger-headers`` (request headers kept as metadata; default ``x-episode-id,x-reward-id``).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slime_router_core import hookimpl
from slime_router_core.context import StashKey
from slime_router_core.contracts import TRAJECTORY_CACHE
from slime_router_core.settings import PluginConfig, at_least, option

COMPONENT = "rollout_logger"
PREFIX = "rollouts-"


def _names(raw: Any) -> tuple[str, ...]:
    items = raw.split(",") if isinstance(raw, str) else list(raw)
    return tuple(h.strip().lower() for h in items if h.strip())


@dataclass(frozen=True)
class RolloutLoggerConfig(PluginConfig):
    flag_prefix = "--rollout-logger-"
    dir: str = option("rollouts", help="Directory of the JSON-lines files (created if missing).")
    max_bytes: int = option(64 << 20, check=at_least(1), help="Start a new file when the current one would grow "
                                                              "beyond this many bytes.")
    headers: tuple[str, ...] = option(("x-episode-id", "x-reward-id"), parse=_names,
                                      help="Request headers kept in each line's metadata (comma-separated).")


class RotatingWriter:
    """Appends lines to ``rollouts-000001.jsonl``, ``rollouts-000002.jsonl``... in ``directory``; a line that would
    take the current file beyond ``max_bytes`` opens the next one (a line is never split). The directory is made at
    the first line (building an app, as ``slime-router plugins`` does, leaves nothing behind); after a restart the
    newest file is continued."""

    def __init__(self, directory: str | Path, max_bytes: int) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.lock = threading.Lock()
        self.index = 0  # the current file's number (0: none opened yet)
        self.file: Any = None
        self.lines = 0

    @property
    def path(self) -> Path:
        return self.directory / f"{PREFIX}{self.index:06d}.jsonl"

    def write(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        with self.lock:
            if self.file is None:
                self.directory.mkdir(parents=True, exist_ok=True)
                existing = sorted(self.directory.glob(PREFIX + "*.jsonl"))
                self.index = int(existing[-1].stem[len(PREFIX):]) if existing else 1
                self.file = open(self.path, "ab")  # noqa: SIM115 - kept open across writes
            size = self.file.tell()
            if size and size + len(line) > self.max_bytes:
                self.file.close()
                self.index += 1
                self.file = open(self.path, "ab")  # noqa: SIM115
            self.file.write(line)
            self.file.flush()
            self.lines += 1

    def close(self) -> None:
        with self.lock:
            if self.file is not None:
                self.file.close()
                self.file = None


@dataclass
class _Request:
    metadata: dict[str, str]
    text: str | None
    client_wants_logprobs: bool


_REQUEST = StashKey[_Request]("rollout_logger.request")


@hookimpl
def add_options(options: Any) -> None:
    options.add_config(RolloutLoggerConfig)


@hookimpl
def register_components(registry: Any, router: Any) -> None:
    config = router.settings.config(RolloutLoggerConfig)
    registry.register(COMPONENT, RotatingWriter(config.dir, config.max_bytes), owner="rollout_logger")


@hookimpl(tryfirst=True)  # before the trajectory cache turns the prompt text into input_ids
def pre_request(ctx: Any) -> None:
    body = ctx.body
    if ctx.route != "/generate" or ctx.stream or not isinstance(body, dict):
        return
    config = ctx.router.settings.config(RolloutLoggerConfig)
    headers = ctx.headers
    metadata = {name: headers[name] for name in config.headers if name in headers}
    text = body.get("text") if isinstance(body.get("text"), str) else None
    wants = bool(body.get("return_logprob"))
    if ctx.router.registry.find(TRAJECTORY_CACHE) is None:
        body["return_logprob"] = True  # the reply is the only source of the logprobs: ask for them
    ctx.stash[_REQUEST] = _Request(metadata, text, wants)


@hookimpl(trylast=True)  # awaited after the trajectory cache recorded the reply
async def post_response(ctx: Any, response: Any) -> None:
    st = ctx.stash.get(_REQUEST)
    if st is None:
        return
    writer: RotatingWriter = ctx.router.registry.get(COMPONENT)
    cache = ctx.router.registry.find(TRAJECTORY_CACHE)
    items = response if isinstance(response, list) else [response]
    prompt_ids = ctx.body.get("input_ids") if isinstance(ctx.body, dict) else None
    for item in items:
        if not isinstance(item, dict):
            continue
        meta = item.get("meta_info") or {}
        record: dict[str, Any] = {"time": time.time(), "request_id": ctx.request_id, "metadata": st.metadata,
                                  "worker_url": getattr(ctx.worker, "url", None),
                                  "finish_reason": meta.get("finish_reason")}
        if cache is not None and st.text is not None and isinstance(item.get("text"), str):
            got = await cache.retrieve(st.text + item["text"])
            record.update(tokens=got["tokens"], loss_mask=got["loss_mask"], rollout_logp=got["rollout_logp"],
                          weight_versions=got["weight_versions"], prompt_tokens=len(got["tokens"]) - len(
                              item.get("output_ids") or []), source="trajectory_cache")
        elif isinstance(prompt_ids, list) and prompt_ids and isinstance(prompt_ids[0], int):
            out = list(item.get("output_ids") or [])
            logps = [t[0] for t in meta.get("output_token_logprobs") or []]
            version = meta.get("weight_version")
            record.update(tokens=list(prompt_ids) + out, loss_mask=[0] * len(prompt_ids) + [1] * len(out),
                          rollout_logp=[0.0] * len(prompt_ids) + logps,
                          weight_versions=[None] * len(prompt_ids) + [version] * len(out),
                          prompt_tokens=len(prompt_ids), source="reply")
        else:
            continue  # a text prompt without a cache, or a batch: nothing exact to log
        writer.write(record)
        if not st.client_wants_logprobs and cache is None:
            for key in ("input_token_logprobs", "output_token_logprobs"):
                meta.pop(key, None)


@hookimpl
def shutdown(router: Any) -> None:
    writer = router.registry.find(COMPONENT)
    if writer is not None:
        writer.close()


__all__ = ["RolloutLoggerConfig", "RotatingWriter"]
