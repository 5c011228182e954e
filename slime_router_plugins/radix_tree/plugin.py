"""radix_tree plugin: the trajectory cache on /generate, and POST /retrieve_from_text.

Per app, ``register_components`` builds one ``TrajectoryCache`` (component ``"radix_tree"``); the
module's hooks find it through ``ctx.router`` (nothing is shared between two apps built in one process).
With ``--radix-tree-process`` the component is a ``CacheProcessClient`` instead: the same calls, answered
by a child process that owns the cache (``process.py``); started and stopped with the app.

/generate (route "/generate" only; other routes, e.g. openai_compat's, prepare/record themselves):
- pre_request: text prompts -> longest recorded prefix ids + tokens of the new text only; ``text`` is
  replaced by ``input_ids`` in the body that is sent; ``return_logprob`` is forced on (and what the
  client did not ask for is stripped from the reply); ``ctx.state["affinity_worker"]`` is set.
  Prompts given as ``input_ids`` pass through unchanged and are recorded under their decoded text.
  Batches (list of texts / ids) and ``n > 1`` are handled per item.
- post_response: records every finished sequence (streams: merged from the chunks when the stream
  completed). Aborted / failed generations record only their prompt. A sequence whose record would add more
  than ``max_record_tokens`` (a quarter of the bound) is not recorded, so that it cannot evict the other live
  trajectories; only then its reply's ``meta_info`` gets ``"trajectory": {"recorded": false, "reason":
  "too_large", "tokens", "max_record_tokens", "message"}`` (for a stream: the sequence's last chunk).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeGuard

import orjson
from fastapi import Request
from fastapi.responses import Response

from slime_router_core import HTTPError, hookimpl, resolve

from .cache import OFFLOAD_CHARS, TrajectoryCache, record_tokens, reply_pairs, too_large_message
from .process import CacheProcessClient, CacheUnavailable
from .trie import BYTES_PER_TOKEN, DEFAULT_MAX_TOKENS, bound_mb

if TYPE_CHECKING:  # pragma: no cover
    from fastapi import FastAPI

    from slime_router_core.context import RequestContext
    from slime_router_core.registry import ComponentRegistry
    from slime_router_core.router import Router
    from slime_router_core.settings import OptionRegistry

log = logging.getLogger("slime_router.radix_tree")

STATE_KEY = "radix_tree"
LOGPROB_KEYS = ("output_token_logprobs", "input_token_logprobs", "output_top_logprobs", "input_top_logprobs",
                "output_token_ids_logprobs", "input_token_ids_logprobs")


@hookimpl
def add_options(options: OptionRegistry) -> None:
    options.add("--radix-tree-max-size", type=int, default=DEFAULT_MAX_TOKENS,
                help=f"Trajectory cache bound, in tokens (~{BYTES_PER_TOKEN} bytes each: the default "
                     f"{DEFAULT_MAX_TOKENS:,} is ~{bound_mb(DEFAULT_MAX_TOKENS)}); least-recently-used "
                     f"trajectories are evicted beyond it. Size it to tokens per trajectory x live trajectories. "
                     f"A request that would add more than a quarter of it is passed through unrecorded.")
    options.add("--radix-tree-gc-k", type=int, default=5,
                help="Keep trajectories of the newest K weight versions (ordered by first observation); "
                     "older ones are garbage-collected when a new version appears.")
    options.add("--radix-tree-process", is_flag=True, type=bool, default=False,
                help="Run the trajectory cache (tokenizer, tree, alignment) in its own process, on another core "
                     "than the router's HTTP work. Needs --hf-checkpoint.")


@hookimpl
def required_components() -> list[str]:
    return ["tokenizer"]


@hookimpl
def register_components(registry: ComponentRegistry, router: Router) -> None:
    if not registry.has("tokenizer"):
        return  # start-up then fails with required_components' clear message
    s = router.settings
    max_size = int(s.get("radix_tree_max_size", DEFAULT_MAX_TOKENS) or DEFAULT_MAX_TOKENS)
    gc_k, verbose = int(s.get("radix_tree_gc_k", 5) or 5), bool(s.get("verbose", False))
    cache: TrajectoryCache | CacheProcessClient
    if s.get("radix_tree_process", False):
        if not s.hf_checkpoint:
            raise ValueError("--radix-tree-process needs --hf-checkpoint (the cache process loads the tokenizer "
                             "itself)")
        cache = CacheProcessClient(str(s.hf_checkpoint), max_size=max_size, gc_k=gc_k, verbose=verbose)
    else:
        cache = TrajectoryCache(registry.get("tokenizer"), max_size=max_size, gc_k=gc_k, verbose=verbose)
    registry.register("radix_tree", cache, owner="radix_tree")
    log.info("radix_tree: trajectory cache bound %s tokens (~%s at ~%d bytes per token; "
             "--radix-tree-max-size); a request adding more than %s tokens is passed through unrecorded",
             f"{max_size:,}", bound_mb(max_size), BYTES_PER_TOKEN, f"{cache.max_record_tokens:,}")


def _cache(router: Router) -> TrajectoryCache:
    return router.registry.get("radix_tree")


@hookimpl
async def startup(router: Router) -> None:
    cache = router.registry.find("radix_tree")
    if isinstance(cache, CacheProcessClient):
        await cache.start()


@hookimpl
async def shutdown(router: Router) -> None:
    cache = router.registry.find("radix_tree")
    if isinstance(cache, CacheProcessClient):
        await cache.close()


@hookimpl
def register_routes(app: FastAPI, router: Router) -> None:
    if not router.registry.has("radix_tree"):
        return

    @app.post("/retrieve_from_text")
    async def retrieve_from_text(request: Request) -> Response:
        """Recorded tokens, loss mask, rollout logprobs and weight versions for a trajectory text.

        Body ``{"text": str, "strict": bool = false}``. Text never produced through the router is tokenized
        fresh with loss_mask 0 and counted in ``fresh_tokens``; with ``strict`` the answer is 404 instead. Text
        that was recorded but has been evicted (or GC'd) since is also tokenized fresh, and the answer says so:
        ``"evicted": true``, ``evicted_at_char``, ``evicted_generated_tokens``, ``warning``; with ``strict`` the
        answer is 410 (code "evicted"). ``"evicted"`` is in every answer.
        """
        raw = await request.body()
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError as e:
            raise HTTPError(400, f"Malformed JSON body: {e}") from None
        if not isinstance(body, dict):
            raise HTTPError(400, 'Body must be a JSON object like {"text": "...", "strict": false}')
        text = body.get("text")
        if not isinstance(text, str):
            raise HTTPError(400, f"'text' must be a non-empty string (got {type(text).__name__})", param="text")
        if not text:
            raise HTTPError(400, "'text' must be a non-empty string", param="text")
        strict = body.get("strict", False)
        if not isinstance(strict, bool):
            raise HTTPError(400, "'strict' must be a boolean", param="strict")
        cache = _cache(router)
        if isinstance(cache, CacheProcessClient):
            try:
                result = await cache.retrieve(text, strict)
            except CacheUnavailable as e:
                raise HTTPError(503, f"The trajectory cache is unavailable ({e}); it is being restarted, and "
                                     f"trajectories recorded before are lost.") from None
        elif len(text) > OFFLOAD_CHARS:
            result = await asyncio.to_thread(cache.retrieve, text, strict)
        else:
            result = cache.retrieve(text, strict)
        return Response(orjson.dumps(result), media_type="application/json")

    @app.get("/radix_tree/stats")
    async def radix_tree_stats() -> dict:
        """Trajectory cache statistics (entries, hits/misses per lookup, size, evictions, GC, versions)."""
        cache = _cache(router)
        if isinstance(cache, CacheProcessClient):
            await cache.refresh()
        return cache.stats()


@dataclass
class _ReqState:
    prepared: list[Any]  # one PreparedPrompt per prompt
    n: int  # samples per prompt
    batch: bool
    want_logprob: bool
    saved_chunks: list[dict] = field(default_factory=list)
    recorded: set[int] = field(default_factory=set)


def _strip_logprobs(obj: Any) -> None:
    if isinstance(obj, dict):
        meta = obj.get("meta_info")
        if isinstance(meta, dict):
            for k in LOGPROB_KEYS:
                meta.pop(k, None)


def _is_int_list(v: Any) -> TypeGuard[list[int]]:
    return isinstance(v, list) and bool(v) and all(type(x) is int for x in v)


# --- hooks: /generate only (other routes, e.g. openai_compat's, prepare and record themselves) ------------


def _cache_for(ctx: RequestContext) -> TrajectoryCache | None:
    if ctx.route != "/generate" or ctx.router is None:
        return None
    return ctx.router.registry.find("radix_tree")


@hookimpl
async def pre_request(ctx: RequestContext) -> None:
    cache = _cache_for(ctx)
    body = ctx.body
    if cache is None or not isinstance(body, dict):
        return
    text, ids = body.get("text"), body.get("input_ids")
    sp = body.get("sampling_params")
    if isinstance(sp, list):
        ns = [int((x or {}).get("n", 1) or 1) if isinstance(x, dict) else 1 for x in sp]
        n = ns[0] if ns and all(v == ns[0] for v in ns) else 0
    else:
        n = int((sp or {}).get("n", 1) or 1) if isinstance(sp, dict) else 1
    try:
        if isinstance(text, str):
            prepared, batch = [await cache.prepare(text)], False
            body.pop("text")
            body["input_ids"] = list(prepared[0].input_ids)
        elif isinstance(text, list) and text and all(isinstance(t, str) for t in text):
            prepared, batch = [await cache.prepare(t) for t in text], True
            body.pop("text")
            body["input_ids"] = [list(p.input_ids) for p in prepared]
        elif _is_int_list(ids):
            prepared, batch = [await resolve(cache.prepare_ids(ids))], False
        elif isinstance(ids, list) and ids and all(_is_int_list(x) for x in ids):
            prepared, batch = [await resolve(cache.prepare_ids(x)) for x in ids], True
        else:
            return  # input_embeds etc.: not ours
    except HTTPError:
        raise
    except CacheUnavailable:  # the cache process is being restarted (logged once): serve, unrecorded
        return
    except Exception:  # a cache bug must not break generation: pass the request through untouched
        log.exception("radix_tree: preparing the prompt failed; request passed through unrecorded")
        return
    rl = body.get("return_logprob")
    want = any(bool(x) for x in rl) if isinstance(rl, list) else bool(rl)
    body["return_logprob"] = True
    if n > 1:
        batch = True
    ctx.state[STATE_KEY] = _ReqState(prepared, n, batch, want)
    if prepared[0].worker_url and "affinity_worker" not in ctx.state:
        ctx.state["affinity_worker"] = prepared[0].worker_url
        ctx.state["affinity_tokens"] = prepared[0].cached_tokens
    if ctx.stream:
        ctx.inspect_stream = True


@hookimpl
def stream_chunk(ctx: RequestContext, chunk: dict) -> None:
    st: _ReqState | None = ctx.state.get(STATE_KEY)
    cache = _cache_for(ctx)
    if st is None or cache is None or not isinstance(chunk, dict):
        return
    meta = chunk.get("meta_info")
    saved = dict(chunk)
    if isinstance(meta, dict):
        saved["meta_info"] = dict(meta)
    st.saved_chunks.append(saved)
    if not st.want_logprob:
        _strip_logprobs(chunk)
    # Record as soon as a sequence finishes, *before* its last chunk reaches the client: a client
    # that sends the next turn right after the stream ends must find this turn recorded.
    if isinstance(meta, dict) and meta.get("finish_reason") is not None and "error" not in chunk:
        idx = int(chunk.get("index", 0) or 0) if st.batch else 0
        if idx not in st.recorded:
            st.recorded.add(idx)
            _record_stream_group(cache, ctx, st, idx, chunk)


def _not_recorded(reply: dict, tokens: int, limit: int) -> None:
    """Tell the client its trajectory was not recorded (the rare case: other replies are left as they are)."""
    meta = reply.get("meta_info")
    if not isinstance(meta, dict):
        meta = reply["meta_info"] = {}
    meta["trajectory"] = {"recorded": False, "reason": "too_large", "tokens": tokens, "max_record_tokens": limit,
                          "message": f"This trajectory was {too_large_message(tokens, limit)}."}


def _record_stream_group(cache: TrajectoryCache, ctx: RequestContext, st: _ReqState, idx: int, chunk: dict
                         ) -> None:
    from slime_router_core.sglang import merge_stream

    if st.batch and st.n == 0:
        return
    group = [c for c in st.saved_chunks if not st.batch or int(c.get("index", 0) or 0) == idx]
    k = idx // max(1, st.n)
    if k >= len(st.prepared):
        return
    try:
        merged = merge_stream(group)
        if not cache.record(st.prepared[k], merged, ctx.worker.url if ctx.worker else None):
            _not_recorded(chunk, record_tokens(st.prepared[k], merged), cache.max_record_tokens)
    except CacheUnavailable:
        pass
    except Exception:
        log.exception("radix_tree: recording a streamed trajectory failed")


@hookimpl
async def post_response(ctx: RequestContext, response: Any) -> None:
    st: _ReqState | None = ctx.state.get(STATE_KEY)
    cache = _cache_for(ctx)
    if st is None or cache is None or ctx.stream:  # streams: recorded in stream_chunk as each sequence finished
        return
    worker_url = ctx.worker.url if ctx.worker is not None else None
    items = response if isinstance(response, list) else [response]
    try:
        if st.batch and st.n == 0:
            return  # per-prompt n differs: the reply order is ambiguous, do not guess
        if isinstance(cache, CacheProcessClient):  # the worker's bytes go to the cache process as they came
            refused = cache.record_replies(st.prepared, ctx.raw_response if ctx.raw_response is not None
                                           else response, worker_url, st.n, items)
        else:
            refused = []
            for prepared, reply in reply_pairs(st.prepared, items, st.n):
                if not await cache.record_async(prepared, reply, worker_url):
                    refused.append((reply, record_tokens(prepared, reply)))
        for reply, tokens in refused:
            _not_recorded(reply, tokens, cache.max_record_tokens)
    except CacheUnavailable:
        pass
    except Exception:
        log.exception("radix_tree: recording a trajectory failed")
    finally:
        if not st.want_logprob:
            for item in items:
                _strip_logprobs(item)
