"""The contracts between plugins (slime_router_core.contracts): both trajectory caches keep one contract, the test
kit catches an implementation that breaks it, the registry refuses a component that does not implement its key's
protocol, and a third-party cache registered by another plugin serves /generate, /retrieve_from_text and the OpenAI
API through the first-party hooks and routes."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from openai import OpenAI

from slime_router_core import Settings, hookimpl
from slime_router_core.context import RequestContext, StashKey
from slime_router_core.contracts import (
    AFFINITY,
    TOKENIZER,
    TRAJECTORY_CACHE,
    Affinity,
    ComponentKey,
    TrajectoryCache,
)
from slime_router_core.registry import ComponentRegistry
from slime_router_core.tokenizers import BUILTIN_CHECKPOINT, load_tokenizer
from slime_router_plugins.radix_tree import TrajectoryCache as InProcessCache
from slime_router_plugins.radix_tree.process import CacheProcessClient
from slime_router_testing.contracts import check_trajectory_cache


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(BUILTIN_CHECKPOINT)


def test_the_in_process_cache_keeps_the_contract(tok):
    asyncio.run(check_trajectory_cache(InProcessCache(tok, max_size=8_000), tok))


def test_the_cache_process_keeps_the_same_contract(tok):
    asyncio.run(check_trajectory_cache(CacheProcessClient(BUILTIN_CHECKPOINT, max_size=8_000), tok))


class Delegating:
    """A third-party cache: the contract's methods forwarded to an in-process cache, every call counted."""

    def __init__(self, inner: InProcessCache) -> None:
        self.inner = inner
        self.max_record_tokens = inner.max_record_tokens
        self.calls: dict[str, int] = {}

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    async def start(self) -> None:
        self._count("start")

    async def close(self) -> None:
        self._count("close")

    async def prepare(self, text: str) -> Any:
        self._count("prepare")
        return await self.inner.prepare(text)

    async def prepare_ids(self, ids: list[int]) -> Any:
        self._count("prepare_ids")
        return await self.inner.prepare_ids(ids)

    async def record(self, prepared: Any, response: dict, worker_url: str | None) -> bool:
        self._count("record")
        return await self.inner.record(prepared, response, worker_url)

    async def record_replies(self, prepared: list[Any], replies: list[Any], n: int, worker_url: str | None,
                             raw: bytes | None = None) -> list[tuple[dict, int]]:
        self._count("record_replies")
        return await self.inner.record_replies(prepared, replies, n, worker_url, raw)

    async def retrieve(self, text: str, strict: bool = False) -> dict[str, Any]:
        self._count("retrieve")
        return await self.inner.retrieve(text, strict)

    async def refresh(self) -> None:
        self._count("refresh")

    def stats(self) -> dict[str, Any]:
        return {**self.inner.stats(), "delegated_calls": dict(self.calls)}


class Retokenizing(Delegating):
    """A broken cache: serves back the re-tokenized text instead of the recorded ids (the classic drift)."""

    async def retrieve(self, text: str, strict: bool = False) -> dict[str, Any]:
        got = dict(await self.inner.retrieve(text, strict))
        got["tokens"] = self.inner.tokenizer.encode(text, add_special_tokens=False)
        return got


def test_the_kit_catches_a_cache_that_drifts(tok):
    with pytest.raises(AssertionError, match="generated ids as generated"):
        asyncio.run(check_trajectory_cache(Retokenizing(InProcessCache(tok, max_size=8_000)), tok))


def test_the_registry_refuses_a_component_that_breaks_its_protocol(tok):
    registry = ComponentRegistry()
    with pytest.raises(TypeError, match=r"does not implement .*TrajectoryCache: missing .*prepare_ids"):
        registry.register(TRAJECTORY_CACHE, object(), owner="broken")

    class SyncRecord(Delegating):
        def record(self, prepared: Any, response: dict, worker_url: str | None) -> bool:  # type: ignore[override]
            return True

    with pytest.raises(TypeError, match=r"record \(must be async\)"):
        registry.register(TRAJECTORY_CACHE, SyncRecord(InProcessCache(tok)), owner="sync")
    registry.register(TOKENIZER, tok, owner="core")  # a transformers tokenizer is a Tokenizer
    cache = InProcessCache(tok)
    registry.register(TRAJECTORY_CACHE, cache, owner="radix_tree")
    assert registry.get(TRAJECTORY_CACHE) is cache and registry.get("radix_tree") is cache
    assert registry.owner(TRAJECTORY_CACHE) == "radix_tree"
    assert isinstance(cache, TrajectoryCache) and isinstance(TRAJECTORY_CACHE, ComponentKey)


def test_stash_keys_are_typed_and_do_not_collide():
    ctx = RequestContext("/generate", {"text": "x"})
    mine, theirs = StashKey[int]("count"), StashKey[int]("count")  # same name, different owners
    ctx.stash[mine] = 1
    assert theirs not in ctx.stash and ctx.stash.get(theirs) is None and ctx.stash[mine] == 1
    with pytest.raises(KeyError, match="count"):
        ctx.stash[theirs]
    assert ctx.stash.pop(mine) == 1 and mine not in ctx.stash
    ctx.stash[AFFINITY] = Affinity("http://w", 3, 10)
    assert ctx.stash[AFFINITY].cached_tokens == 3


class ThirdPartyCachePlugin:
    """Provides the trajectory cache; the radix_tree plugin's hooks and routes use it."""

    def __init__(self) -> None:
        self.cache: Delegating | None = None

    @hookimpl(tryfirst=True)
    def register_components(self, registry: ComponentRegistry) -> None:
        self.cache = Delegating(InProcessCache(registry.get(TOKENIZER)))
        registry.register(TRAJECTORY_CACHE, self.cache, owner="third_party")


def test_a_third_party_cache_serves_the_first_party_routes(router, mock_worker):
    w = mock_worker(seed=1, max_random_tokens=6)
    plugin = ThirdPartyCachePlugin()
    r = router(plugins=["radix_tree", "openai_compat"], extra=[("third_party", plugin)],
               settings=Settings(hf_checkpoint=BUILTIN_CHECKPOINT, worker_urls=[w.url]))
    with httpx.Client(timeout=30) as c:
        prompt = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        reply = c.post(r.url + "/generate", json={"text": prompt}).json()
        got = c.post(r.url + "/retrieve_from_text", json={"text": prompt + reply["text"]}).json()
        assert sum(got["loss_mask"]) == reply["meta_info"]["completion_tokens"] > 0
        stats = c.get(r.url + "/radix_tree/stats").json()
    chat = OpenAI(base_url=r.url + "/v1", api_key="none", max_retries=0).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Hello"}], max_tokens=5)
    assert chat.choices[0].message is not None
    assert plugin.cache is not None
    calls = plugin.cache.calls
    assert calls["start"] == 1 and calls["prepare"] >= 2 and calls["record_replies"] == 1 and calls["record"] == 1
    assert calls["retrieve"] == 1 and calls["refresh"] == 1 and stats["delegated_calls"]["retrieve"] == 1


def test_a_contract_name_is_checked_even_when_registered_by_string():
    with pytest.raises(TypeError, match=r"'radix_tree'.*missing .*prepare"):
        ComponentRegistry().register("radix_tree", object(), owner="by_name")
