"""LinearWeight: the represented weight, products, trees, and the data-aware method hook."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

import arrayquant as aq
from arrayquant.linear_weight import LinearWeight

RNG = np.random.default_rng(0)
K, N = 24, 10


def _parts(seed=0, dtype="int4", group=8):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((N, K)).astype(np.float32)
    s = rng.uniform(0.25, 4.0, K).astype(np.float32)
    perm = rng.permutation(K).astype(np.int32)
    return w, s, perm


def _make(backend, w, s, perm, *, in_axis=1, use_scale=True, use_perm=True, act=None,
          dtype="int4", group=8):
    """LinearWeight of ``w`` (out, in): codes of W[:, perm] / s (transposed for in_axis=0)."""
    m = s if use_scale else np.ones(K, np.float32)
    p = perm if use_perm else np.arange(K, dtype=np.int32)
    stored = w[:, p] / m
    if in_axis == 0:
        stored = np.ascontiguousarray(stored.T)
    kw = {"group_size": group, "group_axis": in_axis} if group else {"axis": 1 - in_axis}
    qa = aq.quantize(backend.asarray(stored), dtype, **kw)
    extra = {}
    if act is not None:
        extra = {"act_scale": backend.asarray(np.float32(act[0])),
                 "act_zero_point": None if act[1] is None else backend.asarray(np.int8(act[1])),
                 "act_qtype": "int8"}
    return LinearWeight(qa, in_scale=backend.asarray(s) if use_scale else None,
                        perm=backend.asarray(perm) if use_perm else None, in_axis=in_axis,
                        **extra)


def _stored_deq(backend, lw):
    return backend.to_numpy(aq.dequantize(lw.qweight)).astype(np.float64)


@pytest.mark.parametrize("use_scale, use_perm", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("in_axis", [0, 1])
def test_dequantize_is_the_represented_weight(backend, call, in_axis, use_scale, use_perm):
    w, s, perm = _parts()
    lw = _make(backend, w, s, perm, in_axis=in_axis, use_scale=use_scale, use_perm=use_perm)
    q = _stored_deq(backend, lw)
    q = q.T if in_axis == 0 else q  # (out, in), stored order
    ref = np.empty_like(q)
    m = s if use_scale else np.ones(K)
    p = perm if use_perm else np.arange(K)
    ref[:, p] = q * m.astype(np.float32).astype(np.float64)
    got = backend.to_numpy(call(aq.dequantize)(lw)).astype(np.float64)
    got = got.T if in_axis == 0 else got
    np.testing.assert_allclose(got, ref, rtol=2e-7, atol=0)
    # and it approximates w: the codes held w[:, perm] / s
    assert np.linalg.norm(got - w) < 0.3 * np.linalg.norm(w)


@pytest.mark.parametrize("in_axis", [0, 1])
def test_products_equal_the_represented_weight(backend, call, in_axis):
    w, s, perm = _parts(1)
    lw = _make(backend, w, s, perm, in_axis=in_axis)
    x = backend.asarray(np.random.default_rng(2).standard_normal((3, 5, K)), "float32")
    wd = backend.to_numpy(aq.dequantize(lw)).astype(np.float64)
    xn = backend.to_numpy(x).astype(np.float64)
    if in_axis == 1:
        got, ref = call(aq.linear)(x, lw), xn @ wd.T
    else:
        got, ref = call(aq.matmul)(x, lw), xn @ wd
    assert got.shape == (3, 5, N)
    np.testing.assert_allclose(backend.to_numpy(got), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("zp", [None, 5])
def test_static_activations(backend, call, zp):
    """x' = x[..., perm] * in_scale quantized with the one static scale, then integer product."""
    w, s, perm = _parts(3)
    lw = _make(backend, w, s, perm, act=(0.04, zp), dtype="int8", group=None)
    x = backend.asarray(np.random.default_rng(4).standard_normal((6, K)), "float32")
    xn = backend.to_numpy(x)
    xt = xn[:, perm] * s
    sc = np.float32(0.04)
    zz = None if zp is None else np.int8(zp)
    codes = aq.quantize_with(xt, sc, zz, "int8")
    xq = aq.dequantize_with(codes, sc, zz).astype(np.float64)
    q = _stored_deq(backend, lw)
    ref = xq @ q.T
    got = backend.to_numpy(call(aq.linear)(x, lw))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)
    # an explicit act_dtype asks for dynamic per-token scales instead
    dyn = backend.to_numpy(aq.linear(x, lw, act_dtype="int8"))
    assert not np.array_equal(dyn, got)
    np.testing.assert_allclose(dyn, xn @ backend.to_numpy(aq.dequantize(lw)).T, atol=0.3)
    assert aq.linear(x[:0, ...], lw).shape == (0, N)


