"""arrayquant.integrations.equinox and .nnx: quantized and fake-quantized linear layers.

A 16 -> 32 -> 8 MLP per framework, quantized W8A16 (int8 per output channel), W4A16
(int4, groups of 8 along in, packed) and W8A8. The model's output must equal
``aq.linear`` / ``aq.matmul`` on the same QArrays applied layer by layer. Under
``jax.jit`` each layer is equal bit for bit; for the whole MLP, XLA fuses the
model's program and the hand-written one differently (bias, relu and the
product's epilogue), so the two may differ by an ulp of the output there.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

import arrayquant as aq  # noqa: E402

CASES = {  # name: (rule for (out, in) weights, rule for (in, out) kernels, act_dtype)
    "W8A16": (dict(dtype="int8", symmetric=True, axis=0),
              dict(dtype="int8", symmetric=True, axis=1), None),
    "W4A16": (dict(dtype="int4", symmetric=True, group_size=8),
              dict(dtype="int4", symmetric=True, group_size=8, group_axis=0), None),
    "W8A8": (dict(dtype="int8", symmetric=True, axis=0),
             dict(dtype="int8", symmetric=True, axis=1), "int8"),
}


def _x(n=4, k=16):
    return jnp.asarray(np.random.default_rng(1).standard_normal((n, k)).astype(np.float32))


def _ulps_close(a, b, n=4):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=0, atol=n * np.finfo(np.float32).eps
                               * np.abs(b).max())


# ----------------------------------------------------------------------------- Equinox


@pytest.fixture(scope="module")
def eqx_mlp():
    eqx = pytest.importorskip("equinox")
    return eqx.nn.MLP(16, 8, 32, 1, key=jax.random.key(0))


def _eqx_ref(q, x, act):
    """The MLP by hand: aq.linear on the quantized layers' own weights."""
    l0, l1 = q.layers
    h = jax.nn.relu(aq.linear(x, l0.weight, l0.bias, act_dtype=act))
    return aq.linear(h, l1.weight, l1.bias, act_dtype=act)


@pytest.mark.parametrize("case", sorted(CASES))
def test_equinox_quantized_equals_linear(eqx_mlp, case):
    import equinox as eqx

    from arrayquant.integrations import equinox as aqe

    rule, _, act = CASES[case]
    # Under filter_jit: one compiled program instead of op-by-op dispatch.
    q = eqx.filter_jit(aqe.quantize_model)(eqx_mlp, aq.Rule(**rule), act_dtype=act)
    assert [type(layer).__name__ for layer in q.layers] == ["QuantizedLinear"] * 2
    w0 = q.layers[0].weight
    assert isinstance(w0, aq.QArray) and w0.shape == (32, 16) and w0.qtype == rule["dtype"]
    assert (w0.packed_axis is not None) == (case == "W4A16")
    x = _x()
    p, s = eqx.partition(q, eqx.is_array)

    @jax.jit
    def run(p, x):  # Equinox's idiom: vmap over single vectors
        m = eqx.combine(p, s)
        return jax.vmap(m)(x), jax.vmap(m.layers[0])(x)

    @jax.jit
    def by_hand(p, x):
        return _eqx_ref(p, x, act), aq.linear(x, p.layers[0].weight, p.layers[0].bias,
                                              act_dtype=act)

    (y, y0), (ref, ref0) = run(p, x), by_hand(p, x)
    np.testing.assert_array_equal(y0, ref0)  # the layer: the batched product, exactly
    _ulps_close(y, ref)
    yf = jax.vmap(eqx_mlp)(x)
    assert np.linalg.norm(ref - yf) < 0.2 * np.linalg.norm(yf)
    # The compiled function takes integer codes, no float weight.
    dtypes = [str(a.dtype) for a in jax.tree.leaves(p)]
    assert dtypes.count("uint8" if case == "W4A16" else "int8") == 2
    assert "float32" not in {str(a.dtype) for a in jax.tree.leaves(p) if a.ndim == 2
                             and a.shape in ((32, 16), (8, 32))}


