"""Matrix products with quantized weights, and W8A8 with per-token activations.

Three kinds of product, picked by what the caller passes:

- Float weight: ``x @ w.T`` (``linear``) or ``x @ w`` (``matmul``) in the
  inputs' dtype.
- Weight-only (``w`` a :class:`QArray`, ``act_dtype=None``): the result equals
  ``x @ dequantize(w).T`` computed in float32 (float64 for float64 inputs).
- Integer (``act_dtype="int8"``, or ``x`` itself a QArray): ``x`` is quantized
  per token (one scale per row, see :func:`quantize_activations`), the codes
  are multiplied and summed *exactly* in int32 and only the sum is scaled:

      y[m, n] = s_x[m] * sum_g s_w[n, g] * sum_{k in g} (qx[m, k] - zx[m]) * (qw[n, k] - zw[n, g])

  where ``g`` runs over the weight's groups along the contraction axis (one
  group when the weight is per tensor or per output channel).

Every case has one generic formulation in pure array API calls that is always
right, and named fast formulations picked from static facts only (namespace,
shapes, bit widths, granularity), each tested equal to the generic one; see
``docs/inference.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache

from arrayquant._backend import (
    compute_dtype,
    dtype_name,
    float_dtype,
    is_float_dtype,
    is_jax,
    is_numpy,
)
from arrayquant._backend import namespace as _namespace
from arrayquant.affine import dequantize, quantize
from arrayquant.packing import bit_fields, unpack
from arrayquant.qarray import QArray
from arrayquant.qtypes import QType, as_qtype

__all__ = ["linear", "matmul", "quantize_activations", "int32_safe_in_features", "FORMULATIONS"]

INT32_MAX = 2**31 - 1

#: NumPy weight-only products with at most this many rows (tokens) dequantize
#: the weight slab by slab (see docs/inference.md).
_SLAB_MAX_ROWS = 4
#: Bytes of float32 weight per slab: one slab plus its scaled copy stay in L2.
_SLAB_BYTES = 1 << 20


def _jax_loops_pay_off() -> bool:
    from arrayquant.products.jax_dot import loops_pay_off

    return loops_pay_off()


# --------------------------------------------------------------------------- static plans


@dataclass(frozen=True)
class _WeightPlan:
    """Static facts of a 2-D quantized weight, seen in the (out, in) = (n, k) layout."""

    n: int
    k: int
    bn: int  # block along the output axis
    bk: int  # block along the contraction axis
    qt: QType
    symmetric: bool
    packed_k: bool  # codes packed into bytes along the contraction axis
    packed_n: bool  # codes packed into bytes along the output axis
    kn: bool  # stored as (in, out) (``matmul``) rather than (out, in) (``linear``)

    @property
    def groups(self) -> int:
        return -(-self.k // self.bk)

    @property
    def per_byte(self) -> int:
        return 8 // self.qt.bits

    @property
    def granularity(self) -> str:
        if self.bk == self.k:
            return "per-tensor" if self.bn == self.n else "per output channel"
        if self.bk == 1:
            return "per input channel"
        return f"groups of {self.bk} along the in axis"


def _weight_plan(w: QArray, kn: bool) -> _WeightPlan:
    a, b = w.shape
    ba, bb = w.block_shape
    n, k, bn, bk = (b, a, bb, ba) if kn else (a, b, ba, bb)
    return _WeightPlan(
        n=n, k=k, bn=bn, bk=bk, qt=as_qtype(w.qtype), symmetric=w.zero_point is None,
        packed_k=w.packed_axis is not None and w.packed_axis == (0 if kn else 1),
        packed_n=w.packed_axis is not None and w.packed_axis == (1 if kn else 0), kn=kn,
    )


def _code_bound(qt: QType, symmetric: bool) -> int:
    """max |code| + max |zero point| once unsigned codes are shifted to signed ones."""
    return qt.qmax if symmetric else 1 << qt.bits


def int32_safe_in_features(act_dtype="int8", weight_dtype="int8", *, act_symmetric=True,
                           weight_symmetric=True) -> int:
    """The largest contraction length whose integer accumulation cannot overflow int32.

    The bound is ``in_features * M_x * M_w <= 2**31 - 1`` with ``M = q_max``
    for symmetric codes and ``M = 2**bits`` for asymmetric ones (``max|code| +
    max|zero point|`` after shifting unsigned codes to signed): it bounds every
    partial sum of every formulation, the zero-point corrections included.

    >>> int32_safe_in_features("int8", "int8")
    133144
    >>> int32_safe_in_features("int8", "int8", act_symmetric=False, weight_symmetric=False)
    32767
    """
    mx = _code_bound(as_qtype(act_dtype), act_symmetric)
    mw = _code_bound(as_qtype(weight_dtype), weight_symmetric)
    return INT32_MAX // (mx * mw)


# --------------------------------------------------------------------------- helpers


def _is_array(a) -> bool:
    return hasattr(a, "shape") and hasattr(a, "dtype") and not isinstance(a, QArray)


def _check_float(a, what: str) -> None:
    if not _is_array(a):
        raise TypeError(f"{what} must be an array or an arrayquant.QArray; got {type(a).__name__}")
    if not is_float_dtype(a.dtype):
        raise TypeError(
            f"{what} must be a floating-point array (float16, bfloat16, float32 or float64); "
            f"got dtype {dtype_name(a.dtype)}"
        )


def _expand(a, block: tuple[int, ...], shape: tuple[int, ...], xp):
    """Repeat entry ``i`` of ``a`` along dimension ``d`` over ``block[d]`` elements, trim to
    ``shape``; dimensions where ``a`` has one entry stay 1 (they broadcast)."""
    for d, (b, n) in enumerate(zip(block, shape)):
        c = a.shape[d]
        if c == 1 or b == 1:
            continue
        a = xp.expand_dims(a, axis=d + 1)
        full = (*a.shape[: d + 1], b, *a.shape[d + 2 :])
        a = xp.reshape(xp.broadcast_to(a, full), (*a.shape[:d], c * b, *a.shape[d + 2 :]))
        if c * b != n:
            a = a[tuple(slice(0, n) if i == d else slice(None) for i in range(a.ndim))]
    return a


def _nk(a, kn: bool, xp):
    return xp.permute_dims(a, (1, 0)) if kn else a


def _weight_scales(w: QArray, wp: _WeightPlan, xp):
    """Scale and zero point as (n, G): expanded along the output axis, one column per group."""
    s = _expand(_nk(w.scale, wp.kn, xp), (wp.bn, 1), (wp.n, wp.groups), xp)
    z = w.zero_point
    if z is not None:
        z = _expand(_nk(z, wp.kn, xp), (wp.bn, 1), (wp.n, wp.groups), xp)
    return s, z


def _out_dtype(xp, *dtypes):
    return xp.result_type(*(float_dtype(xp, dtype_name(d)) for d in dtypes))


# --------------------------------------------------------------------------- activations


def quantize_activations(x, dtype="int8", symmetric: bool = True, *, scale_dtype="float32"):
    """Quantize ``x`` per token: one scale (and zero point) per row, over the last axis.

    ``x`` of shape ``(..., k)`` gets a scale of shape ``(..., 1)``: every index
    of the leading axes (every token) is quantized with its own range, as
    :func:`arrayquant.quantize` with ``axis`` = all leading axes. A 1-D ``x``
    is one token (one scale). This is the dynamic activation quantization of
    W8A8: call it on each input, inside ``jax.jit`` if you like (nothing is
    calibrated or stored).

    Args:
        x: floating array of at least 1 dimension.
        dtype: quantized type (default ``"int8"``; sub-byte types are packed
            along the last axis, as by :func:`arrayquant.quantize`).
        symmetric: symmetric codes ``[-q_max, q_max]`` and no zero point (the
            default), or asymmetric with a zero point per token.
        scale_dtype: dtype of the scales (default float32).

    Returns:
        a :class:`QArray` with ``block_shape == (1, ..., 1, k)``.

    Raises:
        TypeError: ``x`` is not a floating array.
        ValueError: ``x`` is 0-d or empty; unknown ``dtype``; symmetric with an
            unsigned type.

    Example:
        >>> import numpy as np, arrayquant as aq
        >>> qx = aq.quantize_activations(np.array([[1.0, -2.0], [0.5, 0.25]], np.float32))
        >>> qx.codes.tolist(), qx.scale.shape
        ([[64, -127], [127, 64]], (2, 1))
    """
    _check_float(x, "x")
    if x.ndim == 0:
        raise ValueError("quantize_activations needs an array of at least 1 dimension (tokens "
                         "along the leading axes, features along the last); got a 0-d array")
    axis = tuple(range(x.ndim - 1)) if x.ndim > 1 else None
    return quantize(x, dtype, symmetric, axis=axis, scale_dtype=scale_dtype)


@dataclass(frozen=True)
class _Act:
    """Per-row integer activations: codes (m, k), scale (m, 1), zero point (m, 1) or None."""

    codes: object
    scale: object
    zero_point: object
    qt: QType
    dtype: str


def _act_rows(qx: QArray, k: int, xp) -> _Act:
    if len(qx.shape) == 0:
        raise ValueError("a quantized x needs at least 1 dimension; got a 0-d QArray")
    if qx.shape[-1] != k:
        raise ValueError(
            f"x has {qx.shape[-1]} features along its last axis but the weight expects {k}"
        )
    if qx.block_shape[-1] != k:
        raise ValueError(
            f"a quantized x must have one scale per row (per token, or per tensor) so that "
            f"it factors out of the sum over features; got {qx.granularity} for shape "
            f"{qx.shape}: use arrayquant.quantize_activations(x)"
        )
    lead = qx.shape[:-1]
    m = math.prod(lead)

    def rows(a):
        if a is None:
            return None
        a = _expand(a, qx.block_shape, (*lead, 1), xp)
        return xp.reshape(xp.broadcast_to(a, (*lead, 1)), (m, 1))

    codes = xp.reshape(qx.codes, (m, k))
    return _Act(codes, rows(qx.scale), rows(qx.zero_point), as_qtype(qx.qtype), qx.dtype)


# --------------------------------------------------------------------------- weight-only


def _scales_f(w: QArray, wp: _WeightPlan, cdt, xp):
    s, z = _weight_scales(w, wp, xp)  # (n or 1, G)
    return xp.astype(s, cdt), None if z is None else xp.astype(z, cdt)


def _row_slice(a, sl):
    """Rows ``sl`` of an (n, ...) per-row array; a single row broadcasts and stays."""
    return None if a is None else (a if a.shape[0] == 1 else a[sl, ...])


def _scale_codes(c, s, z, wp: _WeightPlan, g: int, xp):
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


def _pad_last(a, length: int, xp):
    extra = length - a.shape[-1]
    if extra == 0:
        return a
    return xp.concat([a, xp.zeros((*a.shape[:-1], extra), dtype=a.dtype)], axis=-1)


def _field_len(length: int, per: int, r: int) -> int:
    """How many of ``length`` codes land in field ``r`` (codes r, r + per, ...)."""
    return -(-(length - r) // per)


@lru_cache(maxsize=16)
def _byte_table(bits: int, signed: bool) -> tuple[tuple[int, ...], ...]:
    """Codes held by each byte value 0..255, first code first (the unpacking table)."""
    per, mask, half = 8 // bits, (1 << bits) - 1, 1 << (bits - 1)
    rows = []
    for b in range(256):
        v = [(b >> (r * bits)) & mask for r in range(per)]
        rows.append(tuple(c - (1 << bits) if signed and c >= half else c for c in v))
    return tuple(rows)


def _dequantized_product(x2, w: QArray, wp: _WeightPlan, cdt, xp):
    """Generic: ``x @ dequantize(w).T``, the weight dequantized in the compute dtype."""
    w_hat = dequantize(w, dtype=cdt)
    return xp.matmul(x2, w_hat if wp.kn else xp.permute_dims(w_hat, (1, 0)))


def _epilogue_product(x2, w: QArray, wp: _WeightPlan, cdt, xp):
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


def _grouped_product(x2, w: QArray, wp: _WeightPlan, cdt, xp):
    """Groups along ``k``: ``sum_g s[:, g] * (x_g @ codes_g.T - sum(x_g) * z[:, g])``.

    One batched contraction over the groups, shape (G, m, n), then the scales:
    the float weight is never built.
    """
    s, z = _scales_f(w, wp, cdt, xp)
    m, groups, g = x2.shape[0], wp.groups, wp.bk
    c = _pad_last(xp.astype(_nk(w.codes, wp.kn, xp), cdt), groups * g, xp)
    xv = xp.permute_dims(xp.reshape(_pad_last(x2, groups * g, xp), (m, groups, g)), (1, 0, 2))
    t = xp.matmul(xv, xp.permute_dims(xp.reshape(c, (wp.n, groups, g)), (1, 2, 0)))
    if z is not None:
        t = t - xp.sum(xv, axis=2, keepdims=True) * xp.expand_dims(xp.permute_dims(z, (1, 0)), 1)
    return xp.sum(t * xp.expand_dims(xp.permute_dims(s, (1, 0)), axis=1), axis=0)


def _fields_fit(wp: _WeightPlan) -> bool:
    """Sub-byte codes whose bytes can be split into fields without unpacking: packed
    along the out axis, or along ``k`` with groups made of whole bytes."""
    if wp.packed_n:
        return True
    return wp.packed_k and (wp.groups == 1 or wp.bk % wp.per_byte == 0)


def _fields_product(x2, w: QArray, wp: _WeightPlan, cdt, xp):
    """Contract the bit fields of the packed bytes, never interleaving the codes.

    Packed along ``k`` (an (out, in) weight): ``sum_r x[:, r::per] @ w_r.T``,
    the low nibbles with the even columns of ``x``, the high ones with the odd.
    Packed along the out axis (an (in, out) weight): field ``r`` gives the
    output columns ``r, r + per, ...``, interleaved once at the end (m x n).
    """
    s, z = _scales_f(w, wp, cdt, xp)
    per = wp.per_byte
    fields = [_nk(f, wp.kn, xp) for f in bit_fields(w.data, wp.qt.bits, signed=wp.qt.signed)]
    if wp.packed_k:
        y = None
        for r, f in enumerate(fields):
            length = _field_len(wp.k, per, r)
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
        length = _field_len(wp.n, per, r)
        if length == 0:  # fewer outputs than fields (n < per)
            outs.append(xp.zeros((x2.shape[0], nb), dtype=cdt))
            continue
        sl = slice(r, None, per)
        f = xp.astype(f[:length, :], cdt)
        f = _scale_codes(f, _row_slice(s, sl), _row_slice(z, sl), wp, wp.bk, xp)
        outs.append(_pad_last(xp.matmul(x2, xp.permute_dims(f, (1, 0))), nb, xp))
    y = xp.reshape(xp.stack(outs, axis=-1), (x2.shape[0], nb * per))
    return y[:, : wp.n]


def _slab_rows(k: int) -> int:
    return max(1, _SLAB_BYTES // (4 * k))


def _slabs_product(x2, w: QArray, wp: _WeightPlan, cdt, xp):
    """Few rows: dequantize the weight a slab of output rows at a time and multiply
    each slab while it is in cache, so no full float weight is ever written.

    On NumPy, packed bytes are unpacked by one table lookup (``take`` of a
    256-entry table), which yields the codes in order; other libraries use
    :func:`~arrayquant.packing.unpack` on the slab. This is the NumPy GEMV path:
    with one token the product is bound by reading the weight, and the stored
    bytes are read once.
    """
    s, z = _scales_f(w, wp, cdt, xp)
    data = _nk(w.data, wp.kn, xp)
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


def _k_slices(w: QArray, wp: _WeightPlan, c0: int, c1: int, xp):
    """``[(r, per, codes)]``: integer codes (n, L) of the in-columns ``c0 + r, c0 + r +
    per, ...`` below ``c1``. Packed along ``k`` in whole-byte groups, these are the bit
    fields of the bytes ``[c0 / per, c1 / per)``; otherwise one slice of the codes.
    Only the slice is unpacked and converted, inside the consumer's reduction."""
    if wp.packed_k and _fields_fit(wp):
        per = wp.per_byte
        data = _nk(w.data, wp.kn, xp)[:, c0 // per: -(-c1 // per)]
        out = []
        for r, f in enumerate(bit_fields(data, wp.qt.bits, signed=wp.qt.signed)):
            length = _field_len(c1 - c0, per, r)
            if length:
                out.append((r, per, f[:, :length]))
        return out
    codes = w.codes if w.packed_axis is not None else w.data
    return [(0, 1, _nk(codes, wp.kn, xp)[:, c0:c1])]


def _group_bounds(wp: _WeightPlan, chunk: int | None = None):
    """``[(group, c0, c1)]`` over the in axis: each group, cut into chunks of at most
    ``chunk`` columns (a multiple of the codes per byte, so bit fields stay aligned)."""
    g = min(wp.bk, wp.k)
    out = []
    for j in range(wp.groups):
        end = min(wp.k, (j + 1) * g)
        step = end - j * g if chunk is None else chunk
        out.extend((j, c0, min(end, c0 + step)) for c0 in range(j * g, end, step))
    return out


def _gemv_product(x2, w: QArray, wp: _WeightPlan, cdt, xp):
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
    for _, c0, c1 in _group_bounds(wp):
        terms = [xp.astype(c, cdt) * xv[c0 + r:c1:per]
                 for r, per, c in _k_slices(w, wp, c0, c1, xp)]
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


_WEIGHT_ONLY = {
    "dequantize": _dequantized_product,
    "epilogue": _epilogue_product,
    "grouped": _grouped_product,
    "fields": _fields_product,
    "slabs": _slabs_product,
    "gemv": _gemv_product,
}


def _weight_only_formulation(m: int, wp: _WeightPlan, xp) -> str:
    """Static choice of the weight-only formulation, from the measurements in
    docs/inference.md (NumPy and XLA on CPU, XLA on an H100)."""
    if is_jax(xp):
        if m == 1 and not wp.kn and not wp.packed_n and _jax_loops_pay_off():
            return "gemv"
        if _fields_fit(wp):
            return "fields"
    elif not wp.packed_n and (m <= _SLAB_MAX_ROWS or wp.packed_k):
        return "slabs"
    return "epilogue" if wp.bk == wp.k else "dequantize"


def _check_weight_only(formulation: str, m: int, wp: _WeightPlan) -> None:
    alternatives = "use formulation='auto' or 'dequantize'"
    if formulation == "epilogue" and wp.bk != wp.k:
        raise ValueError(
            f"formulation='epilogue' needs a weight whose scale is constant along the in axis "
            f"(per tensor, or per output channel with axis={1 if wp.kn else 0}); got "
            f"{wp.granularity}: {alternatives}"
        )
    if formulation == "grouped" and wp.bk == wp.k:
        raise ValueError(
            f"formulation='grouped' needs a weight quantized in groups along the in axis "
            f"(group_size=g, group_axis={0 if wp.kn else -1}); got {wp.granularity}: "
            f"{alternatives}"
        )
    if formulation == "fields" and not _fields_fit(wp):
        if not wp.packed_k:
            why = "codes that are not packed (8-bit types are stored one per byte)"
        else:
            why = (f"groups of {wp.bk} along the in axis, not a multiple of the "
                   f"{wp.per_byte} codes per byte")
        raise ValueError(
            f"formulation='fields' splits packed bytes into bit fields; got a {wp.qt.name} "
            f"weight with {why}: {alternatives}"
        )
    if formulation == "slabs" and wp.packed_n:
        raise ValueError(
            f"formulation='slabs' slices output rows of the stored bytes, but this {wp.qt.name} "
            f"weight is packed along the out axis: {alternatives}"
        )
    if formulation == "gemv" and m != 1:
        raise ValueError(
            f"formulation='gemv' is the one-row product (GEMV); x has {m} rows: {alternatives}"
        )


def _weight_only(x2, w: QArray, wp: _WeightPlan, cdt, xp, formulation: str):
    m = x2.shape[0]
    if formulation == "auto":
        formulation = _weight_only_formulation(m, wp, xp)
    _check_weight_only(formulation, m, wp)
    return _WEIGHT_ONLY[formulation](x2, w, wp, cdt, xp)


# --------------------------------------------------------------------------- integer (W8A8)


def _check_integer_path(act: _Act, wp: _WeightPlan) -> None:
    for what, qt in (("activation", act.qt), ("weight", wp.qt)):
        if qt.bits > 8:
            raise ValueError(
                f"integer accumulation needs codes of at most 8 bits; the {what} is {qt.name}: "
                f"use int8/uint8/int4/uint4/int2/uint2, or a weight-only product (act_dtype=None)"
            )
    if wp.bk == 1 and wp.k > 1:
        raise ValueError(
            f"the weight is quantized {wp.granularity} (one scale per element of the "
            f"contraction axis), so its scales cannot be taken out of the integer sum; quantize "
            f"it per output channel (axis={1 if wp.kn else 0}), per tensor, or in groups along "
            f"the in axis (group_size=g, group_axis={0 if wp.kn else -1}), or use act_dtype=None"
        )
    mx = _code_bound(act.qt, act.zero_point is None)
    mw = _code_bound(wp.qt, wp.symmetric)
    length = min(wp.k, wp.bk)
    if length * mx * mw > INT32_MAX:
        raise ValueError(
            f"int32 accumulation could overflow: {length} terms * {mx} ({act.qt.name} "
            f"{'symmetric' if act.zero_point is None else 'asymmetric'} activations) * {mw} "
            f"({wp.qt.name} {'symmetric' if wp.symmetric else 'asymmetric'} weight) = "
            f"{length * mx * mw} > 2**31 - 1; at most {INT32_MAX // (mx * mw)} in-features "
            f"per scale group fit: quantize the weight in groups along the in axis, or use "
            f"symmetric codes"
        )


def _centered_bound(qt: QType, symmetric: bool) -> int:
    """max |code - zero point|."""
    return qt.qmax if symmetric else qt.qmax - qt.qmin


def _centered(act: _Act, w: QArray, wp: _WeightPlan, zw, dt, xp):
    """``qx - zx`` (m, G, g) and ``qw - zw`` (n, G, g) in ``dt``, zero-padded to whole groups
    (a padded column is 0 in x, so it adds nothing whatever the weight holds there)."""
    m, groups, g = act.codes.shape[0], wp.groups, min(wp.bk, wp.k)
    xi = xp.astype(act.codes, dt)
    if act.zero_point is not None:
        xi = xi - xp.astype(act.zero_point, dt)
    xv = xp.reshape(_pad_last(xi, groups * g, xp), (m, groups, g))
    wv = xp.reshape(_pad_last(xp.astype(_nk(w.codes, wp.kn, xp), dt), groups * g, xp),
                    (wp.n, groups, g))
    if zw is not None:
        wv = wv - xp.expand_dims(xp.astype(zw, dt), axis=2)
    return xv, wv


def _int32_accumulate(act: _Act, w: QArray, wp: _WeightPlan, zw, xp, dt=None):
    """Generic: ``sum_k (qx - zx)(qw - zw)`` per group with an int32 array API matmul.

    Returns (G, m, n). ``dt`` may name a float dtype in which these integer
    sums are exact (``float-exact``: BLAS instead of NumPy's integer loop).
    """
    xv, wv = _centered(act, w, wp, zw, xp.int32 if dt is None else dt, xp)
    acc = xp.matmul(xp.permute_dims(xv, (1, 0, 2)), xp.permute_dims(wv, (1, 2, 0)))
    # Dask sums int32 chunk products as int64; the sums fit in int32 (checked above).
    return acc if dt is not None or acc.dtype == xp.int32 else xp.astype(acc, xp.int32)


def _exact_float_dtype(act: _Act, wp: _WeightPlan, xp):
    """float32 when every partial sum stays within 2**24 (exact), else float64."""
    bound = (min(wp.k, wp.bk) * _centered_bound(act.qt, act.zero_point is None)
             * _centered_bound(wp.qt, wp.symmetric))
    return xp.float32 if bound <= 1 << 24 else xp.float64


def _float_exact_accumulate(act: _Act, w: QArray, wp: _WeightPlan, zw, xp):
    acc = _int32_accumulate(act, w, wp, zw, xp, _exact_float_dtype(act, wp, xp))
    return xp.astype(acc, xp.int32)


def _int_gemv_accumulate(act: _Act, w: QArray, wp: _WeightPlan, zw, xp):
    """One row: ``sum((qw - zw) * (qx - zx), axis=-1)`` in float32 over static slices
    short enough that every partial sum is an exact float32 integer (at most 2**24),
    each converted to int32 and added in int32.

    As in ``gemv``, each slice of the stored codes is unpacked and converted inside
    its own reduction (one read of the weight, no int8 GEMM for a single row).
    """
    per_term = _centered_bound(act.qt, act.zero_point is None) * _centered_bound(
        wp.qt, wp.symmetric)
    per = wp.per_byte if wp.packed_k and _fields_fit(wp) else 1
    chunk = max(per, ((1 << 24) // per_term) // per * per)
    if is_jax(xp):  # traced: one loop body, not one reduction per chunk
        from arrayquant.products.jax_dot import int_gemv

        return int_gemv(act, w, wp, zw, chunk)
    f32 = xp.float32
    x1 = xp.reshape(act.codes, (wp.k,))
    zx = None if act.zero_point is None else xp.astype(xp.reshape(act.zero_point, (1,)), f32)
    zf = None if zw is None else xp.astype(zw, f32)  # (n or 1, G)
    sums: list = [None] * wp.groups
    for j, c0, c1 in _group_bounds(wp, chunk):
        for r, step, c in _k_slices(w, wp, c0, c1, xp):
            xc = xp.astype(x1[c0 + r:c1:step], f32)
            wc = xp.astype(c, f32)
            xc = xc if zx is None else xc - zx
            wc = wc if zf is None else wc - zf[:, j:j + 1]
            u = xp.astype(xp.sum(wc * xc, axis=1), xp.int32)
            sums[j] = u if sums[j] is None else sums[j] + u
    return xp.expand_dims(xp.stack(sums, axis=0), axis=1)  # (G, 1, n)


def _jax_dot_accumulate(act: _Act, w: QArray, wp: _WeightPlan, zw, xp):
    from arrayquant.products.jax_dot import int_accumulate

    return int_accumulate(act, w, wp, zw)


_INTEGER_FORMULATIONS = {
    "int32": _int32_accumulate,
    "float-exact": _float_exact_accumulate,
    "int-gemv": _int_gemv_accumulate,
    "jax-dot": _jax_dot_accumulate,
}


def _integer_formulation(m: int, wp: _WeightPlan, xp) -> str:
    """Static choice of the integer formulation (measured: docs/inference.md)."""
    if is_jax(xp):
        gemv = m == 1 and not wp.kn and not wp.packed_n and _jax_loops_pay_off()
        return "int-gemv" if gemv else "jax-dot"
    if is_numpy(xp):
        return "float-exact"
    return "int32"


def _check_integer_formulation(formulation: str, m: int, xp) -> None:
    if formulation == "jax-dot" and not is_jax(xp):
        raise ValueError(
            f"formulation='jax-dot' needs JAX arrays; got arrays of {xp.__name__}: use "
            f"'auto', 'int32' or 'float-exact'"
        )
    if formulation == "float-exact" and is_jax(xp):
        raise ValueError(
            "formulation='float-exact' may need float64, which JAX disables by default: "
            "use 'jax-dot' (or 'auto') with JAX arrays"
        )
    if formulation == "int-gemv" and m != 1:
        raise ValueError(
            f"formulation='int-gemv' is the one-row product (GEMV); x has {m} rows: use "
            f"'auto', 'int32', 'float-exact' or 'jax-dot'"
        )


def _integer_accumulate(act: _Act, w: QArray, wp: _WeightPlan, xp, formulation: str):
    """``(acc, s_w)``: the exact int32 sums (G, m, n) and the weight scales (n or 1, G)."""
    _check_integer_path(act, wp)
    m = act.codes.shape[0]
    if formulation == "auto":
        formulation = _integer_formulation(m, wp, xp)
    _check_integer_formulation(formulation, m, xp)
    s, z = _weight_scales(w, wp, xp)
    return _INTEGER_FORMULATIONS[formulation](act, w, wp, z, xp), s


def _integer_product(act: _Act, w: QArray, wp: _WeightPlan, cdt, xp, formulation: str):
    acc, s = _integer_accumulate(act, w, wp, xp, formulation)
    return _scale_accumulator(acc, act.scale, s, cdt, xp)


def _scale_accumulator(acc, sx, sw, cdt, xp):
    """``s_x * sum_g s_w[:, g] * acc[g]``: the float epilogue shared by every formulation."""
    sw = xp.astype(sw, cdt)
    if acc.shape[0] == 1:
        t = xp.astype(acc[0, ...], cdt) * xp.permute_dims(sw, (1, 0))
    else:
        t = xp.sum(xp.astype(acc, cdt) * xp.expand_dims(xp.permute_dims(sw, (1, 0)), axis=1),
                   axis=0)
    return t * xp.astype(sx, cdt)


# --------------------------------------------------------------------------- public API


FORMULATIONS = ("auto", "dequantize", "epilogue", "grouped", "fields", "slabs", "gemv", "int32",
                "float-exact", "int-gemv", "jax-dot")
_INTEGER = ("int32", "float-exact", "int-gemv", "jax-dot")


def _product(x, w, bias, act_dtype, act_symmetric, formulation, kn: bool):
    x_is_q = isinstance(x, QArray)
    w_is_q = isinstance(w, QArray)
    if not x_is_q:
        _check_float(x, "x")
    if not w_is_q:
        _check_float(w, "w")
    if bias is not None:
        _check_float(bias, "bias")
    xp = _namespace(
        *((x.data, x.scale, x.zero_point) if x_is_q else (x,)),
        *((w.data, w.scale, w.zero_point) if w_is_q else (w,)),
        bias,
    )
    x_shape = tuple(x.shape)
    w_shape = tuple(w.shape)
    layout = "(in, out)" if kn else "(out, in)"
    if len(w_shape) != 2:
        raise ValueError(f"w must be 2-D {layout}; got shape {w_shape}")
    k, n = w_shape if kn else w_shape[::-1]
    if len(x_shape) == 0:
        raise ValueError("x must have at least 1 dimension (features along the last); got 0-d")
    if x_shape[-1] != k:
        raise ValueError(
            f"x has {x_shape[-1]} features along its last axis, but w of shape {w_shape} "
            f"{layout} expects {k}"
        )
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},) (out features); got {tuple(bias.shape)}")
    if act_dtype is not None and x_is_q:
        raise ValueError(
            f"x is already quantized ({x.qtype}); pass act_dtype=None to use its codes, or a "
            "float x to quantize it per token"
        )
    if not isinstance(act_symmetric, bool):
        raise TypeError(f"act_symmetric must be True or False; got {act_symmetric!r}")
    if formulation not in FORMULATIONS:
        raise ValueError(f"unknown formulation {formulation!r}; expected one of {FORMULATIONS}")
    lead = x_shape[:-1]
    m = math.prod(lead)
    act = None
    if act_dtype is not None:
        act_qt = as_qtype(act_dtype)
        if m:
            x = quantize_activations(x, act_qt, act_symmetric)
        else:
            # quantize rejects empty arrays: quantize one zero row instead (the same
            # checks and dtypes) and keep none of its rows.
            one = _act_rows(quantize_activations(xp.zeros((1, k), dtype=x.dtype), act_qt,
                                                 act_symmetric), k, xp)
            act = replace(one, codes=one.codes[:0, ...], scale=one.scale[:0, ...],
                          zero_point=None if one.zero_point is None else one.zero_point[:0, ...])
        x_is_q = True
    out_dtype = _out_dtype(xp, x.dtype, w.dtype)  # a QArray's dtype is its original one

    if not w_is_q:
        xf = dequantize(x) if isinstance(x, QArray) else x  # an empty x stays as it is
        xf = xp.astype(xf, out_dtype, copy=False)
        wf = xp.astype(w, out_dtype, copy=False)
        y = xp.matmul(xf, wf if kn else xp.permute_dims(wf, (1, 0)))
    else:
        wp = _weight_plan(w, kn)
        cdt = compute_dtype(xp, out_dtype)
        if x_is_q != (formulation in _INTEGER) and formulation != "auto":
            raise ValueError(
                f"formulation={formulation!r} is "
                + ("an integer formulation: it needs act_dtype (e.g. 'int8') or a quantized x"
                   if not x_is_q else
                   "a weight-only formulation, but x is quantized: use one of " + str(_INTEGER))
            )
        if x_is_q:
            act = _act_rows(x, k, xp) if act is None else act
            y2 = _integer_product(act, w, wp, cdt, xp, formulation)
        else:
            y2 = _weight_only(xp.reshape(xp.astype(x, cdt, copy=False), (m, k)), w, wp, cdt, xp,
                              formulation)
        y = xp.reshape(xp.astype(y2, out_dtype), (*lead, n))
    if bias is not None:
        y = y + bias
    return y


def linear(x, w, bias=None, *, act_dtype=None, act_symmetric: bool = True,
           formulation: str = "auto"):
    """``y = x @ w.T + bias`` for a weight in (out, in) layout, float or quantized.

    - ``w`` a float array: the plain product, in the inputs' dtype.
    - ``w`` a :class:`QArray`, ``act_dtype=None``: weight-only quantization;
      the result equals ``x @ dequantize(w).T + bias`` computed in float32
      (float64 for float64 inputs), for any granularity of ``w``.
    - ``act_dtype="int8"`` (W8A8): ``x`` is quantized per token by
      :func:`quantize_activations` (symmetric unless ``act_symmetric=False``)
      and the codes are multiplied and summed exactly in int32:
      ``y[m, n] = s_x[m] * sum_g s_w[n, g] * sum_{k in g} (qx - zx)(qw - zw)``.
      ``w`` must then be quantized per tensor, per output channel (``axis=0``)
      or in groups along the in axis (``group_size=g``), with at most 8 bits.
      With a float ``w``, ``x`` is quantized and dequantized before a float
      product (simulated activation quantization).
    - ``x`` a QArray with one scale per row: its codes are used as they are.

    To make a model use W8A8 everywhere: ``functools.partial(aq.linear,
    act_dtype="int8")``.

    Args:
        x: float array ``(..., in)`` or a QArray with one scale per row.
        w: float array or QArray ``(out, in)``; sub-byte codes packed along ``in``
            (as :func:`arrayquant.quantize` stores them) are used in place.
        bias: ``None`` or a float array ``(out,)``.
        act_dtype: ``None`` (no activation quantization) or an integer qtype of at
            most 8 bits, e.g. ``"int8"``.
        act_symmetric: symmetric per-token codes (default) or asymmetric ones.
        formulation: ``"auto"`` (default: picked from the namespace, the number of
            rows, the bit width and the granularity, all static) or one of
            :data:`FORMULATIONS` to pin one. Weight-only: ``"dequantize"`` (the
            generic one), ``"epilogue"``, ``"grouped"``, ``"fields"``, ``"slabs"``,
            ``"gemv"``; integer: ``"int32"`` (generic), ``"float-exact"``,
            ``"int-gemv"``, ``"jax-dot"``. Every formulation gives the same
            result (integer sums exactly, float sums up to rounding); see
            ``docs/inference.md``. Ignored for a float ``w``.

    Returns:
        ``(..., out)`` array of dtype ``result_type(x.dtype, w.dtype)`` (the
        QArrays' original dtypes), promoted with ``bias``.

    Raises:
        TypeError: non-float ``x``, ``w`` or ``bias``.
        ValueError: ``w`` not 2-D; ``x.shape[-1] != in``; ``bias`` not ``(out,)``;
            for integer products a weight quantized per input channel, 16-bit
            codes, or ``in_features * M_x * M_w > 2**31 - 1`` (see
            :func:`int32_safe_in_features`), decided from shapes and bit widths;
            an unknown ``formulation``, or one that does not apply (e.g.
            ``"epilogue"`` on a weight with groups along in, ``"jax-dot"`` on
            NumPy arrays, an integer formulation without ``act_dtype``).

    Example:
        >>> import numpy as np, arrayquant as aq
        >>> rng = np.random.default_rng(0)
        >>> x = rng.standard_normal((3, 64)).astype(np.float32)
        >>> w = rng.standard_normal((16, 64)).astype(np.float32)
        >>> qw = aq.quantize(w, "int8", symmetric=True, axis=0)
        >>> y = aq.linear(x, qw, act_dtype="int8")
        >>> y.shape, y.dtype, bool(np.allclose(y, x @ w.T, atol=0.3))
        ((3, 16), dtype('float32'), True)
    """
    return _product(x, w, bias, act_dtype, act_symmetric, formulation, kn=False)


def matmul(x, w, *, act_dtype=None, act_symmetric: bool = True, formulation: str = "auto"):
    """``y = x @ w`` for a weight in (in, out) layout, float or quantized.

    The same products, arguments and errors as :func:`linear` (see there) with
    the weight transposed, as in JAX/Flax kernels: quantize ``w`` per output
    channel with ``axis=1``, in groups along the in axis with ``group_size=g,
    group_axis=0``. :func:`arrayquant.quantize` packs sub-byte codes along the
    last axis, here the out axis: the ``"fields"`` formulation splits the bytes
    into bit fields that give the even and odd output columns, interleaved once
    at the end.

    Example:
        >>> import numpy as np, arrayquant as aq
        >>> x = np.ones((2, 8), np.float32)
        >>> w = aq.quantize(np.eye(8, 4, dtype=np.float32), "int8", symmetric=True, axis=1)
        >>> aq.matmul(x, w).tolist()
        [[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]
    """
    return _product(x, w, None, act_dtype, act_symmetric, formulation, kn=True)
