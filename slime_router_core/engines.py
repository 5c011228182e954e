"""Which engine each worker runs, and the adapter between the router's SGLang wire format and the others.

SGLang needs no adapter: the router's canonical request and reply *are* SGLang's ``/generate`` format, so an
SGLang worker (``worker.engine is None``) is served exactly as before, byte for byte. An engine plugin registers an
``contracts.Engine`` here; a worker gets one when it is added:

- ``?engine=NAME`` on ``/add_worker`` (or ``engine=NAME`` in its JSON, or ``--worker-url URL#engine=NAME``);
- otherwise, when some engine is registered, the worker's ``GET /openapi.json`` is read and the first engine whose
  ``detect`` accepts its paths wins (an SGLang server lists ``/generate``; a worker that does not answer, or lists
  nothing an engine recognises, is SGLang).

Mixed fleets: every worker serves every request it can. A /generate body with a feature an engine lacks
(``Engine.unsupported``: e.g. ``input_embeds``) only goes to workers that have it; if none is available the answer is
400 naming the feature and the engine.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson

from .contracts import Engine
from .errors import HTTPError

if TYPE_CHECKING:  # pragma: no cover
    from .upstream import StreamReply
    from .workers import Worker

log = logging.getLogger("slime_router")

SGLANG = "sglang"
PROBE_TIMEOUT = 5.0


class Engines:
    """The engines plugins registered, by name (SGLang is implicit)."""

    def __init__(self) -> None:
        self.by_name: dict[str, Engine] = {}

    def register(self, engine: Engine) -> None:
        if not isinstance(engine, Engine):
            raise TypeError(f"{engine!r} does not implement slime_router_core.contracts.Engine")
        if engine.name == SGLANG or engine.name in self.by_name:
            raise ValueError(f"an engine named {engine.name!r} is already registered")
        self.by_name[engine.name] = engine

    def names(self) -> list[str]:
        return [SGLANG, *self.by_name]

    def named(self, name: str) -> Engine | None:
        """The engine ``name`` (None for SGLang); 400 for an unknown name."""
        if name == SGLANG:
            return None
        engine = self.by_name.get(name)
        if engine is None:
            raise HTTPError(400, f"Unknown engine {name!r}: the engines are {self.names()} (an engine other than "
                                 f"sglang comes from a plugin, e.g. --plugin vllm).", param="engine")
        return engine

    async def detect(self, url: str, session: aiohttp.ClientSession) -> Engine | None:
        """The engine of the worker at ``url`` from its ``/openapi.json`` (None: SGLang)."""
        if not self.by_name:
            return None
        try:
            async with session.get(url + "/openapi.json",
                                   timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT)) as resp:
                doc = orjson.loads(await resp.read()) if resp.status == 200 else {}
        except (aiohttp.ClientError, OSError, TimeoutError, orjson.JSONDecodeError) as e:
            log.warning("could not read %s/openapi.json to tell its engine (%s: %s); serving it as sglang (add it "
                        "with ?engine=NAME to say which)", url, type(e).__name__, e)
            return None
        paths = frozenset((doc.get("paths") or {}) if isinstance(doc, dict) else ())
        if "/generate" in paths:
            return None
        for engine in self.by_name.values():
            if engine.detect(paths):
                return engine
        return None


class EngineStream:
    """A streamed answer of a non-SGLang worker, seen as SGLang's stream (``StreamReply``'s interface)."""

    __slots__ = ("reply", "chunks")

    def __init__(self, reply: StreamReply, chunks: AsyncIterator[bytes]) -> None:
        self.reply = reply
        self.chunks = chunks

    @property
    def status(self) -> int:
        return self.reply.status

    def iter_chunks(self) -> AsyncIterator[bytes]:
        return self.chunks

    async def read(self) -> bytes:
        return await self.reply.read()

    def release(self) -> None:
        self.reply.release()


def split_engine(url: str) -> tuple[str, str | None]:
    """``URL#engine=NAME`` (the ``--worker-url`` form) -> (URL, NAME); a URL without it -> (URL, None)."""
    base, sep, frag = url.partition("#")
    if sep and frag.startswith("engine="):
        return base, frag[len("engine="):]
    return url, None


def refusal(worker_engines: list[tuple[Worker, Engine]], body: dict[str, Any]) -> str | None:
    """Why none of these non-SGLang workers can serve ``body`` (for the 400), or None if one can."""
    reasons = []
    for _, engine in worker_engines:
        why = engine.unsupported(body)
        if why is None:
            return None
        reasons.append(f"{engine.name}: {why}")
    return "; ".join(dict.fromkeys(reasons))
