"""GPTQ: the closed-form optimum on a tiny layer, never worse than RTN, the affine
invariants, act-order, NumPy / JAX / jit agreement, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import arrayquant as aq
from arrayquant._backend import scale_limits
from arrayquant.dataaware.gptq import GPTQ, gptq, gptq_codes
from arrayquant.linear_weight import transform_input
from arrayquant.qtypes import QType, as_qtype
from arrayquant.stats import record


def _layer(m=6, k=24, n=80, seed=0, dead=()):
    """A weight (m, k), calibration inputs (n, k) with uneven feature scales, and X^T X."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((m, k))
    x = rng.standard_normal((n, k)) * rng.uniform(0.2, 3.0, k) + rng.standard_normal(k)
    x[:, list(dead)] = 0.0
    return w, x, x.T @ x


def _loss(w, q, h):
    e = np.asarray(w, np.float64) - np.asarray(q, np.float64)
    return float(np.trace(e @ h @ e.T))


def _deq(r):
    return np.asarray(aq.dequantize(r), np.float64)


def _qdq(v, s, z):
    """Quantize-dequantize a column with a (rows,) scale and zero point, float64."""
    c = np.clip(np.round(v / s) + z, -8, 7)
    return s * (c - z)


# ------------------------------------------------------------------- the closed-form optimum


def test_two_columns_closed_form():
    """Column 1 quantized to q1; GPTQ moves column 2 to w2 + (w1 - q1) H12 / H22."""
    w, _, h = _layer(m=5, k=2, n=10, seed=3)
    r = gptq(w, h, "int4", axis=0, damp=0.0, params="minmax")
    q = _deq(r)
    s, z = (np.asarray(a, np.float64)[:, 0] for a in (r.scale, r.zero_point))
    v2 = w[:, 1] + (w[:, 0] - q[:, 0]) * h[0, 1] / h[1, 1]
    np.testing.assert_allclose(q[:, 1], _qdq(v2, s, z), rtol=0, atol=1e-12)


@pytest.mark.parametrize("gran", [{"axis": 0}, {"group_size": 4}, {}])
def test_last_column_is_the_optimum_given_the_others(gran):
    """The last column, before rounding, minimizes tr((W - Q) H (W - Q)^T) over that column
    with every other column quantized: v = w_k + (W - Q)[:, :k] H[:k, k] / H[k, k]."""
    w, _, h = _layer(m=7, k=10, n=40, seed=1)
    r = gptq(w, h, "int4", damp=0.0, block_size=3, params="minmax", **gran)
    q = _deq(r)
    v = w[:, -1] + (w[:, :-1] - q[:, :-1]) @ h[:-1, -1] / h[-1, -1]
    s = np.broadcast_to(np.asarray(r.scale, np.float64)[:, -1], (7,))
    z = np.broadcast_to(np.asarray(r.zero_point, np.float64)[:, -1], (7,))
    np.testing.assert_allclose(q[:, -1], _qdq(v, s, z), rtol=0, atol=1e-12)


# ------------------------------------------------------------------- never worse than RTN


@pytest.mark.parametrize("dtype,symmetric", [("int2", False), ("uint4", False), ("int4", False),
                                             ("int8", False), ("int2", True), ("int4", True),
                                             ("int8", True)])
@pytest.mark.parametrize("gran", [{"group_size": 8}, {"axis": 0}])
def test_loss_never_worse_than_rtn(dtype, symmetric, gran):
    for seed in range(3):
        w, _, h = _layer(m=8, k=32, n=100, seed=seed)
        w = w.astype(np.float32)
        rtn = _loss(w, aq.dequantize(aq.quantize(w, dtype, symmetric, **gran)), h)
        for params, damp in (("mse", 0.1), ("minmax", 0.01)):
            r = gptq(w, h, dtype, symmetric=symmetric, params=params, damp=damp, **gran)
            assert _loss(w, _deq(r), h) <= rtn, (seed, params)


