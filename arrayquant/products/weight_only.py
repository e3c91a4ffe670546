"""Weight-only formulations: ``x @ dequantize(w).T`` in float, without always building it.

Each product takes ``(x2, w, wp, cdt, xp)``: ``x2`` the (m, k) rows in the compute dtype
``cdt``, ``w`` the quantized weight, ``wp`` its :class:`~arrayquant.products.plan.WeightPlan`,
and returns (m, n). Which one applies and which one ``auto`` takes is written in
:data:`arrayquant.products.plan.TABLE`; measurements are in docs/inference.md.
"""

from __future__ import annotations

from functools import lru_cache

from arrayquant._backend import is_jax, is_numpy
from arrayquant.affine import dequantize
from arrayquant.packing import bit_fields, unpack
from arrayquant.products import plan
from arrayquant.products.arrays import field_len, nk, pad_last, weight_scales
from arrayquant.products.plan import WeightPlan, fields_fit
from arrayquant.qarray import QArray

__all__ = ["dequantized_product", "epilogue_product", "grouped_product", "fields_product",
           "slabs_product", "gemv_product", "k_slices", "group_bounds", "weight_only"]

#: Bytes of float32 weight per slab: one slab plus its scaled copy stay in L2.
_SLAB_BYTES = 1 << 20


def _scales_f(w: QArray, wp: WeightPlan, cdt, xp):
    s, z = weight_scales(w, wp, xp)  # (n or 1, G)
    return xp.astype(s, cdt), None if z is None else xp.astype(z, cdt)


def _row_slice(a, sl):
    """Rows ``sl`` of an (n, ...) per-row array; a single row broadcasts and stays."""
    return None if a is None else (a if a.shape[0] == 1 else a[sl, ...])


def _scale_codes(c, s, z, wp: WeightPlan, g: int, xp):
    """``s * (c - z)`` for float codes ``c`` (r, L) whose columns form groups of ``g``."""
    if wp.groups == 1:
        return (c - z) * s if z is not None else c * s
    return _dequantize_grouped(c, s, z, g, xp)


def _dequantize_grouped(f, s, z, g: int, xp):
    """``s * (f - z)`` for an (r, L) float array with groups of ``g`` columns, (r, G) scales."""
    r, length = f.shape
    groups = s.shape[1]
    pad = groups * g - length
    if pad:
        f = xp.concat([f, xp.zeros((r, pad), dtype=f.dtype)], axis=1)
    v = xp.reshape(f, (r, groups, g))
    if z is not None:
        v = v - xp.expand_dims(z, axis=2)
    v = xp.reshape(v * xp.expand_dims(s, axis=2), (r, groups * g))
    return v[:, :length] if pad else v


@lru_cache(maxsize=16)
def _byte_table(bits: int, signed: bool) -> tuple[tuple[int, ...], ...]:
    """Codes held by each byte value 0..255, first code first (the unpacking table)."""
    per, mask, half = 8 // bits, (1 << bits) - 1, 1 << (bits - 1)
    rows = []
    for b in range(256):
        v = [(b >> (r * bits)) & mask for r in range(per)]
        rows.append(tuple(c - (1 << bits) if signed and c >= half else c for c in v))
    return tuple(rows)


def dequantized_product(x2, w: QArray, wp: WeightPlan, cdt, xp):
    """Generic: ``x @ dequantize(w).T``, the weight dequantized in the compute dtype."""
    w_hat = dequantize(w, dtype=cdt)
    return xp.matmul(x2, w_hat if wp.kn else xp.permute_dims(w_hat, (1, 0)))


def epilogue_product(x2, w: QArray, wp: WeightPlan, cdt, xp):
    """Scale constant along ``k``: ``(x @ codes.T) * s - rowsum(x) * (s * z)``.

    The float weight is never built (only the codes converted): one pass over the
    weight instead of four, and the scales touch the (m, n) result.
    """
    s, z = _scales_f(w, wp, cdt, xp)
    s_row = xp.permute_dims(s, (1, 0))  # (1, n) or (1, 1)
    c = xp.astype(w.codes, cdt)
    y = xp.matmul(x2, c if wp.kn else xp.permute_dims(c, (1, 0))) * s_row
    if z is not None:
        y = y - xp.sum(x2, axis=1, keepdims=True) * (s_row * xp.permute_dims(z, (1, 0)))
    return y


