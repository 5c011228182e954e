"""A faithful mock SGLang worker (the HTTP API in docs: sglang-worker-api.md).

Generation is deterministic (seed, input ids, ``sampling_seed``, sample index) and produces
real text: tokens are the builtin Qwen3 tokenizer's ids of common English words (or the
tokenizer's encoding of a scripted reply), ending with EOS ``<|im_end|>`` (151645).

``realistic=True`` makes the worker as unkind as real models: replies that start or end with
whitespace, non-canonical token splits, tool calls (to the prompt's ``<tools>``) with irregular
JSON spacing, per-request random logprobs, and siblings of one prompt that share only their first
few generated tokens.

All state lives on the app instance (``app.state.mock``), so several workers can run in one
process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import json
import os
import random
import re
import struct
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from slime_router_core.tokenizers import BUILTIN_CHECKPOINT, load_tokenizer

__all__ = [
    "EOS_TOKEN_ID",
    "ENDOFTEXT_TOKEN_ID",
    "MockWorkerConfig",
    "MockWorkerState",
    "create_mock_worker_app",
    "serve_mock_worker",
]

EOS_TOKEN_ID = 151645  # <|im_end|>
ENDOFTEXT_TOKEN_ID = 151643  # <|endoftext|>
MODEL_VOCAB_SIZE = 151936
STREAM_MODES = ("cumulative", "incremental", "legacy")
MODES = ("random", "think", "tool_call", "reply_text")

# Keys SGLang's SamplingParams accepts (0.5.23 rejects anything else with HTTP 400).
KNOWN_SAMPLING_PARAMS = frozenset(
    {
        "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k", "min_p",
        "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n", "ignore_eos",
        "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim", "json_schema", "regex", "ebnf",
        "structural_tag", "custom_params", "sampling_seed", "logit_bias", "stream_interval",
    }
)

_WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had by "
    "word but not what all were we when your can said there use each which she do how their if will up other "
    "about out many then them these so some her would make like him into time has look two more write go see "
    "number no way could people my than first water been call who its now find long down day did get come "
    "made may part over new sound take only little work know place year live me back give most very after "
    "thing our just name good sentence man think say great where help through much before line right too "
    "mean old any same tell boy follow came want show also around form three small set put end does another "
    "well large must big even such because turn here why ask went men read need land different home us move "
    "try kind hand picture again change off play spell air away animal house point page letter mother answer "
    "found study still learn should world high every near add food between own below country plant last "
    "school father keep tree never start city earth eye light thought head under story saw left few while "
    "along might close something seem next hard open example begin life always those both paper together got "
    "group often run important until children side feet car mile night walk white sea began grow took river "
    "four carry state once book hear stop without second later miss idea enough eat face watch far really "
    "almost let above girl sometimes mountain cut young talk soon list song being leave family"
).split()
_FIRST_WORDS = ("The", "I", "It", "We", "This", "There", "In", "When", "You", "Our", "My", "They", "He", "She", "A")
# realistic mode: string argument values (non-ASCII and escapes included, as models write them)
_ARG_STRINGS = ("Paris", "New York", "São Paulo", "東京", "celsius", "latest news", 'the "best" option', "a/b c")
_SPLITTABLE = re.compile(r" ?[A-Za-z]+")  # word tokens whose sub-word splits decode to the same text
_TOOLS_BLOCK = re.compile(r"<tools>(.*?)</tools>", re.DOTALL)
_TOOL_NAME = re.compile(r'"name"\s*:\s*"([^"]+)"')


@dataclass
class MockWorkerConfig:
    """Every knob of the mock worker. ``POST /mock/configure`` merges JSON into a live instance."""

    hf_checkpoint: str = BUILTIN_CHECKPOINT
    model_path: str = "mock-qwen3"
    seed: int = 0
    weight_version: str = "default"
    # generation behaviour
    mode: str = "random"  # random | think | tool_call | reply_text
    reply_text: str | None = None  # fixed answer text (mode reply_text; also the answer after </think>)
    think_text: str | None = None  # fixed reasoning text for mode think (default: random words)
    tool_name: str = "get_weather"
    tool_arguments: dict = field(default_factory=lambda: {"city": "Paris"})
    stop_at_eos: float = 1.0  # probability that a random-mode sequence ends with EOS
    min_random_tokens: int = 1  # random-mode answer length range (words) before EOS
    max_random_tokens: int = 48
    stream_mode: str = "cumulative"  # cumulative (0.5.10+) | incremental | legacy (0.5.0-0.5.5)
    strict_sampling_params: bool = True
    # timing
    latency: float = 0.0  # seconds before a /generate request is processed
    token_latency: float = 0.0  # seconds per generated token
    prefill_time_per_token: float = 0.0  # seconds per uncached prompt token
    # failures
    fail_first_n: int = 0
    failure_rate: float = 0.0
    fail_status: int = 500
    crash_after_n: int = 0  # 0 = never; else os._exit(1) when request N+1 arrives
    health_status: int = 200
    unhealthy_after: float | None = None  # seconds after start when health turns 503
    # bookkeeping
    prefix_cache_max_tokens: int = 2_000_000
    max_records: int = 100_000
    # weight updates: >0 bumps weight_version ("v1", "v2", ... or the trailing number +1) after it served N
    # sequences, so consecutive branches of a prompt carry different versions (0 = never)
    version_every: int = 0
    # realistic mode (every mode; the knobs below only act when realistic is on)
    realistic: bool = False
    realistic_seed: int | None = None  # per-request randomness: None = os.urandom, else seeded by a request counter
    leading_whitespace_rate: float = 0.5  # reply (or answer after </think>) starts with ' Word', '\n' or '\n\n'
    trailing_whitespace_rate: float = 0.2  # ' ', '\n' or '\n\n' right before EOS
    split_rate: float = 0.05  # per word token: emitted as 2-3 sub-word ids the tokenizer would not produce
    tool_call_rate: float = 0.5  # random/think modes: answer with tool calls when the prompt has <tools>
    parallel_tool_call_rate: float = 0.3  # 2-3 <tool_call> blocks instead of one
    shared_prefix_min: int = 0  # siblings (same prompt) share their first k generated tokens (k drawn per
    shared_prefix_max: int = 8  # sequence in [min, max], at least min(k) of two siblings), then diverge

    def validate(self) -> None:
        if self.stream_mode not in STREAM_MODES:
            raise ValueError(f"stream_mode must be one of {STREAM_MODES}, got {self.stream_mode!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not 0.0 <= self.failure_rate <= 1.0:
            raise ValueError("failure_rate must be within [0, 1]")
        for name in ("leading_whitespace_rate", "trailing_whitespace_rate", "split_rate", "tool_call_rate",
                     "parallel_tool_call_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within [0, 1]")
        if not 0 <= self.shared_prefix_min <= self.shared_prefix_max:
            raise ValueError("need 0 <= shared_prefix_min <= shared_prefix_max")
        if self.version_every < 0:
            raise ValueError("version_every must be >= 0")
        self.weight_version = str(self.weight_version)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- prefix cache


class PrefixCache:
    """A token trie modelling the worker's radix cache (partitioned by extra_key/cache_salt/lora)."""

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self.roots: dict[Any, dict] = {}
        self.size = 0

    def match(self, partition: Any, ids: list[int]) -> int:
        node = self.roots.get(partition)
        n = 0
        if node is None:
            return 0
        for t in ids:
            node = node.get(t)
            if node is None:
                break
            n += 1
        return n

    def insert(self, partition: Any, ids: list[int]) -> None:
        if self.size + len(ids) > self.max_tokens:
            self.clear()
        node = self.roots.setdefault(partition, {})
        for t in ids:
            nxt = node.get(t)
            if nxt is None:
                nxt = node[t] = {}
                self.size += 1
            node = nxt

    def clear(self) -> None:
        self.roots.clear()
        self.size = 0


