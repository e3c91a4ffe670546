"""NumPy fast paths for pack / unpack along a contiguous last axis.

The generic array API code works value by value through strided slices. For
C-contiguous NumPy arrays packed along the last axis, whole bytes are handled
at once instead: the ``8 // bits`` codes that share a byte are one machine word
(read through a uint16 / uint32 view, little-endian), and shifting that word
moves every code to or from its place in a single operation. Work runs in
cache-sized slabs with preallocated scratch buffers, so each byte is read from
memory once. Results equal the generic path bit for bit (tests check it).
"""

from __future__ import annotations

import sys

import numpy as np

__all__ = ["can_use", "pack_last", "unpack_last"]

_WORD = {2: np.uint32, 4: np.uint16}
_SLAB = 1 << 18  # words per slab: 512 KiB (uint16) or 1 MiB (uint32) of scratch


def can_use(a, bits: int, axis: int) -> bool:
    return (
        sys.byteorder == "little"
        and isinstance(a, np.ndarray)
        and axis == a.ndim - 1
        and bits in (1, 2, 4)
        and a.size > 0
    )


def _byte_mask(bits: int, word) -> int:
    per = 8 // bits
    return sum(((1 << bits) - 1) << (8 * k) for k in range(per))


def pack_last(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack along the last axis (``codes`` already range-checked)."""
    per = 8 // bits
    n = codes.shape[-1]
    if bits == 1:
        return np.packbits(codes.astype(np.uint8, copy=False) & 1, axis=-1, bitorder="little")
    v = codes if codes.dtype.itemsize == 1 else codes.astype(np.int16) & 0xFF
    v = v.astype(np.uint8, copy=False) if v.dtype != np.int8 else v
    if n % per:
        pad = np.zeros((*v.shape[:-1], per - n % per), dtype=v.dtype)
        v = np.concatenate([v, pad], axis=-1)
    lead = v.shape[:-1]
    words = np.ascontiguousarray(v).reshape(-1).view(_WORD[bits])
    out = np.empty(words.size, np.uint8)
    acc = np.empty(min(_SLAB, words.size), words.dtype)
    tmp = np.empty_like(acc)
    mask = (1 << bits) - 1
    for i in range(0, words.size, _SLAB):
        w = words[i : i + _SLAB]
        a, t = acc[: w.size], tmp[: w.size]
        np.bitwise_and(w, mask, out=a)
        for k in range(1, per):
            # code k sits at bit 8k of the word; it belongs at bit k * bits
            np.right_shift(w, 8 * k - k * bits, out=t)
            np.bitwise_and(t, mask << (k * bits), out=t)
            np.bitwise_or(a, t, out=a)
        out[i : i + w.size] = a
    return out.reshape(*lead, -1)


def unpack_last(packed: np.ndarray, bits: int, length: int, signed: bool) -> np.ndarray:
    per = 8 // bits
    lead = packed.shape[:-1]
    if bits == 1:
        out = np.unpackbits(packed, axis=-1, count=length, bitorder="little")
        return -(out.view(np.int8)) if signed else out
    src = np.ascontiguousarray(packed).reshape(-1)
    words = np.empty(src.size, _WORD[bits])
    tmp = np.empty(min(_SLAB, src.size), words.dtype)
    keep = _byte_mask(bits, words.dtype)
    half = 1 << (bits - 1)
    for i in range(0, src.size, _SLAB):
        o = words[i : i + _SLAB]
        t = tmp[: o.size]
        np.copyto(o, src[i : i + o.size])
        acc_src = o.copy() if per > 2 else o
        for k in range(1, per):
            # bits [k * bits, (k + 1) * bits) of the byte move to byte k of the word
            np.left_shift(acc_src, k * (8 - bits), out=t)
            np.bitwise_or(o, t, out=o)
        np.bitwise_and(o, keep, out=o)
        if signed:  # sign-extend each byte: (v ^ half) - half, in int8
            v = o.view(np.int8)
            np.bitwise_xor(v, half, out=v)
            np.subtract(v, half, out=v)
    out = words.view(np.int8 if signed else np.uint8).reshape(*lead, -1)
    return out[..., :length] if out.shape[-1] != length else out
