"""The NumPy fast path of MSESearch and HQQ (arrayquant.affine._search_numpy) against the
generic path, bit for bit; and the jit loop of the generic path on its edge cases."""

from __future__ import annotations

import array_api_compat.numpy as npx
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import arrayquant as aq
from arrayquant.affine import search
from arrayquant.affine._search_numpy import tree_sum
from arrayquant.affine.calibrate import block_sum

METHODS = [
    aq.MSESearch(grid=4, zero_point_radius=2),
    aq.MSESearch(grid=3, search_zero_point=False),
    aq.HQQ(iters=3),
    aq.HQQ(iters=2, lp_norm=1.0),
    aq.HQQ(iters=2, beta=1e4),  # a strong shrinkage: pow runs on most elements
    aq.HQQ(iters=2, beta=0.01, lp_norm=0.3),
]
GRANULARITIES = [{"group_size": 16}, {"group_size": 12}, {"axis": 0}, {"axis": 1}, {},
                 {"group_size": 5, "group_axis": 0}]


def _data(kind: str, shape, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "normal":
        x = rng.standard_normal(shape) * 0.05
        x.flat[rng.integers(x.size)] = 1.0  # an outlier
    elif kind == "halfway":
        # Integers and half-integers with a min/max scale of exactly 1 (int4): x / s
        # lands exactly half-way between codes, and shrunk scales near it.
        x = rng.integers(-8, 8, shape) + 0.5 * rng.integers(0, 2, shape)
        x[..., 0], x[..., -1] = -8.0, 7.0
    elif kind == "huge":  # squared errors and dequantized values overflow
        x = rng.standard_normal(shape) * 1e37
    elif kind == "mixed":  # magnitudes from subnormal to 1e36
        x = rng.standard_normal(shape) * 10.0 ** rng.integers(-42, 37, shape)
    elif kind == "sparse":
        x = rng.standard_normal(shape) * (rng.random(shape) < 0.1)
    else:  # constant blocks and zeros
        x = np.full(shape, 3.0)
        x[0] = 0.0
    return x


def _both(x, method, **kw):
    """``aq.qparams`` through the fast path and through the generic path."""
    out = []
    for fast in (True, False):
        search.USE_NUMPY_FAST_PATH = fast
        try:
            with np.errstate(over="ignore", invalid="ignore"):  # the generic path warns
                out.append(aq.qparams(x, **kw, method=method))
        except ValueError as e:  # a scale above the cap: the same error either way
            assert "needs a scale of up to" in str(e)
            out.append((str(e),))
        finally:
            search.USE_NUMPY_FAST_PATH = True
    return out


def _assert_same_bits(a, b):
    assert len(a) == len(b)
    if len(a) == 1:
        assert a == b
        return
    for u, v in zip(a, b):
        assert (u is None) == (v is None)
        if u is not None:
            assert u.dtype == v.dtype and u.shape == v.shape
            np.testing.assert_array_equal(u.view(np.uint8), v.view(np.uint8))


CASES = [  # (data, method index, granularity index, dtype, symmetric, scale dtype, x dtype)
    (kind, m, g, dtype, sym, sdt, xdt)
    for i, kind in enumerate(["normal", "halfway", "huge", "mixed", "sparse", "const"])
    for m in range(len(METHODS))
    for g, dtype, sym, sdt, xdt in [
        (i % 6, "int4", False, "float32", "float32"),
        ((i + m) % 6, "uint2", False, "bfloat16", "float32"),
        ((i + 2 * m) % 6, "int8", True, "float16", "float64"),
        ((i + 3 * m) % 6, "int2", False, "float32", "float64"),
    ]
    if not (sym and isinstance(METHODS[m], aq.HQQ))
]


@pytest.mark.parametrize(("kind", "m", "g", "dtype", "sym", "sdt", "xdt"), CASES)
def test_fast_path_is_the_generic_path(kind, m, g, dtype, sym, sdt, xdt):
    x = _data(kind, (7, 48), seed=m + 7 * g).astype(xdt)
    _assert_same_bits(*_both(x, METHODS[m], dtype=dtype, symmetric=sym, scale_dtype=sdt,
                             **GRANULARITIES[g]))


def test_fast_path_on_a_weight_with_several_slabs(monkeypatch):
    from arrayquant.affine import _search_numpy

    monkeypatch.setattr(_search_numpy, "_SLAB", 256)  # many slabs, a partial last one
    x = _data("normal", (40, 100), seed=3).astype(np.float32)
    for m in (aq.MSESearch(grid=3), aq.HQQ(iters=2)):
        _assert_same_bits(*_both(x, m, dtype="uint2", group_size=32))


@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(1, 40)),
                  elements=st.floats(-1e4, 1e4, width=32)),
       st.sampled_from(METHODS), st.sampled_from(["int4", "uint4", "int2", "int8"]),
       st.sampled_from([8, 7, 32]))
def test_fast_path_is_the_generic_path_hypothesis(x, method, dtype, g):
    _assert_same_bits(*_both(x, method, dtype=dtype, group_size=g))


def test_tree_sum_is_block_sum():
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 8, 13, 37):
        v = rng.standard_normal((n, 6)).astype(np.float32)
        v[0, 0], v[-1, 1] = -0.0, -0.0  # a signed zero meets the padding's zero
        ref = block_sum(np.ascontiguousarray(v.T), npx)
        got = tree_sum(v.copy())
        np.testing.assert_array_equal(got.view(np.uint32), ref.T.view(np.uint32))


@pytest.mark.parametrize("method", [aq.MSESearch(grid=1), aq.MSESearch(grid=2),
                                    aq.HQQ(iters=1)], ids=repr)
def test_loop_edge_cases_match_numpy(backend, call, method):
    # Under jax.jit the candidates run in one lax.fori_loop (empty for grid=1); eager
    # backends run the Python loop, as array_api_strict does here.
    if backend.name == "jax":
        pytest.skip("eager JAX runs the Python loop (array_api_strict covers it); saves CI time")
    x = _data("normal", (6, 40), seed=1).astype(np.float32)
    ref = aq.qparams(x, "int4", group_size=16, method=method)
    got = call(aq.qparams)(backend.asarray(x), "int4", group_size=16, method=method)
    for u, v in zip(got, ref):
        np.testing.assert_array_equal(backend.to_numpy(u), v)