# --------------------------------------------------------------------------- state


class _HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _hash_int(*parts: Any) -> int:
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        if isinstance(p, (list, tuple)):
            h.update(struct.pack(f"<{len(p)}q", *p) if p else b"[]")
        else:
            h.update(repr(p).encode())
        h.update(b"|")
    return int.from_bytes(h.digest(), "little")


def _next_version(version: str) -> str:
    """'v3' -> 'v4', '7' -> '8', 'default' -> 'v1'."""
    m = re.fullmatch(r"(.*?)(\d+)", version)
    return f"{m.group(1)}{int(m.group(2)) + 1}" if m else "v1"


class MockWorkerState:
    def __init__(self, config: MockWorkerConfig):
        config.validate()
        self.config = config
        self.tokenizer = load_tokenizer(config.hf_checkpoint)
        self._backend = getattr(self.tokenizer, "backend_tokenizer", None)
        self.started_at = time.monotonic()
        self.records: list[dict] = []
        self.running: dict[int, Sequence] = {}
        self.cache = PrefixCache(config.prefix_cache_max_tokens)
        self.resume = asyncio.Event()
        self.resume.set()
        self.requests_seeded = 0
        self._version_counted = config.weight_version  # the version _version_sequences counts for
        self._version_sequences = 0
        self.stats: dict[str, Any] = {
            "requests_received": 0,  # /generate HTTP requests
            "sequences_generated": 0,
            "in_flight": 0,
            "max_concurrent": 0,
            "failures_injected": 0,
            "aborted": 0,
            "requests_by_path": {},
        }
        self._build_vocab()

    # -- tokenizer helpers
    def encode(self, text: str) -> list[int]:
        if self._backend is not None:
            return self._backend.encode(text, add_special_tokens=False).ids
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def _build_vocab(self) -> None:
        words, firsts = [], []
        for w in _WORDS:
            ids = self.encode(" " + w)
            if len(ids) == 1 and self.decode(ids) == " " + w:
                words.append(ids[0])
        spaced_firsts = []
        for w in _FIRST_WORDS:
            ids = self.encode(w)
            if len(ids) == 1 and self.decode(ids) == w:
                firsts.append(ids[0])
            ids = self.encode(" " + w)
            if len(ids) == 1:
                spaced_firsts.append(ids[0])
        self.word_ids = sorted(set(words))
        self.first_ids = sorted(set(firsts)) or self.word_ids
        self.spaced_first_ids = sorted(set(spaced_firsts)) or self.word_ids
        self.comma_id = self.encode(",")[0]
        self.period_id = self.encode(".")[0]
        self.eos_ids = frozenset({EOS_TOKEN_ID, ENDOFTEXT_TOKEN_ID})
        self._piece_cache: dict[int, str] = {}
        self._splittable: dict[int, bool] = {}

    def token_text(self, tid: int) -> str:
        s = self._piece_cache.get(tid)
        if s is None:
            s = self._piece_cache[tid] = self.decode([tid], skip_special_tokens=False)
        return s

    def splittable(self, tid: int) -> bool:
        """A plain word token (optional leading space) that is its own text's canonical encoding."""
        ok = self._splittable.get(tid)
        if ok is None:
            s = self.token_text(tid)
            ok = self._splittable[tid] = (
                tid < ENDOFTEXT_TOKEN_ID and len(s) >= 2 and bool(_SPLITTABLE.fullmatch(s)) and self.encode(s) == [tid]
            )
        return ok

    def prompt_tools(self, input_ids: list[int]) -> list[tuple[str, Any]]:
        """(name, parameters schema) of each tool the prompt offers in a Qwen ``<tools>`` block."""
        tools: list[tuple[str, Any]] = []
        for block in _TOOLS_BLOCK.findall(self.decode(input_ids, skip_special_tokens=False)):
            found = []
            for line in block.splitlines():
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                fn = obj.get("function", obj) if isinstance(obj, dict) else None
                if isinstance(fn, dict) and isinstance(fn.get("name"), str):
                    found.append((fn["name"], fn.get("parameters")))
            # not one JSON object per line (a hand-written prompt): take the names
            tools += found or [(name, None) for name in _TOOL_NAME.findall(block)]
        return tools

    def request_seed(self) -> int:
        """Seed of one sequence's own randomness (realistic mode): differs for identical requests."""
        self.requests_seeded += 1
        if self.config.realistic_seed is None:
            return int.from_bytes(os.urandom(8), "little")
        return _hash_int(self.config.realistic_seed, self.requests_seeded)

    def sequence_started(self) -> None:
        """With ``version_every``, each weight version serves N sequences, then the next one takes over."""
        c = self.config
        if c.weight_version != self._version_counted:  # changed by a weight update or /mock/configure
            self._version_counted, self._version_sequences = c.weight_version, 0
        if 0 < c.version_every <= self._version_sequences:
            c.weight_version = self._version_counted = _next_version(c.weight_version)
            self._version_sequences = 0
        self._version_sequences += 1

    # -- health
    def healthy_status(self) -> int:
        c = self.config
        if c.unhealthy_after is not None and time.monotonic() - self.started_at >= c.unhealthy_after:
            return 503
        return int(c.health_status)

    def count_path(self, path: str) -> None:
        d = self.stats["requests_by_path"]
        d[path] = d.get(path, 0) + 1

    def add_record(self, rec: dict) -> None:
        self.records.append(rec)
        if len(self.records) > self.config.max_records:
            del self.records[: len(self.records) - self.config.max_records]


