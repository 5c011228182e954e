"""Meta-tests (after datasette): every hook is documented, and every hook is actually called by the core."""

from __future__ import annotations

import inspect
from pathlib import Path

import httpx
import pytest

from slime_router_core import hookimpl, hookspecs
from slime_router_testing import free_port

HOOKS = sorted(name for name, f in vars(hookspecs).items()
               if inspect.isfunction(f) and hasattr(f, "slime_router_spec"))
README = (Path(__file__).parent.parent / "README.md").read_text()


def test_there_are_hooks_for_every_extension_point():
    assert {"add_options", "register_components", "register_routes", "pre_request", "select_worker",
            "post_response", "worker_added", "worker_removed", "startup", "shutdown"} <= set(HOOKS)


@pytest.mark.parametrize("name", HOOKS)
def test_every_hook_is_documented_in_the_readme_and_has_a_docstring(name):
    spec = getattr(hookspecs, name)
    params = ", ".join(inspect.signature(spec).parameters)
    assert f"`{name}({params})`" in README, f"README's hook table lacks `{name}({params})`"
    assert spec.__doc__ and len(spec.__doc__.strip()) > 40


def test_request_hooks_are_declared_with_the_hookspecs_signatures():
    """``RequestHooks``' attribute types (for mypy) name exactly the request-path hooks, with their arguments."""
    from slime_router_core import router

    protocols = {name: vars(router)[ann] for name, ann in router.RequestHooks.__annotations__.items()
                 for ann in [ann.removesuffix(" | None")]}
    assert list(protocols) == list(router.REQUEST_HOOKS) == list(router.RequestHooks.__slots__)
    for name, proto in protocols.items():
        assert list(inspect.signature(proto.__call__).parameters)[1:] == \
            list(inspect.signature(getattr(hookspecs, name)).parameters), name


def test_decision_hooks_are_firstresult():
    assert hookspecs.select_worker.slime_router_spec["firstresult"] is True
    assert hookspecs.should_retry.slime_router_spec["firstresult"] is True
    assert hookspecs.post_response.slime_router_spec["firstresult"] is False


class Recorder:
    """Implements every hook and records the calls."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def _hit(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    @hookimpl
    def add_options(self, options):
        self._hit("add_options")
        options.add("--recorder-flag", default="x")

    @hookimpl
    def required_components(self):
        self._hit("required_components")
        return ["recorder_component"]

    @hookimpl
    def register_components(self, registry):
        self._hit("register_components")
        registry.register("recorder_component", self)

    @hookimpl
    def register_routes(self, app):
        self._hit("register_routes")

        @app.get("/recorder")
        async def recorder() -> dict:
            return dict(self.calls)

    @hookimpl
    async def startup(self, router):
        self._hit("startup")

    @hookimpl
    def shutdown(self):
        self._hit("shutdown")

    @hookimpl
    def worker_added(self, worker):
        self._hit("worker_added")

    @hookimpl
    def worker_removed(self, worker):
        self._hit("worker_removed")

    @hookimpl
    async def pre_request(self, ctx):
        self._hit("pre_request")
        ctx.inspect_stream = True

    @hookimpl
    def select_worker(self, ctx, workers):
        self._hit("select_worker")
        return None

    @hookimpl
    def worker_selected(self, ctx, worker):
        self._hit("worker_selected")

    @hookimpl
    def should_retry(self, ctx, worker, status, error, attempt):
        self._hit("should_retry")
        return None

    @hookimpl
    def upstream_failed(self, ctx, worker, status, error):
        self._hit("upstream_failed")

    @hookimpl
    def stream_chunk(self, ctx, chunk):
        self._hit("stream_chunk")
        chunk["recorded"] = True

    @hookimpl
    def post_response(self, ctx, response):
        self._hit("post_response")
        if isinstance(response, dict):
            response["post_response_saw_it"] = True

    @hookimpl
    def request_finished(self, ctx):
        self._hit("request_finished")


def test_every_hook_is_called_by_the_core(router, mock_worker):
    rec = Recorder()
    w = mock_worker()
    dead = f"http://127.0.0.1:{free_port()}"
    r = router(plugins=[], extra=[("recorder", rec)], worker_urls=[dead, w.url])
    got = httpx.post(r.url + "/generate", json={"text": "hi"}).json()  # the dead worker first: retried
    assert got["post_response_saw_it"] is True
    with httpx.stream("POST", r.url + "/generate", json={"text": "hi", "stream": True}) as s:
        lines = [ln for ln in s.iter_lines() if ln.startswith("data: {")]
    assert all('"recorded":true' in ln for ln in lines)  # stream_chunk edits reach the client
    httpx.post(r.url + "/remove_worker", json={"url": dead})
    r.stop()
    assert set(rec.calls) == set(HOOKS), f"never called: {set(HOOKS) - set(rec.calls)}"


def test_the_request_path_calls_hooks_in_pluggys_order_with_its_result_semantics():
    from slime_router_core.plugins import PluginManager
    from slime_router_core.router import RequestHooks

    order: list[str] = []

    def make(name: str, pick: bool, **marks):
        class P:
            @hookimpl(**marks)
            def select_worker(self, workers):
                order.append(name)
                return workers[0] if pick else None

            @hookimpl(**marks)
            def request_finished(self, ctx):
                order.append(name)
                return name
        return P()

    pm = PluginManager()
    pm.register(make("a", False), "a")
    pm.register(make("b", True), "b")
    pm.register(make("c", False, tryfirst=True), "c")
    pm.register(make("d", True, trylast=True), "d")
    fast = RequestHooks(pm)
    for call in (lambda h: h.select_worker(ctx=None, workers=["w"]), lambda h: h.request_finished(ctx=None)):
        order.clear()
        ours = call(fast)
        ours_order = list(order)
        order.clear()
        theirs = call(pm.hook)
        assert (ours, ours_order) == (theirs, order)
    assert RequestHooks(PluginManager()).pre_request is None  # no implementation: nothing to call
