"""JAX-only paths of :mod:`arrayquant.products`: ``jax-dot`` and the one-row loops.

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

from arrayquant.packing import bit_fields
from arrayquant.products.plan import fields_fit

__all__ = ["gemv", "int8_dot", "int_accumulate", "int_gemv", "loops_pay_off"]


def loops_pay_off() -> bool:
    """Whether the one-row loops (:func:`gemv`, :func:`int_gemv`) are the right choice.

    On a single CPU device they read the weight once at memory speed (several times
    faster than contracting dequantized fields there). On GPUs and TPUs every loop
    iteration is a kernel launch, and with several devices a weight may be sharded
    along the in axis, where a dynamic slice per group makes XLA move data between
    devices: there the loop-free ``fields`` / ``jax-dot`` products, which XLA fuses
    and partitions like a float product, are chosen instead.
    """
    import jax

    return jax.default_backend() == "cpu" and jax.device_count() == 1


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


def _weight_operands(w, wp):
    """``(per, ka, [int8 fields])``: field r holds codes r, r + per, ... along k, which is
    axis ``ka`` of each field: 1 in the (n, k) layout of ``linear``'s weights, 0 in the
    stored (k, n) layout of ``matmul``'s. Contracting the stored axis, rather than a
    transposed copy, keeps XLA:CPU on its int8 GEMM (a transposed int8 operand made it
    convert the weight to int32 for a generic dot, 3-5x slower than float)."""
    ka = 0 if wp.kn else 1
    if wp.packed_k and fields_fit(wp):
        per = wp.per_byte
        fields = _signed_fields(w.data, wp.qt.bits, wp.qt.signed)
        lengths = [-(-(wp.k - r) // per) for r in range(min(per, wp.k))]
        return per, ka, [f[:n] if wp.kn else f[:, :n] for f, n in zip(fields, lengths)]
    return 1, ka, [_signed_codes(w.codes, wp.qt)]


def _pad_axis(a, axis: int, length: int):
    extra = length - a.shape[axis]
    if extra == 0:
        return a
    return jnp.pad(a, [(0, extra if d == axis else 0) for d in range(a.ndim)])


# Two XLA:GPU defects (JAX 0.11.2 on an H200; docs/inference.md) shape this function:
# - its Triton int8 GEMM returns wrong int32 sums when the contraction length is not a
#   multiple of 4 (k = 2, 3, 5, 6, 7, 9, 33 with m, n > 1; k = 1, 4, 8, 16 were exact).
#   Zero codes add nothing, so the operands are zero-padded to a multiple of 4;
# - fusing the bit-field extraction and group reshape of packed weights into that GEMM
#   aborts the process ("Check failed: subdim_size_accumulator == dim_size" in
#   triton_tiling_propagation.cc). An optimization barrier on the operands stops it.
# Both were checked on that GPU: benchmarks/int_accumulation_check.py (0 wrong sums of
# 155 programs, against 10 before) and benchmarks/gpu_compile_crash.py (no abort).
_INT8_DOT_K_MULTIPLE = 4


def int8_dot(a, b, dims):
    """``lax.dot_general`` of int8 operands into int32, the contraction axis (one per
    operand) zero-padded to a multiple of :data:`_INT8_DOT_K_MULTIPLE`, operands behind
    an optimization barrier (see the comment above)."""
    ((ca,), (cb,)), _ = dims
    length = -(-a.shape[ca] // _INT8_DOT_K_MULTIPLE) * _INT8_DOT_K_MULTIPLE
    a, b = _pad_axis(a, ca, length), _pad_axis(b, cb, length)
    a, b = lax.optimization_barrier((a, b))
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.int32)


def int_accumulate(act, w, wp, zw, xp=None):
    """``sum_k (qx - zx)(qw - zw)`` per weight group, shape (G, m, n), int32 (``xp``, the
    namespace every integer formulation takes, is ``jax.numpy`` here)."""
    cx = _signed_codes(act.codes, act.qt)
    zx = _signed_zero(act.zero_point, act.qt)  # (m, 1)
    zw = _signed_zero(zw, wp.qt)  # (n or 1, G)
    m, n, groups = cx.shape[0], wp.n, wp.groups
    g = min(wp.bk, wp.k)
    per, ka, fields = _weight_operands(w, wp)
    acc = rows = cols = None
    for r, wr in enumerate(fields):
        xr = cx[:, r::per] if per > 1 else cx
        if groups == 1:
            a = int8_dot(xr, wr, (((1,), (ka,)), ((), ())))[None]
            xv, wv = xr[:, None, :], (wr[:, None, :] if ka else wr[None])
        else:
            gr = g // per
            xv = _pad_axis(xr, 1, groups * gr).reshape(m, groups, gr)
            if ka:
                wv = _pad_axis(wr, 1, groups * gr).reshape(n, groups, gr)
                a = int8_dot(xv, wv, (((2,), (2,)), ((1,), (1,))))
            else:
                wv = _pad_axis(wr, 0, groups * gr).reshape(groups, gr, n)
                a = int8_dot(xv, wv, (((2,), (1,)), ((1,), (0,))))
        acc = a if acc is None else acc + a
        if zw is not None:
            t = jnp.sum(xv, axis=2, dtype=jnp.int32)  # (m, G)
            rows = t if rows is None else rows + t
        if zx is not None:
            t = jnp.sum(wv, axis=2, dtype=jnp.int32) if ka else jnp.sum(
                wv, axis=1, dtype=jnp.int32).T  # (n, G)
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


# --------------------------------------------------------------------------- one-row loops


def _row_operands(w, wp):
    """(data (n, L) in the (n, k) layout, per): packed bytes, split into bit fields inside
    the loop (whole-byte groups), else one code per column."""
    if wp.packed_k and fields_fit(wp):
        data, per = w.data, wp.per_byte
    else:
        data, per = (w.codes if w.packed_axis is not None else w.data), 1
    return (data.T if wp.kn else data), per


def _columns(data, start, length: int, per: int, bits: int, signed: bool, dtype):
    """``[(r, f)]``: in-columns ``[per * start, per * start + length)`` as ``dtype``, by field:
    ``f`` holds columns ``per * start + r, + per, ...``. ``start`` counts stored columns and
    may be traced; ``length`` is static (a partial last unit holds fewer codes)."""
    d = lax.dynamic_slice_in_dim(data, start, -(-length // per), axis=1)
    if per == 1:
        return [(0, d.astype(dtype))]
    out = []
    for r, f in enumerate(bit_fields(d, bits, signed=signed)):
        n_r = -(-(length - r) // per)
        if n_r > 0:
            out.append((r, f[:, :n_r].astype(dtype)))
    return out


def _reduce_fields(products):
    """``sum`` over columns of the per-field products: added first (one fused reduction)
    when the fields have equal lengths, else reduced one by one (a partial last byte)."""
    if len({p.shape[1] for p in products}) == 1:
        t = products[0]
        for p in products[1:]:
            t = t + p
        return jnp.sum(t, axis=1)
    return sum(jnp.sum(p, axis=1) for p in products)


def _loop_units(total: int, unit: int, per: int, body, init, tail):
    """``body`` over the ``total // unit`` whole units in a ``fori_loop`` (one traced body,
    however many units), then ``tail(index, length, acc)`` once for a partial last unit.

    A unit that does not fill whole bytes (one group of ``k`` codes, ``k`` not a
    multiple of the ``per`` codes per byte) is all tail: one static reduction."""
    if unit % per:
        return tail(0, total, init)
    full = total // unit
    acc = init
    if full == 1:
        acc = body(0, acc)
    elif full > 1:
        acc = lax.fori_loop(0, full, body, acc)
    rest = total - full * unit
    return acc if rest == 0 else tail(full, rest, acc)


def gemv(x2, w, wp, s, z, cdt):
    """One row, weight-only: ``sum_g s[:, g] * (codes_g @ x_g - z[:, g] * sum(x_g))``.

    A ``fori_loop`` over the groups: each iteration reads one group's stored bytes
    (a dynamic slice), converts its bit fields and reduces them against the
    matching columns of ``x`` in one fused loop. The traced program holds one
    body whatever the number of groups, so compile time does not grow with it
    (an unrolled loop over 128 groups compiled for 40 s). ``s`` and ``z`` are the
    (n or 1, G) scales and zero points in ``cdt``.
    """
    data, per = _row_operands(w, wp)
    bits, signed = wp.qt.bits, wp.qt.signed
    g = min(wp.bk, wp.k)
    gp = g // per if per > 1 else g
    x1 = x2[0]
    xs = [x1[r::per] for r in range(per)]

    def group(j, length, acc):
        start = j * gp
        cols = _columns(data, start, length, per, bits, signed, cdt)
        t = _reduce_fields([c * lax.dynamic_slice_in_dim(xs[r], start, c.shape[1])
                            for r, c in cols])
        if z is not None:
            t = t - jnp.sum(lax.dynamic_slice_in_dim(x1, j * g, length)) * _col(z, j)
        return acc + t * _col(s, j)

    def body(j, acc):
        return group(j, g, acc)

    acc = _loop_units(wp.k, g, per, body, jnp.zeros((wp.n,), cdt), group)
    return acc[None, :]


def _col(a, j):
    """Column ``j`` (static or traced) of an (n or 1, G) array, as (n,) or (1,)."""
    return lax.dynamic_index_in_dim(a, j, axis=1, keepdims=False)


def int_gemv(act, w, wp, zw, chunk: int):
    """One row, integer: the exact int32 sums ``sum (qw - zw)(qx - zx)`` per weight group,
    shape (G, 1, n), in a ``fori_loop`` over units of at most ``chunk`` columns.

    Each unit is reduced in float32, where its sums are exact integers (``chunk``
    keeps every partial sum within 2**24), then converted to int32 and added to
    its group's sum in int32. A unit is one group when groups fit in ``chunk``;
    else ``chunk`` columns of the only group, or the largest divisor of the group
    size that fits, so that no unit straddles two groups.
    """
    data, per = _row_operands(w, wp)
    bits, signed = wp.qt.bits, wp.qt.signed
    f32 = jnp.float32
    g = min(wp.bk, wp.k)
    if g <= chunk:
        unit = g
    elif wp.groups == 1:
        unit = chunk
    else:
        unit = max(d for d in range(per, chunk + 1, per) if g % d == 0)
    up = unit // per if per > 1 else unit
    x1 = act.codes[0]
    zx = None if act.zero_point is None else act.zero_point.reshape(()).astype(f32)
    xs = [x1[r::per].astype(f32) for r in range(per)]
    zf = None if zw is None else zw.astype(f32)  # (n or 1, G)

    def part(u, length, acc):
        start, j = u * up, u * unit // g  # stored column, and the unit's group
        products = []
        for r, c in _columns(data, start, length, per, bits, signed, f32):
            xr = lax.dynamic_slice_in_dim(xs[r], start, c.shape[1])
            xr = xr if zx is None else xr - zx
            c = c if zf is None else c - _col(zf, j)[:, None]
            products.append(c * xr)
        v = _reduce_fields(products).astype(jnp.int32)
        return lax.dynamic_update_index_in_dim(
            acc, lax.dynamic_index_in_dim(acc, j, 0, keepdims=False) + v, j, 0)

    def body(u, acc):
        return part(u, unit, acc)

    acc = _loop_units(wp.k, unit, per, body, jnp.zeros((wp.groups, wp.n), jnp.int32), part)
    return acc[:, None, :]
