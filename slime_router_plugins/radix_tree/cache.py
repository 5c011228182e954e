"""TrajectoryCache: the "radix_tree" component (prepare / record / retrieve / stats / tree).

Text and tokens are lined up through a *canonical text*: the prompt text followed by the exact
decoding of every generated token with special tokens written out ("<|im_end|>"). Parts of the
canonical text that the worker's reply ``text`` omits (EOS / stop tokens, a trimmed stop string,
skipped special tokens) are recorded as optional spans in the trie, so a later request may contain
them written out or not, and gets the same ids either way (one EOS, never two).

Only the genuinely new text of a request is tokenized, starting at the last whole-token boundary
of the recorded prefix; generated tokens are never re-tokenized.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import threading
import unicodedata
import weakref
from array import array
from collections.abc import Callable, Sequence
from typing import Any

from slime_router_core import HTTPError
from slime_router_core.contracts import RecordedChain, RecordListener
from slime_router_core.speedups import split_logprobs, token_pieces, typed_array
from slime_router_core.tokenizers import bytes_to_unicode

from .persist import Persistence, tokenizer_fingerprint
from .trie import DEFAULT_MAX_TOKENS, Anchor, Match, RateLimit, StringRadixTrie, bound_mb, max_record_tokens

log = logging.getLogger("slime_router.radix_tree")

# Tokenize a fresh prompt rest longer than this many characters in a worker thread (the tokenizer releases
# the GIL), and record in a worker thread when more than OFFLOAD_TOKENS tokens have to be walked: on a
# small box a thread hop costs ~50-100 us and pure-Python trie work holds the GIL anyway, so only really
# long work is moved off the event loop.
OFFLOAD_CHARS = 8192
OFFLOAD_TOKENS = 2048


_BYTE_DECODER = {c: b for b, c in bytes_to_unicode().items()}

# Strings a fast encoder must tokenize exactly like the HF tokenizer before it is used (plus every added token,
# alone and inside text): special tokens, newlines, CJK, emojis (ZWJ sequences, flags, skin tones), mixed
# whitespace, digits, contractions, code, accents, RTL scripts, byte-fallback-like rarities.
PROBES: tuple[str, ...] = (
    "", " ", "  ", "\n", "\n\n", "\n\n\n", "\r\n", "\r\n\r\n", "\t", " \t \n  \n\t x", "   leading", "trailing   ",
    "a  b   c    d", "x \n y \n\n z", "\u00a0nbsp\u2009thin\u3000ideo",
    "Hello, world! How's it going? I'm fine; we'll see.", "DON'T STOP, it'S OK", "12345 6789.01 -3e10 0x1F 1,000,000",
    "你好，世界！我是一个助手。", "日本語のテキスト、カタカナ。",
    "한국어 텍스트입니다", "🤖🚀 emoji 👨‍👩‍👧‍👦 family 🇫🇷 flag 👍🏽 skin", "café naïve façade résumé Ærøskøbing",
    "مرحبا بالعالم", "שלום עולם", "Привет, мир!", "Γειά σου Κόσμε", "def f(x):\n    return x ** 2  # comment\n",
    "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}", "<html><body>&amp;</body></html>",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nHello!<|im_end|>",
    "<tool_call>\n{\"a\": 1}\n</tool_call>", "<|im_end|><|im_end|>x<|endoftext|>", "<|im_end", "|im_end|>",
    "\u200b\u200c\u200d\ufeff", "ﬁ ligature Ω K Å", "\U0001d400\U0001d401 math", "................", "!!!???",
    "----====____", "a\u0301 e\u0300", "Ⅻ ½ ² ① ⑴", "tab\tsep\tvalues\n1\t2\t3", "\x00\x01\x7f control",
)


def _added_tokens(tokenizer: Any, backend: Any) -> dict[int, Any] | None:
    try:
        added = backend.get_added_tokens_decoder()
    except Exception:
        added = getattr(tokenizer, "added_tokens_decoder", None)
    return {int(i): t for i, t in added.items()} if isinstance(added, dict) else None


_FAST_ENCODERS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()  # tokenizer -> encoder | None
_FAST_LOCK = threading.Lock()


def fast_encoder(tokenizer: Any) -> Callable[[str], list[int]] | None:
    """A tiktoken encoder that provably tokenizes like ``tokenizer``, or None.

    Used only when the HF tokenizer is Qwen's byte-level BPE: NFC normalizer (or none), Qwen's split
    regex, a plain BPE model whose vocabulary equals Qwen's 151,643 ranks token for token, added tokens
    that are matched verbatim (not normalized, no lstrip/rstrip/single_word, none a prefix of another),
    and identical ids on every probe string. Texts that NFC would change, or that hold lone surrogates,
    go to the HF tokenizer (HF splits added tokens *before* normalizing; tiktoken cannot). The result
    is derived from the immutable tokenizer only, so it is cached per tokenizer object.
    """
    if tokenizer is None:
        return None
    with _FAST_LOCK:
        try:
            return _FAST_ENCODERS[tokenizer]
        except (KeyError, TypeError):
            pass
        try:
            enc = _build_fast_encoder(tokenizer)
        except Exception as e:  # any surprise: the HF tokenizer is always correct
            log.info("radix_tree: tiktoken fast path unavailable (%s: %s)", type(e).__name__, e)
            enc = None
        try:
            _FAST_ENCODERS[tokenizer] = enc
        except TypeError:
            pass
        return enc


def _build_fast_encoder(tokenizer: Any) -> Callable[[str], list[int]] | None:
    from slime_router_core.tokenizers import QWEN_PAT_STR, load_qwen_ranks

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or type(backend.decoder).__name__ != "ByteLevel":
        return None
    norm = backend.normalizer
    if norm is None:
        nfc = False
    elif json.loads(norm.__getstate__()) == {"type": "NFC"}:
        nfc = True
    else:
        return None
    pre = json.loads(backend.pre_tokenizer.__getstate__()) if backend.pre_tokenizer is not None else None
    want_pre = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": QWEN_PAT_STR}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}
    if not isinstance(pre, dict):
        return None
    for p in pre.get("pretokenizers") or []:
        p.pop("trim_offsets", None)  # offsets only
    if pre != want_pre:
        return None
    model = backend.model
    if type(model).__name__ != "BPE" or model.dropout or model.byte_fallback or model.continuing_subword_prefix \
            or model.end_of_word_suffix or getattr(model, "ignore_merges", False):
        return None
    ranks = load_qwen_ranks()
    vocab = backend.get_vocab(with_added_tokens=False)
    if len(vocab) != len(ranks):
        return None
    to_unicode = {b: ord(c) for b, c in bytes_to_unicode().items()}
    get = vocab.get
    for tok_bytes, rank in ranks.items():  # the whole vocabulary, token for token
        if get(tok_bytes.decode("latin-1").translate(to_unicode)) != rank:
            return None
    added = _added_tokens(tokenizer, backend) or {}
    specials: dict[str, int] = {}
    for tid, t in added.items():
        content = getattr(t, "content", None)
        if not content or tid < len(ranks) or getattr(t, "normalized", True) or getattr(t, "lstrip", True) \
                or getattr(t, "rstrip", True) or getattr(t, "single_word", True) or content in specials:
            return None
        specials[content] = tid
    contents = sorted(specials)
    if any(b.startswith(a) for a, b in zip(contents, contents[1:])):  # leftmost-longest == leftmost-first
        return None
    import tiktoken

    enc = tiktoken.Encoding(name=f"slime-router-fast-{id(tokenizer)}", pat_str=QWEN_PAT_STR,
                            mergeable_ranks=ranks, special_tokens=specials)
    allowed = frozenset(specials)
    core = getattr(enc, "_core_bpe", None)
    core_encode = core.encode if core is not None else None
    hf_encode = backend.encode
    is_nfc = unicodedata.is_normalized

    def encode(text: str) -> list[int]:
        if nfc and not is_nfc("NFC", text):
            return hf_encode(text, add_special_tokens=False).ids
        try:
            if core_encode is not None:
                return core_encode(text, allowed)
            return enc.encode(text, allowed_special=allowed, disallowed_special=())
        except UnicodeEncodeError:  # lone surrogates: whatever HF does (it raises)
            return hf_encode(text, add_special_tokens=False).ids

    probes = list(PROBES)
    for c in contents:
        probes += [c, f"x{c}y", f" {c}\n", c + c]
    for text in probes:
        if encode(text) != hf_encode(text, add_special_tokens=False).ids:
            log.warning("radix_tree: tiktoken differs from the HF tokenizer on %r; using the HF tokenizer", text)
            return None
    if isinstance(getattr(enc, "_mergeable_ranks", None), dict):
        # tiktoken keeps the Python dict of the ranks only to pickle the Encoding, which is never done here: 18 MB
        enc._mergeable_ranks = {}
    return encode


class Detokenizer:
    """Per-token text pieces that concatenate to the exact decoding (special tokens written out)."""

    def __init__(self, tokenizer: Any, fast: bool = True) -> None:
        self.tokenizer = tokenizer
        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        self.fast = fast_encoder(tokenizer) if fast else None
        self.encoder_name = "tiktoken (verified against the HF tokenizer)" if self.fast else "hf tokenizers"
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        self.added: dict[int, str] = {int(i): t.content for i, t in added.items()}
        special = set(getattr(tokenizer, "all_special_ids", None) or [])
        special |= {int(i) for i, t in added.items() if getattr(t, "special", False)}
        self.special_ids = frozenset(special)
        self.byte_level = self.backend is not None and type(self.backend.decoder).__name__ == "ByteLevel"
        self._bytes: dict[int, bytes] = {}
        self._piece: dict[int, str | bool] = {}  # tid -> its text, or False: not whole UTF-8 characters alone
        self._lock = threading.Lock()

    def encode(self, text: str) -> list[int]:
        if self.fast is not None:
            return self.fast(text)
        if self.backend is not None:
            return self.backend.encode(text, add_special_tokens=False).ids
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def token_bytes(self, tid: int) -> bytes:
        b = self._bytes.get(tid)
        if b is None:
            content = self.added.get(tid)
            if content is not None:
                b = content.encode("utf-8")
            else:
                assert self.backend is not None  # token_bytes is used for byte-level tokenizers only
                tok = self.backend.id_to_token(tid)
                if tok is None:
                    b = b""
                else:
                    try:
                        b = bytes(_BYTE_DECODER[c] for c in tok)
                    except KeyError:
                        b = tok.encode("utf-8")
            self._bytes[tid] = b
        return b

    def _whole_piece(self, tid: int) -> str | bool:
        """The text of token ``tid`` when its bytes are whole UTF-8 characters, else False (kept in ``_piece``)."""
        try:
            p: str | bool = self.token_bytes(tid).decode("utf-8")
        except UnicodeDecodeError:
            p = False
        self._piece[tid] = p
        return p

    def pieces_text(self, ids: list[int]) -> tuple[list[str], str, list[int]]:
        """(text of each token, their concatenation = the exact decoding with special tokens written out, their
        lengths); a token holding only part of a character gets "" (the one that completes it gets the
        character). ([], "", []) when a non-byte-level tokenizer's per-token decodings do not add up."""
        if not ids:
            return [], "", []
        if self.byte_level:  # one C pass (slime_router_core/speedups.py; it takes a list)
            return token_pieces(ids if type(ids) is list else list(ids), self._piece, self._whole_piece,
                                self.token_bytes)
        # generic tokenizers: per-token decoding, trusted only if it concatenates to the full decoding
        texts = [self.decode([t]) for t in ids]
        text = "".join(texts)
        if text != self.decode(list(ids)):
            return [], "", []
        return texts, text, list(map(len, texts))

    def pieces(self, ids: list[int]) -> list[str]:
        """Text of each token; a token holding only part of a character gets "" (the next one gets the char)."""
        return self.pieces_text(ids)[0]

    def widths_for(self, ids: list[int], text: str) -> list[int]:
        """Characters of ``text`` each token of ``ids`` covers; a single span when they cannot be lined up."""
        pcs, joined, widths = self.pieces_text(ids)
        if pcs and joined == text:
            return widths
        return [0] * (len(ids) - 1) + [len(text)]  # one opaque span: only usable as a whole

    def _align_fast(self, text: str, ids: list[int], pcs: list[str], canonical: str, widths: list[int]
                    ) -> tuple[str, list[int], list[tuple[int, str]]] | None:
        """``align_output``'s result in the common cases (the reply text is all the pieces, or all but a run
        of special / added tokens at the end, e.g. the EOS), without the per-token walk; None otherwise."""
        if canonical == text:
            return canonical, widths, []
        n = len(text)
        if not canonical.startswith(text):
            return None
        k, rest = len(widths), len(canonical) - n  # from the end: the tokens that cover what ``text`` omits
        while rest > 0 and k:
            k -= 1
            rest -= widths[k]
        if rest:  # ``text`` ends inside a token
            return None
        special, added = self.special_ids, self.added
        for t, pc in zip(ids[k:], pcs[k:]):
            if pc and t not in special and t not in added:
                return None
        return canonical, widths, [(n, canonical[n:])]

    def align_output(self, text: str, ids: list[int]) -> tuple[str, list[int], list[tuple[int, str]]]:
        """Line the reply ``text`` up with ALL generated ``ids``.

        Returns (canonical text, characters each token covers, optional spans). The canonical text starts with
        ``text`` wherever the ids allow; tokens whose text the reply omits (EOS, a stop string the
        worker trimmed, skipped special tokens) are written out and marked optional.
        """
        pcs, canonical, widths = self.pieces_text(ids)
        if not pcs:
            return text, [0] * (len(ids) - 1) + [len(text)], []
        fast = self._align_fast(text, ids, pcs, canonical, widths)
        if fast is not None:
            return fast
        markers: list[tuple[int, str]] = []
        r = pos = 0
        i = 0
        n = len(ids)
        while i < n:
            pc = pcs[i]
            if text.startswith(pc, r):
                r += len(pc)
            elif ids[i] in self.special_ids or ids[i] in self.added:
                if pc:
                    markers.append((pos, pc))
            else:
                break
            pos += len(pc)
            i += 1
        if i < n or r < len(text):
            rest = "".join(pcs[i:])
            if i == n or not rest.startswith(text[r:]):
                # the reply text and the ids disagree: keep the ids as one span under the reply text
                return text, [0] * (n - 1) + [len(text)], []
            v = pos + len(text) - r
            tail = rest[len(text) - r:]
            if tail:
                markers.append((v, tail))
        merged: list[tuple[int, str]] = []  # canonical: the reply text with the omitted spans written out
        for p, o in markers:
            if merged and merged[-1][0] + len(merged[-1][1]) == p:
                merged[-1] = (merged[-1][0], merged[-1][1] + o)
            else:
                merged.append((p, o))
        return canonical, widths, merged


