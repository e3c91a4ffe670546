"""qparams / quantize_with / dequantize_with / quantize / dequantize on every backend."""

from __future__ import annotations

import math

import numpy as np
import pytest

import arrayquant as aq
import arrayquant.affine as affine

LESSON = np.array(
    [[191.6, -13.5, 728.6], [92.14, 295.5, -184], [0, 684.6, 245.5]], dtype=np.float32
)


def _ref_asym(x, qmin, qmax, axes_reduce):
    """float64 reference of the asymmetric formulas (range extended to hold 0)."""
    rmin = np.minimum(x.min(axis=axes_reduce, keepdims=True), 0)
    rmax = np.maximum(x.max(axis=axes_reduce, keepdims=True), 0)
    s = (rmax - rmin) / (qmax - qmin)
    z = np.clip(np.round(qmin - rmin / s), qmin, qmax)
    return s, z


# ---------------------------------------------------------------- the lesson's example


def test_lesson_example(backend, call):
    x = backend.asarray(LESSON)
    s, z = call(aq.qparams)(x, dtype="int8")
    s, z = backend.to_numpy(s), backend.to_numpy(z)
    assert s.shape == (1, 1) and z.shape == (1, 1)
    assert s.dtype == np.float32 and z.dtype == np.int8
    assert float(s[0, 0]) == pytest.approx(3.5788, abs=1e-4)
    assert int(z[0, 0]) == -77
    qa = call(aq.quantize)(x, "int8")
    x_hat = backend.to_numpy(call(aq.dequantize)(qa))
    assert x_hat.dtype == np.float32
    mse = float(np.mean((x_hat.astype(np.float64) - LESSON) ** 2))
    assert 1.0 < mse < 2.0
    # The hand-picked scale 3.5 and zero point -70 of the lesson is much worse.
    s0, z0 = backend.asarray(np.full((1, 1), 3.5, np.float32)), backend.asarray(
        np.full((1, 1), -70, np.int8)
    )
    q0 = call(aq.quantize_with)(x, s0, z0, dtype="int8")
    x0 = backend.to_numpy(call(aq.dequantize_with)(q0, s0, z0))
    mse0 = float(np.mean((x0.astype(np.float64) - LESSON) ** 2))
    assert 160 < mse0 < 180
    assert float(call(aq.mse)(x, qa)) == pytest.approx(mse, rel=1e-5)


def test_extended_range_beats_clipping_the_zero_point():
    # The lesson's recipe without range extension: s = (20 - 10) / 255 and
    # z = round(-128 - 10 / s) = -383, clipped to -128. Codes then cover [0, 10],
    # so every value above 10 saturates at the top code.
    x = np.linspace(10.0, 20.0, 11, dtype=np.float32)
    s_l = (20.0 - 10.0) / 255
    z_l = -128
    q_l = np.clip(np.round(x / s_l) + z_l, -128, 127)
    err_lesson = np.max(np.abs(s_l * (q_l - z_l) - x))
    assert err_lesson > 9
    # arrayquant extends the range to [0, 20]: z = -128 exactly, error <= s / 2.
    s, z = aq.qparams(x, "int8")
    assert int(z[0]) == -128
    assert float(s[0]) == pytest.approx(20.0 / 255, rel=1e-6)
    x_hat = aq.dequantize(aq.quantize(x, "int8"))
    slack = 4 * np.finfo(np.float32).eps * np.abs(x)
    assert np.all(np.abs(x_hat - x) <= float(s[0]) / 2 + slack)


# ---------------------------------------------------------------- granularity