# --------------------------------------------------------------------------- generation


@dataclass
class _Params:
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: frozenset = frozenset()
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    sampling_seed: int | None = None
    stream_interval: int = 1


def _parse_params(sp: Any, strict: bool) -> _Params:
    if sp is None:
        sp = {}
    if not isinstance(sp, dict):
        raise _HTTPError(400, "sampling_params must be a dict")
    if strict:
        unknown = sorted(k for k in sp if k not in KNOWN_SAMPLING_PARAMS)
        if unknown:
            raise _HTTPError(400, f"Unknown sampling parameter(s): {', '.join(unknown)}")
    p = _Params()
    mnt = sp.get("max_new_tokens")
    if mnt is not None:
        if not isinstance(mnt, int) or isinstance(mnt, bool) or mnt < 0:
            raise _HTTPError(400, f"max_new_tokens must be at least 0, got {mnt}.")
        p.max_new_tokens = mnt
    p.min_new_tokens = int(sp.get("min_new_tokens") or 0)
    stop = sp.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    stop = [s for s in (stop or []) if s]
    if len(stop) > 32:
        raise _HTTPError(400, "At most 32 stop strings are supported.")
    p.stop = stop
    p.stop_token_ids = frozenset(int(t) for t in (sp.get("stop_token_ids") or []))
    p.ignore_eos = bool(sp.get("ignore_eos", False))
    p.skip_special_tokens = bool(sp.get("skip_special_tokens", True))
    p.no_stop_trim = bool(sp.get("no_stop_trim", False))
    seed = sp.get("sampling_seed")
    p.sampling_seed = int(seed) if seed is not None else None
    temp = sp.get("temperature")
    if temp is not None and (not isinstance(temp, (int, float)) or temp < 0):
        raise _HTTPError(400, f"temperature must be non-negative, got {temp}.")
    si = sp.get("stream_interval")
    p.stream_interval = max(1, int(si)) if si else 1
    return p


