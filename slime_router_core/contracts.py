"""The contracts between plugins: what a shared component must offer, and under which typed key it is found.

Plugins reach each other only through the component registry and the per-request stash; this module is the
list of what crosses those seams. Each shared component has a ``typing.Protocol`` (checked statically by mypy
and at start-up by ``ComponentRegistry.register``) and a ``ComponentKey`` that carries its type, so
``registry.get(TRAJECTORY_CACHE)`` is a ``TrajectoryCache`` to the type checker, whichever plugin provides it:

==================  ===========================  ===========================================================
key                 protocol                     provided by (first-party) / used by
==================  ===========================  ===========================================================
``TOKENIZER``       ``Tokenizer``                the core (``--hf-checkpoint``) / radix_tree, openai_compat
``TRAJECTORY_CACHE`` ``TrajectoryCache``         radix_tree (in process, or ``--radix-tree-process``) /
                                                 openai_compat, metrics
``BALANCER``        ``Balancer``                 balancing / metrics
``METRICS``         ``MetricsSink``              metrics / its hooks and routes
``OPENAI_COMPAT``   ``OpenAICompat``             openai_compat / metrics, sessions (batch retrieval, and
                                                 ``HistoryTransfer`` for the write-behind)
``SESSIONS``        ``Sessions``                 sessions / its routes (and a trajectory viewer), metrics
(``router.engines``) ``Engine``                  vllm (SGLang is the router's own wire format) / the core
==================  ===========================  ===========================================================

Everything that may cross a process boundary is ``async`` (the trajectory cache runs in its own process with
``--radix-tree-process``), so the in-process and out-of-process implementations are interchangeable.
``slime_router_testing.contracts`` holds the test kit a third-party implementation runs against itself.

Per-request values that one plugin writes and another reads are the ``StashKey``s at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, Protocol, TypeVar, runtime_checkable

from .context import StashKey

if TYPE_CHECKING:  # pragma: no cover
    from .context import RequestContext
    from .workers import Worker

T = TypeVar("T")


class ComponentKey(Generic[T]):
    """A registry name that carries the component's type (``registry.get(KEY)`` is typed) and the protocol
    the registered object must satisfy (checked when it is registered)."""

    __slots__ = ("name", "protocol")

    def __init__(self, name: str, protocol: type) -> None:  # ``type``: mypy refuses a Protocol as ``type[T]``
        self.name = name
        self.protocol = protocol

    def __repr__(self) -> str:
        return f"ComponentKey({self.name!r}, {self.protocol.__name__})"


# --- the tokenizer ---------------------------------------------------------------------------------------


@runtime_checkable
class Tokenizer(Protocol):
    """The HuggingFace ``PreTrainedTokenizer`` subset the plugins use (a ``transformers`` tokenizer satisfies it).

    An optional ``backend_tokenizer`` (a ``tokenizers.Tokenizer``) is used for faster paths when present.
    """

    eos_token_id: int | None

    def __len__(self) -> int:
        """The vocabulary size with the added tokens: token ids lie in ``range(len(tokenizer))``."""
        ...

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]: ...

    def apply_chat_template(self, conversation: Any, tools: Any = ..., tokenize: bool = ...,
                            add_generation_prompt: bool = ..., **kwargs: Any) -> Any: ...


# --- the trajectory cache --------------------------------------------------------------------------------


@runtime_checkable
class PreparedPrompt(Protocol):
    """A prompt ready to send: ``input_ids`` = the recorded ids of its longest recorded prefix
    (``cached_tokens`` of them) + fresh ids of the rest (``fresh_tokens``). ``worker_url``: the worker that
    produced that prefix (for affinity), if any. Pass it back unchanged to ``record``."""

    input_ids: list[int]
    cached_tokens: int
    fresh_tokens: int
    worker_url: str | None


@runtime_checkable
class TrajectoryCache(Protocol):
    """Records the exact tokens of every trajectory and serves them back (component ``TRAJECTORY_CACHE``).

    - ``prepare(text)`` / ``prepare_ids(ids)``: the ids to send for a prompt (raise ``HTTPError`` 400 for a
      malformed one). An implementation that cannot serve right now raises ``CacheUnavailable``: the caller
      then passes the request through unrecorded.
    - ``record(prepared, reply, worker_url)``: record the prompt and the worker's SGLang-shaped reply (output
      ids, logprobs, weight versions); ``False`` when refused as larger than ``max_record_tokens``. When it
      returns, a ``prepare`` of the same conversation's next turn sees the record.
    - ``record_replies(prepared, replies, n, worker_url, raw)``: record a whole /generate reply (a batch of
      ``len(prepared)`` prompts x ``n`` samples, prompt-major); ``raw`` is the worker's reply bytes when the
      implementation can use them. Returns the refused replies with their sizes.
    - ``retrieve(text, strict)``: the ``/retrieve_from_text`` answer (tokens, loss_mask, rollout_logp,
      weight_versions, ...); with ``strict``, ``HTTPError`` 404/410 for text not (or no longer) recorded.
    - ``stats()``: a cheap snapshot (``refresh()`` brings it up to date where it lives elsewhere).
    - ``start()`` / ``close()``: called by the owning plugin's startup / shutdown.
    """

    max_record_tokens: int

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def prepare(self, text: str) -> PreparedPrompt: ...

    async def prepare_ids(self, ids: list[int]) -> PreparedPrompt: ...

    async def record(self, prepared: Any, response: dict, worker_url: str | None) -> bool: ...

    async def record_replies(self, prepared: list[Any], replies: list[Any], n: int, worker_url: str | None,
                             raw: bytes | None = None) -> list[tuple[dict, int]]: ...

    async def retrieve(self, text: str, strict: bool = False) -> dict[str, Any]: ...

    async def refresh(self) -> None: ...

    def stats(self) -> dict[str, Any]: ...


class RecordedChain(NamedTuple):
    """One record of a trajectory cache in a form another router can import (``ChainTransfer``): the recorded
    text (optional spans written out) and, per token, its id, the characters it covers (``widths``, summing to
    ``len(text)``), its logprob (float32, NaN unknown), loss mask (one byte each) and weight version; the optional
    spans ``(start, text)`` (an EOS the reply text omitted...), the worker, and how many of the tokens were the
    prompt (``prompt_tokens``; the rest were generated)."""

    text: str
    ids: Sequence[int]
    widths: Sequence[int]
    logprobs: Sequence[float]
    loss_mask: bytes
    versions: Sequence[str]
    markers: Sequence[tuple[int, str]]
    worker: str | None
    prompt_tokens: int


# Called with a function that builds the ``RecordedChain`` of a record just made (build it later, off the request
# path: the function holds what it needs and never changes). Called on the thread that recorded.
RecordListener = Callable[[Callable[[], RecordedChain]], None]


@runtime_checkable
class ChainTransfer(Protocol):
    """Optional, for a ``TRAJECTORY_CACHE`` whose records can be copied to another router (the sessions plugin's
    write-behind, ``--session-store-url``): ``add_record_listener(fn)`` has ``fn`` called once per record made by
    ``record``/``record_replies`` (not by ``import_chains``); ``import_chains(chains)`` inserts records as if they
    had been recorded here, in order (returns how many). The in-process ``TrajectoryCache`` implements it;
    ``--radix-tree-process``'s client does not."""

    def add_record_listener(self, listener: RecordListener) -> None: ...

    def remove_record_listener(self, listener: RecordListener) -> None: ...

    async def import_chains(self, chains: Sequence[RecordedChain]) -> int: ...


