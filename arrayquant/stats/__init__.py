"""Activation statistics for data-aware quantization (see :mod:`arrayquant.stats.layer`)."""

from arrayquant.stats.layer import LayerStats, merge, record

__all__ = ["LayerStats", "merge", "record"]