def test_construction_errors():
    w, s, perm = _parts()
    qa = aq.quantize(w, "int4", group_size=8)
    with pytest.raises(TypeError, match="qweight must be a QArray"):
        LinearWeight(w)
    with pytest.raises(ValueError, match=r"in_scale has shape \(23,\); expected \(24,\)"):
        LinearWeight(qa, in_scale=s[:-1])
    with pytest.raises(TypeError, match="perm has dtype float32"):
        LinearWeight(qa, perm=perm.astype(np.float32))
    with pytest.raises(ValueError, match="in_axis=2"):
        LinearWeight(qa, in_axis=2)
    with pytest.raises(ValueError, match="act_scale and act_qtype go together"):
        LinearWeight(qa, act_scale=np.float32(1))
    with pytest.raises(ValueError, match="needs a signed act_qtype"):
        LinearWeight(qa, act_scale=np.float32(1), act_qtype="uint8")
    with pytest.raises(ValueError, match="one 2-D weight"):
        LinearWeight(aq.quantize(np.ones((2, 3, 4), np.float32), "int8"))
    lw = LinearWeight(qa, in_scale=s)
    with pytest.raises(ValueError, match="use matmul"):
        aq.linear(np.ones((1, N), np.float32), LinearWeight(aq.quantize(w.T.copy(), "int8"),
                                                            in_axis=0))
    with pytest.raises(ValueError, match="x is quantized"):
        aq.linear(aq.quantize_activations(np.ones((1, K), np.float32)), lw)
    assert "in_scale" in repr(lw) and lw.nbytes == qa.nbytes + K * 4


