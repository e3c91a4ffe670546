"""Quantized layers for neural-network libraries: ``arrayquant.integrations.<library>``.

Each submodule imports its library at the top and is imported only by the user
(``import arrayquant`` loads none of them):

- :mod:`arrayquant.integrations.equinox`: Equinox ``eqx.nn.Linear``;
- :mod:`arrayquant.integrations.nnx`: Flax NNX ``nnx.Linear``.

Each gives ``quantize_model(model, rules)`` (real quantized products with
:func:`arrayquant.linear` / :func:`arrayquant.matmul`, no float copy of a
weight), ``fake_quantize_model(model, rules)`` (quantization-aware training
with :func:`arrayquant.fake_quantize`) and ``export(model)`` (the trained
model with integer weights whose dequantized values equal the fake-quantized
ones bit for bit). See ``docs/frameworks.md``.
"""
