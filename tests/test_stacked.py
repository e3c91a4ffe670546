"""Stacked QArrays (leading batch axes: stacked layers) and dtype casts over trees."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import skip_eager_jax

import arrayquant as aq

CASES = [
    ("uint4", False, {"group_size": 16}),
    ("int4", True, {"axis": 0}),
    ("int8", True, {"axis": 0}),
    ("int2", False, {}),
    ("uint8", False, {"group_size": 5, "group_axis": 0}),
]


def _stack(rng, lead=(3,)):
    return (rng.standard_normal((*lead, 6, 33)) * 2 + 0.3).astype(np.float32)


@pytest.mark.parametrize(("dtype", "sym", "kw"), CASES)
def test_batch_axes_quantize_each_item_alone(backend, call, dtype, sym, kw):
    skip_eager_jax(backend, "under jax-jit the items are still quantized eagerly on JAX")
    ws = _stack(np.random.default_rng(1))
    qa = call(aq.quantize)(backend.asarray(ws), dtype, sym, batch_axes=1, **kw)
    assert qa.batch_shape == (3,) and qa.shape == (6, 33) and len(qa) == 3
    assert "batch_shape=(3,)" in repr(qa)
    total = 0
    for i in range(3):
        one = aq.quantize(backend.asarray(ws[i]), dtype, sym, **kw)
        item = qa[i]
        assert item.batch_shape == () and item.shape == one.shape
        for name in ("data", "scale", "zero_point"):
            np.testing.assert_array_equal(backend.to_numpy(getattr(item, name)),
                                          backend.to_numpy(getattr(one, name)))
        total += one.nbytes
    assert qa.nbytes == total
    assert qa.bits_per_element == pytest.approx(8 * total / ws.size)
    x_hat = backend.to_numpy(call(aq.dequantize)(qa))
    assert x_hat.shape == ws.shape
    for i in range(3):
        np.testing.assert_array_equal(
            x_hat[i], backend.to_numpy(aq.dequantize(aq.quantize(backend.asarray(ws[i]),
                                                                 dtype, sym, **kw))))
    codes = backend.to_numpy(qa.codes)
    assert codes.shape == ws.shape
    np.testing.assert_array_equal(codes[1], backend.to_numpy(qa[1].codes))
    # Slices keep batch axes; two batch axes index like arrays.
    assert qa[1:].batch_shape == (2,)
    q2 = aq.quantize(backend.asarray(_stack(np.random.default_rng(2), (2, 2))), dtype, sym,
                     batch_axes=2, **kw)
    assert q2.batch_shape == (2, 2) and q2[1, 0].batch_shape == () and q2[1].batch_shape == (2,)


def test_vmap_and_scan_give_stacked_qarrays():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    ws = _stack(np.random.default_rng(3))
    for dtype, sym, kw in CASES:
        qv = jax.vmap(lambda w, dtype=dtype, sym=sym, kw=kw: aq.quantize(w, dtype, sym, **kw))(
            jnp.asarray(ws))
        qb = aq.quantize(jnp.asarray(ws), dtype, sym, batch_axes=1, **kw)
        assert qv.batch_shape == (3,) and qv.shape == (6, 33)
        for name in ("data", "scale", "zero_point"):
            a, b = getattr(qv, name), getattr(qb, name)
            assert (a is None) == (b is None)
            if a is not None:
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 33)), jnp.float32)

        def layer(h, q, x=x):
            return h, aq.dequantize(q) @ x.T  # one layer's (6, 33) weight per step

        _, ys = jax.lax.scan(layer, 0.0, qv)
        expected = np.stack([np.asarray(aq.dequantize(qb[i]) @ x.T) for i in range(3)])
        np.testing.assert_allclose(np.asarray(ys), expected, rtol=1e-6, atol=1e-6)


def test_stacked_errors(backend):
    ws = backend.asarray(_stack(np.random.default_rng(5)))
    w0 = backend.asarray(_stack(np.random.default_rng(5))[0])
    for bad in (-1, 4, 1.0, True):
        with pytest.raises(ValueError, match="batch_axes="):
            aq.quantize(ws, "int8", batch_axes=bad)
    qa = aq.quantize(w0, "int8")
    with pytest.raises(TypeError, match="items of a stacked QArray"):
        qa[0]
    with pytest.raises(TypeError, match="len\\(\\) of a QArray without batch axes"):
        len(qa)
    qs = aq.quantize(ws, "int8", batch_axes=1)
    with pytest.raises(TypeError, match="items of a stacked QArray"):
        qs[0, 0]
    with pytest.raises(ValueError, match=r"w is a stacked QArray \(batch_shape \(3,\)"):
        aq.linear(w0[:2, ...], qs)
    with pytest.raises(ValueError, match="scale has shape"):
        aq.QArray(qs.data, qs.scale[:2, ...], qs.zero_point, "int8", qs.shape, "float32",
                  qs.block_shape)


def test_dtype_cast_over_a_tree_never_reaches_codes_silently(tmp_path):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    tree = {"w": aq.quantize(jnp.ones((4, 8)), "uint4", group_size=4),
            "b": jnp.zeros(4), "n": jnp.arange(3)}
    cast = jax.tree.map(lambda a: a.astype(jnp.bfloat16), tree)  # JAX cannot be stopped...
    x = jnp.ones((2, 8))
    for use in (aq.dequantize, lambda q: aq.linear(x, q),
                lambda q: aq.linear(x, q, act_dtype="int8"), lambda q: q.codes,
                lambda q: jax.jit(aq.dequantize)(q),
                lambda q: aq.tree_report({"w": jnp.ones((4, 8))}, {"w": q})):
        with pytest.raises(TypeError, match="data has dtype bfloat16 .qtype uint4.: a dtype cast"):
            use(cast["w"])  # ... but every use of the cast codes fails, never silently
    with pytest.raises(TypeError, match="cannot save 'w': QArray data has dtype bfloat16"):
        aq.save(tmp_path / "c.safetensors", {"w": cast["w"]})
    # Reductions and optimizer states mapped over a tree keep working.
    assert jax.tree.map(jnp.mean, tree)["w"].data.shape == ()
    assert jax.tree.map(lambda a: jnp.zeros_like(a, dtype=jnp.float32), tree)["w"].data.dtype \
        == jnp.float32
    out = aq.cast_floats(tree, "bfloat16")
    assert out["b"].dtype == jnp.bfloat16 and out["n"].dtype == tree["n"].dtype
    assert out["w"] is tree["w"]
    # Gradients with respect to a tree holding QArrays still work (float0 cotangents).
    g = jax.grad(lambda t: aq.dequantize(t["w"]).sum() + t["b"].sum(), allow_int=True)(tree)
    assert isinstance(g["w"], aq.QArray)
    out_np = aq.cast_floats({"w": aq.quantize(np.ones((2, 4), np.float32), "int8"),
                             "b": np.zeros(2)}, "float16")
    assert out_np["b"].dtype == np.float16 and out_np["w"].data.dtype == np.int8


def test_rule_batch_axes_quantizes_each_layer():
    ws = _stack(np.random.default_rng(9))
    tree = {"layers": {"w": ws}, "head": ws[0]}
    q = aq.quantize_tree(tree, [aq.Rule(include="layers", dtype="int4", axis=0, batch_axes=1),
                                aq.Rule(dtype="int8", axis=0)])
    w = q["layers"]["w"]
    assert w.batch_shape == (3,) and w.scale.shape == (3, 6, 1)  # per layer, per channel
    np.testing.assert_array_equal(w[2].data, aq.quantize(ws[2], "int4", axis=0).data)
    assert q["head"].batch_shape == () and q["head"].scale.shape == (6, 1)
    rep = aq.tree_report(tree, q)
    assert [row.shape for row in rep.rows] == [(3, 6, 33), (6, 33)]
    with pytest.raises(ValueError, match="batch_axes"):
        aq.Rule(batch_axes=-1)