class CacheUnavailable(RuntimeError):
    """The trajectory cache cannot serve right now (e.g. its process is being restarted): pass through."""


# --- the balancer ----------------------------------------------------------------------------------------


@runtime_checkable
class Balancer(Protocol):
    """The balancing component: the policy in force and what it knows of each worker (read by metrics)."""

    policy: str

    def worker_stats(self) -> list[dict[str, Any]]:
        """One entry per worker: ``url`` and the balancer's view (in flight, failures, health, circuit...)."""
        ...

    def state(self) -> dict[str, Any]: ...


@runtime_checkable
class BalancingPolicy(Protocol):
    """One ``--policy``: ``select`` is synchronous (no ``await`` between choice and in-flight accounting) and
    gets a non-empty list of available workers this request has not tried."""

    name: str

    def select(self, ctx: RequestContext, workers: list[Worker]) -> Worker: ...

    def worker_added(self, worker: Worker) -> None: ...

    def worker_removed(self, worker: Worker) -> None: ...


# --- metrics ---------------------------------------------------------------------------------------------


@runtime_checkable
class StatsSource(Protocol):
    """A component whose counters the metrics sink exports (the trajectory cache, openai_compat, the sessions'
    write-behind: ``stats()["store"]``):
    ``stats()`` answers a snapshot, cheaply."""

    def stats(self) -> dict[str, Any]: ...


@runtime_checkable
class OpenAICompat(StatsSource, Protocol):
    """The OpenAI layer: its counters, and retrieval of a message list (the body of ``/retrieve_from_messages``)."""

    async def retrieve_messages(self, body: dict[str, Any]) -> dict[str, Any]: ...


@runtime_checkable
class HistoryTransfer(Protocol):
    """Optional, for an ``OPENAI_COMPAT`` component (the sessions plugin's write-behind, ``--session-store-url``):
    the exact-history entries it keeps (the text the model really generated for each answer, keyed by digests of the
    conversation before it and of the message as returned), so that another router renders the next turn of a
    conversation exactly as this one would. ``add_history_listener(fn)`` has ``fn(item)`` called after each entry
    is remembered (on the request's thread; not by ``import_history``); ``import_history(items)`` remembers entries
    made elsewhere, in order, within the component's own bound (returns how many it took). Items are JSON-able
    lists, stored as they are: the first-party openai_compat service (which implements it) uses ``[conversation
    key, message key, raw text, reasoning, prompt length, prompt digest (hex), generated tokens]``."""

    def add_history_listener(self, listener: Callable[[list[Any]], None]) -> None: ...

    def import_history(self, items: Sequence[list[Any]]) -> int: ...


