"""Array helpers shared by the formulations: input checks, block expansion, layouts."""

from __future__ import annotations

from arrayquant._backend import dtype_name, float_dtype, is_float_dtype
from arrayquant.products.plan import WeightPlan
from arrayquant.qarray import QArray

__all__ = ["is_array", "check_float", "expand", "nk", "weight_scales", "out_dtype", "pad_last",
           "field_len"]


def is_array(a) -> bool:
    return hasattr(a, "shape") and hasattr(a, "dtype") and not isinstance(a, QArray)


def check_float(a, what: str) -> None:
    if not is_array(a):
        raise TypeError(f"{what} must be an array or an arrayquant.QArray; got {type(a).__name__}")
    if not is_float_dtype(a.dtype):
        raise TypeError(
            f"{what} must be a floating-point array (float16, bfloat16, float32 or float64); "
            f"got dtype {dtype_name(a.dtype)}"
        )


def expand(a, block: tuple[int, ...], shape: tuple[int, ...], xp):
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


def nk(a, kn: bool, xp):
    """A 2-D weight-shaped array in the (n, k) = (out, in) layout."""
    return xp.permute_dims(a, (1, 0)) if kn else a


def weight_scales(w: QArray, wp: WeightPlan, xp):
    """Scale and zero point as (n, G): expanded along the output axis, one column per group."""
    s = expand(nk(w.scale, wp.kn, xp), (wp.bn, 1), (wp.n, wp.groups), xp)
    z = w.zero_point
    if z is not None:
        z = expand(nk(z, wp.kn, xp), (wp.bn, 1), (wp.n, wp.groups), xp)
    return s, z


def out_dtype(xp, *dtypes):
    return xp.result_type(*(float_dtype(xp, dtype_name(d)) for d in dtypes))


def pad_last(a, length: int, xp):
    extra = length - a.shape[-1]
    if extra == 0:
        return a
    return xp.concat([a, xp.zeros((*a.shape[:-1], extra), dtype=a.dtype)], axis=-1)


def field_len(length: int, per: int, r: int) -> int:
    """How many of ``length`` codes land in field ``r`` (codes r, r + per, ...)."""
    return -(-(length - r) // per)