def test_group_index_matches_perm():
    w, s, perm = _parts()
    lw = LinearWeight(aq.quantize(w[:, perm], "int4", group_size=8), perm=perm)
    g = np.asarray(lw.group_index(8))
    assert all(g[perm[j]] == j // 8 for j in range(K))


def test_pytree_jit_and_tree_functions():
    import jax
    import jax.numpy as jnp

    w, s, perm = _parts()
    lw = jax.tree.map(jnp.asarray, _make(_np_backend(), w, s, perm))
    leaves, treedef = jax.tree.flatten(lw)
    assert len(leaves) == 5  # data, scale, zero_point, in_scale, perm
    back = jax.tree.unflatten(treedef, leaves)
    assert isinstance(back, LinearWeight) and back.in_axis == 1
    tree = {"layer": {"weight": lw, "bias": jnp.zeros(N)}}
    assert aq.tree_paths(tree) == ["layer/weight", "layer/bias"]
    deq = jax.jit(aq.dequantize_tree)(tree)
    np.testing.assert_array_equal(np.asarray(deq["layer"]["weight"]),
                                  np.asarray(aq.dequantize(lw)))
    cast = aq.cast_floats(tree, jnp.bfloat16)
    assert cast["layer"]["weight"] is lw and cast["layer"]["bias"].dtype == jnp.bfloat16


def _np_backend():
    from conftest import Backend

    return Backend("numpy")


@dataclass(frozen=True)
class _ScaleHalf:
    """A test double of a data-aware method: stores in_scale = 2 and records what it got."""

    needs_stats = True
    in_axis: int = 1

    def quantize_weight(self, w, stats, *, dtype, symmetric, axis, group_size, group_axis,
                        scale_dtype):
        assert isinstance(stats, aq.LayerStats)
        qa = aq.quantize(w / 2, dtype, symmetric, axis, group_size, group_axis,
                         scale_dtype=scale_dtype)
        return LinearWeight(qa, in_scale=np.full(w.shape[1], 2.0, np.float32))


def test_quantize_tree_with_a_data_aware_method():
    from arrayquant.stats import record

    rng = np.random.default_rng(5)
    params = {"a": {"weight": rng.standard_normal((N, K)).astype(np.float32)},
              "b": {"weight": rng.standard_normal((N, K)).astype(np.float32)}}
    stats = {"a/weight": record(rng.standard_normal((7, K)).astype(np.float32))}
    rules = [aq.Rule(include="^a/", dtype="int4", group_size=8, method=_ScaleHalf()),
             aq.Rule(dtype="int8", axis=0)]
    q = aq.quantize_tree(params, rules, stats=stats)
    assert isinstance(q["a"]["weight"], LinearWeight)
    assert isinstance(q["b"]["weight"], aq.QArray)
    np.testing.assert_allclose(aq.dequantize(q["a"]["weight"]), params["a"]["weight"], atol=0.3)
    report = aq.tree_report(params, q)
    assert report.n_quantized == 2 and report.rows[0].sqnr_db > 10
    with pytest.raises(ValueError, match="'b/weight'.*needs this leaf's activation statistics"):
        aq.quantize_tree(params, aq.Rule(dtype="int4", method=_ScaleHalf()), stats=stats)
    with pytest.raises(ValueError, match=r"not float array leaves.*\['c/weight'\]"):
        aq.quantize_tree(params, rules, stats={**stats, "c/weight": stats["a/weight"]})
    with pytest.raises(ValueError, match="data-aware method"):
        aq.quantize(params["a"]["weight"], "int4", method=_ScaleHalf())
    with pytest.raises(ValueError, match="batch_axes"):
        aq.Rule(dtype="int4", method=_ScaleHalf(), batch_axes=1)


def test_sharding_like_replicates_the_input_state():
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    w, s, perm = _parts()
    lw = _make(_np_backend(), w, s, perm)
    mesh = Mesh(np.array(jax.devices()[:1]), ("x",))
    sh = aq.sharding_like(lw, NamedSharding(mesh, PartitionSpec("x", None)))
    assert sh.qweight.data.spec == PartitionSpec("x", None)
    assert sh.in_scale.spec == PartitionSpec() and sh.perm.spec == PartitionSpec()
    assert sh.act_scale is None
    out = jax.device_put(jax.tree.map(jnp.asarray, lw), sh)
    np.testing.assert_array_equal(np.asarray(aq.dequantize(out)), aq.dequantize(lw))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_input_state_is_applied_in_float32(backend, call, dtype):
    """in_scale beyond float16's range (SmoothQuant's s floor gives 1e5) or not exact in
    bfloat16 multiplies x (and the stored weight) in float32: no inf/NaN, no extra error."""
    if dtype == "bfloat16" and backend.name not in ("numpy", "jax"):
        pytest.skip("bfloat16 on NumPy (ml_dtypes) and JAX")
    w, s, perm = _parts(6)
    s = s.copy()
    s[0] = 1e5   # 1 / SmoothQuant's floor of s: inf in float16
    s[1] = 1.1   # not a bfloat16 number
    lw = _make(backend, w, s, perm, group=None)
    xn = np.random.default_rng(7).standard_normal((4, K)).astype(np.float32)
    x = backend.asarray(xn, dtype)
    x64 = backend.to_numpy(x).astype(np.float64)
    y = call(aq.linear)(x, lw)
    assert str(y.dtype).endswith("float32")  # x's dtype with the float32 weight's
    wd = backend.to_numpy(aq.dequantize(lw)).astype(np.float64)
    np.testing.assert_allclose(backend.to_numpy(y).astype(np.float64), x64 @ wd.T, rtol=1e-5,
                               atol=1e-3 * np.abs(x64 @ wd.T).max())
    # the stored weight in half precision: the represented weight stays finite
    lwh = LinearWeight(aq.quantize(backend.asarray(w[:, perm] / s, dtype), "int8", axis=0),
                       in_scale=lw.in_scale, perm=lw.perm)
    wh = backend.to_numpy(call(aq.dequantize)(lwh)).astype(np.float64)
    assert np.isfinite(wh).all()
