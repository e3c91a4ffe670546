"""Flax NNX models with quantized linear layers: module replacement, no float weight copies.

An NNX model is a mutable graph of modules whose arrays live in
``nnx.Variable`` s. Quantizing it replaces, in a copy of the graph
(``nnx.recursive_map``, which keeps shared modules shared), every
``nnx.Linear`` whose kernel path a rule selects by a module of the same
interface:

- :func:`quantize_model` -> :class:`QuantizedLinear`: the kernel is a
  :class:`~arrayquant.QArray` held in a :class:`QuantizedParam`, an
  ``nnx.Variable`` subclass that is *not* an ``nnx.Param``: optimizers and
  ``nnx.grad`` filtered on ``nnx.Param`` leave it alone, while ``nnx.split``
  / ``merge`` / ``update`` / ``state``, ``nnx.jit`` and ``jax.jit`` over the
  split state carry its codes and scales (the QArray is a pytree). The
  product is :func:`arrayquant.matmul` on the QArray (W8A16, W4A16 packed,
  W8A8 with ``act_dtype="int8"``). ``nnx.Linear`` itself reads its kernel
  with ``kernel[...]``, which a QArray refuses; that is why a QArray put into
  an ``nnx.Linear`` fails and a module of its own is needed.
- :func:`fake_quantize_model` -> :class:`FakeQuantLinear`: the kernel stays an
  ``nnx.Param`` (the same Variable's value), fake-quantized with
  :func:`arrayquant.fake_quantize` in each call; :func:`export` gives the
  :class:`QuantizedLinear` to deploy.

Paths are those of ``aq.tree_paths(nnx.state(model))``: ``layers/0/kernel``.
Rules see the ``(in, out)`` kernel as it is, as :func:`arrayquant.quantize_tree`
on the state would: per output channel is ``axis=1`` (or ``-1``), groups
along the input features are ``group_size=g, group_axis=0``.

Examples:
    >>> from flax import nnx
    >>> import jax.numpy as jnp, arrayquant as aq
    >>> from arrayquant.integrations.nnx import quantize_model
    >>> class MLP(nnx.Module):
    ...     def __init__(self, rngs):
    ...         self.layers = nnx.List([nnx.Linear(16, 32, rngs=rngs),
    ...                                 nnx.Linear(32, 8, rngs=rngs)])
    ...     def __call__(self, x):
    ...         return self.layers[1](nnx.relu(self.layers[0](x)))
    >>> qmlp = quantize_model(MLP(nnx.Rngs(0)), aq.Rule(dtype="int8", symmetric=True, axis=1))
    >>> type(qmlp.layers[0]).__name__, qmlp.layers[0].kernel.get_value().qtype
    ('QuantizedLinear', 'int8')
    >>> qmlp(jnp.ones((4, 16))).shape
    (4, 8)
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from arrayquant.integrations._common import (
    Matcher,
    check_act,
    check_layer,
    fake_activations,
    fake_weight,
    join_path,
    quantize_weight,
)
from arrayquant.integrations._product import product
from arrayquant.trees import Rule

__all__ = ["FakeQuantLinear", "QuantizedLinear", "QuantizedParam", "export",
           "fake_quantize_model", "quantize_model"]


class QuantizedParam(nnx.Variable):
    """A Variable holding a quantized array (a :class:`~arrayquant.QArray`).

    Not an ``nnx.Param``: a quantized weight has integer codes and is not
    trained, so ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` and
    ``nnx.DiffState(0, nnx.Param)`` skip it. Select it with ``QuantizedParam``
    in filters (``nnx.state(model, QuantizedParam)``).
    """


def _cast(x, dtype):
    return x if dtype is None else x.astype(dtype)


class QuantizedLinear(nnx.Module):
    """``nnx.Linear`` with a quantized kernel: ``y = aq.matmul(x, kernel) + bias``.

    Args:
        kernel: a :class:`~arrayquant.QArray` (or an ``(in, out)``
            :class:`~arrayquant.LinearWeight`), stored in a :class:`QuantizedParam`.
        bias: ``None``, a float ``(out,)`` array, or an ``nnx.Variable`` holding
            one (kept as it is: a bias given as an ``nnx.Param`` stays trainable).
        act_dtype: ``None`` (weight-only), or e.g. ``"int8"``: the input is
            quantized per token and multiplied in integers (W8A8).
        act_symmetric: symmetric per-token activation codes (default).
        dtype: as ``nnx.Linear``'s ``dtype``: when set, ``x`` is cast to it
            before the product and the result (float32 inside) after it.

    ``x`` is ``(..., in)``; the result ``(..., out)``. The kernel is read
    with ``get_value()`` and handed to :func:`arrayquant.matmul` as it is
    stored. Under ``jax.vmap`` / ``nnx.vmap`` the product runs once on the
    whole batch; gradients flow to ``x`` and ``bias``, not to the kernel.
    """

    def __init__(self, kernel, bias=None, *, act_dtype=None, act_symmetric: bool = True,
                 dtype=None):
        if len(kernel.shape) != 2:
            raise ValueError(f"kernel must be 2-D (in, out); got shape {tuple(kernel.shape)}")
        self.in_features, self.out_features = kernel.shape
        self.kernel = QuantizedParam(kernel)
        self.bias = bias if bias is None or isinstance(bias, nnx.Variable) else nnx.Param(bias)
        self.act_dtype = check_act(act_dtype, act_symmetric)
        self.act_symmetric = act_symmetric
        self.dtype = dtype

    @property
    def use_bias(self) -> bool:
        return self.bias is not None

    def __call__(self, x):
        bias = None if self.bias is None else _cast(self.bias.get_value(), self.dtype)
        y = product(_cast(x, self.dtype), self.kernel.get_value(), bias, self.act_dtype,
                    self.act_symmetric, True)
        return _cast(y, self.dtype)


class FakeQuantLinear(nnx.Module):
    """``nnx.Linear`` for quantization-aware training: ``y = fq(x) @ fq(kernel) + bias``.

    ``kernel`` is an ``nnx.Param`` holding the float ``(in, out)`` kernel;
    ``fq(kernel)`` is ``aq.fake_quantize`` with ``rule``'s settings, equal to
    ``aq.dequantize(rule.quantize(kernel))`` bit for bit, with a clipped
    straight-through gradient. ``fq(x)`` is ``x`` itself, or with
    ``act_dtype`` its per-token fake quantization (one scale per index of the
    leading axes, one for a 1-D ``x``), as the integer product of W8A8
    quantizes it. :func:`export` gives the :class:`QuantizedLinear`.
    """

    def __init__(self, kernel, bias, rule: Rule, *, act_dtype=None,
                 act_symmetric: bool = True, dtype=None):
        self.kernel = kernel if isinstance(kernel, nnx.Variable) else nnx.Param(kernel)
        self.bias = bias if bias is None or isinstance(bias, nnx.Variable) else nnx.Param(bias)
        self.in_features, self.out_features = self.kernel.get_value().shape
        self.rule = rule
        self.act_dtype = check_act(act_dtype, act_symmetric)
        self.act_symmetric = act_symmetric
        self.dtype = dtype

    @property
    def use_bias(self) -> bool:
        return self.bias is not None

    def __call__(self, x):
        x = _cast(x, self.dtype)
        k = _cast(fake_weight(self.kernel.get_value(), self.rule), self.dtype)
        if self.act_dtype is not None:
            x = fake_activations(x, self.act_dtype, self.act_symmetric)
        y = jnp.matmul(x, k)
        if self.bias is not None:
            y = y + _cast(self.bias.get_value(), self.dtype)
        return y


def _map_layers(fn, model, kinds):
    """A copy of ``model`` with ``fn(path_parts, layer)`` replacing each module of ``kinds``.

    The copy has its own Variables (holding the same arrays), so updating one model
    never changes the other.
    """
    def visit(parts, node):
        return fn(parts, node) if isinstance(node, kinds) else node

    return nnx.recursive_map(visit, nnx.clone(model))


def quantize_model(model, rules, *, act_dtype=None, act_symmetric: bool = True):
    """A copy of ``model`` with each selected ``nnx.Linear`` made a :class:`QuantizedLinear`.

    For each ``nnx.Linear``, the first of ``rules`` (:class:`arrayquant.Rule`)
    that matches its kernel's path (``"layers/0/kernel"``, as
    ``aq.tree_paths(nnx.state(model))`` names it), shape and dtype decides: the
    ``(in, out)`` kernel is quantized with that rule as it stands (per output
    channel: ``axis=1``; groups along in: ``group_size=g, group_axis=0``), or
    the layer stays float when the rule's ``dtype`` is None or no rule
    matches. ``act_dtype="int8"`` makes every quantized layer W8A8. The
    Linear's bias Variable and ``dtype`` carry over; its ``precision`` and
    ``dot_general`` do not (the product is arrayquant's). ``model`` is not
    modified. Each quantized layer is traced once (no compute), so that a
    kernel the product cannot use fails here, not in the first call.

    Raises:
        TypeError: ``rules`` are not Rules; ``act_symmetric`` not a bool.
        ValueError: the model has no ``nnx.Linear`` (or holds
            :class:`FakeQuantLinear` layers: use :func:`export`); no rule
            matched any kernel (the message lists their paths); a bad
            ``act_dtype``; quantizing a kernel failed, or the product refuses it
            (W8A8 needs per-tensor, per-output-channel or groups along in); the
            message names the kernel path.
    """
    act = check_act(act_dtype, act_symmetric)
    matcher = Matcher(rules, "nnx.Linear")
    done = []

    def convert(parts, layer):
        path = join_path(parts, "kernel")
        if isinstance(layer, FakeQuantLinear):
            raise ValueError(f"{path} is a FakeQuantLinear: use export(model) to quantize a "
                             "model trained with fake_quantize_model")
        if isinstance(layer, QuantizedLinear):
            done.append(path)
            return layer
        kernel = layer.kernel.get_value()
        rule = matcher.decide(path, kernel)
        if rule is None:
            return layer
        q = QuantizedLinear(quantize_weight(rule, path, kernel), layer.bias, act_dtype=act,
                            act_symmetric=act_symmetric, dtype=layer.dtype)
        check_layer(path, q, (layer.in_features,), kernel.dtype)
        return q

    out = _map_layers(convert, model, (nnx.Linear, FakeQuantLinear, QuantizedLinear))
    matcher.finish(len(done))
    return out


def fake_quantize_model(model, rules, *, act_dtype=None, act_symmetric: bool = True):
    """A copy of ``model`` with each selected ``nnx.Linear`` made a :class:`FakeQuantLinear`.

    The rules decide as in :func:`quantize_model`. A selected layer keeps its
    kernel and bias as ``nnx.Param`` s (new Variables holding the same arrays),
    so ``nnx.Optimizer(qat_model, tx, wrt=nnx.Param)`` trains them; the kernel
    is fake-quantized with the rule in every call, and the input per token
    when ``act_dtype`` is given. Train, then :func:`export`.

    Raises:
        ValueError, TypeError: as :func:`quantize_model`; also a rule with a
            data-aware method (GPTQ, AWQ: they need statistics, not gradients).
    """
    act = check_act(act_dtype, act_symmetric)
    matcher = Matcher(rules, "nnx.Linear", fake=True)

    def convert(parts, layer):
        rule = matcher.decide(join_path(parts, "kernel"), layer.kernel.get_value())
        if rule is None:
            return layer
        return FakeQuantLinear(layer.kernel, layer.bias, rule, act_dtype=act,
                               act_symmetric=act_symmetric, dtype=layer.dtype)

    out = _map_layers(convert, model, nnx.Linear)
    matcher.finish()
    return out


def export(model):
    """A copy of ``model`` with each :class:`FakeQuantLinear` made a :class:`QuantizedLinear`.

    The kernel becomes ``layer.rule.quantize(kernel)`` (the same settings,
    activations and ``dtype`` too), so ``aq.dequantize`` of it equals the
    trained layer's fake-quantized kernel bit for bit.

    Raises:
        ValueError: the model holds no :class:`FakeQuantLinear`.
    """
    seen = []

    def convert(parts, layer):
        path = join_path(parts, "kernel")
        seen.append(path)
        return QuantizedLinear(quantize_weight(layer.rule, path, layer.kernel.get_value()),
                               layer.bias, act_dtype=layer.act_dtype,
                               act_symmetric=layer.act_symmetric, dtype=layer.dtype)

    out = _map_layers(convert, model, FakeQuantLinear)
    if not seen:
        raise ValueError("the model holds no FakeQuantLinear layer: export turns the layers of "
                         "fake_quantize_model into QuantizedLinear")
    return out