@pytest.mark.parametrize(
    ("shape", "kw", "scale_shape"),
    [
        ((6, 10), {}, (1, 1)),
        ((6, 10), {"axis": 0}, (6, 1)),
        ((6, 10), {"axis": -1}, (1, 10)),
        ((6, 10), {"axis": (0, 1)}, (6, 10)),
        ((6, 10), {"group_size": 4}, (6, 3)),
        ((6, 10), {"group_size": 5}, (6, 2)),
        ((6, 10), {"group_size": 4, "group_axis": 0}, (2, 10)),
        ((6, 10), {"group_size": 64}, (6, 1)),
        ((2, 3, 8), {"axis": 1}, (1, 3, 1)),
        ((2, 3, 8), {"group_size": 3}, (2, 3, 3)),
        ((7,), {}, (1,)),
        ((), {}, ()),
    ],
)
def test_granularity_shapes_and_reference(backend, call, shape, kw, scale_shape):
    rng = np.random.default_rng(sum(shape) + len(kw))
    x64 = rng.standard_normal(shape) * 4
    x = backend.asarray(x64, "float32")
    s, z = call(aq.qparams)(x, "uint8", **kw)
    s, z = backend.to_numpy(s), backend.to_numpy(z)
    assert s.shape == scale_shape and z.shape == scale_shape
    # Float64 reference per block, computed by looping over blocks explicitly.
    plan = aq.affine.plan(tuple(shape), kw.get("axis"), kw.get("group_size"),
                          kw.get("group_axis", -1))
    xf = np.asarray(backend.to_numpy(x), dtype=np.float64)
    for idx in np.ndindex(*scale_shape):
        sl = tuple(slice(i * b, (i + 1) * b) for i, b in zip(idx, plan.block))
        rs, rz = _ref_asym(xf[sl].reshape(-1), 0, 255, None)
        assert s[idx] == pytest.approx(float(rs.item()), rel=1e-5)
        assert abs(int(z[idx]) - float(rz.item())) <= 1
    qa = call(aq.quantize)(x, "uint8", **kw)
    assert qa.shape == tuple(shape)
    x_hat = backend.to_numpy(call(aq.dequantize)(qa))
    assert x_hat.shape == tuple(shape)
    s_full = _broadcast_blocks(s, plan.block, shape)
    err = np.abs(x_hat.astype(np.float64) - xf)
    assert np.all(err <= s_full * 0.5 * (1 + 1e-4) + 1e-6)


def _broadcast_blocks(s, block, shape):
    out = s
    for d, b in enumerate(block):
        out = np.repeat(out, b, axis=d)
    return out[tuple(slice(0, n) for n in shape)]


def test_partial_last_group_needs_group_size_for_bare_arrays():
    x = np.random.default_rng(1).standard_normal((3, 100)).astype(np.float32)
    s, z = aq.qparams(x, "int4", group_size=32)
    assert s.shape == (3, 4)
    # 100 / 4 entries would suggest blocks of 25: the group size is required.
    q_auto = aq.quantize_with(x, s, z, "int4")
    q = aq.quantize_with(x, s, z, "int4", group_size=32)
    assert np.array_equal(q, aq.quantize(x, "int4", group_size=32).codes)
    assert not np.array_equal(q, q_auto)
    x_hat = aq.dequantize_with(q, s, z, group_size=32)
    np.testing.assert_array_equal(x_hat, aq.dequantize(aq.quantize(x, "int4", group_size=32)))


# ---------------------------------------------------------------- semantics


@pytest.mark.parametrize("dtype", ["int8", "int4", "int2", "int16"])
def test_symmetric(backend, call, dtype):
    qt = aq.as_qtype(dtype)
    x = backend.asarray(np.linspace(-3, 2, 41), "float32")
    s, z = call(aq.qparams)(x, dtype, symmetric=True)
    assert z is None
    assert float(backend.to_numpy(s)[0]) == pytest.approx(3 / qt.qmax, rel=1e-6)
    codes = backend.to_numpy(call(aq.quantize)(x, dtype, symmetric=True).codes)
    assert codes.min() == -qt.qmax  # restricted range: -q_max, never q_min
    assert codes.max() <= qt.qmax


def test_round_half_to_even(backend, call):
    # scale 0.25 exactly (max |x| = 127 * 0.25), so x / s hits exact halves.
    k = np.arange(-10, 10)
    x = np.concatenate([(k + 0.5) * 0.25, [127 * 0.25]]).astype(np.float32)
    qa = call(aq.quantize)(backend.asarray(x), "int8", symmetric=True)
    assert float(backend.to_numpy(qa.scale)[0]) == 0.25
    codes = backend.to_numpy(qa.codes)[:-1]
    np.testing.assert_array_equal(codes, np.round(k + 0.5).astype(np.int8))
    assert codes[k == 0][0] == 0 and codes[k == 1][0] == 2  # 0.5 -> 0, 1.5 -> 2


