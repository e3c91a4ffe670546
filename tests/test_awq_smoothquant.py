"""AWQ, SmoothQuant and bias correction: each against a small independent reference, the
LinearWeight semantics, the invariants of the affine step, and NumPy / JAX agreement."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import arrayquant as aq
from arrayquant.dataaware.awq import AWQ, awq, awq_scales
from arrayquant.dataaware.bias import correct_biases, corrected_bias, default_bias_path
from arrayquant.dataaware.smoothquant import (
    SmoothQuant,
    smooth_scales,
    smoothquant,
    static_act_params,
)
from arrayquant.linear_weight import transform_input
from arrayquant.qtypes import as_qtype
from arrayquant.stats import record

# Small searches keep the tests (and the jit compiles) short.
SMALL = {"grid": 6, "clip_grid": 4}
TINY = {"grid": 2, "clip_grid": 2, "clip_alphas": 1}  # for the jit compiles


def _layer(seed=0, k=64, n=24, rows=300, outliers=4, scale=20.0):
    """x (rows, k) with ``outliers`` large input channels, w (n, k) float32."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, k)) + 0.3
    x[:, rng.choice(k, outliers, replace=False)] *= scale
    x = x.astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32)
    return x, w


def _out_err(x, w, w_hat):
    """Mean squared output error of the layer on ``x`` (float64)."""
    d = np.asarray(x, np.float64) @ (np.asarray(w, np.float64) - np.asarray(w_hat, np.float64)).T
    return float(np.mean(d * d))


def _deq(q):
    return np.asarray(aq.dequantize(q), np.float64)


GRANS = [{"group_size": 16}, {"group_size": 24}, {"axis": 0}, {}]


# ------------------------------------------------------------------------------ AWQ


