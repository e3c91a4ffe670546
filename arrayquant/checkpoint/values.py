"""The value rules of a stored QArray, shared by save (before writing) and load (after reading)."""

from __future__ import annotations

import numpy as np

from arrayquant._backend import scale_limits
from arrayquant.packing import unpack
from arrayquant.qtypes import QType, as_qtype

__all__ = ["qarray_problem"]


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