@pytest.mark.parametrize("value", [0.0, 3.0, -2.5])
def test_constant_and_zero_blocks_get_finite_scales(backend, call, value):
    x = backend.asarray(np.full((4, 6), value), "float32")
    for sym in (False, True):
        qa = call(aq.quantize)(x, "int8", sym, axis=0)
        s = backend.to_numpy(qa.scale)
        assert np.all(np.isfinite(s)) and np.all(s > 0)
        x_hat = backend.to_numpy(call(aq.dequantize)(qa))
        np.testing.assert_allclose(x_hat, value, rtol=1e-2)
        if value == 0.0:
            assert np.all(x_hat == 0)


def test_scale_dtype_and_output_dtype(backend, call):
    x = backend.asarray(np.linspace(-1, 1, 16), "float32")
    sdt = "float16" if "float16" in backend.float_dtypes() else "float64"
    qa = call(aq.quantize)(x, "int8", scale_dtype=sdt)
    assert backend.to_numpy(qa.scale).dtype == np.dtype(sdt)
    out = call(aq.dequantize)(qa, dtype="float64" if backend.name == "numpy" else "float32")
    assert backend.to_numpy(out).dtype in (np.float64, np.float32)


@pytest.mark.parametrize("fdt", ["float16", "bfloat16", "float64"])
def test_input_float_dtypes_round_trip_dtype(backend, call, fdt):
    x = backend.asarray(np.linspace(-1, 1, 33), fdt)
    if backend.is_jax and fdt == "float64":
        pytest.skip("JAX without x64 has no float64")
    qa = call(aq.quantize)(x, "int8", axis=None)
    assert qa.dtype == fdt
    assert backend.to_numpy(qa.scale).dtype == np.float32
    x_hat = call(aq.dequantize)(qa)
    assert aq._backend.dtype_name(x_hat.dtype) == fdt


# ---------------------------------------------------------------- errors


def test_errors():
    x = np.ones((4, 6), np.float32)
    with pytest.raises(TypeError, match="floating-point"):
        aq.qparams(np.ones((2, 2), np.int32))
    with pytest.raises(ValueError, match="unknown quantized dtype 'int3'"):
        aq.quantize(x, "int3")
    with pytest.raises(ValueError, match="unsupported quantized dtype"):
        aq.quantize(x, np.float32)
    with pytest.raises(ValueError, match=r"axis=2 is out of range .* \[-2, 1\]"):
        aq.quantize(x, axis=2)
    with pytest.raises(ValueError, match="repeats"):
        aq.quantize(x, axis=(0, -2))
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        aq.quantize(x, group_size=0)
    with pytest.raises(TypeError, match="group_size"):
        aq.quantize(x, group_size=2.0)
    with pytest.raises(ValueError, match="not both"):
        aq.quantize(x, axis=0, group_size=2)
    with pytest.raises(ValueError, match="symmetric=True needs a signed dtype"):
        aq.quantize(x, "uint8", symmetric=True)
    with pytest.raises(ValueError, match="empty"):
        aq.quantize(np.ones((0, 3), np.float32))
    s, z = aq.qparams(x, axis=0)
    with pytest.raises(ValueError, match="zero_point of shape"):
        aq.quantize_with(x, s, z[:2])
    with pytest.raises(ValueError, match="scale of shape"):
        aq.quantize_with(x, s[:, 0], None)
    with pytest.raises(ValueError, match="dimension 1 has 7 scale entries"):
        aq.dequantize_with(np.zeros((4, 6), np.int8), np.ones((4, 7), np.float32))
    with pytest.raises(TypeError, match="codes must be an integer"):
        aq.dequantize_with(x, s, z)
    with pytest.raises(TypeError, match="zero_point must be an integer"):
        aq.dequantize_with(np.zeros((4, 6), np.int8), s, s)
    with pytest.raises(TypeError, match="QArray"):
        aq.dequantize(x)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_raises_eagerly(backend, bad):
    if backend.jit:
        pytest.skip("under jit the check cannot run; see test_validation")
    x = np.linspace(-1, 1, 12).reshape(3, 4)
    x[1, 2] = bad
    xa = backend.asarray(x, "float32")
    for fn in (aq.qparams, aq.quantize):
        with pytest.raises(ValueError, match="NaN or infinite"):
            fn(xa, "int8", axis=0)
    s, z = aq.qparams(backend.asarray(np.ones((3, 4)), "float32"))
    with pytest.raises(ValueError, match="NaN or infinite"):
        aq.quantize_with(xa, s, z)


