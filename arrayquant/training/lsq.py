"""Learned quantization parameters: LSQ (Esser et al., 2020) and LSQ+ (Bhalgat et al., 2020).

The scale, and for asymmetric types a zero point, are arrays the training run updates. The
forward pass is arrayquant's own quantize -> dequantize with them (so the result is exported
bit for bit by :func:`quantize_learned`):

- the scale used is ``clip(|scale|, lo, hi)`` with ``(lo, hi) = scale_limits`` (kept
  positive and finite however the optimizer moves it);
- the zero point used is ``clip(round(zero_point), q_min, q_max)``: LSQ+'s learned offset
  ``beta`` is ``-s * z`` here, kept on the integer grid so that the result is an ordinary
  affine QArray;
- ``y = s * (clip(round(x / s) + z, q_min, q_max) - z)``.

The gradients (JAX) are the published estimators, with the rounding passed straight
through. Per element, with ``u = x / s`` and ``q = round(u) + z`` before clipping:

- ``dy/dx = 1`` where ``q_min <= q <= q_max``, else 0;
- ``dy/ds = round(u) - u`` inside, ``q_min - z`` below and ``q_max - z`` above the range
  (LSQ's ``-Q_N`` / ``Q_P`` for a symmetric type);
- ``dy/dz = 0`` inside, ``-s`` where clipped (LSQ+'s ``dy/dbeta = 1`` outside);

and the scale's and zero point's gradients, summed over each block, are multiplied by the
gradient scale ``g = 1 / sqrt(n * Q_P)`` (``n`` elements per block, ``Q_P`` the largest
code), LSQ's factor that keeps the step-size updates in proportion to the weights'.
"""

from __future__ import annotations

import math

from arrayquant._backend import (
    compute_dtype,
    dtype_name,
    exact_reciprocal,
    float_dtype,
    int_dtype,
    is_float_dtype,
    is_jax,
    namespace,
    scale_limits,
)
from arrayquant.affine import make_qarray, qparams, qparams_blocking, resolve
from arrayquant.affine.checks import check_float_input, raise_if_not_finite
from arrayquant.affine.codes import dequantize_codes, quantize_view
from arrayquant.affine.params import clip, clip_range
from arrayquant.blocking import Blocking, from_view, to_view
from arrayquant.qtypes import QType, as_qtype

__all__ = ["fake_quantize_with", "quantize_learned", "lsq_init"]


def _check(x, scale, zero_point, dtype, group_size, group_axis):
    xp = namespace(x, scale, zero_point)
    check_float_input(x, xp)
    qt = as_qtype(dtype)
    if zero_point is not None:
        if not hasattr(zero_point, "dtype") or not is_float_dtype(zero_point.dtype):
            got = dtype_name(zero_point.dtype) if hasattr(zero_point, "dtype") else repr(
                zero_point)
            raise TypeError(
                f"zero_point must be a floating array (the learned LSQ+ offset, rounded in the "
                f"forward pass); got {got}. For a fixed integer zero point use "
                "aq.fake_quantize or aq.quantize_with")
        if tuple(zero_point.shape) != tuple(scale.shape):
            raise ValueError(
                f"zero_point of shape {tuple(zero_point.shape)} does not match scale of shape "
                f"{tuple(scale.shape)}; expected the same shape")
    elif not qt.signed:
        raise ValueError(
            f"zero_point=None (symmetric) needs a signed dtype, got {qt.name}; pass a zero "
            "point (lsq_init gives one)")
    b = qparams_blocking(x.shape, scale, None, group_size, group_axis)
    raise_if_not_finite(xp, x)
    raise_if_not_finite(xp, scale, what="scale")
    raise_if_not_finite(xp, zero_point, what="zero_point")
    return xp, qt, b


def _used(scale, zero_point, qt: QType, x_dtype, xp):
    """The scale and (integer) zero point the forward pass uses."""
    lo, hi = scale_limits(scale.dtype, x_dtype)
    s = clip(xp.abs(scale), lo, hi, xp)
    if zero_point is None:
        return s, None
    z = clip(xp.round(zero_point), float(qt.qmin), float(qt.qmax), xp)
    return s, xp.astype(z, int_dtype(xp, qt.storage))


def _forward(x, s, z, qt: QType, b: Blocking, xp):
    cdt = compute_dtype(xp, x.dtype)
    xv = to_view(xp.astype(x, cdt), b, xp)
    zv = None if z is None else xp.reshape(z, b.scale_view_shape)
    codes = from_view(quantize_view(xv, xp.reshape(s, b.scale_view_shape), zv, qt, cdt, xp),
                      b, xp)
    return codes, dequantize_codes(codes, s, z, b, x.dtype, xp)