NAN = float("nan")


def _output_ids_and_logprobs(obj: dict, meta: dict) -> tuple[list[int], list[float]]:
    """``slime_router_core.sglang.output_ids_and_logprobs`` (logprob ids preferred over ``output_ids``)
    without per-token Python work in the usual case; unknown logprobs are NaN."""
    triples = meta.get("output_token_logprobs")
    if triples:
        split = split_logprobs(triples)  # one pass (slime_router_core/speedups.py)
        if split is not None:
            return split
        from slime_router_core.sglang import output_ids_and_logprobs

        ids_l, lps = output_ids_and_logprobs(obj)  # odd shapes: the reference (raises like it)
        return ids_l, [NAN if x is None else x for x in lps]
    out = obj.get("output_ids") or []
    ids_l = list(out) if type(out) is list and set(map(type, out)) == {int} else [int(x) for x in out]
    return ids_l, [NAN] * len(ids_l)


def _version_runs(obj: dict, meta: dict, n: int) -> tuple[str, list[tuple[int, str, int]]]:
    """(version of the prompt tokens, runs ``(count, version, 1)`` of the ``n`` generated tokens), as
    ``slime_router_core.sglang.weight_version_spans`` assigns them."""
    default = str(meta.get("weight_version", "default"))
    if not meta.get("weight_versions"):
        return default, [(n, default, 1)]
    from slime_router_core.sglang import weight_version_spans

    per = weight_version_spans(obj, n)
    if not per:
        return default, []
    return per[0], [(len(list(g)), v, 1) for v, g in itertools.groupby(per)]