class Sequence:
    """One generated sequence (one prompt x one sample)."""

    def __init__(self, state: MockWorkerState, *, rid: str, index: int, input_ids: list[int], params: _Params,
                 sample_idx: int, partition: Any, stream: bool, return_logprob: bool, logprob_start_len: int,
                 top_logprobs_num: int, return_text_in_logprobs: bool, t0: float):
        self.state = state
        self.rid = rid
        self.index = index
        self.input_ids = input_ids
        self.p = params
        self.partition = partition
        self.stream = stream
        self.return_logprob = return_logprob
        self.logprob_start_len = logprob_start_len
        self.top_logprobs_num = top_logprobs_num
        self.return_text_in_logprobs = return_text_in_logprobs
        self.t0 = t0
        self.output_ids: list[int] = []
        self.output_logprobs: list[float] = []
        self.output_top: list[list] = []
        self.spans: list[dict] = []
        self.finish_reason: dict | None = None
        self.abort_message: str | None = None
        self.cached_tokens = 0
        c = state.config
        self.shared_k: int | None = None
        self._plan: Iterator[int]
        if c.realistic:
            # The prompt seeds what siblings share; the sequence's own source draws k, the logprobs and
            # (from token k on) the rest, so identical requests differ like sampled ones do.
            self.req_rng = random.Random(state.request_seed())
            self.shared_k = self.req_rng.randint(c.shared_prefix_min, c.shared_prefix_max)
            self.rng = random.Random(_hash_int(c.seed, "family", input_ids)) if self.shared_k else self.req_rng
            self.lp_rng = self.req_rng
            self._plan = self._realistic_plan()
        else:
            self.rng = random.Random(_hash_int(c.seed, params.sampling_seed, sample_idx, input_ids))
            self.lp_rng = self.rng
            self._plan = self._plan_iter()

    # -- token plan
    def _iter_random_words(self, n: int, first: list[int] | None = None) -> Iterator[int]:
        """A sentence of n words (lazily): Capitalized first word, ' word' tokens, commas, a final period."""
        st = self.state
        words, comma = st.word_ids, st.comma_id
        first = first or st.first_ids
        # self.rng is read at every draw: realistic mode switches it mid-sentence
        yield first[int(self.rng.random() * len(first))]
        for i in range(n - 1):
            yield words[int(self.rng.random() * len(words))]
            if i < n - 2 and self.rng.random() < 0.08:
                yield comma
        yield st.period_id

    def _random_words(self, n: int) -> list[int]:
        return list(self._iter_random_words(n))

    def _scripted_ids(self) -> list[int] | None:
        c, st = self.state.config, self.state
        if c.mode == "random":
            return None
        if c.mode == "reply_text":
            text = c.reply_text if c.reply_text is not None else "Hello! How can I help you today?"
            return st.encode(text)
        if c.mode == "tool_call":
            args = c.tool_arguments
            args_s = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
            text = '<tool_call>\n{"name": ' + json.dumps(c.tool_name, ensure_ascii=False) + ', "arguments": ' + args_s
            return st.encode(text + "}\n</tool_call>")
        if c.mode == "think":
            think = c.think_text
            if think is None:
                think = st.decode(self._random_words(self.rng.randint(4, 16)))
            think_ids = st.encode("<think>\n" + think.strip("\n") + "\n</think>\n\n")
            if c.reply_text is not None:
                return think_ids + st.encode(c.reply_text)
            return think_ids + self._random_words(self.rng.randint(2, 12))
        return None

    def _plan_iter(self):
        c, rng = self.state.config, self.rng
        scripted = self._scripted_ids()
        if scripted is not None:
            yield from scripted
            yield EOS_TOKEN_ID
        else:
            lo = max(1, c.min_random_tokens)
            n = rng.randint(lo, max(lo, c.max_random_tokens))
            yield from self._iter_random_words(n)
            if rng.random() < c.stop_at_eos:
                yield EOS_TOKEN_ID
        while True:  # the model keeps talking (ignore_eos, or no EOS drawn)
            yield from self._iter_random_words(rng.randint(3, 20))

    # -- realistic plan: every draw reads self.rng (see __init__), switched after shared_k tokens
    def _realistic_plan(self) -> Iterator[int]:
        n = 0
        for tid in self._realistic_tokens():
            for t in self._split(tid):
                yield t
                n += 1
                if n == self.shared_k:
                    self.rng = self.req_rng

    def _realistic_tokens(self) -> Iterator[int]:
        c, st = self.state.config, self.state
        tools = st.prompt_tools(self.input_ids) if c.mode != "reply_text" else []
        if c.mode == "think":
            yield from st.encode("<think>\n")
            if c.think_text is None:
                yield from self._iter_random_words(self.rng.randint(4, 16))
            else:
                yield from st.encode(c.think_text.strip("\n"))
            yield from st.encode("\n</think>\n\n")
        if c.mode == "tool_call" or (tools and self.rng.random() < c.tool_call_rate):
            yield from self._tool_calls(tools)
        elif c.mode == "reply_text" or (c.mode == "think" and c.reply_text is not None):
            text = c.reply_text if c.reply_text is not None else "Hello! How can I help you today?"
            yield from st.encode(self._lead() + text)
        elif c.mode == "think":
            yield from self._answer_words(self.rng.randint(2, 12))
        else:
            lo = max(1, c.min_random_tokens)
            yield from self._answer_words(self.rng.randint(lo, max(lo, c.max_random_tokens)))
        if c.mode != "random" or self.rng.random() < c.stop_at_eos:
            if self.rng.random() < c.trailing_whitespace_rate:
                yield from st.encode(self.rng.choice((" ", "\n", "\n\n")))
            yield EOS_TOKEN_ID
        while True:  # the model keeps talking (ignore_eos, or no EOS drawn)
            yield from self._iter_random_words(self.rng.randint(3, 20))

    def _lead(self) -> str:
        """What a reply starts with: mostly nothing or a space (' The'), sometimes a newline or two."""
        if self.rng.random() >= self.state.config.leading_whitespace_rate:
            return ""
        return self.rng.choice((" ", " ", " ", "\n", "\n\n"))

    def _answer_words(self, n: int) -> Iterator[int]:
        lead = self._lead()
        if lead == " ":
            yield from self._iter_random_words(n, self.state.spaced_first_ids)
        else:
            yield from self.state.encode(lead)
            yield from self._iter_random_words(n)

    def _split(self, tid: int) -> list[int]:
        """Mostly [tid]; sometimes the word's text as 2-3 sub-word ids (never the tokenizer's encoding)."""
        st = self.state
        if self.rng.random() >= st.config.split_rate or not st.splittable(tid):
            return [tid]
        s = st.token_text(tid)
        cuts = sorted(self.rng.sample(range(1, len(s)), min(len(s) - 1, self.rng.choice((1, 1, 1, 2)))))
        return [t for a, b in zip([0, *cuts], [*cuts, len(s)]) for t in st.encode(s[a:b])]

    def _tool_calls(self, tools: list[tuple[str, Any]]) -> Iterator[int]:
        """Sometimes content first, then 1-3 <tool_call> blocks to the prompt's tools (else tool_name)."""
        c, st = self.state.config, self.state
        if self.rng.random() < 0.3:
            yield from self._answer_words(self.rng.randint(3, 12))
            yield from st.encode("\n\n")
        calls = 1 + (self.rng.randint(1, 2) if self.rng.random() < c.parallel_tool_call_rate else 0)
        for i in range(calls):
            if tools:
                name, schema = self.rng.choice(tools)
                args: Any = self._arg_value({**(schema if isinstance(schema, dict) else {}), "type": "object"}, 0)
            else:
                name, args = c.tool_name, c.tool_arguments
            yield from st.encode(("\n" if i else "") + "<tool_call>\n" + self._call_json(name, args) + "\n</tool_call>")

    def _arg_value(self, schema: Any, depth: int) -> Any:
        """A plausible value for a JSON schema (untyped: any type, objects nest up to 3 levels)."""
        rng = self.rng  # no yield in here: safe to hold
        schema = schema if isinstance(schema, dict) else {}
        if schema.get("enum"):
            return rng.choice(schema["enum"])
        t = schema.get("type")
        if isinstance(t, list):
            t = t[0] if t else None
        if t is None:
            t = rng.choice(("string", "integer", "number", "boolean", "object", "array")[: 6 if depth < 2 else 3])
        if t == "integer":
            return rng.randint(-5, 1000)
        if t == "number":
            return round(rng.uniform(-100, 100), rng.randint(0, 3))
        if t == "boolean":
            return rng.random() < 0.5
        if t == "null":
            return None
        if t == "array":
            return [self._arg_value(schema.get("items"), depth + 1) for _ in range(rng.randint(0, 3))]
        if t == "object":
            props = schema.get("properties")
            if isinstance(props, dict) and props:
                required = schema.get("required") or []
                return {k: self._arg_value(v, depth + 1) for k, v in props.items()
                        if k in required or rng.random() < 0.6}
            n = rng.randint(1, 3) if depth < 3 else 0
            return {rng.choice(_WORDS): self._arg_value({}, depth + 1) for _ in range(n)}
        return rng.choice(_ARG_STRINGS)

    def _call_json(self, name: str, args: Any) -> str:
        """The call object as models write it: json.dumps spacing, compact, or irregular; keys sometimes reordered."""
        style = self.rng.choice(("dumps", "compact", "odd", "odd"))
        fields: list[tuple[str | None, str]] = [
            ('"name"', json.dumps(name, ensure_ascii=False)),
            ('"arguments"', args if isinstance(args, str) else self._json(args, style)),
        ]
        if self.rng.random() < 0.15:
            fields.reverse()
        return self._join("{", fields, "}", style)

    def _json(self, v: Any, style: str) -> str:
        if isinstance(v, dict):
            items = list(v.items())
            if self.rng.random() < 0.2:
                self.rng.shuffle(items)
            return self._join("{", [(json.dumps(str(k), ensure_ascii=False), self._json(x, style)) for k, x in items],
                              "}", style)
        if isinstance(v, list):
            return self._join("[", [(None, self._json(x, style)) for x in v], "]", style)
        return json.dumps(v, ensure_ascii=False)

    def _join(self, open_: str, items: list[tuple[str | None, str]], close: str, style: str) -> str:
        out = open_
        for i, (key, value) in enumerate(items):
            if style == "dumps":
                item_sep, key_sep = ", ", ": "
            elif style == "compact":
                item_sep, key_sep = ",", ":"
            else:
                item_sep = self.rng.choice((", ", ",", ",  ", " , "))
                key_sep = self.rng.choice((": ", ":", " : ", ":  "))
            out += (item_sep if i else "") + (key + key_sep if key is not None else "") + value
        return out + close

    def _logprob(self) -> float:
        return -round(self.lp_rng.random() * 2.5 + 1e-4, 6)

    # -- stepping
    def step(self) -> None:
        """Produce one token and update finish_reason."""
        st, p = self.state, self.p
        while True:
            tid = next(self._plan)
            if p.ignore_eos and tid in st.eos_ids and tid not in p.stop_token_ids:
                continue
            break
        n = len(self.output_ids)
        self.output_ids.append(tid)
        lp = self._logprob()
        self.output_logprobs.append(lp)
        if self.top_logprobs_num > 0:
            self.output_top.append(self._top(tid, lp))
        v = st.config.weight_version
        if not self.spans or self.spans[-1]["version"] != v:
            self.spans.append({"version": v, "start": n, "end": n})
        self.spans[-1]["end"] = n + 1
        n += 1
        if n >= p.min_new_tokens:
            if tid in p.stop_token_ids or (tid in st.eos_ids and not p.ignore_eos):
                self.finish_reason = {"type": "stop", "matched": tid}
                return
            if p.stop:
                text = st.decode(self.output_ids, p.skip_special_tokens)
                tail = text[-(max(map(len, p.stop)) + 64):]
                for s in p.stop:
                    if s in tail:
                        self.finish_reason = {"type": "stop", "matched": s}
                        return
        if n >= p.max_new_tokens:
            self.finish_reason = {"type": "length", "length": p.max_new_tokens}

    def _top(self, tid: int, lp: float) -> list:
        k = self.top_logprobs_num
        out: list[list[Any]] = [[lp, tid]]
        rng = random.Random(_hash_int(tid, lp, k))
        cur = lp
        for _ in range(k - 1):
            cur = round(cur - rng.random() * 1.5 - 0.01, 6)
            out.append([cur, rng.choice(self.state.word_ids)])
        out.sort(key=lambda x: -x[0])
        return [self._triple(v, t) for v, t in out]

    def _triple(self, lp: float | None, tid: int) -> list:
        return [lp, tid, self.state.token_text(tid) if self.return_text_in_logprobs else None]

    def abort(self, message: str) -> None:
        if self.finish_reason is None:
            self.finish_reason = {"type": "abort", "message": message}
            self.abort_message = message

    @property
    def aborted(self) -> bool:
        return bool(self.finish_reason and self.finish_reason.get("type") == "abort")

    # -- rendering
    def text(self, final: bool) -> str:
        st, p, fr = self.state, self.p, self.finish_reason
        ids = self.output_ids
        if final and fr and isinstance(fr.get("matched"), int) and not p.no_stop_trim and ids:
            ids = ids[:-1]
        text = st.decode(ids, p.skip_special_tokens)
        if final and fr and isinstance(fr.get("matched"), str) and not p.no_stop_trim:
            pos = text.find(fr["matched"])
            if pos >= 0:
                text = text[:pos]
        if not final:
            text = text.rstrip("\ufffd")
            for s in p.stop:  # hold back a possible partial stop string
                for k in range(min(len(s), len(text)), 0, -1):
                    if text.endswith(s[:k]):
                        text = text[:-k]
                        break
        return text

    @property
    def weight_version(self) -> str:
        return self.spans[-1]["version"] if self.spans else self.state.config.weight_version

    def input_logprobs(self) -> tuple[list, list | None]:
        start = max(0, self.logprob_start_len)
        triples: list[list[Any]] = []
        tops: list[Any] | None = [] if self.top_logprobs_num > 0 else None
        for pos in range(start, len(self.input_ids)):
            tid = self.input_ids[pos]
            lp = None if pos == start else -round((_hash_int(tid, pos) % 100000) / 40000 + 1e-4, 6)
            triples.append(self._triple(lp, tid))
            if tops is not None:
                tops.append(None if lp is None else self._top(tid, lp))
        return triples, tops

    def meta(self, *, final: bool, lp_from: int = 0) -> dict:
        m: dict[str, Any] = {
            "id": self.rid,
            "finish_reason": self.finish_reason if final else None,
            "prompt_tokens": len(self.input_ids),
            "completion_tokens": len(self.output_ids),
            "cached_tokens": self.cached_tokens,
            "weight_version": self.weight_version,
        }
        if self.return_logprob:
            m["output_token_logprobs"] = [
                self._triple(lp, t) for lp, t in zip(self.output_logprobs[lp_from:], self.output_ids[lp_from:])
            ]
            if self.top_logprobs_num > 0:
                m["output_top_logprobs"] = self.output_top[lp_from:]
            if self.logprob_start_len >= 0:
                if lp_from == 0:
                    m["input_token_logprobs"], tops = self.input_logprobs()
                    if tops is not None:
                        m["input_top_logprobs"] = tops
                else:
                    m["input_token_logprobs"] = []
        if final:
            if len(self.spans) > 1:
                m["weight_versions"] = [dict(s) for s in self.spans]
            m["e2e_latency"] = round(time.monotonic() - self.t0, 6)
        return m

    def final_obj(self) -> dict:
        return {"text": self.text(final=True), "output_ids": list(self.output_ids), "meta_info": self.meta(final=True)}

    def record(self, path: str) -> dict:
        rec = {
            "rid": self.rid,
            "index": self.index,
            "input_ids": list(self.input_ids),
            "output_ids": list(self.output_ids),
            "output_logprobs": list(self.output_logprobs),
            "weight_version": self.weight_version,
            "weight_versions": [dict(s) for s in self.spans],
            "finish_reason": self.finish_reason,
            "stream": self.stream,
            "aborted": self.aborted,
            "text": self.text(final=True),
            "path": path,
            "cached_tokens": self.cached_tokens,
            "prompt_tokens": len(self.input_ids),
        }
        if self.shared_k is not None:  # siblings of one prompt share at least min(their k) generated tokens
            rec["shared_prefix_tokens"] = self.shared_k
        return rec

    # -- the driver
    async def run(self) -> AsyncGenerator[None, None]:
        """Generate; yields whenever a streaming chunk is due. Always records the sequence."""
        st, c = self.state, self.state.config
        key = id(self)
        st.sequence_started()
        st.running[key] = self
        try:
            self.cached_tokens = min(st.cache.match(self.partition, self.input_ids), max(0, len(self.input_ids) - 1))
            uncached = len(self.input_ids) - self.cached_tokens
            if c.prefill_time_per_token > 0 and uncached > 0:
                await asyncio.sleep(c.prefill_time_per_token * uncached)
            if self.p.max_new_tokens == 0 and self.finish_reason is None:
                self.finish_reason = {"type": "length", "length": 0}
            since = 0
            while self.finish_reason is None:
                while not st.resume.is_set() and self.finish_reason is None:  # paused
                    await asyncio.sleep(0.005)
                if self.finish_reason is not None:
                    break
                self.step()
                since += 1
                if c.token_latency > 0:
                    await asyncio.sleep(c.token_latency)
                if self.finish_reason is None and self.stream and since >= self.p.stream_interval:
                    since = 0
                    yield
            if self.stream:
                yield
        finally:
            if self.finish_reason is None:  # cancelled: client went away
                self.abort("Client disconnected")
            if self.aborted:
                st.stats["aborted"] += 1
            st.running.pop(key, None)
            st.cache.insert(self.partition, self.input_ids + self.output_ids)
            st.stats["sequences_generated"] += 1
            st.add_record(self.record("/generate"))