def grouped_product(x2, w: QArray, wp: WeightPlan, cdt, xp):
    """Groups along ``k``: ``sum_g s[:, g] * (x_g @ codes_g.T - sum(x_g) * z[:, g])``.

    One batched contraction over the groups, shape (G, m, n), then the scales:
    the float weight is never built.
    """
    s, z = _scales_f(w, wp, cdt, xp)
    m, groups, g = x2.shape[0], wp.groups, wp.bk
    c = pad_last(xp.astype(nk(w.codes, wp.kn, xp), cdt), groups * g, xp)
    xv = xp.permute_dims(xp.reshape(pad_last(x2, groups * g, xp), (m, groups, g)), (1, 0, 2))
    t = xp.matmul(xv, xp.permute_dims(xp.reshape(c, (wp.n, groups, g)), (1, 2, 0)))
    if z is not None:
        t = t - xp.sum(xv, axis=2, keepdims=True) * xp.expand_dims(xp.permute_dims(z, (1, 0)), 1)
    return xp.sum(t * xp.expand_dims(xp.permute_dims(s, (1, 0)), axis=1), axis=0)


def fields_product(x2, w: QArray, wp: WeightPlan, cdt, xp):
    """Contract the bit fields of the packed bytes, never interleaving the codes.

    Packed along ``k`` (an (out, in) weight): ``sum_r x[:, r::per] @ w_r.T``,
    the low nibbles with the even columns of ``x``, the high ones with the odd.
    Packed along the out axis (an (in, out) weight): field ``r`` gives the
    output columns ``r, r + per, ...``, interleaved once at the end (m x n).
    """
    s, z = _scales_f(w, wp, cdt, xp)
    per = wp.per_byte
    fields = [nk(f, wp.kn, xp) for f in bit_fields(w.data, wp.qt.bits, signed=wp.qt.signed)]
    if wp.packed_k:
        y = None
        for r, f in enumerate(fields):
            length = field_len(wp.k, per, r)
            if length == 0:  # fewer codes than fields (k < per)
                continue
            f = xp.astype(f[:, :length], cdt)
            f = _scale_codes(f, s, z, wp, wp.bk // per, xp)
            t = xp.matmul(x2[:, r::per], xp.permute_dims(f, (1, 0)))
            y = t if y is None else y + t
        return y
    nb = fields[0].shape[0]
    outs = []
    for r, f in enumerate(fields):
        length = field_len(wp.n, per, r)
        if length == 0:  # fewer outputs than fields (n < per)
            outs.append(xp.zeros((x2.shape[0], nb), dtype=cdt))
            continue
        sl = slice(r, None, per)
        f = xp.astype(f[:length, :], cdt)
        f = _scale_codes(f, _row_slice(s, sl), _row_slice(z, sl), wp, wp.bk, xp)
        outs.append(pad_last(xp.matmul(x2, xp.permute_dims(f, (1, 0))), nb, xp))
    y = xp.reshape(xp.stack(outs, axis=-1), (x2.shape[0], nb * per))
    return y[:, : wp.n]


def _slab_rows(k: int) -> int:
    return max(1, _SLAB_BYTES // (4 * k))


def slabs_product(x2, w: QArray, wp: WeightPlan, cdt, xp):
    """Few rows: dequantize the weight a slab of output rows at a time and multiply
    each slab while it is in cache, so no full float weight is ever written.

    On NumPy, packed bytes are unpacked by one table lookup (``take`` of a
    256-entry table), which yields the codes in order; other libraries use
    :func:`~arrayquant.packing.unpack` on the slab. This is the NumPy GEMV path:
    with one token the product is bound by reading the weight, and the stored
    bytes are read once.
    """
    s, z = _scales_f(w, wp, cdt, xp)
    data = nk(w.data, wp.kn, xp)
    table = None
    if wp.packed_k and is_numpy(xp):  # NumPy's fastest unpacking: one lookup per byte
        table = xp.asarray(_byte_table(wp.qt.bits, wp.qt.signed), dtype=cdt)
    rows = _slab_rows(wp.k)
    parts = []
    for i0 in range(0, wp.n, rows):
        sl = slice(i0, min(wp.n, i0 + rows))
        d = data[sl, ...]
        if table is not None:
            c = xp.take(table, xp.reshape(d, (-1,)), axis=0)
            c = xp.reshape(c, (d.shape[0], d.shape[1] * wp.per_byte))[:, : wp.k]
        elif wp.packed_k:
            c = xp.astype(unpack(d, wp.qt.bits, wp.k, axis=1, signed=wp.qt.signed), cdt)
        else:
            c = xp.astype(d, cdt)
        c = _scale_codes(c, _row_slice(s, sl), _row_slice(z, sl), wp, wp.bk, xp)
        parts.append(xp.matmul(x2, xp.permute_dims(c, (1, 0))))
    return xp.concat(parts, axis=1) if len(parts) > 1 else parts[0]


def k_slices(w: QArray, wp: WeightPlan, c0: int, c1: int, xp):
    """``[(r, per, codes)]``: integer codes (n, L) of the in-columns ``c0 + r, c0 + r +
    per, ...`` below ``c1``. Packed along ``k`` in whole-byte groups, these are the bit
    fields of the bytes ``[c0 / per, c1 / per)``; otherwise one slice of the codes.
    Only the slice is unpacked and converted, inside the consumer's reduction."""
    if wp.packed_k and fields_fit(wp):
        per = wp.per_byte
        data = nk(w.data, wp.kn, xp)[:, c0 // per: -(-c1 // per)]
        out = []
        for r, f in enumerate(bit_fields(data, wp.qt.bits, signed=wp.qt.signed)):
            length = field_len(c1 - c0, per, r)
            if length:
                out.append((r, per, f[:, :length]))
        return out
    codes = w.codes if w.packed_axis is not None else w.data
    return [(0, 1, nk(codes, wp.kn, xp)[:, c0:c1])]


def group_bounds(wp: WeightPlan, chunk: int | None = None):
    """``[(group, c0, c1)]`` over the in axis: each group, cut into chunks of at most
    ``chunk`` columns (a multiple of the codes per byte, so bit fields stay aligned)."""
    g = min(wp.bk, wp.k)
    out = []
    for j in range(wp.groups):
        end = min(wp.k, (j + 1) * g)
        step = end - j * g if chunk is None else chunk
        out.extend((j, c0, min(end, c0 + step)) for c0 in range(j * g, end, step))
    return out


def gemv_product(x2, w: QArray, wp: WeightPlan, cdt, xp):
    """One row: per group, ``sum(codes * x, axis=-1)`` over a static slice of the stored
    codes, stacked to (n, G), then the zero points and scales.

    ``x`` is made 1-D and every group is one 2-D reduction over a slice of the
    stored bytes, the bit fields of packed bytes multiplied by the matching
    columns of ``x`` and added inside it: XLA fuses the field extraction (shifts)
    and conversion into the reduction and reads the weight once (a 2-D ``x``, a
    reshape to (n, G, g) or converting the whole weight first each make XLA on CPU
    10 to 20 times slower). Measurements: docs/inference.md.
    """
    s, z = _scales_f(w, wp, cdt, xp)
    if is_jax(xp):  # traced: one loop body, not one reduction per group
        from arrayquant.products.jax_dot import gemv

        return gemv(x2, w, wp, s, z, cdt)
    xv = xp.reshape(x2, (wp.k,))
    sums, xsums = [], []
    for _, c0, c1 in group_bounds(wp):
        terms = [xp.astype(c, cdt) * xv[c0 + r:c1:per]
                 for r, per, c in k_slices(w, wp, c0, c1, xp)]
        if len({t.shape[1] for t in terms}) > 1:  # a partial last byte: sum each field
            terms = [xp.sum(t, axis=1, keepdims=True) for t in terms]
        # Fields of equal length are added before one reduction (one fused kernel).
        prod = terms[0]
        for t in terms[1:]:
            prod = prod + t
        sums.append(xp.sum(prod, axis=1))
        if z is not None:
            xsums.append(xp.sum(xv[c0:c1]))
    t = xp.stack(sums, axis=1)  # (n, G)
    if z is not None:
        t = t - xp.stack(xsums) * z
    return xp.reshape(xp.sum(t * s, axis=1), (1, wp.n))


def weight_only(x2, w: QArray, wp: WeightPlan, cdt, xp, formulation: str):
    """The weight-only product with ``formulation`` (``"auto"`` or a name in the table)."""
    m = x2.shape[0]
    if formulation == "auto":
        f = plan.choose(plan.WEIGHT_ONLY_KIND, m, wp, xp)
    else:
        f = plan.check(formulation, m, wp, xp)
    return f.function(x2, w, wp, cdt, xp)
