"""Flax Linen: ``nn.Dense`` layers on quantized kernels, with real quantized products.

A Linen model holds no weights: ``model.apply(variables, x)`` builds its layers
while it runs and hands each ``nn.Dense`` the ``kernel`` leaf of
``variables["params"]``, which Dense casts and passes to ``lax.dot_general``.
A :class:`~arrayquant.QArray` cannot go there (Flax fails with "Could not
convert QArray ... to a NumPy dtype"), and dequantizing the tree first rebuilds
a float copy of every kernel inside the compiled program.

This module intercepts ``Dense.__call__`` (and ``DenseGeneral.__call__`` over
the last axis with a 2-D kernel) with :func:`flax.linen.intercept_methods`.
Inside :func:`quantized` (or :func:`apply`), a layer whose kernel is quantized
computes ``aq.matmul(x, kernel, act_dtype=act_dtype) + bias`` instead of its own
body; every other layer runs unchanged. Inside :func:`fake_quantized`, a layer
whose float kernel a rule selects runs its own product on
``aq.fake_quantize(kernel, <the rule's settings>)`` (straight-through
gradients), and :func:`export` turns the trained kernels into QArrays whose
dequantized values are exactly those fake-quantized kernels.

Why interception: the model's code and its params tree stay as they are (the
kernel leaf simply becomes a QArray), nothing has to be written per layer, and
the interceptor acts while JAX traces, so it works under ``jax.jit``,
``nn.scan`` (a QArray quantized with ``batch_axes=1`` is sliced layer by layer
like the float kernel) and ``nn.remat``. ``model.init`` is unaffected: while a
layer has no kernel yet, the interceptor calls the layer itself.

Rules are :class:`~arrayquant.Rule` s matched on the paths of the params tree
(``variables["params"]``), e.g. ``Dense_0/kernel`` or
``Encoder_0/layer_3/query/kernel``: pass the params, not the variables dict, to
:func:`quantize_params` and :func:`export`, so that these paths are the ones
:func:`fake_quantized` sees. Linen kernels are ``(in, out)``: per output channel
is ``axis=-1``, groups along the input features ``group_size=g,
group_axis=0``.

Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, arrayquant as aq
    >>> from arrayquant.integrations import linen as aql
    >>> model = nn.Sequential([nn.Dense(32), nn.relu, nn.Dense(8)])
    >>> x = jnp.ones((2, 16))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> rules = aq.Rule(include="kernel$", dtype="int8", symmetric=True, axis=-1)
    >>> qparams = aql.quantize_params(params, rules)
    >>> y = aql.apply(model, {"params": qparams}, x, act_dtype="int8")   # W8A8
    >>> y.shape, type(qparams["layers_0"]["kernel"]).__name__
    ((2, 8), 'QArray')
"""

from __future__ import annotations

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from arrayquant.affine.methods import is_data_aware
from arrayquant.integrations._common import check_act
from arrayquant.products import matmul
from arrayquant.training import fake_quantize
from arrayquant.trees import as_rules, flatten_tree, is_quantized, quantize_tree, select_rule

__all__ = ["apply", "export", "fake_quantized", "quantize_params", "quantized"]

_LAYERS = (nn.Dense, nn.DenseGeneral)


# --------------------------------------------------------------------------- params


def quantize_params(params, rules):
    """The params tree with the Dense kernels that ``rules`` select replaced by QArrays.

    This is :func:`arrayquant.quantize_tree` (the first matching rule decides,
    paths joined by ``"/"``), plus a check that every quantized leaf is a 2-D
    ``kernel``: those are the leaves :func:`quantized` runs products on; a
    quantized embedding or convolution kernel would make Flax fail later in
    ``apply``. A stacked ``(L, in, out)`` kernel of an ``nn.scan`` needs
    ``batch_axes=1`` in its rule (one set of scales per layer).

    Args:
        params: the ``"params"`` collection of the model's variables.
        rules: an :class:`~arrayquant.Rule` or a sequence of them, e.g.
            ``Rule(include="kernel$", dtype="int4", symmetric=True, group_size=128,
            group_axis=0)``.

    Raises:
        ValueError: a rule selected a leaf that is not named ``kernel`` or is not
            2-D (per layer); the errors of :func:`arrayquant.quantize_tree`.
    """
    qparams = quantize_tree(params, rules)
    bad = [f"{path} {tuple(leaf.shape)}" for path, leaf in flatten_tree(qparams)
           if is_quantized(leaf) and not (path.split("/")[-1] == "kernel"
                                          and len(leaf.shape) == 2)]
    if bad:
        raise ValueError(
            f"the rules quantized {bad[:3]}, but Linen runs quantized products only on the "
            "2-D 'kernel' of nn.Dense / nn.DenseGeneral (stacked kernels need batch_axes=1): "
            "narrow the rules, e.g. Rule(include='kernel$', ...), or exclude these paths")
    return qparams


