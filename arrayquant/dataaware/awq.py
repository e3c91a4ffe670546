"""AWQ: activation-aware weight quantization (Lin et al. 2023), from layer statistics.

A linear layer ``y = x @ W.T`` gives the same output as ``(x / s) @ (W * s).T``
for any positive per-input-feature factor ``s``. Quantizing ``W * s`` instead of
``W`` shrinks the relative rounding error of the columns that ``s`` scales up;
AWQ scales up the columns whose inputs are large on average. This module:

1. **Scale search** (:func:`awq_scales`): ``s = a ** alpha`` with ``a`` the
   per-feature mean ``|x|`` (``stats.abs_mean``, floored at 1e-4), normalized
   by ``sqrt(max(s) * min(s))``, for ``alpha = i / grid``, ``i = 0 .. grid-1``
   (``alpha = 0`` is ``s = 1``, plain round-to-nearest). Each candidate is
   scored by the layer's output error on the calibration data, computed from
   the Gram matrix alone: with ``E = W - Q(W * s) / s`` (``Q`` the min/max
   quantize-dequantize of the chosen granularity), ``loss = sum over output rows
   of e^T H e = sum((E @ H) * E)``, ``H = X^T X / n``. The smallest loss wins
   (ties: the smaller alpha).
2. **Clip search**: for every block (a group of one output row, or a whole
   row, or the tensor) the range ``[max(lo, -p a), min(hi, p a)]`` (``a =
   max(-lo, hi)``) for ``p = 1, ..., min_shrink`` in ``clip_grid`` steps, scored
   by the block's own output error ``e_g^T H_g e_g`` with ``H_g`` the group's
   diagonal block of the (scaled) Hessian (the groups' own input Gram
   matrices). ``p = 1`` is min/max and wins ties. The clip search runs for the
   ``clip_alphas`` alphas with the smallest loss in step 1 (clipping changes
   which alpha is best: it usually prefers a smaller one), and for ``s = 1``.
3. **Final choice**: of the best alpha of step 1 without clipping and the
   clip-searched candidates of step 2, the one with the smallest full output
   error ``sum((E @ H) * E)`` (ties: the earlier). ``s = 1`` is among them, so
   AWQ is never worse than round-to-nearest, with or without the clip search,
   in the layer-wise error on the calibration data.

The result is a :class:`~arrayquant.LinearWeight`: ``qweight`` holds ``W * s``
(ranges through :func:`arrayquant.qparams_from_range`, codes through
:func:`arrayquant.quantize_with`: the library's formulas and scale limits) and
``in_scale = 1 / s`` multiplies the activations at inference
(``x @ W.T == (x * in_scale) @ Q.T``). A model may instead fold ``in_scale``
into the operation before the layer (a LayerNorm's weight and bias, or the
previous linear layer's output rows and bias) and drop it from the
LinearWeight; layers that share an input then need one shared ``s``: pass all
their weights to :func:`awq_scales` and the result as ``scales=`` to :func:`awq`.

Cost per layer ``(n, k)``: ``grid + clip_alphas + 2`` quantize-dequantize
passes and products ``(n, k) @ (k, k)``, and ``(clip_alphas + 1) * clip_grid``
passes with batched products of ``n * k * gs`` for the clip searches. Runs on
NumPy and JAX (and under ``jax.jit``); the candidate chosen can differ between
backends only where two candidates' losses agree to float rounding, or where a
range lies within rounding of a zero-point tie (see docs/awq-smoothquant.md).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

from arrayquant._backend import compute_dtype, namespace
from arrayquant.affine.search import shrink_factors
from arrayquant.dataaware.layout import (
    block_loss,
    block_ranges,
    canonical,
    check_scales,
    check_stats,
    clip_shrink,
    fake_quantize,
    hessian_blocks,
    quantize_blocks,
    weight_layout,
)
from arrayquant.linear_weight import LinearWeight
from arrayquant.qarray import QArray
from arrayquant.qtypes import as_qtype

__all__ = ["AWQ", "awq", "awq_scales"]

_MIN_MEAN = 1e-4  # floor of mean |x| before the power (a feature that never fires)


def _check_int(v, lo: int, what: str) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{what}={v!r}: expected an int >= {lo}")


def _check_shrink(v, what: str) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
        raise ValueError(f"{what}={v!r}: expected a number in (0, 1]")


def _as_weights(w_or_ws):
    if isinstance(w_or_ws, (list, tuple)):
        if not w_or_ws:
            raise ValueError("awq_scales needs at least one weight")
        return list(w_or_ws)
    return [w_or_ws]


def _candidate_scales(a, grid: int, xp):
    """``s`` for ``alpha = i / grid``; the first (``alpha = 0``) is exactly one."""
    yield xp.ones_like(a)
    a = xp.maximum(a, xp.asarray(_MIN_MEAN, dtype=a.dtype))
    for i in range(1, grid):
        s = a ** (i / grid)
        yield s / xp.sqrt(xp.max(s) * xp.min(s))


def _rtn_error(wc, s, lay, q, xp, lo=None, hi=None):
    """``W - Q(W * s) / s`` (canonical) with min/max ranges, or the given ones."""
    ws = wc * s[None, :]
    if lo is None:
        lo, hi = block_ranges(ws, lay, xp)
    return wc - fake_quantize(ws, lo, hi, lay, q.qt, q.symmetric, q.sdt, xp) / s[None, :]


def _output_loss(e, h, xp):
    return xp.sum(xp.matmul(e, h) * e)


def _pick(best, cand, xp):
    """Elementwise: ``cand`` where its loss is strictly smaller (first item the loss)."""
    better = cand[0] < best[0]
    return tuple(xp.where(better, c, b) for b, c in zip(best, cand))


@dataclass(frozen=True)
class _Settings:
    qt: Any
    symmetric: bool
    sdt: Any
    grid: int
    clip: bool
    clip_alphas: int
    clip_grid: int
    min_shrink: float


def _clip_search(ws, hs, lay, q: _Settings, xp):
    """Per-block ranges of the scaled weight ``ws`` minimizing ``e_g^T H_g e_g``."""
    hb = hessian_blocks(hs, lay, xp)
    lo0, hi0 = block_ranges(ws, lay, xp)
    best = None
    for p in shrink_factors(q.clip_grid, q.min_shrink):
        lo, hi = clip_shrink(lo0, hi0, p, xp)
        e = ws - fake_quantize(ws, lo, hi, lay, q.qt, q.symmetric, q.sdt, xp)
        cand = (block_loss(e, hb, lay, xp), lo, hi)
        best = cand if best is None else _pick(best, cand, xp)
    return best[1], best[2]


def _ranges(wcs, lays, h, s, clip: bool, q: _Settings, xp):
    """``[lo, hi, lo, hi, ...]`` of every weight scaled by ``s``: min/max, or clip-searched."""
    out = []
    if clip:
        inv = 1.0 / s
        hs = h * inv[:, None] * inv[None, :]
    for wc, lay in zip(wcs, lays):
        ws = wc * s[None, :]
        out.extend(_clip_search(ws, hs, lay, q, xp) if clip else block_ranges(ws, lay, xp))
    return out


def _search(wcs, lays, h, a, q: _Settings, xp, scales=None):
    """``(s, [lo, hi] per weight)``: the steps of the module docstring.

    With ``scales`` given, only the ranges are chosen (clip search or min/max).
    """
    if scales is not None:
        cands = [scales] * (1 + q.clip)
        clips = [False, True][:len(cands)]
    else:
        trial = list(_candidate_scales(a, q.grid, xp))
        losses = xp.stack([
            sum(_output_loss(_rtn_error(wc, s, lay, q, xp), h, xp) for wc, lay in
                zip(wcs, lays)) for s in trial])
        stacked = xp.stack(trial)
        if not q.clip:  # the first smallest loss (ties: the smaller alpha)
            best = (losses[0], trial[0])
            for i in range(1, q.grid):
                best = _pick(best, (losses[i], trial[i]), xp)
            return best[1], _ranges(wcs, lays, h, best[1], False, q, xp)
        order = xp.argsort(losses, stable=True)

        def nth(j):
            return xp.take(stacked, xp.reshape(order[j], (1,)), axis=0)[0, :]

        top = min(q.clip_alphas, q.grid)
        cands = [nth(0)] + [nth(j) for j in range(top)] + [trial[0]]
        clips = [False] + [True] * top + [True]
    best = None
    for s, clip in zip(cands, clips):
        rng = _ranges(wcs, lays, h, s, clip, q, xp)
        loss = sum(_output_loss(_rtn_error(wc, s, lay, q, xp, rng[2 * i], rng[2 * i + 1]), h,
                                xp) for i, (wc, lay) in enumerate(zip(wcs, lays)))
        cand = (loss, s, *rng)
        best = cand if best is None else _pick(best, cand, xp)
    return best[1], list(best[2:])


def _prepare(w, stats, dtype, symmetric, axis, group_size, group_axis, in_axis, what):
    lay = weight_layout(getattr(w, "shape", ()), in_axis, axis, group_size, group_axis, what)
    check_stats(stats, lay.k, what, gram=True)
    xp = namespace(w, stats.sum)
    cdt = compute_dtype(xp, w.dtype)
    qt = as_qtype(dtype)
    if symmetric and not qt.signed:
        raise ValueError(f"{what}: symmetric=True needs a signed dtype, not {qt.name}")
    h = xp.astype(stats.hessian, cdt)
    return lay, xp, cdt, qt, h


def _settings(what, qt, symmetric, scale_dtype, grid, clip, clip_alphas, clip_grid,
              min_shrink) -> _Settings:
    _check_int(grid, 1, f"{what} grid")
    _check_int(clip_alphas, 1, f"{what} clip_alphas")
    _check_int(clip_grid, 1, f"{what} clip_grid")
    _check_shrink(min_shrink, f"{what} min_shrink")
    if not isinstance(clip, bool):
        raise TypeError(f"{what} clip={clip!r}: expected True or False")
    sdt = "float32" if scale_dtype is None else scale_dtype
    return _Settings(qt, symmetric, sdt, grid, clip, clip_alphas, clip_grid, min_shrink)


def awq_scales(w_or_ws, stats, dtype, *, group_size=None, axis=None, group_axis=None,
               symmetric: bool = False, in_axis: int = 1, grid: int = 20, clip: bool = True,
               clip_alphas: int = 3, clip_grid: int = 10, min_shrink: float = 0.55,
               scale_dtype=None):
    """AWQ's per-input-feature factors ``s`` (``(k,)``, compute dtype): the scale search
    and final choice of the module docstring (the ranges are left out).

    Args:
        w_or_ws: a 2-D weight, or a list of weights that share one input (e.g. the
            query, key and value projections): their losses are summed and one ``s``
            serves them all, which a model can fold into the operation before them.
        stats: :class:`~arrayquant.LayerStats` of the layer's input, with the Gram
            matrix.
        dtype, symmetric, axis, group_size, group_axis, scale_dtype: the weight
            quantization, as in :func:`arrayquant.quantize`; groups lie along the input
            axis (``group_axis=None`` means that axis), or ``axis`` is the output axis
            (one scale per output channel), or neither (per tensor).
        in_axis: 1 for ``(out, in)`` weights, 0 for ``(in, out)``.
        grid: number of alphas, ``i / grid`` for ``i < grid`` (default 20).
        clip, clip_alphas, clip_grid, min_shrink: the clip search (see :func:`awq`).

    Raises:
        TypeError: ``stats`` is not LayerStats. ValueError: a weight that is not 2-D
            or does not fit the statistics; an unsupported granularity; a search
            setting out of range; statistics without the Gram matrix; eager only:
            statistics with no rows, or with NaN or inf.

    Example:
        >>> import numpy as np, arrayquant as aq
        >>> from arrayquant.dataaware.awq import awq_scales
        >>> rng = np.random.default_rng(0)
        >>> x = rng.normal(size=(256, 64)) * np.where(np.arange(64) < 4, 20.0, 1.0)
        >>> w = rng.normal(size=(32, 64)).astype(np.float32)
        >>> s = awq_scales(w, aq.stats.record(x), "int4", group_size=32)
        >>> s.shape, bool(s[:4].mean() > s[4:].mean())
        ((64,), True)
    """
    ws = _as_weights(w_or_ws)
    prepared = [_prepare(w, stats, dtype, symmetric, axis, group_size, group_axis, in_axis,
                         "awq_scales") for w in ws]
    lay, xp, cdt, qt, h = prepared[0]
    q = _settings("awq_scales", qt, symmetric, scale_dtype, grid, clip, clip_alphas,
                  clip_grid, min_shrink)
    wcs = [canonical(w, p[0], xp) for w, p in zip(ws, prepared)]
    return _search(wcs, [p[0] for p in prepared], h, xp.astype(stats.abs_mean, cdt), q,
                   xp)[0]


def awq(w, stats, dtype, *, group_size=None, axis=None, group_axis=None,
        symmetric: bool = False, in_axis: int = 1, grid: int = 20, clip: bool = True,
        clip_alphas: int = 3, clip_grid: int = 10, min_shrink: float = 0.55, inner=None,
        scale_dtype=None, scales=None) -> LinearWeight:
    """Quantize a 2-D weight with AWQ (see the module docstring for the algorithm).

    Args:
        w: the weight, ``(out, in)`` (``in_axis=1``) or ``(in, out)`` (``in_axis=0``).
        stats: :class:`~arrayquant.LayerStats` of the layer's input (Gram matrix
            included).
        dtype, symmetric, axis, group_size, group_axis: as for :func:`awq_scales`.
        grid: number of alphas of the scale search.
        clip: run the clip search (default True).
        clip_alphas: the clip search runs for this many alphas, those with the
            smallest round-to-nearest loss (default 3), and for ``s = 1``.
        clip_grid, min_shrink: the clip factors, ``clip_grid`` steps from 1 to
            ``min_shrink`` (default 10 steps down to 0.55, AWQ's own grid).
        inner: ``None``, or another data-aware method (``needs_stats``,
            ``quantize_weight``, e.g. GPTQ) that quantizes ``W * s`` with the
            statistics of ``x / s``; it then replaces the clip search (``s`` is
            chosen as with ``clip=False``). A LinearWeight it returns keeps its
            ``perm`` and activation fields, and its ``in_scale`` (in stored order)
            is multiplied by ``1 / s[perm]``.
        scale_dtype: the weight scales' dtype (default float32).
        scales: given factors ``s`` (``(k,)``, positive), e.g. from
            :func:`awq_scales` on several weights; the scale search is skipped and
            ``s`` is kept as it is (no fall-back to ``s = 1``).

    Returns:
        :class:`~arrayquant.LinearWeight` with ``in_scale = 1 / s`` and ``in_axis``.

    Raises:
        TypeError: ``stats`` not LayerStats; ``inner`` not a data-aware method.
        ValueError: as :func:`awq_scales`; ``scales`` not of shape ``(k,)``;
            ``inner`` with another ``in_axis``.
    """
    what = "awq"
    if inner is not None:
        if not (getattr(inner, "needs_stats", False) and hasattr(inner, "quantize_weight")):
            raise TypeError(f"{what} inner={inner!r}: expected a data-aware method (with "
                            "needs_stats = True and quantize_weight), e.g. GPTQ()")
        if getattr(inner, "in_axis", in_axis) != in_axis:
            raise ValueError(f"{what}: inner has in_axis={inner.in_axis}, but in_axis="
                             f"{in_axis}; give both the same layout")
    lay, xp, cdt, qt, h = _prepare(w, stats, dtype, symmetric, axis, group_size, group_axis,
                                   in_axis, what)
    q = _settings(what, qt, symmetric, scale_dtype, grid, clip, clip_alphas, clip_grid,
                  min_shrink)
    q = replace(q, clip=clip and inner is None)
    if scales is not None:
        if tuple(getattr(scales, "shape", ())) != (lay.k,):
            raise ValueError(f"{what} scales of shape {tuple(getattr(scales, 'shape', ()))}: "
                             f"expected ({lay.k},), one factor per input feature")
        scales = xp.astype(scales, cdt)
        check_scales(scales, what, xp)
    wc = canonical(w, lay, xp)
    s, (lo, hi) = _search([wc], [lay], h, xp.astype(stats.abs_mean, cdt), q, xp, scales)
    in_scale = 1.0 / s
    if inner is not None:
        return _with_inner(inner, w, stats, s, in_scale, lay, xp, dtype=dtype,
                           symmetric=symmetric, axis=axis, group_size=group_size,
                           group_axis=lay.in_axis if group_size is not None else group_axis,
                           scale_dtype=q.sdt)
    qw = quantize_blocks(wc * s[None, :], lo, hi, lay, qt, symmetric, q.sdt, w.dtype, xp)
    return LinearWeight(qw, in_scale=in_scale, in_axis=lay.in_axis)


def _scaled_weight(w, s, lay, xp):
    """``W * s`` along the input axis, in ``w``'s dtype."""
    m = s[None, :] if lay.in_axis == 1 else s[:, None]
    return xp.astype(xp.astype(w, s.dtype) * m, w.dtype)


def _with_inner(inner, w, stats, s, in_scale, lay, xp, **quant) -> LinearWeight:
    out = inner.quantize_weight(_scaled_weight(w, s, lay, xp), stats.scaled(in_scale), **quant)
    if isinstance(out, QArray):
        return LinearWeight(out, in_scale=in_scale, in_axis=lay.in_axis)
    if not isinstance(out, LinearWeight):
        raise TypeError(f"awq inner={inner!r} returned {type(out).__name__}; expected a "
                        "QArray or LinearWeight")
    # out represents W' = W * s: W'[:, perm[j]] = Q[:, j] * m[j]. So W[:, perm[j]] =
    # Q[:, j] * m[j] / s[perm[j]]: the new in_scale, in stored order.
    m = in_scale if out.perm is None else xp.take(in_scale, out.perm)
    if out.in_scale is not None:
        m = xp.astype(out.in_scale, m.dtype) * m
    return replace(out, in_scale=m)


@dataclass(frozen=True)
class AWQ:
    """AWQ as a data-aware weight method for ``Rule(method=...)`` / ``quantize_tree``.

    Fields as the arguments of :func:`awq`. ``quantize_weight(w, stats, *, dtype,
    symmetric, axis, group_size, group_axis, scale_dtype)`` returns
    ``awq(w, stats, ...)``, a :class:`~arrayquant.LinearWeight`.

    Raises:
        ValueError / TypeError: a field outside its range (checked on construction).
    """

    grid: int = 20
    clip: bool = True
    inner: Any = None
    in_axis: int = 1
    clip_alphas: int = 3
    clip_grid: int = 10
    min_shrink: float = 0.55
    needs_stats: ClassVar[bool] = True

    def __post_init__(self):
        _settings("AWQ", None, False, None, self.grid, self.clip, self.clip_alphas,
                  self.clip_grid, self.min_shrink)
        if isinstance(self.in_axis, bool) or self.in_axis not in (0, 1):
            raise ValueError(f"AWQ in_axis={self.in_axis!r}: expected 1 ((out, in)) or 0")
        if self.inner is not None:
            try:
                hash(self.inner)
            except TypeError:
                raise ValueError(f"AWQ inner={self.inner!r} is not hashable; a method must "
                                 "be a frozen dataclass") from None

    def quantize_weight(self, w, stats, *, dtype, symmetric=False, axis=None,
                        group_size=None, group_axis=-1, scale_dtype="float32"):
        return awq(w, stats, dtype, group_size=group_size, axis=axis, group_axis=group_axis,
                   symmetric=symmetric, in_axis=self.in_axis, grid=self.grid, clip=self.clip,
                   clip_alphas=self.clip_alphas, clip_grid=self.clip_grid,
                   min_shrink=self.min_shrink, inner=self.inner,
                   scale_dtype=scale_dtype)