# --------------------------------------------------------------------------- request parsing


def _err(status: int, message: str) -> Response:
    return Response(orjson.dumps({"error": {"message": message}}), status_code=status, media_type="application/json")


def _json(obj: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(obj), status_code=status, media_type="application/json")


def _per_prompt(value: Any, i: int, batch: bool) -> Any:
    if batch and isinstance(value, list):
        return value[i] if i < len(value) else None
    return value


def _build_sequences(st: MockWorkerState, body: dict, t0: float) -> tuple[list[Sequence], bool]:
    text, input_ids = body.get("text"), body.get("input_ids")
    if text is None and input_ids is None:
        if body.get("input_embeds") is not None:
            raise _HTTPError(400, "input_embeds is not supported by the mock worker.")
        raise _HTTPError(400, "Either text, input_ids or input_embeds should be provided.")
    if text is not None and input_ids is not None:
        raise _HTTPError(400, "Either text or input_ids should be provided, not both.")
    if text is not None:
        if isinstance(text, str):
            prompts, batch = [st.encode(text)], False
        elif isinstance(text, list) and all(isinstance(t, str) for t in text):
            prompts, batch = [st.encode(t) for t in text], True
        else:
            raise _HTTPError(400, "text must be a string or a list of strings.")
    else:
        if not isinstance(input_ids, list):
            raise _HTTPError(400, "input_ids must be a list.")
        if input_ids and isinstance(input_ids[0], list):
            prompts, batch = input_ids, True
        else:
            prompts, batch = [input_ids], False
        for ids in prompts:
            if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise _HTTPError(400, "input_ids must be a list of integers or a list of lists of integers.")
            for t in ids:
                if t < 0 or t >= MODEL_VOCAB_SIZE:
                    raise _HTTPError(400, f"The input_ids {t} is out of vocabulary (size {MODEL_VOCAB_SIZE}).")
    if batch and not prompts:
        raise _HTTPError(400, "The batch is empty.")
    for ids in prompts:
        if not ids:
            raise _HTTPError(400, "The input is empty.")

    sps = body.get("sampling_params")
    if sps is not None and not isinstance(sps, (dict, list)):
        raise _HTTPError(400, "sampling_params must be a dict or a list of dicts.")
    per_prompt_params: list[tuple[_Params, int]] = []
    for i in range(len(prompts)):
        sp = sps[i] if isinstance(sps, list) and i < len(sps) else (sps if isinstance(sps, dict) else None)
        if isinstance(sps, list) and not batch:
            sp = sps[0] if sps else None
        params = _parse_params(sp, st.config.strict_sampling_params)
        n = (sp or {}).get("n", 1) or 1
        if not isinstance(n, int) or n < 1:
            raise _HTTPError(400, f"n must be a positive integer, got {n}.")
        per_prompt_params.append((params, n))
    if any(n > 1 for _, n in per_prompt_params):
        batch = True

    total = sum(n for _, n in per_prompt_params)
    rid = body.get("rid")
    if rid is None:
        rids = [uuid.uuid4().hex for _ in range(total)]
    elif isinstance(rid, str):
        rids = [rid] if not batch else [f"{rid}_{i}" for i in range(total)]
    elif isinstance(rid, list) and len(rid) == total and all(isinstance(r, str) for r in rid):
        rids = rid
    else:
        raise _HTTPError(400, "The rid should be a string or a list of strings with the batch size.")

    stream = bool(body.get("stream", False))
    partition = (body.get("lora_path"), body.get("extra_key"), body.get("cache_salt"))
    seqs: list[Sequence] = []
    k = 0
    for i, (ids, (params, n)) in enumerate(zip(prompts, per_prompt_params)):
        rl = _per_prompt(body.get("return_logprob", False), i, batch)
        lsl = _per_prompt(body.get("logprob_start_len", -1), i, batch)
        tln = _per_prompt(body.get("top_logprobs_num", 0), i, batch)
        for j in range(n):
            seqs.append(
                Sequence(
                    st, rid=rids[k], index=k, input_ids=list(ids), params=params, sample_idx=j,
                    partition=partition, stream=stream, return_logprob=bool(rl),
                    logprob_start_len=-1 if lsl is None else int(lsl), top_logprobs_num=int(tln or 0),
                    return_text_in_logprobs=bool(body.get("return_text_in_logprobs", False)), t0=t0,
                )
            )
            k += 1
    return seqs, batch


