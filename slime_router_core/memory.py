"""Returning memory to the system after start-up."""

from __future__ import annotations

import ctypes
import gc


def release_free_heap() -> None:
    """Collect garbage, then give the heap's free pages back to the system (glibc's ``malloc_trim``; elsewhere
    only the collection).

    Loading a tokenizer parses a large JSON file and builds the vocabulary several times over (transformers'
    Python copies, the Rust backend, the tiktoken fast path and its check); glibc keeps the freed memory in the
    process unless asked. Called once a process has loaded what it serves with: the router when it starts
    listening, the cache process (``--radix-tree-process``) before it answers "ready"."""
    gc.collect()
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return
    trim(0)