# ---------------------------------------------------------------- cross-backend exactness


def _adversarial(rng):
    halves = ((np.arange(-64, 64) + 0.5) * 0.25).astype(np.float32)
    return [
        rng.standard_normal((16, 64)).astype(np.float32),
        (rng.standard_normal((8, 32)) * 1e30).astype(np.float32),
        (rng.standard_normal((8, 32)) * 1e-30).astype(np.float32),
        np.concatenate([halves, [127 * 0.25, -127 * 0.25]]).astype(np.float32)[None, :],
        np.array([[1.0e38, -1.0e38, 1.0, -1.0]], np.float32),
        np.array([[3.0e-38, -1.5e-38, 1e-39, -5e-39, 2e-38]], np.float32),
        np.array([[1e-40, -1e-41, 0.0, 3e-39]], np.float32),
        rng.uniform(0, 1, (4, 100)).astype(np.float32),
    ]


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int4", "uint4", "int2", "int16"])
@pytest.mark.parametrize("kw", [{}, {"axis": 0}, {"group_size": 16}])
def test_numpy_and_jax_bit_identical(dtype, kw):
    jnp = pytest.importorskip("jax.numpy")
    import jax

    rng = np.random.default_rng(7)
    for x in _adversarial(rng):
        for sym in (False, True) if dtype.startswith("i") else (False,):
            a = aq.quantize(x, dtype, sym, **kw)
            b = aq.quantize(jnp.asarray(x), dtype, sym, **kw)
            c = jax.jit(lambda v, sym=sym: aq.quantize(v, dtype, sym, **kw))(jnp.asarray(x))
            for other in (b, c):
                np.testing.assert_array_equal(a.codes, np.asarray(other.codes))
                np.testing.assert_array_equal(a.scale, np.asarray(other.scale))
                if not sym:
                    np.testing.assert_array_equal(a.zero_point, np.asarray(other.zero_point))
                np.testing.assert_array_equal(aq.dequantize(a), np.asarray(aq.dequantize(other)))