class PreparedPrompt:
    """A prompt ready to send: ``input_ids`` = recorded ids of its longest recorded prefix + fresh ids.

    Public: ``text``, ``input_ids``, ``cached_tokens``, ``fresh_tokens``, ``worker_url``. The rest is the
    alignment data ``record`` needs (built lazily from the trie match, off the request path).
    """

    __slots__ = ("text", "input_ids", "cached_tokens", "fresh_tokens", "worker_url", "match", "canonical", "_ends",
                 "_logprobs", "_mask", "_versions", "markers", "fresh_text", "fresh_ids", "fresh_widths")

    def __init__(self, text: str, input_ids: list[int], cached_tokens: int, fresh_tokens: int,
                 worker_url: str | None = None, match: Match | None = None, canonical: str = "",
                 ends: list[int] | None = None, logprobs: list | None = None, loss_mask: list[int] | None = None,
                 versions: list[str] | None = None, markers: list[tuple[int, str]] | None = None,
                 fresh_text: str = "", fresh_ids: list[int] | None = None):
        self.text = text
        self.input_ids = input_ids
        self.cached_tokens = cached_tokens
        self.fresh_tokens = fresh_tokens
        self.worker_url = worker_url
        self.match = match
        self.canonical = match.canonical if match is not None else canonical
        self._ends, self._logprobs, self._mask, self._versions = ends, logprobs, loss_mask, versions
        self.markers = list(match.markers) if match is not None else list(markers or [])
        self.fresh_text = fresh_text
        self.fresh_ids = fresh_ids if fresh_ids is not None else []
        self.fresh_widths: list[int] | None = None  # known when the prompt came as ids

    def _from_match(self, own: Any, attr: str) -> list:
        if own is not None:
            return own
        return list(getattr(self.match, attr)) if self.match is not None else []

    @property
    def ends(self) -> list[int]:
        return self._from_match(self._ends, "ends")

    @property
    def logprobs(self) -> list:
        return self._from_match(self._logprobs, "logprobs")

    @property
    def loss_mask(self) -> list[int]:
        return self._from_match(self._mask, "loss_mask")

    @property
    def versions(self) -> list[str]:
        return self._from_match(self._versions, "versions")

    def __len__(self) -> int:
        return len(self.input_ids)

    def __repr__(self) -> str:  # pragma: no cover
        return (f"<PreparedPrompt {len(self.input_ids)} ids: {self.cached_tokens} cached, {self.fresh_tokens} fresh, "
                f"worker={self.worker_url}>")


