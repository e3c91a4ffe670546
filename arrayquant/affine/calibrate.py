"""Calibration: the parameters of each block, chosen by a *method* (the first affine step).

calibrate (ranges, or scale and zero point, per block) -> parameters from ranges
(:func:`arrayquant.qparams_from_range`) -> quantize with parameters
(:func:`arrayquant.quantize_with`).

The protocol. A calibration method is a small frozen (hashable) dataclass, so
that it passes through ``jax.jit`` as static configuration, with

- ``output``: ``"range"`` or ``"params"``;
- ``__call__(xv, b, qt, symmetric, sdt, cdt, xp)``: ``xv`` is the split view of
  the input in the compute dtype ``cdt`` (``Blocking.view_shape``, see
  :mod:`arrayquant.blocking`; a partial last block is padded with zeros), ``b``
  its :class:`~arrayquant.blocking.Blocking`. A ``"range"`` method returns
  ``(r_min, r_max)`` in ``cdt``, a ``"params"`` method returns ``(scale, z)``:
  the scale in the scale dtype ``sdt`` (within ``scale_limits``, rounded up as
  :func:`~arrayquant.affine.params.store_scale` does) and the zero point as an
  integer-valued ``cdt`` array in the qtype's range (``None`` when symmetric).
  Either comes in ``b.scale_view_shape``.

Ranges go through :func:`~arrayquant.affine.params.params_from_range`, so a
range method inherits its formulas (zero extended into the range, scale
limits, zero point clipped into range). A ``"params"`` method builds its
candidates with the same functions and evaluates them with the library's own
quantize / dequantize (:func:`block_sse`), so its result is reproducible.

This module holds the helpers on blocks, :class:`MinMax` (the default) and
:class:`Percentile`; :mod:`arrayquant.affine.search` holds the searches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from arrayquant._backend import finfo_limits, is_jax
from arrayquant.affine.codes import dequantize_view, quantize_view
from arrayquant.blocking import Blocking

__all__ = [
    "DEFAULT_METHOD", "MinMax", "Percentile", "block_sse", "block_sum", "blocks_last",
    "from_blocks_last",
]


# --------------------------------------------------------------------------- blocks


def blocks_last(xv, b: Blocking, xp):
    """The split view with each block's elements on one last axis: ``(*kept, n)``.

    The kept axes stay in their order, so a result of shape ``(*kept, 1)``
    reshapes directly to ``b.scale_view_shape`` (:func:`from_blocks_last`).
    """
    red = b.reduce_axes
    kept = tuple(a for a in range(len(xv.shape)) if a not in red)
    if red and red != tuple(range(len(xv.shape) - len(red), len(xv.shape))):
        xv = xp.permute_dims(xv, kept + red)
    n = math.prod(xv.shape[len(kept):])
    return xp.reshape(xv, tuple(xv.shape[: len(kept)]) + (n,))


def from_blocks_last(a, b: Blocking, xp):
    return xp.reshape(a, b.scale_view_shape)


def block_sum(v, xp):
    """Sum over the last axis in a fixed order, the same bits on every backend.

    The axis is padded with zeros to a power of two and halved by elementwise
    additions (a pairwise tree): no backend reorders an elementwise addition,
    while ``xp.sum``'s order differs between NumPy and XLA.
    """
    # A no-op clip to the finite range: it stands between a product that made ``v``
    # and the additions, so that XLA cannot fuse them into multiply-adds.
    big = finfo_limits(v.dtype)[1]
    v = xp.clip(v, -big, big)
    n = v.shape[-1]
    m = 1 << max(0, (n - 1).bit_length())
    if m != n:
        v = xp.concat([v, xp.zeros(tuple(v.shape[:-1]) + (m - n,), dtype=v.dtype)], axis=-1)
    while m > 1:
        m //= 2
        v = v[..., :m] + v[..., m:]
    return v


def block_sse(xf, s, z, qt, cdt, xp):
    """Each block's squared error ``sum((x - dequantize(quantize(x)))**2)``, shape ``(*kept, 1)``.

    ``xf`` in the :func:`blocks_last` layout; ``s`` and ``z`` broadcast against it.
    Quantize and dequantize are the library's own (``quantize_view``,
    ``dequantize_view``); the saturation in ``dequantize_view`` also keeps XLA from
    fusing the product into the subtraction, and :func:`block_sum` fixes the order.
    """
    codes = xp.astype(quantize_view(xf, s, z, qt, cdt, xp), cdt)
    e = xf - dequantize_view(codes, s, z, cdt, xp)
    return block_sum(e * e, xp)


def minmax_ranges(xv, b: Blocking, xp):
    """Each block's minimum and maximum, shaped ``b.scale_view_shape``."""
    axes = b.reduce_axes
    if (is_jax(xp) and b.shape and 1 < b.block[-1] < b.padded_shape[-1]
            and axes == (len(b.view_shape) - 1,)):
        # Groups along the last axis only: one variadic reduce reads the input once for
        # both ends (4096 x 4096 in groups of 128: 1.7 ms against 6.6 ms on XLA:CPU). Not
        # for other layouts, where it measured as slow or far slower (63 ms over axis 0).
        # Min and max select values, so the result is the same.
        from arrayquant._backend.jaxtools import min_max

        return min_max(xv, axes)
    return (
        xp.min(xv, axis=axes, keepdims=True),
        xp.max(xv, axis=axes, keepdims=True),
    )