@pytest.mark.parametrize("gran", [{"group_size": 8}, {"axis": 0}])
def test_three_bits_through_gptq_codes(gran):
    """A width arrayquant does not store: gptq_codes with QType(3, True), against RTN."""
    qt = QType(3, True)
    for seed in range(3):
        w, _, h = _layer(m=8, k=32, n=100, seed=seed)
        s, z = aq.qparams(w, qt, **gran)
        rtn = aq.dequantize_with(aq.quantize_with(w, s, z, qt), s, z)
        codes, s, z, _ = gptq_codes(w, h, qt, **gran)
        assert codes.min() >= -4 and codes.max() <= 3
        assert _loss(w, aq.dequantize_with(codes, s, z), h) <= _loss(w, rtn, h)
    with pytest.raises(ValueError, match="gptq_codes"):
        gptq(w, h, qt, **gran)


def test_mse_params_beat_minmax_on_average():
    wins = []
    for seed in range(4):
        w, _, h = _layer(m=16, k=64, n=200, seed=seed)
        a, b = (_loss(w, _deq(gptq(w, h, "int2", group_size=16, params=p)), h)
                for p in ("mse", "minmax"))
        wins.append(a < b)
    assert sum(wins) >= 3


# ------------------------------------------------------------------- the affine invariants


def _check_params(r, dtype):
    qt = as_qtype(dtype)
    lo, hi = scale_limits("float32", "float32")
    s = np.asarray(r.scale, np.float64)
    assert np.all((s >= lo) & (s <= hi))
    if r.zero_point is not None:
        z = np.asarray(r.zero_point)
        assert np.all((z >= qt.qmin) & (z <= qt.qmax))


@given(
    w=hnp.arrays(np.float32, st.tuples(st.integers(1, 5), st.integers(2, 12)),
                 elements=st.floats(-4, 4, width=32)),
    dead=st.integers(0, 3), seed=st.integers(0, 2**16),
    dtype=st.sampled_from(["int2", "uint4", "int8"]), group=st.sampled_from([None, 3, 4]),
)
def test_invariants_hypothesis(w, dead, seed, dtype, group):
    """Zero points in range, scales within the limits, and a dead input's column (and
    so the value 0) exactly zero after dequantization."""
    k = w.shape[1]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3 * k, k))
    x[:, dead % k] = 0.0
    gran = {"group_size": group} if group else {"axis": 0}
    r = gptq(w, x.T @ x, dtype, params="mse", **gran)
    _check_params(r, dtype)
    assert np.all(_deq(r)[:, dead % k] == 0.0)


def test_dead_inputs_and_zero_columns():
    w, x, h = _layer(m=4, k=12, dead=(2, 7))
    for gran in ({"group_size": 4}, {"axis": 0}, {}):
        q = _deq(gptq(w, h, "uint4", **gran))
        assert np.all(q[:, [2, 7]] == 0.0)


# ------------------------------------------------------------------- act-order


