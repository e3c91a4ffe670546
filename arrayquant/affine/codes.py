"""Codes from parameters and back: the third affine step, on split views."""

from __future__ import annotations

import numpy as np  # only for np.errstate: overflow to inf is intended, then clipped

from arrayquant._backend import compute_dtype, exact_reciprocal, finfo_limits, int_dtype
from arrayquant.affine.params import clip, clip_range
from arrayquant.blocking import Blocking, from_view, to_view
from arrayquant.packing import join_phases
from arrayquant.qtypes import QType


def quantize_view(xv, s, z, qt: QType, cdt, xp):
    lo, hi = clip_range(qt, z is None)
    # x * (1 / s), not x / s: XLA rewrites a division by a broadcast scale into
    # this form, so writing it out keeps NumPy and JAX codes bit-identical. The
    # reciprocal is correctly rounded on every device (XLA:GPU's is not; see
    # exact_reciprocal), and products are exact everywhere.
    inv = exact_reciprocal(xp.astype(s, cdt), xp)
    with np.errstate(over="ignore"):  # a given small scale and a huge x: inf, clipped below
        q = xp.round(xv * inv)
    if z is not None:
        q = q + xp.astype(z, cdt)
    return xp.astype(clip(q, lo, hi, xp), int_dtype(xp, qt.storage))


def dequantize_codes(codes, scale, zero_point, b: Blocking, out_dtype, xp):
    cdt = xp.result_type(compute_dtype(xp, scale.dtype), compute_dtype(xp, out_dtype))
    cv = to_view(xp.astype(codes, cdt), b, xp)
    z = None if zero_point is None else xp.reshape(zero_point, b.scale_view_shape)
    out = dequantize_view(cv, xp.reshape(scale, b.scale_view_shape), z, cdt, xp, out_dtype)
    return xp.astype(from_view(out, b, xp), out_dtype, copy=False)


def dequantize_view(cv, s, z, cdt, xp, out_dtype=None):
    """``clip(s * (q - z), -max, max)`` in ``cdt`` on a view of float codes ``cv``.

    ``max`` is the largest finite value of ``out_dtype`` (default ``cdt``).
    """
    if z is not None:
        cv = cv - xp.astype(z, cdt)
    with np.errstate(over="ignore"):  # NumPy (and array_api_strict) warn; clipped below
        out = cv * xp.astype(s, cdt)
    # Saturate to the output dtype's finite range: s * (q - z) may pass it (q_min * s
    # when z rounds to 0, or a scale rounded up), while every input lies inside it.
    # xp.clip, not clip: one pass over a full-size array (NumPy: 11 ms against 29 ms
    # for maximum + minimum at 4096 x 4096), and its per-call overhead does not matter.
    big = finfo_limits(cdt if out_dtype is None else out_dtype)[1]
    return xp.clip(out, -big, big)


def packed_codes(xv, s, z, qt: QType, b: Blocking, cdt, xp):
    """Codes packed along the last axis straight from the split view, or None.

    Packing the codes afterwards reads them back with a stride (``codes[...,
    k::per]``), and XLA then quantizes every byte's values through scalar index
    arithmetic. Here phase ``k`` of the *input*, ``xv[..., k::per]``, is quantized
    on its own and the phases are joined (:func:`arrayquant.packing.join_phases`):
    the same operations on the same values, so the same bytes. It applies when
    the view's last axis (the block along the last axis) and the last axis hold
    whole bytes, and one scale covers each block along it.
    """
    per = 8 // qt.bits
    if (not b.shape or xv.shape[-1] % per or b.shape[-1] % per or s.shape[-1] != 1
            or (z is not None and z.shape[-1] != 1)):
        return None
    phases = [quantize_view(xv[..., k::per], s, z, qt, cdt, xp) for k in range(per)]
    out = xp.reshape(join_phases(phases, qt.bits, xp),
                     (*b.padded_shape[:-1], b.padded_shape[-1] // per))
    if b.needs_padding:
        out = out[tuple(slice(0, n) for n in (*b.shape[:-1], b.shape[-1] // per))]
    return out
