"""radix_tree plugin: the trajectory cache on /generate, and POST /retrieve_from_text.

Per app, ``register_components`` registers one implementation of the ``TRAJECTORY_CACHE`` contract
(``slime_router_core.contracts``): a ``TrajectoryCache``, or with ``--radix-tree-process`` a
``CacheProcessClient`` (the same contract, answered by a child process that owns the cache, ``process.py``).
Everything below uses the contract only; the module's hooks find the component through ``ctx.router``
(nothing is shared between two apps built in one process).

/generate (route "/generate" only; other routes, e.g. openai_compat's, prepare/record themselves):
- pre_request: text prompts -> longest recorded prefix ids + tokens of the new text only; ``text`` is
  replaced by ``input_ids`` in the body that is sent; ``return_logprob`` is forced on (and what the
  client did not ask for is stripped from the reply); ``ctx.stash[AFFINITY]`` is set for the balancer.
  Prompts given as ``input_ids`` pass through unchanged and are recorded under their decoded text.
  Batches (list of texts / ids) and ``n > 1`` are handled per item.
- post_response: records every finished sequence (streams: merged from the chunks when the stream
  completed). Aborted / failed generations record only their prompt. A sequence whose record would add more
  than ``max_record_tokens`` (a quarter of the bound) is not recorded, so that it cannot evict the other live
  trajectories; only then its reply's ``meta_info`` gets ``"trajectory": {"recorded": false, "reason":
  "too_large", "tokens", "max_record_tokens", "message"}`` (for a stream: the sequence's last chunk).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeGuard

import orjson
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

from slime_router_core import HTTPError, hookimpl
from slime_router_core.context import StashKey
from slime_router_core.contracts import (
    AFFINITY,
    TOKENIZER,
    TRAJECTORY_CACHE,
    Affinity,
    CacheUnavailable,
    PreparedPrompt,
)
from slime_router_core.contracts import TrajectoryCache as TrajectoryCacheContract
from slime_router_core.settings import PluginConfig, at_least, option

from .cache import TrajectoryCache, record_tokens, too_large_message
from .process import CacheProcessClient
from .trie import BYTES_PER_TOKEN, DEFAULT_MAX_TOKENS, bound_mb

if TYPE_CHECKING:  # pragma: no cover
    from fastapi import FastAPI

    from slime_router_core.context import RequestContext
    from slime_router_core.registry import ComponentRegistry
    from slime_router_core.router import Router
    from slime_router_core.settings import OptionRegistry

log = logging.getLogger("slime_router.radix_tree")

LOGPROB_KEYS = ("output_token_logprobs", "input_token_logprobs", "output_top_logprobs", "input_top_logprobs",
                "output_token_ids_logprobs", "input_token_ids_logprobs")


def _commit_interval(v: float) -> str | None:
    return None if 0.001 <= v <= 1.0 else "must be between 0.001 and 1 (seconds a crash may lose)"


@dataclass(frozen=True)
class RadixTreeConfig(PluginConfig):
    flag_prefix = "--radix-tree-"
    max_size: int = option(
        DEFAULT_MAX_TOKENS, check=at_least(1),
        help=f"Trajectory cache bound, in tokens (~{BYTES_PER_TOKEN} bytes each: the default {DEFAULT_MAX_TOKENS:,} "
             f"is ~{bound_mb(DEFAULT_MAX_TOKENS)}); least-recently-used trajectories are evicted beyond it. Size it to "
             f"tokens per trajectory x live trajectories. A request that would add more than a quarter of it is "
             f"passed through unrecorded.")
    gc_k: int = option(5, check=at_least(1),
                       help="Keep trajectories of the newest K weight versions (ordered by first observation); "
                            "older ones are garbage-collected when a new version appears.")
    process: bool = option(False, help="Run the trajectory cache (tokenizer, tree, alignment) in its own process, "
                                       "on another core than the router's HTTP work. Needs --hf-checkpoint.")
    snapshot: str | None = option(
        None, flag="--cache-snapshot", aliases=("--radix-tree-snapshot",),
        help="Keep the trajectory cache across restarts and crashes: restore this snapshot file and replay its "
             "write-ahead journal (PATH.journal) at start; write the snapshot atomically on shutdown and every "
             "--cache-snapshot-interval seconds. A crash (kill -9) loses at most the last --cache-journal-interval. "
             "An unusable snapshot (corrupt, truncated, another format or tokenizer) is moved to PATH.bad-<time> "
             "and the cache starts empty.")
    snapshot_interval: float = option(
        300.0, flag="--cache-snapshot-interval", check=at_least(1),
        help="Seconds between snapshots with --cache-snapshot (each one also restarts the journal).")
    journal_interval: float = option(
        1.0, flag="--cache-journal-interval", check=_commit_interval,
        help="Seconds between journal commits (one write + fsync for all records since the last; at most 1) with "
             "--cache-snapshot: what a crash can lose.")


@hookimpl
def add_options(options: OptionRegistry) -> None:
    options.add_config(RadixTreeConfig)


@hookimpl
def required_components() -> list[str]:
    return ["tokenizer"]


@hookimpl
def register_components(registry: ComponentRegistry, router: Router) -> None:
    if registry.has(TRAJECTORY_CACHE):  # another plugin provides the cache (registered tryfirst): use it
        log.info("radix_tree: using the trajectory cache registered by %r", registry.owner(TRAJECTORY_CACHE))
        return
    if not registry.has("tokenizer"):
        return  # start-up then fails with required_components' clear message
    s = router.settings
    config = s.config(RadixTreeConfig)
    max_size, gc_k, verbose = config.max_size, config.gc_k, s.verbose
    cache: TrajectoryCacheContract
    persist: dict[str, Any] = {}
    if config.snapshot:
        persist = {"snapshot": config.snapshot, "snapshot_interval": config.snapshot_interval,
                   "journal_interval": config.journal_interval}
    if config.process:
        if not s.hf_checkpoint:
            raise ValueError("--radix-tree-process needs --hf-checkpoint (the cache process loads the tokenizer "
                             "itself)")
        cache = CacheProcessClient(str(s.hf_checkpoint), max_size=max_size, gc_k=gc_k, verbose=verbose, **persist)
    else:
        cache = TrajectoryCache(registry.get(TOKENIZER), max_size=max_size, gc_k=gc_k, verbose=verbose, **persist)
    registry.register(TRAJECTORY_CACHE, cache, owner="radix_tree")
    log.info("radix_tree: trajectory cache bound %s tokens (~%s at ~%d bytes per token; "
             "--radix-tree-max-size); a request adding more than %s tokens is passed through unrecorded",
             f"{max_size:,}", bound_mb(max_size), BYTES_PER_TOKEN, f"{cache.max_record_tokens:,}")


@hookimpl
async def startup(router: Router) -> None:
    cache = router.registry.find(TRAJECTORY_CACHE)
    if cache is not None:
        await cache.start()


@hookimpl
async def shutdown(router: Router) -> None:
    cache = router.registry.find(TRAJECTORY_CACHE)
    if cache is not None:
        await cache.close()


class RetrieveRequest(BaseModel):
    """Body of ``POST /retrieve_from_text``."""

    model_config = ConfigDict(extra="forbid")
    text: StrictStr = Field(min_length=1, description="The trajectory text: prompt + generated text, as recorded")
    strict: StrictBool = Field(False, description="Refuse (404 never recorded, 410 evicted) instead of "
                                                  "tokenizing unrecorded text afresh with loss_mask 0")


class RetrieveResponse(BaseModel):
    """What the trainer needs for a trajectory text: one entry per token in each list."""

    tokens: list[int]
    response: str = Field(description="The text asked for")
    loss_mask: list[int] = Field(description="1 for generated tokens, 0 for prompt and freshly tokenized ones")
    rollout_logp: list[float] = Field(description="The engine's logprob of each generated token (0.0 elsewhere)")
    token_length: int
    loss_mask_length: int
    weight_versions: list[str | None] = Field(description="The weight version that generated each token")
    exact_tokens: int = Field(description="Tokens served as recorded")
    fresh_tokens: int = Field(description="Tokens of unrecorded text, tokenized now (loss_mask 0)")
    generated_tokens: int
    recorded_chars: int
    worker_url: str | None
    evicted: bool = Field(description="Part of the text was recorded but evicted (or GC'd) before this retrieval")
    evicted_at_char: int | None = None
    evicted_generated_tokens: int | None = None
    warning: str | None = None


class CacheStats(BaseModel):
    """The trajectory cache's counters (the in-process cache's keys; an implementation may add its own, e.g.
    ``process`` for ``--radix-tree-process``)."""

    model_config = ConfigDict(extra="allow")
    total_entries: int = Field(description="Trie nodes")
    records: int
    cache_hits: int = Field(description="Prompts that started with a recorded prefix")
    cache_misses: int
    hit_rate: float
    hit_tokens: int
    lookup_tokens: int
    token_hit_rate: float
    cur_cache_size: int = Field(description="Tokens held")
    max_cache_size: int = Field(description="The bound, in tokens (--radix-tree-max-size)")
    cache_size_bytes: int
    evictions: int
    gc_runs: int
    versions: list[str] = Field(description="Weight versions held, oldest first")
    retrievals: int
    audit: dict[str, int] = Field(description="Generated tokens recorded / refused / served exactly; fresh tokens "
                                              "served, by cause")
    max_record_tokens: int
    records_too_large: int
    evicted_unretrieved: int
    evicted_unretrieved_generated_tokens: int


@hookimpl
def register_routes(app: FastAPI, router: Router) -> None:
    cache = router.registry.find(TRAJECTORY_CACHE)
    if cache is None:
        return

    # The answer is serialized with orjson (long trajectories); RetrieveResponse documents it (a test checks it).
    @app.post("/retrieve_from_text", response_class=Response, responses={200: {"model": RetrieveResponse}})
    async def retrieve_from_text(body: RetrieveRequest) -> Response:
        """Recorded tokens, loss mask, rollout logprobs and weight versions for a trajectory text.

        Text never produced through the router is tokenized fresh with loss_mask 0 and counted in
        ``fresh_tokens``; with ``strict`` the answer is 404 instead. Text that was recorded but has been evicted
        (or GC'd) since is also tokenized fresh, and the answer says so: ``"evicted": true``, ``evicted_at_char``,
        ``evicted_generated_tokens``, ``warning``; with ``strict`` the answer is 410 (code "evicted").
        """
        try:
            result = await cache.retrieve(body.text, body.strict)
        except CacheUnavailable as e:
            raise HTTPError(503, f"The trajectory cache is unavailable ({e}); it is being restarted, and "
                                 f"trajectories recorded before are lost.") from None
        return Response(orjson.dumps(result), media_type="application/json")

    @app.get("/radix_tree/stats", response_class=Response, responses={200: {"model": CacheStats}})
    async def radix_tree_stats() -> Response:
        """Trajectory cache statistics (entries, hits/misses per lookup, size, evictions, GC, versions)."""
        await cache.refresh()
        return Response(orjson.dumps(cache.stats()), media_type="application/json")


@dataclass
class _ReqState:
    prepared: list[PreparedPrompt]  # one per prompt
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


_REQUEST: StashKey[_ReqState] = StashKey("radix_tree.request")


def _cache_for(ctx: RequestContext) -> TrajectoryCacheContract | None:
    if ctx.route != "/generate" or ctx.router is None:
        return None
    return ctx.router.registry.find(TRAJECTORY_CACHE)


def _check_vocabulary(ctx: RequestContext, prompts: list[list[int]], batched: bool) -> None:
    """Prompt ids outside the tokenizer's vocabulary: 400 naming the first one (min/max: C loops)."""
    n = ctx.router.vocab_size if ctx.router is not None else None
    if n is None:
        return
    for k, ids in enumerate(prompts):
        if ids and (min(ids) < 0 or max(ids) >= n):
            i, bad = next((i, t) for i, t in enumerate(ids) if not 0 <= t < n)
            where = f"input_ids[{k}][{i}]" if batched else f"input_ids[{i}]"
            raise HTTPError(400, f"{where} = {bad} is outside the vocabulary of the router's tokenizer (0 to "
                                 f"{n - 1}).", param="input_ids")


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
            _check_vocabulary(ctx, [ids], False)
            prepared, batch = [await cache.prepare_ids(ids)], False
        elif isinstance(ids, list) and ids and all(_is_int_list(x) for x in ids):
            _check_vocabulary(ctx, ids, True)
            prepared, batch = [await cache.prepare_ids(x) for x in ids], True
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
    ctx.stash[_REQUEST] = _ReqState(prepared, n, batch, want)
    first = prepared[0]
    if first.worker_url and AFFINITY not in ctx.stash:
        ctx.stash[AFFINITY] = Affinity(first.worker_url, first.cached_tokens, len(first.input_ids))
    if ctx.stream:
        ctx.inspect_stream = True


@hookimpl
def stream_chunk(ctx: RequestContext, chunk: dict) -> Awaitable[None] | None:
    st = ctx.stash.get(_REQUEST)
    cache = _cache_for(ctx)
    if st is None or cache is None or not isinstance(chunk, dict):
        return None
    meta = chunk.get("meta_info")
    saved = dict(chunk)
    if isinstance(meta, dict):
        saved["meta_info"] = dict(meta)
    st.saved_chunks.append(saved)
    if not st.want_logprob:
        _strip_logprobs(chunk)
    # Record as soon as a sequence finishes, *before* its last chunk reaches the client (the core awaits what
    # this hook returns before relaying the chunk): a client that sends the next turn right after the stream
    # ends must find this turn recorded.
    if isinstance(meta, dict) and meta.get("finish_reason") is not None and "error" not in chunk:
        idx = int(chunk.get("index", 0) or 0) if st.batch else 0
        if idx not in st.recorded:
            st.recorded.add(idx)
            return _record_stream_group(cache, ctx, st, idx, chunk)
    return None


def _not_recorded(reply: dict, tokens: int, limit: int) -> None:
    """Tell the client its trajectory was not recorded (the rare case: other replies are left as they are)."""
    meta = reply.get("meta_info")
    if not isinstance(meta, dict):
        meta = reply["meta_info"] = {}
    meta["trajectory"] = {"recorded": False, "reason": "too_large", "tokens": tokens, "max_record_tokens": limit,
                          "message": f"This trajectory was {too_large_message(tokens, limit)}."}


async def _record_stream_group(cache: TrajectoryCacheContract, ctx: RequestContext, st: _ReqState, idx: int,
                              chunk: dict) -> None:
    from slime_router_core.sglang import merge_stream

    if st.batch and st.n == 0:
        return
    group = [c for c in st.saved_chunks if not st.batch or int(c.get("index", 0) or 0) == idx]
    k = idx // max(1, st.n)
    if k >= len(st.prepared):
        return
    try:
        merged = merge_stream(group)
        if not await cache.record(st.prepared[k], merged, ctx.worker.url if ctx.worker else None):
            _not_recorded(chunk, record_tokens(st.prepared[k], merged), cache.max_record_tokens)
    except CacheUnavailable:
        pass
    except Exception:
        log.exception("radix_tree: recording a streamed trajectory failed")


@hookimpl
async def post_response(ctx: RequestContext, response: Any) -> None:
    st = ctx.stash.get(_REQUEST)
    cache = _cache_for(ctx)
    if st is None or cache is None or ctx.stream:  # streams: recorded in stream_chunk as each sequence finished
        return
    worker_url = ctx.worker.url if ctx.worker is not None else None
    items = response if isinstance(response, list) else [response]
    try:
        if st.batch and st.n == 0:
            return  # per-prompt n differs: the reply order is ambiguous, do not guess
        # the worker's bytes as they came: a cache in another process takes them without re-serializing
        refused = await cache.record_replies(st.prepared, items, st.n, worker_url, ctx.raw_response)
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
