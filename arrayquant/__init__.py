"""arrayquant: linear (affine) quantization for NumPy, JAX and any array API library.

>>> import numpy as np, arrayquant as aq
>>> qa = aq.quantize(np.array([[1.0, -2.0], [0.5, 3.0]], dtype=np.float32), "int8", axis=0)
>>> qa.codes.dtype, qa.scale.shape
(dtype('int8'), (2, 1))
"""

from ._backend import scale_limits
from ._jax import install_hook as _install_jax_hook
from ._qtypes import QType, as_qtype
from .affine import dequantize, dequantize_with, qparams, quantize, quantize_with
from .checkpoint import (
    CheckpointError,
    checkpoint_info,
    load,
    quantize_checkpoint,
    save,
)
from .inference import int32_safe_in_features, linear, matmul, quantize_activations
from .metrics import max_abs_error, mse, sqnr_db
from .packing import (
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
from .plotting import plot_quantization_error
from .qarray import QArray
from .tree import (
    LeafReport,
    Rule,
    TreeReport,
    dequantize_tree,
    quantize_tree,
    tree_paths,
    tree_report,
)
from .validation import all_finite, check_finite

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "LeafReport",
    "QArray",
    "QType",
    "Rule",
    "TreeReport",
    "all_finite",
    "as_qtype",
    "check_finite",
    "checkpoint_info",
    "dequantize",
    "dequantize_tree",
    "dequantize_with",
    "from_high_nibble_first",
    "from_hqq",
    "from_planar",
    "int32_safe_in_features",
    "linear",
    "load",
    "matmul",
    "max_abs_error",
    "mse",
    "pack",
    "packed_length",
    "plot_quantization_error",
    "qparams",
    "quantize_activations",
    "quantize",
    "quantize_checkpoint",
    "quantize_tree",
    "quantize_with",
    "save",
    "scale_limits",
    "sqnr_db",
    "to_high_nibble_first",
    "to_hqq",
    "to_planar",
    "tree_paths",
    "tree_report",
    "unpack",
]

_install_jax_hook()
