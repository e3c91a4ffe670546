"""JAX-only fast formulation of :mod:`arrayquant.inference` (``formulation="jax-dot"``).

Imported lazily, only when the arrays are JAX arrays: ``import arrayquant``
never imports JAX.

:func:`int_accumulate` computes the integer sums of W8A8 with
``lax.dot_general`` on int8 operands and ``preferred_element_type=int32``
(XLA's int8 GEMM: IMMA tensor cores on NVIDIA GPUs), applies zero points
afterwards as rank-one int32 corrections (centering the codes first would turn
them into int16 and lose the int8 GEMM), and contracts packed sub-byte weights
field by field (low nibbles with the even columns of x, high nibbles with the
odd ones) so the codes are never interleaved. The sums are exact, so the
result equals the generic int32 formulation bit for bit (tests check it).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from .packing import bit_fields

__all__ = ["int_accumulate"]


def _signed_fields(data, bits: int, signed: bool):
    """int8 code fields of packed bytes; unsigned codes shifted by ``2**(bits-1)``."""
    fields = bit_fields(data, bits, signed=signed)
    if signed:
        return fields
    half = jnp.int8(1 << (bits - 1))
    return [f.astype(jnp.int8) - half for f in fields]


def _signed_codes(c, qt):
    if qt.signed:
        return c.astype(jnp.int8)
    if qt.bits == 8:
        return lax.bitcast_convert_type(jnp.bitwise_xor(c, jnp.uint8(128)), jnp.int8)
    return c.astype(jnp.int8) - jnp.int8(1 << (qt.bits - 1))


def _signed_zero(z, qt):
    if z is None:
        return None
    z = z.astype(jnp.int32)
    return z if qt.signed else z - (1 << (qt.bits - 1))


def _pad_cols(a, length: int):
    extra = length - a.shape[1]
    return a if extra == 0 else jnp.pad(a, ((0, 0), (0, extra)))


def _weight_operands(w, wp):
    """(per, [(n, L_r) int8 fields]) with field r holding codes r, r + per, ... along k."""
    from .inference import _fields_fit

    if wp.packed_k and _fields_fit(wp):
        per = wp.per_byte
        fields = _signed_fields(w.data, wp.qt.bits, wp.qt.signed)
        fields = [f.T if wp.kn else f for f in fields]
        return per, [f[:, : -(-(wp.k - r) // per)] for r, f in enumerate(fields) if r < wp.k]
    codes = w.codes.T if wp.kn else w.codes
    return 1, [_signed_codes(codes, wp.qt)]


def int_accumulate(act, w, wp, zw):
    """``sum_k (qx - zx)(qw - zw)`` per weight group, shape (G, m, n), int32."""
    cx = _signed_codes(act.codes, act.qt)
    zx = _signed_zero(act.zero_point, act.qt)  # (m, 1)
    zw = _signed_zero(zw, wp.qt)  # (n or 1, G)
    m, n, groups = cx.shape[0], wp.n, wp.groups
    g = min(wp.bk, wp.k)
    per, fields = _weight_operands(w, wp)
    acc = rows = cols = None
    for r, wr in enumerate(fields):
        xr = cx[:, r::per] if per > 1 else cx
        if groups == 1:
            a = lax.dot_general(xr, wr, (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.int32)[None]
            xv, wv = xr[:, None, :], wr[:, None, :]
        else:
            gr = g // per
            xv = _pad_cols(xr, groups * gr).reshape(m, groups, gr)
            wv = _pad_cols(wr, groups * gr).reshape(n, groups, gr)
            a = lax.dot_general(xv, wv, (((2,), (2,)), ((1,), (1,))),
                                preferred_element_type=jnp.int32)
        acc = a if acc is None else acc + a
        if zw is not None:
            t = jnp.sum(xv, axis=2, dtype=jnp.int32)  # (m, G)
            rows = t if rows is None else rows + t
        if zx is not None:
            t = jnp.sum(wv, axis=2, dtype=jnp.int32)  # (n, G)
            cols = t if cols is None else cols + t
    # sum (qx - zx)(qw - zw) = sum qx qw - zw sum qx - zx sum qw + count zx zw
    if zw is not None:
        acc = acc - rows.T[:, :, None] * zw.T[:, None, :]
    if zx is not None:
        acc = acc - zx[None] * cols.T[:, None, :]
    if zw is not None and zx is not None:
        counts = np.minimum(g, wp.k - g * np.arange(groups)).astype(np.int32)
        acc = acc + (jnp.asarray(counts)[:, None, None] * zx[None]) * zw.T[:, None, :]
    return acc
