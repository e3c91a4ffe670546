"""Equinox models with quantized linear layers: module replacement, no float weight copies.

An Equinox model is an immutable pytree of modules, so quantizing it is a tree
map: every ``eqx.nn.Linear`` whose weight path a rule selects is replaced by
a module of the same interface that holds the quantized weight.

- :func:`quantize_model` -> :class:`QuantizedLinear`: the weight is a
  :class:`~arrayquant.QArray` (an ordinary pytree child: ``eqx.filter_jit``,
  ``jax.vmap``, ``eqx.partition`` and serialisation see its codes and
  scales), and the product is :func:`arrayquant.linear` on it (W8A16, W4A16
  packed, or W8A8 with ``act_dtype="int8"``).
- :func:`fake_quantize_model` -> :class:`FakeQuantLinear`: the weight stays
  float (trainable with ``eqx.filter_grad`` and optax) and is fake-quantized
  with :func:`arrayquant.fake_quantize` in each call; :func:`export` turns
  the trained layers into :class:`QuantizedLinear` with the same settings.

Paths are those of :func:`arrayquant.tree_paths`: a layer's weight is
``layers/0/weight`` in an ``eqx.nn.MLP``. Rules see the ``(out, in)`` weight as
it is: per output channel is ``axis=0``, groups along the input features are
``group_size=g`` (``group_axis=-1``, the default).

Examples:
    >>> import jax, equinox as eqx, arrayquant as aq
    >>> from arrayquant.integrations.equinox import quantize_model
    >>> mlp = eqx.nn.MLP(16, 8, 32, 1, key=jax.random.key(0))
    >>> qmlp = quantize_model(mlp, aq.Rule(dtype="int8", symmetric=True, axis=0))
    >>> type(qmlp.layers[0]).__name__, qmlp.layers[0].weight.qtype
    ('QuantizedLinear', 'int8')
    >>> jax.vmap(qmlp)(jax.numpy.ones((4, 16))).shape
    (4, 8)
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from arrayquant.integrations._common import (
    Matcher,
    check_act,
    check_layer,
    fake_activations,
    fake_weight,
    quantize_weight,
)
from arrayquant.integrations._product import product
from arrayquant.trees import Rule

__all__ = ["FakeQuantLinear", "QuantizedLinear", "export", "fake_quantize_model",
           "quantize_model"]


def _scalar_in(x, in_features):
    if in_features != "scalar":
        return x
    if jnp.shape(x) != ():
        raise ValueError(f"x must have shape () for in_features='scalar'; got {jnp.shape(x)}")
    return jnp.reshape(x, (1,))


def _scalar_out(y, out_features):
    return y[..., 0] if out_features == "scalar" else y


class QuantizedLinear(eqx.Module):
    """``eqx.nn.Linear`` with a quantized weight: ``y = aq.linear(x, weight, bias)``.

    ``weight`` is a :class:`~arrayquant.QArray` (or
    :class:`~arrayquant.LinearWeight`) of shape ``(out, in)``; ``bias`` a float
    ``(out,)`` array or None. ``x`` is one vector ``(in,)`` as for
    ``eqx.nn.Linear`` (use ``jax.vmap`` for batches), or any ``(..., in)`` batch
    directly; ``in_features="scalar"`` takes a 0-d ``x`` and
    ``out_features="scalar"`` returns a 0-d result, as Equinox does. With
    ``act_dtype`` (e.g. ``"int8"``) the activations are quantized per token
    (per vector) and multiplied in integers (W8A8). The weight is never
    dequantized into a float matrix by this module. Under ``jax.vmap`` the
    product runs once on the whole batch (``jax.vmap(layer)(xs) ==
    aq.linear(xs, weight, bias)``, see ``arrayquant/integrations/_product.py``);
    gradients flow to ``x`` and ``bias``, not to the quantized weight.
    """

    weight: Any
    bias: Any
    in_features: Any = eqx.field(static=True)
    out_features: Any = eqx.field(static=True)
    act_dtype: str | None = eqx.field(static=True, default=None)
    act_symmetric: bool = eqx.field(static=True, default=True)

    @property
    def use_bias(self) -> bool:
        return self.bias is not None

    def __call__(self, x, *, key=None):
        x = _scalar_in(x, self.in_features)
        y = product(x, self.weight, self.bias, self.act_dtype, self.act_symmetric, False)
        return _scalar_out(y, self.out_features)


class FakeQuantLinear(eqx.Module):
    """``eqx.nn.Linear`` for quantization-aware training: ``y = x @ fq(weight).T + bias``.

    ``fq(weight)`` is ``aq.fake_quantize(weight, ...)`` with ``rule``'s
    settings, equal to ``aq.dequantize(rule.quantize(weight))`` bit for bit,
    with a clipped straight-through gradient, so ``weight`` (float, ``(out,
    in)``) trains as usual. With ``act_dtype`` the input is fake-quantized per
    token (one scale per index of the leading axes; a single vector, as under
    ``jax.vmap``, has one scale), as the integer product of W8A8 quantizes it.
    :func:`export` gives the :class:`QuantizedLinear` to deploy.
    """

    weight: Any
    bias: Any
    in_features: Any = eqx.field(static=True)
    out_features: Any = eqx.field(static=True)
    rule: Rule = eqx.field(static=True)
    act_dtype: str | None = eqx.field(static=True, default=None)
    act_symmetric: bool = eqx.field(static=True, default=True)

    @property
    def use_bias(self) -> bool:
        return self.bias is not None

    def __call__(self, x, *, key=None):
        x = _scalar_in(x, self.in_features)
        w = fake_weight(self.weight, self.rule)
        if self.act_dtype is not None:
            x = fake_activations(x, self.act_dtype, self.act_symmetric)
        y = jnp.matmul(x, w.T)
        if self.bias is not None:
            y = y + self.bias
        return _scalar_out(y, self.out_features)


def _x_shape(layer):
    return () if layer.in_features == "scalar" else (layer.weight.shape[-1],)


def _map_layers(fn, model, kinds):
    """``model`` with ``fn(path_parts, layer)`` replacing each module of type ``kinds``."""
    def visit(key_path, node):
        if not isinstance(node, kinds):
            return node
        parts = [str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k))))
                 for k in key_path]
        return fn(parts, node)

    return jax.tree_util.tree_map_with_path(visit, model, is_leaf=lambda n: isinstance(n, kinds))


def _weight_path(parts) -> str:
    return "/".join([*parts, "weight"])


def quantize_model(model, rules, *, act_dtype=None, act_symmetric: bool = True):
    """``model`` with each selected ``eqx.nn.Linear`` replaced by a :class:`QuantizedLinear`.

    For each ``eqx.nn.Linear``, the first of ``rules`` (:class:`arrayquant.Rule`)
    that matches its weight's path (``"layers/0/weight"``, as
    :func:`arrayquant.tree_paths` names it), shape and dtype decides: the weight
    is quantized with that rule (``axis=0`` is per output channel, ``group_size``
    groups the input features), or the layer stays float when the rule's
    ``dtype`` is None or no rule matches. ``act_dtype="int8"`` makes every
    quantized layer quantize its input per token and multiply in integers
    (W8A8). The input model is not modified; leaves other than Linear weights
    are shared with it. Each quantized layer is traced once (no compute) so
    that a weight the product cannot use fails here, not in the first call.

    Raises:
        TypeError: ``rules`` are not Rules; ``act_symmetric`` not a bool.
        ValueError: the model has no ``eqx.nn.Linear`` (or holds
            :class:`FakeQuantLinear` layers: use :func:`export`); no rule
            matched any Linear weight (the message lists their paths); a bad
            ``act_dtype``; quantizing a weight failed, or the product refuses
            it (e.g. W8A8 with groups along the output axis); the message names
            the weight path.
    """
    act = check_act(act_dtype, act_symmetric)
    matcher = Matcher(rules, "eqx.nn.Linear")
    done = []

    def convert(parts, layer):
        path = _weight_path(parts)
        if isinstance(layer, FakeQuantLinear):
            raise ValueError(f"{path} is a FakeQuantLinear: use export(model) to quantize a "
                             "model trained with fake_quantize_model")
        if isinstance(layer, QuantizedLinear):
            done.append(path)
            return layer
        rule = matcher.decide(path, layer.weight)
        if rule is None:
            return layer
        q = QuantizedLinear(quantize_weight(rule, path, layer.weight), layer.bias,
                            layer.in_features, layer.out_features, act, act_symmetric)
        check_layer(path, q, _x_shape(layer), layer.weight.dtype)
        return q

    out = _map_layers(convert, model, (eqx.nn.Linear, FakeQuantLinear, QuantizedLinear))
    matcher.finish(len(done))
    return out


def fake_quantize_model(model, rules, *, act_dtype=None, act_symmetric: bool = True):
    """``model`` with each selected ``eqx.nn.Linear`` replaced by a :class:`FakeQuantLinear`.

    The rules decide as in :func:`quantize_model`; a selected layer keeps its
    float weight (the same array) and fake-quantizes it with its rule in every
    call, and its input per token when ``act_dtype`` is given. Train the result
    as any Equinox model, then :func:`export` it.

    Raises:
        ValueError, TypeError: as :func:`quantize_model`; also a rule with a
            data-aware method (GPTQ, AWQ: they need statistics, not gradients).
    """
    act = check_act(act_dtype, act_symmetric)
    matcher = Matcher(rules, "eqx.nn.Linear", fake=True)

    def convert(parts, layer):
        rule = matcher.decide(_weight_path(parts), layer.weight)
        if rule is None:
            return layer
        return FakeQuantLinear(layer.weight, layer.bias, layer.in_features,
                               layer.out_features, rule, act, act_symmetric)

    out = _map_layers(convert, model, eqx.nn.Linear)
    matcher.finish()
    return out


def export(model):
    """``model`` with each :class:`FakeQuantLinear` replaced by a :class:`QuantizedLinear`.

    The weight becomes ``layer.rule.quantize(layer.weight)`` (the same settings,
    activations too), so ``aq.dequantize`` of it equals the fake-quantized weight
    of the trained layer bit for bit.

    Raises:
        ValueError: the model holds no :class:`FakeQuantLinear`.
    """
    seen = []

    def convert(parts, layer):
        path = _weight_path(parts)
        seen.append(path)
        return QuantizedLinear(quantize_weight(layer.rule, path, layer.weight), layer.bias,
                               layer.in_features, layer.out_features, layer.act_dtype,
                               layer.act_symmetric)

    out = _map_layers(convert, model, FakeQuantLinear)
    if not seen:
        raise ValueError("the model holds no FakeQuantLinear layer: export turns the layers of "
                         "fake_quantize_model into QuantizedLinear")
    return out
