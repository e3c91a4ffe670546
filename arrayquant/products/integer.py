"""Integer formulations (W8A8, W4A8): exact int32 sums of codes, then one float epilogue.

Each accumulation takes ``(act, w, wp, zw, xp)`` and returns the int32 sums
``sum_k (qx - zx)(qw - zw)`` per weight group, shape (G, m, n); the scales are applied
once by :func:`scale_accumulator`. Which one applies and which one ``auto`` takes is
written in :data:`arrayquant.products.plan.TABLE`.
"""

from __future__ import annotations

from arrayquant._backend import is_jax
from arrayquant.products import plan
from arrayquant.products.arrays import nk, pad_last, weight_scales
from arrayquant.products.plan import (
    INT32_MAX,
    ActPlan,
    WeightPlan,
    centered_bound,
    code_bound,
    fields_fit,
)
from arrayquant.products.weight_only import group_bounds, k_slices
from arrayquant.qarray import QArray
from arrayquant.qtypes import as_qtype

__all__ = ["int32_safe_in_features", "check_integer_path", "int32_accumulate",
           "float_exact_accumulate", "int_gemv_accumulate", "integer_accumulate",
           "integer_product", "scale_accumulator"]


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
    mx = code_bound(as_qtype(act_dtype), act_symmetric)
    mw = code_bound(as_qtype(weight_dtype), weight_symmetric)
    return INT32_MAX // (mx * mw)


def check_integer_path(act: ActPlan, wp: WeightPlan) -> None:
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
    mx = code_bound(act.qt, act.zero_point is None)
    mw = code_bound(wp.qt, wp.symmetric)
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


def _centered(act: ActPlan, w: QArray, wp: WeightPlan, zw, dt, xp):
    """``qx - zx`` (m, G, g) and ``qw - zw`` (n, G, g) in ``dt``, zero-padded to whole groups
    (a padded column is 0 in x, so it adds nothing whatever the weight holds there)."""
    m, groups, g = act.codes.shape[0], wp.groups, min(wp.bk, wp.k)
    xi = xp.astype(act.codes, dt)
    if act.zero_point is not None:
        xi = xi - xp.astype(act.zero_point, dt)
    xv = xp.reshape(pad_last(xi, groups * g, xp), (m, groups, g))
    wv = xp.reshape(pad_last(xp.astype(nk(w.codes, wp.kn, xp), dt), groups * g, xp),
                    (wp.n, groups, g))
    if zw is not None:
        wv = wv - xp.expand_dims(xp.astype(zw, dt), axis=2)
    return xv, wv


def int32_accumulate(act: ActPlan, w: QArray, wp: WeightPlan, zw, xp, dt=None):
    """Generic: ``sum_k (qx - zx)(qw - zw)`` per group with an int32 array API matmul.

    Returns (G, m, n). ``dt`` may name a float dtype in which these integer
    sums are exact (``float-exact``: BLAS instead of NumPy's integer loop).
    """
    xv, wv = _centered(act, w, wp, zw, xp.int32 if dt is None else dt, xp)
    acc = xp.matmul(xp.permute_dims(xv, (1, 0, 2)), xp.permute_dims(wv, (1, 2, 0)))
    # Dask sums int32 chunk products as int64; the sums fit in int32 (checked above).
    return acc if dt is not None or acc.dtype == xp.int32 else xp.astype(acc, xp.int32)


def _exact_float_dtype(act: ActPlan, wp: WeightPlan, xp):
    """float32 when every partial sum stays within 2**24 (exact), else float64."""
    bound = (min(wp.k, wp.bk) * centered_bound(act.qt, act.zero_point is None)
             * centered_bound(wp.qt, wp.symmetric))
    return xp.float32 if bound <= 1 << 24 else xp.float64


def float_exact_accumulate(act: ActPlan, w: QArray, wp: WeightPlan, zw, xp):
    acc = int32_accumulate(act, w, wp, zw, xp, _exact_float_dtype(act, wp, xp))
    return xp.astype(acc, xp.int32)


def int_gemv_accumulate(act: ActPlan, w: QArray, wp: WeightPlan, zw, xp):
    """One row: ``sum((qw - zw) * (qx - zx), axis=-1)`` in float32 over static slices
    short enough that every partial sum is an exact float32 integer (at most 2**24),
    each converted to int32 and added in int32.

    As in ``gemv``, each slice of the stored codes is unpacked and converted inside
    its own reduction (one read of the weight, no int8 GEMM for a single row).
    """
    per_term = centered_bound(act.qt, act.zero_point is None) * centered_bound(
        wp.qt, wp.symmetric)
    per = wp.per_byte if wp.packed_k and fields_fit(wp) else 1
    chunk = max(per, ((1 << 24) // per_term) // per * per)
    if is_jax(xp):  # traced: one loop body, not one reduction per chunk
        from arrayquant.products.jax_dot import int_gemv

        return int_gemv(act, w, wp, zw, chunk)
    f32 = xp.float32
    x1 = xp.reshape(act.codes, (wp.k,))
    zx = None if act.zero_point is None else xp.astype(xp.reshape(act.zero_point, (1,)), f32)
    zf = None if zw is None else xp.astype(zw, f32)  # (n or 1, G)
    sums: list = [None] * wp.groups
    for j, c0, c1 in group_bounds(wp, chunk):
        for r, step, c in k_slices(w, wp, c0, c1, xp):
            xc = xp.astype(x1[c0 + r:c1:step], f32)
            wc = xp.astype(c, f32)
            xc = xc if zx is None else xc - zx
            wc = wc if zf is None else wc - zf[:, j:j + 1]
            u = xp.astype(xp.sum(wc * xc, axis=1), xp.int32)
            sums[j] = u if sums[j] is None else sums[j] + u
    return xp.expand_dims(xp.stack(sums, axis=0), axis=1)  # (G, 1, n)


def integer_accumulate(act: ActPlan, w: QArray, wp: WeightPlan, xp, formulation: str):
    """``(acc, s_w)``: the exact int32 sums (G, m, n) and the weight scales (n or 1, G)."""
    check_integer_path(act, wp)
    m = act.codes.shape[0]
    if formulation == "auto":
        f = plan.choose(plan.INTEGER_KIND, m, wp, xp)
    else:
        f = plan.check(formulation, m, wp, xp)
    s, z = weight_scales(w, wp, xp)
    return f.function(act, w, wp, z, xp), s


def integer_product(act: ActPlan, w: QArray, wp: WeightPlan, cdt, xp, formulation: str):
    acc, s = integer_accumulate(act, w, wp, xp, formulation)
    return scale_accumulator(acc, act.scale, s, cdt, xp)


def scale_accumulator(acc, sx, sw, cdt, xp):
    """``s_x * sum_g s_w[:, g] * acc[g]``: the float epilogue shared by every formulation."""
    sw = xp.astype(sw, cdt)
    if acc.shape[0] == 1:
        t = xp.astype(acc[0, ...], cdt) * xp.permute_dims(sw, (1, 0))
    else:
        t = xp.sum(xp.astype(acc, cdt) * xp.expand_dims(xp.permute_dims(sw, (1, 0)), axis=1),
                   axis=0)
    return t * xp.astype(sx, cdt)