FINISHED = ("stop", "length")


AUDIT_KEYS = ("generated_recorded", "generated_not_recorded_too_large", "generated_served_exact",
              "fresh_served_never_recorded", "fresh_served_evicted")


def record_tokens(prepared: Any, response: dict) -> int:
    """Tokens recording ``response`` adds to the tree (what ``max_record_tokens`` bounds): the prompt's tokens not
    recorded yet and the generated ones (none for an unfinished generation). Counted without parsing the tokens,
    the same way in the router and in the cache process (``--radix-tree-process``)."""
    n = prepared.fresh_tokens
    meta = response.get("meta_info")
    if isinstance(meta, dict):
        fr = meta.get("finish_reason")
        if isinstance(fr, dict) and fr.get("type") in FINISHED:
            out = meta.get("output_token_logprobs") or response.get("output_ids")
            if isinstance(out, list):
                n += len(out)
    return n


def too_large_message(tokens: int, limit: int) -> str:
    """Why a record of ``tokens`` tokens was refused, and the fix (for the client and the log)."""
    return (f"not recorded: it would add {tokens:,} tokens to the trajectory cache, more than one record may "
            f"({limit:,}, a quarter of --radix-tree-max-size, so that one request cannot evict the other live "
            f"trajectories); raise --radix-tree-max-size above {4 * tokens:,} tokens (~{bound_mb(4 * tokens)}) "
            f"to record it")


