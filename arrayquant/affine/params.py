"""Parameters from ranges: scale and zero point of each block, the second affine step."""

from __future__ import annotations

from arrayquant._backend import (
    compute_dtype,
    dtype_name,
    exact_divide,
    finfo_limits,
    float_dtype,
    int_dtype,
    namespace,
    scale_limits,
)
from arrayquant.affine.checks import (
    check_float_input,
    raise_if_not_finite,
    raise_if_scale_above_cap,
)
from arrayquant.qtypes import QType, as_qtype


def clip(a, lo: float, hi: float, xp):
    # Same values as xp.clip (NaN stays NaN); array-api-compat's clip wrapper costs
    # ~20 us a call, which matters on the NumPy path's many small slabs.
    return xp.minimum(xp.maximum(a, lo), hi)


def params_from_range(rmin, rmax, qt: QType, symmetric: bool, sdt, cdt, xp):
    """Scale (stored dtype) and zero point (integer-valued float, or None) from block ranges.

    Written so that NumPy and XLA produce the same bits: XLA flushes subnormals
    to zero, turns divisions by constants into multiplications, and may fuse
    a * b - c * d into an FMA. So range ends below 2 * tiny are flushed to zero
    here explicitly, the scale is floored at 4 * tiny (a flushed value or a
    subnormal input then always rounds to the zero point, within s / 2) and
    capped at 1 / tiny (so 1 / s stays normal), and every product is either
    exact (halving) or not fusable.
    """
    tiny_c, _ = finfo_limits(cdt)
    lo, hi = scale_limits(sdt, cdt)
    zero = xp.zeros_like(rmin)
    if symmetric:
        amax = xp.maximum(rmax, -rmin)
        amax = xp.where(amax < 2.0 * tiny_c, zero, amax)
        s = amax * (1.0 / qt.qmax)
    else:
        rmin = xp.where(rmin > -2.0 * tiny_c, zero, rmin)  # also extends the range to 0
        rmax = xp.where(rmax < 2.0 * tiny_c, zero, rmax)
        # Halving is exact for these values and keeps r_max - r_min from overflowing.
        s = (rmax * 0.5 - rmin * 0.5) * (2.0 / (qt.qmax - qt.qmin))
    raise_if_scale_above_cap(s, hi, qt, sdt, cdt, xp)
    s = store_scale(clip(s, lo, hi, xp), hi, sdt, cdt, xp)
    if symmetric:
        return s, None
    s_c = xp.astype(s, cdt)
    z = clip(xp.round(float(qt.qmin) - exact_divide(rmin, s_c, xp)), float(qt.qmin),
             float(qt.qmax), xp)
    # z stays float (integer-valued) here: quantizing with it directly, rather than
    # through the stored int8 copy, lets XLA fuse the whole pipeline (1.5x faster).
    return s, z


def store_scale(s, hi: float, sdt, cdt, xp):
    """``s`` (compute dtype, in ``[lo, hi]``) in ``sdt``, rounded up: the smallest value >= s.

    A narrower scale dtype that rounded the scale down would leave the top of
    the range uncovered (16-bit codes with bfloat16 scales then saturated by
    up to 2**-9 * 65535 codes). ``hi`` is representable, so rounding up stays
    within it. float32 scales of float32 values, and float64 scales, are exact.
    """
    st = xp.astype(s, sdt)
    if dtype_name(sdt) in (dtype_name(cdt), "float64"):
        return st
    up = xp.nextafter(st, xp.asarray(hi, dtype=sdt))
    return xp.where(xp.astype(st, cdt) < s, up, st)


def store_zero_point(z, qt: QType, xp):
    return None if z is None else xp.astype(z, int_dtype(xp, qt.storage))


def clip_range(qt: QType, symmetric: bool) -> tuple[float, float]:
    if symmetric:
        return float(max(qt.qmin, -qt.qmax)), float(qt.qmax)
    return float(qt.qmin), float(qt.qmax)


def qparams_from_range(rmin, rmax, dtype="int8", symmetric: bool = False, *,
                       scale_dtype="float32"):
    """Scale and zero point from given ranges: the second of the three affine steps.

    ``rmin`` and ``rmax`` hold one range per block, in any shape (usually the
    scale shape that :func:`arrayquant.qparams` returns, so that the result
    feeds :func:`arrayquant.quantize_with`). The formulas are exactly those of
    :func:`arrayquant.qparams`, which is this function applied to the min and
    max of each block: asymmetric ranges are first extended to hold 0;
    symmetric uses ``max(r_max, -r_min)``. A calibration method (percentiles,
    an MSE search, statistics gathered over many batches) only has to produce
    the ranges.

    Args:
        rmin, rmax: floating arrays of the same shape (float16, bfloat16,
            float32 or float64); arithmetic runs in float32, or float64 for
            float64 ranges.
        dtype, symmetric, scale_dtype: as for :func:`arrayquant.qparams`.

    Returns:
        ``(scale, zero_point)`` of the shape of ``rmin``; ``zero_point`` is
        ``None`` when ``symmetric``.

    Raises:
        TypeError: non-float ranges. ValueError: shapes differ; unknown
            ``dtype``; symmetric with an unsigned type; eager mode only: NaN or
            inf in the ranges, or a range that needs a scale above the cap.

    Example:
        >>> import numpy as np, arrayquant as aq
        >>> s, z = aq.qparams_from_range(np.float32([-1.0]), np.float32([3.0]), "uint8")
        >>> round(float(s[0]) * 255, 5), int(z[0])
        (4.0, 64)
    """
    xp = namespace(rmin, rmax)
    for r in (rmin, rmax):
        check_float_input(r, xp)
    if tuple(rmin.shape) != tuple(rmax.shape):
        raise ValueError(
            f"rmin of shape {tuple(rmin.shape)} and rmax of shape {tuple(rmax.shape)} "
            "differ; expected one range end of each per block, in the same shape"
        )
    qt = as_qtype(dtype)
    check_symmetric(qt, symmetric)
    raise_if_not_finite(xp, rmin, rmax, what="the range")
    cdt = xp.result_type(compute_dtype(xp, rmin.dtype), compute_dtype(xp, rmax.dtype))
    sdt = float_dtype(xp, scale_dtype)
    s, z = params_from_range(xp.astype(rmin, cdt), xp.astype(rmax, cdt), qt, symmetric,
                             sdt, cdt, xp)
    return s, store_zero_point(z, qt, xp)


def check_symmetric(qt: QType, symmetric: bool) -> None:
    """Symmetric quantization needs a signed type (one wording, for every entry point)."""
    if symmetric and not qt.signed:
        raise ValueError(
            f"symmetric=True needs a signed dtype (zero point 0 leaves no room for negative "
            f"values in {qt.name}); use {qt.name[1:]} or symmetric=False"
        )
