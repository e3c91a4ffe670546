"""Static activation-range observers, and the activation scale they lead to.

A static (calibrated) activation scale is one scale and zero point for a whole
activation tensor, fixed before inference. An *observer* decides which range
of the calibration activations that scale covers. It is a frozen (hashable)
dataclass, static configuration under ``jax.jit``, with two methods:

- ``batch_range(x, row_mask) -> (lo, hi)``: the range of one batch ``x`` of
  shape ``(..., k)`` (rows are every axis but the last; rows where ``row_mask``
  is 0, padding tokens, are left out), as 0-d arrays in the accumulation dtype
  (:func:`arrayquant.stats.layer.accumulation_dtype`);
- ``combine((lo_a, hi_a, count_a), (lo_b, hi_b, count_b)) -> (lo, hi)``: the
  range of two merged recordings of ``count_a`` and ``count_b`` rows, ``a``
  the earlier one.

:func:`arrayquant.stats.layer.record` calls the first, :func:`~arrayquant.stats.layer.merge`
the second, so the combined range travels in :class:`~arrayquant.stats.layer.LayerStats`
(``range_min``, ``range_max``). :func:`activation_qparams` turns it into a scale and zero
point with the library's own formulas (:func:`arrayquant.qparams_from_range`).

Which one:

- :class:`MinMaxObserver`: the range of everything seen. Exact, order-independent;
  one outlier token widens the scale for every token.
- :class:`MovingAverageObserver`: exponential moving average of the per-batch
  min and max, in batch order (PyTorch's and TensorRT's habit); less sensitive to
  one extreme batch, but the result depends on the batch order.
- :class:`PercentileObserver`: per batch the ``100 - q`` and ``q`` percentiles,
  averaged over batches weighted by their row counts; clips rare outliers.
- :class:`MSEObserver`: per batch the shrunk min/max range whose
  quantize-dequantize squared error is smallest, averaged like the percentile.

Empty batches (every row masked): :class:`MinMaxObserver` and
:class:`MovingAverageObserver` give ``(inf, -inf)``, the neutral element of their
combination, the others ``(0, 0)`` with weight 0. A range that saw no row at all
stays infinite, and :func:`activation_qparams` refuses it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from arrayquant._backend import dtype_name, float_dtype, is_jax, namespace
from arrayquant.affine import dequantize_with, qparams_from_range, quantize_with
from arrayquant.affine.search import shrink_factors
from arrayquant.qtypes import as_qtype
from arrayquant.stats.layer import LayerStats, accumulation_dtype

__all__ = [
    "MSEObserver",
    "MinMaxObserver",
    "MovingAverageObserver",
    "PercentileObserver",
    "activation_qparams",
]


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _rows(x, row_mask, xp):
    """``x`` as ``(n, k)`` rows and the ``(n, 1)`` boolean keep mask (None: every row)."""
    if not (hasattr(x, "shape") and len(x.shape) >= 1):
        raise ValueError(f"an observer needs an array x of shape (..., k); got {x!r}")
    k = x.shape[-1]
    xr = xp.reshape(x, (-1, k))
    if row_mask is None:
        return xr, None
    rm = xp.reshape(xp.asarray(row_mask), (-1,))
    if rm.shape[0] != xr.shape[0]:
        raise ValueError(
            f"row_mask has {rm.shape[0]} entries, but x of shape {tuple(x.shape)} has "
            f"{xr.shape[0]} rows (every axis but the last); expected one entry per row")
    return xr, xp.reshape(rm != 0, (-1, 1))


def _min_max(xr, keep, acc, xp):
    """Min and max over the kept rows, in ``acc``; ``(inf, -inf)`` when none is kept."""
    inf = float("inf")
    if math.prod(xr.shape) == 0:
        return xp.asarray(inf, dtype=acc), xp.asarray(-inf, dtype=acc)
    big = xp.asarray(inf, dtype=xr.dtype)
    lo_src = xr if keep is None else xp.where(keep, xr, big)
    hi_src = xr if keep is None else xp.where(keep, xr, -big)
    return xp.astype(xp.min(lo_src), acc), xp.astype(xp.max(hi_src), acc)


def _kept_rows(xr, keep, acc, xp):
    """The number of kept rows as a 0-d ``acc`` array."""
    if keep is None:
        return xp.asarray(float(xr.shape[0]), dtype=acc)
    return xp.sum(xp.astype(keep, acc))


def _weighted_mean(a, b, xp):
    """Count-weighted mean of two ranges ``(lo, hi, count)``; ``a`` when both are empty."""
    lo_a, hi_a, ca = a
    lo_b, hi_b, cb = b
    total = xp.maximum(ca + cb, xp.ones_like(ca))  # counts are whole numbers
    return (ca * lo_a + cb * lo_b) / total, (ca * hi_a + cb * hi_b) / total


@dataclass(frozen=True)
class MinMaxObserver:
    """The minimum and maximum of every recorded (non-padding) value.

    ``combine`` takes the min of the mins and the max of the maxes, so the result
    does not depend on how the data was split into batches or their order.

    Example:
        >>> import numpy as np
        >>> from arrayquant.stats.observers import MinMaxObserver
        >>> lo, hi = MinMaxObserver().batch_range(np.float32([[1, -2], [9, 3]]), [1, 0])
        >>> float(lo), float(hi)
        (-2.0, 1.0)
    """

    def batch_range(self, x, row_mask=None):
        xp = namespace(x)
        xr, keep = _rows(x, row_mask, xp)
        return _min_max(xr, keep, accumulation_dtype(xp), xp)

    def combine(self, a, b):
        xp = namespace(a[0], b[0])
        return xp.minimum(a[0], b[0]), xp.maximum(a[1], b[1])


@dataclass(frozen=True)
class MovingAverageObserver:
    """Exponential moving average of the per-batch min and max, in batch order.

    ``r_1 = batch_1``, ``r_t = momentum * r_(t-1) + (1 - momentum) * batch_t``,
    for the min and the max separately; an empty batch (every row masked) leaves
    the average as it is. The result depends on the order of the batches (and on
    how the data was split into them): ``combine(a, b)`` treats ``b`` as the
    newer batch, so merge the batches' statistics in the order they were seen
    (:func:`arrayquant.stats.recorder.collect_stats` does).

    Args:
        momentum: the weight of the running value, in ``[0, 1)`` (default 0.9).

    Raises:
        ValueError: ``momentum`` outside ``[0, 1)`` or not a number.
    """

    momentum: float = 0.9

    def __post_init__(self):
        if not (_is_num(self.momentum) and 0 <= self.momentum < 1):
            raise ValueError(f"MovingAverageObserver(momentum={self.momentum!r}): expected a "
                             "number in [0, 1)")

    def batch_range(self, x, row_mask=None):
        xp = namespace(x)
        xr, keep = _rows(x, row_mask, xp)
        return _min_max(xr, keep, accumulation_dtype(xp), xp)

    def combine(self, a, b):
        xp = namespace(a[0], b[0])
        m = float(self.momentum)
        (lo_a, hi_a, ca), (lo_b, hi_b, cb) = a, b
        # Empty sides hold (inf, -inf); the sums below stay inf there (never inf - inf)
        # and are not selected.
        lo = xp.where(ca > 0, m * lo_a + (1.0 - m) * lo_b, lo_b)
        hi = xp.where(ca > 0, m * hi_a + (1.0 - m) * hi_b, hi_b)
        return xp.where(cb > 0, lo, lo_a), xp.where(cb > 0, hi, hi_a)


def _ends(v, kk: int, xp):
    """The ``kk`` smallest values of ``v`` ascending and its ``kk`` largest descending.

    Generic: one sort. JAX: ``lax.top_k`` (XLA:CPU sorts a million float32 values in
    0.4 s, top_k of 120 of them in 2 ms); the selected values are the same.
    """
    if is_jax(xp):
        from jax import lax

        return -lax.top_k(-v, kk)[0], lax.top_k(v, kk)[0]
    s = xp.sort(v)
    return s[:kk], xp.flip(s[s.shape[0] - kk:])


@dataclass(frozen=True)
class PercentileObserver:
    """Per batch the ``(100 - q)``-th and ``q``-th percentiles of the values.

    The percentile is NumPy's default (``method="linear"``): of the ``N``
    non-padding values of the batch sorted ascending, ``v``, the ``p``-th
    percentile is ``v[i] + f (v[i+1] - v[i])`` with ``i + f = p / 100 (N - 1)``
    (``i`` whole, ``0 <= f < 1``). Batches combine as the mean weighted by their
    row counts (rows, not values: every row has ``k`` values). ``q = 100`` gives
    each batch's min and max. Cost: one sort of the batch per layer (on JAX a
    top-k selection of the ``(100 - q) / 100 * N + 2`` values at each end).
    ``i + f`` is computed in the accumulation dtype: in float32 (JAX without x64)
    ``f`` is off by up to about ``N * 6e-8``, so the result may differ from NumPy's
    by that fraction of the gap between neighbouring values (measured: 5e-4 on a
    range of 22 at ``q = 99.99``, ``N = 19,000``).

    Args:
        q: percentile in ``[50, 100]`` (default 99.99).

    Raises:
        ValueError: ``q`` outside ``[50, 100]`` or not a number; a batch of
            ``2**31`` values or more (indices are int32).
    """

    q: float = 99.99

    def __post_init__(self):
        if not (_is_num(self.q) and 50 <= self.q <= 100):
            raise ValueError(f"PercentileObserver(q={self.q!r}): expected a number in [50, 100]")

    def batch_range(self, x, row_mask=None):
        xp = namespace(x)
        acc = accumulation_dtype(xp)
        xr, keep = _rows(x, row_mask, xp)
        size = math.prod(xr.shape)
        if size == 0:
            zero = xp.zeros((), dtype=acc)
            return zero, zero
        if size >= 2**31:
            raise ValueError(f"PercentileObserver: a batch of {size} values (x of shape "
                             f"{tuple(x.shape)}) is too large; split it into batches of "
                             "fewer than 2**31 values")
        # Every index read lies within kk of its end (N <= size; +2 for i + 1 and rounding).
        kk = min(size, math.ceil((size - 1) * (100 - Fraction(repr(float(self.q)))) / 100) + 2)
        flat = xp.reshape(xr, (-1,))
        if keep is None:
            low, high = _ends(flat, kk, xp)
        else:
            # Padding goes to the far end of each side: +inf among the low values, -inf
            # among the high ones.
            inf = xp.asarray(float("inf"), dtype=xr.dtype)
            kf = xp.reshape(xp.broadcast_to(keep, xr.shape), (-1,))
            low = _ends(xp.where(kf, flat, inf), kk, xp)[0]
            high = _ends(xp.where(kf, flat, -inf), kk, xp)[1]
        n = _kept_rows(xr, keep, acc, xp) * float(xr.shape[1])
        last = xp.maximum(n - 1.0, xp.zeros_like(n))
        out = []
        for p, ends, from_top in ((100.0 - float(self.q), low, False),
                                  (float(self.q), high, True)):
            pos = last * (p / 100.0)
            i = xp.floor(pos)
            f = pos - i
            j = xp.minimum(i + 1.0, last)
            idx = xp.stack([i, j])
            if from_top:  # ascending index i is descending index N - 1 - i
                idx = last - idx
            idx = xp.astype(xp.clip(idx, 0.0, float(kk - 1)), xp.int32)
            # Without kept values both read padding: use 0 (weight 0 in combine).
            vi, vj = (xp.where(n > 0, xp.astype(t, acc), xp.zeros((1,), dtype=acc))
                      for t in (xp.take(ends, idx[0:1]), xp.take(ends, idx[1:2])))
            out.append(xp.where(f > 0, vi + f * (vj - vi), vi)[0])
        return out[0], out[1]

    def combine(self, a, b):
        return _weighted_mean(a, b, namespace(a[0], b[0]))


@dataclass(frozen=True)
class MSEObserver:
    """Per batch the shrunk range with the smallest quantize-dequantize squared error.

    Candidates ``[p lo, p hi]`` for the shrink factors ``p`` of
    :func:`arrayquant.affine.search.shrink_factors` (1.0, then down to
    ``min_shrink`` in ``grid`` steps), ``[lo, hi]`` the batch's min and max. Each
    candidate's scale and zero point come from :func:`arrayquant.qparams_from_range`
    (``int{bits}``, ``symmetric``), the batch is quantized and dequantized with
    :func:`arrayquant.quantize_with` / :func:`arrayquant.dequantize_with` (all
    candidates at once, one row each), and the squared error over the non-padding
    values is summed; the first candidate with the smallest error wins, so the range
    is never worse than min/max on its batch. Batches combine as the row-count
    weighted mean. Use the same ``bits`` and ``symmetric`` in
    :func:`activation_qparams`. Cost: ``grid`` quantize-dequantize passes per batch
    and layer, and ``grid`` float copies of the batch in memory.

    Args:
        bits: 2, 4, 8 (default) or 16.
        symmetric: score symmetric candidates (default False).
        grid: number of shrink factors (default 20).
        min_shrink: the smallest factor, in ``(0, 1]`` (default 0.5).

    Raises:
        ValueError: a field outside its range.
    """

    bits: int = 8
    symmetric: bool = False
    grid: int = 20
    min_shrink: float = 0.5

    def __post_init__(self):
        if self.bits not in (2, 4, 8, 16) or isinstance(self.bits, bool):
            raise ValueError(f"MSEObserver(bits={self.bits!r}): expected 2, 4, 8 or 16")
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"MSEObserver(symmetric={self.symmetric!r}): expected a bool")
        if not (isinstance(self.grid, int) and not isinstance(self.grid, bool)
                and self.grid >= 1):
            raise ValueError(f"MSEObserver(grid={self.grid!r}): expected an int >= 1")
        if not (_is_num(self.min_shrink) and 0 < self.min_shrink <= 1):
            raise ValueError(f"MSEObserver(min_shrink={self.min_shrink!r}): expected a "
                             "number in (0, 1]")

    def errors(self, x, row_mask=None):
        """Every candidate's range and squared error on this batch, in candidate order.

        Returns ``(lo, hi, err)``, arrays of shape ``(grid,)`` (``lo`` and ``hi`` in the
        accumulation dtype); for tests and diagnostics.
        """
        xp = namespace(x)
        acc = accumulation_dtype(xp)
        xr, keep = _rows(x, row_mask, xp)
        cdt = float_dtype(xp, "float64" if dtype_name(xr.dtype) == "float64" else "float32")
        xr = xp.astype(xr, cdt)
        lo, hi = _min_max(xr, keep, cdt, xp)
        n = _kept_rows(xr, keep, acc, xp)
        zero = xp.zeros((), dtype=cdt)
        lo = xp.where(n > 0, lo, zero)
        hi = xp.where(n > 0, hi, zero)
        p = xp.asarray(shrink_factors(self.grid, float(self.min_shrink)), dtype=cdt)
        lo_c, hi_c = lo * p, hi * p
        size = math.prod(xr.shape)
        if size == 0:
            err = xp.zeros((self.grid,), dtype=acc)
        else:
            # Padding becomes 0, which every candidate represents exactly (error 0).
            xm = xp.reshape(xr if keep is None else xp.where(keep, xr, zero), (1, size))
            xg = xp.broadcast_to(xm, (self.grid, size))
            dtype = f"int{self.bits}"
            s, z = qparams_from_range(lo_c[:, None], hi_c[:, None], dtype, self.symmetric)
            e = xg - dequantize_with(quantize_with(xg, s, z, dtype), s, z, dtype=cdt)
            err = xp.sum(xp.astype(e * e, acc), axis=1)
        return xp.astype(lo_c, acc), xp.astype(hi_c, acc), err

    def batch_range(self, x, row_mask=None):
        lo, hi, err = self.errors(x, row_mask)
        xp = namespace(err)
        best = xp.reshape(xp.argmin(err), (1,))  # the first of equal errors
        return xp.take(lo, best)[0], xp.take(hi, best)[0]

    def combine(self, a, b):
        return _weighted_mean(a, b, namespace(a[0], b[0]))


def activation_qparams(stats: LayerStats, act_dtype="int8", symmetric: bool = False, *,
                       scale_dtype="float32"):
    """Static activation scale and zero point from recorded statistics.

    The range is the observer's (``stats.range_min``, ``stats.range_max``), or,
    for statistics recorded without an observer, the min of the per-feature
    minima and the max of the per-feature maxima (min/max over everything).
    It is rounded to float32 (a min/max range is a float32 activation value, so
    exactly) and passed to :func:`arrayquant.qparams_from_range`, so the formulas
    are the library's: asymmetric ranges extended to hold 0, the zero point
    rounded and clipped into range, symmetric ``max(r_max, -r_min)``. Zero is
    exactly representable.

    Returns:
        ``(scale, zero_point)``, 0-d arrays (``zero_point`` None when
        ``symmetric``), ready for ``LinearWeight(act_scale=, act_zero_point=,
        act_qtype=act_dtype)``.

    Raises:
        TypeError: ``stats`` not a LayerStats.
        ValueError: unknown ``act_dtype``; symmetric with an unsigned type; eager
            only: a range that is not finite (no row was recorded).

    Example:
        >>> import numpy as np
        >>> from arrayquant.stats.layer import record
        >>> s, z = activation_qparams(record(np.float32([[-1.0, 0.5], [3.0, 2.0]])))
        >>> round(float(s) * 255, 5), int(z)
        (4.0, -64)
    """
    if not isinstance(stats, LayerStats):
        raise TypeError(f"activation_qparams needs LayerStats; got {type(stats).__name__}")
    as_qtype(act_dtype)
    xp = namespace(stats.sum)
    if stats.range_min is None:
        lo, hi = xp.min(stats.min), xp.max(stats.max)
    else:
        lo, hi = stats.range_min, stats.range_max
    f32 = float_dtype(xp, "float32")
    return qparams_from_range(xp.astype(lo, f32), xp.astype(hi, f32), act_dtype, symmetric,
                              scale_dtype=scale_dtype)
