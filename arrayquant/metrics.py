"""Error metrics between an original array and its dequantized copy."""

from __future__ import annotations

import math

from arrayquant._backend import compute_dtype, namespace

__all__ = ["mse", "sqnr_db", "max_abs_error"]


def _pair(x, x_hat):
    from arrayquant.qarray import QArray

    if isinstance(x_hat, QArray):
        x_hat = x_hat.dequantize()
    xp = namespace(x, x_hat)
    if tuple(x.shape) != tuple(x_hat.shape):
        raise ValueError(
            f"shapes differ: original {tuple(x.shape)} vs dequantized {tuple(x_hat.shape)}"
        )
    cdt = xp.result_type(compute_dtype(xp, x.dtype), compute_dtype(xp, x_hat.dtype))
    return xp, xp.astype(x, cdt), xp.astype(x_hat, cdt)


def mse(x, x_hat):
    """Mean squared error ``mean((x - x_hat)**2)`` (``x_hat`` may be a QArray).

    Returned as a 0-d array in float32 (float64 if either input is float64).
    """
    xp, a, b = _pair(x, x_hat)
    d = a - b
    return xp.mean(d * d)


def max_abs_error(x, x_hat):
    """Largest absolute error ``max|x - x_hat|`` as a 0-d array."""
    xp, a, b = _pair(x, x_hat)
    return xp.max(xp.abs(a - b))


def sqnr_db(x, x_hat):
    """Signal-to-quantization-noise ratio ``10 log10(sum(x**2) / sum((x - x_hat)**2))`` in dB.

    ``inf`` when the reconstruction is exact, ``-inf`` for an all-zero signal
    with nonzero noise.
    """
    xp, a, b = _pair(x, x_hat)
    d = a - b
    signal = xp.sum(a * a)
    noise = xp.sum(d * d)
    one = xp.ones_like(noise)
    # log of zero warns on NumPy: take logs of safe values, then pick the limits.
    db = (xp.log(xp.where(signal > 0, signal, one)) - xp.log(xp.where(noise > 0, noise, one)))
    db = 10.0 * db / math.log(10.0)
    inf = xp.full_like(noise, math.inf)
    return xp.where(noise > 0, xp.where(signal > 0, db, -inf), inf)