def export(params, rules):
    """The exact integer weights of a model trained inside :func:`fake_quantized`.

    ``quantize_params(params, rules)`` with the same ``rules``: every selected
    kernel becomes a QArray whose :func:`~arrayquant.dequantize` equals, bit
    for bit, the fake-quantized kernel that the training forward used
    (``fake_quantize(x, ...) == dequantize(quantize(x, ...))``). Run the
    result with :func:`quantized` / :func:`apply`: weight-only products give
    the fake-quantized forward up to the rounding of float sums.
    """
    return quantize_params(params, rules)


# --------------------------------------------------------------------------- interception


def _read(module, name):
    return module.get_variable("params", name) if module.has_variable("params", name) else None


def _layer_input(args, kwargs):
    if args:
        return args[0]
    if "inputs" in kwargs:
        return kwargs["inputs"]
    raise TypeError("arrayquant.integrations.linen: the Dense call has no input array")


def _check_layer(module, kernel, x, path):
    if len(kernel.shape) != 2:
        raise ValueError(f"{path}: arrayquant runs a Dense layer on a 2-D kernel (in, out); "
                         f"got shape {tuple(kernel.shape)}")
    if isinstance(module, nn.DenseGeneral):
        axis = module.axis if isinstance(module.axis, tuple) else (module.axis,)
        if module.batch_dims or len(axis) != 1 or axis[0] not in (-1, x.ndim - 1):
            raise ValueError(
                f"{path}: arrayquant runs nn.DenseGeneral only over the last axis with no "
                f"batch_dims (got axis={module.axis!r}, batch_dims={module.batch_dims!r}): keep "
                "this kernel in float (exclude it from the rules)")


def _bias(module):
    return _read(module, "bias") if module.use_bias else None


def _as_jax(tree):
    # NumPy leaves (aq.load, quantize_params on NumPy params) become JAX arrays, as Flax
    # turns NumPy params into JAX arrays for its own layers; JAX arrays stay as they are.
    return jax.tree.map(jnp.asarray, tree)


def _quantized_forward(module, x, kernel, act_dtype, act_symmetric):
    x = jnp.asarray(x, module.dtype)
    kernel = _as_jax(kernel)
    y = matmul(x, kernel, act_dtype=act_dtype, act_symmetric=act_symmetric)
    bias = _bias(module)
    if bias is not None:
        y = y + jnp.asarray(bias)
    return y if module.dtype is None else y.astype(module.dtype)


def _float_forward(module, x, kernel):
    # nn.Dense's own computation, on the kernel given here.
    bias = _bias(module)
    x, kernel, bias = module.promote_dtype(x, kernel, bias, dtype=module.dtype)
    y = lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())),
                        precision=module.precision)
    if bias is not None:
        y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    return y


def _intercept(replace):
    """An interceptor that lets ``replace(module, kernel, x, path)`` compute a Dense layer
    (when it returns an array) or hand it back to the layer itself (``None``)."""

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__" and isinstance(module, _LAYERS):
            kernel = _read(module, "kernel")  # None during model.init
            if kernel is not None:
                x = _layer_input(args, kwargs)
                y = replace(module, kernel, x, "/".join((*module.path, "kernel")))
                if y is not None:
                    return y
        return next_fun(*args, **kwargs)

    return interceptor


