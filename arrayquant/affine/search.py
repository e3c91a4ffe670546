"""Calibration methods that search: :class:`MSESearch` and :class:`HQQ` (data-free).

Both return ``(scale, zero_point)`` per block (the ``"params"`` output of the
protocol in :mod:`arrayquant.affine.calibrate`). Every candidate is built by
:func:`~arrayquant.affine.params.params_from_range` and scored by
:func:`~arrayquant.affine.calibrate.block_sse`, the squared error of the
library's own quantize and dequantize summed in a fixed order. A candidate
replaces the best so far only when its error is strictly smaller, so the first
candidate, min/max, wins ties and neither method is ever worse than
:class:`~arrayquant.affine.calibrate.MinMax` in squared error per block.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np  # only for np.errstate

from arrayquant._backend import exact_divide, exact_reciprocal, scale_limits
from arrayquant.affine.calibrate import block_sse, block_sum, blocks_last, from_blocks_last
from arrayquant.affine.params import clip, params_from_range, store_scale
from arrayquant.blocking import Blocking

__all__ = ["HQQ", "MSESearch", "hqq_step", "refit_scale", "shrink_factors"]


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise ValueError(what)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def shrink_factors(grid: int, min_shrink: float) -> tuple[float, ...]:
    """``1 - (1 - min_shrink) * i / (grid - 1)`` for ``i = 0 .. grid - 1`` (1.0 first)."""
    if grid == 1:
        return (1.0,)
    return tuple(1.0 - (1.0 - min_shrink) * i / (grid - 1) for i in range(grid))


@dataclass(frozen=True)
class MSESearch:
    """The range of each block that minimizes its squared quantization error, on a grid.

    Candidates, in this order: for each shrink factor ``p`` of
    :func:`shrink_factors` (1.0, then down to ``min_shrink`` in ``grid``
    steps), the range ``[p * min(x), p * max(x)]`` through the usual
    parameter formulas; for asymmetric with ``search_zero_point``, also its
    zero point moved by ``d = -r .. r`` codes (``d = 0`` first, then -1, +1,
    -2, ...; clipped into range), which shifts the represented window by
    ``d * s``. Each candidate's error ``sum((x - x_hat)^2)`` over the block is
    computed with the library's quantize / dequantize and summed in a fixed
    order, so NumPy and JAX choose the same candidate; a later candidate wins
    only with a strictly smaller error. Cost: ``grid * (2 r + 1)``
    quantize-dequantize passes (symmetric: ``grid``).

    Args:
        grid: number of shrink factors (default 20; 1 searches only the zero point).
        min_shrink: smallest factor, in ``(0, 1]`` (default 0.5).
        search_zero_point: also search the zero point (asymmetric only).
        zero_point_radius: ``r``, the largest move of the zero point in codes (default 1).

    Raises:
        ValueError: a field outside its range.
    """

    grid: int = 20
    min_shrink: float = 0.5
    search_zero_point: bool = True
    zero_point_radius: int = 1
    output = "params"

    def __post_init__(self):
        _check(_is_int(self.grid) and self.grid >= 1,
               f"MSESearch(grid={self.grid!r}): expected an int >= 1")
        _check(_is_num(self.min_shrink) and 0 < self.min_shrink <= 1,
               f"MSESearch(min_shrink={self.min_shrink!r}): expected a number in (0, 1]")
        _check(isinstance(self.search_zero_point, bool),
               f"MSESearch(search_zero_point={self.search_zero_point!r}): expected a bool")
        _check(_is_int(self.zero_point_radius) and self.zero_point_radius >= 0,
               f"MSESearch(zero_point_radius={self.zero_point_radius!r}): expected an int >= 0")

    def __call__(self, xv, b: Blocking, qt, symmetric, sdt, cdt, xp):
        xf = blocks_last(xv, b, xp)
        rmin = xp.min(xf, axis=-1, keepdims=True)
        rmax = xp.max(xf, axis=-1, keepdims=True)
        r = self.zero_point_radius if (self.search_zero_point and not symmetric) else 0
        moves = [0] + [d for k in range(1, r + 1) for d in (-k, k)]
        best = None
        for p in shrink_factors(self.grid, self.min_shrink):
            s, z0 = params_from_range(rmin * p, rmax * p, qt, symmetric, sdt, cdt, xp)
            for d in moves:
                z = None if z0 is None else (
                    z0 if d == 0 else clip(z0 + float(d), float(qt.qmin), float(qt.qmax), xp))
                err = block_sse(xf, s, z, qt, cdt, xp)
                if best is None:
                    best = (err, s, z)
                    continue
                better = err < best[0]
                best = (xp.where(better, err, best[0]), xp.where(better, s, best[1]),
                        None if z is None else xp.where(better, z, best[2]))
        _, s, z = best
        return from_blocks_last(s, b, xp), None if z is None else from_blocks_last(z, b, xp)


def hqq_step(xf, s_c, inv, z, beta: float, lp_norm: float, qt, xp):
    """One half-quadratic update of HQQ's (float) zero point, per block (last axis).

    With HQQ's quantizer ``W_q = clip(round(x / s + z))`` and ``W_r = s (W_q - z)``:
    ``W_e = shrink_p(x - W_r, beta)``, the generalized soft threshold
    ``sign(e) max(|e| - |e|^(p - 1) / beta, 0)``, then
    ``z = mean(W_q - (x - W_e) / s)`` over the block. ``1 / s`` is ``inv``.
    """
    lo, hi = float(qt.qmin), float(qt.qmax)
    wq = clip(xp.round(xf * inv + z), lo, hi, xp)
    e = xf - (wq - z) * s_c
    a = xp.abs(e)
    safe = xp.where(a > 0, a, xp.ones_like(a))  # |e|^(p - 1) is inf at 0; shrink(0) = 0
    thresh = (1.0 / beta) if lp_norm == 1 else xp.pow(safe, lp_norm - 1.0) * (1.0 / beta)
    we = xp.where(a > thresh, xp.sign(e) * (a - thresh), xp.zeros_like(e))
    n = xf.shape[-1]
    return block_sum(wq - (xf - we) * inv, xp) * (1.0 / n)


@dataclass(frozen=True)
class HQQ:
    """Half-quadratic quantization (HQQ, Badri and Shaji 2023): data-free zero points.

    Starts from the min/max scale and zero point and runs HQQ's proximal solver
    (:func:`hqq_step`: an ``l_p`` error, ``p = lp_norm < 1``, whose large
    errors are shrunk away before the zero point is refitted as a mean), with
    ``beta`` growing by ``kappa`` each iteration. The scale stays the min/max
    one, as in HQQ. arrayquant stores integer zero points, so after every
    iteration the float zero point is rounded to the nearest integer and
    clipped into range, and that candidate is scored by its squared error
    (:func:`~arrayquant.affine.calibrate.block_sse`); the block keeps the best
    one, min/max included (HQQ instead stops at the first iteration whose mean
    ``|error|`` over the whole tensor does not improve: a data-dependent stop
    that jit cannot express per block). Asymmetric only: a symmetric
    quantization has no zero point to optimize.

    The iteration itself uses ``xp.pow`` and a block mean; both are computed
    the same way on every backend except that ``pow`` may differ in the last
    bit between NumPy and XLA, which changes a zero point only when HQQ's
    float zero point lies within float rounding of a half-integer.

    Args:
        iters: iterations (default 20, as HQQ).
        lp_norm: ``p`` in ``(0, 1]`` (default 0.7, as HQQ).
        beta: initial penalty (default 10, as HQQ).
        kappa: growth of ``beta`` per iteration, ``>= 1`` (default 1.01, as HQQ).

    Raises:
        ValueError: a field outside its range; ``symmetric=True``.
    """

    iters: int = 20
    lp_norm: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01
    output = "params"

    def __post_init__(self):
        _check(_is_int(self.iters) and self.iters >= 1,
               f"HQQ(iters={self.iters!r}): expected an int >= 1")
        _check(_is_num(self.lp_norm) and 0 < self.lp_norm <= 1,
               f"HQQ(lp_norm={self.lp_norm!r}): expected a number in (0, 1]")
        _check(_is_num(self.beta) and self.beta > 0,
               f"HQQ(beta={self.beta!r}): expected a number > 0")
        _check(_is_num(self.kappa) and self.kappa >= 1,
               f"HQQ(kappa={self.kappa!r}): expected a number >= 1")

    def __call__(self, xv, b: Blocking, qt, symmetric, sdt, cdt, xp):
        if symmetric:
            raise ValueError(
                "HQQ optimizes the zero point, and symmetric=True has none; use "
                "symmetric=False, or method=MSESearch() for a symmetric search")
        xf = blocks_last(xv, b, xp)
        rmin = xp.min(xf, axis=-1, keepdims=True)
        rmax = xp.max(xf, axis=-1, keepdims=True)
        s, z0 = params_from_range(rmin, rmax, qt, False, sdt, cdt, xp)
        s_c = xp.astype(s, cdt)
        inv = exact_reciprocal(s_c, xp)
        best_err, best_s, best_z = block_sse(xf, s, z0, qt, cdt, xp), s, z0
        z, beta = z0, float(self.beta)
        lo, hi = float(qt.qmin), float(qt.qmax)
        with np.errstate(over="ignore", invalid="ignore"):
            for _ in range(self.iters):
                z = hqq_step(xf, s_c, inv, z, beta, float(self.lp_norm), qt, xp)
                beta *= self.kappa
                zi = clip(xp.round(z), lo, hi, xp)
                for sc in (s, refit_scale(xf, s_c, inv, z, zi, qt, sdt, cdt, xp)):
                    err = block_sse(xf, sc, zi, qt, cdt, xp)
                    better = err < best_err
                    best_err = xp.where(better, err, best_err)
                    best_s = sc if best_s is None else xp.where(better, sc, best_s)
                    best_z = xp.where(better, zi, best_z)
        return from_blocks_last(best_s, b, xp), from_blocks_last(best_z, b, xp)


def refit_scale(xf, s_c, inv, z, zi, qt, sdt, cdt, xp):
    """The least-squares scale for HQQ's codes with the integer zero point ``zi``.

    The codes ``W_q`` of HQQ's quantizer with the float zero point ``z`` are kept,
    and ``s' = sum(x (W_q - zi)) / sum((W_q - zi)^2)`` per block (the old scale
    where the denominator is 0), clipped to the scale limits and stored rounded up.
    """
    lo, hi = scale_limits(sdt, cdt)
    wq = clip(xp.round(xf * inv + z), float(qt.qmin), float(qt.qmax), xp) - zi
    num = block_sum(xf * wq, xp)
    den = block_sum(wq * wq, xp)
    ok = den > 0
    s_new = xp.where(ok, exact_divide(num, xp.where(ok, den, xp.ones_like(den)), xp), s_c)
    return store_scale(clip(s_new, lo, hi, xp), hi, sdt, cdt, xp)
