"""vllm plugin: registers the vLLM engine (``engine.py``), so vLLM workers can join the pool.

A worker is vLLM when it is added with ``?engine=vllm`` (``--worker-url http://host:port#engine=vllm``) or when its
``/openapi.json`` lists ``/inference/v1/generate`` (or ``/v1/completions`` with ``/weight_info``) and not SGLang's
``/generate``. Supported vLLM versions and what vLLM cannot do: ``docs/engines.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from slime_router_core import hookimpl

from .engine import VLLMEngine

if TYPE_CHECKING:  # pragma: no cover
    from slime_router_core.registry import ComponentRegistry
    from slime_router_core.router import Router


@hookimpl
def register_components(registry: ComponentRegistry, router: Router) -> None:
    router.engines.register(VLLMEngine(router))
