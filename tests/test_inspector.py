"""The trajectory inspector (``slime_router_plugins/inspector/``) in a real headless browser.

A router with radix_tree, openai_compat, sessions and inspector runs in front of a mock worker that answers like the
embedded demo's (a thinking Qwen3 that calls the prompt's tools, realistic token splits). Sessions are run through
it -- an OpenAI SDK tool loop on a session base URL (the weight version changes between its turns) and a GRPO group
(``/generate`` with ``n=4`` under ``X-Session-ID``) -- then the page is opened in Debian's Chromium driven by
Selenium, and what it renders is checked against ``GET /sessions/{sid}``: the number of tokens, of loss_mask=1
tokens, the weight-version bands, the segment reasons, a hovered token's id and logprob; the same for a pasted text
and message list against ``/retrieve_from_text`` / ``/retrieve_from_messages``. A screenshot is saved
(``SLIME_ROUTER_SCREENSHOT=docs/inspector.png`` writes the README's), and the load + render time of a 32k-token
trajectory is printed.

The browser is the system's (``apt-get install chromium chromium-driver``: ``/usr/bin/chromium`` and
``/usr/bin/chromedriver``), so Selenium Manager never downloads one; without it these tests fail, saying so.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from slime_router_core import Settings
from slime_router_core.tokenizers import BUILTIN_CHECKPOINT, load_tokenizer
from slime_router_testing import ServerThread, start_router
from slime_router_testing.mock_worker import MockWorkerConfig, create_mock_worker_app

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# where the screenshot goes: SLIME_ROUTER_SCREENSHOT=docs/inspector.png regenerates the README's (else a temporary
# file, so a test run leaves the tree clean)
SCREENSHOT = Path(os.environ.get("SLIME_ROUTER_SCREENSHOT") or tempfile.mkstemp(suffix=".png")[1])
WORKER = {"realistic": True, "realistic_seed": 2026, "mode": "think", "tool_call_rate": 0.8}
PLUGINS = ["radix_tree", "openai_compat", "sessions", "inspector"]
ATTEMPTS = 12  # agent episodes until one has a tool round (p = 0.2 each without one)
LONG = 32_768  # tokens of the large trajectory


def _load_agent() -> Any:
    spec = importlib.util.spec_from_file_location("inspector_openai_agent", ROOT / "examples/sessions/openai_agent.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


openai_agent = _load_agent()


# --- servers and the browser -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def worker() -> Iterator[str]:
    w = ServerThread(create_mock_worker_app(MockWorkerConfig(hf_checkpoint=BUILTIN_CHECKPOINT, **WORKER))).start()
    yield w.url
    w.stop()


@pytest.fixture(scope="module")
def router(worker: str) -> Iterator[str]:
    r = start_router(plugins=PLUGINS, settings=Settings(hf_checkpoint=BUILTIN_CHECKPOINT, worker_urls=[worker]))
    yield r.url
    r.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if missing:
        pytest.fail(f"The inspector's browser tests need Debian's Chromium and ChromeDriver ({', '.join(missing)} "
                    f"missing): apt-get install -y chromium chromium-driver", pytrace=False)
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("The inspector's browser tests need selenium: pip install selenium", pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1440,960", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    try:
        driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    except Exception as e:  # a broken install: say what failed, do not skip
        pytest.fail(f"Chromium could not be started through {CHROMEDRIVER}: {type(e).__name__}: {e}", pytrace=False)
    yield driver
    driver.quit()


def configure(worker: str, **kw: Any) -> None:
    httpx.post(worker + "/mock/configure", json=kw).raise_for_status()


@pytest.fixture(scope="module")
def runs(router: str, worker: str) -> dict[str, str]:
    """The sessions the page shows: an agent episode with a tool round (two weight versions), a GRPO group."""
    configure(worker, **WORKER, weight_version="v1", version_every=1)  # each generation bumps the version
    agent = None
    for k in range(ATTEMPTS):
        sid = f"agent-episode-{k}"
        run = openai_agent.run_agent(f"{router}/sessions/{sid}/v1", "What is the weather in Paris?", max_turns=4)
        if run.tool_rounds:
            agent = sid
            break
        httpx.delete(f"{router}/sessions/{sid}")
    assert agent is not None, f"no tool round in {ATTEMPTS} episodes"
    configure(worker, **WORKER, weight_version="v7", version_every=0)
    grpo = "grpo-step-1"
    r = httpx.post(f"{router}/generate", headers={"X-Session-ID": grpo, "X-Session-Metadata": '{"group": "g7"}'},
                   json={"text": "<|im_start|>user\nSolve 17 * 23.<|im_end|>\n<|im_start|>assistant\n",
                         "sampling_params": {"n": 4, "max_new_tokens": 48, "temperature": 1.0}}, timeout=60)
    r.raise_for_status()
    # an agent that edits its history: the second prompt keeps the first and departs from its reply -> a rewrite
    rewrite = "rewrite-episode"
    first = "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"
    for text in (first, first + "\u00a7 (edited) blue<|im_end|>\n<|im_start|>user\nAnother?<|im_end|>\n"
                               "<|im_start|>assistant\n"):
        httpx.post(f"{router}/generate", headers={"X-Session-ID": rewrite}, timeout=60,
                   json={"text": text, "sampling_params": {"max_new_tokens": 16}}).raise_for_status()
    configure(worker, **WORKER)
    return {"agent": agent, "grpo": grpo, "rewrite": rewrite}


def session(router: str, sid: str) -> dict[str, Any]:
    r = httpx.get(f"{router}/sessions/{sid}")
    r.raise_for_status()
    return r.json()


# --- page helpers ------------------------------------------------------------------------------------------


def wait(driver: Any, condition: Any, timeout: float = 30.0) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)


def css(driver: Any, selector: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def rendered(driver: Any, title_part: str) -> None:
    """Wait until the trajectory view shows ``title_part`` and every token is in the DOM."""
    wait(driver, lambda d: title_part in d.execute_script("return document.getElementById('traj-title').textContent")
         and d.execute_script("return document.getElementById('tokens').dataset.state") == "done")


def open_page(driver: Any, router: str, fragment: str = "") -> None:
    driver.get(f"{router}/inspector{fragment}")
    wait(driver, lambda d: css(d, "#list li"))


def select(driver: Any, sid: str, index: int) -> None:
    button = wait(driver, lambda d: (css(d, f'button.traj[data-sid="{sid}"][data-index="{index}"]') or [None])[0])
    button.click()
    rendered(driver, f"session {sid} · trajectory #{index} ")


def dom_summary(driver: Any) -> dict[str, Any]:
    return driver.execute_script("""
        const q = (s) => document.querySelectorAll(s);
        return {tokens: q('#tokens .tok').length, masked: q('#tokens .tok.m1').length,
                fresh: q('#tokens .tok.fresh').length,
                bands: [...q('#bands .band')].map((b) => [b.dataset.version, +b.dataset.start, +b.dataset.count]),
                reasons: [...q('#reasons .reason')].map((r) => r.textContent),
                breaks: [...q('#tokens .brk')].map((b) => [b.className, b.dataset.label]),
                counts: Object.fromEntries([...q('#counts dd')].map((d) => [d.id, d.textContent])),
                text: [...q('#tokens .tok')].slice(0, 400).map((t) => t.textContent)};
    """)


def version_runs(versions: list[str]) -> list[list[Any]]:
    runs: list[list[Any]] = []
    for i, v in enumerate(versions):
        v = "" if v is None else v  # no version: a fresh token (the page's data-version is empty)
        if runs and runs[-1][0] == v:
            runs[-1][2] += 1
        else:
            runs.append([v, i, 1])
    return runs


def check_trajectory(driver: Any, t: dict[str, Any]) -> dict[str, Any]:
    """The rendered view of trajectory ``t`` (a ``GET /sessions/{sid}`` item) says what the API says."""
    got = dom_summary(driver)
    assert got["tokens"] == t["token_length"] == len(t["tokens"])
    assert got["masked"] == sum(t["loss_mask"]) == t["generated_tokens"]
    assert got["fresh"] == 0
    assert got["bands"] == version_runs(t["weight_versions"]) and got["bands"]
    assert got["counts"]["count-tokens"] == str(t["token_length"])
    assert got["counts"]["count-loss-mask-1"] == str(t["generated_tokens"])
    assert got["reasons"][0].startswith(t["reason"] + ":")
    if t["reason"] != "new":
        assert f"trajectory #{t['parent']}" in got["reasons"][0] and str(t["diverges_at"]) in got["reasons"][0]
        assert [b for b in got["breaks"] if "diverge" in b[0] and f"(token {t['diverges_at']})" in b[1]]
    turn_breaks = [b for b in got["breaks"] if "turn" in b[0].split()]
    assert len(turn_breaks) == len(t["turns"]) - 1
    return got


def hover(driver: Any, i: int) -> dict[str, str]:
    from selenium.webdriver.common.action_chains import ActionChains

    el = css(driver, f'#tokens .tok[data-i="{i}"]')[0]
    driver.execute_script("arguments[0].scrollIntoView({block: 'nearest'}); window.scrollTo(0, 0)", el)
    ActionChains(driver).move_to_element(el).perform()
    wait(driver, lambda d: d.execute_script("const t = document.getElementById('tip'); "
                                            f"return !t.hidden && t.dataset.i === '{i}'"))
    return driver.execute_script("const t = document.getElementById('tip'); "
                                 "return {text: t.textContent, id: t.dataset.id, logprob: t.dataset.logprob}")


# --- tests -------------------------------------------------------------------------------------------------


def test_sessions_render_as_the_api_returns_them(browser, router, runs):
    tok = load_tokenizer(BUILTIN_CHECKPOINT)
    open_page(browser, router)
    agent = session(router, runs["agent"])
    t = agent["trajectories"][0]
    assert len(t["turns"]) >= 2 and len(set(t["weight_versions"])) >= 2  # a tool round, two weight versions
    select(browser, runs["agent"], 0)
    got = check_trajectory(browser, t)
    assert len(got["bands"]) >= 2
    first = [tok.decode([i], skip_special_tokens=False) for i in t["tokens"][:400]]
    assert got["text"] == [(s.replace("\n", "↵\n") or "∅") for s in first if "\ufffd" not in s] or \
        any("\ufffd" in s for s in first)
    # hovering a generated token shows its id, logprob, version and turn
    i = max(k for k, m in enumerate(t["loss_mask"]) if m == 1)
    tip = hover(browser, i)
    assert tip["id"] == str(t["tokens"][i])
    assert math.isclose(float(tip["logprob"]), t["rollout_logp"][i], rel_tol=1e-6, abs_tol=1e-9)
    assert f"id: {t['tokens'][i]}" in tip["text"] and f"version: {t['weight_versions'][i]}" in tip["text"]
    assert f"turn: {len(t['turns'])} (output" in tip["text"] and "loss_mask: 1" in tip["text"]
    # the screenshot: a token the model generated in its tool call, the weight-version change nearby
    hover(browser, t["turns"][0]["prompt_tokens"] + t["turns"][0]["output_tokens"] - 8)
    browser.save_screenshot(str(SCREENSHOT))
    assert SCREENSHOT.stat().st_size > 10_000

    grpo = session(router, runs["grpo"])
    assert len(grpo["trajectories"]) == 4 and grpo["metadata"] == {"group": "g7"}
    reasons = sorted(t["reason"] for t in grpo["trajectories"])
    assert reasons == ["branch", "branch", "branch", "new"]
    for t in grpo["trajectories"]:
        select(browser, runs["grpo"], t["index"])
        check_trajectory(browser, t)
        assert {b[0] for b in dom_summary(browser)["bands"]} == {"v7"}
    k = next(k for k, m in enumerate(t["loss_mask"]) if m == 0)  # a prompt token: no logprob
    tip = hover(browser, k)
    assert tip["id"] == str(t["tokens"][k]) and "not generated" in tip["text"] and "turn: 1 (prompt" in tip["text"]

    rewrite = session(router, runs["rewrite"])
    assert [t["reason"] for t in rewrite["trajectories"]] == ["new", "rewrite"]
    for t in rewrite["trajectories"]:
        select(browser, runs["rewrite"], t["index"])
        check_trajectory(browser, t)


def test_list_filters(browser, router, runs):
    open_page(browser, router)

    def listed() -> set[str]:
        return {li.get_attribute("data-sid") for li in css(browser, "#list li.session[data-sid]")}

    assert {runs["agent"], runs["grpo"]} <= listed()
    box = css(browser, "#f-group")[0]
    box.send_keys("g7")
    assert listed() == {runs["grpo"]}
    box.clear()
    browser.execute_script("document.getElementById('f-group').dispatchEvent(new Event('input'))")
    versions = {v for t in session(router, runs["agent"])["trajectories"] for v in t["weight_versions"]}
    assert "v7" not in versions
    v = css(browser, "#f-version")[0]
    v.send_keys("v7")
    assert runs["grpo"] in listed() and runs["agent"] not in listed()
    v.clear()
    browser.execute_script("document.getElementById('f-version').dispatchEvent(new Event('input'))")
    sid = css(browser, "#f-session")[0]
    sid.send_keys(runs["agent"])
    assert listed() == {runs["agent"]}
    css(browser, "#f-rewrite")[0].click()  # the agent only appended to its history: no rewrite
    assert listed() == set()
    sid.clear()
    browser.execute_script("document.getElementById('f-session').dispatchEvent(new Event('input'))")
    assert listed() == {runs["rewrite"]}
    assert [b.get_attribute("data-index") for b in css(browser, "#list button.traj")] == ["1"]


def test_pasted_text_and_messages(browser, router, runs):
    open_page(browser, router)
    text = "A text this router never generated: it is tokenized fresh, loss_mask 0."
    api = httpx.post(f"{router}/retrieve_from_text", json={"text": text}).json()
    box = css(browser, "#paste")[0]
    box.send_keys(text)
    css(browser, "#paste-go")[0].click()
    rendered(browser, "pasted text #1")
    got = dom_summary(browser)
    assert got["tokens"] == api["token_length"] == api["fresh_tokens"] == got["fresh"] and got["masked"] == 0
    assert got["counts"]["count-fresh"] == str(api["fresh_tokens"])

    # the GRPO prompt + its first sample, as a message list: served as recorded
    grpo = session(router, runs["grpo"])
    t = grpo["trajectories"][0]
    tok = load_tokenizer(BUILTIN_CHECKPOINT)
    answer = tok.decode(t["tokens"][t["turns"][0]["prompt_tokens"]:], skip_special_tokens=False)
    answer = answer.removesuffix("<|im_end|>")
    body = {"messages": [{"role": "user", "content": "Solve 17 * 23."}, {"role": "assistant", "content": answer}]}
    api = httpx.post(f"{router}/retrieve_from_messages", json=body).json()
    css(browser, 'input[name="paste-kind"][value="messages"]')[0].click()
    box.clear()
    browser.execute_script("document.getElementById('paste').value = arguments[0]", json.dumps(body))
    css(browser, "#paste-go")[0].click()
    rendered(browser, "pasted messages #2")
    got = dom_summary(browser)
    assert got["tokens"] == api["token_length"] and got["masked"] == sum(api["loss_mask"])
    assert got["fresh"] == api["fresh_tokens"]
    assert got["counts"]["count-exact"] == str(api["exact_tokens"])
    assert got["bands"] == version_runs(api["weight_versions"])


def test_cache_audit_counters_are_shown(browser, router, runs):
    open_page(browser, router)
    wait(browser, lambda d: css(d, "#audit .counter"))
    stats = httpx.get(f"{router}/radix_tree/stats").json()
    shown = browser.execute_script("return document.getElementById('audit').textContent")
    for name in stats["audit"]:
        assert name.replace("_", " ") + ":" in shown


def test_a_32k_token_trajectory_loads_and_renders(browser, router):
    tok = load_tokenizer(BUILTIN_CHECKPOINT)
    words = " ".join(f"w{i % 997} alpha{i % 13}" for i in range(20_000))
    ids = tok.encode(words)[:LONG - 64]
    sid = f"long-{uuid.uuid4().hex[:8]}"
    r = httpx.post(f"{router}/generate", headers={"X-Session-ID": sid}, timeout=120,
                   json={"input_ids": ids, "sampling_params": {"max_new_tokens": 64, "ignore_eos": True}})
    r.raise_for_status()
    t = session(router, sid)["trajectories"][0]
    assert t["token_length"] == LONG
    browser.get("about:blank")  # a real load (from /inspector, a new fragment alone would not reload the page)
    start = time.perf_counter()
    browser.get(f"{router}/inspector#session={sid}&t=0")
    rendered(browser, f"session {sid} · trajectory #0 ")
    wall = time.perf_counter() - start
    timing = browser.execute_script("""
        const nav = performance.getEntriesByType('navigation')[0];
        return Object.assign({dom_content_loaded_ms: nav.domContentLoadedEventEnd}, window.inspectorTiming);""")
    assert timing["tokens"] == LONG
    got = dom_summary(browser)
    assert got["tokens"] == LONG and got["masked"] == t["generated_tokens"] == 64
    # responsive: hovering a token once it is all rendered answers at once
    tip = hover(browser, LONG - 1)
    assert tip["id"] == str(t["tokens"][-1])
    chunk = f"{timing['chunk']}-{2 * timing['chunk']}"
    print(f"\ninspector, {LONG}-token trajectory: page loaded (DOMContentLoaded) {timing['dom_content_loaded_ms']:.0f} "
          f"ms; session + token texts fetched {timing['fetch_ms']:.0f} ms; first chunk ({chunk} tokens) shown "
          f"{timing['first_chunk_ms']:.0f} ms later; all rendered {timing['render_ms']:.0f} ms; "
          f"navigation start -> every token in the DOM {timing['at_ms']:.0f} ms (wall clock {wall * 1000:.0f} ms)")
    httpx.delete(f"{router}/sessions/{sid}")


# --- without a browser: standing down, no request-path hook, the key ---------------------------------------


def test_only_routes_and_stands_down_without_a_trajectory_cache():
    from slime_router_plugins.inspector import plugin

    r = start_router(plugins=["inspector"], settings=Settings())
    try:
        assert httpx.get(f"{r.url}/inspector").status_code == 404
        assert not r.app.router.plugins.pm.is_registered(plugin)  # type: ignore[attr-defined]
    finally:
        r.stop()
    hooks = {name for name in dir(plugin) if hasattr(getattr(plugin, name), "slime_router_impl")}
    assert hooks == {"register_components", "register_routes"}


def test_behind_the_data_plane_key(worker):
    """The page and its files hold no data and open in a plain browser load; everything it fetches needs the key."""
    r = start_router(plugins=PLUGINS, settings=Settings(hf_checkpoint=BUILTIN_CHECKPOINT, worker_urls=[worker],
                                                       api_key="data-key"))
    try:
        for path in ("/inspector", "/inspector/static/inspector.js"):
            assert httpx.get(r.url + path).status_code == 200, path
        for path in ("/inspector/sessions", "/sessions"):
            assert httpx.get(r.url + path).status_code == 401, path
            ok = httpx.get(r.url + path, headers={"Authorization": "Bearer data-key"})
            assert ok.status_code == 200, path
        assert httpx.post(r.url + "/inspector/tokens", json={"ids": [1, 2]}).status_code == 401
        got = httpx.post(r.url + "/inspector/tokens", json={"ids": [71, 151667]},
                         headers={"Authorization": "Bearer data-key"})
        assert got.json() == {"texts": ["h", "<think>"]}
        bad = httpx.post(r.url + "/inspector/tokens", json={"ids": [10**9]},
                         headers={"Authorization": "Bearer data-key"})
        assert bad.status_code == 400
    finally:
        r.stop()
    js = (ROOT / "slime_router_plugins/inspector/static/inspector.js").read_text()
    assert 'headers["Authorization"] = "Bearer " + key' in js and "sessionStorage" in js
    assert "http://" not in js and "https://" not in js  # nothing fetched from anywhere but the router


def test_static_files_ship_as_package_data():
    import tomllib

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert cfg["project"]["entry-points"]["slime_router"]["inspector"] == "slime_router_plugins.inspector.plugin"
    assert "slime_router_plugins.inspector" in cfg["tool"]["setuptools"]["packages"]
    assert "inspector/static/*" in cfg["tool"]["setuptools"]["package-data"]["slime_router_plugins"]
    static = ROOT / "slime_router_plugins/inspector/static"
    assert sorted(p.name for p in static.iterdir()) == ["index.html", "inspector.css", "inspector.js"]
    for p in static.iterdir():
        assert "//cdn" not in p.read_text() and "https://" not in p.read_text()
