"""SmoothQuant (Xiao et al. 2022): move activation outliers into the weights, for W8A8.

Activations of transformers have a few input features with much larger values than
the rest, which makes 8-bit activation quantization lose the small ones. With a
per-input-feature factor ``s``, ``x @ W.T == (x / s) @ (W * s).T``; SmoothQuant
picks ``s_j = max|x_j| ** alpha / max_i |W_ij| ** (1 - alpha)``, which balances
the ranges of the smoothed activations and weights (``alpha = 0.5``: the same
range for both). The weight ``W * s`` is then quantized as usual (int8 per output
channel by default) and the activations ``x * in_scale`` (``in_scale = 1 / s``) at
inference, per token (dynamic, the default: :func:`arrayquant.linear` with
``act_dtype``) or with one calibrated scale for the tensor (``static=True``:
``act_scale`` / ``act_zero_point`` from the smoothed per-feature ranges,
``min_j(stats.min_j / s_j)`` and ``max_j(stats.max_j / s_j)``, through
:func:`arrayquant.qparams_from_range`).

Choose ``alpha`` on the end-to-end result (one value for the model, not per
layer): build the model with a few alphas and keep the best, e.g.::

    for alpha in (0.4, 0.5, 0.6, 0.7):
        q = {p: smoothquant(params[p], stats[p], alpha=alpha) for p in stats}
        score(q)          # the model's own metric on held-out data

As AWQ's ``in_scale``, ``in_scale`` may be folded into the operation before the
layer (with one shared ``s`` for layers that share an input: pass all their weights
to :func:`smooth_scales`, and the result as ``scales=``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from arrayquant._backend import compute_dtype, namespace
from arrayquant.affine import quantize
from arrayquant.dataaware.layout import check_scales, check_stats, weight_layout
from arrayquant.linear_weight import LinearWeight
from arrayquant.qtypes import as_qtype
from arrayquant.stats import LayerStats, activation_qparams

__all__ = ["SmoothQuant", "smooth_scales", "smoothquant", "static_act_params"]

_FLOOR = 1e-5  # of max|W_j| and of s (as the reference implementation)


def _check_alpha(alpha, what: str) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"{what} alpha={alpha!r}: expected a number in [0, 1]")


def _check_in_axis(in_axis, what: str) -> None:
    if isinstance(in_axis, bool) or in_axis not in (0, 1):
        raise ValueError(f"{what} in_axis={in_axis!r}: expected 1 ((out, in) layout) or 0 "
                         "((in, out) layout)")


def smooth_scales(w_or_ws, stats, alpha: float = 0.5, *, in_axis: int = 1):
    """SmoothQuant's factors ``s_j = max|x_j| ** alpha / max|W_j| ** (1 - alpha)``, ``(k,)``.

    ``max|x_j|`` is ``stats.abs_max``; ``max|W_j|`` is the largest magnitude of input
    feature ``j`` over the output channels, and over all weights when several are
    given (layers that share the input, e.g. query, key and value). ``max|W_j|`` is
    floored at 1e-5 and ``s`` clipped to ``[1e-5, 1e5]``; a feature that is zero in
    every recorded activation gets ``s_j = 1``. Computed in the weights' compute
    dtype (float32, or float64).

    Raises:
        TypeError: ``stats`` not LayerStats. ValueError: ``alpha`` outside ``[0, 1]``;
            a weight that is not 2-D or does not fit the statistics.

    Example:
        >>> import numpy as np, arrayquant as aq
        >>> from arrayquant.dataaware.smoothquant import smooth_scales
        >>> x = np.array([[1.0, 100.0], [-2.0, 50.0]])
        >>> w = np.array([[1.0, 1.0], [0.5, -1.0]])
        >>> smooth_scales(w, aq.stats.record(x), 0.5).tolist()
        [1.4142135623730951, 10.0]
    """
    _check_alpha(alpha, "smooth_scales")
    _check_in_axis(in_axis, "smooth_scales")
    ws = list(w_or_ws) if isinstance(w_or_ws, (list, tuple)) else [w_or_ws]
    if not ws:
        raise ValueError("smooth_scales needs at least one weight")
    wmax = None
    for w in ws:
        lay = weight_layout(getattr(w, "shape", ()), in_axis, None, None, None,
                            "smooth_scales")
        check_stats(stats, lay.k, "smooth_scales", gram=False)
        xp = namespace(w, stats.sum)
        m = xp.max(xp.abs(xp.astype(w, compute_dtype(xp, w.dtype))), axis=1 - in_axis)
        wmax = m if wmax is None else xp.maximum(wmax, xp.astype(m, wmax.dtype))
    cdt = wmax.dtype
    amax = xp.astype(stats.abs_max, cdt)
    floor = xp.asarray(_FLOOR, dtype=cdt)
    s = amax ** alpha / xp.maximum(wmax, floor) ** (1.0 - alpha)
    s = xp.clip(s, _FLOOR, 1.0 / _FLOOR)
    return xp.where(amax > 0, s, xp.ones_like(s))


def static_act_params(stats, in_scale, act_dtype="int8", act_symmetric: bool = False):
    """One scale (and zero point) for the activations ``x * in_scale`` of a layer.

    The per-tensor range of ``x * in_scale`` follows from the per-feature ranges
    (``in_scale > 0``): ``[min_j(stats.min_j * in_scale_j), max_j(stats.max_j *
    in_scale_j)]``, then :func:`arrayquant.qparams_from_range`. ``in_scale=None``
    uses the raw ranges. Returns ``(scale, zero_point)``, 0-d arrays (zero point
    ``None`` when symmetric).

    Raises:
        TypeError: ``stats`` not LayerStats. ValueError: as
            :func:`arrayquant.qparams_from_range` (e.g. no rows recorded: an
            infinite range).
    """
    if not isinstance(stats, LayerStats):
        raise TypeError(f"static_act_params needs arrayquant.LayerStats; got "
                        f"{type(stats).__name__}")
    if in_scale is not None and tuple(in_scale.shape) != (stats.features,):
        raise ValueError(f"static_act_params in_scale of shape {tuple(in_scale.shape)}: "
                         f"expected ({stats.features},)")
    # The per-feature ranges scaled (exact in float64 for float32 ranges and factors),
    # then the min/max range of activation_qparams: one set of formulas for both.
    scaled = stats if in_scale is None else stats.scaled(in_scale)
    return activation_qparams(replace(scaled, range_min=None, range_max=None), act_dtype,
                              act_symmetric)


def smoothquant(w, stats, *, alpha: float = 0.5, dtype="int8", symmetric: bool = True,
                axis=0, group_size=None, group_axis=None, act_dtype="int8",
                act_symmetric: bool = False, static: bool = False, in_axis: int = 1,
                scale_dtype="float32", scales=None) -> LinearWeight:
    """SmoothQuant a 2-D weight (see the module docstring).

    Args:
        w: the weight, ``(out, in)`` (``in_axis=1``) or ``(in, out)`` (``in_axis=0``).
        stats: :class:`~arrayquant.LayerStats` of the layer's input (``abs_max``;
            ``min`` / ``max`` for ``static``).
        alpha: migration strength in ``[0, 1]`` (default 0.5).
        dtype, symmetric, axis, group_size, group_axis, scale_dtype: the weight
            quantization of ``W * s`` by :func:`arrayquant.quantize` (default int8,
            symmetric, ``axis=0``: one scale per output channel of an ``(out, in)``
            weight; use ``axis=1`` for ``in_axis=0``). Groups along the input axis
            and per tensor are accepted too.
        act_dtype, act_symmetric: the activation quantization of ``static=True``
            (dynamic per-token scales are chosen at inference:
            ``aq.linear(x, lw, act_dtype=..., act_symmetric=...)``).
        static: store ``act_scale`` / ``act_zero_point`` / ``act_qtype`` (one
            calibrated scale for the activations, see :func:`static_act_params`).
        scales: given factors ``s`` (``(k,)``, positive) instead of
            :func:`smooth_scales` (e.g. shared by layers with one input).

    Returns:
        :class:`~arrayquant.LinearWeight` with ``in_scale = 1 / s``.

    Raises:
        TypeError: ``stats`` not LayerStats. ValueError: ``alpha`` outside
            ``[0, 1]``; an unsupported granularity (see :func:`arrayquant.quantize`);
            ``scales`` of the wrong shape; as :func:`arrayquant.quantize`; eager
            only: statistics with no rows, or with NaN or inf.
    """
    what = "smoothquant"
    _check_in_axis(in_axis, what)
    lay = weight_layout(getattr(w, "shape", ()), in_axis, axis, group_size, group_axis, what)
    check_stats(stats, lay.k, what, gram=False)
    if not isinstance(static, bool):
        raise TypeError(f"{what} static={static!r}: expected True or False")
    xp = namespace(w, stats.sum)
    cdt = compute_dtype(xp, w.dtype)
    if scales is None:
        s = smooth_scales(w, stats, alpha, in_axis=in_axis)
    else:
        _check_alpha(alpha, what)
        if tuple(getattr(scales, "shape", ())) != (lay.k,):
            raise ValueError(f"{what} scales of shape {tuple(getattr(scales, 'shape', ()))}: "
                             f"expected ({lay.k},), one factor per input feature")
        s = xp.astype(scales, cdt)
        check_scales(s, what, xp)
    m = s[None, :] if in_axis == 1 else s[:, None]
    ws = xp.astype(xp.astype(w, cdt) * m, w.dtype)
    ga = in_axis if group_axis is None else group_axis
    qw = quantize(ws, dtype, symmetric, axis=axis, group_size=group_size,
                  group_axis=ga, scale_dtype=scale_dtype)
    in_scale = 1.0 / s
    if not static:
        return LinearWeight(qw, in_scale=in_scale, in_axis=in_axis)
    act_s, act_z = static_act_params(stats, in_scale, act_dtype, act_symmetric)
    return LinearWeight(qw, in_scale=in_scale, act_scale=act_s, act_zero_point=act_z,
                        in_axis=in_axis, act_qtype=as_qtype(act_dtype).name)


@dataclass(frozen=True)
class SmoothQuant:
    """SmoothQuant as a data-aware weight method for ``Rule(method=...)`` /
    ``quantize_tree``: ``quantize_weight(w, stats, *, dtype, symmetric, axis,
    group_size, group_axis, scale_dtype)`` returns :func:`smoothquant` with these
    fields (the Rule's own settings quantize ``W * s``; use ``dtype="int8",
    symmetric=True, axis=0`` for W8A8).

    Raises:
        ValueError / TypeError: a field outside its range (checked on construction).
    """

    alpha: float = 0.5
    static: bool = False
    act_symmetric: bool = False
    in_axis: int = 1
    act_dtype: str = "int8"
    needs_stats: ClassVar[bool] = True

    def __post_init__(self):
        _check_alpha(self.alpha, "SmoothQuant")
        _check_in_axis(self.in_axis, "SmoothQuant")
        for name in ("static", "act_symmetric"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"SmoothQuant {name}={getattr(self, name)!r}: expected True "
                                "or False")
        qt = as_qtype(self.act_dtype)
        if self.act_symmetric and not qt.signed:
            raise ValueError(f"SmoothQuant act_symmetric=True needs a signed act_dtype, not "
                             f"{qt.name}")

    def quantize_weight(self, w, stats, *, dtype, symmetric=True, axis=0, group_size=None,
                        group_axis=-1, scale_dtype="float32"):
        return smoothquant(w, stats, alpha=self.alpha, dtype=dtype, symmetric=symmetric,
                           axis=axis, group_size=group_size,
                           group_axis=None if group_size is None else group_axis,
                           act_dtype=self.act_dtype, act_symmetric=self.act_symmetric,
                           static=self.static, in_axis=self.in_axis, scale_dtype=scale_dtype)
