"""Integrations with neural-network libraries (Flax Linen, Flax NNX, Equinox).

Each submodule imports its framework at the top and is never imported by
``import arrayquant``: import the one you use, e.g.
``from arrayquant.integrations import linen``.

- :mod:`arrayquant.integrations.linen`: Flax Linen ``nn.Dense``, by method
  interception on a params tree with QArray kernels;
- :mod:`arrayquant.integrations.nnx`: Flax NNX ``nnx.Linear``, by module
  replacement (the QArray kernel in a ``QuantizedParam`` Variable);
- :mod:`arrayquant.integrations.equinox`: Equinox ``eqx.nn.Linear``, by
  module replacement (the QArray weight a pytree child).

NNX and Equinox give ``quantize_model(model, rules)`` (real quantized products,
no float copy of a weight held by the model), ``fake_quantize_model(model,
rules)`` (quantization-aware training with :func:`arrayquant.fake_quantize`)
and ``export(model)``. See ``docs/frameworks.md``.
"""
