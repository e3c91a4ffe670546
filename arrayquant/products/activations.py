"""Per-token activation quantization (W8A8) and the per-row view of a quantized ``x``."""

from __future__ import annotations

import math

from arrayquant.affine import quantize, quantize_with
from arrayquant.products.arrays import check_float, expand
from arrayquant.products.plan import ActPlan
from arrayquant.qarray import QArray
from arrayquant.qtypes import as_qtype

__all__ = ["quantize_activations", "act_rows", "static_act_rows"]


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
    check_float(x, "x")
    if x.ndim == 0:
        raise ValueError("quantize_activations needs an array of at least 1 dimension (tokens "
                         "along the leading axes, features along the last); got a 0-d array")
    axis = tuple(range(x.ndim - 1)) if x.ndim > 1 else None
    return quantize(x, dtype, symmetric, axis=axis, scale_dtype=scale_dtype)


def act_rows(qx: QArray, k: int, xp) -> ActPlan:
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
        a = expand(a, qx.block_shape, (*lead, 1), xp)
        return xp.reshape(xp.broadcast_to(a, (*lead, 1)), (m, 1))

    codes = xp.reshape(qx.codes, (m, k))
    return ActPlan(codes, rows(qx.scale), rows(qx.zero_point), as_qtype(qx.qtype), qx.dtype)


def static_act_rows(x2, lw, xp) -> ActPlan:
    """``x2`` (m, k) quantized with a :class:`~arrayquant.LinearWeight`'s static parameters.

    One calibrated scale and zero point for the whole tensor (``lw.act_scale``,
    ``lw.act_zero_point``, ``lw.act_qtype``), repeated for every row.
    """
    qt = as_qtype(lw.act_qtype)
    m = x2.shape[0]
    # quantize_with rejects empty arrays: an empty x quantizes one zero row, kept as none.
    src = x2 if m else xp.zeros((1, x2.shape[1]), dtype=x2.dtype)
    codes = quantize_with(src, lw.act_scale, lw.act_zero_point, qt.name)[:m, ...]
    z = lw.act_zero_point
    return ActPlan(
        codes,
        xp.broadcast_to(xp.reshape(lw.act_scale, (1, 1)), (m, 1)),
        None if z is None else xp.broadcast_to(xp.reshape(z, (1, 1)), (m, 1)),
        qt, str(x2.dtype))
