"""Fake quantization: ``dequantize(quantize(x))`` in ``x``'s dtype, with a straight-through
gradient on JAX.

The forward value is computed by the same functions as :func:`arrayquant.quantize` and
:func:`arrayquant.dequantize`, so it equals ``dequantize(quantize(x, ...))`` bit for bit on
every backend: the weights a quantization-aware training run ends with are exported by
``quantize`` with the same arguments, with nothing to re-fit.

The gradient (JAX, through ``jax.custom_vjp``) is the clipped straight-through estimator:
the incoming gradient passes unchanged where ``x`` rounds to a code inside the code range
(``q_min <= round(x / s) + z <= q_max``, the same test as PyTorch's fake-quantize
backward) and is zero where the code is clipped. The scale and zero point are treated as
constants: they follow ``x`` through the calibration method but receive no gradient (for
learned ones, see :mod:`arrayquant.training.lsq`). Other array libraries get the forward
value only.
"""

from __future__ import annotations

from arrayquant._backend import compute_dtype, exact_reciprocal, is_jax
from arrayquant.affine import params_and_codes, resolve
from arrayquant.affine.calibrate import DEFAULT_METHOD
from arrayquant.affine.codes import dequantize_codes
from arrayquant.affine.params import clip_range
from arrayquant.blocking import Blocking, from_view, to_view
from arrayquant.qtypes import QType

__all__ = ["fake_quantize"]


def inside_mask(x, s, z, qt: QType, b: Blocking, xp):
    """Where ``round(x / s) + z`` (the code before clipping) lies in the code range."""
    cdt = compute_dtype(xp, x.dtype)
    xv = to_view(xp.astype(x, cdt), b, xp)
    inv = exact_reciprocal(xp.astype(xp.reshape(s, b.scale_view_shape), cdt), xp)
    q = xp.round(xv * inv)
    if z is not None:
        q = q + xp.astype(xp.reshape(z, b.scale_view_shape), cdt)
    lo, hi = clip_range(qt, z is None)
    return from_view((q >= lo) & (q <= hi), b, xp)


def straight_through(forward, x):
    """``forward(x) -> (y, mask)`` as a JAX function of ``x`` whose gradient is the incoming
    gradient where ``mask`` holds and zero elsewhere."""
    import jax
    import jax.numpy as jnp

    @jax.custom_vjp
    def f(x):
        return forward(x)[0]

    def fwd(x):
        return forward(x)

    def bwd(mask, g):
        return (jnp.where(mask, g, jnp.zeros((), g.dtype)),)

    f.defvjp(fwd, bwd)
    return f(x)


def fake_quantize(
    x,
    dtype="int8",
    symmetric: bool = False,
    axis=None,
    group_size: int | None = None,
    group_axis: int = -1,
    *,
    scale_dtype="float32",
    method=DEFAULT_METHOD,
    batch_axes: int = 0,
):
    """``dequantize(quantize(x, ...))`` in ``x``'s dtype, with a clipped straight-through
    gradient on JAX.

    Takes the arguments of :func:`arrayquant.quantize` (granularity, ``scale_dtype``, any
    data-free calibration ``method``, ``batch_axes``) and returns an array of ``x``'s shape
    and dtype that equals ``arrayquant.dequantize(arrayquant.quantize(x, ...))`` bit for bit,
    on NumPy, JAX (eager, ``jit``, ``vmap``) and any array API library. It never builds
    packed codes.

    On JAX the gradient with respect to ``x`` is the clipped straight-through estimator:
    the incoming gradient where ``x`` rounds to a code inside the code range, zero where
    its code is clipped (values beyond a clipping method's range such as
    :class:`~arrayquant.Percentile`; with the default min/max range no value is clipped and
    the gradient is the identity). Scales and zero points get no gradient; to learn them,
    use :func:`arrayquant.fake_quantize_with` (LSQ / LSQ+).

    For activations, quantize per token with ``axis=0`` on ``(tokens, features)`` (the
    same per-row scales as the W8A8 products), or per tensor with the defaults.

    Raises:
        the errors of :func:`arrayquant.quantize`; a data-aware method (GPTQ, AWQ) is a
        ``ValueError``: those need statistics and are not differentiable.

    Example:
        >>> import numpy as np, arrayquant as aq
        >>> x = np.linspace(-1, 1, 6, dtype=np.float32)
        >>> y = aq.fake_quantize(x, "int4", symmetric=True)
        >>> bool(np.array_equal(y, aq.dequantize(aq.quantize(x, "int4", symmetric=True))))
        True
    """
    xp, qt, b, method = resolve(x, dtype, symmetric, axis, group_size, group_axis,
                                batch_axes, method)

    def forward(x, want_mask=True):
        s, z, codes, _ = params_and_codes(x, qt, symmetric, b, scale_dtype, True, xp, method)
        y = dequantize_codes(codes, s, z, b, x.dtype, xp)
        return y, (inside_mask(x, s, z, qt, b, xp) if want_mask else None)

    if is_jax(xp):
        return straight_through(forward, x)
    return forward(x, want_mask=False)[0]