class _Chunker:
    """Builds streaming chunks for one sequence according to the stream mode."""

    def __init__(self, seq: Sequence, mode: str, batch: bool):
        self.seq, self.mode, self.batch = seq, mode, batch
        self.sent_text = ""
        self.sent_ids = 0

    def chunk(self) -> dict:
        seq = self.seq
        final = seq.finish_reason is not None
        text = seq.text(final=final)
        n = len(seq.output_ids)
        if self.mode == "incremental":
            out_text = text[len(self.sent_text):]
            out_ids = seq.output_ids[self.sent_ids:]
            meta = seq.meta(final=final, lp_from=self.sent_ids)
        elif self.mode == "legacy":
            out_text, out_ids = text, seq.output_ids[self.sent_ids:]
            meta = seq.meta(final=final)
        else:
            out_text, out_ids = text, list(seq.output_ids)
            meta = seq.meta(final=final)
        self.sent_text, self.sent_ids = text, n
        obj: dict[str, Any] = {"text": out_text, "output_ids": out_ids, "meta_info": meta}
        if self.batch:
            obj["index"] = seq.index
        return obj


async def interleave(producers: list[Callable[[Callable[[Any], Awaitable[None]]], Awaitable[None]]]
                     ) -> AsyncIterator[Any]:
    """Run the producers concurrently (each gets a ``put``) and yield what they put as it comes, until all are
    done; closing the iterator cancels the ones still running (several sequences of one streamed request)."""
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def run(producer: Callable[[Callable[[Any], Awaitable[None]]], Awaitable[None]]) -> None:
        try:
            await producer(queue.put)
        finally:
            queue.put_nowait(end)

    tasks = [asyncio.create_task(run(p)) for p in producers]
    try:
        done = 0
        while done < len(tasks):
            item = await queue.get()
            if item is end:
                done += 1
            else:
                yield item
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


