"""Calibration methods (MinMax, Percentile, MSESearch, HQQ): same results on every backend,
the invariants of the affine step, and each method against a small independent reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import arrayquant as aq
from arrayquant.affine import search
from arrayquant.affine.calibrate import block_sum, percentile_index

RNG = np.random.default_rng(11)

# Small settings keep the jit compiles short; each is (dtype, symmetric, granularity).
CASES = [
    ("int4", False, {"group_size": 32}),
    ("uint2", False, {"group_size": 16}),
    ("int8", True, {"axis": 0}),
    ("int4", False, {"axis": 0}),
]
# Small searches: under jax.jit every candidate is traced (compile time grows with them).
METHODS = [aq.MinMax(), aq.Percentile(97.0), aq.MSESearch(grid=3), aq.HQQ(iters=2)]


def _data(shape=(6, 70), seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    x[0, 3] = 9.0  # an outlier, so that clipping methods have something to clip
    x[1, :5] = 0.0
    return x.astype(np.float32)


def _numpy_reference(x, dtype, symmetric, gran, method):
    return aq.quantize(x, dtype, symmetric, **gran, method=method)


def _block_sse(x, qa, gran):
    """Per-block squared error in float64, from the dequantized values."""
    e = (np.asarray(aq.dequantize(qa), np.float64) - x) ** 2
    if "axis" in gran:
        return e.sum(axis=1)
    g = gran["group_size"]
    pad = (-x.shape[1]) % g
    e = np.pad(e, [(0, 0), (0, pad)])
    return e.reshape(x.shape[0], -1, g).sum(axis=2)


# ------------------------------------------------------------------- same on every backend


def test_minmax_is_todays_quantize(backend, call):
    x = _data()
    xb = backend.asarray(x)
    for dtype, symmetric, gran in CASES:
        ref = aq.quantize(x, dtype, symmetric, **gran)  # NumPy fast path
        qa = call(aq.quantize)(xb, dtype, symmetric, **gran, method=aq.MinMax())
        qs = call(aq.quantize)(xb, dtype, symmetric, **gran, method="minmax")
        for q in (qa, qs):
            np.testing.assert_array_equal(backend.to_numpy(q.codes), ref.codes)
            np.testing.assert_array_equal(backend.to_numpy(q.scale), ref.scale)
            if not symmetric:
                np.testing.assert_array_equal(backend.to_numpy(q.zero_point), ref.zero_point)


@pytest.mark.parametrize("method", METHODS, ids=lambda m: type(m).__name__)
def test_methods_bit_identical_across_backends(backend, call, method):
    x = _data()
    xb = backend.asarray(x)
    for dtype, symmetric, gran in CASES[:3] if backend.jit else CASES:
        if symmetric and isinstance(method, aq.HQQ):
            continue
        ref = _numpy_reference(x, dtype, symmetric, gran, method)
        qa = call(aq.quantize)(xb, dtype, symmetric, **gran, method=method)
        np.testing.assert_array_equal(backend.to_numpy(qa.scale), ref.scale)
        np.testing.assert_array_equal(backend.to_numpy(qa.codes), ref.codes)
        if not symmetric:
            np.testing.assert_array_equal(backend.to_numpy(qa.zero_point), ref.zero_point)


def test_percentile_100_is_minmax(backend, call):
    xb = backend.asarray(_data())
    for dtype, symmetric, gran in CASES[:3]:
        a = call(aq.qparams)(xb, dtype, symmetric, **gran, method=aq.Percentile(100))
        b = call(aq.qparams)(xb, dtype, symmetric, **gran)
        np.testing.assert_array_equal(backend.to_numpy(a[0]), backend.to_numpy(b[0]))
        a = call(aq.quantize)(xb, dtype, symmetric, **gran, method=aq.Percentile(100))
        b = call(aq.quantize)(xb, dtype, symmetric, **gran)
        np.testing.assert_array_equal(backend.to_numpy(a.codes), backend.to_numpy(b.codes))
        np.testing.assert_array_equal(backend.to_numpy(a.scale), backend.to_numpy(b.scale))


def test_block_sum_fixed_order(backend):
    v = RNG.standard_normal((5, 37)).astype(np.float32)
    got = backend.to_numpy(block_sum(backend.asarray(v), backend.xp))
    ref = np.concatenate([v, np.zeros((5, 27), np.float32)], axis=1)
    while ref.shape[1] > 1:
        h = ref.shape[1] // 2
        ref = ref[:, :h] + ref[:, h:]
    np.testing.assert_array_equal(got, ref)


# ------------------------------------------------------------------- references


def test_percentile_index_rule():
    assert percentile_index(100, 128) == 0
    assert percentile_index(99.9, 128) == 0
    assert percentile_index(99, 128) == 1  # floor(0.01 * 127)
    assert percentile_index(99, 101) == 1  # exactly 1: no float rounding below it
    assert percentile_index(50, 11) == 5


def test_percentile_values():
    x = np.arange(1, 101, dtype=np.float32)[None] - 30  # -29 .. 70
    s, z = aq.qparams(x, "uint8", axis=0, method=aq.Percentile(98))  # k = floor(1.98) = 1
    s_ref, z_ref = aq.qparams_from_range(np.float32([[-28.0]]), np.float32([[69.0]]), "uint8")
    np.testing.assert_array_equal(s, s_ref)
    np.testing.assert_array_equal(z, z_ref)
    s, _ = aq.qparams(x, "int8", True, axis=0, method=aq.Percentile(98))
    np.testing.assert_array_equal(s, aq.qparams_from_range(
        np.float32([[-69.0]]), np.float32([[69.0]]), "int8", True)[0])


@pytest.mark.parametrize("dtype,gran", [("int4", {"group_size": 32}), ("uint2", {"group_size": 16}),
                                        ("int8", {"axis": 0})])
def test_mse_search_never_worse_than_minmax(dtype, gran):
    x = _data((8, 96), seed=3)
    base = _block_sse(x, aq.quantize(x, dtype, **gran), gran)
    for m in (aq.MSESearch(grid=10), aq.MSESearch(grid=5, search_zero_point=False)):
        got = _block_sse(x, aq.quantize(x, dtype, **gran, method=m), gran)
        assert np.all(got <= base * (1 + 1e-5))
    if dtype != "int8":  # at 8 bits per channel min/max is already (nearly) the best
        got = _block_sse(x, aq.quantize(x, dtype, **gran, method="mse"), gran)
        assert got.sum() < 0.95 * base.sum()


def test_mse_search_symmetric_never_worse():
    x = _data((8, 96), seed=4)
    base = _block_sse(x, aq.quantize(x, "int4", True, axis=0), {"axis": 0})
    got = _block_sse(x, aq.quantize(x, "int4", True, axis=0, method="mse"), {"axis": 0})
    assert np.all(got <= base * (1 + 1e-5)) and got.sum() < base.sum()


def test_shrink_factors():
    assert search.shrink_factors(1, 0.5) == (1.0,)
    assert search.shrink_factors(3, 0.5) == (1.0, 0.75, 0.5)


@pytest.mark.parametrize("dtype,g", [("int4", 128), ("int2", 32), ("uint4", 64)])
def test_hqq_helps_on_gaussian_weights(dtype, g):
    # Gaussian groups: the setting HQQ is made for (weights at 2 to 4 bits).
    x = RNG.standard_normal((32, 256)).astype(np.float32) * 0.05
    gran = {"group_size": g}
    base = _block_sse(x, aq.quantize(x, dtype, **gran), gran)
    got = _block_sse(x, aq.quantize(x, dtype, **gran, method="hqq"), gran)
    assert np.all(got <= base * (1 + 1e-5))
    assert got.sum() < 0.99 * base.sum()


@pytest.mark.parametrize("lp", [1.0, 0.7])
def test_hqq_step_by_hand(lp):
    # uint2, s = 0.5 exactly (z = 0): x / s = [0, 0.6, 3] -> W_q = [0, 1, 3],
    # errors x - s W_q = [0, -0.2, 0]; only -0.2 is shrunk.
    xp = np
    x = np.float32([[0.0, 0.3, 1.5]])
    qt = aq.as_qtype("uint2")
    z = search.hqq_step(x, np.float32([[0.5]]), np.float32([[2.0]]), np.float32([[0.0]]),
                        10.0, lp, qt, xp)
    thresh = 0.1 if lp == 1 else 0.2 ** (lp - 1) / 10
    w_e = -(0.2 - thresh)
    expected = (0 + (1 - (0.3 - w_e) * 2) + 0) / 3
    assert z.shape == (1, 1)
    assert math.isclose(float(z[0, 0]), expected, rel_tol=1e-5)


def test_hqq_zero_points_are_integers_and_scale_refit():
    x = RNG.standard_normal((16, 64)).astype(np.float32)
    s0, _ = aq.qparams(x, "uint4", group_size=32)
    s, z = aq.qparams(x, "uint4", group_size=32, method="hqq")
    assert z.dtype == np.uint8 and np.all(z <= 15)
    assert np.any(s != s0)  # the least-squares scale was chosen somewhere


# ------------------------------------------------------------------- invariants


@given(hnp.arrays(np.float32, (3, 20), elements=st.floats(-1e3, 1e3, width=32)),
       st.sampled_from(METHODS), st.sampled_from(["int4", "uint4", "int2", "int8"]))
def test_invariants(x, method, dtype):
    x = x.copy()
    x[0, 0] = 0.0
    qt = aq.as_qtype(dtype)
    qa = aq.quantize(x, dtype, group_size=8, method=method)
    assert aq.dequantize(qa)[0, 0] == 0.0  # zero exact
    z = qa.zero_point.astype(np.int32)
    assert np.all((qt.qmin <= z) & (z <= qt.qmax))
    lo, hi = aq.scale_limits("float32", "float32")
    assert np.all((qa.scale >= lo) & (qa.scale <= hi))
    if not isinstance(method, aq.HQQ) and qt.signed:
        qs = aq.quantize(x, dtype, True, group_size=8, method=method)
        assert aq.dequantize(qs)[0, 0] == 0.0
        assert np.all((qs.scale >= lo) & (qs.scale <= hi))


def test_invariants_degenerate_blocks(backend, call):
    x = np.zeros((2, 16), np.float32)
    x[1] = 3.0
    for m in METHODS:
        qa = call(aq.quantize)(backend.asarray(x), "uint4", group_size=8, method=m)
        out = backend.to_numpy(aq.dequantize(qa))
        assert np.all(out[0] == 0) and np.allclose(out[1], 3.0, rtol=0.1)


# ------------------------------------------------------------------- plumbing and errors


def test_rule_and_tree_use_the_method():
    t = {"w": _data((8, 64))}
    r = aq.Rule(dtype="int4", group_size=32, method="mse")
    assert r.method == aq.MSESearch() and "MSESearch" in repr(r)
    assert "method" not in repr(aq.Rule())
    q = aq.quantize_tree(t, r)["w"]
    ref = aq.quantize(t["w"], "int4", group_size=32, method=aq.MSESearch())
    np.testing.assert_array_equal(q.codes, ref.codes)


def test_cli_method(tmp_path, capsys):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    from arrayquant.apps import cli

    w = _data((8, 64))
    path, out = tmp_path / "m.safetensors", tmp_path / "q.safetensors"
    safetensors_numpy.save_file({"layer.weight": w}, path)
    assert cli.main(["quantize", str(path), "-o", str(out), "--dtype", "int4",
                     "--group-size", "32", "--method", "hqq", "--no-progress"]) == 0
    capsys.readouterr()
    q = aq.load(out)["layer.weight"]
    ref = aq.quantize(w, "int4", group_size=32, method=aq.HQQ())
    np.testing.assert_array_equal(q.codes, ref.codes)
    np.testing.assert_array_equal(q.scale, ref.scale)


@pytest.mark.parametrize("bad", ["absmax", "absmax,0.8", 3, object(), [aq.MinMax()]])
def test_bad_method_names_value(bad):
    x = _data((2, 8))
    with pytest.raises(ValueError, match=r"method=.*'minmax', 'percentile', 'mse', 'hqq'"):
        aq.quantize(x, "int8", method=bad)
    with pytest.raises(ValueError, match="Rule: method="):
        aq.Rule(method=bad)


@pytest.mark.parametrize("make", [
    lambda: aq.Percentile(101), lambda: aq.Percentile(10), lambda: aq.MSESearch(grid=0),
    lambda: aq.MSESearch(min_shrink=0), lambda: aq.MSESearch(zero_point_radius=-1),
    lambda: aq.HQQ(iters=0), lambda: aq.HQQ(lp_norm=2), lambda: aq.HQQ(kappa=0.5),
])
def test_bad_method_fields(make):
    with pytest.raises(ValueError, match=r"expected"):
        make()


def test_hqq_symmetric_refused():
    with pytest.raises(ValueError, match="HQQ optimizes the zero point"):
        aq.quantize(_data((2, 8)), "int4", True, method="hqq")


def test_methods_are_static_and_hashable():
    assert len({aq.MinMax(), aq.MinMax(), aq.HQQ(), aq.MSESearch(), aq.Percentile()}) == 4
