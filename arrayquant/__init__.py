"""arrayquant: linear (affine) quantization for NumPy, JAX and any array API library.

>>> import numpy as np, arrayquant as aq
>>> qa = aq.quantize(np.array([[1.0, -2.0], [0.5, 3.0]], dtype=np.float32), "int8", axis=0)
>>> qa.codes.dtype, qa.scale.shape
(dtype('int8'), (2, 1))
"""

from arrayquant._backend import scale_limits
from arrayquant._backend.jaxtools import install_hook as _install_jax_hook
from arrayquant.affine import (
    HQQ,
    MinMax,
    MSESearch,
    Percentile,
    dequantize,
    dequantize_with,
    qparams,
    qparams_from_range,
    quantize,
    quantize_with,
)
from arrayquant.checkpoint import (
    CheckpointError,
    checkpoint_info,
    load,
    quantize_checkpoint,
    save,
    upgrade_checkpoint,
)
from arrayquant.dataaware import (
    AWQ,
    GPTQ,
    SmoothQuant,
    awq,
    awq_scales,
    correct_biases,
    corrected_bias,
    gptq,
    smooth_scales,
    smoothquant,
    static_act_params,
)
from arrayquant.linear_weight import LinearWeight
from arrayquant.metrics import max_abs_error, mse, sqnr_db
from arrayquant.packing import (
    from_high_nibble_first,
    from_hqq,
    from_planar,
    pack,
    packed_length,
    to_high_nibble_first,
    to_hqq,
    to_planar,
    unpack,
)
from arrayquant.products import int32_safe_in_features, linear, matmul, quantize_activations
from arrayquant.qarray import QArray
from arrayquant.qtypes import QType, as_qtype
from arrayquant.sharding import sharding_like
from arrayquant.stats import (
    LayerStats,
    MinMaxObserver,
    MovingAverageObserver,
    MSEObserver,
    PercentileObserver,
    StatsRecorder,
    activation_qparams,
    collect_stats,
    merge_stats,
)
from arrayquant.training import fake_quantize, fake_quantize_with, lsq_init, quantize_learned
from arrayquant.trees import (
    LeafReport,
    Rule,
    TreeReport,
    cast_floats,
    dequantize_tree,
    quantize_tree,
    tree_paths,
    tree_report,
)
from arrayquant.validation import all_finite, check_finite

__version__ = "0.1.0"


def __getattr__(name: str):
    # The applications (CLI, demo, models, plotting) sit above the library, which never
    # imports them; plot_quantization_error is reachable from here on first use.
    if name == "plot_quantization_error":
        from arrayquant.apps.plotting import plot_quantization_error

        return plot_quantization_error
    raise AttributeError(f"module 'arrayquant' has no attribute {name!r}")

__all__ = [
    "AWQ",
    "CheckpointError",
    "GPTQ",
    "HQQ",
    "LayerStats",
    "LeafReport",
    "LinearWeight",
    "MinMax",
    "MinMaxObserver",
    "MovingAverageObserver",
    "MSEObserver",
    "MSESearch",
    "Percentile",
    "PercentileObserver",
    "QArray",
    "QType",
    "Rule",
    "SmoothQuant",
    "StatsRecorder",
    "TreeReport",
    "activation_qparams",
    "all_finite",
    "as_qtype",
    "awq",
    "awq_scales",
    "cast_floats",
    "check_finite",
    "checkpoint_info",
    "collect_stats",
    "correct_biases",
    "corrected_bias",
    "dequantize",
    "dequantize_tree",
    "dequantize_with",
    "fake_quantize",
    "fake_quantize_with",
    "from_high_nibble_first",
    "from_hqq",
    "from_planar",
    "gptq",
    "int32_safe_in_features",
    "linear",
    "load",
    "lsq_init",
    "matmul",
    "max_abs_error",
    "merge_stats",
    "mse",
    "pack",
    "packed_length",
    "plot_quantization_error",
    "qparams",
    "qparams_from_range",
    "quantize",
    "quantize_activations",
    "quantize_checkpoint",
    "quantize_learned",
    "quantize_tree",
    "quantize_with",
    "save",
    "scale_limits",
    "sharding_like",
    "smooth_scales",
    "smoothquant",
    "sqnr_db",
    "static_act_params",
    "to_high_nibble_first",
    "to_hqq",
    "to_planar",
    "tree_paths",
    "tree_report",
    "unpack",
    "upgrade_checkpoint",
]

_install_jax_hook()
