"""Shared pieces of AWQ and SmoothQuant: a 2-D weight's layout and blocks along its input.

The data-aware methods reason about a weight in PyTorch's ``(out, in)`` layout
(the *canonical* one, ``in_axis=1``); a weight stored ``(in, out)``
(``in_axis=0``) is transposed to it and the results transposed back. Along the
input axis the weight is cut into blocks of ``gs`` features: the quantization
groups (``group_size``), or one block of all ``k`` features for one scale per
output channel or per tensor. Each block of one output row is quantized with one
range; per tensor, every row shares it.

The loss of a block is the layer-wise output error it causes, ``e^T H_g e`` for
the block's weight error ``e`` and ``H_g`` the block's diagonal block of the
input Hessian ``X^T X / n`` (:func:`block_loss`).
"""

from __future__ import annotations

from dataclasses import dataclass

from arrayquant._backend import compute_dtype, dtype_name, finfo_limits, namespace
from arrayquant.affine import dequantize_with, make_qarray, qparams_from_range, quantize_with
from arrayquant.affine.checks import eager
from arrayquant.blocking import Blocking, normalize_axis, plan
from arrayquant.qarray import QArray
from arrayquant.stats import LayerStats

__all__ = ["WeightLayout", "block_loss", "block_ranges", "canonical", "check_recorded",
           "check_scales", "check_stats",
           "clip_shrink", "fake_quantize", "hessian_blocks", "quantize_blocks",
           "weight_layout"]


