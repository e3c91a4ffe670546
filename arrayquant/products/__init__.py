"""Matrix products with quantized weights, and W8A8 with per-token activations.

Three kinds of product, picked by what the caller passes:

- Float weight: ``x @ w.T`` (``linear``) or ``x @ w`` (``matmul``) in the
  inputs' dtype.
- Weight-only (``w`` a :class:`QArray`, ``act_dtype=None``): the result equals
  ``x @ dequantize(w).T`` computed in float32 (float64 for float64 inputs).
- Integer (``act_dtype="int8"``, or ``x`` itself a QArray): ``x`` is quantized
  per token (one scale per row, see :func:`quantize_activations`), the codes
  are multiplied and summed *exactly* in int32 and only the sum is scaled:

      y[m, n] = s_x[m] * sum_g s_w[n, g] * sum_{k in g} (qx[m, k] - zx[m]) * (qw[n, k] - zw[n, g])

  where ``g`` runs over the weight's groups along the contraction axis (one
  group when the weight is per tensor or per output channel).

Every case has one generic formulation in pure array API calls that is always
right, and named fast formulations picked from static facts only (namespace,
shapes, bit widths, granularity), each tested equal to the generic one; see
``docs/inference.md``.

Modules: ``plan`` (the static plans and the formulation table), ``arrays``
(shared array helpers), ``activations`` (per-token quantization), ``weight_only``
and ``integer`` (the formulations), ``jax_dot`` (JAX-only paths, imported only
for JAX arrays), ``api`` (:func:`linear`, :func:`matmul`).
"""

from __future__ import annotations

from arrayquant.products.activations import quantize_activations
from arrayquant.products.api import linear, matmul
from arrayquant.products.integer import int32_safe_in_features
from arrayquant.products.plan import FORMULATIONS

__all__ = ["linear", "matmul", "quantize_activations", "int32_safe_in_features", "FORMULATIONS"]
