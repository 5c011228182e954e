"""The columnar answer of ``POST /retrieve_batch`` (``"format": "columnar"``): a whole rollout step's trajectories
as three flat arrays and one JSON header, so the trainer reads them without parsing a number per token.

Layout (little-endian)::

    b"SLRCOL1\\n" | u32 header length | header (JSON) | tokens int32[N] | rollout_logp float32[N] | loss_mask uint8[N]

The header is ``{"total_tokens": N, "items": [...]}``, one item per session asked, in order: the
``GET /sessions/{sid}?tokens=false`` answer (or ``{"session_id", "error"}``), where every trajectory also has
``"offset"`` (its first token in the arrays; it runs ``token_length`` tokens) and ``"weight_versions"`` as runs
``[[count, version], ...]``. ``decode`` reads it back into the JSON-lines form (lists), or with ``numpy=True``
into numpy arrays that are views of the payload (no copy).
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Iterator
from typing import Any

import orjson

from .store import Session

MAGIC = b"SLRCOL1\n"
MEDIA_TYPE = "application/vnd.slime-router.columnar"
_U32 = struct.Struct("<I")


CHUNK = 1 << 20  # bytes per piece sent: one ASGI message per trajectory array would cost more than the copy


def encode(items: list[Session | dict[str, Any]]) -> Iterator[bytes]:
    """The payload for these sessions (a dict item is an error line, passed as is), in pieces of ~1 MB."""
    buf = bytearray()
    for piece in _pieces(items):
        buf += piece
        if len(buf) >= CHUNK:
            yield bytes(buf)
            buf.clear()
    if buf:
        yield bytes(buf)


def _pieces(items: list[Session | dict[str, Any]]) -> Iterator[bytes]:
    segs = []
    header_items: list[dict[str, Any]] = []
    offset = 0
    for item in items:
        if isinstance(item, dict):
            header_items.append(item)
            continue
        d = item.as_dict(arrays=False)
        for seg, td in zip(item.segments, d["trajectories"]):
            td["offset"] = offset
            td["weight_versions"] = [list(r) for r in seg.versions]
            offset += len(seg.ids)
            segs.append(seg)
        header_items.append(d)
    header = orjson.dumps({"total_tokens": offset, "items": header_items})
    yield MAGIC + _U32.pack(len(header)) + header
    swap = sys.byteorder != "little"
    for name in ("ids", "logp"):
        for seg in segs:
            a = getattr(seg, name)
            if swap:  # pragma: no cover -- big-endian hosts
                a = array(a.typecode, a)
                a.byteswap()
            yield a.tobytes()
    for seg in segs:
        yield bytes(seg.mask)


def split(payload: bytes) -> tuple[dict[str, Any], memoryview, memoryview, memoryview]:
    """A columnar payload's header and its three arrays' bytes (ids, logprobs, mask: views of ``payload``)."""
    if payload[:len(MAGIC)] != MAGIC:
        raise ValueError("not a slime-router columnar payload (wrong magic bytes)")
    (hlen,) = _U32.unpack_from(payload, len(MAGIC))
    start = len(MAGIC) + 4
    header = orjson.loads(payload[start:start + hlen])
    n = header["total_tokens"]
    base = start + hlen
    if len(payload) != base + 9 * n:
        raise ValueError(f"truncated columnar payload: {len(payload) - base} bytes of arrays, {9 * n} expected")
    view = memoryview(payload)
    return header, view[base:base + 4 * n], view[base + 4 * n:base + 8 * n], view[base + 8 * n:]


def join(header: dict[str, Any], ids: bytes, logprobs: bytes, mask: bytes) -> bytes:
    """A columnar payload from its header (``total_tokens``, ``items``) and its three arrays' bytes."""
    head = orjson.dumps(header)
    return MAGIC + _U32.pack(len(head)) + head + ids + logprobs + mask


def decode(payload: bytes, numpy: bool = False) -> list[dict[str, Any]]:
    """The items of a columnar payload, each trajectory with ``tokens``, ``rollout_logp``, ``loss_mask`` and
    per-token ``weight_versions`` (lists; numpy arrays, views of ``payload``, with ``numpy=True``)."""
    header, ids_b, lp_b, mask_b = split(payload)
    if numpy:
        import numpy as np

        ids: Any = np.frombuffer(ids_b, dtype="<i4")
        lps: Any = np.frombuffer(lp_b, dtype="<f4")
        mask: Any = np.frombuffer(mask_b, dtype="u1")
    else:
        ids, lps = array("i"), array("f")
        ids.frombytes(ids_b)
        lps.frombytes(lp_b)
        if sys.byteorder != "little":  # pragma: no cover
            ids.byteswap()
            lps.byteswap()
        mask = mask_b
    for item in header["items"]:
        for t in item.get("trajectories", ()):
            a = t.pop("offset")
            b = a + t["token_length"]
            versions: list[str] = []
            for count, v in t["weight_versions"]:
                versions += [v] * count
            t["weight_versions"] = versions
            if numpy:
                t["tokens"], t["rollout_logp"], t["loss_mask"] = ids[a:b], lps[a:b], mask[a:b]
            else:
                t["tokens"], t["rollout_logp"], t["loss_mask"] = ids[a:b].tolist(), lps[a:b].tolist(), list(mask[a:b])
    return header["items"]
