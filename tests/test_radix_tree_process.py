"""The trajectory cache in its own process (--radix-tree-process): what only that mode has.

Exactness in this mode is covered by running test_radix_tree_e2e.py and test_openai_exact.py in both modes;
here: the child's life cycle (death, restart, shutdown), statistics across the process boundary.
"""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

from slime_router_core import Settings
from slime_router_core.tokenizers import BUILTIN_CHECKPOINT


def start(router, mock_worker, plugins=("radix_tree",)):
    w = mock_worker(seed=0, max_random_tokens=8)
    settings = Settings(hf_checkpoint=BUILTIN_CHECKPOINT, worker_urls=[w.url], extra={"radix_tree_process": True})
    return router(plugins=list(plugins), settings=settings)


def conversation(c: httpx.Client, url: str, turns: int, tag: str) -> str:
    """``turns`` chat turns; returns the recorded trajectory (the last prompt + its reply)."""
    text = f"<|im_start|>user\nConversation {tag}<|im_end|>\n<|im_start|>assistant\n"
    for t in range(turns):
        if t:
            text += f"<|im_end|>\n<|im_start|>user\nturn {t}<|im_end|>\n<|im_start|>assistant\n"
        r = c.post(url + "/generate", json={"text": text, "sampling_params": {"max_new_tokens": 8}})
        assert r.status_code == 200, r.text
        text += r.json()["text"]
    return text


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_for(cond, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_stats_cross_the_process_boundary(router, mock_worker):
    r = start(router, mock_worker, plugins=("radix_tree", "metrics"))
    with httpx.Client(timeout=30) as c:
        conversation(c, r.url, 3, "stats")
        stats = c.get(r.url + "/radix_tree/stats").json()
        assert stats["records"] == 3 and stats["cache_hits"] == 2 and stats["cache_misses"] == 1
        assert stats["process"]["running"] and stats["process"]["pid"] != os.getpid()
        assert alive(stats["process"]["pid"])
        metrics = c.get(r.url + "/metrics").json()
        assert metrics["cache_stats"]["records"] == 3  # fetched from the child before the snapshot
        conversation(c, r.url, 2, "more")
        prom = c.get(r.url + "/metrics", params={"format": "prometheus"}).text
        assert "radix" in prom or "cache" in prom
        assert c.get(r.url + "/metrics").json()["cache_stats"]["records"] == 5
        # every prepare is let go of in the child: by its record, or when the router drops it (streams)
        with c.stream("POST", r.url + "/generate", json={"text": "a streamed one", "stream": True}) as resp:
            assert resp.status_code == 200 and "[DONE]" in "".join(resp.iter_text())
        wait_for(lambda: c.get(r.url + "/radix_tree/stats").json()["open_prepares"] == 0)
        assert c.get(r.url + "/radix_tree/stats").json()["records"] == 6


def test_child_death_is_survived_and_the_cache_restarts(router, mock_worker):
    r = start(router, mock_worker)
    with httpx.Client(timeout=30) as c:
        first = conversation(c, r.url, 2, "before")
        assert c.post(r.url + "/retrieve_from_text", json={"text": first}).json()["fresh_tokens"] == 0
        pid = c.get(r.url + "/radix_tree/stats").json()["process"]["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not alive(pid))
        # while it is down or restarting, generation is served (unrecorded) and nothing hangs
        for _ in range(5):
            resp = c.post(r.url + "/generate", json={"text": "during the restart", "sampling_params": {}})
            assert resp.status_code == 200, resp.text

        def restarted() -> bool:
            s = c.get(r.url + "/radix_tree/stats").json()
            return s["process"]["running"] and s["process"]["restarts"] == 1

        wait_for(restarted, 60)
        stats = c.get(r.url + "/radix_tree/stats").json()
        assert stats["process"]["pid"] != pid and alive(stats["process"]["pid"])
        # the records of the dead process are gone (said so in the log); new ones are exact again
        lost = c.post(r.url + "/retrieve_from_text", json={"text": first}).json()
        assert lost["generated_tokens"] == 0
        after = conversation(c, r.url, 3, "after")
        got = c.post(r.url + "/retrieve_from_text", json={"text": after, "strict": True})
        assert got.status_code == 200 and got.json()["fresh_tokens"] == 0
        assert got.json()["generated_tokens"] > 0


def test_router_shutdown_stops_the_child(router, mock_worker):
    r = start(router, mock_worker)
    pid = httpx.get(r.url + "/radix_tree/stats").json()["process"]["pid"]
    assert alive(pid)
    r.stop()
    wait_for(lambda: not alive(pid), 15)


def test_option_needs_a_checkpoint():
    from slime_router_core.app import build_app
    from slime_router_core.errors import PluginLoadError
    from slime_router_core.plugins import load_plugins
    from slime_router_core.tokenizers import load_tokenizer

    class Tok:  # a tokenizer registered by hand: nothing the child could load
        def __init__(self) -> None:
            self.inner = load_tokenizer(BUILTIN_CHECKPOINT)
            self.eos_token_id = self.inner.eos_token_id

        def __len__(self):
            return len(self.inner)

        def encode(self, text, add_special_tokens=False):
            return self.inner.encode(text, add_special_tokens=add_special_tokens)

        def decode(self, ids, skip_special_tokens=False):
            return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)

        def convert_ids_to_tokens(self, ids):
            return self.inner.convert_ids_to_tokens(ids)

        def apply_chat_template(self, conversation, tools=None, tokenize=False, add_generation_prompt=True, **kw):
            return self.inner.apply_chat_template(conversation, tools=tools, tokenize=tokenize,
                                                  add_generation_prompt=add_generation_prompt, **kw)

    from slime_router_core.hookspecs import hookimpl

    class GivesTokenizer:
        @hookimpl(tryfirst=True)
        def register_components(self, registry, router):
            registry.register("tokenizer", Tok())

    pm = load_plugins(["radix_tree"], extra=[("gives_tokenizer", GivesTokenizer())])
    with pytest.raises(PluginLoadError, match="--radix-tree-process needs --hf-checkpoint"):
        build_app(Settings(extra={"radix_tree_process": True}), pm)
