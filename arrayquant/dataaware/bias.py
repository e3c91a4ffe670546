"""Bias correction: remove the mean output error that weight quantization adds.

With ``y = x @ W.T + b`` and its quantized version ``x @ W_hat.T + b``, the output
error is ``x @ (W - W_hat).T``; over the calibration data its mean is ``(W -
W_hat) @ mean(x)``. Adding that to the bias makes the mean error zero (Nagel et
al. 2019, "Data-Free Quantization", in its empirical form): ``b' = b + (W -
W_hat) @ mean(x)``. It needs only the per-feature mean of the layer's input
(:attr:`arrayquant.LayerStats.mean`), costs one product per layer, and works
after any weight quantization (round-to-nearest, a calibration method, AWQ, ...).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from arrayquant._backend import compute_dtype, namespace
from arrayquant.affine import dequantize
from arrayquant.dataaware.layout import check_recorded
from arrayquant.linear_weight import LinearWeight
from arrayquant.qarray import QArray
from arrayquant.stats import LayerStats
from arrayquant.trees import flatten_tree, map_leaves

__all__ = ["correct_biases", "corrected_bias", "default_bias_path"]


def corrected_bias(w, qw, stats, bias=None, *, in_axis: int = 1):
    """``bias + (W - dequantize(qw)) @ mean(x)``: the bias that zeroes the mean error.

    Args:
        w: the float weight, ``(out, in)`` (``in_axis=1``) or ``(in, out)``
            (``in_axis=0``).
        qw: its quantized form, a :class:`~arrayquant.QArray` or
            :class:`~arrayquant.LinearWeight` (whose ``in_axis`` must agree);
            ``dequantize(qw)`` is the weight the model computes with.
        stats: :class:`~arrayquant.LayerStats` of the layer's input (its ``mean``).
        bias: the layer's bias ``(out,)``, or None (the correction alone).
        in_axis: the input axis of ``w``.

    Returns:
        ``(out,)`` in ``bias``'s dtype (``w``'s when ``bias`` is None); the
        correction is computed in float32 (float64 for float64 weights).

    Raises:
        TypeError: ``qw`` not a QArray / LinearWeight; ``stats`` not LayerStats.
        ValueError: shapes that do not agree; ``in_axis`` not 0 or 1, or not the
            LinearWeight's; eager only: statistics with no rows, or with NaN or inf.

    Example:
        >>> import numpy as np, arrayquant as aq
        >>> from arrayquant.dataaware.bias import corrected_bias
        >>> rng = np.random.default_rng(0)
        >>> x = rng.normal(1.0, 1.0, size=(500, 64))
        >>> w = rng.normal(size=(8, 64)).astype(np.float32)
        >>> qw = aq.quantize(w, "int4", group_size=32)
        >>> b = corrected_bias(w, qw, aq.stats.record(x))
        >>> err = x @ (w - aq.dequantize(qw)).T - b       # output error, corrected
        >>> bool(np.abs(err.mean(0)).max() < 1e-5)
        True
    """
    if isinstance(in_axis, bool) or in_axis not in (0, 1):
        raise ValueError(f"corrected_bias in_axis={in_axis!r}: expected 1 ((out, in)) or 0 "
                         "((in, out))")
    if not isinstance(qw, (QArray, LinearWeight)):
        raise TypeError(f"corrected_bias qw must be a QArray or LinearWeight, got "
                        f"{type(qw).__name__}")
    if isinstance(qw, LinearWeight) and qw.in_axis != in_axis:
        raise ValueError(f"corrected_bias in_axis={in_axis}, but the LinearWeight has in_axis="
                         f"{qw.in_axis}")
    if not isinstance(stats, LayerStats):
        raise TypeError(f"corrected_bias needs arrayquant.LayerStats; got "
                        f"{type(stats).__name__}")
    shape = tuple(getattr(w, "shape", ()))
    if len(shape) != 2 or tuple(qw.shape) != shape:
        raise ValueError(f"corrected_bias: w of shape {shape} and qw of shape "
                         f"{tuple(qw.shape)}; expected the same 2-D shape")
    k, n = shape[in_axis], shape[1 - in_axis]
    if stats.features != k:
        raise ValueError(f"corrected_bias: the statistics have {stats.features} features, "
                         f"the weight {k} inputs")
    check_recorded(stats, "corrected_bias")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"corrected_bias: bias of shape {tuple(bias.shape)}; expected ({n},)")
    xp = namespace(w, stats.sum, bias)
    cdt = compute_dtype(xp, w.dtype)
    delta = xp.astype(w, cdt) - xp.astype(dequantize(qw), cdt)
    mu = xp.astype(stats.mean, cdt)
    corr = xp.matmul(delta, mu) if in_axis == 1 else xp.matmul(mu, delta)
    if bias is None:
        return xp.astype(corr, w.dtype)
    return xp.astype(xp.astype(bias, cdt) + corr, bias.dtype)


_WEIGHT_NAME = re.compile(r"(weight|kernel)$")


def default_bias_path(path: str) -> str | None:
    """The bias beside a weight: a trailing ``weight`` or ``kernel`` replaced by ``bias``
    (``encoder.layer.0.output.dense.weight`` -> ``...dense.bias``, ``Dense_0/kernel``
    -> ``Dense_0/bias``); None when the path ends otherwise."""
    if not _WEIGHT_NAME.search(path):
        return None
    return _WEIGHT_NAME.sub("bias", path)


def correct_biases(float_params, qparams, stats, *,
                   bias_path: Callable[[str], str | None] = default_bias_path,
                   missing: str = "error", in_axis: int = 1):
    """``qparams`` with the bias of every quantized weight that has statistics corrected.

    For each path ``p`` of ``stats`` (a ``{weight path: LayerStats}`` dict, as
    recorded for the model), where ``qparams[p]`` is a QArray or LinearWeight and
    ``float_params[p]`` the float weight, the leaf ``bias_path(p)`` of ``qparams``
    becomes :func:`corrected_bias` of it. Weights without statistics, and
    statistics of leaves that stayed in float, are left alone.

    Args:
        float_params: the original tree (the float weights).
        qparams: its quantized copy (biases still float arrays).
        stats: ``{path: LayerStats}`` keyed by the weight leaves' paths
            (:func:`arrayquant.tree_paths`).
        bias_path: maps a weight path to its bias path (default
            :func:`default_bias_path`).
        missing: what to do for a weight without a bias leaf: ``"error"`` (the
            default: a ValueError naming it; a layer without a bias would need one
            added to the model, which a tree transformation cannot do) or
            ``"skip"`` (leave that layer uncorrected).
        in_axis: the input axis of QArray weights (1: ``(out, in)``; 0: ``(in,
            out)`` such as Flax kernels). LinearWeights carry their own.

    Returns:
        a tree of ``qparams``' structure with the corrected biases.

    Raises:
        ValueError: a path of ``stats`` that is not a leaf of ``qparams``; a weight
            without a bias leaf (``missing="error"``); ``missing`` not one of
            ``"error"``, ``"skip"``; as :func:`corrected_bias`.
    """
    if missing not in ("error", "skip"):
        raise ValueError(f"correct_biases missing={missing!r}: expected 'error' or 'skip'")
    q_leaves = dict(flatten_tree(qparams))
    f_leaves = dict(flatten_tree(float_params))
    new_biases = {}
    for path, st in stats.items():
        if path not in q_leaves:
            raise ValueError(f"correct_biases: statistics for {path!r}, which is not a leaf "
                             f"of the quantized tree")
        qw = q_leaves[path]
        if not isinstance(qw, (QArray, LinearWeight)):
            continue
        bp = bias_path(path)
        if bp is None or bp not in q_leaves:
            if missing == "skip":
                continue
            raise ValueError(f"correct_biases: the weight {path!r} has no bias leaf "
                             f"({bp!r} is not in the tree); pass bias_path=, or "
                             "missing='skip' to leave such layers uncorrected")
        ax = qw.in_axis if isinstance(qw, LinearWeight) else in_axis
        new_biases[bp] = corrected_bias(f_leaves[path], qw, st, q_leaves[bp], in_axis=ax)
    return map_leaves(lambda p, leaf: new_biases.get(p, leaf), qparams, ())