def default_grad_scale(qt: QType, b: Blocking, symmetric: bool) -> float:
    """LSQ's ``1 / sqrt(n * Q_P)``: ``n`` elements per block (the nominal block size, also
    for a partial last group), ``Q_P`` the largest code."""
    return 1.0 / math.sqrt(math.prod(b.block) * clip_range(qt, symmetric)[1])


def _gradients(g, x, scale, s, z, qt: QType, b: Blocking, gscale: float, xp):
    """``(dx, dscale, dzero_point)`` of the LSQ / LSQ+ estimators (see the module doc)."""
    cdt = compute_dtype(xp, x.dtype)
    xv = to_view(xp.astype(x, cdt), b, xp)
    gv = to_view(xp.astype(g, cdt), b, xp)
    sv = xp.astype(xp.reshape(s, b.scale_view_shape), cdt)
    u = xv * exact_reciprocal(sv, xp)
    r = xp.round(u)
    zv = xp.zeros((), dtype=cdt) if z is None else xp.astype(
        xp.reshape(z, b.scale_view_shape), cdt)
    lo, hi = clip_range(qt, z is None)
    below, above = r + zv < lo, r + zv > hi
    inside = ~(below | above)
    zero = xp.zeros((), dtype=cdt)
    dx = from_view(xp.where(inside, gv, zero), b, xp)
    ds_el = gv * xp.where(inside, r - u, xp.where(below, lo - zv, hi - zv))
    ds = xp.reshape(xp.sum(ds_el, axis=b.reduce_axes, keepdims=True), scale.shape) * gscale
    # s = clip(|scale|, lo_s, hi_s): the gradient flows through |.| and stops at the limits.
    lo_s, hi_s = scale_limits(scale.dtype, x.dtype)
    a = xp.abs(scale)
    ds = xp.where((a >= lo_s) & (a <= hi_s), ds * xp.astype(xp.sign(scale), cdt), zero)
    dz = None
    if z is not None:
        dz_el = xp.where(inside, zero, -gv * sv)
        dz = xp.reshape(xp.sum(dz_el, axis=b.reduce_axes, keepdims=True), scale.shape) * gscale
    return dx, ds, dz


def fake_quantize_with(x, scale, zero_point=None, dtype="int8", *, group_size=None,
                       group_axis: int = -1, grad_scale: float | None = None):
    """Fake quantization with a learned ``scale`` (LSQ) and ``zero_point`` (LSQ+).

    ``scale`` has the shape :func:`arrayquant.qparams` gives (one entry per block; a 0-d
    scale is per tensor), ``zero_point`` the same shape as a *floating* array or ``None``
    for symmetric quantization; :func:`lsq_init` makes both. The forward value is
    ``s * (clip(round(x / s) + z, q_min, q_max) - z)`` with ``s = clip(|scale|, lo, hi)``
    and ``z = clip(round(zero_point), q_min, q_max)``, in ``x``'s dtype, computed exactly as
    ``arrayquant.dequantize(quantize_learned(x, scale, zero_point, dtype))``.

    On JAX, gradients flow to ``x``, ``scale`` and ``zero_point`` by the LSQ / LSQ+
    estimators (module :mod:`arrayquant.training.lsq`); ``grad_scale`` multiplies the
    scale's and zero point's gradients (default ``1 / sqrt(n * Q_P)``; ``1.0`` turns it
    off; ``n`` is the nominal block size, also for a partial last group). Other array
    libraries get the forward value.

    Raises:
        TypeError: non-float ``x`` or ``scale``; an integer ``zero_point``.
        ValueError: shapes that do not fit; ``zero_point=None`` with an unsigned type; NaN
            or inf in ``x``, ``scale`` or ``zero_point`` (eager); a ``grad_scale`` that is
            not a positive finite number.
    """
    xp, qt, b = _check(x, scale, zero_point, dtype, group_size, group_axis)
    if grad_scale is None:
        gscale = default_grad_scale(qt, b, zero_point is None)
    elif (isinstance(grad_scale, (int, float)) and not isinstance(grad_scale, bool)
          and math.isfinite(grad_scale) and grad_scale > 0):
        gscale = float(grad_scale)
    else:
        raise ValueError(f"grad_scale={grad_scale!r}: expected None (LSQ's 1 / sqrt(n * Q_P)) "
                         "or a positive finite number (1.0 turns the scaling off)")

    def value(x, scale, zero_point):
        s, z = _used(scale, zero_point, qt, x.dtype, xp)
        return _forward(x, s, z, qt, b, xp)[1], (s, z)

    if not is_jax(xp):
        return value(x, scale, zero_point)[0]
    import jax

    @jax.custom_vjp
    def f(x, scale, zero_point):
        return value(x, scale, zero_point)[0]

    def fwd(x, scale, zero_point):
        y, (s, z) = value(x, scale, zero_point)
        return y, (x, scale, s, z)

    def bwd(res, g):
        x, scale, s, z = res
        dx, ds, dz = _gradients(g, x, scale, s, z, qt, b, gscale, xp)
        dz = None if zp_dtype is None else xp.astype(dz, zp_dtype)
        return xp.astype(dx, x.dtype), xp.astype(ds, scale.dtype), dz

    zp_dtype = None if zero_point is None else zero_point.dtype
    f.defvjp(fwd, bwd)
    return f(x, scale, zero_point)