@dataclass(frozen=True)
class WeightLayout:
    """Static facts of one 2-D weight and its granularity (see the module docstring)."""

    shape: tuple[int, int]
    in_axis: int
    gs: int  # block length along the input axis
    per_tensor: bool
    blocking: Blocking  # of the weight in its own layout

    @property
    def n(self) -> int:
        return self.shape[1 - self.in_axis]

    @property
    def k(self) -> int:
        return self.shape[self.in_axis]

    @property
    def ng(self) -> int:
        return -(-self.k // self.gs)


def weight_layout(shape, in_axis, axis, group_size, group_axis, what: str) -> WeightLayout:
    """The layout of a 2-D weight quantized per group along its input, per output
    channel, or per tensor (``axis`` / ``group_size`` / ``group_axis`` as in
    :func:`arrayquant.quantize`; ``group_axis=None`` means the input axis).

    Raises:
        ValueError: not 2-D; ``in_axis`` not 0 or 1; any other granularity.
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) != 2:
        raise ValueError(f"{what} needs a 2-D weight; got shape {shape}")
    if isinstance(in_axis, bool) or in_axis not in (0, 1):
        raise ValueError(f"{what}: in_axis={in_axis!r}; expected 1 ((out, in) layout) or 0 "
                         "((in, out) layout)")
    out_axis = 1 - in_axis
    accepted = (f"accepted: group_size with group_axis={in_axis} (the input axis), "
                f"axis={out_axis} (per output channel), or neither (per tensor)")
    if group_size is not None:
        ga = in_axis if group_axis is None else normalize_axis(group_axis, 2, "group_axis")
        if axis is not None or ga != in_axis:
            raise ValueError(f"{what} on a weight of shape {shape} (in_axis={in_axis}): "
                             f"axis={axis!r}, group_size={group_size!r}, "
                             f"group_axis={group_axis!r} is not supported; {accepted}")
        b = plan(shape, None, group_size, in_axis)
        return WeightLayout(shape, in_axis, b.block[in_axis], False, b)
    if axis is None:
        return WeightLayout(shape, in_axis, shape[in_axis], True, plan(shape, None, None, -1))
    ax = axis[0] if isinstance(axis, (tuple, list)) and len(axis) == 1 else axis
    if isinstance(ax, (tuple, list)) or normalize_axis(ax, 2) != out_axis:
        raise ValueError(f"{what} on a weight of shape {shape} (in_axis={in_axis}): "
                         f"axis={axis!r} is not supported; {accepted}")
    return WeightLayout(shape, in_axis, shape[in_axis], False, plan(shape, out_axis, None, -1))


def check_stats(stats, k: int, what: str, gram: bool) -> None:
    """TypeError / ValueError unless ``stats`` are LayerStats of ``k`` features."""
    if not isinstance(stats, LayerStats):
        raise TypeError(f"{what} needs the layer's input statistics as arrayquant.LayerStats "
                        f"(arrayquant.stats.record); got {type(stats).__name__}")
    if stats.features != k:
        raise ValueError(f"{what}: the statistics have {stats.features} input features, but "
                         f"the weight has {k} along its input axis")
    if gram and stats.gram is None:
        raise ValueError(f"{what} needs the input Gram matrix; record the statistics with "
                         "gram=True")
    check_recorded(stats, what)


def check_recorded(stats, what: str) -> None:
    """Eager only (skipped under a trace): ValueError when ``stats`` hold no rows (every
    mean is 0 / 0) or NaN / inf in the Gram matrix, sums or per-feature maxima."""
    xp = namespace(stats.sum)
    if eager(stats.count) == 0.0:
        raise ValueError(f"{what}: the input statistics hold no rows (count 0: every row "
                         "was masked out, or only empty batches were recorded)")
    arrays = [a for a in (stats.gram, stats.sum, stats.abs_sum, stats.abs_max) if a is not None]
    if eager(xp.all(xp.stack([xp.all(xp.isfinite(a)) for a in arrays]))) == 0.0:
        raise ValueError(f"{what}: the input statistics hold NaN or inf (the calibration "
                         "activations had NaN or inf, or overflowed the accumulation dtype)")


def check_scales(s, what: str, xp) -> None:
    """Eager only: ValueError unless every given factor ``s`` is finite and at least the
    smallest normal number of its dtype (so ``in_scale = 1 / s`` is finite)."""
    ok = (s >= finfo_limits(s.dtype)[0]) & xp.isfinite(s)
    if eager(xp.all(ok)) == 0.0:
        raise ValueError(f"{what} scales: every factor must be positive and finite, with a "
                         "finite reciprocal (in_scale = 1 / s); got zero, negative, NaN, inf "
                         "or subnormal entries")


def canonical(w, lay: WeightLayout, xp):
    """``w`` as ``(out, in)`` in its compute dtype (float32, or float64)."""
    w = xp.astype(w, compute_dtype(xp, w.dtype))
    return w if lay.in_axis == 1 else xp.permute_dims(w, (1, 0))


def _padded_blocks(wc, lay: WeightLayout, xp):
    """``(n, ng, gs)`` view of a canonical weight, the last block padded with zeros."""
    pad = lay.ng * lay.gs - lay.k
    if pad:
        wc = xp.concat([wc, xp.zeros((wc.shape[0], pad), dtype=wc.dtype)], axis=1)
    return xp.reshape(wc, (wc.shape[0], lay.ng, lay.gs))


def block_ranges(wc, lay: WeightLayout, xp):
    """``(rmin, rmax)`` of each block: ``(n, ng)``, or ``(1, 1)`` per tensor.

    Zero padding never changes a range that is extended to hold zero.
    """
    v = _padded_blocks(wc, lay, xp)
    lo, hi = xp.min(v, axis=2), xp.max(v, axis=2)
    if lay.per_tensor:
        lo = xp.reshape(xp.min(lo), (1, 1))
        hi = xp.reshape(xp.max(hi), (1, 1))
    return lo, hi


def clip_shrink(lo, hi, p: float, xp):
    """AWQ's clipped range: ``[max(lo, -p a), min(hi, p a)]`` with ``a = max(-lo, hi)``.

    ``p = 1`` gives ``[lo, hi]`` exactly; smaller ``p`` clips the larger side first.
    """
    a = xp.maximum(-lo, hi) * p
    return xp.maximum(lo, -a), xp.minimum(hi, a)


def _params(lo, hi, qt, symmetric, scale_dtype):
    return qparams_from_range(lo, hi, qt.name, symmetric, scale_dtype=scale_dtype)


def fake_quantize(wc, lo, hi, lay: WeightLayout, qt, symmetric, scale_dtype, xp):
    """Quantize and dequantize a canonical weight with the given block ranges."""
    s, z = _params(lo, hi, qt, symmetric, scale_dtype)
    codes = quantize_with(wc, s, z, qt.name, group_size=lay.gs, group_axis=1)
    return dequantize_with(codes, s, z, dtype=wc.dtype, group_size=lay.gs, group_axis=1)


def hessian_blocks(h, lay: WeightLayout, xp):
    """The diagonal ``(gs, gs)`` blocks of the ``(k, k)`` Hessian: ``(ng, gs, gs)``,
    the last one padded with zeros."""
    pad = lay.ng * lay.gs - lay.k
    if pad:
        h = xp.concat([h, xp.zeros((pad, lay.k), dtype=h.dtype)], axis=0)
        h = xp.concat([h, xp.zeros((lay.k + pad, pad), dtype=h.dtype)], axis=1)
    g = lay.gs
    return xp.stack([h[i * g:(i + 1) * g, i * g:(i + 1) * g] for i in range(lay.ng)])


def block_loss(e, hb, lay: WeightLayout, xp):
    """``e_g^T H_g e_g`` for every block of the canonical error ``e`` (``(n, k)``):
    ``(n, ng)``, or ``(1, 1)`` per tensor (the sum over rows). ``hb``:
    :func:`hessian_blocks`."""
    v = xp.permute_dims(_padded_blocks(e, lay, xp), (1, 0, 2))  # (ng, n, gs)
    loss = xp.permute_dims(xp.sum(xp.matmul(v, hb) * v, axis=2), (1, 0))  # (n, ng)
    if lay.per_tensor:
        loss = xp.reshape(xp.sum(loss), (1, 1))
    return loss


def quantize_blocks(wc, lo, hi, lay: WeightLayout, qt, symmetric, scale_dtype, orig_dtype,
                    xp) -> QArray:
    """A QArray of the weight (canonical ``wc``, quantized with the block ranges), in the
    weight's own layout, stored as :func:`arrayquant.quantize` stores it (sub-byte codes
    packed along the last axis)."""
    s, z = _params(lo, hi, qt, symmetric, scale_dtype)
    codes = quantize_with(wc, s, z, qt.name, group_size=lay.gs, group_axis=1)
    if lay.in_axis == 0:
        codes, s = xp.permute_dims(codes, (1, 0)), xp.permute_dims(s, (1, 0))
        z = None if z is None else xp.permute_dims(z, (1, 0))
    return make_qarray(codes, s, z, qt, lay.blocking, dtype_name(orig_dtype), 0)

