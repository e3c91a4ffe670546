"""Hypothesis property tests of the quantization invariants, on every backend."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import arrayquant as aq
from arrayquant._backend import finfo_limits, scale_limits
from tests.conftest import _np_dtype, skip_eager_jax

QTYPES = ["int2", "uint2", "int4", "uint4", "int8", "uint8", "int16", "uint16"]
FLOATS = ("float16", "bfloat16", "float32", "float64")
EPS = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 2.0**-23, "float64": 2.0**-52}


@st.composite
def cases(draw, floats=FLOATS, extremes=False):
    """``(x, qtype, symmetric, granularity kwargs, x's dtype, scale dtype)``.

    Values are drawn in [-1000, 1000] and multiplied by a scale. With
    ``extremes``, some examples reach the dtype's largest finite value (scale
    max / 1000, and exactly +-max planted) or its smallest normal (subnormals
    included), with any scale dtype of the backend.
    """
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=9))
    ndim = len(shape)
    gran = draw(st.sampled_from(["tensor", "axis", "group"]))
    kw = {}
    if gran == "axis":
        kw["axis"] = draw(st.integers(-ndim, ndim - 1))
    elif gran == "group":
        kw["group_size"] = draw(st.integers(1, 10))
        kw["group_axis"] = draw(st.integers(-ndim, ndim - 1))
    qtype = draw(st.sampled_from(QTYPES))
    symmetric = qtype.startswith("i") and draw(st.booleans())
    fdt = draw(st.sampled_from(floats))
    tiny, big = finfo_limits(fdt)
    magnitude = draw(st.sampled_from(["normal", "max", "min"] if extremes else ["normal"]))
    if magnitude == "max":
        scale = big / 1000
    elif magnitude == "min":
        scale = draw(st.sampled_from([tiny * 1e-3, tiny, tiny * 1e3]))
    else:
        scales = [1.0, 1e-3, 30.0] if fdt == "float16" else [1.0, 1e-3, 1e4, 1e-20, 1e30]
        scale = draw(st.sampled_from(scales))
    values = draw(
        hnp.arrays(
            np.float64, shape,
            elements=st.floats(-1000, 1000, allow_nan=False, allow_subnormal=False),
        )
    )
    if draw(st.booleans()):  # plant exact zeros
        values = np.where(np.abs(values) < 300, 0.0, values)
    x = np.clip(values * scale, -big, big)
    if magnitude == "max" and draw(st.booleans()):  # plant +-max, the hardest case
        x = x.reshape(-1)
        x[0], x[-1] = big, -big
        x = x.reshape(shape)
    sdt = draw(st.sampled_from(floats)) if extremes else "float32"
    return x.astype(_np_dtype(fdt)), qtype, symmetric, kw, fdt, sdt


def _full_scale(qa, backend):
    s = backend.to_numpy(qa.scale).astype(np.float64)
    for d, b in enumerate(qa.block_shape):
        s = np.repeat(s, b, axis=d)
    return s[tuple(slice(0, n) for n in qa.shape)]


def _largest_scale_needed(x, qt, symmetric, kw):
    """float64 reference: the largest block scale, before any clipping."""
    b = aq.affine.plan(x.shape, kw.get("axis"), kw.get("group_size"), kw.get("group_axis", -1))
    v = np.pad(x.astype(np.float64), [(0, p) for p in b.padding]).reshape(b.view_shape)
    rmin = np.minimum(np.min(v, axis=b.reduce_axes), 0.0)
    rmax = np.maximum(np.max(v, axis=b.reduce_axes), 0.0)
    if symmetric:
        return float(np.max(np.maximum(rmax, -rmin))) / qt.qmax
    return float(np.max(rmax * 0.5 - rmin * 0.5)) * (2.0 / (qt.qmax - qt.qmin))


def assert_error_bound(x, x_hat, s, qt, fdt):
    """docs/semantics.md: ``|x - x_hat| <= s / 2 + slack`` for every element.

    Checked divided by ``s`` (in codes), so that nothing overflows near float64's max.
    """
    eps_c = EPS["float64" if fdt == "float64" else "float32"]
    tiny, _ = finfo_limits(fdt)
    t = np.abs(x / s)
    slack = (4 * eps_c * (t + (qt.qmax - qt.qmin)) + EPS[fdt] * (t + 1) / 2
             + tiny * EPS[fdt] / (2 * s))
    err = np.abs(x / s - x_hat / s)
    bad = err > 0.5 + slack
    assert not np.any(bad), (x[bad], x_hat[bad], s[bad], err[bad])


@given(data=st.data())
def test_invariants(backend, call, data):
    x_np, qtype, symmetric, kw, fdt, sdt = data.draw(cases(backend.float_dtypes(), True))
    x = backend.asarray(x_np)
    qt = aq.as_qtype(qtype)
    xf = x_np.astype(np.float64)
    # Item of docs/semantics.md: a block whose scale would pass the cap raises eagerly.
    need = _largest_scale_needed(x_np, qt, symmetric, kw)
    hi = scale_limits(sdt, fdt)[1]
    capped = need > hi * (1 - 1e-6)
    if need > hi * (1 + 1e-6) and not backend.jit:
        with pytest.raises(ValueError, match="needs a scale of up to"):
            aq.quantize(x, qtype, symmetric, scale_dtype=sdt, **kw)
        return
    try:
        qa = call(aq.quantize)(x, qtype, symmetric, scale_dtype=sdt, **kw)
    except ValueError:
        assert capped and not backend.jit  # only within rounding of the cap
        return
    codes = backend.to_numpy(qa.codes).astype(np.int64)
    lo = -qt.qmax if symmetric else qt.qmin
    # codes and zero points stay in range
    assert codes.min() >= lo and codes.max() <= qt.qmax
    if not symmetric:
        z = backend.to_numpy(qa.zero_point).astype(np.int64)
        assert z.min() >= qt.qmin and z.max() <= qt.qmax
    s = backend.to_numpy(qa.scale)
    assert aq._backend.dtype_name(s.dtype) == sdt
    assert np.all(np.isfinite(s)) and np.all(s > 0)
    x_hat = backend.to_numpy(call(aq.dequantize)(qa))
    assert aq._backend.dtype_name(x_hat.dtype) == fdt
    x_hat = x_hat.astype(np.float64)
    # dequantization saturates: never inf, even near the dtype's largest value
    assert np.all(np.isfinite(x_hat))
    # zero dequantizes exactly to zero
    assert np.all(x_hat[xf == 0] == 0)
    if capped:  # under jit: the block saturates, as documented
        return
    # every element's error is at most scale / 2, plus float rounding slack
    assert_error_bound(xf, x_hat, _full_scale(qa, backend), qt, fdt)


@given(data=st.data())
def test_requantizing_dequantized_values_gives_same_codes(backend, call, data):
    skip_eager_jax(backend, "test_invariants runs eager JAX")
    x_np, qtype, symmetric, kw, fdt, _ = data.draw(cases(backend.float_dtypes()))
    x = backend.asarray(x_np)
    qa = call(aq.quantize)(x, qtype, symmetric, **kw)
    # Dequantize in float32: narrower outputs may round a value by more than half a code.
    out = "float64" if fdt == "float64" else "float32"
    x_hat = call(aq.dequantize)(qa, dtype=out)
    gs = {k: v for k, v in kw.items() if k != "axis"}
    again = call(aq.quantize_with)(x_hat, qa.scale, qa.zero_point, qtype, **gs)
    np.testing.assert_array_equal(backend.to_numpy(again), backend.to_numpy(qa.codes))


@given(data=st.data())
def test_symmetric_codes_are_odd_symmetric(backend, call, data):
    skip_eager_jax(backend, "test_invariants runs eager JAX")
    x_np, qtype, _, kw, fdt, _ = data.draw(cases(backend.float_dtypes()))
    assume(qtype.startswith("i"))
    x = backend.asarray(x_np)
    pos = backend.to_numpy(call(aq.quantize)(x, qtype, True, **kw).codes).astype(np.int64)
    neg = backend.to_numpy(call(aq.quantize)(-x, qtype, True, **kw).codes).astype(np.int64)
    np.testing.assert_array_equal(neg, -pos)


@given(data=st.data())
def test_per_tensor_quantization_is_monotone(backend, call, data):
    skip_eager_jax(backend, "test_invariants runs eager JAX")
    x_np, qtype, symmetric, _, fdt, _ = data.draw(cases(backend.float_dtypes()))
    x = backend.asarray(np.sort(x_np.reshape(-1)))
    codes = backend.to_numpy(call(aq.quantize)(x, qtype, symmetric).codes).astype(np.int64)
    assert np.all(np.diff(codes) >= 0)