def quantize_learned(x, scale, zero_point=None, dtype="int8", *, group_size=None,
                     group_axis: int = -1):
    """The :class:`~arrayquant.QArray` of ``x`` with learned parameters: its
    ``dequantize`` equals :func:`fake_quantize_with` with the same arguments bit for bit.

    The QArray stores ``clip(|scale|, lo, hi)`` and the integer zero point
    ``clip(round(zero_point), q_min, q_max)``; sub-byte codes are packed as
    :func:`arrayquant.quantize` packs them. Same arguments and errors as
    :func:`fake_quantize_with`.
    """
    xp, qt, b = _check(x, scale, zero_point, dtype, group_size, group_axis)
    s, z = _used(scale, zero_point, qt, x.dtype, xp)
    codes = _forward(x, s, z, qt, b, xp)[0]
    if not scale.shape:  # a 0-d scale is per tensor
        s = xp.reshape(s, b.scale_shape)
        z = None if z is None else xp.reshape(z, b.scale_shape)
    return make_qarray(codes, s, z, qt, b, dtype_name(x.dtype), 0)


def lsq_init(x, dtype="int8", symmetric: bool = False, axis=None, group_size=None,
             group_axis: int = -1, *, init: str = "minmax", scale_dtype="float32"):
    """Initial ``(scale, zero_point)`` for :func:`fake_quantize_with`, as trainable floats.

    ``init="minmax"`` starts from :func:`arrayquant.qparams` (so the first forward pass
    equals :func:`arrayquant.fake_quantize`); ``init="lsq"`` uses the LSQ paper's
    ``2 * mean(|x|) / sqrt(Q_P)`` per block, with the min/max formula's zero point for
    that scale. ``zero_point`` is ``None`` when ``symmetric``, else a float array of the
    scale's shape. Granularity arguments as in :func:`arrayquant.quantize`.
    """
    if init not in ("minmax", "lsq"):
        raise ValueError(f"init={init!r} is not one of 'minmax', 'lsq'")
    s, z = qparams(x, dtype, symmetric, axis, group_size, group_axis, scale_dtype=scale_dtype)
    xp = namespace(s)
    if init == "minmax":
        return s, None if z is None else xp.astype(z, s.dtype)
    _, qt, b, _ = resolve(x, dtype, symmetric, axis, group_size, group_axis)
    cdt = compute_dtype(xp, x.dtype)
    xv = to_view(xp.astype(x, cdt), b, xp)
    count = xp.sum(to_view(xp.ones(x.shape, dtype=cdt), b, xp), axis=b.reduce_axes,
                   keepdims=True)
    mean_abs = xp.sum(xp.abs(xv), axis=b.reduce_axes, keepdims=True) / count
    qp = clip_range(qt, symmetric)[1]
    lo, hi = scale_limits(scale_dtype, x.dtype)
    s = clip(xp.reshape(mean_abs * (2.0 / math.sqrt(qp)), s.shape), lo, hi, xp)
    s = xp.astype(s, float_dtype(xp, scale_dtype))
    if symmetric:
        return s, None
    xmin = xp.min(xv, axis=b.reduce_axes, keepdims=True)
    xmin = xp.reshape(xp.minimum(xmin, xp.zeros((), dtype=cdt)), s.shape)
    z = clip(xp.round(qt.qmin - xmin / xp.astype(s, cdt)), float(qt.qmin), float(qt.qmax), xp)
    return s, xp.astype(z, s.dtype)