@pytest.mark.parametrize("gran", GRANS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_awq_never_worse_than_rtn_with_clip(seed, gran):
    x, w = _layer(seed)
    stats = record(x)
    lw = awq(w, stats, "int4", **gran, **SMALL)
    e_awq = _out_err(x, w, _deq(lw))
    e_rtn_clip = _out_err(x, w, _deq(awq(w, stats, "int4", **gran, **{**SMALL, "grid": 1})))
    e_rtn = _out_err(x, w, _deq(aq.quantize(w, "int4", **gran)))
    assert e_awq <= e_rtn_clip * (1 + 1e-5)
    assert e_awq <= e_rtn * (1 + 1e-5)
    if gran.get("group_size") == 16:  # outlier channels: scaling them pays off clearly
        assert e_awq < 0.7 * e_rtn


@pytest.mark.parametrize("gran", GRANS)
def test_clip_search_never_worse_than_no_clip(gran):
    for seed in range(3):
        x, w = _layer(seed + 10, outliers=2)
        stats = record(x)
        with_clip = _out_err(x, w, _deq(awq(w, stats, "int4", **gran, **SMALL)))
        without = _out_err(x, w, _deq(awq(w, stats, "int4", **gran, clip=False, **SMALL)))
        assert with_clip <= without * (1 + 1e-5)


def test_awq_scales_reference_and_outliers():
    x, w = _layer(3, outliers=3, scale=30.0)
    stats = record(x)
    big = np.abs(x).mean(0) > 5
    s = np.asarray(awq_scales(w, stats, "int4", group_size=16, grid=10, clip=False))
    assert s.shape == (64,) and s.dtype == np.float32
    assert s[big].min() > s[~big].max()
    # s is a ** alpha / sqrt(max * min) for one of the alphas of the grid
    a = np.maximum(np.abs(x.astype(np.float64)).mean(0), 1e-4)
    fits = []
    for i in range(10):
        c = a ** (i / 10)
        fits.append(np.abs(c / np.sqrt(c.max() * c.min()) - s).max())
    assert min(fits) < 1e-4 * s.max()


def test_linear_weight_semantics():
    x, w = _layer(4)
    lw = awq(w, record(x), "int4", group_size=16, **SMALL)
    assert isinstance(lw, aq.LinearWeight) and lw.perm is None and lw.in_axis == 1
    w_hat = aq.dequantize(lw)
    assert w_hat.dtype == np.float32 and w_hat.shape == w.shape
    assert np.abs(w_hat - w).max() < 0.5 * np.abs(w).max()
    q = aq.dequantize(lw.qweight)
    y_stored = (x * lw.in_scale) @ q.T
    y_repr = x @ w_hat.T
    np.testing.assert_allclose(y_stored, y_repr, rtol=1e-4, atol=1e-4 * np.abs(y_repr).max())
    # the products through the library: explicit, and aq.linear with the LinearWeight
    for y_lib in (aq.linear(transform_input(x, lw, np), lw.qweight), aq.linear(x, lw)):
        np.testing.assert_allclose(y_lib, y_repr, rtol=1e-4, atol=1e-4 * np.abs(y_repr).max())


@pytest.mark.parametrize("gran0,gran1", [({"group_size": 24}, {"group_size": 24}),
                                         ({"axis": 1}, {"axis": 0}), ({}, {})])
def test_in_axis_0_is_the_transpose(gran0, gran1):
    x, w = _layer(5)
    stats = record(x)
    a = awq(np.ascontiguousarray(w.T), stats, "int4", in_axis=0, **gran0, **SMALL)
    b = awq(w, stats, "int4", **gran1, **SMALL)
    assert a.in_axis == 0 and a.qweight.shape == (64, 24)
    np.testing.assert_array_equal(aq.dequantize(a).T, aq.dequantize(b))


@dataclass(frozen=True)
class _FakeInner:
    """An inner method that stores the input features reversed, with in_scale 0.5 and
    codes of 2 W'[:, perm] (RTN), and records the statistics it was given."""

    seen: list
    in_axis: int = 1
    perm_it: bool = True
    needs_stats: ClassVar[bool] = True

    def __hash__(self):
        return 0

    def quantize_weight(self, w, stats, *, dtype, symmetric, axis, group_size, group_axis,
                        scale_dtype):
        self.seen.append(stats)
        qa = aq.quantize(w[:, ::-1] * 2 if self.perm_it else w, dtype, symmetric, axis=axis,
                         group_size=group_size, group_axis=group_axis,
                         scale_dtype=scale_dtype)
        if not self.perm_it:
            return qa
        k = w.shape[1]
        return aq.LinearWeight(qa, in_scale=np.full(k, 0.5, np.float32),
                               perm=np.arange(k - 1, -1, -1, dtype=np.int32))


@pytest.mark.parametrize("perm_it", [True, False])
def test_inner_method_composes(perm_it):
    x, w = _layer(6)
    stats = record(x)
    seen = []
    lw = awq(w, stats, "int8", axis=0, inner=_FakeInner(seen, perm_it=perm_it), **SMALL)
    s = 1.0 / np.asarray(awq(w, stats, "int8", axis=0, clip=False, **SMALL).in_scale)
    # the inner method saw the statistics of x / s
    np.testing.assert_allclose(seen[0].abs_mean, stats.abs_mean / s, rtol=1e-5)
    # the represented weight is W (int8: close), and the stored product is the same
    w_hat = aq.dequantize(lw)
    assert np.abs(w_hat - w).max() < 0.05 * np.abs(w).max()
    q = aq.dequantize(lw.qweight)
    np.testing.assert_allclose(transform_input(x, lw, np) @ q.T, x @ w_hat.T, rtol=1e-4,
                               atol=1e-4 * np.abs(x @ w.T).max())
    assert (lw.perm is not None) == perm_it


@pytest.mark.parametrize("act_order", [False, True])
def test_awq_with_gptq(act_order):
    gptq = pytest.importorskip("arrayquant.dataaware.gptq")  # written alongside (issue 11)
    x, w = _layer(19, k=64, n=16)
    stats = record(x)
    lw = awq(w, stats, "int4", group_size=16, inner=gptq.GPTQ(act_order=act_order), **SMALL)
    assert (lw.perm is not None) == act_order and lw.in_scale is not None
    w_hat = aq.dequantize(lw)
    np.testing.assert_allclose(aq.linear(x, lw), x @ w_hat.T, rtol=1e-4,
                               atol=1e-4 * np.abs(x @ w.T).max())
    assert _out_err(x, w, w_hat) < _out_err(x, w, _deq(aq.quantize(w, "int4", group_size=16)))


def test_shared_scales_and_method_protocol():
    x, w = _layer(7)
    w2 = np.random.default_rng(1).standard_normal((10, 64)).astype(np.float32)
    stats = record(x)
    s = awq_scales([w, w2], stats, "int4", group_size=16, **SMALL)
    lw = awq(w2, stats, "int4", group_size=16, scales=s, **SMALL)
    np.testing.assert_allclose(lw.in_scale, 1.0 / s, rtol=1e-6)
    m = AWQ(**SMALL)
    assert m.needs_stats and hash(m) == hash(AWQ(**SMALL))
    got = m.quantize_weight(w, stats, dtype="int4", symmetric=False, axis=None,
                            group_size=16, group_axis=-1, scale_dtype="float32")
    want = awq(w, stats, "int4", group_size=16, **SMALL)
    np.testing.assert_array_equal(got.qweight.codes, want.qweight.codes)
    np.testing.assert_array_equal(got.in_scale, want.in_scale)
    # through a Rule and quantize_tree, keyed by the weight's path
    tree = {"dense": {"weight": w, "bias": np.zeros(24, np.float32)}}
    qt = aq.quantize_tree(tree, aq.Rule(dtype="int4", group_size=16, method=m),
                          stats={"dense/weight": stats})
    np.testing.assert_array_equal(qt["dense"]["weight"].qweight.codes, want.qweight.codes)


@given(seed=st.integers(0, 2**16), dtype=st.sampled_from(["int4", "uint4", "int2", "int8"]),
       symmetric=st.booleans(), gran=st.sampled_from(GRANS),
       scale_dtype=st.sampled_from(["float32", "float16"]))
def test_invariants(seed, dtype, symmetric, gran, scale_dtype):
    if symmetric and dtype.startswith("u"):
        symmetric = False
    x, w = _layer(seed % 7, k=40, n=6, rows=60)
    w[0, :5] = 0.0
    lw = awq(w, record(x), dtype, symmetric=symmetric, **gran, grid=3, clip_grid=3,
             scale_dtype=scale_dtype)
    qa, qt = lw.qweight, as_qtype(dtype)
    lo, hi = aq.scale_limits(scale_dtype, "float32")
    assert np.all(qa.scale >= lo) and np.all(qa.scale <= hi)
    if symmetric:
        assert qa.zero_point is None
    else:
        assert np.all(qa.zero_point >= qt.qmin) and np.all(qa.zero_point <= qt.qmax)
    assert np.all(np.isfinite(lw.in_scale)) and np.all(lw.in_scale > 0)
    assert np.all(aq.dequantize(lw)[0, :5] == 0.0)  # zero stays exact


def test_awq_numpy_and_jit_agree():
    # Eager JAX runs the same code as NumPy; jit is the stricter test (no value checks).
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    x, w = _layer(8)
    ref = awq(w, record(x), "int4", group_size=16, **TINY)
    sj = record(jnp.asarray(x))
    got = jax.jit(lambda w, s: awq(w, s, "int4", group_size=16, **TINY))(jnp.asarray(w), sj)
    assert isinstance(got.in_scale, jax.Array)
    np.testing.assert_allclose(np.asarray(got.in_scale), ref.in_scale, rtol=1e-5)
    # the codes match except at rounding ties of ranges that differ in the last bit
    assert np.mean(np.asarray(got.qweight.codes) == ref.qweight.codes) > 0.97
    assert abs(_out_err(x, w, _deq(got)) / _out_err(x, w, _deq(ref)) - 1) < 0.05


def test_awq_array_api_strict():
    xps = pytest.importorskip("array_api_strict")
    x, w = _layer(9, k=32, n=8, rows=50)
    ref = awq(w, record(x), "int4", group_size=16, grid=3, clip_grid=3)
    got = awq(xps.asarray(w), record(xps.asarray(x)), "int4", group_size=16, grid=3,
              clip_grid=3)
    np.testing.assert_allclose(np.asarray(got.in_scale._array), ref.in_scale, rtol=1e-5)


@pytest.mark.parametrize("call,match", [
    (lambda w, s: awq(w[0], s, "int4"), "2-D"),
    (lambda w, s: awq(w, s, "int4", axis=1), "not supported"),
    (lambda w, s: awq(w, s, "int4", group_size=16, group_axis=0), "not supported"),
    (lambda w, s: awq(w, s, "int4", in_axis=2), "in_axis"),
    (lambda w, s: awq(w[:, :32], s, "int4"), "64 input features"),
    (lambda w, s: awq(w, s, "int4", grid=0), "grid"),
    (lambda w, s: awq(w, s, "int4", min_shrink=0.0), "min_shrink"),
    (lambda w, s: awq(w, s, "uint4", symmetric=True), "signed"),
    (lambda w, s: awq(w, s, "int4", scales=np.ones(3, np.float32)), r"\(64,\)"),
    (lambda w, s: awq(w, record(np.ones((4, 64)), gram=False), "int4"), "Gram"),
    (lambda w, s: awq(w, s, "int4", inner=_FakeInner([], in_axis=0)), "in_axis"),
    (lambda w, s: AWQ(grid=1.5), "grid"),
    (lambda w, s: AWQ(in_axis=3), "in_axis"),
])
def test_awq_bad_input(call, match):
    x, w = _layer(0)
    with pytest.raises(ValueError, match=match):
        call(w, record(x))


def test_awq_bad_types():
    x, w = _layer(0)
    with pytest.raises(TypeError, match="LayerStats"):
        awq(w, {"gram": 1}, "int4")
    with pytest.raises(TypeError, match="data-aware method"):
        awq(w, record(x), "int4", inner=aq.MinMax())
    with pytest.raises(TypeError, match="clip"):
        awq(w, record(x), "int4", clip="yes")


# ------------------------------------------------------------------------------ SmoothQuant


def test_smooth_scales_reference():
    x, w = _layer(11)
    x[:, 5] = 0.0
    w2 = 3 * np.random.default_rng(2).standard_normal((7, 64)).astype(np.float32)
    stats = record(x)
    for alpha in (0.0, 0.5, 0.8):
        s = np.asarray(smooth_scales([w, w2], stats, alpha), np.float64)
        wmax = np.maximum(np.abs(w).max(0), np.abs(w2).max(0)).astype(np.float64)
        want = np.abs(x).max(0).astype(np.float64) ** alpha / wmax ** (1 - alpha)
        want[5] = 1.0  # a feature that never fires
        np.testing.assert_allclose(s, want, rtol=1e-5)


def test_smoothing_keeps_the_float_product():
    x, w = _layer(12)
    s = smooth_scales(w, record(x), 0.6)
    np.testing.assert_allclose((x / s) @ (w * s).T, x @ w.T, rtol=1e-4,
                               atol=1e-5 * np.abs(x @ w.T).max())
    lw = smoothquant(w, record(x), alpha=0.6)
    np.testing.assert_allclose(lw.in_scale, 1 / s, rtol=1e-6)


def test_smoothquant_w8a8_beats_plain_w8a8_on_outliers():
    x, w = _layer(13, k=128, n=32, outliers=3, scale=60.0)
    y = x.astype(np.float64) @ w.T.astype(np.float64)
    plain = aq.linear(x, aq.quantize(w, "int8", True, axis=0), act_dtype="int8",
                      act_symmetric=False)
    lw = smoothquant(w, record(x), alpha=0.5)
    smooth = aq.linear(transform_input(x, lw, np), lw.qweight, act_dtype="int8",
                       act_symmetric=False)
    e_plain, e_smooth = np.mean((plain - y) ** 2), np.mean((smooth - y) ** 2)
    assert e_smooth < 0.5 * e_plain
    np.testing.assert_array_equal(
        aq.linear(x, lw, act_dtype="int8", act_symmetric=False), smooth)


@pytest.mark.parametrize("act_symmetric", [False, True])
def test_static_activation_params(act_symmetric):
    x, w = _layer(14)
    stats = record(x)
    lw = smoothquant(w, stats, alpha=0.5, static=True, act_symmetric=act_symmetric)
    assert lw.act_qtype == "int8" and lw.act_scale.shape == ()
    xs = (x * lw.in_scale).astype(np.float32)
    want_s, want_z = aq.qparams_from_range(np.float32(xs.min()), np.float32(xs.max()), "int8",
                                           act_symmetric)
    np.testing.assert_array_equal(lw.act_scale, want_s)
    if act_symmetric:
        assert lw.act_zero_point is None
    else:
        np.testing.assert_array_equal(lw.act_zero_point, want_z)
        assert -128 <= int(lw.act_zero_point) <= 127
    # static quantization of the calibration data itself is accurate
    codes = aq.quantize_with(xs, lw.act_scale, lw.act_zero_point, "int8")
    xq = aq.dequantize_with(codes, lw.act_scale, lw.act_zero_point)
    y = aq.dequantize(lw.qweight)
    rel = np.abs(xq @ y.T - x @ w.T).max() / np.abs(x @ w.T).max()
    assert rel < 0.05
    s2, z2 = static_act_params(stats, lw.in_scale, "int8", act_symmetric)
    np.testing.assert_array_equal(s2, lw.act_scale)
    # aq.linear uses the static parameters (no act_dtype): the same codes, integer product
    np.testing.assert_allclose(aq.linear(x, lw), xq @ y.T, rtol=1e-4,
                               atol=1e-4 * np.abs(x @ w.T).max())
    tree = aq.quantize_tree({"w": w}, aq.Rule(dtype="int8", symmetric=True, axis=0,
                                              method=SmoothQuant(static=True,
                                                                 act_symmetric=act_symmetric)),
                            stats={"w": stats})
    np.testing.assert_array_equal(tree["w"].act_scale, lw.act_scale)


def test_smoothquant_method_and_jax():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    x, w = _layer(15)
    m = SmoothQuant(alpha=0.6, static=True)
    assert m.needs_stats and hash(m) == hash(SmoothQuant(alpha=0.6, static=True))
    ref = m.quantize_weight(w, record(x), dtype="int8", symmetric=True, axis=0,
                            group_size=None, group_axis=-1, scale_dtype="float32")
    sj = record(jnp.asarray(x))
    f = jax.jit(lambda w, s: m.quantize_weight(w, s, dtype="int8", symmetric=True, axis=0,
                                               group_size=None, group_axis=-1,
                                               scale_dtype="float32"))
    got = f(jnp.asarray(w), sj)
    np.testing.assert_allclose(np.asarray(got.in_scale), ref.in_scale, rtol=1e-6)
    assert np.mean(np.asarray(got.qweight.codes) == ref.qweight.codes) > 0.99
    np.testing.assert_allclose(np.asarray(got.act_scale), ref.act_scale, rtol=1e-6)


@pytest.mark.parametrize("call,exc,match", [
    (lambda w, s: smooth_scales(w, s, 1.5), ValueError, "alpha"),
    (lambda w, s: smooth_scales([], s), ValueError, "at least one"),
    (lambda w, s: smoothquant(w, s, axis=1), ValueError, "not supported"),
    (lambda w, s: smoothquant(w[:, :10], s), ValueError, "features"),
    (lambda w, s: smoothquant(w, s, static=1), TypeError, "static"),
    (lambda w, s: smoothquant(w, s, scales=np.ones(5)), ValueError, r"\(64,\)"),
    (lambda w, s: smoothquant(w, s, static=True, act_dtype="uint8", act_symmetric=True),
     ValueError, "signed"),
    (lambda w, s: SmoothQuant(alpha=-0.1), ValueError, "alpha"),
    (lambda w, s: SmoothQuant(act_dtype="uint8", act_symmetric=True), ValueError, "signed"),
    (lambda w, s: static_act_params(None, None), TypeError, "LayerStats"),
])
def test_smoothquant_bad_input(call, exc, match):
    x, w = _layer(0)
    with pytest.raises(exc, match=match):
        call(w, record(x))


# ------------------------------------------------------------------------------ bias


@pytest.mark.parametrize("in_axis", [1, 0])
def test_bias_correction_zeroes_the_mean_error(in_axis):
    x, w = _layer(16)
    x = x + 1.0  # a non-zero mean input, so that the weight error shifts the output
    stats = record(x)
    b = np.linspace(-1, 1, 24).astype(np.float32)
    wl = w if in_axis == 1 else np.ascontiguousarray(w.T)
    qw = aq.quantize(wl, "int4", group_size=16, group_axis=in_axis)
    w_hat = _deq(qw) if in_axis == 1 else _deq(qw).T
    y = x.astype(np.float64) @ w.T.astype(np.float64) + b
    before = np.abs((x @ w_hat.T + b - y).mean(0)).max()
    b2 = corrected_bias(wl, qw, stats, b, in_axis=in_axis)
    assert b2.dtype == np.float32 and b2.shape == (24,)
    after = np.abs((x @ w_hat.T + b2 - y).mean(0)).max()
    assert before > 0.05 and after < 1e-3 * before


def test_correct_biases_tree():
    x, w = _layer(17)
    x = x + 1.0
    stats = record(x)
    tree = {"enc.dense.weight": w, "enc.dense.bias": np.zeros(24, np.float32),
            "head": {"weight": w, "bias": np.ones(24, np.float32)}, "nob": {"kernel": w}}
    q = aq.quantize_tree(tree, aq.Rule(dtype="int4", group_size=16))
    q["head"]["weight"] = awq(w, stats, "int4", group_size=16, **SMALL)
    st_all = {"enc.dense.weight": stats, "head/weight": stats, "nob/kernel": stats}
    with pytest.raises(ValueError, match="nob/kernel"):
        correct_biases(tree, q, st_all)
    out = correct_biases(tree, q, st_all, missing="skip")
    np.testing.assert_allclose(out["enc.dense.bias"],
                               corrected_bias(w, q["enc.dense.weight"], stats,
                                              tree["enc.dense.bias"]), rtol=1e-6)
    np.testing.assert_allclose(out["head"]["bias"],
                               corrected_bias(w, q["head"]["weight"], stats,
                                              np.ones(24, np.float32)), rtol=1e-6)
    assert out["nob"]["kernel"] is q["nob"]["kernel"]
    assert default_bias_path("Dense_0/kernel") == "Dense_0/bias"
    assert default_bias_path("a/scale") is None
    with pytest.raises(ValueError, match="not a leaf"):
        correct_biases(tree, q, {"missing/weight": stats})
    with pytest.raises(ValueError, match="missing"):
        correct_biases(tree, q, st_all, missing="add")


def test_bias_correction_jax_and_errors():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    x, w = _layer(18)
    qw = aq.quantize(w, "int4", group_size=16)
    ref = corrected_bias(w, qw, record(x), np.zeros(24, np.float32))
    qj = jax.tree.map(jnp.asarray, qw)
    f = jax.jit(lambda w, q, s: corrected_bias(w, q, s, jnp.zeros(24, jnp.float32)))
    got = f(jnp.asarray(w), qj, record(jnp.asarray(x)))
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(TypeError, match="QArray"):
        corrected_bias(w, w, record(x))
    with pytest.raises(ValueError, match="bias"):
        corrected_bias(w, qw, record(x), np.zeros(3, np.float32))
    lw = awq(w, record(x), "int4", group_size=16, **TINY)
    with pytest.raises(ValueError, match="in_axis"):
        corrected_bias(w, lw, record(x), in_axis=0)


def _no_rows_and_nan_stats(k):
    rng = np.random.default_rng(11)
    x = rng.standard_normal((40, k)).astype(np.float32)
    empty = record(x, row_mask=np.zeros(40))  # every row masked out: count 0
    bad = x.copy()
    bad[3, 2] = np.nan
    return empty, record(bad)


@pytest.mark.parametrize("method", ["gptq", "awq", "awq_gptq", "smoothquant", "static",
                                    "bias"])
def test_statistics_without_rows_or_with_nan_are_refused(method):
    """Not a zeroed weight (GPTQ: every input 'dead'), NaN biases, s = 1 or a range error."""
    w = np.random.default_rng(12).standard_normal((6, 16)).astype(np.float32)
    run = {"gptq": lambda s: aq.gptq(w, s, "int4", group_size=8),
           "awq": lambda s: awq(w, s, "int4", group_size=8),
           "awq_gptq": lambda s: awq(w, s, "int4", group_size=8, inner=aq.GPTQ()),
           "smoothquant": lambda s: smoothquant(w, s),
           "static": lambda s: smoothquant(w, s, static=True),
           "bias": lambda s: corrected_bias(w, aq.quantize(w, "int4"), s)}[method]
    empty, nan = _no_rows_and_nan_stats(16)
    with pytest.raises(ValueError, match="no rows"):
        run(empty)
    with pytest.raises(ValueError, match="statistics hold NaN or inf"):
        run(nan)


@pytest.mark.parametrize("bad", [0.0, -1.0, np.inf, 1e-39])
@pytest.mark.parametrize("method", ["awq", "smoothquant"])
def test_given_scales_must_be_positive_and_finite(method, bad):
    """in_scale = 1 / s: a zero, inf or subnormal s gave NaN products (and a weight that
    save refuses); a negative one a weight that save refuses."""
    rng = np.random.default_rng(13)
    w = rng.standard_normal((4, 16)).astype(np.float32)
    stats = record(rng.standard_normal((30, 16)).astype(np.float32))
    s = np.ones(16, np.float32)
    s[3] = bad
    run = {"awq": lambda: awq(w, stats, "int4", group_size=8, scales=s),
           "smoothquant": lambda: smoothquant(w, stats, scales=s)}[method]
    with pytest.raises(ValueError, match=f"{method} scales.*positive"):
        run()
