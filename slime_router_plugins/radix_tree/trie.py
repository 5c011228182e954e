"""StringRadixTrie: a radix tree over text that stores the exact token chain recorded for it.

Layout
------
Every node holds an edge label ``text`` (nodes split where recorded texts diverge; children are a
dict keyed by the first character, so no linear scan) and the tokens of the recorded chain that
*end* inside it, as compact typed arrays:

- ``ids``    array('i')  token ids
- ``widths`` array('B'/'H'/'I')  characters each token covers (0 for a token after which bytes of a
             character are still pending -- its text is counted on the token that completes the
             character, so no lookup ends between them); token ends are ``first + cumsum(widths)``
             relative to the node start, so a lookup can stop at any token boundary inside a node
- ``first``  where the node's first token starts, relative to the node start (<= 0: a token may
             start in an ancestor)
- ``logp``   array('f')  rollout logprobs (NaN = unknown)
- ``mv``     array('H'/'I')  ``version_index << 1 | loss_mask`` per token; the version index points
             into the trie's version table (strings, ordered by first observation)

Chain invariant: along every root-to-node path the node chains concatenate into one contiguous
tokenization of the path text. A node only keeps the part of the chain that is common to all its
descendants; where two recorded chains disagree (e.g. one sample produced " there", another " the" +
" end"), the disagreeing tail is pushed down into the children, and a chain for a text that ends
exactly at an internal node lives in that node's ``""`` (terminal) child. Lookups re-validate
contiguity, so a broken chain can only make a lookup shorter, never wrong.

Shared tokens agree in value, not only in id: chains share a stored token only if ids and widths are equal
and the metadata agrees. A token both chains generated (mask 1) agrees only with the same weight version
and the same logprob (as stored, float32; NaN equals NaN), so sibling trajectories that sampled the same
first tokens (GRPO branches, a retry, a weight update in between) each keep their own logprobs and versions;
the first disagreeing token is a divergence like a differing id (pushed down with the rest). Where values
agree, the prefix is stored once. A prompt token (mask 0) on either side agrees: a prompt record never
hides generated tokens, and a record that generated tokens stored as prompt upgrades them (bringing its
values for the prompt tokens of that stretch too). Text is the only key: the very same text recorded twice
with different values keeps the latest record's (from the first disagreeing token on, never a mix).

Continued leaves: when a record continues a chain exactly at the end of a leaf (the next turn of a
trajectory), the leaf itself grows (its text and token arrays are extended) instead of getting a child,
up to a quarter of ``max_tokens`` per leaf: a conversation stays one node deep below its shared prefix, so lookups walk
few nodes and records allocate none. Where a recorded chain ended inside such a leaf is kept in
``stops``; an insert that walks past a stop first splits the node there again, so divergent chains
(e.g. a client re-tokenizing an earlier turn differently) keep the earlier chain in a ``""`` child exactly
as if the turns had been separate nodes.

Optional spans ("tails"): tokens the worker generated whose text the reply omits (EOS, a trimmed stop
string, skipped special tokens) are stored with their text written out, and the span is marked
optional at its start. A query may either contain the written-out text or skip it: when a query ends
or diverges inside an optional span, the walk takes the whole span's tokens and continues matching the
query after it. So "<prompt><reply>" and "<prompt><reply><|im_end|>" both map to the same ids with
exactly one EOS.

Bounded by ``max_tokens`` (LRU eviction of leaves) and GC by weight version (keep the newest ``gc_k``
versions by first observation). What they remove is accounted: generated tokens no retrieval had returned
(``Node.retrieved``) are counted and logged, and the removed text is remembered (``removed_index``) so that a
retrieval running into it can say so (``removed_at``). All public methods take one re-entrant lock.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import sys
import threading
import time
from array import array
from bisect import bisect_right
from collections.abc import Callable, Iterable, Sequence
from operator import sub as _sub
from typing import Any

from slime_router_core.speedups import typed_array

NAN = float("nan")

log = logging.getLogger("slime_router.radix_tree")

# The bound, in tokens (--radix-tree-max-size): 2**26 tokens, ~1 GiB at the measured ~16 bytes per cached token
# (bench/README.md), holds a realistic rollout step (e.g. 1,024 trajectories of 64k tokens) on an ordinary machine.
DEFAULT_MAX_TOKENS = 1 << 26
BYTES_PER_TOKEN = 16
WARN_INTERVAL_S = 60.0  # eviction / refused-record warnings: at most one per interval, summarising the rest
# Removed text remembered so that a retrieval can say "evicted" instead of silently tokenizing afresh: entries of
# (path hash -> first characters of the removed node, its length, its generated tokens, why), LRU-bounded;
# ~250 bytes each (tracemalloc), so ~15 MB at 2**16 entries, allocated only as nodes are removed.
REMOVED_INDEX_SIZE = 1 << 16
REMOVED_SNIPPET = 32


def max_record_tokens(max_tokens: int) -> int:
    """Most tokens one record may add to the tree: a quarter of the bound (the cap of an extended leaf too), so
    one request can never evict more than that share of the other trajectories."""
    return max(1, int(max_tokens) // 4)


def bound_mb(tokens: int) -> str:
    """The memory ``tokens`` cached tokens take (at BYTES_PER_TOKEN), for messages: "1,024 MB", "0.15 MB"."""
    mb = tokens * BYTES_PER_TOKEN / 2**20
    return f"{mb:,.0f} MB" if mb >= 10 else f"{mb:.2g} MB"


class RateLimit:
    """``ready()`` is true at most once per ``interval`` seconds (warnings that summarise instead of flooding)."""

    __slots__ = ("interval", "last")

    def __init__(self, interval: float = WARN_INTERVAL_S) -> None:
        self.interval = interval
        self.last = float("-inf")

    def ready(self) -> bool:
        now = time.monotonic()
        if now - self.last < self.interval:
            return False
        self.last = now
        return True


_ODD_BYTES = bytes(range(1, 256, 2))


def _generated(mv: array, start: int = 0) -> int:
    """Mask-1 (generated) tokens in ``mv[start:]`` -- the low bit of each value -- at C speed: removing a long
    leaf must not cost a Python loop over its tokens."""
    b = mv[start:].tobytes()
    if mv.itemsize > 1:  # the low byte of each value holds the bit
        b = b[0 if sys.byteorder == "little" else mv.itemsize - 1::mv.itemsize]
    return len(b) - len(b.translate(None, _ODD_BYTES))


def _uarr(values: Iterable[int], small: str = "B") -> array:
    """An unsigned array with the smallest typecode (starting at ``small``) that fits the values."""
    vals = values if isinstance(values, (list, array)) else list(values)
    for tc in ("B", "H", "I", "Q")[("B", "H", "I", "Q").index(small):]:
        try:
            return typed_array(tc, vals) if tc != "Q" else array(tc, vals)
        except OverflowError:
            continue
    raise OverflowError("value too large")


def _ucat(a: array, b: array) -> array:
    if a.typecode == b.typecode:
        return a + b  # a new array of the exact size (extend would keep ~6 % of slack in the node)
    return _uarr(list(a) + list(b), max(a.typecode, b.typecode, key="BHIQ".index))


def _common(text: str, off: int, s: str, i: int, m: int) -> int:
    """Number of equal leading characters of text[off:off+m] and s[i:i+m]."""
    if m <= 0:
        return 0
    if s.startswith(text[off:off + m], i):
        return m
    lo, hi = 0, m - 1  # answer in [lo, hi]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if s.startswith(text[off:off + mid], i):
            lo = mid
        else:
            hi = mid - 1
    return lo


class Node:
    __slots__ = ("text", "parent", "children", "ids", "widths", "first", "last", "logp", "mv", "stamp",
                 "version", "worker", "tails", "terminal", "stops", "alive", "gen", "retrieved", "__weakref__")

    def __init__(self, text: str, parent: Node | None) -> None:
        self.text = text
        self.parent = parent
        self.children: dict[str, Node] | None = None
        self.ids = array("i")
        self.widths = array("B")
        self.first = 0  # start of the first token, relative to this node's start
        self.last = 0  # end of the last token, relative to this node's start
        self.logp = array("f")
        self.mv = array("B")
        self.stamp = 0
        self.version = -1
        self.worker: str | None = None
        self.tails: dict[int, str] | None = None  # relative offset -> optional text starting there
        self.terminal = False  # a recorded chain ends exactly at this node's end
        self.stops: set[int] | None = None  # relative offsets inside the text where recorded chains end
        self.alive = True
        self.gen = 0  # bumped whenever text, parent or tokens change (validates insert anchors)
        # leading tokens a retrieval returned (tokens appended later, e.g. the next turn, are not covered): removing
        # generated tokens beyond them loses training data nobody has read
        self.retrieved = 0

    @property
    def key(self) -> str:
        return self.text[:1]

    def is_leaf(self) -> bool:
        return not self.children

    def ends(self) -> list[int]:
        """Relative end of each token."""
        return list(itertools.accumulate(self.widths, initial=self.first))[1:]

    def set_tokens(self, ids: array, widths: array, first: int, logp: array, mv: array) -> None:
        self.ids, self.widths, self.first, self.logp, self.mv = ids, widths, first, logp, mv
        self.last = first + sum(widths) if len(ids) else 0
        self.gen += 1

    def __repr__(self) -> str:  # pragma: no cover
        return f"<Node {self.text[:20]!r} tokens={len(self.ids)} children={len(self.children or ())}>"


class Anchor:
    """Where a matched chain can be continued without re-walking it: the path nodes fully inside the
    match (with their generation counters at match time), how many chain tokens they hold (``carry``),
    where that part of the chain ends (``chain_end``) and where the last of them ends (``pos``)."""

    __slots__ = ("tree", "nodes", "carry", "chain_end", "pos")

    def __init__(self, tree: StringRadixTrie, nodes: list, carry: int, chain_end: int, pos: int) -> None:
        self.tree, self.nodes, self.carry, self.chain_end, self.pos = tree, nodes, carry, chain_end, pos

    def valid(self) -> bool:
        """Are all anchor nodes still attached and unchanged (text, parent, tokens)? Call under the tree lock."""
        for nd, g in self.nodes:
            if not nd.alive or nd.gen != g:
                return False
        return True


class Match:
    """The longest recorded chain for a prefix of a query (lists are built lazily from typed arrays)."""

    __slots__ = ("raw_ids", "raw_logp", "_mv_parts", "_w_parts", "vtable", "canonical", "query_pos", "markers",
                 "worker", "skipped", "anchor", "chain_end", "_cache")

    def __init__(self) -> None:
        self.raw_ids = array("i")
        self.raw_logp = array("f")
        self._mv_parts: list[array] = []  # per matched node: its mv slice
        self._w_parts: list[array] = []  # per matched node: its widths slice
        self.vtable: list[str] = []
        self.canonical = ""  # the recorded text the ids cover (optional spans written out)
        self.query_pos = 0  # the ids cover query[:query_pos]
        self.markers: list[tuple[int, str]] = []  # optional spans inside ``canonical``
        self.worker: str | None = None
        self.skipped = 0  # optional spans taken without being written in the query
        self.anchor: Anchor | None = None
        self.chain_end = 0  # where the chain ends in ``canonical``
        self._cache: dict[str, Any] = {}

    @property
    def raw_mv(self) -> list[int]:
        return self._get("raw_mv", lambda: list(itertools.chain.from_iterable(self._mv_parts)))

    @property
    def raw_widths(self) -> list[int]:
        """Widths; the first entry is the start offset of the chain (0)."""
        return self._get("raw_widths", lambda: [0, *itertools.chain.from_iterable(self._w_parts)])

    def tail_raw(self, k: int) -> tuple[list[int], list[int], list[float], list[int]]:
        """Tokens k.. of the chain as stored: (ids, widths -- the first one measured from where token k starts
        --, logprobs with NaN for unknown, raw ``version_index << 1 | mask`` values of the trie); O(len - k)."""
        n = len(self.raw_ids)
        if k >= n:
            return [], [], [], []
        ws: list[int] = []
        mvs: list[int] = []
        need = n - k
        for w, mv in zip(reversed(self._w_parts), reversed(self._mv_parts)):
            if len(ws) >= need:
                break
            ws[:0] = w.tolist()
            mvs[:0] = mv.tolist()
        ws, mvs = ws[len(ws) - need:], mvs[len(mvs) - need:]
        return self.raw_ids[k:].tolist(), ws, self.raw_logp[k:].tolist(), mvs

    def __len__(self) -> int:
        return len(self.raw_ids)

    def _get(self, key: str, make: Any) -> Any:
        v = self._cache.get(key)
        if v is None:
            v = self._cache[key] = make()
        return v

    @property
    def ids(self) -> list[int]:
        return self._get("ids", self.raw_ids.tolist)

    @property
    def logprobs(self) -> list[float | None]:
        return self._get("logprobs", lambda: [None if x != x else x for x in self.raw_logp.tolist()])

    @property
    def loss_mask(self) -> list[int]:
        return self._get("mask", lambda: [x & 1 for x in self.raw_mv])

    @property
    def version_index(self) -> list[int]:
        return self._get("vidx", lambda: [x >> 1 for x in self.raw_mv])

    @property
    def versions(self) -> list[str]:
        vt = self.vtable
        return self._get("versions", lambda: [vt[x >> 1] for x in self.raw_mv])

    @property
    def ends(self) -> list[int]:
        """Absolute end of each token in ``canonical``."""
        return self._get("ends", lambda: list(itertools.accumulate(self.raw_widths))[1:])


def _take_tokens(m: Match, segs: list[tuple[Node, int, int]]) -> None:
    """Append to ``m`` the tokens of a matched chain: the first ``cnt`` tokens of each ``(node, start, cnt)``
    segment (ids, logprobs, and the node's mask/version and width slices). Both match walks end with it."""
    ids, logp, mv_parts, w_parts = m.raw_ids, m.raw_logp, m._mv_parts, m._w_parts
    for nd, _s, cnt in segs:
        if cnt == len(nd.ids):
            ids.extend(nd.ids)
            logp.extend(nd.logp)
            mv_parts.append(nd.mv[:])
            w_parts.append(nd.widths)  # never mutated in place (replaced by set_tokens)
        else:
            ids.extend(nd.ids[:cnt])
            logp.extend(nd.logp[:cnt])
            mv_parts.append(nd.mv[:cnt])
            w_parts.append(nd.widths[:cnt])


class StringRadixTrie:
    """Text -> exact token chain (ids, logprobs, loss mask, weight versions). Thread-safe."""

    def __init__(self, max_tokens: int = DEFAULT_MAX_TOKENS, gc_k: int = 5) -> None:
        self.max_tokens = int(max_tokens)
        self.gc_k = int(gc_k)
        self.root = Node("", None)
        self.lock = threading.RLock()
        self.size = 0  # tokens stored
        self.node_count = 0
        self._clock = itertools.count(1)
        self._heap: list[tuple[int, int, Node]] = []
        self._seq = itertools.count()
        self.vtable: list[str] = []
        self.vindex: dict[str, int] = {}
        self.evictions = 0  # nodes evicted (LRU)
        self.evicted_tokens = 0
        self.gc_runs = 0
        self.gc_removed_tokens = 0
        # removed nodes holding generated tokens no retrieval returned: (nodes, those generated tokens)
        self.evicted_unretrieved = [0, 0]
        self.gc_removed_unretrieved = [0, 0]
        self._unreported = [0, 0, 0, 0]  # the same, since the last warning (evicted, gc)
        self._loss_warning = RateLimit()
        self.removed_index: dict[int, tuple[str, int, int, str]] = {}  # see REMOVED_INDEX_SIZE
        self.inserts = 0
        # called under the lock with the redo record of every insert that is applied (persist.py's journal)
        self.journal: Callable[[tuple], None] | None = None

    # --- versions -----------------------------------------------------------------------------

    def version_id(self, version: Any) -> int:
        """Index of a weight version (a string; first observation defines the order)."""
        v = "default" if version is None else str(version)
        idx = self.vindex.get(v)
        if idx is None:
            idx = self.vindex[v] = len(self.vtable)
            self.vtable.append(v)
        return idx

    def newer(self, a: Any, b: Any) -> bool:
        """Is version ``a`` newer than ``b`` (by first observation)?"""
        return self.vindex.get(str(a), -1) > self.vindex.get(str(b), -1)

    # --- bookkeeping ---------------------------------------------------------------------------

    def _touch(self, node: Node, stamp: int) -> None:
        node.stamp = stamp
        if not node.children:
            heapq.heappush(self._heap, (stamp, next(self._seq), node))

    def _new_child(self, parent: Node, text: str) -> Node:
        child = Node(text, parent)
        if parent.children is None:
            parent.children = {}
        parent.children[text[:1]] = child
        child.stamp = parent.stamp
        child.version = parent.version
        child.worker = parent.worker
        self.node_count += 1
        heapq.heappush(self._heap, (child.stamp, next(self._seq), child))
        return child

    def _remove(self, node: Node, reason: str | None = None) -> int:
        """Remove ``node`` and its subtree; returns tokens removed. With a ``reason`` ("evicted" / "gc") recorded
        data is lost: it is accounted (``_account_removal``); None: the insert replaces a chain itself."""
        removed = 0
        stack = [(node, self._path_text(node) if reason is not None else "")]
        while stack:
            n, path = stack.pop()
            removed += len(n.ids)
            n.alive = False
            self.node_count -= 1
            if reason is not None:
                self._account_removal(n, path, reason)
            if n.children:
                below = path + n.text if reason is not None else ""
                stack.extend((ch, below) for ch in n.children.values())
        parent = node.parent
        if parent is not None and parent.children is not None:
            if parent.children.get(node.key) is node:
                del parent.children[node.key]
            if not parent.children:
                parent.children = None
                if parent is not self.root:
                    heapq.heappush(self._heap, (parent.stamp, next(self._seq), parent))
        self.size -= removed
        return removed

    def _split(self, node: Node, k: int) -> Node:
        """Split ``node`` at relative offset k (0 < k < len(text)); returns the new upper node."""
        parent = node.parent
        assert parent is not None and 0 < k < len(node.text)
        upper = Node(node.text[:k], parent)
        upper.stamp, upper.version, upper.worker = node.stamp, node.version, node.worker
        parent.children[node.key] = upper  # type: ignore[index]
        ends = node.ends()
        c = bisect_right(ends, k)
        if c:
            upper.set_tokens(node.ids[:c], node.widths[:c], node.first, node.logp[:c], node.mv[:c])
            lower_first = ends[c - 1] - k
        else:
            lower_first = node.first - k
        if c < len(ends):
            node.set_tokens(node.ids[c:], node.widths[c:], lower_first, node.logp[c:], node.mv[c:])
        else:
            node.set_tokens(array("i"), array("B"), 0, array("f"), array("B"))
        if node.tails:
            up = {r: o for r, o in node.tails.items() if r < k}
            low = {r - k: o for r, o in node.tails.items() if r >= k}
            upper.tails = up or None
            node.tails = low or None
        if node.stops:
            upper.terminal = k in node.stops
            upper.stops = {r for r in node.stops if r < k} or None
            node.stops = {r - k for r in node.stops if r > k} or None
        node.text = node.text[k:]
        node.parent = upper
        node.gen += 1
        upper.children = {node.key: node}
        self.node_count += 1
        return upper

    @staticmethod
    def _seg(node: Node, a: int, b: int | None = None) -> tuple[array, array, array, array]:
        return node.ids[a:b], node.widths[a:b], node.logp[a:b], node.mv[a:b]

    def _prepend(self, child: Node, seg: tuple[array, array, array, array], seg_start: int, seg_end: int,
                 child_start: int) -> None:
        """Put the chain piece ``seg`` (absolute [seg_start, seg_end]) in front of child's tokens."""
        ids, widths, logp, mv = seg
        if len(child.ids) and child_start + child.first != seg_end:
            # the child's own chain does not continue this one (already broken): drop it
            self.size -= len(child.ids)
            child.set_tokens(array("i"), array("B"), 0, array("f"), array("B"))
        if len(child.ids):
            ni = array("i", ids)
            ni.extend(child.ids)
            nl = array("f", logp)
            nl.extend(child.logp)
            child.set_tokens(ni, _ucat(widths, child.widths), seg_start - child_start, nl, _ucat(mv, child.mv))
        else:
            child.set_tokens(array("i", ids), array(widths.typecode, widths), seg_start - child_start,
                             array("f", logp), array(mv.typecode, mv))
        self.size += len(ids)

    def _push_down(self, node: Node, j: int, node_start: int) -> None:
        """Keep node tokens[:j]; move tokens[j:] into every child (and the terminal '' child)."""
        n = len(node.ids)
        if j >= n:
            return
        ends = node.ends()
        seg_start = node_start + (ends[j - 1] if j else node.first)
        seg_end = node_start + ends[-1]
        seg = self._seg(node, j)
        node_end = node_start + len(node.text)
        if node.terminal:
            node.terminal = False
            term = node.children.get("") if node.children else None
            if term is None:
                term = self._new_child(node, "")
                term.terminal = True
        if j:
            node.set_tokens(*_reorder(self._seg(node, 0, j), node.first))
        else:
            node.set_tokens(array("i"), array("B"), 0, array("f"), array("B"))
        self.size -= n - j
        for child in list((node.children or {}).values()):
            self._prepend(child, seg, seg_start, seg_end, node_end)

    # --- insert -------------------------------------------------------------------------------

    def _make_path(self, text: str, node: Node | None = None, pos: int = 0) -> list[tuple[Node, int]]:
        """Nodes covering text[pos:] below ``node`` (default: the root), splitting / adding as needed."""
        node = self.root if node is None else node
        path: list[tuple[Node, int]] = []
        n = len(text)
        while pos < n:
            ch = node.children.get(text[pos]) if node.children else None
            if ch is None:
                new = self._new_child(node, text[pos:])
                path.append((new, pos))
                break
            L = len(ch.text)
            k = _common(ch.text, 0, text, pos, min(L, n - pos))
            if ch.stops:
                first_stop = min(ch.stops)
                if first_stop <= k:
                    # the walk passes a chain end inside an extended leaf: make it a node boundary again,
                    # so that what _insert does there (keep that chain in a "" child) works as before
                    upper = self._split(ch, first_stop)
                    path.append((upper, pos))
                    pos += first_stop
                    node = upper
                    continue
            if k == L:
                path.append((ch, pos))
                pos += L
                node = ch
                continue
            upper = self._split(ch, k)
            path.append((upper, pos))
            pos += k
            node = upper
        return path

    def insert(self, text: str, ids: Sequence[int], ends: Sequence[int], logprobs: Sequence[float | None] | None = None,
               loss_mask: Sequence[int] | None = None, versions: Sequence[Any] | Any = None,
               markers: Iterable[tuple[int, str]] = (), worker: str | None = None) -> None:
        """Record ``text`` tokenized as ``ids``; token i covers text[ends[i-1]:ends[i]] (ends[-1] == len(text)).

        ``versions``: one version (string) for every token, or one per token. ``markers``: optional spans
        ``(start, span_text)`` (text[start:start+len(span_text)] == span_text).
        """
        self._insert_checked(text, ids, ends, logprobs, loss_mask, versions, markers, worker, None)

    def insert_after(self, anchor: Anchor, text: str, ids: Sequence[int], ends: Sequence[int],
                     logprobs: Sequence[float | None] | None = None, loss_mask: Sequence[int] | None = None,
                     versions: Sequence[Any] | Any = None, markers: Iterable[tuple[int, str]] = (),
                     worker: str | None = None) -> bool:
        """Record ``text`` whose chain continues the chain of a match's ``anchor``: only the tokens after the
        anchor (``ids``/``ends``/... = chain[anchor.carry:], ends absolute in ``text``) are given and walked.

        The result equals ``insert`` of the whole chain. Returns False (nothing done) when the anchor is no
        longer valid (its nodes were split, evicted or got other tokens since the match): call ``insert``.
        """
        if anchor.tree is not self or len(ids) == 0 or anchor.pos >= len(text):
            return False
        return self._insert_checked(text, ids, ends, logprobs, loss_mask, versions, markers, worker, anchor)

    def _insert_checked(self, text: str, ids: Sequence[int], ends: Sequence[int],
                        logprobs: Sequence[float | None] | None, loss_mask: Sequence[int] | None,
                        versions: Sequence[Any] | Any, markers: Iterable[tuple[int, str]], worker: str | None,
                        anchor: Anchor | None) -> bool:
        n = len(ids)
        if not text or n == 0:
            return True
        lps = [NAN if x is None else float(x) for x in logprobs] if logprobs is not None else [NAN] * n
        mask = [1 if m else 0 for m in loss_mask] if loss_mask is not None else [0] * n
        if len(lps) != n or len(mask) != n:
            raise ValueError("logprobs / loss_mask must have one entry per token")
        if versions is None or isinstance(versions, (str, int)):
            vs: list[Any] = [versions] * n
        else:
            vs = list(versions)
            if len(vs) != n:
                raise ValueError("versions must have one entry per token")
        # runs of equal (version, mask): insert_raw loops over runs, not tokens (a reply is one or two runs)
        runs = [(len(list(g)), v, m) for (v, m), g in itertools.groupby(zip(vs, mask))]
        ends = list(ends)
        if len(ends) != n or ends[-1] != len(text):
            raise ValueError("ends must be non-decreasing char offsets ending at len(text)")
        cs0 = anchor.chain_end if anchor is not None else 0
        widths = list(map(_sub, ends, [cs0, *ends[:-1]]))  # ends[0] - cs0, then the differences
        return self.insert_raw(anchor, text, list(ids), widths, lps, (), runs, markers, worker)

    def insert_raw(self, anchor: Anchor | None, text: str, ids: list[int], widths: list[int], lps: list[float],
                   mv_prefix: Sequence[int], runs: Sequence[tuple[int, Any, int]], markers: Iterable[tuple[int, str]],
                   worker: str | None) -> bool:
        """``insert`` / ``insert_after`` (``anchor`` not None) without per-token conversions: ``widths`` are the
        characters each token covers (the first measured from where the chain starts: 0, or the anchor's chain
        end), ``lps`` floats (NaN = unknown); the tokens' loss mask and versions are ``mv_prefix`` (raw
        ``version_index << 1 | mask`` values of this trie, e.g. from ``Match.tail_raw``) followed by ``runs`` of
        ``(count, version, mask)``. Returns False (nothing done) when the anchor is no longer valid."""
        n = len(ids)
        if not text or n == 0:
            return True
        if anchor is not None and (anchor.tree is not self or anchor.pos >= len(text)):
            return False
        cs0 = anchor.chain_end if anchor is not None else 0
        if len(widths) != n or min(widths) < 0 or cs0 + sum(widths) != len(text):
            raise ValueError("ends must be non-decreasing char offsets ending at len(text)")
        if len(lps) != n or len(mv_prefix) + sum(r[0] for r in runs) != n:
            raise ValueError("logprobs / loss_mask must have one entry per token")
        with self.lock:
            if anchor is not None and not anchor.valid():
                return False
            journal = self.journal
            if journal is not None:  # the redo record (``redo``): the anchor as (tokens, chain end, position).
                # The lists are kept by reference (the insert never changes them; pickled by the journal writer)
                markers = list(markers)
                journal((text, anchor.carry if anchor is not None else 0, cs0, anchor.pos if anchor is not None else 0,
                         ids, widths, lps, list(mv_prefix), list(runs), markers, worker))
            before = len(self.vtable)
            mv_all = list(mv_prefix)
            rec_version = max(mv_all) >> 1 if mv_all else -1
            vcache: dict[Any, int] = {}
            for cnt, v, m in runs:
                if cnt <= 0:
                    continue
                try:
                    vi = vcache.get(v)
                    if vi is None:
                        vi = vcache[v] = self.version_id(v)
                except TypeError:  # unhashable version values
                    vi = self.version_id(v)
                if vi > rec_version:
                    rec_version = vi
                x = (vi << 1) | (1 if m else 0)
                if cnt == 1:
                    mv_all.append(x)
                else:
                    mv_all += [x] * cnt
            stamp = next(self._clock)
            if anchor is None:
                ends = list(itertools.accumulate(widths))
                self._insert(self._make_path(text), stamp, ids, ends, widths, lps, mv_all, rec_version, worker)
                floor, mnode = 0, None
            else:
                last = anchor.nodes[-1][0]
                if not last.children and len(last.ids) and cs0 == anchor.pos \
                        and len(last.ids) + n <= self.max_tokens // 4:
                    # the usual next turn: the matched chain ends at the end of a leaf; extend the leaf (up to
                    # a quarter of the bound: evicting one leaf must not empty the cache of a long trajectory)
                    start0 = cs0 - len(last.text)
                    self._extend_leaf(last, text[cs0:], ids, widths, lps, mv_all)
                    for start, span in markers:
                        start = int(start)
                        if start >= cs0 and span and text.startswith(span, start):
                            if last.tails is None:
                                last.tails = {}
                            last.tails[start - start0] = span
                    markers = ()
                    path = None
                else:
                    path = self._make_path(text, last, anchor.pos)
                for nd, _ in anchor.nodes:  # what the full walk does on the shared prefix (_stamp, inlined)
                    if rec_version > nd.version:
                        nd.version = rec_version
                    if worker is not None:
                        nd.worker = worker
                    nd.stamp = stamp
                    if not nd.children:
                        heapq.heappush(self._heap, (stamp, next(self._seq), nd))
                if path is not None:
                    ends = list(itertools.accumulate(widths, initial=cs0))[1:]
                    self._insert(path, stamp, ids, ends, widths, lps, mv_all, rec_version, worker, cs0)
                # optional spans above the anchor are recorded; the walk starts at the anchor
                floor, mnode = anchor.pos, last
            for start, span in markers:
                if int(start) >= floor:
                    self._add_marker(text, int(start), span, mnode, floor)
            self.inserts += 1
            if len(self.vtable) > before and len(self.vtable) > self.gc_k:
                self.gc()
            self._evict_to(self.max_tokens)
            return True

    def _extend_leaf(self, leaf: Node, more: str, ids: list[int], widths: list[int], lps: list[float],
                     mv: list[int]) -> None:
        """Append ``more`` and its chain (which starts exactly at the leaf's end) to a leaf.

        One node per trajectory instead of one per turn: lookups walk fewer nodes and records create none.
        Where a recorded chain ended (the leaf was terminal) is kept in ``stops``; an insert that walks past
        it splits the node there again (``_make_path``). New arrays, never in-place growth: a Match may still
        hold the old widths array."""
        if leaf.terminal:
            if leaf.stops is None:
                leaf.stops = set()
            leaf.stops.add(len(leaf.text))
        leaf.ids = leaf.ids + typed_array("i", ids)
        leaf.widths = _ucat(leaf.widths, _uarr(widths))
        leaf.logp = leaf.logp + typed_array("f", lps)
        leaf.mv = _ucat(leaf.mv, _uarr(mv))
        leaf.text += more
        leaf.last = len(leaf.text)
        leaf.terminal = True
        leaf.gen += 1
        self.size += len(ids)

    def _insert(self, path: list[tuple[Node, int]], stamp: int, ids: list[int], ends: list[int], widths: list[int],
                lps: list[float], mv: list[int], rec_version: int, worker: str | None, cs0: int = 0) -> None:
        """Place the chain (starting at absolute position ``cs0``) along ``path``."""
        carry = 0  # index of the first chain token not placed yet
        n = len(ids)
        for pi, (node, s) in enumerate(path):
            e = s + len(node.text)
            k = bisect_right(ends, e, carry) if pi < len(path) - 1 else n
            # the tokens the node shares with chain[carry:k]: equal ids and widths and agreeing metadata
            old_n = len(node.ids)
            chain_start = ends[carry - 1] if carry else cs0
            j = self._shared(node, s + node.first == chain_start, ids, widths, lps, mv, carry, k)
            if j < old_n and (node.children or pi < len(path) - 1):
                self._push_down(node, j, s)
            last = pi == len(path) - 1
            if last:
                rem_first = (ends[carry + j - 1] if carry + j else cs0) - e
                if node.children:
                    term = node.children.get("")
                    if carry + j < n:
                        jt = 0
                        if term is None:
                            term = self._new_child(node, "")
                        else:  # the chain recorded for this very text: keep what agrees, the rest is replaced
                            jt = self._shared(term, term.first == rem_first, ids, widths, lps, mv, carry + j, n)
                        self._keep_then(term, jt, ids, widths, lps, mv, carry + j + jt, rem_first)
                        term.terminal = True
                        node.terminal = False
                        self._stamp(term, stamp, rec_version, worker)
                    else:
                        if term is not None:
                            self._remove(term)
                        node.terminal = True
                else:  # a leaf: the chain recorded for this very text; what does not agree is replaced
                    self._keep_then(node, j, ids, widths, lps, mv, carry + j, rem_first + len(node.text))
                    node.terminal = True
            else:
                carry += j
            self._stamp(node, stamp, rec_version, worker)

    def _stamp(self, node: Node, stamp: int, version: int, worker: str | None) -> None:
        if version > node.version:
            node.version = version
        if worker is not None:
            node.worker = worker
        self._touch(node, stamp)

    @staticmethod
    def _shared(node: Node, aligned: bool, ids: list[int], widths: list[int], lps: list[float], mv: list[int], a: int,
                b: int) -> int:
        """How many leading tokens of ``node`` chain[a:b] shares (``aligned``: the node's chain starts where
        chain[a] does): equal ids and widths, and metadata that agrees (``_agree``; upgrades merged in)."""
        old_n = len(node.ids)
        if not old_n or not aligned:
            return 0
        m = min(old_n, b - a)
        j = 0
        if node.ids[:m].tolist() == ids[a:a + m] and node.widths[:m].tolist() == widths[a:a + m]:
            j = m
        else:
            while j < m and node.ids[j] == ids[a + j] and node.widths[j] == widths[a + j]:
                j += 1
        return StringRadixTrie._agree(node, j, lps, mv, a) if j else 0

    @staticmethod
    def _agree(node: Node, j: int, lps: list[float], mv: list[int], a: int) -> int:
        """Of the node's first ``j`` tokens (ids and widths equal to chain[a:a+j]), how many the chain may share.

        A token generated by both (mask 1 on both sides) is shared only with the same weight version and the
        same logprob (as stored, float32; NaN equals NaN): siblings that sampled the same first tokens keep their
        own values. A prompt token (mask 0) on either side agrees; see ``_merge_meta`` for which values stay."""
        nm, nl = node.mv, node.logp
        new_l = typed_array("f", lps[a:a + j])  # rounded as they would be stored
        if nm[:j].tolist() == mv[a:a + j] and nl[:j].tobytes() == new_l.tobytes():
            return j  # identical (the usual case: a prefix carried over from a match)
        for i in range(j):
            x, y = nm[i], mv[a + i]
            if x & y & 1:
                if x != y:
                    return i
                p, q = nl[i], new_l[i]
                if p != q and (p == p or q == q):
                    return i
        StringRadixTrie._merge_meta(node, j, lps, mv, a)
        return j

    @staticmethod
    def _merge_meta(node: Node, j: int, lps: list[float], mv: list[int], a: int = 0) -> None:
        """Merge chain[a:a+j] into the node's first j tokens, which agree (``_agree``): a token the node holds as
        prompt (mask 0) that this chain generated takes the generated values, and such a record also brings its
        values for the prompt tokens of that stretch (a generated record beats a prompt record). Generated
        tokens already stored are never overwritten (they are equal, or the chain has them as prompt)."""
        old = node.mv
        if not any(mv[a + i] & 1 and not old[i] & 1 for i in range(j)):
            return
        new = old.tolist()
        nl = node.logp
        for i in range(j):
            if not new[i] & 1:
                new[i] = mv[a + i]
                nl[i] = lps[a + i]
        node.mv = _uarr(new)

    def _keep_then(self, node: Node, keep: int, ids: list[int], widths: list[int], lps: list[float], mv: list[int],
                   a: int, first: int) -> None:
        """The node's tokens become its first ``keep`` tokens followed by chain[a:] (``first``: where chain[a]
        starts relative to the node, used when nothing is kept)."""
        old_n = len(node.ids)
        self.size -= old_n - keep
        n = len(ids)
        if a < n:
            rem = slice(a, n)
            if keep:
                a_ids, a_w, a_l, a_mv = self._seg(node, 0, keep)
                a_ids.extend(ids[rem])
                a_l.extend(lps[rem])
                node.set_tokens(a_ids, _ucat(a_w, _uarr(widths[rem])), node.first, a_l, _ucat(a_mv, _uarr(mv[rem])))
            else:
                node.set_tokens(typed_array("i", ids[rem]), _uarr(widths[rem]), first, typed_array("f", lps[rem]),
                                _uarr(mv[rem]))
            self.size += n - a
        elif keep < old_n:
            node.set_tokens(*_reorder(self._seg(node, 0, keep), node.first))

    def _add_marker(self, text: str, start: int, span: str, node: Node | None = None, pos: int = 0) -> None:
        """Mark ``span`` at ``start`` optional; the walk starts below ``node`` (whose end is at ``pos``, default:
        the root) -- a node on the recorded path of ``text`` ending at or before ``start``."""
        if not span or start < 0 or text[start:start + len(span)] != span:
            return
        if node is None:
            node, pos = self.root, 0
        while True:
            ch = node.children.get(text[pos]) if node.children and pos < len(text) else None
            if ch is None:
                return
            L = len(ch.text)
            if pos + L > start:
                if text.startswith(ch.text[:start - pos + 1], pos):
                    if ch.tails is None:
                        ch.tails = {}
                    ch.tails[start - pos] = span
                return
            if not text.startswith(ch.text, pos):
                return
            pos += L
            node = ch

    # --- lookup -------------------------------------------------------------------------------

    def _advance(self, path: list, cands: list, node: Node, nstart: int, off: int, s: str, i: int
                 ) -> tuple[Node, int, int, int]:
        n = len(s)
        while True:
            text = node.text
            L = len(text)
            if off < L and i < n:
                if not off and L <= n - i and s.startswith(text, i):
                    k = L  # the whole edge matches (the usual case)
                else:
                    k = _common(text, off, s, i, min(L - off, n - i))
                if node.tails:
                    for r, o in node.tails.items():
                        if off <= r <= off + k:
                            cands.append((nstart + r, o, node, nstart, len(path) - 1))
                off += k
                i += k
                if off < L:
                    break
            elif off < L:
                break
            if i >= n:
                break
            ch = node.children.get(s[i]) if node.children else None
            if ch is None:
                break
            nstart += L
            path.append((ch, nstart))
            node, off = ch, 0
        if off == len(node.text) and node.children:
            # stopped at a node boundary: an optional span may start right here in any child
            for ch in node.children.values():
                if ch.tails and 0 in ch.tails:
                    cands.append((nstart + len(node.text), ch.tails[0], ch, nstart + len(node.text), len(path)))
        return node, nstart, off, i

    def match(self, query: str, touch: bool = True, trailing: bool = True) -> Match:
        """The longest recorded chain for a prefix of ``query`` (optional spans may be skipped).

        ``trailing``: may the chain end with an optional span the query does not reach (the EOS of a reply the
        query ends with)? Yes for a retrieval (the trainer gets the EOS the model generated); no for a prompt
        (``prepare``: what is sent must be the query's text, e.g. a sibling of an EOS-only reply must not be sent
        its prompt + EOS)."""
        with self.lock:
            m = self._match_plain(query, touch, trailing)
            return m if m is not None else self._match_skipping(query, touch, trailing)

    def _match_plain(self, query: str, touch: bool, trailing: bool = True) -> Match | None:
        """``match`` when the walk needs no optional span skipped (the usual case), in two passes over the
        path; None when it would (the query ends or diverges inside an optional span): ``_match_skipping``
        answers those."""
        path: list[tuple[Node, int]] = []
        node, i, n = self.root, 0, len(query)
        while i < n:  # without skips, query positions are tree positions
            ch = node.children.get(query[i]) if node.children else None
            if ch is None:
                break
            path.append((ch, i))
            node = ch
            text = ch.text
            if query.startswith(text, i):
                i += len(text)
                continue
            i += _common(text, 0, query, i, min(len(text), n - i))
            break
        t = i
        if trailing or i < n:  # the query goes on (or a trailing span may be taken): a skip may match further
            for nd, s in path:  # an optional span covering the stop position
                if nd.tails:
                    for r, o in nd.tails.items():
                        if s + r <= t < s + r + len(o):
                            return None
        at_end = t == (path[-1][1] + len(node.text) if path else 0)
        if at_end and node.children:
            if trailing or i < n:
                for ch in node.children.values():
                    if ch.tails and 0 in ch.tails:
                        return None
            term = node.children.get("")
            if term is not None:
                path.append((term, t))
        segs, b = self._collect(path, t)  # the validated chain, as the general walk takes it
        # pass 2: ids and metadata, recency, the anchor, the canonical text and its optional spans
        m = Match()
        m.query_pos = m.chain_end = b
        m.vtable = self.vtable
        stamp = next(self._clock) if touch else 0
        _take_tokens(m, segs)
        parts: list[str] = []
        markers = m.markers
        anchor_nodes: list[tuple[Node, int]] = []
        carry = chain_end = apos = 0
        anchoring = True
        si, nseg = 0, len(segs)
        last_seg = segs[-1][0] if segs else None
        stamping = touch and last_seg is not None
        for nd, s in path:
            text = nd.text
            e = s + len(text)
            if si < nseg and segs[si][0] is nd:
                if anchoring:  # the chain tokens so far are all whole nodes: carry counts them
                    cnt = segs[si][2]
                    if cnt == len(nd.ids) and text and e <= b:
                        anchor_nodes.append((nd, nd.gen))
                        carry, chain_end, apos = carry + cnt, s + nd.last, e
                    else:
                        anchoring = False
                si += 1
            elif s >= b and si >= nseg:
                break
            elif anchoring:
                if text and e <= b and not len(nd.ids):
                    anchor_nodes.append((nd, nd.gen))
                    apos = e
                else:
                    anchoring = False
            if stamping:  # the path down to the last chain node: ancestors at least as recent
                nd.stamp = stamp
                if nd is last_seg:
                    stamping = False
                    if not nd.children:
                        heapq.heappush(self._heap, (stamp, next(self._seq), nd))
            if s < b:
                parts.append(text if e <= b else text[:b - s])
                if nd.tails:
                    for r, o in nd.tails.items():
                        if s + r + len(o) <= b:
                            markers.append((s + r, o))
        if anchor_nodes:
            m.anchor = Anchor(self, anchor_nodes, carry, chain_end, apos)
        if last_seg is not None:
            m.worker = last_seg.worker
        m.canonical = "".join(parts)
        return m

    def _match_skipping(self, query: str, touch: bool, trailing: bool = True) -> Match:
        """``match`` in general: optional spans the query omits are taken whole and the walk goes on after
        them."""
        path: list[tuple[Node, int]] = []
        cands: list[tuple[int, str, Node, int, int]] = []  # (V, optional text, node, node start, path len)
        node, nstart, off, q = self.root, 0, 0, 0
        delta = 0
        seg_start = 0
        skips: list[tuple[int, int, int]] = []  # (V, len, delta before)
        while True:
            node, nstart, off, q = self._advance(path, cands, node, nstart, off, query, q)
            t = nstart + off
            best = None
            for c in cands:
                V, o = c[0], c[1]
                if seg_start <= V <= t < V + len(o) and (best is None or V < best[0]):
                    best = c
            if best is None or (not trailing and q >= len(query)):
                break
            V, o, vnode, ns, plen = best
            sub = path[:plen] + [(vnode, ns)]
            sub_cands: list = []
            n2, ns2, off2, i2 = self._advance(sub, sub_cands, vnode, ns, V - ns, o, 0)
            if i2 < len(o):
                break
            q = V - delta
            skips.append((V, len(o), delta))
            delta += len(o)
            seg_start = V + len(o)
            path = sub
            cands = [c for c in cands if c[0] < V]
            node, nstart, off = n2, ns2, off2
        t = nstart + off
        if off == len(node.text) and node.children and "" in node.children:
            path.append((node.children[""], t))
        res = self._collect(path, t)
        b = res[1]
        for V, L, _d in skips:
            if V < b < V + L:  # the optional span is only partly recorded: stop before it
                res = self._collect(path, V)
                b = res[1]
                break
        segs, b = res
        qpos = b
        for V, L, d in skips:
            if b >= V + L:
                qpos = b - (d + L)
            elif b <= V:
                qpos = b - d
                break
        m = Match()
        m.query_pos = qpos
        m.skipped = sum(1 for V, L, d in skips if b >= V + L)
        m.vtable = self.vtable
        stamp = next(self._clock) if touch else 0
        parts: list[str] = []
        _take_tokens(m, segs)
        m.chain_end = b
        m.anchor = self._anchor(path, segs, b)
        if segs:
            last = segs[-1][0]
            m.worker = last.worker
            if touch:  # _touch, inlined (the path is one chain: only its last node can be a leaf)
                last.stamp = stamp
                if not last.children:
                    heapq.heappush(self._heap, (stamp, next(self._seq), last))
                # ancestors are at least as recent as their descendants (token-less ones too)
                p = last.parent
                while p is not None:
                    if p.stamp < stamp:
                        p.stamp = stamp
                    p = p.parent
        for nd, s in path:
            if s >= b:
                break
            parts.append(nd.text[:b - s])
            if nd.tails:
                for r, o in nd.tails.items():
                    if s + r + len(o) <= b:
                        m.markers.append((s + r, o))
        m.canonical = "".join(parts)
        return m

    def _anchor(self, path: list[tuple[Node, int]], segs: list[tuple[Node, int, int]], b: int) -> Anchor | None:
        """The deepest path node D ending at or before ``b`` whose chain tokens (and those of every node
        above it) are all part of the match: an insert of a continuation can start after D."""
        # segs are the token-bearing path nodes in path order (the last one possibly partial)
        nodes: list[tuple[Node, int]] = []
        carry = chain_end = pos = 0
        tokens = cend = 0
        si, nseg = 0, len(segs)
        for nd, s in path:
            text = nd.text
            e = s + len(text)
            if not text or e > b:
                break
            k = len(nd.ids)
            if k:
                if si >= nseg:
                    break
                sn, _, cnt = segs[si]
                if sn is not nd or cnt != k:
                    break
                si += 1
                tokens += k
                cend = s + nd.last
            nodes.append((nd, nd.gen))
            carry, chain_end, pos = tokens, cend, e
        if not nodes:
            return None
        return Anchor(self, nodes, carry, chain_end, pos)

    def _collect(self, path: list[tuple[Node, int]], t: int) -> tuple[list[tuple[Node, int, int]], int]:
        """Validated chain along ``path`` up to text position t: ([(node, start, count)], end)."""
        b = 0
        segs: list[tuple[Node, int, int]] = []
        for nd, s in path:
            if not len(nd.ids):
                continue
            if s + nd.first != b:
                break
            if s + nd.last <= t:
                segs.append((nd, s, len(nd.ids)))
                b = s + nd.last
                continue
            ends = nd.ends()
            cnt = bisect_right(ends, t - s)
            if cnt:
                segs.append((nd, s, cnt))
                b = s + ends[cnt - 1]
            break
        # never end on tokens that carry only part of a character
        while segs:
            nd, s, cnt = segs[-1]
            if nd.widths[cnt - 1] != 0:
                break
            cnt -= 1
            if cnt:
                segs[-1] = (nd, s, cnt)
            else:
                segs.pop()
            if segs:
                nd2, s2, c2 = segs[-1]
                b = s2 + (list(itertools.accumulate(nd2.widths[:c2], initial=nd2.first))[-1])
            else:
                b = 0
        return segs, b

    # --- eviction and GC ----------------------------------------------------------------------

    def _evict_to(self, limit: int) -> None:
        heap = self._heap
        before = self.evictions
        while self.size > limit and heap:
            stamp, _, node = heapq.heappop(heap)
            if not node.alive or node.children or node.stamp != stamp or node is self.root:
                continue
            removed = self._remove(node, "evicted")
            self.evictions += 1
            self.evicted_tokens += removed
        if len(heap) > 4 * self.node_count + 64:
            self._rebuild_heap()
        if self.evictions != before and self._unreported[0]:
            self._report_loss()

    def _rebuild_heap(self) -> None:
        self._heap = [(n.stamp, next(self._seq), n) for n in self._iter_nodes() if not n.children]
        heapq.heapify(self._heap)

    def evict(self, tokens: int) -> int:
        """Evict least-recently-used leaves until ``tokens`` tokens are freed; returns tokens freed."""
        with self.lock:
            before = self.size
            self._evict_to(max(0, self.size - tokens))
            return before - self.size

    def gc(self, keep: int | None = None) -> int:
        """Drop subtrees last used by a version older than the newest ``keep`` (default gc_k) versions."""
        with self.lock:
            keep = self.gc_k if keep is None else keep
            cutoff = len(self.vtable) - keep
            self.gc_runs += 1
            if cutoff <= 0:
                return 0
            removed = 0
            stack = [self.root]
            while stack:
                n = stack.pop()
                for ch in list((n.children or {}).values()):
                    if ch.version < cutoff:
                        removed += self._remove(ch, "gc")
                    else:
                        stack.append(ch)
            self.gc_removed_tokens += removed
            if self._unreported[2]:
                self._report_loss()
            return removed

    @staticmethod
    def _path_text(node: Node) -> str:
        """The text from the root to where ``node`` starts."""
        parts = []
        p = node.parent
        while p is not None:
            parts.append(p.text)
            p = p.parent
        return "".join(reversed(parts))

    def _account_removal(self, n: Node, path: str, reason: str) -> None:
        """Remember the text of a removed node (starting after ``path``) for ``removed_at``, and count its generated
        tokens that no retrieval returned. Only on eviction / GC: records and lookups never pay for it."""
        k = len(n.ids)
        gen = _generated(n.mv) if k else 0
        key = hash((path, n.text[:1]))
        idx = self.removed_index
        idx.pop(key, None)
        idx[key] = (self._snippet(n), len(n.text), gen, reason)
        if len(idx) > REMOVED_INDEX_SIZE:
            del idx[next(iter(idx))]
        lost = 0
        if gen:
            r = n.retrieved
            lost = gen if not r else _generated(n.mv, r) if r < k else 0
        if lost:
            total, o = (self.evicted_unretrieved, 0) if reason == "evicted" else (self.gc_removed_unretrieved, 2)
            total[0] += 1
            total[1] += lost
            self._unreported[o] += 1
            self._unreported[o + 1] += lost

    @staticmethod
    def _snippet(n: Node) -> str:
        """The first REMOVED_SNIPPET characters of a node's text without its optional spans (a query may omit an
        EOS and go on)."""
        parts, pos, size = [], 0, 0
        for r, o in sorted((n.tails or {}).items()):
            if r < pos:
                continue
            if size + r - pos >= REMOVED_SNIPPET:
                break
            parts.append(n.text[pos:r])
            size += r - pos
            pos = r + len(o)
        parts.append(n.text[pos:pos + REMOVED_SNIPPET - size])
        return "".join(parts)

    def _report_loss(self) -> None:
        """One WARNING per interval about generated tokens removed before any retrieval returned them."""
        ev, ev_gen, gc_n, gc_gen = self._unreported
        if not self._loss_warning.ready():
            return
        self._unreported = [0, 0, 0, 0]
        what = []
        if ev:
            what.append(f"{ev:,} entries holding {ev_gen:,} generated tokens evicted at the bound of "
                        f"{self.max_tokens:,} tokens (~{bound_mb(self.max_tokens)})")
        if gc_n:
            what.append(f"{gc_n:,} entries holding {gc_gen:,} generated tokens removed by weight-version GC (only the "
                        f"newest {self.gc_k} versions are kept, --radix-tree-gc-k)")
        fixes = []
        if ev:
            fixes.append(f"size --radix-tree-max-size to at least tokens per trajectory x live trajectories "
                         f"(~{BYTES_PER_TOKEN} bytes per token)")
        if gc_n:
            fixes.append("raise --radix-tree-gc-k above the number of weight versions a rollout spans")
        log.warning("radix_tree: trajectories were removed from the cache before any retrieval returned them: "
                    "%s (since the last such warning). A retrieval of them now gets fresh tokens with loss_mask 0 "
                    "and is marked \"evicted\". To keep them, %s, or retrieve trajectories sooner; totals are in "
                    "/metrics (evicted_unretrieved, gc_removed_unretrieved).", "; ".join(what), " and ".join(fixes))

    def mark_retrieved(self, m: Match) -> None:
        """Flag the tokens a retrieval returned (``m``, matched under the same lock hold): removing them later
        loses nothing unread."""
        canon = m.canonical
        path: list[tuple[Node, int]] = []
        node, i, n = self.root, 0, len(canon)
        with self.lock:
            while i < n:
                ch = node.children.get(canon[i]) if node.children else None
                if ch is None:
                    break
                path.append((ch, i))
                if not canon.startswith(ch.text, i):
                    break  # the chain ends inside ch
                i += len(ch.text)
                node = ch
            if i == n and node.children and "" in node.children:
                path.append((node.children[""], i))  # the chain recorded for a text ending right there
            for nd, _, cnt in self._collect(path, n)[0]:
                if cnt > nd.retrieved:
                    nd.retrieved = cnt

    def removed_at(self, m: Match, query: str) -> tuple[int, int, str] | None:
        """Does ``query`` go on, where the chain of its match ``m`` stops, into text that was recorded and then
        removed (eviction or GC)? Returns (where that text starts in ``query``, generated tokens removed with it,
        "evicted" / "gc"), or None. Only retrievals that tokenize a rest afresh ask: the hot paths never do."""
        idx = self.removed_index
        if not idx:
            return None
        q = m.canonical + query[m.query_pos:]  # tree coordinates (optional spans written out) up to the chain end
        c, n = m.chain_end, len(q)
        with self.lock:
            bounds = [0]  # node boundaries along q: where a removed node can have started
            node, i = self.root, 0
            while i < n:
                ch = node.children.get(q[i]) if node.children else None
                if ch is None or not q.startswith(ch.text, i):
                    break
                i += len(ch.text)
                bounds.append(i)
                node = ch
            start = max(b for b in bounds if b <= c)  # the boundary before the chain end
            for b in bounds:
                if b < start:
                    continue
                key = hash((q[:b], q[b:b + 1]))
                e = idx.get(key)
                # q goes on with the removed text (as far as q goes)
                if e is None or not e[0].startswith(q[b:b + len(e[0])]) or b + e[1] <= c:
                    continue
                idx[key] = idx.pop(key)  # recently asked for: kept longest
                at, gen, reason = max(b, c), 0, e[3]
                while e is not None and e[0].startswith(q[b:b + len(e[0])]):  # and what was removed below it
                    gen += e[2]
                    b += e[1]
                    e = idx.get(hash((q[:b], q[b:b + 1]))) if e[1] else None
                return m.query_pos + at - c, gen, reason
        return None

    # --- persistence (persist.py) ------------------------------------------------------------

    _NODE_FIELDS = ("text", "ids", "widths", "first", "last", "logp", "mv", "stamp", "version", "worker", "tails",
                    "terminal", "stops", "retrieved")
    _TREE_FIELDS = ("size", "node_count", "vtable", "evictions", "evicted_tokens", "gc_runs", "gc_removed_tokens",
                    "evicted_unretrieved", "gc_removed_unretrieved", "removed_index", "inserts")

    def export_state(self) -> dict:
        """A copy of the whole tree as plain data (nodes in pre-order with their parent's index; arrays copied).
        Call under the lock for a consistent cut; the copy is cheap (array copies), pickling it is not."""
        with self.lock:
            nodes: list[tuple] = []
            stack: list[tuple[Node, int]] = [(ch, 0) for ch in (self.root.children or {}).values()]
            while stack:
                n, parent = stack.pop()
                nodes.append((parent, n.text, n.ids[:], n.widths[:], n.first, n.last, n.logp[:], n.mv[:], n.stamp,
                              n.version, n.worker, dict(n.tails) if n.tails else None, n.terminal,
                              set(n.stops) if n.stops else None, n.retrieved))
                if n.children:
                    me = len(nodes)  # the root is index 0, this node len(nodes)
                    stack.extend((ch, me) for ch in n.children.values())
            state = {f: getattr(self, f) for f in self._TREE_FIELDS}
            state["vtable"] = list(self.vtable)
            state["evicted_unretrieved"] = list(self.evicted_unretrieved)
            state["gc_removed_unretrieved"] = list(self.gc_removed_unretrieved)
            state["removed_index"] = dict(self.removed_index)
            state["root"] = (self.root.stamp, self.root.version, self.root.worker)
            state["clock"] = max([self.root.stamp, *(x[8] for x in nodes)]) + 1
            state["nodes"] = nodes
            return state

    def import_state(self, state: dict) -> None:
        """Replace the tree's contents with ``export_state``'s data (bounds and gc_k stay this tree's)."""
        with self.lock:
            self.root = root = Node("", None)
            root.stamp, root.version, root.worker = state["root"]
            made = [root]
            for rec in state["nodes"]:
                parent = made[rec[0]]
                n = Node(rec[1], parent)
                (n.ids, n.widths, n.first, n.last, n.logp, n.mv, n.stamp, n.version, n.worker, n.tails, n.terminal,
                 n.stops, n.retrieved) = rec[2:]
                if parent.children is None:
                    parent.children = {}
                parent.children[n.text[:1]] = n
                made.append(n)
            for f in self._TREE_FIELDS:
                setattr(self, f, state[f])
            self.vindex = {v: i for i, v in enumerate(self.vtable)}
            self._clock = itertools.count(state["clock"])
            self._rebuild_heap()

    def redo(self, rec: tuple) -> bool:
        """Apply a journal record (what ``journal`` was given by ``insert_raw``) to this tree. An insert that
        continued an anchored chain is applied after the same anchor when the tree holds it (it does when the
        records are replayed in order onto the state they were made on), else as the whole chain; False when the
        chain it continued is not here (nothing done)."""
        text, carry, chain_end, pos, ids, widths, lps, mv_prefix, runs, markers, worker = rec
        ids, widths, lps, mv_prefix = list(ids), list(widths), list(lps), list(mv_prefix)
        if not carry:
            return self.insert_raw(None, text, ids, widths, lps, mv_prefix, runs, markers, worker)
        with self.lock:
            m = self.match(text, touch=False)
            a = m.anchor
            if a is not None and (a.carry, a.chain_end, a.pos) == (carry, chain_end, pos):
                if self.insert_raw(a, text, ids, widths, lps, mv_prefix, runs, markers, worker):
                    return True
            if len(m.raw_ids) < carry or m.skipped:
                return False
            pw = m.raw_widths[1:carry + 1]
            if sum(pw) != chain_end or m.canonical[:chain_end] != text[:chain_end]:
                return False
            pre_mv = m.raw_mv[:carry]
            return self.insert_raw(None, text, m.raw_ids[:carry].tolist() + list(ids), pw + list(widths),
                                   m.raw_logp[:carry].tolist() + list(lps), pre_mv + list(mv_prefix), runs,
                                   markers, worker)

    # --- introspection ------------------------------------------------------------------------

    def _iter_nodes(self) -> Iterable[Node]:
        stack = list((self.root.children or {}).values())
        while stack:
            n = stack.pop()
            yield n
            if n.children:
                stack.extend(n.children.values())

    def __len__(self) -> int:
        return self.size

    def versions(self) -> list[str]:
        """Weight versions the stored tokens were produced by, oldest first."""
        with self.lock:
            seen: set[int] = set()
            for n in self._iter_nodes():
                seen.update(x >> 1 for x in n.mv)
            return [self.vtable[i] for i in sorted(seen)]

    def nbytes(self) -> int:
        """Bytes used by the nodes (objects, texts, arrays, child dicts), measured with sys.getsizeof."""
        with self.lock:
            total = sys.getsizeof(self.root)
            for n in self._iter_nodes():
                total += (sys.getsizeof(n) + sys.getsizeof(n.text) + sys.getsizeof(n.ids) + sys.getsizeof(n.widths)
                          + sys.getsizeof(n.logp) + sys.getsizeof(n.mv))
                if n.children:
                    total += sys.getsizeof(n.children)
                if n.tails:
                    total += sys.getsizeof(n.tails)
            return total

    def check(self) -> None:
        """Assert the structural invariants (for tests)."""
        with self.lock:
            count, size = 0, 0
            stack = [(self.root, 0)]
            while stack:
                n, s = stack.pop()
                if n is not self.root:
                    count += 1
                    size += len(n.ids)
                    assert n.alive
                    assert len(n.ids) == len(n.widths) == len(n.logp) == len(n.mv)
                    if len(n.ids):
                        assert n.last == n.first + sum(n.widths) <= len(n.text)
                    assert n.text or n.parent is not None
                    assert not n.stops or all(0 < r < len(n.text) for r in n.stops)
                for key, ch in (n.children or {}).items():
                    assert ch.parent is n and ch.key == key
                    assert n is self.root or ch.version <= n.version
                    assert n is self.root or ch.stamp <= n.stamp
                    if key == "":
                        assert not ch.children
                    stack.append((ch, s + len(n.text)))
            assert count == self.node_count, (count, self.node_count)
            assert size == self.size, (size, self.size)
            assert self.size <= self.max_tokens


def _reorder(seg: tuple[array, array, array, array], first: int) -> tuple[array, array, int, array, array]:
    ids, widths, logp, mv = seg
    return ids, widths, first, logp, mv
