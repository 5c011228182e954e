"""vllm plugin: vLLM workers behind the same router, trajectory cache and OpenAI API (``engine.py``)."""

from .engine import VLLMEngine

__all__ = ["VLLMEngine"]
