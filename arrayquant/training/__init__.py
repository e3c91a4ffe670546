"""Training with quantization: fake quantization with straight-through gradients, learned
quantization parameters (LSQ / LSQ+) and their exact export (see docs/training.md).

Everything here runs on any array library for the forward value; gradients are defined on
JAX (``jax.custom_vjp``), which is imported only when a JAX array comes in.
"""

from arrayquant.training.fake import fake_quantize
from arrayquant.training.lsq import fake_quantize_with, lsq_init, quantize_learned

__all__ = ["fake_quantize", "fake_quantize_with", "lsq_init", "quantize_learned"]
