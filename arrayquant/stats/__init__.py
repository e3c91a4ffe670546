"""Activation statistics for data-aware quantization.

:mod:`~arrayquant.stats.layer` (``LayerStats``: streaming sums per linear layer),
:mod:`~arrayquant.stats.recorder` (a recording ``linear`` hook, ``collect_stats``)
and :mod:`~arrayquant.stats.observers` (static activation-range observers).
"""

from arrayquant.stats.layer import LayerStats, merge, record
from arrayquant.stats.observers import (
    MinMaxObserver,
    MovingAverageObserver,
    MSEObserver,
    PercentileObserver,
    activation_qparams,
)
from arrayquant.stats.recorder import StatsRecorder, collect_stats, merge_stats

__all__ = [
    "LayerStats", "MSEObserver", "MinMaxObserver", "MovingAverageObserver",
    "PercentileObserver", "StatsRecorder", "activation_qparams", "collect_stats", "merge",
    "merge_stats", "record",
]