# --------------------------------------------------------------------------- app


async def _body(request: Request) -> dict:
    """A request's JSON object body ({} when empty); 400 otherwise."""
    raw = await request.body()
    if not raw:
        return {}
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise _HTTPError(400, f"Invalid JSON body: {e}") from e
    if not isinstance(obj, dict):
        raise _HTTPError(400, "The request body must be a JSON object.")
    return obj


def mock_control_routes(st: MockWorkerState) -> list[Route]:
    """The mock-only test endpoints (``/mock/configure``, ``/mock/records``, ``/mock/stats``) over ``st``.

    Shared by every mock worker flavour (SGLang here, vLLM in ``vllm.py``).
    """

    async def configure(request: Request) -> Response:
        if request.method == "GET":
            return _json(st.config.to_dict())
        try:
            body = await _body(request)
        except _HTTPError as e:
            return _err(e.status, e.message)
        names = {f.name for f in dataclasses.fields(MockWorkerConfig)}
        unknown = sorted(set(body) - names)
        if unknown:
            return _err(400, f"Unknown config key(s): {', '.join(unknown)}")
        if "hf_checkpoint" in body and body["hf_checkpoint"] != st.config.hf_checkpoint:
            return _err(400, "hf_checkpoint cannot be changed at run time")
        new = dataclasses.replace(st.config, **body)
        try:
            new.validate()
        except ValueError as e:
            return _err(400, str(e))
        if "unhealthy_after" in body:
            st.started_at = time.monotonic()
        for k in body:
            setattr(st.config, k, getattr(new, k))
        return _json(st.config.to_dict())

    async def records(request: Request) -> Response:
        if request.method == "DELETE":
            st.records.clear()
            return _json({"success": True})
        return _json(st.records)

    async def stats(request: Request) -> Response:
        if request.method == "DELETE":
            for k in ("requests_received", "sequences_generated", "max_concurrent", "failures_injected", "aborted"):
                st.stats[k] = 0
            st.stats["requests_by_path"] = {}
            st.stats.pop("abort_requests", None)
            st.stats["max_concurrent"] = st.stats["in_flight"]
            return _json({"success": True})
        s = dict(st.stats)
        s["running"] = len(st.running)
        s["records"] = len(st.records)
        s["weight_version"] = st.config.weight_version
        s["prefix_cache_tokens"] = st.cache.size
        return _json(s)

    return [
        Route("/mock/configure", configure, methods=["GET", "POST"]),
        Route("/mock/records", records, methods=["GET", "DELETE"]),
        Route("/mock/stats", stats, methods=["GET", "DELETE"]),
    ]