def test_equinox_gradients_reach_x_and_bias(eqx_mlp):
    import equinox as eqx

    from arrayquant.integrations import equinox as aqe

    q = eqx.filter_jit(aqe.quantize_model)(
        eqx_mlp, aq.Rule(dtype="int4", symmetric=True, group_size=8))
    x = _x()

    @eqx.filter_jit
    def grads(q, x):
        batched = jax.grad(lambda x: jnp.sum(jax.vmap(q)(x) ** 2))(x)
        per_example = jax.vmap(jax.grad(lambda xi: jnp.sum(q(xi) ** 2)))(x)
        by_hand = jax.grad(lambda x: jnp.sum(_eqx_ref(q, x, None) ** 2))(x)
        model = eqx.filter_grad(lambda m: jnp.sum(jax.vmap(m)(x) ** 2))(q)
        return batched, per_example, by_hand, model.layers[0].bias

    batched, per_example, by_hand, gb = grads(q, x)
    np.testing.assert_allclose(batched, by_hand, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(per_example, by_hand, rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(gb)) and np.any(gb != 0)


def test_equinox_rules_by_path_scalar_and_no_bias(eqx_mlp):
    import equinox as eqx

    from arrayquant.integrations import equinox as aqe

    assert aq.tree_paths(eqx_mlp)[::2] == ["layers/0/weight", "layers/1/weight"]
    rules = [aq.Rule(include="layers/1/", dtype=None), aq.Rule(dtype="int8", axis=0)]
    q = eqx.filter_jit(aqe.quantize_model)(eqx_mlp, rules)
    assert type(q.layers[0]).__name__ == "QuantizedLinear"
    assert isinstance(q.layers[1], eqx.nn.Linear)  # kept in float
    np.testing.assert_array_equal(q.layers[1].weight, eqx_mlp.layers[1].weight)
    assert aq.tree_paths(q) == aq.tree_paths(eqx_mlp)
    assert isinstance(eqx_mlp.layers[0], eqx.nn.Linear)  # the input model is unchanged

    key = jax.random.key(2)
    layers = (eqx.nn.Linear("scalar", 4, key=key), eqx.nn.Linear(4, "scalar", key=key),
              eqx.nn.Linear(4, 3, use_bias=False, key=key))
    xs = (jnp.float32(0.5), jnp.ones(4), jnp.ones(4))
    rule = aq.Rule(dtype="int8", symmetric=True, axis=0, min_size=1)
    qs = eqx.filter_jit(aqe.quantize_model)(layers, rule)
    ys, fs = eqx.filter_jit(lambda qs, ls: ([m(x) for m, x in zip(qs, xs)],
                                             [m(x) for m, x in zip(ls, xs)]))(qs, layers)
    for ql, lin, y, f in zip(qs, layers, ys, fs):
        assert y.shape == f.shape and ql.use_bias == lin.use_bias
        np.testing.assert_allclose(y, f, atol=0.02)
    with pytest.raises(ValueError, match="shape \\(\\) for in_features='scalar'"):
        jax.eval_shape(qs[0], jnp.ones(2))


def test_equinox_fake_quant_train_and_export(eqx_mlp):
    optax = pytest.importorskip("optax")
    import equinox as eqx

    from arrayquant.integrations import equinox as aqe

    rule = aq.Rule(dtype="int4", symmetric=True, group_size=8)
    fq = aqe.fake_quantize_model(eqx_mlp, rule, act_dtype="int8")
    assert type(fq.layers[0]).__name__ == "FakeQuantLinear"
    assert fq.layers[0].weight is eqx_mlp.layers[0].weight
    x = _x()

    @jax.jit
    def by_hand(mlp, x):  # W4A8 simulated: quantize -> dequantize, per-token activations
        h = x
        for i, layer in enumerate(mlp.layers):
            wq = aq.dequantize(rule.quantize(layer.weight))
            hq = aq.dequantize(aq.quantize_activations(h, "int8"))
            h = hq @ wq.T + layer.bias
            h = jax.nn.relu(h) if i == 0 else h
        return h

    forward = eqx.filter_jit(lambda m, x: m(x))  # a batch: one scale per row (token)
    np.testing.assert_array_equal(forward(fq, x), by_hand(eqx.filter(eqx_mlp, eqx.is_array), x))

    opt = optax.adam(1e-2)

    @eqx.filter_jit
    def step(m):
        loss = lambda m: jnp.mean((jax.vmap(m)(x) - 1.0) ** 2)  # noqa: E731
        grads = eqx.filter_grad(loss)(m)
        params = eqx.filter(m, eqx.is_inexact_array)
        updates, _ = opt.update(grads, opt.init(params), params)
        return grads, eqx.apply_updates(m, updates)

    grads, trained = step(fq)
    for layer in grads.layers:
        assert np.all(np.isfinite(layer.weight)) and np.count_nonzero(layer.weight) > 0
    assert not np.array_equal(trained.layers[0].weight, fq.layers[0].weight)

    @eqx.filter_jit
    def export(t):
        e = aqe.export(t)
        return e, [(aq.dequantize(el.weight), aq.fake_quantize(tl.weight, "int4", True,
                                                                group_size=8))
                   for tl, el in zip(t.layers, e.layers)]

    exported, same = export(trained)
    assert [(type(e).__name__, e.act_dtype) for e in exported.layers] == [
        ("QuantizedLinear", "int8")] * 2
    for deq, fake in same:
        np.testing.assert_array_equal(deq, fake)
    # The integer product gives the fake-quantized forward up to float summation order.
    np.testing.assert_allclose(forward(exported, x), forward(trained, x), rtol=1e-4, atol=1e-4)


def test_equinox_errors(eqx_mlp):
    import equinox as eqx

    from arrayquant.integrations import equinox as aqe

    with pytest.raises(ValueError, match="no rule matched any eqx.nn.Linear.*'layers/0/weight'"):
        aqe.quantize_model(eqx_mlp, aq.Rule(include="kernel"))
    with pytest.raises(ValueError, match="no eqx.nn.Linear layer"):
        aqe.quantize_model({"w": jnp.ones((4, 4))}, aq.Rule())
    q = eqx.filter_eval_shape(aqe.quantize_model, eqx_mlp, aq.Rule(axis=0))
    with pytest.raises(ValueError, match="2 layer\\(s\\) are quantized already"):
        aqe.quantize_model(q, aq.Rule())
    with pytest.raises(ValueError, match="layers/0/weight: the quantized layer cannot run.*"
                                         "per input channel"):
        eqx.filter_eval_shape(aqe.quantize_model, eqx_mlp, aq.Rule(axis=1), act_dtype="int8")
    with pytest.raises(ValueError, match="at most 8 bits"):
        aqe.quantize_model(eqx_mlp, aq.Rule(), act_dtype="int16")
    with pytest.raises(TypeError, match="arrayquant.Rule"):
        aqe.quantize_model(eqx_mlp, {"dtype": "int8"})
    fq = aqe.fake_quantize_model(eqx_mlp, aq.Rule(axis=0))
    with pytest.raises(ValueError, match="FakeQuantLinear: use export"):
        aqe.quantize_model(fq, aq.Rule())
    with pytest.raises(ValueError, match="no FakeQuantLinear"):
        aqe.export(eqx_mlp)
    with pytest.raises(ValueError, match="data-free calibration method"):
        aqe.fake_quantize_model(eqx_mlp, aq.Rule(method=aq.GPTQ()))
    stacked = eqx.filter_eval_shape(lambda k: eqx.filter_vmap(
        lambda k: eqx.nn.Linear(4, 4, key=k))(k), jax.random.split(jax.random.key(0), 3))
    with pytest.raises(ValueError, match="stacked linear layer"):
        aqe.quantize_model(stacked, aq.Rule())


# ----------------------------------------------------------------------------- Flax NNX


@pytest.fixture(scope="module")
def nnx_mlp():
    nnx = pytest.importorskip("flax.nnx")

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([nnx.Linear(16, 32, rngs=rngs), nnx.Linear(32, 8, rngs=rngs)])

        def __call__(self, x):
            return self.layers[1](nnx.relu(self.layers[0](x)))

    return nnx.jit(lambda: MLP(nnx.Rngs(0)))()  # one program, not op-by-op initializers


def _nnx_ref(q, x, act):
    l0, l1 = q.layers
    h = jax.nn.relu(aq.matmul(x, l0.kernel.get_value(), act_dtype=act) + l0.bias.get_value())
    return aq.matmul(h, l1.kernel.get_value(), act_dtype=act) + l1.bias.get_value()


@pytest.mark.parametrize("case", sorted(CASES))
def test_nnx_quantized_equals_matmul(nnx_mlp, case):
    from flax import nnx

    from arrayquant.integrations import nnx as aqn

    _, rule, act = CASES[case]
    q = nnx.jit(aqn.quantize_model, static_argnums=1, static_argnames="act_dtype")(
        nnx_mlp, aq.Rule(**rule), act_dtype=act)
    assert [type(layer).__name__ for layer in q.layers] == ["QuantizedLinear"] * 2
    assert isinstance(q.layers[0].kernel, aqn.QuantizedParam)
    k0 = q.layers[0].kernel.get_value()
    assert isinstance(k0, aq.QArray) and k0.shape == (16, 32) and k0.qtype == rule["dtype"]
    x = _x()
    # jax.jit over the split state (nnx.merge inside), and nnx.jit on the module
    graphdef, state = nnx.split(q)

    @jax.jit
    def run(state, x):
        m = nnx.merge(graphdef, state)
        return m(x), m.layers[0](x)

    @jax.jit
    def by_hand(state, x):
        m = nnx.merge(graphdef, state)
        l0 = m.layers[0]
        return _nnx_ref(m, x, act), (aq.matmul(x, l0.kernel.get_value(), act_dtype=act)
                                     + l0.bias.get_value())

    (y, y0), (ref, ref0) = run(state, x), by_hand(state, x)
    np.testing.assert_array_equal(y0, ref0)
    _ulps_close(y, ref)
    if case == "W8A16":
        _ulps_close(nnx.jit(lambda m, x: m(x))(q, x), ref)
    # update: a model of the same structure takes the quantized state
    q2 = nnx.merge(graphdef, jax.tree.map(jnp.zeros_like, state))
    nnx.update(q2, state)
    for a, b in zip(jax.tree.leaves(nnx.state(q2)), jax.tree.leaves(state)):
        np.testing.assert_array_equal(a, b)
    # The state holds the QArray under the kernel's path; nnx.Param is only the biases.
    assert aq.tree_paths(state) == aq.tree_paths(nnx.state(nnx_mlp))
    assert isinstance(state["layers"][0]["kernel"].get_value(), aq.QArray)
    assert len(jax.tree.leaves(nnx.state(q, nnx.Param))) == 2
    yf = nnx.jit(lambda m, x: m(x))(nnx_mlp, x) if case == "W8A16" else ref
    assert np.linalg.norm(ref - yf) < 0.2 * np.linalg.norm(yf)


def test_nnx_rules_by_path_and_optimizer_skips_quantized(nnx_mlp):
    optax = pytest.importorskip("optax")
    from flax import nnx

    from arrayquant.integrations import nnx as aqn

    q = nnx.jit(aqn.quantize_model, static_argnums=1)(
        nnx_mlp, aq.Rule(include="layers/0/kernel", dtype="int8", axis=1))
    assert type(q.layers[0]).__name__ == "QuantizedLinear"
    assert isinstance(q.layers[1], nnx.Linear) and isinstance(nnx_mlp.layers[0], nnx.Linear)
    # Models do not share Variables: training one leaves the other as it was.
    assert q.layers[1].kernel is not nnx_mlp.layers[1].kernel
    x = _x()
    codes = np.asarray(q.layers[0].kernel.get_value().data)
    opt = nnx.Optimizer(q, optax.sgd(0.1), wrt=nnx.Param)

    @nnx.jit
    def step(m, opt):
        g = nnx.grad(lambda m: jnp.mean(m(x) ** 2), argnums=nnx.DiffState(0, nnx.Param))(m)
        opt.update(m, g)

    step(q, opt)
    np.testing.assert_array_equal(q.layers[0].kernel.get_value().data, codes)
    assert not np.array_equal(q.layers[1].kernel.get_value(),
                              nnx_mlp.layers[1].kernel.get_value())
    assert not np.array_equal(q.layers[0].bias.get_value(), nnx_mlp.layers[0].bias.get_value())


def test_nnx_fake_quant_train_and_export(nnx_mlp):
    optax = pytest.importorskip("optax")
    from flax import nnx

    from arrayquant.integrations import nnx as aqn

    rule = aq.Rule(dtype="int8", symmetric=True, axis=1)
    fq = aqn.fake_quantize_model(nnx_mlp, rule)
    assert type(fq.layers[0]).__name__ == "FakeQuantLinear"
    assert isinstance(fq.layers[0].kernel, nnx.Param)
    x = _x()

    @nnx.jit
    def by_hand(model, x):
        h = x
        for i, layer in enumerate(model.layers):
            k = aq.dequantize(rule.quantize(layer.kernel.get_value()))
            h = h @ k + layer.bias.get_value()
            h = jax.nn.relu(h) if i == 0 else h
        return h

    forward = nnx.jit(lambda m, x: m(x))
    np.testing.assert_array_equal(forward(fq, x), by_hand(nnx_mlp, x))
    before = fq.layers[0].kernel.get_value()
    opt = nnx.Optimizer(fq, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(m, opt):
        g = nnx.grad(lambda m: jnp.mean((m(x) - 1.0) ** 2))(m)
        opt.update(m, g)
        return g

    gk = step(fq, opt)["layers"][0]["kernel"].get_value()
    assert np.all(np.isfinite(gk)) and np.count_nonzero(gk) > 0
    assert not np.array_equal(fq.layers[0].kernel.get_value(), before)

    @nnx.jit
    def export(t):
        e = aqn.export(t)
        return e, [(aq.dequantize(el.kernel.get_value()),
                    aq.fake_quantize(tl.kernel.get_value(), "int8", True, axis=1))
                   for tl, el in zip(t.layers, e.layers)]

    exported, same = export(fq)
    assert [type(e).__name__ for e in exported.layers] == ["QuantizedLinear"] * 2
    for deq, fake in same:
        np.testing.assert_array_equal(deq, fake)
    np.testing.assert_allclose(forward(exported, x), forward(fq, x), rtol=1e-5, atol=1e-5)


def test_nnx_errors(nnx_mlp):
    from flax import nnx

    from arrayquant.integrations import nnx as aqn

    with pytest.raises(ValueError, match="no rule matched any nnx.Linear.*'layers/1/kernel'"):
        aqn.quantize_model(nnx_mlp, aq.Rule(include="weight"))
    with pytest.raises(ValueError, match="layers/0/kernel: the quantized layer cannot run"):
        nnx.eval_shape(lambda m: aqn.quantize_model(m, aq.Rule(axis=0), act_dtype="int8"),
                       nnx_mlp)  # per input channel
    with pytest.raises(ValueError, match="unsigned"):
        aqn.quantize_model(nnx_mlp, aq.Rule(), act_dtype="uint8")
    fq = aqn.fake_quantize_model(nnx_mlp, aq.Rule(axis=1))
    with pytest.raises(ValueError, match="FakeQuantLinear: use export"):
        aqn.quantize_model(fq, aq.Rule())
    with pytest.raises(ValueError, match="no FakeQuantLinear"):
        aqn.export(nnx_mlp)
    with pytest.raises(ValueError, match="no nnx.Linear layer"):
        aqn.quantize_model(nnx.Dropout(0.1), aq.Rule())