# --------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class MinMax:
    """Each block's minimum and maximum (round to nearest, "RTN"): the default.

    Asymmetric: ``[min(x), max(x)]``, extended to hold 0 by the parameter step;
    symmetric: ``max|x|``. The cheapest method (one pass) and the only one the
    NumPy fast path runs; every other method starts from it.

    Example:
        >>> import numpy as np, arrayquant as aq
        >>> x = np.linspace(-1, 3, 8, dtype=np.float32)
        >>> s, z = aq.qparams(x, "uint8", method=aq.MinMax())
        >>> int(z)
        64
    """

    output = "range"

    def __call__(self, xv, b: Blocking, qt, symmetric, sdt, cdt, xp):
        return minmax_ranges(xv, b, xp)


#: The default of every ``method=`` argument.
DEFAULT_METHOD = MinMax()


def percentile_index(q, n: int) -> int:
    """``k = floor((100 - q) / 100 * (n - 1))``, computed exactly (``q`` as written in decimal).

    The range of a block of ``n`` sorted values ``v`` is ``[v[k], v[n - 1 - k]]``:
    the lower order statistic at or below the ``(100 - q)``-th percentile's
    position and its mirror. ``q = 100`` gives ``k = 0``, the min and max.
    """
    return int(math.floor((100 - Fraction(repr(float(q)))) * (n - 1) / 100))


@dataclass(frozen=True)
class Percentile:
    """The ``q``-th and ``(100 - q)``-th percentiles of each block instead of its max and min.

    Per block of ``n`` values sorted ascending (``xp.sort``), with
    ``k = floor((100 - q) / 100 * (n - 1))`` (:func:`percentile_index`, exact in
    Python, so every backend picks the same element): asymmetric uses
    ``[v[k], v[n - 1 - k]]``, symmetric ``r_max = |x|`` sorted at ``n - 1 - k``.
    No interpolation, so the range ends are values of the block and NumPy and
    JAX agree bit for bit. Values beyond the range saturate. A partial last
    group counts its zero padding as values. ``Percentile(100)`` equals
    :class:`MinMax`.

    Args:
        q: percentile in ``[50, 100]`` (default 99.9).

    Raises:
        ValueError: ``q`` outside ``[50, 100]`` or not a number.
    """

    q: float = 99.9
    output = "range"

    def __post_init__(self):
        if isinstance(self.q, bool) or not isinstance(self.q, (int, float)) or not (
                50 <= self.q <= 100):
            raise ValueError(f"Percentile(q={self.q!r}): expected a number in [50, 100]")

    def __call__(self, xv, b: Blocking, qt, symmetric, sdt, cdt, xp):
        xf = blocks_last(xv, b, xp)
        n = xf.shape[-1]
        k = percentile_index(self.q, n)
        if symmetric:
            v = xp.sort(xp.abs(xf), axis=-1)
            hi = from_blocks_last(v[..., n - 1 - k : n - k], b, xp)
            return -hi, hi
        v = xp.sort(xf, axis=-1)
        return (from_blocks_last(v[..., k : k + 1], b, xp),
                from_blocks_last(v[..., n - 1 - k : n - k], b, xp))
