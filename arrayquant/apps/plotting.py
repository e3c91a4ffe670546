"""Heatmaps of a quantization: original, codes, dequantized and error (needs matplotlib)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from arrayquant._io import atomic_path
from arrayquant.qarray import QArray

__all__ = ["plot_quantization_error"]


def _as_2d(a) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 0:
        return a.reshape(1, 1)
    if a.ndim == 1:
        return a.reshape(1, -1)
    return a.reshape(math.prod(a.shape[:-1]), a.shape[-1])


def plot_quantization_error(x, qa: QArray, path, *, annotate: bool | None = None) -> Path:
    """Draw original, codes, dequantized tensor and error ``|x - x_hat|`` side by side.

    Arrays of more than two dimensions are shown with their leading axes
    flattened. Values are written in the cells when ``annotate`` is true
    (default: for arrays of at most 64 elements). The figure is written
    atomically to ``path`` (any format matplotlib infers from the suffix).

    Raises:
        ModuleNotFoundError: matplotlib is not installed (``pip install arrayquant[plot]``).
        TypeError: ``qa`` is not a QArray.
    """
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ModuleNotFoundError as e:  # pragma: no cover - depends on the environment
        raise ModuleNotFoundError(
            "plot_quantization_error needs matplotlib: pip install 'arrayquant[plot]'"
        ) from e
    if not isinstance(qa, QArray):
        raise TypeError(f"qa must be an arrayquant.QArray, got {type(qa).__name__}")
    x_hat = qa.dequantize()
    panels = [
        ("original", _as_2d(x)),
        (f"codes ({qa.qtype})", _as_2d(qa.codes)),
        ("dequantized", _as_2d(x_hat)),
        ("|error|", np.abs(_as_2d(x) - _as_2d(x_hat))),
    ]
    if annotate is None:
        annotate = math.prod(qa.shape) <= 64
    fig, axes = plt.subplots(1, 4, figsize=(16, 4), constrained_layout=True)
    for ax, (title, a) in zip(axes, panels):
        im = ax.imshow(a, cmap="viridis", aspect="auto")
        ax.set_title(title)
        fig.colorbar(im, ax=ax, shrink=0.8)
        if annotate:
            for (i, j), v in np.ndenumerate(a):
                ax.text(j, i, f"{v:.4g}", ha="center", va="center", color="w", fontsize=8)
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return path
