"""The test kit for third-party implementations of the contracts in ``slime_router_core.contracts``.

A plugin that provides its own trajectory cache runs the kit against it in its own tests::

    from slime_router_testing.contracts import check_trajectory_cache

    def test_my_cache_keeps_the_contract(tokenizer):
        asyncio.run(check_trajectory_cache(MyCache(tokenizer, max_size=8_000), tokenizer))

Every check names what it expected and what it got. The replies fed to the cache are SGLang-shaped and as
unkind as real models are: a reply that starts with whitespace, generated ids that are *not* what re-tokenizing
their text gives, a final EOS whose text is not in the reply, a second weight version.
"""

from __future__ import annotations

from typing import Any

from slime_router_core.contracts import TrajectoryCache
from slime_router_core.errors import HTTPError
from slime_router_core.registry import missing_members

WORKER = "http://worker-a:30000"


def sglang_reply(text: str, ids: list[int], logprobs: list[float], version: str, finished: bool = True
                 ) -> dict[str, Any]:
    """A non-streaming SGLang /generate reply (``return_logprob``) for generated ``ids`` decoding to ``text``."""
    return {"text": text, "output_ids": ids, "meta_info": {
        "finish_reason": {"type": "stop", "matched": ids[-1]} if finished else None,
        "prompt_tokens": 0, "completion_tokens": len(ids), "weight_version": version,
        "output_token_logprobs": [[lp, tid, None] for lp, tid in zip(logprobs, ids)]}}


def _expect(ok: bool, what: str, got: Any = None) -> None:
    if not ok:
        raise AssertionError(f"trajectory cache contract: {what}" + (f" (got {got!r})" if got is not None else ""))


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


