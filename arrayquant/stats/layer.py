"""``LayerStats``: what one linear layer's inputs looked like over calibration data.

Data-aware methods (GPTQ, AWQ, SmoothQuant, bias correction, static activation
scales) need statistics of the activations that enter a linear layer. They are
kept here as sums, so that batches stream in one at a time and merge in any
order (:func:`merge`), on NumPy and JAX alike (under ``jax.jit`` too):

- ``count``: the number of rows (tokens) recorded (padding rows dropped);
- ``gram``: ``X^T X``, ``(k, k)`` (``None`` when not recorded);
- ``sum``, ``abs_sum``: per input feature, ``sum x`` and ``sum |x|``;
- ``abs_max``, ``min``, ``max``: per input feature;
- ``range_min``, ``range_max``: the per-tensor activation range that the
  ``observer`` (a static activation-scale observer) combined over batches;
  ``None`` without an observer.

Sums are accumulated in float64 where the namespace has it enabled (NumPy; JAX
with ``jax_enable_x64``), else float32.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from arrayquant._backend import float_dtype, is_jax, namespace

__all__ = ["LayerStats", "accumulation_dtype", "merge", "record"]


def accumulation_dtype(xp):
    """float64 where the namespace supports it (NumPy, JAX with x64), else float32."""
    if is_jax(xp):
        import jax

        if not jax.config.jax_enable_x64:
            return float_dtype(xp, "float32")
    return float_dtype(xp, "float64")


@dataclass(frozen=True, eq=False)
class LayerStats:
    """Streaming statistics of one linear layer's input ``x`` of shape ``(rows, k)``.

    A pytree under JAX (array fields are children; ``observer`` is static), so a
    jitted calibration step can return a dict of them. Build with :func:`record`,
    combine with :func:`merge`.
    """

    count: Any
    gram: Any
    sum: Any
    abs_sum: Any
    abs_max: Any
    min: Any
    max: Any
    range_min: Any = None
    range_max: Any = None
    observer: Any = None

    _children = ("count", "gram", "sum", "abs_sum", "abs_max", "min", "max",
                 "range_min", "range_max")

    def _static(self):
        return self.observer

    @classmethod
    def _from_parts(cls, observer, children) -> LayerStats:
        return cls(*children, observer=observer)

    @property
    def features(self) -> int:
        """``k``, the number of input features."""
        return int(self.sum.shape[-1])

    @property
    def mean(self):
        """Per-feature mean of ``x``."""
        return self.sum / self.count

    @property
    def abs_mean(self):
        """Per-feature mean of ``|x|`` (AWQ's activation magnitude)."""
        return self.abs_sum / self.count

    @property
    def hessian(self):
        """``X^T X / count``: the layer-wise loss's Hessian up to a factor 2."""
        if self.gram is None:
            raise ValueError("these LayerStats were recorded without the Gram matrix "
                             "(gram=False); record with gram=True for GPTQ and AWQ")
        return self.gram / self.count

    def scaled(self, m) -> LayerStats:
        """The statistics of ``x * m`` (``m`` a ``(k,)`` vector of positive factors).

        What a layer sees after its input is multiplied per feature (AWQ and
        SmoothQuant scales, see :class:`arrayquant.LinearWeight`). The observer's
        per-tensor range cannot be rescaled per feature and is dropped.
        """
        xp = namespace(self.sum, m)
        m = xp.astype(m, self.sum.dtype)
        gram = None if self.gram is None else self.gram * m[:, None] * m[None, :]
        return replace(self, gram=gram, sum=self.sum * m, abs_sum=self.abs_sum * m,
                       abs_max=self.abs_max * m, min=self.min * m, max=self.max * m,
                       range_min=None, range_max=None)


def _rows(x, xp):
    k = x.shape[-1]
    return xp.reshape(x, (-1, k))


def record(x, row_mask=None, *, gram: bool = True, observer=None) -> LayerStats:
    """The statistics of one batch ``x`` of shape ``(..., k)``.

    Args:
        x: the layer's input; every axis but the last is a row axis.
        row_mask: ``None`` (every row counts) or a boolean / 0-1 array with one
            entry per row (``prod(x.shape[:-1])``): rows where it is 0 (padding
            tokens) are left out of every statistic.
        gram: record ``X^T X`` (GPTQ and AWQ need it; ``k * k`` numbers).
        observer: a static activation-range observer (see
            :mod:`arrayquant.stats.observers`) or None.

    Raises:
        ValueError: ``row_mask`` does not have one entry per row.
    """
    xp = namespace(x)
    acc = accumulation_dtype(xp)
    xr = xp.astype(_rows(x, xp), acc)
    n, k = xr.shape
    if row_mask is None:
        keep = None
        count = xp.asarray(float(n), dtype=acc)
        xm = xr
    else:
        rm = xp.reshape(xp.asarray(row_mask), (-1,))
        if rm.shape[0] != n:
            raise ValueError(
                f"row_mask has {rm.shape[0]} entries, but x of shape {tuple(x.shape)} has "
                f"{n} rows (every axis but the last); expected one entry per row")
        keep = xp.reshape(rm != 0, (n, 1))
        xm = xp.where(keep, xr, xp.zeros((), dtype=acc))
        count = xp.sum(xp.astype(keep, acc))
    big = xp.asarray(float("inf"), dtype=acc)
    lo_src = xr if keep is None else xp.where(keep, xr, big)
    hi_src = xr if keep is None else xp.where(keep, xr, -big)
    ax = xp.abs(xm)
    g = xp.matmul(xp.permute_dims(xm, (1, 0)), xm) if gram else None
    stats = LayerStats(
        count=count, gram=g, sum=xp.sum(xm, axis=0), abs_sum=xp.sum(ax, axis=0),
        abs_max=xp.max(ax, axis=0) if n else xp.zeros((k,), dtype=acc),
        min=xp.min(lo_src, axis=0) if n else xp.full((k,), float("inf"), dtype=acc),
        max=xp.max(hi_src, axis=0) if n else xp.full((k,), -float("inf"), dtype=acc),
    )
    if observer is not None:
        lo, hi = observer.batch_range(x, row_mask)
        stats = replace(stats, range_min=lo, range_max=hi, observer=observer)
    return stats


def merge(a: LayerStats | None, b: LayerStats) -> LayerStats:
    """The statistics of both batches (``a`` may be None: the first batch).

    Raises:
        ValueError: different feature counts, one with a Gram matrix and one
            without, or different observers.
    """
    if a is None:
        return b
    if a.features != b.features:
        raise ValueError(f"cannot merge statistics of {a.features} and {b.features} features")
    if (a.gram is None) != (b.gram is None):
        raise ValueError("cannot merge statistics recorded with and without the Gram matrix")
    if a.observer != b.observer:
        raise ValueError(f"cannot merge statistics of different observers: {a.observer!r} "
                         f"and {b.observer!r}")
    xp = namespace(a.sum, b.sum)
    out = LayerStats(
        count=a.count + b.count,
        gram=None if a.gram is None else a.gram + b.gram,
        sum=a.sum + b.sum, abs_sum=a.abs_sum + b.abs_sum,
        abs_max=xp.maximum(a.abs_max, b.abs_max),
        min=xp.minimum(a.min, b.min), max=xp.maximum(a.max, b.max),
        observer=a.observer,
    )
    if a.observer is not None:
        lo, hi = a.observer.combine((a.range_min, a.range_max, a.count),
                                    (b.range_min, b.range_max, b.count))
        out = replace(out, range_min=lo, range_max=hi)
    return out
