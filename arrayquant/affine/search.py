"""Calibration methods that search: :class:`MSESearch` and :class:`HQQ` (data-free).

Both return ``(scale, zero_point)`` per block (the ``"params"`` output of the
protocol in :mod:`arrayquant.affine.calibrate`). Every candidate is built by
:func:`~arrayquant.affine.params.params_from_range` and scored by
:func:`~arrayquant.affine.calibrate.block_sse`, the squared error of the
library's own quantize and dequantize summed in a fixed order. A candidate
replaces the best so far only when its error is strictly smaller, so the first
candidate, min/max, wins ties and neither method is ever worse than
:class:`~arrayquant.affine.calibrate.MinMax` in squared error per block.

Speed: on NumPy both run a fast path (:mod:`arrayquant.affine._search_numpy`,
the same bits with far fewer passes over memory); under ``jax.jit`` the
candidates (MSESearch's shrink factors, HQQ's iterations) run in one
``lax.fori_loop`` (:func:`repeat`), so compile time does not grow with their number.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np  # only for np.errstate

from arrayquant._backend import (
    exact_divide,
    exact_reciprocal,
    is_concrete,
    is_jax,
    is_numpy,
    scale_limits,
)
from arrayquant.affine._search_numpy import hqq_numpy, sse_numpy
from arrayquant.affine.calibrate import block_sse, block_sum, blocks_last, from_blocks_last
from arrayquant.affine.params import clip, params_from_range, store_scale
from arrayquant.blocking import Blocking

__all__ = ["HQQ", "MSESearch", "hqq_step", "refit_scale", "shrink_factors"]

# Tests flip this to compare the NumPy fast path (arrayquant.affine._search_numpy)
# with the generic one.
USE_NUMPY_FAST_PATH = True


def use_numpy_fast_path(xp) -> bool:
    return USE_NUMPY_FAST_PATH and is_numpy(xp)


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
        lo, hi = float(qt.qmin), float(qt.qmax)
        shrinks = shrink_factors(self.grid, self.min_shrink)

        def group(p):
            """The scale and the zero point of each move for the shrink factor ``p``."""
            s, z0 = params_from_range(rmin * p, rmax * p, qt, symmetric, sdt, cdt, xp)
            return s, [None] if z0 is None else [
                z0 if d == 0 else clip(z0 + float(d), lo, hi, xp) for d in moves]

        if use_numpy_fast_path(xp):
            groups = [group(p) for p in shrinks]
            errs = iter(sse_numpy(xf, groups, qt, cdt))
            best = None
            for s, zs in groups:
                for z in zs:
                    best = _keep_better(best, next(errs), s, z, xp)
        else:
            # Every candidate's parameters at once, stacked on a new first axis (the same
            # operations per block: p * r_min rounds p to cdt either way), then one loop
            # over the shrink factors.
            table = xp.reshape(xp.asarray(shrinks, dtype=cdt), (-1,) + (1,) * rmin.ndim)
            s_all, zs_all = group(table)
            tables = [s_all] + ([] if zs_all[0] is None else zs_all)

            def body(i, row, best):
                s, zs = row[0], row[1:] or [None]
                for z in zs:
                    best = _keep_better(best, block_sse(xf, s, z, qt, cdt, xp), s, z, xp)
                return best

            first = body(0, [t[0, ...] for t in tables], None)
            best = repeat(xf, 1, len(shrinks), body, first, xp, tables)
        _, s, z = best
        return from_blocks_last(s, b, xp), None if z is None else from_blocks_last(z, b, xp)


def _keep_better(best, err, s, z, xp):
    """``(err, s, z)`` where ``err`` is strictly smaller than the best so far's, per block."""
    if best is None:
        return err, s, z
    better = err < best[0]
    return (xp.where(better, err, best[0]), xp.where(better, s, best[1]),
            None if z is None else xp.where(better, z, best[2]))


def repeat(x, start: int, stop: int, body, carry, xp, tables=()):
    """``carry = body(i, [t[i] for t in tables], carry)`` for ``i`` in ``range(start, stop)``.

    Under ``jax.jit`` (``x`` a tracer) one ``lax.fori_loop``: the body is traced and
    compiled once, not once per candidate, and runs the same operations. Elsewhere
    a Python loop (eager JAX then keeps its checks on concrete values).
    """
    if is_jax(xp) and not is_concrete(x):
        from arrayquant._backend.jaxtools import fori_loop

        return fori_loop(start, stop, body, carry, tables)
    for i in range(start, stop):
        carry = body(i, [t[i, ...] for t in tables], carry)
    return carry


