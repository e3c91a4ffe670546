"""Eager checks of the affine step's inputs and parameters (skipped under a JAX trace).

Every check reads a small reduction result once (one device sync in the normal
case) and words its error from the offending values and what would be accepted.
"""

from __future__ import annotations

from arrayquant._backend import compute_dtype, dtype_name, is_concrete, is_float_dtype, scale_limits
from arrayquant.qtypes import QType

# The one wording of this error (the NumPy fast path raises it too).
NONFINITE_MESSAGE = (
    "{what} holds NaN or infinite values; quantization needs finite input "
    "(under jax.jit this check cannot run: see arrayquant.check_finite)"
)


def check_float_input(x, xp) -> None:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"expected an array, got {type(x).__name__}")
    if not is_float_dtype(x.dtype):
        raise TypeError(
            f"quantization needs a floating-point array (float16, bfloat16, float32 or "
            f"float64); got dtype {dtype_name(x.dtype)}"
        )


def eager(value) -> float | None:
    """``value`` (a 0-d reduction result) as a Python float, or None under a trace.

    The test is on the *result*: inside ``jax.jit`` an array captured from outside
    is concrete, but a reduction of it is staged into the trace (a tracer).
    """
    return float(value) if is_concrete(value) else None


def fmt_values(*values: float) -> list[str]:
    """Short forms (6 significant digits) unless that makes distinct values look equal."""
    def same(v, w):
        return v == w or (v != v and w != w)  # NaN prints as itself

    for digits in (6, 9, 17):
        out = [f"{v:.{digits}g}" for v in values]
        if all(same(v, w) for v, a in zip(values, out) for w, b in zip(values, out) if a == b):
            return out
    return out


def raise_if_not_finite(xp, *arrays, what: str = "x") -> None:
    """Eager-only check (skipped under a trace): NaN or inf raises ValueError."""
    for a in arrays:
        if a is None or eager(xp.all(xp.isfinite(a))) in (None, 1.0):
            continue
        raise ValueError(NONFINITE_MESSAGE.format(what=what))


def raise_if_scale_above_cap(s, hi: float, qt: QType, sdt, cdt, xp) -> None:
    """Eager-only: a block whose scale (before clipping) exceeds ``hi`` would saturate."""
    need = eager(xp.max(s))
    if need is None or need <= hi:
        return
    sname, cname = dtype_name(sdt), dtype_name(cdt)
    if sname in ("float16", "bfloat16") and need <= scale_limits("float32", cdt)[1]:
        fix = "use scale_dtype='float32'"
    elif cname != "float64":
        fix = ("quantize x.astype(float64) with scale_dtype='float64' (on JAX, with "
               "jax_enable_x64)")
    elif sname != "float64" and need <= scale_limits("float64", cdt)[1]:
        fix = "use scale_dtype='float64'"
    else:
        fix = f"use a qtype with more bits than {qt.name}"
    need_s, hi_s = fmt_values(need, hi)
    raise ValueError(
        f"x needs a scale of up to {need_s} for {qt.name} codes, above {hi_s}, the "
        f"largest {sname} scale (with {cname} arithmetic): values of that block would "
        f"saturate; {fix}"
    )


def raise_if_bad_qparams(xp, scale, zero_point, limits, what: str, qt: QType | None) -> None:
    """Eager-only: scales finite and within ``limits``, zero points in ``qt``'s range.

    One device sync in the normal case (a count of offending values); the smallest
    and largest values are looked up only to word the error.
    """
    lo, hi = limits
    sc = xp.astype(scale, compute_dtype(xp, scale.dtype))  # exact; NumPy reduces bfloat16
    bad = eager(xp.sum(xp.astype(xp.logical_not((sc >= lo) & (sc <= hi)), xp.int32)))
    if bad:
        smin, smax = float(xp.min(sc)), float(xp.max(sc))
        smin_s, smax_s, lo_s, hi_s = fmt_values(smin, smax, lo, hi)
        where = f"{what} must be finite and in [{lo_s}, {hi_s}]"
        nonfinite = int(xp.sum(xp.astype(xp.logical_not(xp.isfinite(sc)), xp.int32)))
        if nonfinite:
            raise ValueError(f"scale holds {nonfinite} NaN or infinite values; {where}")
        raise ValueError(f"scale holds values from {smin_s} to {smax_s}; {where}")
    if zero_point is None or qt is None:
        return
    zi = xp.astype(zero_point, xp.int32)  # compare without overflowing the storage dtype
    outside = eager(xp.sum(xp.astype((zi < qt.qmin) | (zi > qt.qmax), xp.int32)))
    if outside:
        zmin, zmax = int(xp.min(zi)), int(xp.max(zi))
        raise ValueError(
            f"zero_point holds values from {zmin} to {zmax}; {qt.name} zero points must "
            f"be in [{qt.qmin}, {qt.qmax}]"
        )
