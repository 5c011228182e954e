"""The OpenAI-compatible service: one instance per router app (registered as component "openai_compat")."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from jinja2 import TemplateError

from slime_router_core import HTTPError, RequestContext
from slime_router_core.contracts import (
    AFFINITY,
    SESSION_KEY,
    TOKENIZER,
    TRAJECTORY_CACHE,
    Affinity,
    CacheUnavailable,
    PreparedPrompt,
    TrajectoryCache,
)
from slime_router_core.sse import DONE
from slime_router_core.sse import encode_event as sse
from slime_router_core.tokenizers import bytes_to_unicode

from .config import OpenAIConfig, served_model_name
from .parse import OutputParser, ParsedOutput, collect, parse_output
from .render import (
    CAUSES,
    CLIENT_EDIT,
    ROUTER_NORMALISATION,
    TEMPLATE_RULE,
    UNKNOWN_ORIGIN,
    HistoryEntry,
    HistoryStore,
    Renderer,
    SpliceError,
    text_digest,
)
from .schema import bad, validate_retrieve
from .stream import ChoiceAccumulator, IncrementalDecoder

try:  # the lead's shared helper; a local equivalent is used until it exists
    from slime_router_core.sglang import merge_stream
except ImportError:  # pragma: no cover
    merge_stream = None  # type: ignore[assignment]

log = logging.getLogger("slime_router.openai_compat")

SYSTEM_FINGERPRINT = "slime-router"


def _now() -> int:
    return int(time.time())




class TokenText:
    """Token id → (text, bytes) for OpenAI logprobs (byte-level BPE pieces turned back into bytes)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self.cache: dict[int, tuple[str, list[int]]] = {}
        self.byte_decoder = {v: k for k, v in bytes_to_unicode().items()}
        self.added = {int(k) for k in getattr(tokenizer, "added_tokens_decoder", {}) or {}}

    def __call__(self, tid: int) -> tuple[str, list[int]]:
        got = self.cache.get(tid)
        if got is None:
            piece = self.tok.convert_ids_to_tokens(int(tid))
            if piece is None:
                b = b""
            elif tid in self.added:
                b = piece.encode()
            else:
                try:
                    b = bytes(self.byte_decoder[c] for c in piece)
                except KeyError:
                    b = piece.encode()
            got = self.cache[tid] = (b.decode("utf-8", errors="replace"), list(b))
        return got


def finish_reason_of(meta: dict, has_tool_calls: bool) -> tuple[str, Any]:
    fr = meta.get("finish_reason")
    if not isinstance(fr, dict):
        return ("stop" if fr is None else str(fr)), None
    kind = fr.get("type")
    matched = fr.get("matched")
    if kind == "length":
        return "length", None
    if kind == "abort":
        return "abort", None
    return ("tool_calls" if has_tool_calls else "stop"), matched


def _first_difference(a: str, b: str) -> int:
    """Where ``a`` and ``b`` first differ (the shorter one's length if one is a prefix of the other)."""
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


class Counters(dict):
    def inc(self, key: str, n: int = 1) -> None:
        self[key] = self.get(key, 0) + n