def hqq_step(xf, s_c, inv, z, beta: float, lp_norm: float, qt, xp):
    """One half-quadratic update of HQQ's (float) zero point, per block (last axis).

    With HQQ's quantizer ``W_q = clip(round(x / s + z))`` and ``W_r = s (W_q - z)``:
    ``W_e = shrink_p(x - W_r, beta)``, the generalized soft threshold
    ``sign(e) max(|e| - |e|^(p - 1) / beta, 0)``, then
    ``z = mean(W_q - (x - W_e) / s)`` over the block. ``1 / s`` is ``inv``.
    """
    return _hqq_step(xf, s_c, inv, z, 1.0 / beta, lp_norm, qt, xp)


def _hqq_step(xf, s_c, inv, z, inv_beta, lp_norm: float, qt, xp):
    # inv_beta: 1 / beta as a Python float or a 0-d array in the compute dtype (the
    # same value: a Python float meets float32 arrays rounded to float32).
    lo, hi = float(qt.qmin), float(qt.qmax)
    wq = clip(xp.round(xf * inv + z), lo, hi, xp)
    e = xf - (wq - z) * s_c
    a = xp.abs(e)
    safe = xp.where(a > 0, a, xp.ones_like(a))  # |e|^(p - 1) is inf at 0; shrink(0) = 0
    thresh = inv_beta if lp_norm == 1 else xp.pow(safe, lp_norm - 1.0) * inv_beta
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

    def betas(self) -> list[float]:
        """``beta`` of each iteration: ``beta * kappa**i``, multiplied up in Python floats."""
        out = [float(self.beta)]
        for _ in range(self.iters - 1):
            out.append(out[-1] * self.kappa)
        return out

    def __call__(self, xv, b: Blocking, qt, symmetric, sdt, cdt, xp):
        if symmetric:
            raise ValueError(
                "HQQ optimizes the zero point, and symmetric=True has none; use "
                "symmetric=False, or method=MSESearch() for a symmetric search")
        xf = blocks_last(xv, b, xp)
        rmin = xp.min(xf, axis=-1, keepdims=True)
        rmax = xp.max(xf, axis=-1, keepdims=True)
        s, z0 = params_from_range(rmin, rmax, qt, False, sdt, cdt, xp)
        if use_numpy_fast_path(xp):
            best_s, best_z = hqq_numpy(xf, s, z0, self, qt, sdt, cdt, xp)
            return from_blocks_last(best_s, b, xp), from_blocks_last(best_z, b, xp)
        s_c = xp.astype(s, cdt)
        inv = exact_reciprocal(s_c, xp)
        lo, hi = float(qt.qmin), float(qt.qmax)
        p = float(self.lp_norm)
        inv_betas = xp.asarray([1.0 / beta for beta in self.betas()], dtype=cdt)

        def body(i, row, carry):
            z, best_err, best_s, best_z = carry
            z = _hqq_step(xf, s_c, inv, z, row[0], p, qt, xp)
            zi = clip(xp.round(z), lo, hi, xp)
            for sc in (s, refit_scale(xf, s_c, inv, z, zi, qt, sdt, cdt, xp)):
                best_err, best_s, best_z = _keep_better(
                    (best_err, best_s, best_z), block_sse(xf, sc, zi, qt, cdt, xp), sc, zi, xp)
            return z, best_err, best_s, best_z

        with np.errstate(over="ignore", invalid="ignore"):
            init = (z0, block_sse(xf, s, z0, qt, cdt, xp), s, z0)
            _, _, best_s, best_z = repeat(xf, 0, self.iters, body, init, xp, [inv_betas])
        return from_blocks_last(best_s, b, xp), from_blocks_last(best_z, b, xp)


def refit_scale(xf, s_c, inv, z, zi, qt, sdt, cdt, xp):
    """The least-squares scale for HQQ's codes with the integer zero point ``zi``.

    The codes ``W_q`` of HQQ's quantizer with the float zero point ``z`` are kept,
    and ``s' = sum(x (W_q - zi)) / sum((W_q - zi)^2)`` per block (the old scale
    where the denominator is 0), clipped to the scale limits and stored rounded up.
    """
    wq = clip(xp.round(xf * inv + z), float(qt.qmin), float(qt.qmax), xp) - zi
    return scale_from_sums(block_sum(xf * wq, xp), block_sum(wq * wq, xp), s_c, sdt, cdt, xp)


def scale_from_sums(num, den, s_c, sdt, cdt, xp):
    """``num / den`` per block (``s_c`` where ``den`` is 0), clipped to the scale limits
    and stored rounded up: the end of :func:`refit_scale`."""
    lo, hi = scale_limits(sdt, cdt)
    ok = den > 0
    s_new = xp.where(ok, exact_divide(num, xp.where(ok, den, xp.ones_like(den)), xp), s_c)
    return store_scale(clip(s_new, lo, hi, xp), hi, sdt, cdt, xp)
