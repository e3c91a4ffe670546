"""Data-aware quantization: methods that use statistics of a layer's inputs.

GPTQ (:mod:`arrayquant.dataaware.gptq`, docs/gptq.md), AWQ
(:mod:`arrayquant.dataaware.awq`), SmoothQuant
(:mod:`arrayquant.dataaware.smoothquant`) and bias correction
(:mod:`arrayquant.dataaware.bias`; docs/awq-smoothquant.md). Each takes the
:class:`~arrayquant.LayerStats` of the layer's input; the method classes plug
into ``Rule(method=...)`` and ``quantize_tree(..., stats=...)``.
"""

from arrayquant.dataaware.awq import AWQ, awq, awq_scales
from arrayquant.dataaware.bias import correct_biases, corrected_bias, default_bias_path
from arrayquant.dataaware.gptq import GPTQ, gptq, gptq_codes
from arrayquant.dataaware.smoothquant import (
    SmoothQuant,
    smooth_scales,
    smoothquant,
    static_act_params,
)

__all__ = ["AWQ", "GPTQ", "SmoothQuant", "awq", "awq_scales", "correct_biases",
           "corrected_bias", "default_bias_path", "gptq", "gptq_codes", "smooth_scales",
           "smoothquant", "static_act_params"]
