"""arrayquant: linear (affine) quantization for NumPy, JAX and any array API library.

>>> import numpy as np, arrayquant as aq
>>> qa = aq.quantize(np.array([[1.0, -2.0], [0.5, 3.0]], dtype=np.float32), "int8", axis=0)
>>> qa.codes.dtype, qa.scale.shape
(dtype('int8'), (2, 1))
"""

from ._jax import install_hook as _install_jax_hook
from ._qtypes import QType, as_qtype
from .affine import dequantize, dequantize_with, qparams, quantize, quantize_with
from .metrics import max_abs_error, mse, sqnr_db
from .packing import (
    from_high_nibble_first,
    from_planar,
    pack,
    packed_length,
    to_high_nibble_first,
    to_planar,
    unpack,
)
from .plotting import plot_quantization_error
from .qarray import QArray
from .validation import all_finite, check_finite

__version__ = "0.1.0"

__all__ = [
    "QArray",
    "QType",
    "all_finite",
    "as_qtype",
    "check_finite",
    "dequantize",
    "dequantize_with",
    "from_high_nibble_first",
    "from_planar",
    "max_abs_error",
    "mse",
    "pack",
    "packed_length",
    "plot_quantization_error",
    "qparams",
    "quantize",
    "quantize_with",
    "sqnr_db",
    "to_high_nibble_first",
    "to_planar",
    "unpack",
]

_install_jax_hook()
