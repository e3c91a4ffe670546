"""Data-aware quantization: methods that use statistics of a layer's inputs.

AWQ (:mod:`arrayquant.dataaware.awq`), SmoothQuant
(:mod:`arrayquant.dataaware.smoothquant`) and bias correction
(:mod:`arrayquant.dataaware.bias`). See docs/awq-smoothquant.md.
"""

from arrayquant.dataaware.awq import AWQ, awq, awq_scales
from arrayquant.dataaware.bias import correct_biases, corrected_bias, default_bias_path
from arrayquant.dataaware.smoothquant import (
    SmoothQuant,
    smooth_scales,
    smoothquant,
    static_act_params,
)

__all__ = ["AWQ", "SmoothQuant", "awq", "awq_scales", "correct_biases", "corrected_bias",
           "default_bias_path", "smooth_scales", "smoothquant", "static_act_params"]
