"""Calibration: the range of each block, the first of the three affine steps.

calibrate (ranges per block) -> parameters from ranges
(:func:`arrayquant.qparams_from_range`) -> quantize with parameters
(:func:`arrayquant.quantize_with`). A calibration method is one function of
this shape: the split view ``xv`` of the input (``Blocking.view_shape``, see
:mod:`arrayquant.blocking`) in, ``(r_min, r_max)`` with the shape of the view
reduced over ``b.reduce_axes`` (kept as size-1 axes) out. Min/max is the
default and, for now, the only one.
"""

from __future__ import annotations

from arrayquant.blocking import Blocking


def minmax_ranges(xv, b: Blocking, xp):
    axes = b.reduce_axes
    return (
        xp.min(xv, axis=axes, keepdims=True),
        xp.max(xv, axis=axes, keepdims=True),
    )