def create_mock_worker_app(config: MockWorkerConfig | None = None) -> Starlette:
    """Build the ASGI app. State is per app instance (``app.state.mock``)."""
    config = config if config is not None else MockWorkerConfig()
    st = MockWorkerState(config)

    async def generate(request: Request) -> Response:
        t0 = time.monotonic()
        c = st.config
        st.count_path("/generate")
        st.stats["requests_received"] += 1
        nreq = st.stats["requests_received"]
        if c.crash_after_n and nreq > c.crash_after_n:
            os._exit(1)
        st.stats["in_flight"] += 1
        st.stats["max_concurrent"] = max(st.stats["max_concurrent"], st.stats["in_flight"])
        handed_off = False
        try:
            try:
                body = await _body(request)
                if c.latency > 0:
                    await asyncio.sleep(c.latency)
                if nreq <= c.fail_first_n or (
                    c.failure_rate > 0 and (_hash_int(c.seed, "fail", nreq) % 1_000_000) / 1_000_000 < c.failure_rate
                ):
                    st.stats["failures_injected"] += 1
                    return _err(int(c.fail_status), f"mock worker: injected failure for request #{nreq}")
                seqs, batch = _build_sequences(st, body, t0)
            except _HTTPError as e:
                return _err(e.status, e.message)

            if not body.get("stream", False):
                if len(seqs) == 1:
                    async for _ in seqs[0].run():
                        pass
                else:
                    await asyncio.gather(*(_drain(s) for s in seqs))
                objs = [s.final_obj() for s in seqs]
                return _json(objs if batch else objs[0])

            mode = st.config.stream_mode
            handed_off = True
            return StreamingResponse(_stream(seqs, batch, mode), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        finally:
            if not handed_off:
                st.stats["in_flight"] -= 1

    async def _drain(seq: Sequence) -> None:
        async for _ in seq.run():
            pass

    async def _stream(seqs: list[Sequence], batch: bool, mode: str) -> AsyncIterator[bytes]:
        try:
            if len(seqs) == 1:
                ch = _Chunker(seqs[0], mode, batch)
                gen = seqs[0].run()
                try:
                    async for _ in gen:
                        yield _sse(ch.chunk())
                finally:
                    await gen.aclose()
            else:
                async def pump(seq: Sequence, put: Callable[[Any], Awaitable[None]]) -> None:
                    ch = _Chunker(seq, mode, batch)
                    gen = seq.run()
                    try:
                        async for _ in gen:
                            await put(_sse(ch.chunk()))
                    finally:
                        await gen.aclose()

                async for item in interleave([functools.partial(pump, q) for q in seqs]):
                    yield item
            yield b"data: [DONE]\n\n"
        finally:
            st.stats["in_flight"] -= 1

    # -- control endpoints
    async def health(request: Request) -> Response:
        st.count_path(request.url.path)
        return Response(b"", status_code=st.healthy_status())

    def _model_info() -> dict:
        c = st.config
        return {
            "model_path": c.model_path,
            "tokenizer_path": c.hf_checkpoint,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": c.weight_version,
            "has_image_understanding": False,
            "has_audio_understanding": False,
            "model_type": "qwen3",
            "architectures": ["Qwen3ForCausalLM"],
        }

    async def model_info(request: Request) -> Response:
        st.count_path(request.url.path)
        return _json(_model_info())

    async def weight_version(request: Request) -> Response:
        return _json({"weight_version": st.config.weight_version})

    async def server_info(request: Request) -> Response:
        st.count_path(request.url.path)
        c = st.config
        info = {
            "model_path": c.model_path,
            "tokenizer_path": c.hf_checkpoint,
            "served_model_name": c.model_path,
            "dp_size": 1,
            "tp_size": 1,
            "pp_size": 1,
            "random_seed": c.seed,
            "weight_version": c.weight_version,
            "incremental_streaming_output": c.stream_mode == "incremental",
            "version": "0.5.23-mock",
            "mock": True,
            "mock_config": c.to_dict(),
            "internal_states": [{"last_gen_throughput": 0.0, "num_running_reqs": len(st.running)}],
        }
        return _json(info)

    async def get_load(request: Request) -> Response:
        st.count_path(request.url.path)
        running = list(st.running.values())
        return _json([{
            "dp_rank": 0,
            "num_reqs": len(running),
            "num_waiting_reqs": 0,
            "num_tokens": sum(len(s.input_ids) + len(s.output_ids) for s in running),
        }])

    async def models(request: Request) -> Response:
        c = st.config
        return _json({"object": "list", "data": [{
            "id": c.model_path, "object": "model", "created": int(time.time()), "owned_by": "sglang",
            "root": c.model_path, "max_model_len": 40960,
        }]})

    async def flush_cache(request: Request) -> Response:
        st.count_path("/flush_cache")
        if st.running:
            return Response(
                "Cache not flushed: there are running or waiting requests.", status_code=400, media_type="text/plain"
            )
        st.cache.clear()
        return Response("Cache flushed.\n", status_code=200, media_type="text/plain")

    def _abort_matching(prefix: str | None, abort_all: bool, message: str) -> int:
        n = 0
        for seq in list(st.running.values()):
            if abort_all or (prefix and seq.rid.startswith(prefix)):
                seq.abort(message)
                n += 1
        return n

    async def abort_request(request: Request) -> Response:
        st.count_path("/abort_request")
        try:
            body = await _body(request)
        except _HTTPError as e:
            return _err(e.status, e.message)
        rid = body.get("rid") or ""
        abort_all = bool(body.get("abort_all", False))
        n = _abort_matching(rid, abort_all, "Abort requested" + (f" for rid {rid}" if rid else ""))
        st.stats.setdefault("abort_requests", []).append({"rid": rid, "abort_all": abort_all, "matched": n})
        return Response(b"", status_code=200)

    async def update_weights_from_disk(request: Request) -> Response:
        st.count_path(request.url.path)
        try:
            body = await _body(request)
        except _HTTPError as e:
            return _err(e.status, e.message)
        if body.get("abort_all_requests"):
            _abort_matching(None, True, "Abort due to weight update")
        if body.get("weight_version") is not None:
            st.config.weight_version = str(body["weight_version"])
        if body.get("model_path"):
            st.stats["last_model_path"] = body["model_path"]
        return _json({"success": True, "message": "Succeeded to update model weights.", "num_paused_requests": 0})

    async def update_weight_version(request: Request) -> Response:
        st.count_path("/update_weight_version")
        try:
            body = await _body(request)
        except _HTTPError as e:
            return _err(e.status, e.message)
        if body.get("new_version") is None:
            return _err(400, "new_version is required")
        if body.get("abort_all_requests", True):
            _abort_matching(None, True, "Abort due to weight version update")
        st.config.weight_version = str(body["new_version"])
        return _json({"success": True, "message": f"Weight version updated to {st.config.weight_version}"})

    async def pause_generation(request: Request) -> Response:
        st.resume.clear()
        return _json({"success": True})

    async def continue_generation(request: Request) -> Response:
        st.resume.set()
        return _json({"success": True})

    routes = [
        Route("/generate", generate, methods=["POST"]),
        Route("/health", health, methods=["GET", "POST"]),
        Route("/health_generate", health, methods=["GET", "POST"]),
        Route("/ready", health, methods=["GET"]),
        Route("/get_model_info", model_info, methods=["GET"]),
        Route("/model_info", model_info, methods=["GET"]),
        Route("/get_weight_version", weight_version, methods=["GET"]),
        Route("/get_server_info", server_info, methods=["GET"]),
        Route("/server_info", server_info, methods=["GET"]),
        Route("/get_load", get_load, methods=["GET"]),
        Route("/v1/loads", get_load, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/flush_cache", flush_cache, methods=["GET", "POST"]),
        Route("/abort_request", abort_request, methods=["POST"]),
        Route("/update_weights_from_disk", update_weights_from_disk, methods=["POST"]),
        Route("/update_weights_from_distributed", update_weights_from_disk, methods=["POST"]),
        Route("/update_weights_from_tensor", update_weights_from_disk, methods=["POST"]),
        Route("/update_weight_version", update_weight_version, methods=["POST"]),
        Route("/pause_generation", pause_generation, methods=["POST"]),
        Route("/continue_generation", continue_generation, methods=["POST"]),
        *mock_control_routes(st),
    ]
    app = Starlette(routes=routes)
    app.state.mock = st
    return app


def serve_mock_worker(host: str, port: int, config: MockWorkerConfig | None = None) -> None:
    """Run a mock worker with uvicorn (blocking); uvloop/httptools when available."""
    import importlib.util

    import uvicorn

    app = create_mock_worker_app(config or MockWorkerConfig())
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    uvicorn.run(app, host=host, port=port, loop=loop, http=http, log_level="warning", access_log=False)
