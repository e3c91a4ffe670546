"""Hypothesis property tests of the quantization invariants, on every backend."""

from __future__ import annotations

import numpy as np
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import arrayquant as aq
from tests.conftest import _np_dtype

QTYPES = ["int2", "uint2", "int4", "uint4", "int8", "uint8", "int16", "uint16"]
EPS = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 2.0**-23, "float64": 2.0**-52}


@st.composite
def cases(draw, allow_symmetric=True):
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
    symmetric = allow_symmetric and qtype.startswith("i") and draw(st.booleans())
    fdt = draw(st.sampled_from(["float16", "bfloat16", "float32", "float64"]))
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
    x = (values * scale).astype(_np_dtype(fdt))
    return x, qtype, symmetric, kw, fdt


def _prep(backend, x, fdt):
    if fdt not in backend.float_dtypes():
        x = x.astype(np.float32)
        fdt = "float32"
    return backend.asarray(x), x, fdt


def _full_scale(qa, backend):
    s = backend.to_numpy(qa.scale).astype(np.float64)
    for d, b in enumerate(qa.block_shape):
        s = np.repeat(s, b, axis=d)
    return s[tuple(slice(0, n) for n in qa.shape)]


@given(case=cases())
def test_invariants(backend, call, case):
    x_np, qtype, symmetric, kw, fdt = case
    x, x_np, fdt = _prep(backend, x_np, fdt)
    qt = aq.as_qtype(qtype)
    qa = call(aq.quantize)(x, qtype, symmetric, **kw)
    codes = backend.to_numpy(qa.codes).astype(np.int64)
    lo = -qt.qmax if symmetric else qt.qmin
    # codes and zero points stay in range
    assert codes.min() >= lo and codes.max() <= qt.qmax
    if not symmetric:
        z = backend.to_numpy(qa.zero_point).astype(np.int64)
        assert z.min() >= qt.qmin and z.max() <= qt.qmax
    s = backend.to_numpy(qa.scale)
    assert np.all(np.isfinite(s)) and np.all(s > 0)
    x_hat = backend.to_numpy(call(aq.dequantize)(qa)).astype(np.float64)
    xf = x_np.astype(np.float64)
    # zero dequantizes exactly to zero
    assert np.all(x_hat[xf == 0] == 0)
    # every element's error is at most scale / 2, plus float rounding slack
    s_full = _full_scale(qa, backend)
    slack = 8 * EPS["float32"] * (np.abs(xf) + s_full * (qt.qmax - qt.qmin)) + EPS[fdt] * np.abs(
        xf
    )
    assert np.all(np.abs(x_hat - xf) <= s_full / 2 + slack)


@given(case=cases())
def test_requantizing_dequantized_values_gives_same_codes(backend, call, case):
    x_np, qtype, symmetric, kw, fdt = case
    x, x_np, fdt = _prep(backend, x_np, fdt)
    qa = call(aq.quantize)(x, qtype, symmetric, **kw)
    # Dequantize in float32: narrower outputs may round a value by more than half a code.
    out = "float64" if fdt == "float64" else "float32"
    x_hat = call(aq.dequantize)(qa, dtype=out)
    gs = {k: v for k, v in kw.items() if k != "axis"}
    again = call(aq.quantize_with)(x_hat, qa.scale, qa.zero_point, qtype, **gs)
    np.testing.assert_array_equal(backend.to_numpy(again), backend.to_numpy(qa.codes))


@given(case=cases())
def test_symmetric_codes_are_odd_symmetric(backend, call, case):
    x_np, qtype, _, kw, fdt = case
    assume(qtype.startswith("i"))
    x, x_np, fdt = _prep(backend, x_np, fdt)
    pos = backend.to_numpy(call(aq.quantize)(x, qtype, True, **kw).codes).astype(np.int64)
    neg = backend.to_numpy(call(aq.quantize)(-x, qtype, True, **kw).codes).astype(np.int64)
    np.testing.assert_array_equal(neg, -pos)


@given(case=cases())
def test_per_tensor_quantization_is_monotone(backend, call, case):
    x_np, qtype, symmetric, _, fdt = case
    x_np = np.sort(x_np.reshape(-1))
    x, x_np, fdt = _prep(backend, x_np, fdt)
    codes = backend.to_numpy(call(aq.quantize)(x, qtype, symmetric).codes).astype(np.int64)
    assert np.all(np.diff(codes) >= 0)