@pytest.mark.parametrize("fdt", ["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize(
    "kw", [{}, {"axis": 0}, {"axis": 1}, {"group_size": 48}, {"group_size": 5, "group_axis": 0}]
)
def test_numpy_fast_path_matches_generic_path(monkeypatch, fdt, kw):
    import array_api_strict as xps

    from tests.conftest import _np_dtype

    rng = np.random.default_rng(3)
    x = (rng.standard_normal((37, 200)) * 5).astype(_np_dtype(fdt))
    for dtype, sym in [("int8", True), ("uint8", False), ("int4", False), ("int16", True)]:
        fast = aq.quantize(x, dtype, sym, **kw)
        monkeypatch.setattr(affine, "_USE_NUMPY_FAST_PATH", False)
        slow = aq.quantize(x, dtype, sym, **kw)
        monkeypatch.setattr(affine, "_USE_NUMPY_FAST_PATH", True)
        np.testing.assert_array_equal(fast.codes, slow.codes)
        np.testing.assert_array_equal(fast.scale, slow.scale)
        if not sym:
            np.testing.assert_array_equal(fast.zero_point, slow.zero_point)
        if fdt in ("float32", "float64"):  # array_api_strict runs the generic path too
            strict = aq.quantize(xps.asarray(x), dtype, sym, **kw)
            np.testing.assert_array_equal(fast.codes, np.asarray(strict.codes._array))


# ---------------------------------------------------------------- jit and vmap


CASES = [
    ("int8", False, {}),
    ("int8", True, {"axis": 0}),
    ("uint4", False, {"group_size": 3}),
    ("int4", True, {"group_size": 4, "group_axis": 0}),
]


@pytest.mark.parametrize(("dtype", "sym", "kw"), CASES)
def test_jit_equals_eager_for_every_function(dtype, sym, kw):
    jnp = pytest.importorskip("jax.numpy")
    from tests.conftest import jit_call

    x = jnp.asarray(np.random.default_rng(5).standard_normal((6, 10)), jnp.float32)
    s, z = aq.qparams(x, dtype, sym, **kw)
    s_j, z_j = jit_call(aq.qparams)(x, dtype, sym, **kw)
    np.testing.assert_array_equal(s, s_j)
    if not sym:
        np.testing.assert_array_equal(z, z_j)
    gs = {k: v for k, v in kw.items() if k != "axis"}
    q = aq.quantize_with(x, s, z, dtype, **gs)
    np.testing.assert_array_equal(q, jit_call(aq.quantize_with)(x, s, z, dtype, **gs))
    np.testing.assert_array_equal(
        aq.dequantize_with(q, s, z, **gs), jit_call(aq.dequantize_with)(q, s, z, **gs)
    )
    qa = aq.quantize(x, dtype, sym, **kw)
    qa_j = jit_call(aq.quantize)(x, dtype, sym, **kw)
    np.testing.assert_array_equal(qa.data, qa_j.data)
    np.testing.assert_array_equal(aq.dequantize(qa), jit_call(aq.dequantize)(qa))
    # Metrics: under jit XLA may sum in another order, and may fuse the
    # dequantization's multiply with the subtraction into an FMA.
    np.testing.assert_allclose(aq.mse(x, qa), jit_call(aq.mse)(x, qa), rtol=1e-5)
    np.testing.assert_allclose(aq.sqnr_db(x, qa), jit_call(aq.sqnr_db)(x, qa), rtol=1e-5)
    np.testing.assert_allclose(
        aq.max_abs_error(x, qa), jit_call(aq.max_abs_error)(x, qa), rtol=1e-5
    )


@pytest.mark.parametrize(("dtype", "sym", "kw"), CASES)
def test_vmap_equals_stack_of_calls(dtype, sym, kw):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy

    xs = jnp.asarray(np.random.default_rng(6).standard_normal((3, 6, 10)) * [[[1]], [[5]], [[0]]],
                     jnp.float32)
    sv, zv = jax.vmap(lambda x: aq.qparams(x, dtype, sym, **kw))(xs)
    singles = [aq.qparams(x, dtype, sym, **kw) for x in xs]
    np.testing.assert_array_equal(sv, jnp.stack([s for s, _ in singles]))
    if not sym:
        np.testing.assert_array_equal(zv, jnp.stack([z for _, z in singles]))
    qv = jax.vmap(lambda x: aq.quantize(x, dtype, sym, **kw))(xs)
    q1 = [aq.quantize(x, dtype, sym, **kw) for x in xs]
    np.testing.assert_array_equal(qv.data, jnp.stack([q.data for q in q1]))
    dv = jax.vmap(aq.dequantize)(qv)
    np.testing.assert_array_equal(dv, jnp.stack([aq.dequantize(q) for q in q1]))
    gs = {k: v for k, v in kw.items() if k != "axis"}
    cv = jax.vmap(lambda x, s, z: aq.quantize_with(x, s, z, dtype, **gs))(xs, sv, zv)
    np.testing.assert_array_equal(cv, jnp.stack([q.codes for q in q1]))
    dv2 = jax.vmap(lambda c, s, z: aq.dequantize_with(c, s, z, **gs))(cv, sv, zv)
    np.testing.assert_array_equal(dv2, dv)
    mv = jax.vmap(aq.mse)(xs, dv)
    np.testing.assert_allclose(mv, jnp.stack([aq.mse(x, d) for x, d in zip(xs, dv)]), rtol=1e-5)


def test_static_python_config_only():
    # Granularity is a static plan: cached, and computed without touching values.
    p1 = aq.affine.plan((4, 8), None, 4, -1)
    assert p1 is aq.affine.plan((4, 8), None, 4, -1)
    assert p1.scale_shape == (4, 2) and p1.block == (1, 4)
    assert math.prod(p1.view_shape) == 32
