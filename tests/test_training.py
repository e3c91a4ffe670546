"""Training with quantization: fake_quantize (clipped STE), LSQ / LSQ+ gradients, exact export.

The LSQ gradients are checked two ways: against the paper's own formulation written with
``stop_gradient`` tricks (round(v) = v + stop(round(v) - v), the gradient-scale trick on s),
and against central finite differences of the function the estimator differentiates (the
rounding offsets frozen; points away from rounding and clipping boundaries).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import arrayquant as aq

GRANULARITIES = [{}, {"axis": 0}, {"group_size": 4}]


def _x(shape=(6, 16), seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("kw", [dict(dtype="int4", group_size=4),
                                dict(dtype="int8", symmetric=True, axis=0),
                                dict(dtype="uint4", method=aq.Percentile(99))])
def test_fake_quantize_is_dequantize_of_quantize_on_every_backend(backend, call, kw):
    if backend.name == "jax" and kw["dtype"] != "int8":
        pytest.skip("eager JAX compiles every operation per shape: one case eagerly, all "
                    "under jax-jit")
    x = _x()
    ref = aq.dequantize(aq.quantize(x, **kw))
    got = call(aq.fake_quantize)(backend.asarray(x), **kw)
    assert got.dtype == backend.asarray(x).dtype
    np.testing.assert_array_equal(backend.to_numpy(got), ref)


@given(st.integers(0, 2**31 - 1), st.sampled_from(["int2", "int4", "uint4", "int8"]),
       st.sampled_from(GRANULARITIES), st.sampled_from(["float32", "bfloat16"]))
def test_fake_quantize_bit_exact_property(seed, dtype, gran, fdt):
    import ml_dtypes

    x = (_x((4, 12), seed) * 3).astype(np.float32 if fdt == "float32" else ml_dtypes.bfloat16)
    got = aq.fake_quantize(x, dtype, **gran)
    assert got.dtype == x.dtype
    np.testing.assert_array_equal(got, aq.dequantize(aq.quantize(x, dtype, **gran)))


def test_fake_quantize_rejects_data_aware_methods():
    with pytest.raises(ValueError, match="GPTQ"):
        aq.fake_quantize(_x(), "int4", method=aq.GPTQ())


# --------------------------------------------------------------------------- JAX gradients

jax = pytest.importorskip("jax")
jnp = jax.numpy


def _unclipped_codes(x, kw):
    """round(x / s) + z before clipping, in NumPy float64 from the stored parameters."""
    qa = aq.quantize(x, **kw)
    rep = [n // m for n, m in zip(x.shape, qa.scale.shape)]
    s = np.asarray(qa.scale, np.float64)
    z = 0.0 if qa.zero_point is None else np.asarray(qa.zero_point, np.float64)
    s_full = np.kron(s, np.ones(rep))
    z_full = np.kron(z, np.ones(rep)) if qa.zero_point is not None else 0.0
    return np.round(x.astype(np.float64) / s_full) + z_full


@pytest.mark.parametrize("kw", [dict(dtype="int4", axis=0, method=aq.Percentile(80)),
                                dict(dtype="int8", symmetric=True, axis=0,
                                     method=aq.Percentile(70))])
def test_ste_gradient_passes_inside_the_range_and_is_zero_where_clipped(kw):
    x = _x()
    c = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    f = jax.jit(jax.grad(lambda v: jnp.sum(aq.fake_quantize(v, **kw) * c)))
    g = np.asarray(f(jnp.asarray(x)))
    qt = aq.as_qtype(kw["dtype"])
    lo = -qt.qmax if kw.get("symmetric") else qt.qmin
    q = _unclipped_codes(x, kw)
    inside = (q >= lo) & (q <= qt.qmax)
    assert 0 < np.count_nonzero(~inside) < x.size // 2  # the percentile clips a few values
    np.testing.assert_array_equal(g, np.where(inside, c, 0.0))


def test_ste_gradient_is_the_identity_under_minmax_and_vmap():
    xs = jnp.asarray(_x((3, 4, 8)))
    g = jax.grad(lambda v: jnp.sum(jax.vmap(lambda w: aq.fake_quantize(w, "int4", axis=0))(v)
                                   ** 2))(xs)
    y = jax.vmap(lambda w: aq.fake_quantize(w, "int4", axis=0))(xs)
    np.testing.assert_array_equal(np.asarray(g), 2 * np.asarray(y))
    ref = aq.dequantize(aq.quantize(np.asarray(xs), "int4", axis=0, batch_axes=1))
    np.testing.assert_array_equal(np.asarray(y), ref)


# --------------------------------------------------------------------------- LSQ / LSQ+


def _lsq_reference(x, s, zp, qt, block, gscale, symmetric):
    """The LSQ / LSQ+ forward of the papers, written with stop_gradient so that autodiff
    gives the published estimators (independent of arrayquant's custom_vjp)."""
    sg = jax.lax.stop_gradient
    s_g = s * gscale + sg(s - s * gscale)  # value s, gradient scaled by gscale
    s_full = jnp.repeat(jnp.repeat(s_g, block[0], 0), block[1], 1)
    lo, hi = (-qt.qmax, qt.qmax) if symmetric else (qt.qmin, qt.qmax)
    if symmetric:
        z_full = 0.0
    else:
        z_g = zp * gscale + sg(zp - zp * gscale)
        z_r = z_g + sg(jnp.round(z_g) - z_g)
        z_full = jnp.repeat(jnp.repeat(z_r, block[0], 0), block[1], 1)
    v = x / s_full
    v = v + sg(jnp.round(v) - v)  # round with a straight-through gradient
    q = v + z_full
    q = jnp.where(q < lo, lo, jnp.where(q > hi, hi, q))  # not jnp.clip: it halves ties
    return (q - z_full) * s_full


@pytest.mark.parametrize("symmetric,dtype", [(True, "int4"), (False, "uint4"), (False, "int8")])
def test_lsq_gradients_match_the_papers_formulation(symmetric, dtype):
    x = jnp.asarray(_x((4, 16)) * 2)
    s, zp = aq.lsq_init(np.asarray(x), dtype, symmetric, group_size=8)
    s = jnp.asarray(s) * 0.7  # a smaller scale than min/max: some values clip
    zp = None if zp is None else jnp.asarray(zp) + 0.3
    c = jnp.asarray(np.random.default_rng(2).standard_normal(x.shape).astype(np.float32))
    qt = aq.as_qtype(dtype)
    gscale = 1 / np.sqrt(8 * qt.qmax)

    def ours(x, s, zp):
        return jnp.sum(aq.fake_quantize_with(x, s, zp, dtype, group_size=8) * c)

    def ref(x, s, zp):
        return jnp.sum(_lsq_reference(x, s, zp, qt, (1, 8), gscale, symmetric) * c)

    argnums = (0, 1) if symmetric else (0, 1, 2)
    got = jax.jit(jax.grad(ours, argnums))(x, s, zp)
    want = jax.grad(ref, argnums)(x, s, zp)
    np.testing.assert_allclose(ours(x, s, zp), ref(x, s, zp), rtol=1e-6)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert np.count_nonzero(np.asarray(got[1])) == s.size


def test_lsq_scale_gradient_matches_finite_differences():
    """d/ds of sum(c * y) equals the central difference of the function LSQ differentiates:
    y = s * (clip(x / s + z, lo, hi) - z) + s * r with the rounding offset r frozen inside
    the range; points are kept away from rounding and clipping boundaries."""
    rng = np.random.default_rng(3)
    qt = aq.as_qtype("int4")
    s0, z0 = 0.25, 2.0
    # codes k + 0.2 (inside, away from .5) and a few far outside the range
    k = rng.integers(-6, 5, size=(2, 16)).astype(np.float64)
    u = k + rng.uniform(-0.3, 0.3, size=k.shape)
    u[0, :3] = [9.0, -12.0, 11.5]
    x = (u * s0).astype(np.float32)
    c = rng.standard_normal(x.shape)
    scale = jnp.full((2, 1), s0, jnp.float32)
    zp = jnp.full((2, 1), z0, jnp.float32)
    gs, gz = jax.grad(lambda s, z: jnp.sum(aq.fake_quantize_with(
        jnp.asarray(x), s, z, "int4", grad_scale=1.0) * c), (0, 1))(scale, zp)
    r = np.round(x / s0) - x / s0  # frozen rounding offset

    def surrogate(s, z):
        q = x.astype(np.float64) / s + z
        inside = (np.round(q) >= qt.qmin) & (np.round(q) <= qt.qmax)
        y = np.where(inside, s * (q - z + r), s * (np.clip(q, qt.qmin, qt.qmax) - z))
        return (y * c).sum(axis=1)

    h = 1e-5
    fd_s = (surrogate(s0 + h, z0) - surrogate(s0 - h, z0)) / (2 * h)
    fd_z = (surrogate(s0, z0 + h) - surrogate(s0, z0 - h)) / (2 * h)
    np.testing.assert_allclose(np.asarray(gs)[:, 0], fd_s, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(gz)[:, 0], fd_z, rtol=1e-4, atol=1e-4)
    assert np.asarray(gz)[0, 0] != 0 and abs(np.asarray(gz)[1, 0]) < 1e-6  # only clips move z


def test_lsq_gradient_scale_and_positive_scale():
    x = jnp.asarray(_x((2, 8)))
    s = jnp.full((2, 1), 0.1, jnp.float32)

    def grad(s, **kw):
        return np.asarray(jax.grad(lambda s: jnp.sum(
            aq.fake_quantize_with(x, s, None, "int4", **kw) ** 2))(s))

    g1, gd = grad(s, grad_scale=1.0), grad(s)
    np.testing.assert_allclose(gd, g1 / np.sqrt(8 * 7), rtol=1e-6)
    # A negative scale is used by its magnitude, and its gradient flips sign with it.
    np.testing.assert_array_equal(aq.fake_quantize_with(x, -s, None, "int4"),
                                  aq.fake_quantize_with(x, s, None, "int4"))
    np.testing.assert_allclose(grad(-s, grad_scale=1.0), -g1, rtol=1e-6)


@pytest.mark.parametrize("kw", [dict(dtype="int4", symmetric=True, group_size=4),
                                dict(dtype="uint4", axis=0), dict(dtype="int8")])
def test_quantize_learned_exports_the_fake_quantized_values_bit_for_bit(backend, call, kw):
    if backend.name == "jax" and kw["dtype"] != "int8":
        pytest.skip("eager JAX compiles every operation per shape: one case eagerly, all "
                    "under jax-jit")
    x = _x()
    kw = dict(kw)
    dtype, symmetric = kw.pop("dtype"), kw.pop("symmetric", False)
    s, zp = aq.lsq_init(x, dtype, symmetric, init="lsq", **kw)
    s = s * np.float32(1.3)
    gkw = {"group_size": kw["group_size"]} if "group_size" in kw else {}
    xb, sb = backend.asarray(x), backend.asarray(s)
    zb = None if zp is None else backend.asarray(zp)
    y = call(aq.fake_quantize_with)(xb, sb, zb, dtype, **gkw)
    qa = call(aq.quantize_learned)(xb, sb, zb, dtype, **gkw)
    np.testing.assert_array_equal(backend.to_numpy(call(aq.dequantize)(qa)), backend.to_numpy(y))
    np.testing.assert_array_equal(backend.to_numpy(y), aq.fake_quantize_with(x, s, zp, dtype,
                                                                              **gkw))


def test_lsq_init_minmax_starts_at_fake_quantize_and_errors_are_clear():
    x = _x()
    s, zp = aq.lsq_init(x, "int4", group_size=4)
    assert zp.dtype == np.float32
    np.testing.assert_array_equal(aq.fake_quantize_with(x, s, zp, "int4", group_size=4),
                                  aq.fake_quantize(x, "int4", group_size=4))
    with pytest.raises(TypeError, match="floating array"):
        aq.fake_quantize_with(x, s, zp.astype(np.int8), "int4", group_size=4)
    with pytest.raises(ValueError, match="signed"):
        aq.fake_quantize_with(x, s, None, "uint4", group_size=4)
    with pytest.raises(ValueError, match="init"):
        aq.lsq_init(x, init="lss")
    for bad_s, bad_z, what in [(s * np.float32(np.nan), zp, "scale"),
                               (s, zp + np.float32(np.inf), "zero_point")]:
        with pytest.raises(ValueError, match=f"{what} holds NaN"):
            aq.fake_quantize_with(x, bad_s, bad_z, "int4", group_size=4)
        with pytest.raises(ValueError, match=f"{what} holds NaN"):
            aq.quantize_learned(x, bad_s, bad_z, "int4", group_size=4)
    for bad in ("a", 0.0, -1.0, float("inf"), True):
        with pytest.raises(ValueError, match="grad_scale"):
            aq.fake_quantize_with(x, s, zp, "int4", group_size=4, grad_scale=bad)


def test_lsq_per_tensor_activation_scale_is_a_0d_array():
    """A static activation scale learned as one number (W8A8 QAT): 0-d scale and offset."""
    x = jnp.asarray(_x((5, 8)) * 3)
    s, zp = jnp.asarray(0.02, jnp.float32), jnp.asarray(-3.0, jnp.float32)
    y = aq.fake_quantize_with(x, s, zp, "int8")
    gs, gz = jax.grad(lambda s, z: jnp.sum(aq.fake_quantize_with(x, s, z, "int8") ** 2),
                      (0, 1))(s, zp)
    assert gs.shape == () and gz.shape == () and float(gs) != 0 and float(gz) != 0
    ref = aq.dequantize_with(aq.quantize_with(np.asarray(x), np.asarray(s), np.asarray(zp,
                                              np.int8)), np.asarray(s), np.asarray(zp, np.int8))
    np.testing.assert_array_equal(np.asarray(y), ref)