async def check_trajectory_cache(cache: TrajectoryCache, tokenizer: Any) -> None:
    """Check ``cache`` against the ``TrajectoryCache`` contract; raises ``AssertionError`` naming the broken rule.

    ``cache`` is fresh (nothing recorded) and built with a bound of at most 40,000 tokens (so that a record
    larger than ``max_record_tokens`` can be built); the kit calls ``start()`` first and ``close()`` last.
    """
    missing = missing_members(cache, TrajectoryCache)
    _expect(not missing, f"{type(cache).__name__} lacks members of the protocol: {missing}")
    _expect(0 < cache.max_record_tokens <= 10_000,
            "build the cache under test with a bound of at most 40,000 tokens", cache.max_record_tokens)
    eos = tokenizer.eos_token_id
    await cache.start()
    try:
        # 1. a prompt never seen: all fresh, the tokenizer's own ids
        prompt = "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
        p1 = await cache.prepare(prompt)
        _expect(p1.cached_tokens == 0 and p1.fresh_tokens == len(p1.input_ids) > 0,
                "a prompt never recorded is all fresh", (p1.cached_tokens, p1.fresh_tokens))
        _expect(list(p1.input_ids) == _encode(tokenizer, prompt), "fresh prompt ids are the tokenizer's")

        # 2. a reply that starts with whitespace, generated as a NON-canonical split, ending with EOS
        reply_text = " The ans" + "wer is 4."
        gen_ids = _encode(tokenizer, " The ans") + _encode(tokenizer, "wer is 4.")
        _expect(gen_ids != _encode(tokenizer, reply_text), "(kit precondition) the split must be non-canonical")
        gen_ids.append(eos)
        logps = [-0.125 * (i + 1) for i in range(len(gen_ids))]
        recorded = await cache.record(p1, sglang_reply(reply_text, gen_ids, logps, "v1"), WORKER)
        _expect(recorded is True, "record of a finished reply answers True", recorded)

        # 3. retrieval gives back exactly what the engine consumed and produced
        got = await cache.retrieve(prompt + reply_text)
        want = list(p1.input_ids) + gen_ids
        _expect(got["tokens"] == want, "retrieve returns the prompt ids + the generated ids as generated",
                got["tokens"])
        _expect(got["loss_mask"] == [0] * len(p1.input_ids) + [1] * len(gen_ids), "loss mask: prompt 0, reply 1",
                got["loss_mask"])
        _expect([round(x, 6) for x in got["rollout_logp"][len(p1.input_ids):]] == [round(x, 6) for x in logps],
                "the generated tokens' logprobs are the engine's", got["rollout_logp"])
        _expect(got["weight_versions"][len(p1.input_ids):] == ["v1"] * len(gen_ids),
                "each generated token carries its weight version", got["weight_versions"])
        _expect(got["fresh_tokens"] == 0 and got["exact_tokens"] == len(want) and got["evicted"] is False,
                "a fully recorded text has no fresh tokens", (got["fresh_tokens"], got["exact_tokens"]))
        _expect(len(got["tokens"]) == len(got["loss_mask"]) == len(got["rollout_logp"]) == len(got["weight_versions"])
                == got["token_length"], "every per-token list has one entry per token")

        # 4. the next turn (prepared right after the record: no waiting) reuses the recorded ids
        turn2 = prompt + reply_text + "<|im_end|>\n<|im_start|>user\nAnd 3 + 3?<|im_end|>\n<|im_start|>assistant\n"
        p2 = await cache.prepare(turn2)
        _expect(list(p2.input_ids[:len(want)]) == want and p2.cached_tokens >= len(want),
                "the next turn's prompt starts with the recorded ids", (p2.cached_tokens, len(want)))
        _expect(p2.worker_url == WORKER, "the prepared prompt names the worker that produced its prefix",
                p2.worker_url)

        # 5. two samples of one prompt in one reply (n=2), a second weight version
        a_ids, b_ids = _encode(tokenizer, " Six.") + [eos], _encode(tokenizer, " It is 6.") + [eos]
        replies = [sglang_reply(" Six.", a_ids, [-0.5] * len(a_ids), "v2"),
                   sglang_reply(" It is 6.", b_ids, [-0.25] * len(b_ids), "v2")]
        refused = await cache.record_replies([p2], replies, 2, WORKER)
        _expect(refused == [], "record_replies of small replies refuses none", refused)
        for text, ids in ((" Six.", a_ids), (" It is 6.", b_ids)):
            got = await cache.retrieve(turn2 + text)
            _expect(got["tokens"] == list(p2.input_ids) + ids and got["weight_versions"][-1] == "v2",
                    f"each sample of an n>1 reply is recorded ({text!r})", got["tokens"][-len(ids):])

        # 6. a prompt given as ids is sent as is and recorded under its decoded text
        ids_prompt = _encode(tokenizer, "Count: one two")
        p3 = await cache.prepare_ids(ids_prompt)
        _expect(list(p3.input_ids) == ids_prompt, "prepare_ids sends the client's ids unchanged", p3.input_ids)
        out = _encode(tokenizer, " three") + [eos]
        await cache.record(p3, sglang_reply(" three", out, [-1.0] * len(out), "v2"), WORKER)
        got = await cache.retrieve("Count: one two three")
        _expect(got["tokens"] == ids_prompt + out, "an ids prompt's trajectory is retrievable", got["tokens"])

        # 7. strict: text never recorded is refused, not made up
        try:
            await cache.retrieve("never produced through the router", strict=True)
        except HTTPError as e:
            _expect(e.status == 404, "strict retrieval of unrecorded text answers 404", e.status)
        else:
            _expect(False, "strict retrieval of unrecorded text must raise HTTPError 404")
        loose = await cache.retrieve("never produced through the router")
        _expect(sum(loose["loss_mask"]) == 0 and loose["fresh_tokens"] == len(loose["tokens"]) > 0,
                "unrecorded text is tokenized fresh with loss_mask 0", loose["fresh_tokens"])

        # 8. an unfinished (aborted) generation records only its prompt
        p4 = await cache.prepare("<|im_start|>user\nAborted question<|im_end|>\n")
        cut = _encode(tokenizer, " Partial")
        await cache.record(p4, sglang_reply(" Partial", cut, [-0.5] * len(cut), "v2", finished=False), WORKER)
        got = await cache.retrieve("<|im_start|>user\nAborted question<|im_end|>\n Partial")
        _expect(sum(got["loss_mask"]) == 0, "an unfinished generation's tokens are not recorded as generated",
                got["loss_mask"])

        # 9. a record larger than max_record_tokens is refused (and says so), the others stay
        p5 = await cache.prepare("<|im_start|>user\nWrite a lot<|im_end|>\n")
        big = [_encode(tokenizer, " word")[0]] * (cache.max_record_tokens + 1) + [eos]
        ok = await cache.record(p5, sglang_reply(" word" * (len(big) - 1), big, [-0.1] * len(big), "v2"), WORKER)
        _expect(ok is False, "a record larger than max_record_tokens answers False", ok)
        got = await cache.retrieve(prompt + reply_text)
        _expect(got["tokens"] == want, "a refused record leaves the other trajectories intact")

        # 10. statistics are a dict, after a refresh
        await cache.refresh()
        stats = cache.stats()
        _expect(isinstance(stats, dict), "stats() answers a dict", type(stats).__name__)
    finally:
        await cache.close()