@pytest.mark.parametrize("in_axis", [1, 0])
def test_act_order_round_trip(in_axis):
    w, x, h = _layer(m=6, k=20, n=60, seed=5)
    w = w.astype(np.float32)
    wl = w if in_axis == 1 else w.T
    lw = gptq(wl, h, "int4", group_size=8, act_order=True, in_axis=in_axis)
    assert isinstance(lw, aq.LinearWeight) and lw.in_axis == in_axis
    perm = np.asarray(lw.perm)
    assert perm.dtype == np.int32
    np.testing.assert_array_equal(perm, np.argsort(-np.diag(h), kind="stable"))
    stored = np.asarray(aq.dequantize(lw.qweight), np.float64)
    rep = _deq(lw)
    if in_axis == 0:
        stored, rep = stored.T, rep.T
    np.testing.assert_array_equal(rep[:, perm], stored)  # W[:, perm[j]] = Q[:, j]
    # groups of 8 along processing order: feature perm[j] is in group j // 8
    np.testing.assert_array_equal(np.asarray(lw.group_index(8))[perm], np.arange(20) // 8)
    assert _loss(w, rep, h) < _loss(w, _deq(aq.quantize(w, "int4", group_size=8)), h)
    if in_axis == 1:
        xb = x.astype(np.float32)
        # x @ W.T == x[:, perm] @ Q.T: what a linear layer computes with the stored codes
        np.testing.assert_allclose(np.asarray(aq.linear(transform_input(xb, lw, np),
                                                        lw.qweight)),
                                   xb @ rep.T.astype(np.float32), rtol=1e-4, atol=1e-3)


# ------------------------------------------------------------------- backends


# Small settings keep the jit compiles short.
SMALL = dict(group_size=16, block_size=16, params=aq.MSESearch(grid=2), damp=0.1)


def test_every_backend(backend, call):
    """Every backend against NumPy: float64-Hessian namespaces give NumPy's codes; JAX
    (float32 Hessian) the same codes up to rounding, and a layer loss within 1 %."""
    w, x, h = _layer(m=16, k=48, n=120, seed=2)
    w = w.astype(np.float32)
    ref = gptq(w, h, "int4", **SMALL)
    got = call(gptq)(backend.asarray(w), backend.asarray(h, "float32" if backend.is_jax
                                                         else "float64"), "int4", **SMALL)
    assert isinstance(got, aq.QArray) and got.data.shape == ref.data.shape
    codes = backend.to_numpy(got.codes)
    if backend.is_jax:
        assert np.mean(codes == np.asarray(ref.codes)) >= 0.99
        la = _loss(w, _deq(ref), h)
        assert abs(_loss(w, backend.to_numpy(aq.dequantize(got)), h) - la) <= 0.01 * la
    else:
        np.testing.assert_array_equal(codes, np.asarray(ref.codes))


def test_jax_eager_is_jit():
    """Eager JAX runs the same jitted program as an outer jax.jit traces: same codes."""
    jax = pytest.importorskip("jax")
    w, x, _ = _layer(m=16, k=48, n=120, seed=2)
    stats = record(jax.numpy.asarray(x, jax.numpy.float32))
    wj = jax.numpy.asarray(w, jax.numpy.float32)
    a = gptq(wj, stats, "int4", **SMALL)
    b = jax.jit(lambda w, s: gptq(w, s, "int4", **SMALL))(wj, stats)
    assert isinstance(a.data, jax.Array) and a.data.dtype == jax.numpy.uint8
    np.testing.assert_array_equal(np.asarray(a.data), np.asarray(b.data))
    np.testing.assert_array_equal(np.asarray(a.scale), np.asarray(b.scale))


def test_codes_match_quantize_with_and_shapes():
    """Packing, shapes and metadata as aq.quantize gives them; the codes are those of the
    stored scale and zero point; float64 weights keep float64 arithmetic."""
    w, _, h = _layer(m=5, k=21, seed=6)
    r = gptq(w.astype(np.float32), h, "uint4", group_size=8)
    ref = aq.quantize(w.astype(np.float32), "uint4", group_size=8)
    assert (r.shape, r.block_shape, r.packed_axis, r.data.shape, r.scale.shape, r.dtype) == (
        ref.shape, ref.block_shape, ref.packed_axis, ref.data.shape, ref.scale.shape, ref.dtype)
    codes, s, z, perm = gptq_codes(w.astype(np.float32), h, "uint4", group_size=8)
    np.testing.assert_array_equal(np.asarray(r.codes), codes)
    assert perm is None and codes.dtype == np.uint8
    r64 = gptq(w, h, "int8", axis=0, symmetric=True)
    assert r64.zero_point is None and r64.dtype == "float64"
    wt = gptq(w.T.copy(), h, "int4", group_size=8, in_axis=0)
    np.testing.assert_array_equal(np.asarray(wt.codes).T,
                                  np.asarray(gptq(w, h, "int4", group_size=8).codes))


def test_method_protocol():
    w, x, _ = _layer(m=4, k=16)
    stats = record(x)
    m = GPTQ(damp=0.05, params="minmax")
    assert m.needs_stats and hash(m) == hash(GPTQ(damp=0.05, params="minmax"))
    r = m.quantize_weight(w, stats, dtype="int4", symmetric=False, axis=None, group_size=8,
                          group_axis=-1, scale_dtype="float32")
    np.testing.assert_array_equal(
        np.asarray(r.codes),
        np.asarray(gptq(w, stats, "int4", group_size=8, damp=0.05, params="minmax").codes))
    with pytest.raises(ValueError, match="along the input axis"):
        m.quantize_weight(w, stats, dtype="int4", symmetric=False, axis=None, group_size=8,
                          group_axis=0, scale_dtype="float32")


# ------------------------------------------------------------------- bad inputs


def test_bad_inputs():
    w, x, h = _layer(m=4, k=8)
    with pytest.raises(ValueError, match="2-D"):
        gptq(np.zeros((2, 4, 8)), h, "int4")
    with pytest.raises(ValueError, match=r"shape \(7, 7\); expected \(8, 8\)"):
        gptq(w, h[:7, :7], "int4")
    with pytest.raises(ValueError, match="gram=False"):
        gptq(w, record(x, gram=False), "int4")
    with pytest.raises(ValueError, match="per output channel"):
        gptq(w, h, "int4", axis=1)
    with pytest.raises(ValueError, match="not both"):
        gptq(w, h, "int4", axis=0, group_size=4)
    with pytest.raises(ValueError, match="along the input axis"):
        GPTQ().quantize_weight(w, h, dtype="int4", group_size=4, group_axis=0)
    with pytest.raises(ValueError, match="damp"):
        GPTQ(damp=-1)
    with pytest.raises(ValueError, match="params"):
        gptq(w, h, "int4", params="hqq")
    with pytest.raises(ValueError, match="symmetric"):
        gptq(w, h, "uint4", symmetric=True)
    with pytest.raises(TypeError, match="LayerStats"):
        gptq(w, [[1.0]], "int4")
    with pytest.raises(ValueError, match="NaN"):
        gptq(np.full((4, 8), np.nan), h, "int4")
    with pytest.raises(ValueError, match="positive definite"):
        gptq(w, -np.eye(8), "int4", damp=0.0)


# ------------------------------------------------------------------- a plain reference


def _reference(w, h, dtype, group, damp):
    """Textbook GPTQ in float64 NumPy: no lazy batches, one column at a time, each group's
    min/max parameters from its columns as the earlier updates left them."""
    w, h = w.copy(), h.copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * np.mean(np.diag(h)) * np.eye(len(h))
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    q, codes = np.zeros_like(w), np.zeros(w.shape, np.int64)
    for j in range(w.shape[1]):
        if j % group == 0:
            s, z = aq.qparams(w[:, j:j + group], dtype, axis=0)
        codes[:, j:j + 1] = aq.quantize_with(w[:, j:j + 1], s, z, dtype)
        q[:, j] = aq.dequantize_with(codes[:, j:j + 1], s, z)[:, 0]
        err = (w[:, j] - q[:, j]) / u[j, j]
        w[:, j:] -= np.outer(err, u[j, j:])
    return q, codes


@pytest.mark.parametrize("group,block", [(4, 3), (4, 8), (6, 128), (12, 5), (13, 5)])
def test_matches_textbook_gptq(group, block):
    w, _, h = _layer(m=9, k=30, n=50, seed=7, dead=(5,))
    ref, ref_codes = _reference(w, h, "int4", group, 0.05)
    r = gptq(w, h, "int4", group_size=group, block_size=block, damp=0.05, params="minmax")
    assert np.mean(np.asarray(r.codes) == ref_codes) >= 0.99  # float64: rounding order only
    assert abs(_loss(w, _deq(r), h) - _loss(w, ref, h)) <= 1e-6 * _loss(w, ref, h)