@contextlib.contextmanager
def quantized(act_dtype=None, *, act_symmetric: bool = True):
    """Inside this context, Dense layers with a quantized kernel run ``aq.matmul``.

    For every ``nn.Dense`` (and ``nn.DenseGeneral`` over the last axis) whose
    ``kernel`` is a :class:`~arrayquant.QArray` (or a
    :class:`~arrayquant.LinearWeight`), ``model.apply`` computes
    ``aq.matmul(x, kernel, act_dtype=act_dtype, act_symmetric=act_symmetric)
    + bias`` (cast to the layer's ``dtype`` if it has one): weight-only
    products (W8A16, packed W4A16) for ``act_dtype=None``, the integer product
    with per-token activations for ``act_dtype="int8"`` (W8A8). Layers with a
    float kernel, and ``model.init``, run unchanged. The layer's
    ``precision`` and ``dot_general`` settings do not apply to quantized
    products.

    Works under ``jax.jit`` and nests with :func:`fake_quantized`. The
    interceptor acts while JAX traces, so enter the context *inside* the
    function you jit (as :func:`apply` does): a jitted function traced before
    outside the context is reused from JAX's cache without it when the
    arguments have the same structure.

    Raises:
        ValueError: an unknown ``act_dtype``; when applying, a quantized kernel
            that is not 2-D or a DenseGeneral over other axes; the errors of
            :func:`arrayquant.matmul`.
    """
    check_act(act_dtype, act_symmetric)

    def replace(module, kernel, x, path):
        if not is_quantized(kernel):
            return None
        _check_layer(module, kernel, x, path)
        return _quantized_forward(module, x, kernel, act_dtype, act_symmetric)

    with nn.intercept_methods(_intercept(replace)):
        yield


def apply(model, variables, *args, act_dtype=None, act_symmetric: bool = True, **kwargs):
    """``model.apply(variables, *args, **kwargs)`` inside :func:`quantized`.

    ``variables`` is ``{"params": quantize_params(params, rules), ...}``.
    """
    with quantized(act_dtype, act_symmetric=act_symmetric):
        return model.apply(variables, *args, **kwargs)


@contextlib.contextmanager
def fake_quantized(rules, act_dtype=None, *, act_symmetric: bool = True):
    """Inside this context, Dense layers run on fake-quantized kernels (training).

    For every ``nn.Dense`` (and ``nn.DenseGeneral`` over the last axis) whose
    float ``kernel`` at ``path`` (``Dense_0/kernel``, as in the params tree) is
    selected by ``rules`` (first match, as :func:`arrayquant.quantize_tree`),
    the layer computes its own product on ``aq.fake_quantize(kernel, rule.dtype,
    rule.symmetric, rule.axis, rule.group_size, rule.group_axis,
    scale_dtype=rule.scale_dtype, method=rule.method)``: the forward of the
    exported model (:func:`export`), with clipped straight-through gradients to
    the float kernel, so ``jax.grad`` of a loss through ``model.apply`` trains it.
    With ``act_dtype`` (e.g. ``"int8"``) the layer's input is fake-quantized per
    token too (one scale per row, as W8A8 does it; ``act_symmetric`` as in
    :func:`quantized`).

    Layers no rule selects (or whose rule has ``dtype=None``) and quantized
    kernels run unchanged, so this nests with :func:`quantized`. Enter it inside
    the loss function you differentiate and jit (see :func:`quantized` on JAX's
    trace cache). Under
    ``nn.scan`` each step sees one layer's kernel: give the rule
    ``batch_axes=1`` so that :func:`export` quantizes the stacked leaf layer by
    layer too.

    Raises:
        TypeError: ``rules`` holds something other than Rules.
        ValueError: a rule with a data-aware method (GPTQ, AWQ, ...: they need
            activation statistics, not gradients); an unknown ``act_dtype``.
    """
    rules = as_rules(rules)
    for r in rules:
        if r.dtype is not None and is_data_aware(r.method):
            raise ValueError(f"fake_quantized: {r!r} has the data-aware method {r.method!r}, "
                             "which quantizes with activation statistics, not in training")
    check_act(act_dtype, act_symmetric)

    def replace(module, kernel, x, path):
        if is_quantized(kernel):
            return None
        rule = select_rule(rules, path, kernel.shape, kernel.dtype)
        if rule is None or rule.dtype is None:
            return None
        _check_layer(module, kernel, x, path)
        kernel, x = jnp.asarray(kernel), jnp.asarray(x)  # JAX arrays: straight-through grads
        fq = fake_quantize(kernel, rule.dtype, rule.symmetric, rule.axis, rule.group_size,
                           rule.group_axis, scale_dtype=rule.scale_dtype, method=rule.method)
        if act_dtype is not None:
            x = fake_quantize(x, act_dtype, act_symmetric, tuple(range(x.ndim - 1)) or None)
        return _float_forward(module, x, fq)

    with nn.intercept_methods(_intercept(replace)):
        yield