@runtime_checkable
class Sessions(StatsSource, Protocol):
    """The session store (``slime_router_plugins.sessions.store.SessionStore``): a live session by id or None
    (raising for a finished or expired one), finishing one (hand over and free), and an overview for viewers."""

    def get(self, sid: str) -> Any: ...

    def finish(self, sid: str) -> Any: ...

    def overview(self, limit: int) -> list[dict[str, Any]]:
        """The most recent sessions' summaries with each trajectory's structure (no token lists)."""
        ...


# --- engines ---------------------------------------------------------------------------------------------


class EngineCall(NamedTuple):
    """One generation as an engine's HTTP call: the path and body to send, and what the engine needs to turn the
    reply back into SGLang's shape (``state``: e.g. the prompt ids and the weight version known at dispatch)."""

    path: str
    payload: bytes
    state: Any


@runtime_checkable
class Engine(Protocol):
    """An inference engine other than SGLang, as an adapter: the router's canonical generation request and reply
    are SGLang's ``/generate`` wire format (what clients send, what the trajectory cache and the OpenAI layer read);
    a worker whose engine is not SGLang gets each generation translated by ``call`` and its reply back by
    ``reply`` / ``stream``, so nothing above the upstream call knows. Registered with ``router.engines.register``;
    a worker's engine is chosen when it is added (``?engine=NAME``, or ``detect`` on its ``/openapi.json`` paths).
    All methods are synchronous except ``attach`` and ``stream``: they run on the request path."""

    name: str

    def detect(self, paths: frozenset[str]) -> bool:
        """Does a worker whose OpenAPI document lists these paths speak this engine?"""
        ...

    async def attach(self, worker: Worker, router: Any) -> None:
        """A worker of this engine was added: read what must be known before it serves (e.g. its endpoints, its
        weight version). Raises to refuse the worker (the message says why)."""
        ...

    def unsupported(self, body: dict[str, Any]) -> str | None:
        """Why this engine cannot serve this /generate body (an SGLang-only feature), or None."""
        ...

    def call(self, worker: Worker, body: dict[str, Any], stream: bool) -> EngineCall:
        """The engine's HTTP call for a /generate body (raises ``HTTPError`` 400 for what it cannot express)."""
        ...

    def reply(self, worker: Worker, call: EngineCall, data: bytes) -> bytes:
        """A 200 answer to ``call`` as the bytes of an SGLang /generate reply (one object, or a list)."""
        ...

    def stream(self, worker: Worker, call: EngineCall, chunks: Any) -> Any:
        """The SSE body of a streamed answer (an async iterator of bytes) as SGLang's SSE stream (async iterator of
        bytes, ``data: [DONE]`` at its end)."""
        ...

    def operation(self, worker: Worker, method: str, path: str, body: Any) -> tuple[str, str, Any] | None:
        """A control-plane request (SGLang's path and body) as this engine's ``(method, path, body)``; None when
        the engine has no equivalent."""
        ...

    def operation_done(self, worker: Worker, path: str, body: Any, status: int, answer: Any) -> tuple[int, Any]:
        """The engine's answer to a translated operation, as SGLang would answer it (and any state to keep, e.g.
        the weight version after ``/update_weight_version``)."""
        ...


@runtime_checkable
class MetricsSink(Protocol):
    """Where the router's numbers go (component ``METRICS``): each finished request is counted, and
    ``snapshot()`` answers everything as JSON (``GET /metrics``; the Prometheus view is built from the same)."""

    def on_finished(self, ctx: RequestContext) -> None: ...

    def snapshot(self) -> dict[str, Any]: ...


TOKENIZER: ComponentKey[Tokenizer] = ComponentKey("tokenizer", Tokenizer)
TRAJECTORY_CACHE: ComponentKey[TrajectoryCache] = ComponentKey("radix_tree", TrajectoryCache)
BALANCER: ComponentKey[Balancer] = ComponentKey("balancing", Balancer)
METRICS: ComponentKey[MetricsSink] = ComponentKey("metrics", MetricsSink)
OPENAI_COMPAT: ComponentKey[OpenAICompat] = ComponentKey("openai_compat", OpenAICompat)
SESSIONS: ComponentKey[Sessions] = ComponentKey("sessions", Sessions)
# By name: a component registered under one of these names with a plain string is checked all the same.
KEYS: dict[str, ComponentKey[Any]] = {k.name: k for k in (TOKENIZER, TRAJECTORY_CACHE, BALANCER, METRICS,
                                                          OPENAI_COMPAT, SESSIONS)}


# --- per-request values shared between plugins -------------------------------------------------------------


class Affinity(NamedTuple):
    """The worker that produced the longest recorded prefix of this request's prompt (its KV cache holds it),
    how many tokens that prefix is, and the prompt's length: written by whoever prepared the prompt
    (radix_tree on /generate, openai_compat), read by the cache_aware policy. (A NamedTuple: made per request.)"""

    worker_url: str
    cached_tokens: int
    prompt_tokens: int


AFFINITY: StashKey[Affinity] = StashKey("affinity")
# An explicit session (the OpenAI ``user`` field): requests with the same key go to the same worker.
SESSION_KEY: StashKey[str] = StashKey("session_key")