class OpenAIService:
    def __init__(self, router: Any) -> None:
        self.router = router
        self.settings = router.settings
        self.tokenizer = router.registry.get(TOKENIZER)
        self.model_name = served_model_name(self.settings)
        config = self.settings.config(OpenAIConfig)
        self.history_mode = config.history
        self.reasoning_parser = config.reasoning_parser != "none"
        self.tool_parser = config.tool_parser != "none"
        self.default_max_tokens = config.default_max_tokens
        self.store = HistoryStore(config.history_size)
        self._history_listeners: list[Callable[[list[Any]], None]] = []  # contracts.HistoryTransfer
        self.renderer = Renderer(self.tokenizer, self.store, self.history_mode)
        self.token_text = TokenText(self.tokenizer)
        self.counters = Counters(chat_requests=0, completion_requests=0, streams=0, client_disconnects=0,
                                 recorded=0, not_recorded_incomplete=0, not_recorded_too_large=0, record_errors=0,
                                 retrievals=0,
                                 history_rewritten=0, rewritten_turns=0, unverified_turns=0, spliced_turns=0,
                                 audit_generated_tokens_exact=0)
        for cause in CAUSES:  # per cause: assistant turns of retrieved conversations not exact, their generated tokens
            self.counters[f"rewritten_turns_{cause}"] = 0
            self.counters[f"audit_generated_tokens_{cause}"] = 0
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        self._encode = (lambda t: backend.encode(t, add_special_tokens=False).ids) if backend is not None else \
            (lambda t: self.tokenizer.encode(t, add_special_tokens=False))

    # --- shared -------------------------------------------------------------------------------

    @property
    def cache(self) -> TrajectoryCache | None:
        return self.router.registry.find(TRAJECTORY_CACHE)

    def stats(self) -> dict[str, Any]:
        return {**self.counters, "history_entries": len(self.store), "history_mode": self.history_mode,
                "model": self.model_name}

    async def tokenize(self, text: str) -> tuple[list[int], PreparedPrompt | None]:
        cache = self.cache
        if cache is not None:
            try:
                prepared = await cache.prepare(text)
            except CacheUnavailable:  # the cache process is being restarted: serve, unrecorded
                return self._encode(text), None
            return list(prepared.input_ids), prepared
        return self._encode(text), None

    def sampling_params(self, body: dict) -> dict[str, Any]:
        sp: dict[str, Any] = {}
        for key in ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                    "repetition_penalty", "stop_token_ids", "n", "ignore_eos", "regex", "ebnf"):
            if body.get(key) is not None:
                sp[key] = body[key]
        mt = body.get("max_completion_tokens")
        if mt is None:
            mt = body.get("max_tokens")
        if mt is None:
            mt = self.default_max_tokens
        if mt is not None:
            sp["max_new_tokens"] = int(mt)
        if body.get("min_tokens") is not None:
            sp["min_new_tokens"] = body["min_tokens"]
        stop = body.get("stop")
        if stop:
            sp["stop"] = [stop] if isinstance(stop, str) else list(stop)
        if body.get("seed") is not None:
            sp["sampling_seed"] = body["seed"]
        if body.get("logit_bias"):
            sp["logit_bias"] = {str(k): float(v) for k, v in body["logit_bias"].items()}
        rf = body.get("response_format")
        if isinstance(rf, dict):
            if rf.get("type") == "json_object":
                sp["json_schema"] = json.dumps({"type": "object"})
            elif rf.get("type") == "json_schema":
                schema = (rf.get("json_schema") or {}).get("schema") or {}
                sp["json_schema"] = json.dumps(schema)
        return sp

    def _context(self, route: str, body: dict, gen: dict, prepared: Any, headers: dict) -> RequestContext:
        ctx = RequestContext(route, gen, headers=headers, upstream_path="/generate")
        if body.get("user"):
            ctx.stash[SESSION_KEY] = str(body["user"])
        if prepared is not None and prepared.worker_url:
            ctx.stash[AFFINITY] = Affinity(prepared.worker_url, prepared.cached_tokens, len(prepared.input_ids))
        return ctx

    async def record(self, prepared: Any, reply: dict, worker_url: str | None) -> bool:
        """Record one finished generation in the trajectory cache (never an aborted/unfinished one)."""
        cache = self.cache
        if cache is None or prepared is None:
            return False
        fr = (reply.get("meta_info") or {}).get("finish_reason")
        if not isinstance(fr, dict) or fr.get("type") not in ("stop", "length"):
            self.counters.inc("not_recorded_incomplete")
            return False
        try:
            done = await cache.record(prepared, reply, worker_url)
        except CacheUnavailable:
            return False
        except Exception:
            self.counters.inc("record_errors")
            log.exception("recording a trajectory failed")
            return False
        if done is False:  # refused: one request may add at most a quarter of the cache's bound
            self.counters.inc("not_recorded_too_large")
            return False
        self.counters.inc("recorded")
        return True

    @staticmethod
    def _advance(job: Any, st: dict, obj: dict) -> tuple[int, int, bool, dict | None, str]:
        """Feed one stream chunk to a choice: (ids before, ids after, finished, merged reply, new text)."""
        acc: ChoiceAccumulator = st["acc"]
        before, after = acc.update(obj)
        finished = acc.finish_reason is not None
        if finished:
            merged = job.merge(acc.chunks)
            return before, after, True, merged, st["dec"].finish(merged.get("text"), acc.ids)
        return before, after, False, None, st["dec"].feed(acc.ids)

    def logprob_entries(self, ids: list[int], lps: list, tops: list | None, want_top: int) -> list[dict]:
        out = []
        for k, (tid, lp) in enumerate(zip(ids, lps)):
            text, b = self.token_text(tid)
            e: dict[str, Any] = {"token": text, "bytes": b, "logprob": lp if lp is not None else 0.0,
                                 "top_logprobs": []}
            if want_top and tops is not None and k < len(tops) and tops[k]:
                for t in tops[k][:want_top]:
                    tt, tb = self.token_text(int(t[1]))
                    e["top_logprobs"].append({"token": tt, "bytes": tb, "logprob": t[0] if t[0] is not None else 0.0})
            out.append(e)
        return out

    @staticmethod
    def _replies(reply: Any) -> list[dict]:
        if isinstance(reply, list):
            return sorted(reply, key=lambda r: int(r.get("index", 0) or 0)) if all(
                isinstance(r, dict) and "index" in r for r in reply) else list(reply)
        return [reply]

    async def _generate(self, ctx: RequestContext) -> Any:
        try:
            return await self.router.generate(ctx)
        except HTTPError as e:
            self.router.finish(ctx, e.status, e.message)
            raise
        except Exception as e:
            self.router.finish(ctx, 502, f"{type(e).__name__}: {e}")
            raise HTTPError(502, f"Upstream call failed: {type(e).__name__}: {e}", type="upstream_error") from e

    # --- /v1/chat/completions -------------------------------------------------------------------

    def render_prompt(self, body: dict, mode: str) -> tuple[str, list | None]:
        tools = body.get("tools") or None
        if body.get("tool_choice") == "none":
            tools = None
        try:
            text = self.renderer.render(body["messages"], tools, body.get("chat_template_kwargs"),
                                        add_generation_prompt=True, mode=mode)
        except (TemplateError, SpliceError, TypeError, ValueError) as e:
            raise bad(f"The chat template could not render these messages: {e}", "messages") from e
        return text, tools

    async def chat(self, body: dict, headers: dict) -> Any:
        self.counters.inc("chat_requests")
        mode = body.get("history_mode") or self.history_mode
        prompt, tools = self.render_prompt(body, mode)
        ids, prepared = await self.tokenize(prompt)
        rid = "chatcmpl-" + uuid.uuid4().hex
        stream = bool(body.get("stream"))
        gen: dict[str, Any] = {"input_ids": ids, "sampling_params": self.sampling_params(body),
                               "return_logprob": True, "rid": rid}
        top_n = int(body.get("top_logprobs") or 0) if body.get("logprobs") else 0
        if top_n:
            gen["top_logprobs_num"] = top_n
        if stream:
            gen["stream"] = True
        ctx = self._context("/v1/chat/completions", body, gen, prepared, headers)
        opts = {
            "id": rid, "model": body.get("model") or self.model_name, "created": _now(),
            "reasoning": self.reasoning_parser and body.get("separate_reasoning", True) is not False,
            "tools": bool(tools) and self.tool_parser,
            "in_reasoning": prompt.rstrip("\n").endswith("<think>"),
            "logprobs": bool(body.get("logprobs")), "top_logprobs": top_n,
            "messages": body["messages"], "prompt_tokens": len(ids), "prepared": prepared,
            "prompt_len": len(prompt), "prompt_digest": text_digest(prompt),
            "include_usage": bool((body.get("stream_options") or {}).get("include_usage")),
            "n": int(body.get("n") or 1),
        }
        if stream:
            self.counters.inc("streams")
            return await self.open_stream(ctx, opts, self.chat_events)

        def choice(i: int, r: dict, meta: dict, ids_i: list[int], lps: list) -> dict[str, Any]:
            parsed = parse_output(r.get("text") or "", opts["reasoning"], opts["tools"], opts["in_reasoning"])
            message = self.message_of(parsed)
            finish, matched = finish_reason_of(meta, bool(parsed.tool_calls))
            logprobs = {"content": self.logprob_entries(ids_i, lps, meta.get("output_top_logprobs"), top_n),
                        "refusal": None} if opts["logprobs"] else None
            self.remember(opts, message, r.get("text") or "", parsed.reasoning, finish, len(ids_i))
            return {"index": i, "message": message, "logprobs": logprobs, "finish_reason": finish,
                    "matched_stop": matched}

        return await self._complete(ctx, opts, "chat.completion", choice)

    async def _complete(self, ctx: RequestContext, opts: dict[str, Any], kind: str,
                        make_choice: Callable[[int, dict, dict, list[int], list], dict[str, Any]]) -> dict[str, Any]:
        """A non-streaming chat or text completion: generate, record each sample, answer the OpenAI object
        (``make_choice(index, reply, meta_info, output ids, logprobs)`` shapes each choice)."""
        prepared = opts["prepared"]
        reply = await self._generate(ctx)
        worker_url = ctx.worker.url if ctx.worker is not None else None
        choices, completion_tokens, cached, version, recorded = [], 0, None, None, True
        for i, r in enumerate(self._replies(reply)):
            meta = r.get("meta_info") or {}
            ids_i, lps = self._ids_lps(r)
            choices.append(make_choice(i, r, meta, ids_i, lps))
            completion_tokens += int(meta.get("completion_tokens", len(ids_i)) or 0)
            cached = meta.get("cached_tokens") if cached is None else cached
            version = meta.get("weight_version", version)
            recorded = await self.record(prepared, r, worker_url) and recorded
        self.router.finish(ctx, 200)
        return {
            "id": opts["id"], "object": kind, "created": opts["created"], "model": opts["model"],
            "choices": choices, "usage": self.usage(opts["prompt_tokens"], completion_tokens, cached, prepared),
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "metadata": self.metadata(version), "trajectory": self.trajectory(prepared, recorded),
        }

    @staticmethod
    def _ids_lps(r: dict) -> tuple[list[int], list]:
        meta = r.get("meta_info") or {}
        triples = meta.get("output_token_logprobs")
        if triples:
            return [int(t[1]) for t in triples], [t[0] for t in triples]
        ids = [int(x) for x in r.get("output_ids") or []]
        return ids, [None] * len(ids)

    @staticmethod
    def message_of(parsed: ParsedOutput) -> dict[str, Any]:
        msg: dict[str, Any] = {"role": "assistant",
                               "content": parsed.content if (parsed.content or not parsed.tool_calls) else None,
                               "reasoning_content": parsed.reasoning}
        if parsed.tool_calls:
            msg["tool_calls"] = [c.to_openai() for c in parsed.tool_calls]
        return msg

    def remember(self, opts: dict, message: dict, raw: str, reasoning: str | None, finish: str,
                 generated_tokens: int) -> None:
        if finish == "abort":
            return
        entry = HistoryEntry(raw=raw, reasoning=reasoning, prompt_len=opts["prompt_len"],
                             prompt_digest=opts["prompt_digest"], generated_tokens=generated_tokens)
        keys = self.store.put(opts["messages"], message, entry)
        if self._history_listeners and keys is not None:
            self._history_remembered(keys, entry)

    # --- contracts.HistoryTransfer: the history entries, copied to / from another router ------------------------
    # An item: [conversation key, message key, raw, reasoning, prompt_len, prompt_digest (hex), generated_tokens]
    # (JSON-able; the sessions plugin's write-behind stores items in this very form).

    def add_history_listener(self, listener: Callable[[list[Any]], None]) -> None:
        """Have ``listener(item)`` called after each history entry is remembered (on the request's task)."""
        self._history_listeners.append(listener)

    def _history_remembered(self, keys: tuple[str, str], e: HistoryEntry) -> None:
        item = [keys[0], keys[1], e.raw, e.reasoning, e.prompt_len, e.prompt_digest.hex(), e.generated_tokens]
        for fn in list(self._history_listeners):
            try:
                fn(item)
            except Exception:  # a listener's bug must not fail the request
                log.exception("openai_compat: a history listener failed")

    def import_history(self, items: Sequence[list[Any]]) -> int:
        """Remember entries made elsewhere (items as the listeners get them), in order, through the history store
        (its bound and LRU order apply; no listener is called). Returns how many were taken; a malformed item is
        skipped (logged)."""
        if self.store.max_entries <= 0:
            return 0
        taken = bad = 0
        for item in items:
            try:
                ck, mk, raw, reasoning, prompt_len, digest, generated = item
                if not (isinstance(ck, str) and isinstance(mk, str) and isinstance(raw, str)
                        and (reasoning is None or isinstance(reasoning, str))):
                    raise TypeError("keys and texts must be strings")
                entry = HistoryEntry(raw=raw, reasoning=reasoning, prompt_len=int(prompt_len),
                                     prompt_digest=bytes.fromhex(digest), generated_tokens=int(generated))
            except (TypeError, ValueError):
                bad += 1
                continue
            self.store.insert(ck, mk, entry)
            taken += 1
        if bad:
            log.warning("openai_compat: %d malformed history item(s) of %d were not imported", bad, bad + taken)
        return taken

    @staticmethod
    def usage(prompt_tokens: int, completion_tokens: int, cached: Any, prepared: Any) -> dict[str, Any]:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": int(cached or 0)}}

    @staticmethod
    def metadata(version: Any) -> dict[str, Any]:
        return {"weight_version": str(version) if version is not None else "default"}

    @staticmethod
    def trajectory(prepared: Any, recorded: bool) -> dict[str, Any] | None:
        """The trajectory cache's part: prompt tokens from records / tokenized now, and whether every choice was
        recorded (False: a choice unfinished, or refused as larger than a quarter of the cache's bound)."""
        if prepared is None:
            return None
        return {"cached_tokens": int(getattr(prepared, "cached_tokens", 0) or 0),
                "fresh_tokens": int(getattr(prepared, "fresh_tokens", 0) or 0), "recorded": recorded}

    # --- streaming --------------------------------------------------------------------------------

    async def open_stream(self, ctx: RequestContext, opts: dict, events_fn: Any) -> StreamJob:
        """Open the upstream stream now (so that failures before the first chunk are HTTP errors)."""
        agen = self.router.generate_stream(ctx)
        try:
            first = await agen.__anext__()
        except StopAsyncIteration:
            first = None
        except HTTPError as e:
            await agen.aclose()
            self.router.finish(ctx, e.status, e.message)
            raise
        except Exception as e:
            await agen.aclose()
            self.router.finish(ctx, 502, f"{type(e).__name__}: {e}")
            raise HTTPError(502, f"Upstream call failed: {type(e).__name__}: {e}", type="upstream_error") from e
        return StreamJob(self, ctx, opts, agen, first, events_fn)

    @staticmethod
    def _chunk(kind: str, opts: dict, choices: list, usage: Any) -> bytes:
        obj: dict[str, Any] = {"id": opts["id"], "object": kind, "created": opts["created"],
                               "model": opts["model"], "system_fingerprint": SYSTEM_FINGERPRINT, "choices": choices}
        if opts["include_usage"]:
            obj["usage"] = usage if usage is not False else None
        return sse(obj)

    def chat_chunk(self, opts: dict, choices: list, usage: Any = False) -> bytes:
        return self._chunk("chat.completion.chunk", opts, choices, usage)

    async def chat_events(self, job: StreamJob) -> AsyncIterator[bytes]:
        opts = job.opts
        n = opts["n"]
        states: dict[int, dict[str, Any]] = {}
        for i in range(n):
            states[i] = {"acc": ChoiceAccumulator(), "dec": IncrementalDecoder(self.tokenizer, job.holdback),
                         "parser": OutputParser(opts["reasoning"], opts["tools"], opts["in_reasoning"]),
                         "parsed": ParsedOutput(), "ncalls": 0, "done": False}
            yield self.chat_chunk(opts, [{"index": i, "delta": {"role": "assistant", "content": ""},
                                          "logprobs": None, "finish_reason": None}])
        async for obj in job.chunks():
            idx = int(obj.get("index", 0) or 0)
            if n == 1:
                idx = 0
            st = states.get(idx)
            if st is None or st["done"]:
                continue
            acc: ChoiceAccumulator = st["acc"]
            before, after, finished, merged, text = self._advance(job, st, obj)
            evs = st["parser"].feed(text) if text else []
            if finished:
                evs += st["parser"].finish()
            collect(evs, st["parsed"])
            lp = None
            if opts["logprobs"] and after > before:
                lp = {"content": self.logprob_entries(acc.ids[before:after], acc.lps[before:after],
                                                      acc.tops[before:after] if acc.tops else None,
                                                      opts["top_logprobs"]), "refusal": None}
            deltas = self._deltas(evs, st)
            if lp is not None and not deltas:
                deltas = [{"content": ""}]
            for k, d in enumerate(deltas):
                yield self.chat_chunk(opts, [{"index": idx, "delta": d, "logprobs": lp if k == 0 else None,
                                              "finish_reason": None}])
            if finished:
                st["done"] = True
                parsed: ParsedOutput = st["parsed"]
                finish, matched = finish_reason_of(acc.meta, bool(parsed.tool_calls))
                yield self.chat_chunk(opts, [{"index": idx, "delta": {}, "logprobs": None, "finish_reason": finish,
                                              "matched_stop": matched}])
                assert merged is not None  # _advance merges the chunks when the choice finished
                job.finished_choice(merged, acc)
                if finish != "abort":
                    self.remember(opts, self.message_of(parsed), merged.get("text") or "", parsed.reasoning, finish,
                                  len(acc.ids))
        if job.error is None and opts["include_usage"]:
            yield self.chat_chunk(opts, [], usage=self.usage(opts["prompt_tokens"], job.completion_tokens,
                                                             job.cached, opts["prepared"]))

    @staticmethod
    def _deltas(evs: list, st: dict) -> list[dict]:
        """Coalesce parser events into OpenAI deltas (consecutive same-kind text merged)."""
        out: list[dict] = []
        for kind, value in evs:
            if kind == "tool_call":
                out.append({"tool_calls": [value.to_openai(index=st["ncalls"])]})
                st["ncalls"] += 1
                continue
            if not value:
                continue
            key = "content" if kind == "content" else "reasoning_content"
            if out and key in out[-1] and len(out[-1]) == 1:
                out[-1][key] += value
            else:
                out.append({key: value})
        return out

    # --- /v1/completions ------------------------------------------------------------------------

    async def completion(self, body: dict, headers: dict) -> Any:
        self.counters.inc("completion_requests")
        prompt = body["prompt"]
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids, prepared = await self.tokenize(prompt)
        else:  # token ids: sent as they are; recorded when the cache can line ids up with text
            ids, prepared = list(prompt), None
            vocab = self.router.vocab_size  # the tokenizer is a required component: never None here
            bad_id = next((k for k, t in enumerate(ids) if not 0 <= t < vocab), None)
            if bad_id is not None:
                raise bad(f"Invalid 'prompt': prompt[{bad_id}] = {ids[bad_id]} is outside the model's vocabulary "
                          f"(token ids 0 to {vocab - 1}).", "prompt")
            cache = self.cache
            if cache is not None:
                try:
                    prepared = await cache.prepare_ids(ids)
                except CacheUnavailable:
                    prepared = None
        rid = "cmpl-" + uuid.uuid4().hex
        gen: dict[str, Any] = {"input_ids": ids, "sampling_params": self.sampling_params(body),
                               "return_logprob": True, "rid": rid}
        top_n = body.get("logprobs")
        if top_n:
            gen["top_logprobs_num"] = int(top_n)
        stream = bool(body.get("stream"))
        if stream:
            gen["stream"] = True
        ctx = self._context("/v1/completions", body, gen, prepared, headers)
        opts: dict[str, Any] = {"id": rid, "model": body.get("model") or self.model_name, "created": _now(),
                "logprobs": top_n is not None, "top_logprobs": int(top_n or 0), "prompt_tokens": len(ids),
                "prepared": prepared, "n": int(body.get("n") or 1),
                "include_usage": bool((body.get("stream_options") or {}).get("include_usage"))}
        if stream:
            self.counters.inc("streams")
            return await self.open_stream(ctx, opts, self.completion_events)

        def choice(i: int, r: dict, meta: dict, ids_i: list[int], lps: list) -> dict[str, Any]:
            finish, matched = finish_reason_of(meta, False)
            logprobs = self.legacy_logprobs(ids_i, lps, meta.get("output_top_logprobs"),
                                            opts["top_logprobs"]) if opts["logprobs"] else None
            return {"index": i, "text": r.get("text") or "", "finish_reason": finish, "matched_stop": matched,
                    "logprobs": logprobs}

        return await self._complete(ctx, opts, "text_completion", choice)

    def legacy_logprobs(self, ids: list[int], lps: list, tops: list | None, top_n: int) -> dict[str, Any]:
        tokens, offsets = [], []
        top: list[dict[str, Any] | None] = []
        pos = 0
        for k, tid in enumerate(ids):
            t, _ = self.token_text(tid)
            tokens.append(t)
            offsets.append(pos)
            pos += len(t)
            if top_n and tops is not None and k < len(tops) and tops[k]:
                top.append({self.token_text(int(x[1]))[0]: x[0] for x in tops[k][:top_n]})
            else:
                top.append(None)
        return {"tokens": tokens, "token_logprobs": list(lps), "top_logprobs": top, "text_offset": offsets}

    def completion_chunk(self, opts: dict, choices: list, usage: Any = False) -> bytes:
        return self._chunk("text_completion", opts, choices, usage)

    async def completion_events(self, job: StreamJob) -> AsyncIterator[bytes]:
        opts = job.opts
        states: dict[int, dict[str, Any]] = {
            i: {"acc": ChoiceAccumulator(), "dec": IncrementalDecoder(self.tokenizer, job.holdback), "done": False}
            for i in range(opts["n"])}
        async for obj in job.chunks():
            idx = 0 if opts["n"] == 1 else int(obj.get("index", 0) or 0)
            st = states.get(idx)
            if st is None or st["done"]:
                continue
            acc: ChoiceAccumulator = st["acc"]
            before, after, finished, merged, text = self._advance(job, st, obj)
            lp = None
            if opts["logprobs"] and after > before:
                lp = self.legacy_logprobs(acc.ids[before:after], acc.lps[before:after],
                                          acc.tops[before:after] if acc.tops else None, opts["top_logprobs"])
            if text or lp is not None:
                yield self.completion_chunk(opts, [{"index": idx, "text": text, "logprobs": lp,
                                                    "finish_reason": None}])
            if finished:
                st["done"] = True
                finish, matched = finish_reason_of(acc.meta, False)
                yield self.completion_chunk(opts, [{"index": idx, "text": "", "logprobs": None,
                                                    "finish_reason": finish, "matched_stop": matched}])
                assert merged is not None  # _advance merges the chunks when the choice finished
                job.finished_choice(merged, acc)
        if job.error is None and opts["include_usage"]:
            yield self.completion_chunk(opts, [], usage=self.usage(opts["prompt_tokens"], job.completion_tokens,
                                                                   job.cached, opts["prepared"]))

    # --- /retrieve_from_messages -------------------------------------------------------------------

    async def retrieve_messages(self, body: dict) -> dict[str, Any]:
        """The body of ``/retrieve_from_messages`` (checked here: 400 naming the field) -> its training data."""
        validate_retrieve(body)
        cache = self.cache
        if cache is None:
            raise HTTPError(501, "/retrieve_from_messages needs the trajectory cache: load the radix_tree plugin.",
                            type="invalid_request_error")
        self.counters.inc("retrievals")
        messages = body["messages"]
        mode = body.get("history_mode") or self.history_mode
        tools = body.get("tools") or None
        kwargs = body.get("chat_template_kwargs")
        strict = bool(body.get("strict", False))
        add_gen = bool(body.get("add_generation_prompt", False))
        try:
            rendered = self.renderer.render_turns(messages, tools, kwargs, add_generation_prompt=add_gen, mode=mode,
                                                  splice_last=True)
            text = rendered.text
            rewritten, unverified = [], []
            for i, m in enumerate(messages):
                if m.get("role") != "assistant":
                    continue
                e = rendered.entries.get(i)
                if e is None:
                    if i in rendered.answered:  # the router answered this conversation, with another message
                        rewritten.append(self._rewritten(i, CLIENT_EDIT, None, text, None))
                    else:
                        unverified.append(i)
                    continue
                prompt = None if e.prompt_len >= 0 else self.renderer.render(messages[:i], tools, kwargs, True, mode)
                if self._turn_in(text, e, prompt):
                    self.counters.inc("audit_generated_tokens_exact", e.generated_tokens)
                    continue
                rewritten.append(self._rewritten(i, self._cause(rendered, i, e, messages, tools, kwargs, mode), e,
                                                 text, prompt))
        except (TemplateError, SpliceError, TypeError, ValueError) as e:
            raise bad(f"The chat template could not render these messages: {e}", "messages") from e
        # strict: every character up to the end of the final generated turn must come from records; the template's
        # closing text after it (Qwen: the "\n" after <|im_end|>) is never generated, so it may be fresh
        closing = strict and rendered.body_end < len(text)
        result = dict(await cache.retrieve(text, strict=strict and not closing))
        if closing and result["recorded_chars"] < rendered.body_end:
            if result.get("evicted"):
                raise HTTPError(410, f"{result['warning']} Refused because \"strict\" is set.", code="evicted")
            raise HTTPError(404, f"Only {result['recorded_chars']} of the {rendered.body_end} characters of this "
                                 f"conversation up to its last generated turn were recorded through the router; the "
                                 f"rest would need fresh tokenization. Retry without \"strict\" to get them tokenized "
                                 f"with loss_mask 0.", code="not_recorded")
        if mode == "raw":
            self.counters.inc("spliced_turns", len(rendered.spliced))
        result.update({
            "history_mode": mode,
            "history_rewritten": bool(rewritten),
            "mismatch": rewritten[0]["cause"] if rewritten else None,
            "rewritten_turns": rewritten,
            "unverified_turns": unverified,
        })
        if unverified:
            self.counters.inc("unverified_turns", len(unverified))
            self.counters.inc(f"rewritten_turns_{UNKNOWN_ORIGIN}", len(unverified))
        if rewritten:
            self.counters.inc("history_rewritten")
            self.counters.inc("rewritten_turns", len(rewritten))
            segments = []
            for r in rewritten:
                self.counters.inc(f"rewritten_turns_{r['cause']}")
                self.counters.inc(f"audit_generated_tokens_{r['cause']}", r["generated_tokens"])
                if r["cause"] == CLIENT_EDIT and r["generated"] is None:
                    continue  # which answer the client edited is unknown: no trajectory to give
                # the turn's own trajectory (its prompt + the exact generated text) is still exact
                i = r["message_index"]
                seg_text = self.renderer.render(messages[:i + 1], tools, kwargs, add_generation_prompt=False,
                                                mode=mode, splice_last=True)
                seg = dict(await cache.retrieve(seg_text, strict=False))
                seg["message_indices"] = list(range(i + 1))
                segments.append(seg)
            result["segments"] = segments
        if body.get("return_text"):
            result["text"] = text
        return result

    @staticmethod
    def _turn_in(text: str, e: HistoryEntry, prompt: str | None) -> bool:
        """Is this turn's trajectory (the prompt it was generated for + its exact text) a prefix of ``text``?"""
        if prompt is not None:
            return text.startswith(prompt + e.raw)
        return text_digest(text[:e.prompt_len]) == e.prompt_digest and text.startswith(e.raw, e.prompt_len)

    def _cause(self, rendered: Any, i: int, e: HistoryEntry, messages: list, tools: Any, kwargs: Any,
               mode: str) -> str:
        if i in rendered.not_spliced:
            return str(rendered.not_spliced[i])
        if any(c == TEMPLATE_RULE for j, c in rendered.not_spliced.items() if j < i):
            return TEMPLATE_RULE  # an earlier turn the template rewrites is part of this turn's prompt
        if e.prompt_len >= 0:
            now = self.renderer.render(messages[:i], tools, kwargs, True, mode)
            if len(now) != e.prompt_len or text_digest(now) != e.prompt_digest:
                return CLIENT_EDIT  # the conversation before the turn is not the one it was generated for
        return ROUTER_NORMALISATION

    _REASONS = {
        TEMPLATE_RULE: "the chat template renders this assistant turn (or an earlier one in its prompt) differently "
                       "in the later conversation (e.g. Qwen3 drops <think> blocks before the last user message); "
                       "its generated tokens are not part of the returned sequence: see 'segments'",
        CLIENT_EDIT: "the client sent back a conversation that differs from the one the router answered (an "
                     "assistant message other than the one returned, or an earlier message changed); the tokens of "
                     "the changed text are tokenized fresh (mask 0)",
        ROUTER_NORMALISATION: "the router could not put the generated text back into the template's rendering of "
                              "this turn; its generated tokens are not part of the returned sequence: see 'segments'",
    }

    def _rewritten(self, i: int, cause: str, e: HistoryEntry | None, text: str, prompt: str | None) -> dict:
        out: dict[str, Any] = {"message_index": i, "cause": cause, "reason": self._REASONS[cause],
                               "generated_tokens": e.generated_tokens if e is not None else 0,
                               "diverges_at_char": None, "generated": None, "rendered": None}
        if e is None:
            return out
        start = len(prompt) if prompt is not None else e.prompt_len
        if prompt is not None and not text.startswith(prompt):
            pos = _first_difference(prompt, text)
            out.update(diverges_at_char=pos, generated=prompt[pos:pos + 80], rendered=text[pos:pos + 80])
        elif prompt is not None or text_digest(text[:start]) == e.prompt_digest:
            k = _first_difference(e.raw, text[start:])
            out.update(diverges_at_char=start + k, generated=e.raw[k:k + 80], rendered=text[start + k:start + k + 80])
        else:  # the prompt it was generated for differs (only its digest is kept): where is not known
            out.update(generated=e.raw[:80])
        return out


