"""The value rules of a stored QArray and LinearWeight, shared by save (before writing) and
load (after reading)."""

from __future__ import annotations

import numpy as np

from arrayquant._backend import scale_limits
from arrayquant.packing import unpack
from arrayquant.qtypes import QType, as_qtype

__all__ = ["linear_state_problem", "qarray_problem"]


def _range_problem(what: str, values: np.ndarray, lo, hi, of: str) -> str | None:
    if values.size and not (values.min() >= lo and values.max() <= hi):  # NaN fails too
        return (f"{what} outside [{lo:.6g}, {hi:.6g}] (min {values.min()}, max {values.max()}) "
                f"for {of}")
    return None


def qarray_problem(qtype: str, dtype: str, shape, packed_axis, data: np.ndarray,
                   scale: np.ndarray, zp: np.ndarray | None, nb: int = 0) -> str | None:
    """What makes these QArray values unsavable and unloadable, or None.

    Codes within the qtype's range (``[-qmax, qmax]`` when symmetric), zero bits
    after the last packed code, zero points within ``[qmin, qmax]``, and scales
    within :func:`scale_limits` (finite, normal, with a normal reciprocal).
    ``shape`` and ``packed_axis`` are one item's; the arrays may have ``nb``
    leading batch axes (a stacked QArray).
    """
    qt: QType = as_qtype(qtype)
    lo = max(qt.qmin, -qt.qmax) if zp is None else qt.qmin
    codes = data
    if packed_axis is not None:
        n = shape[packed_axis]
        per = 8 // qt.bits
        axis = nb + packed_axis
        if n % per:  # the unused high bits of each row's last byte must be zero
            last = np.take(data, [data.shape[axis] - 1], axis=axis)
            if np.any(last >> ((n % per) * qt.bits)):
                return "the padding bits after the last packed code are not zero"
        codes = None if lo == qt.qmin else unpack(data, qt.bits, n, axis=axis,
                                                  signed=qt.signed)
    s_lo, s_hi = scale_limits(scale.dtype, dtype)
    with np.errstate(invalid="ignore"):  # a damaged scale may be a signalling NaN
        s64 = scale.astype(np.float64)
    return (
        (None if codes is None else _range_problem(
            "codes", codes, lo, qt.qmax, qt.name + (" symmetric" if zp is None else "")))
        or _range_problem("scales", s64, s_lo, s_hi,
                          f"{scale.dtype} scales of {dtype} values (see arrayquant.scale_limits)")
        or (None if zp is None else _range_problem("zero points", zp, qt.qmin, qt.qmax, qt.name))
    )


def _scale_problem(what: str, a: np.ndarray, dtype: str) -> str | None:
    lo, hi = scale_limits(a.dtype, dtype)
    with np.errstate(invalid="ignore"):
        a64 = a.astype(np.float64)
    return _range_problem(what, a64, lo, hi,
                          f"{a.dtype} {what} of {dtype} values (see arrayquant.scale_limits)")


def _perm_problem(perm: np.ndarray) -> str | None:
    k = perm.shape[0]
    if k and not (perm.min() >= 0 and perm.max() < k):
        bad = perm[(perm < 0) | (perm >= k)][0]
        return f"perm is not a permutation of range({k}): it holds {bad}"
    counts = np.bincount(perm, minlength=k)
    if np.any(counts != 1):
        twice = int(np.argmax(counts > 1))
        return (f"perm is not a permutation of range({k}): it holds {twice} "
                f"{counts[twice]} times and misses {int(np.argmin(counts))}")
    return None


def linear_state_problem(dtype: str, act_qtype: str | None, in_scale: np.ndarray | None,
                         perm: np.ndarray | None, act_scale: np.ndarray | None,
                         act_zp: np.ndarray | None) -> str | None:
    """What makes a LinearWeight's input state unsavable and unloadable, or None.

    ``in_scale`` and ``act_scale`` within :func:`scale_limits` of their dtype and
    the weight's ``dtype`` (finite, positive, normal, with a normal reciprocal),
    ``perm`` a permutation of ``range(k)``, the activation zero point within
    ``[qmin, qmax]`` of ``act_qtype``. Shapes and dtypes are the schema's.
    """
    return (
        (None if in_scale is None else _scale_problem("in_scale", in_scale, dtype))
        or (None if perm is None else _perm_problem(perm))
        or (None if act_scale is None else _scale_problem("act_scale", act_scale, dtype))
        or (None if act_zp is None else _range_problem(
            "act_zero_point", act_zp, as_qtype(act_qtype).qmin, as_qtype(act_qtype).qmax,
            act_qtype))
    )
