"""The quantized layers' product, aware of ``jax.vmap`` and differentiable in ``x``.

:func:`arrayquant.linear` picks its formulation from the static number of rows.
Under ``jax.vmap`` (how Equinox layers meet a batch: one vector per call) it
sees one row and picks a one-row formulation (a reduction per output), which
vmap then turns into a broadcast of the whole weight per example: on XLA CPU
tens of times slower than the batched product. :func:`product` is a
``jax.custom_batching.custom_vmap`` whose batching rule calls the product once
on the whole batch instead (the vmapped axis becomes rows), so
``jax.vmap(layer)(xs)`` computes exactly ``aq.linear(xs, w, b)``.

``custom_vmap`` has no reverse-mode rule of its own, so the product is also a
``jax.custom_vjp``: the gradient with respect to ``x`` is ``ct @ W`` (``W`` the
represented weight, multiplied by :func:`arrayquant.matmul` /
:func:`arrayquant.linear` without a float copy; straight-through over the
activation quantization of W8A8), with respect to the bias the sum of ``ct``,
and none with respect to the quantized weight (zero: it is not trained here).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap

from arrayquant.affine import dequantize
from arrayquant.products import linear, matmul
from arrayquant.qarray import QArray

__all__ = ["product"]


def _plain(x, w, bias, act_dtype, act_symmetric, kn):
    if kn:
        y = matmul(x, w, act_dtype=act_dtype, act_symmetric=act_symmetric)
        return y if bias is None else y + bias
    return linear(x, w, bias, act_dtype=act_dtype, act_symmetric=act_symmetric)


@functools.cache
def _batch_aware(act_dtype, act_symmetric, kn):
    @custom_vmap
    def f(x, w, bias):
        return _plain(x, w, bias, act_dtype, act_symmetric, kn)

    @f.def_vmap
    def rule(axis_size, in_batched, x, w, bias):
        xb, wb, bb = in_batched
        if xb and not any(jax.tree.leaves((wb, bb))):
            # Only the input is batched: its vmapped axis is one more leading axis of rows.
            return _plain(x, w, bias, act_dtype, act_symmetric, kn), True
        # A batch of weights (an ensemble of layers): one product per member.
        axes = jax.tree.map(lambda b: 0 if b else None, (xb, wb, bb))
        return jax.vmap(lambda *a: _plain(*a, act_dtype, act_symmetric, kn),
                        in_axes=axes)(x, w, bias), True

    return f


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def product(x, w, bias, act_dtype, act_symmetric, kn):
    """``aq.matmul(x, w) + bias`` (``kn``: ``w`` in (in, out) layout) or
    ``aq.linear(x, w, bias)`` (``w`` in (out, in)), see the module docstring."""
    return _batch_aware(act_dtype, act_symmetric, kn)(x, w, bias)


def _fwd(x, w, bias, act_dtype, act_symmetric, kn):
    return product(x, w, bias, act_dtype, act_symmetric, kn), (x, w, bias)


def _bwd(act_dtype, act_symmetric, kn, res, ct):
    x, w, bias = res
    if isinstance(w, QArray):
        # ct @ W for W (out, in) is matmul on (out, in); ct @ W.T for W (in, out) is linear.
        dx = linear(ct, w) if kn else matmul(ct, w)
    else:  # a LinearWeight (its in_scale and perm live on the input side): dequantize
        wf = dequantize(w)
        dx = ct @ (wf.T if kn else wf)
    db = None if bias is None else jnp.sum(ct, axis=tuple(range(ct.ndim - 1))).astype(
        bias.dtype)
    return dx.astype(x.dtype), None, db


product.defvjp(_fwd, _bwd)