class StreamJob:
    """One client stream: pulls upstream chunks, records at the end, closes books exactly once."""

    def __init__(self, svc: OpenAIService, ctx: RequestContext, opts: dict, agen: Any, first: Any,
                 events_fn: Any) -> None:
        self.svc = svc
        self.ctx = ctx
        self.opts = opts
        self.agen = agen
        self.first = first
        self.events_fn = events_fn
        self.error: str | None = None
        self.closed = False
        self.finished_replies: list[tuple[dict, ChoiceAccumulator]] = []
        self.recorded = False  # every choice recorded in the trajectory cache (known once closed)
        self.completion_tokens = 0
        self.cached: Any = None
        stops = ((ctx.body.get("sampling_params") or {}).get("stop")) or []
        self.holdback = max((len(s) for s in stops), default=1) - 1

    @staticmethod
    def merge(chunks: list[dict]) -> dict:
        if merge_stream is not None:
            return merge_stream(chunks)
        last = chunks[-1] if chunks else {}
        return {"text": last.get("text", ""), "output_ids": last.get("output_ids", []),
                "meta_info": last.get("meta_info", {})}

    def finished_choice(self, merged: dict, acc: ChoiceAccumulator) -> None:
        self.finished_replies.append((merged, acc))
        meta = acc.meta
        self.completion_tokens += int(meta.get("completion_tokens", len(acc.ids)) or 0)
        if self.cached is None:
            self.cached = meta.get("cached_tokens")

    async def chunks(self) -> AsyncIterator[dict]:
        pending = [self.first] if self.first is not None else []
        for obj in pending:
            if "error" in obj:
                self.error = str((obj["error"] or {}).get("message", obj["error"])) if isinstance(obj["error"], dict) \
                    else str(obj["error"])
                return
            yield obj
        async for obj in self.agen:
            if isinstance(obj, dict) and "error" in obj:
                err = obj["error"]
                self.error = str(err.get("message", err)) if isinstance(err, dict) else str(err)
                return
            yield obj

    async def body(self) -> AsyncIterator[bytes]:
        try:
            async for b in self.events_fn(self):
                yield b
            if self.error is not None:
                yield sse({"error": {"message": self.error, "type": "upstream_error", "param": None, "code": None}})
            else:
                # record before [DONE]: a client may send its next turn as soon as it sees [DONE]
                await self.close(True)
                if not self.recorded and self.opts["prepared"] is not None:  # say so, like a non-streamed reply
                    kind = "chat.completion.chunk" if self.events_fn == self.svc.chat_events else "text_completion"
                    yield sse({"id": self.opts["id"], "object": kind, "created": self.opts["created"],
                               "model": self.opts["model"], "choices": [],
                               "trajectory": self.svc.trajectory(self.opts["prepared"], False)})
            yield DONE
        finally:
            await self.close(False)

    async def close(self, ok: bool) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            await self.agen.aclose()  # early close drops the upstream connection: the worker aborts
        except Exception:  # pragma: no cover
            log.exception("closing the upstream stream failed")
        svc, ctx = self.svc, self.ctx
        if ok:
            url = ctx.worker.url if ctx.worker is not None else None
            if len(self.finished_replies) == self.opts["n"]:
                self.recorded = True
                for merged, _ in self.finished_replies:
                    self.recorded = await svc.record(self.opts["prepared"], merged, url) and self.recorded
            svc.router.finish(ctx, 200)
        elif self.error is not None:
            svc.router.finish(ctx, 502, self.error)
        else:
            svc.counters.inc("client_disconnects")
            svc.router.finish(ctx, 499, "client disconnected")
