"""What jax.grad gives through dequantize(quantize(x)): the quantizer's own derivative.

docs/jax.md ("Gradients") states it; a straight-through estimator is not what quantize does.
"""

from __future__ import annotations

import numpy as np
import pytest

import arrayquant as aq

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("gran", [{}, {"axis": 0}, {"group_size": 4}])
def test_gradient_flows_only_through_the_scale_at_each_blocks_extremes(symmetric, gran):
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((3, 8)).astype(np.float32)
    # A positive maximum and a negative minimum in every block, none tied (JAX splits the
    # gradient of max / min evenly among tied elements).
    x_np[0, 1] = 5.0
    x_np[:, 0] = [-4.0, -4.1, -4.2]
    x_np[:, 4] = [3.0, 3.1, 3.2]
    x_np[:, 5] = [-3.5, -3.6, -3.7]
    c_np = rng.standard_normal((3, 8)).astype(np.float32)
    kw = {"dtype": "int8", "symmetric": symmetric, **gran}

    def loss(x):
        return jnp.sum(aq.dequantize(aq.quantize(x, **kw)) * jnp.asarray(c_np))

    grad = np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(x_np)), np.float64)
    qa = aq.quantize(x_np, **kw)
    qt = aq.as_qtype("int8")
    codes = qa.codes.astype(np.float64)
    z = 0.0 if symmetric else qa.zero_point.astype(np.float64)
    expected = np.zeros_like(grad)
    bshape = qa.block_shape
    for idx in np.ndindex(qa.scale.shape):
        sl = tuple(slice(i * b, (i + 1) * b) for i, b in zip(idx, bshape))
        xb, cb = x_np[sl], c_np[sl].astype(np.float64)
        zb = z if symmetric else z[idx]
        weighted = np.sum(cb * (codes[sl] - zb))
        eb = np.zeros(xb.shape)
        if symmetric:
            i = np.unravel_index(np.argmax(np.abs(xb)), xb.shape)
            eb[i] = np.sign(xb[i]) * weighted / qt.qmax
        else:
            eb[np.unravel_index(np.argmax(xb), xb.shape)] = weighted / (qt.qmax - qt.qmin)
            eb[np.unravel_index(np.argmin(xb), xb.shape)] = -weighted / (qt.qmax - qt.qmin)
        expected[sl] = eb
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-6)
    nonzero_per_block = 1 if symmetric else 2
    assert np.count_nonzero(grad) == nonzero_per_block * qa.scale.size
