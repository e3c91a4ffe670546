"""Quantization-aware training ends with weights that ``quantize`` exports exactly.

A 2-layer MLP is trained for a few optax steps with its weights fake-quantized (int4,
groups of 8, asymmetric, as the MiniLM benchmark's g128); the trained float weights are
then quantized with the same arguments, and the exported model's forward
(``x @ dequantize(wq).T + b``) equals the fake-quantized forward bit for bit, on NumPy
and under ``jax.jit``. (MiniLM end to end: ``benchmarks/qat_minilm.py``.)
"""

from __future__ import annotations

import numpy as np
import pytest

import arrayquant as aq

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
jnp = jax.numpy

KW = dict(dtype="int4", group_size=8)


def _mlp(params, x, weight):
    h = x @ weight(params["w1"]).T + params["b1"]
    h = h * (h > 0)  # ReLU, written for NumPy and JAX alike
    return h @ weight(params["w2"]).T + params["b2"]


@pytest.fixture(scope="module")
def trained():
    kw = KW
    rng = np.random.default_rng(0)
    params = {"w1": rng.standard_normal((32, 16)), "b1": np.zeros(32),
              "w2": rng.standard_normal((4, 32)) / 4, "b2": np.zeros(4)}
    params = {k: v.astype(np.float32) for k, v in params.items()}
    x = rng.standard_normal((64, 16)).astype(np.float32)
    target = np.tanh(x[:, :4]).astype(np.float32)

    def loss(p):
        y = _mlp(p, x, lambda w: aq.fake_quantize(w, **kw))
        return jnp.mean((y - target) ** 2)

    opt = optax.adam(3e-2)

    @jax.jit
    def step(p, state):
        value, grads = jax.value_and_grad(loss)(p)
        updates, state = opt.update(grads, state, p)
        return optax.apply_updates(p, updates), state, value

    p = jax.tree.map(jnp.asarray, params)
    state = opt.init(p)
    losses = []
    for _ in range(5):
        p, state, value = step(p, state)
        losses.append(float(value))
    p = {k: np.asarray(v) for k, v in p.items()}
    return kw, params, p, x, losses


def test_training_moves_the_quantized_weights(trained):
    kw, start, p, _, losses = trained
    assert losses[-1] < losses[0]
    before = aq.dequantize(aq.quantize(start["w1"], **kw))
    after = aq.dequantize(aq.quantize(p["w1"], **kw))
    assert not np.array_equal(before, after)  # codes (or scales) changed in training


@pytest.mark.parametrize("jit", [False, True], ids=["numpy", "jax-jit"])
def test_exported_forward_is_bit_exact(trained, jit):
    kw, _, p, x, _ = trained
    exported = aq.quantize_tree(p, aq.Rule(include="^w", **kw))
    assert all(isinstance(exported[k], aq.QArray) for k in ("w1", "w2"))

    def forwards(p, q, x):
        fake = _mlp(p, x, lambda w: aq.fake_quantize(w, **kw))
        exact = _mlp(q, x, aq.dequantize)
        h = aq.linear(x, q["w1"], q["b1"])  # the real quantized products
        return fake, exact, aq.linear(h * (h > 0), q["w2"], q["b2"])

    if jit:  # one program (one compile); the three results do not share any work
        forwards = jax.jit(forwards)
        p, exported, x = jax.tree.map(jnp.asarray, (p, exported, x))
    fake, exact, product = (np.asarray(a) for a in forwards(p, exported, x))
    np.testing.assert_array_equal(exact, fake)
    # The real product sums in another order: equal to rounding, not bit for bit.
    np.testing.assert_allclose(product, fake, rtol=1e-5, atol=1e-5)