def reply_pairs(prepared: list, response: Any, n: int) -> list[tuple[Any, dict]]:
    """(prepared prompt, reply) for each sequence of a /generate reply: a batch of k prompts with ``n``
    samples each answers k * n objects, prompt-major."""
    items = response if isinstance(response, list) else [response]
    n = max(1, n)
    return [(prepared[i // n], r) for i, r in enumerate(items) if isinstance(r, dict) and i // n < len(prepared)]


def _chain_builder(prepared: PreparedPrompt, text: str, fresh: list[int], new_widths: list[int],
                   out_ids: list[int], out_lps: list[float], runs: list[tuple[int, str, int]],
                   markers: list[tuple[int, str]], worker: str | None) -> Callable[[], RecordedChain]:
    """A function that builds the portable chain of a record just made (run later, off the request path: the
    prepared prompt's match is a snapshot, and nothing here is changed after the record)."""

    def build() -> RecordedChain:
        k = prepared.cached_tokens
        ids = typed_array("i", prepared.input_ids[:k])
        ids.extend(fresh)
        ids.extend(out_ids)
        prefix_ends = prepared.ends
        widths = array("i", [b - a for a, b in zip([0, *prefix_ends[:-1]], prefix_ends)])
        widths.extend(new_widths)
        lps = array("f", [NAN if x is None else x for x in prepared.logprobs])
        lps.extend(array("f", [NAN]) * len(fresh))
        lps.extend(array("f", out_lps))
        mask = bytes(prepared.loss_mask) + bytes(len(fresh)) + b"\x01" * len(out_ids)
        versions = list(prepared.versions)
        for cnt, v, _ in runs:
            versions += [v] * cnt
        return RecordedChain(text, ids, widths, lps, mask, versions, sorted(markers), worker, k + len(fresh))

    return build


class TrajectoryCache:
    """The in-process implementation of the ``TRAJECTORY_CACHE`` contract (``slime_router_core.contracts``).

    The contract's methods are async; the ``*_sync`` ones do the same work on the calling thread (the cache
    process of ``--radix-tree-process``, tests, benchmarks)."""

    def __init__(self, tokenizer: Any, max_size: int = DEFAULT_MAX_TOKENS, gc_k: int = 5, verbose: bool = False,
                 snapshot: str | None = None, snapshot_interval: float = 300.0, journal_interval: float = 1.0
                 ) -> None:
        self.tokenizer = tokenizer
        self.detok = Detokenizer(tokenizer)
        self.tree = StringRadixTrie(max_tokens=max_size, gc_k=gc_k)
        self.max_record_tokens = max_record_tokens(max_size)
        self.verbose = verbose
        self.cache_hits = 0
        self.cache_misses = 0
        self.hit_tokens = 0
        self.lookup_tokens = 0
        self.records = 0
        self.records_prompt_only = 0
        self.records_incremental = 0  # records that only walked the new tokens (anchor still valid)
        self.retrievals = 0
        # the audit: generated tokens recorded, refused, served back exactly; fresh tokens served, by cause
        self.audit = dict.fromkeys(AUDIT_KEYS, 0)
        self.records_too_large = 0  # records refused (max_record_tokens) and the tokens they would have added
        self.records_too_large_tokens = 0
        self._too_large_unreported = [0, 0, 0]  # since the last warning: records, tokens, the largest
        self._too_large_warning = RateLimit()
        self.retrievals_after_eviction = 0  # retrievals that went on into removed text, and its generated tokens
        self.retrievals_after_eviction_generated_tokens = 0
        self._lock = threading.Lock()
        self.persist: Persistence | None = None  # --cache-snapshot: snapshot + write-ahead journal (persist.py)
        if snapshot:
            self.persist = Persistence(self.tree, snapshot, tokenizer_fingerprint(tokenizer),
                                       snapshot_interval=snapshot_interval, journal_interval=journal_interval)
        self._started = False
        self._listeners: list[RecordListener] = []  # contracts.ChainTransfer
        self.records_imported = 0

    # --- prepare ------------------------------------------------------------------------------

    def _prepare_sync(self, text: str) -> PreparedPrompt:
        m = self.tree.match(text, trailing=False)
        rest = text[m.query_pos:]
        return self._prepared(text, m, rest, self.detok.encode(rest) if rest else [])

    def _prepared(self, text: str, m: Match, rest: str, fresh: list[int]) -> PreparedPrompt:
        ids = m.raw_ids.tolist()
        ids += fresh
        p = PreparedPrompt(text=text, input_ids=ids, cached_tokens=len(m), fresh_tokens=len(fresh),
                           worker_url=m.worker, match=m, fresh_text=rest, fresh_ids=fresh)
        self._count(p)
        return p

    def _count(self, p: PreparedPrompt) -> None:
        with self._lock:
            if p.cached_tokens:
                self.cache_hits += 1
            else:
                self.cache_misses += 1
            self.hit_tokens += p.cached_tokens
            self.lookup_tokens += len(p.input_ids)
        if self.verbose:
            log.info("radix_tree: %d of %d prompt tokens from records (%d fresh)%s", p.cached_tokens,
                     len(p.input_ids), p.fresh_tokens, f", worker {p.worker_url}" if p.worker_url else "")

    async def prepare(self, text: str) -> PreparedPrompt:
        """Longest recorded prefix of ``text`` -> its exact ids + tokens of the rest only.

        Only a long *fresh* rest is tokenized in a worker thread (the tokenizer releases the GIL; the
        trie walk does not, and a thread hop costs more than the walk of a typical prompt)."""
        if not isinstance(text, str):
            raise HTTPError(400, "'text' must be a string", param="text")
        m = self.tree.match(text, trailing=False)
        rest = text[m.query_pos:]
        if len(rest) > OFFLOAD_CHARS:
            fresh = await asyncio.to_thread(self.detok.encode, rest)
        else:
            fresh = self.detok.encode(rest) if rest else []
        return self._prepared(text, m, rest, fresh)

    def prepare_sync(self, text: str) -> PreparedPrompt:
        return self._prepare_sync(text)

    async def prepare_ids(self, ids: list[int]) -> PreparedPrompt:
        return self.prepare_ids_sync(ids)

    def prepare_ids_sync(self, ids: list[int]) -> PreparedPrompt:
        """A prompt given as ids by the client: sent as is, recorded under its decoded text.

        Metadata of a recorded prefix with the very same ids (loss mask, logprobs, versions) is kept.
        """
        ids = [int(x) for x in ids]
        pcs, text, pcs_widths = self.detok.pieces_text(ids)
        if not pcs:
            text = self.detok.decode(ids)
        m = self.tree.match(text) if text else None
        k = 0
        if m is not None and m.skipped == 0:
            lim = min(len(m.ids), len(ids))
            while k < lim and m.ids[k] == ids[k]:
                k += 1
            if pcs:  # the shared ids must also cover the same characters
                pos = 0
                for j in range(k):
                    pos += len(pcs[j])
                    if m.ends[j] != pos:
                        k = j
                        break
        if m is not None and k:
            cut = m.ends[k - 1]
            p = PreparedPrompt(text=text, input_ids=ids, cached_tokens=k, fresh_tokens=len(ids) - k,
                               worker_url=m.worker, canonical=text[:cut], ends=m.ends[:k], logprobs=m.logprobs[:k],
                               loss_mask=m.loss_mask[:k], versions=m.versions[:k],
                               markers=[x for x in m.markers if x[0] + len(x[1]) <= cut], fresh_text=text[cut:],
                               fresh_ids=ids[k:])
        else:
            p = PreparedPrompt(text=text, input_ids=ids, cached_tokens=0, fresh_tokens=len(ids), fresh_text=text,
                               fresh_ids=ids)
        if pcs:
            p.fresh_widths = pcs_widths[p.cached_tokens:]
        self._count(p)
        return p

    # --- record -------------------------------------------------------------------------------

    def record_sync(self, prepared: PreparedPrompt, response: dict, worker_url: str | None) -> bool:
        """Record the prompt ids (fresh ones with mask 0) and the worker's output (mask 1, logprobs, versions).

        An unfinished or aborted generation records only its prompt. Returns False when the record would add more
        than ``max_record_tokens`` tokens: it is not recorded (it would evict the other live trajectories).
        """
        size = record_tokens(prepared, response)
        if size > self.max_record_tokens:
            self._refuse(size)
            with self._lock:
                self.audit["generated_not_recorded_too_large"] += size - prepared.fresh_tokens
            return False
        meta = response.get("meta_info") or {}
        fr = meta.get("finish_reason")
        finished = isinstance(fr, dict) and fr.get("type") in FINISHED
        out_ids, out_lps = _output_ids_and_logprobs(response, meta) if finished else ([], [])
        version, out_runs = _version_runs(response, meta, len(out_ids))

        base = prepared.canonical
        rest = prepared.fresh_text
        fresh = prepared.fresh_ids
        if fresh:
            fw = prepared.fresh_widths
            new_widths = list(fw) if fw is not None else self.detok.widths_for(fresh, rest)
        else:
            new_widths = []
            if rest:  # text that tokenized to nothing: cannot be recorded
                rest = ""
        text = base + rest
        new_markers: list[tuple[int, str]] = []
        if out_ids:
            out_text = response.get("text")
            if not isinstance(out_text, str):
                out_text = ""
            canon, ow, om = self.detok.align_output(out_text, out_ids)
            L1 = len(text)
            text += canon
            new_widths += ow
            new_markers = [(L1 + p, o) for p, o in om]
        if not text or not (prepared.cached_tokens or fresh or out_ids):
            return True
        nf = len(fresh)
        runs = [(nf, version, 0), *out_runs]
        m = prepared.match if prepared._ends is None else None
        if m is not None and m.vtable is self.tree.vtable:
            # From the match's stored arrays, without per-token lists of versions and masks: continue the chain
            # after its anchor (cost ~ the new tokens), or, without a usable anchor (the prompt ends inside a
            # recorded node, e.g. the next sample of a prompt), the whole chain.
            anchor = m.anchor if fresh or out_ids else None
            if anchor is not None and self._insert_from(m, anchor, text, fresh, out_ids, new_widths, out_lps, runs,
                                                        prepared.markers, new_markers, worker_url):
                with self._lock:
                    self.records_incremental += 1
            else:  # no anchor, or the tree changed under it since prepare
                self._insert_from(m, None, text, fresh, out_ids, new_widths, out_lps, runs, prepared.markers,
                                  new_markers, worker_url)
        else:  # a prompt given as ids (its prefix's metadata as lists), or a tree restored since the match
            ids = prepared.input_ids[:prepared.cached_tokens] + list(fresh) + list(out_ids)
            ends = list(prepared.ends) + list(itertools.accumulate(new_widths, initial=len(base)))[1:]
            lps: list[float | None] = list(prepared.logprobs) + [None] * nf + list(out_lps)
            mask = list(prepared.loss_mask) + [0] * nf + [1] * len(out_ids)
            versions = list(prepared.versions)
            for cnt, v, _ in runs:
                versions += [v] * cnt
            markers = list(prepared.markers) + new_markers
            self.tree.insert(text, ids, ends, lps, mask, versions, markers=markers, worker=worker_url)
        with self._lock:
            self.records += 1
            self.audit["generated_recorded"] += len(out_ids)
            if not out_ids:
                self.records_prompt_only += 1
        if self._listeners:
            thunk = _chain_builder(prepared, text, list(fresh), new_widths, out_ids, out_lps, runs,
                                   list(prepared.markers) + new_markers, worker_url)
            for fn in list(self._listeners):
                try:
                    fn(thunk)
                except Exception:  # a listener's bug must not fail the record
                    log.exception("radix_tree: a record listener failed")
        return True

    def _insert_from(self, m: Match, anchor: Anchor | None, text: str, fresh: list[int], out_ids: list[int],
                     new_widths: list[int], out_lps: list[float], runs: list[tuple[int, str, int]],
                     markers: list[tuple[int, str]], new_markers: list[tuple[int, str]], worker: str | None) -> bool:
        """Insert the chain of ``m`` + the new tokens through ``insert_raw``: the part after ``anchor`` (None: the
        whole chain) from the match's stored arrays, no per-token lists of masks and versions."""
        k, floor = (anchor.carry, anchor.pos) if anchor is not None else (0, 0)
        t_ids, t_widths, t_lps, t_mv = m.tail_raw(k)
        t_ids += fresh
        t_ids += out_ids
        t_widths += new_widths
        t_lps += [NAN] * len(fresh)
        t_lps += out_lps
        kept = [x for x in markers if x[0] >= floor] if floor else list(markers)
        return self.tree.insert_raw(anchor, text, t_ids, t_widths, t_lps, t_mv, runs, kept + new_markers, worker)

    # --- copying records to another router (contracts.ChainTransfer) ------------------------------------

    def add_record_listener(self, listener: RecordListener) -> None:
        """Have ``listener(build)`` called after each record (``build()`` makes its ``RecordedChain``)."""
        self._listeners.append(listener)

    def remove_record_listener(self, listener: RecordListener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def import_chains_sync(self, chains: Sequence[RecordedChain]) -> int:
        """Insert records made elsewhere, in order, as the whole chains they are (no listener is called)."""
        done = 0
        for c in chains:
            if not c.text or not len(c.ids):
                continue
            ends = list(itertools.accumulate(c.widths))
            lps = [None if x != x else float(x) for x in c.logprobs]
            self.tree.insert(c.text, list(c.ids), ends, lps, list(c.loss_mask), list(c.versions),
                             markers=[(int(a), str(b)) for a, b in c.markers], worker=c.worker)
            done += 1
        with self._lock:
            self.records_imported += done
        return done

    async def import_chains(self, chains: Sequence[RecordedChain]) -> int:
        if sum(len(c.ids) for c in chains) > OFFLOAD_TOKENS:
            return await asyncio.to_thread(self.import_chains_sync, chains)
        return self.import_chains_sync(chains)

    def _refuse(self, size: int) -> None:
        """Count a record refused as too large; one WARNING per interval, summarising."""
        with self._lock:
            self.records_too_large += 1
            self.records_too_large_tokens += size
            u = self._too_large_unreported
            u[0] += 1
            u[1] += size
            u[2] = max(u[2], size)
            if not self._too_large_warning.ready():
                return
            n, tokens, largest = u
            self._too_large_unreported = [0, 0, 0]
        t = self.tree.max_tokens
        log.warning("radix_tree: %d trajectory record(s) (%s tokens in all) were not recorded since the last such "
                    "warning: each would add more than the %s tokens one record may (a quarter of the bound of %s "
                    "tokens, ~%s), so recording it would evict the other live trajectories. The largest would add "
                    "%s tokens: raise --radix-tree-max-size above %s to record such requests.", n, f"{tokens:,}",
                    f"{self.max_record_tokens:,}", f"{t:,}", bound_mb(t), f"{largest:,}", f"{4 * largest:,}")

    async def record(self, prepared: PreparedPrompt, response: dict, worker_url: str | None) -> bool:
        """``record_sync``, in a worker thread only when the *new* work is large (tokens walked: the fresh prompt
        tokens and the output, plus the recorded prefix when the chain cannot be continued at an anchor)."""
        meta = response.get("meta_info")
        out = (meta.get("output_token_logprobs") if isinstance(meta, dict) else None) or response.get("output_ids")
        work = len(prepared.fresh_ids) + (len(out) if isinstance(out, list) else 0)
        if prepared.match is None or prepared.match.anchor is None or prepared._ends is not None:
            work += prepared.cached_tokens
        if work > OFFLOAD_TOKENS:
            return await asyncio.to_thread(self.record_sync, prepared, response, worker_url)
        return self.record_sync(prepared, response, worker_url)

    async def record_replies(self, prepared: list[Any], replies: list[Any], n: int, worker_url: str | None,
                             raw: bytes | None = None) -> list[tuple[dict, int]]:
        refused = []
        for p, reply in reply_pairs(prepared, replies, n):
            if not await self.record(p, reply, worker_url):
                refused.append((reply, record_tokens(p, reply)))
        return refused

    # --- retrieve -----------------------------------------------------------------------------

    async def retrieve(self, text: str, strict: bool = False) -> dict:
        """``retrieve_sync``; a long text is looked up in a worker thread (the tokenizer releases the GIL)."""
        if isinstance(text, str) and len(text) > OFFLOAD_CHARS:
            return await asyncio.to_thread(self.retrieve_sync, text, strict)
        return self.retrieve_sync(text, strict)

    def retrieve_sync(self, text: str, strict: bool = False) -> dict:
        """Recorded tokens for ``text`` (+ fresh tokens of any unrecorded rest, counted as such).

        A rest that the router once recorded but has since removed (LRU eviction at the bound, or weight-version
        GC) is flagged: ``"evicted": true`` with ``evicted_at_char``, ``evicted_generated_tokens`` and a
        ``warning``; with ``strict`` the answer is 410 (code "evicted") instead of 404 ("not_recorded")."""
        if not isinstance(text, str):
            raise HTTPError(400, f"'text' must be a string, got {type(text).__name__}", param="text")
        if not text:
            raise HTTPError(400, "'text' must be a non-empty string", param="text")
        t = self.tree
        removed = None
        with t.lock:  # one hold: the flags go on the very nodes matched
            m = t.match(text)
            rest = text[m.query_pos:]
            if rest:
                removed = t.removed_at(m, text)
            if not (strict and rest):
                t.mark_retrieved(m)
        with self._lock:
            self.retrievals += 1
            if removed is not None:
                self.retrievals_after_eviction += 1
                self.retrievals_after_eviction_generated_tokens += removed[1]
        warning = self._removed_warning(text, removed) if removed is not None else None
        if strict and rest:
            if warning is not None:
                raise HTTPError(410, f"{warning} Refused because \"strict\" is set.", code="evicted")
            raise HTTPError(404, f"Only {m.query_pos} of {len(text)} characters of this text were recorded through "
                                 f"the router (or the rest was evicted long ago); {len(rest)} characters would need "
                                 f"fresh tokenization. Retry without \"strict\" to get them tokenized with "
                                 f"loss_mask 0.", code="not_recorded")
        fresh = self.detok.encode(rest) if rest else []
        tokens = m.ids + fresh
        mask = m.loss_mask + [0] * len(fresh)
        with self._lock:
            self.audit["generated_served_exact"] += sum(mask)
            self.audit["fresh_served_evicted" if removed is not None else "fresh_served_never_recorded"] += len(fresh)
        logp = [(0.0 if x is None else x) for x in m.logprobs] + [0.0] * len(fresh)
        versions: list[str | None] = list(m.versions) + [None] * len(fresh)
        out: dict[str, Any] = {
            "tokens": tokens,
            "response": text,
            "loss_mask": mask,
            "rollout_logp": logp,
            "token_length": len(tokens),
            "loss_mask_length": len(mask),
            "weight_versions": versions,
            "exact_tokens": len(m.ids),
            "fresh_tokens": len(fresh),
            "generated_tokens": sum(mask),
            "recorded_chars": m.query_pos,
            "worker_url": m.worker,
            "evicted": removed is not None,
        }
        if removed is not None:
            out.update(evicted_at_char=removed[0], evicted_generated_tokens=removed[1], warning=warning)
        return out

    def _removed_warning(self, text: str, removed: tuple[int, int, str]) -> str:
        """What a retrieval that goes on into removed text (``StringRadixTrie.removed_at``) tells the trainer."""
        at, gen, reason = removed
        t = self.tree
        why = (f"evicted (least recently used) at the cache bound of {t.max_tokens:,} tokens (~"
               f"{bound_mb(t.max_tokens)})" if reason == "evicted" else
               f"removed by weight-version GC (only the newest {t.gc_k} weight versions are kept, --radix-tree-gc-k)")
        return (f"The text from character {at} of {len(text)} on was recorded through the router but {why} before "
                f"this retrieval: its tokens are tokenized afresh with loss_mask 0, and ~{gen:,} generated tokens are "
                f"lost as training data. To keep such text, "
                + ("size --radix-tree-max-size to at least tokens per trajectory x live trajectories"
                   if reason == "evicted" else "raise --radix-tree-gc-k above the weight versions a rollout spans")
                + ", or retrieve trajectories sooner.")

    # --- stats and life cycle (nothing to start: it lives in the router's process) -------------------

    async def refresh(self) -> None:
        """Nothing to fetch: ``stats()`` is always current here."""

    async def start(self) -> None:
        """With a snapshot path: restore the snapshot and replay its journal, then start journaling."""
        if self.persist is not None and not self._started:
            await asyncio.to_thread(self.start_sync)

    async def close(self) -> None:
        """With a snapshot path: commit the journal and write the snapshot."""
        if self.persist is not None:
            await asyncio.to_thread(self.close_sync)

    def start_sync(self) -> None:
        if self.persist is not None and not self._started:
            self._started = True
            self.persist.restore()
            self.persist.start()

    def close_sync(self) -> None:
        if self.persist is not None and self._started:
            self.persist.close()

    def stats(self) -> dict:
        t = self.tree
        with t.lock:
            size, nodes = t.size, t.node_count
            evictions, ev_tokens, gc_runs = t.evictions, t.evicted_tokens, t.gc_runs
            (ev_lost, ev_lost_gen), (gc_lost, gc_lost_gen) = t.evicted_unretrieved, t.gc_removed_unretrieved
        lookups = self.cache_hits + self.cache_misses
        return {
            "total_entries": nodes,
            "records": self.records,
            "records_prompt_only": self.records_prompt_only,
            "records_incremental": self.records_incremental,
            "cache_hits": self.cache_hits,
            "cache_misses": self.cache_misses,
            "hit_rate": (self.cache_hits / lookups) if lookups else 0.0,
            "hit_tokens": self.hit_tokens,
            "lookup_tokens": self.lookup_tokens,
            "token_hit_rate": (self.hit_tokens / self.lookup_tokens) if self.lookup_tokens else 0.0,
            "cur_cache_size": size,
            "max_cache_size": t.max_tokens,
            "cache_size_bytes": t.nbytes(),
            "evictions": evictions,
            "evicted_tokens": ev_tokens,
            "gc_runs": gc_runs,
            "gc_removed_tokens": t.gc_removed_tokens,
            "gc_threshold_k": t.gc_k,
            "versions": t.versions(),
            "retrievals": self.retrievals,
            "records_imported": self.records_imported,
            "audit": dict(self.audit),
            "max_record_tokens": self.max_record_tokens,
            "records_too_large": self.records_too_large,
            "records_too_large_tokens": self.records_too_large_tokens,
            "evicted_unretrieved": ev_lost,
            "evicted_unretrieved_generated_tokens": ev_lost_gen,
            "gc_removed_unretrieved": gc_lost,
            "gc_removed_unretrieved_generated_tokens": gc_lost_gen,
            "retrievals_after_eviction": self.retrievals_after_eviction,
            "retrievals_after_eviction_generated_tokens": self.retrievals_after_eviction_generated_tokens,
            **({"persistence": self.persist.stats()} if self.persist is not None else {}),
        }
