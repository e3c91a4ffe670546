"""Bitwise tests of the integer-only, correctly rounded float32 division for JAX.

The reference is NumPy float32 division with the documented edges applied: a subnormal
``a`` counts as zero, a subnormal result flushes to a signed zero (NumPy keeps it). For
NaN/inf/zero/subnormal ``b`` and NaN/inf ``a`` the function falls back to JAX's plain ``a / b``.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from arrayquant._backend.jax_divide import divide, reciprocal  # noqa: E402

TINY = np.float32(2.0**-126)
MAX = np.finfo(np.float32).max

_divide = jax.jit(divide)
_plain = jax.jit(lambda a, b: a / b)


def _bits(x):
    return np.asarray(x, np.float32).view(np.uint32)


def _from_parts(sign, exp, mant):
    u = (np.asarray(sign, np.uint32) << 31) | (np.asarray(exp, np.uint32) << 23)
    return (u | np.asarray(mant, np.uint32)).view(np.float32)


def _is_normal(x):
    e = (_bits(x) >> 23) & 0xFF
    return (e > 0) & (e < 255)


def _reference(a, b):
    """NumPy's a / b with the documented flush-to-zero edges; NaN where the fallback applies."""
    a, b = np.broadcast_arrays(np.asarray(a, np.float32), np.asarray(b, np.float32))
    with np.errstate(all="ignore"):
        q = a / b
    sign = np.where(np.signbit(a) ^ np.signbit(b), np.float32(-0.0), np.float32(0.0))
    q = np.where(np.abs(q) < TINY, sign, q)  # subnormal (or zero) result -> signed zero
    q = np.where(np.abs(a) < TINY, sign, q)  # zero or subnormal a -> signed zero
    return q.astype(np.float32)


def _check(a, b):
    """Compare divide(a, b) with the reference bitwise; return the number of values checked."""
    a, b = np.broadcast_arrays(np.asarray(a, np.float32), np.asarray(b, np.float32))
    got = np.asarray(_divide(a, b))
    fallback = ~_is_normal(b) | ~np.isfinite(a)
    want = np.where(fallback, np.asarray(_plain(a, b)), _reference(a, b))
    same = (_bits(got) == _bits(want)) | (np.isnan(got) & np.isnan(want))
    bad = np.flatnonzero(~same)
    assert bad.size == 0, [(a.flat[i], b.flat[i], got.flat[i], want.flat[i]) for i in bad[:5]]
    return a.size


def _random_normals(rng, n, exp):
    return _from_parts(rng.integers(0, 2, n), exp, rng.integers(0, 1 << 23, n))


def test_random_pairs_normal_results():
    """4M random pairs over the whole exponent range, exponents chosen so results are normal."""
    rng = np.random.default_rng(0)
    n = 1 << 22
    ea = rng.integers(1, 255, n)
    lo, hi = np.maximum(1, ea - 125), np.minimum(254, ea + 125)  # result exponent in [2, 253]
    eb = lo + (rng.random(n) * (hi - lo + 1)).astype(np.int64)
    a, b = _random_normals(rng, n, ea), _random_normals(rng, n, eb)
    assert _is_normal(a / b).all()
    assert _check(a, b) == n


def test_random_pairs_any_exponent():
    """Random normal pairs, any exponents: covers overflow to inf and flush to zero."""
    rng = np.random.default_rng(1)
    n = 1 << 19
    a = _random_normals(rng, n, rng.integers(1, 255, n))
    b = _random_normals(rng, n, rng.integers(1, 255, n))
    with np.errstate(all="ignore"):
        q = a / b
    assert np.isinf(q).any() and (np.abs(q) < TINY).any()
    _check(a, b)


def _near_ties(rng, n, k, d):
    """Integer significands A, B (24 bits, B odd) with A * 2**k = M * B + d, M odd 25 bits.

    A / B then lies |d| / B * 2**-k from the midpoint M * 2**-k between two floats (below it
    for d < 0). An exact midpoint is impossible: an odd 25-bit M times an odd B can never
    equal A * 2**k with A of 24 bits, so near ties are the hardest cases.
    """
    mod = np.uint64(1) << np.uint64(k)
    mask = mod - np.uint64(1)
    bi = (rng.integers(1 << 22, 1 << 23, n) * 2 + 1).astype(np.uint64)
    inv = bi.copy()  # Newton iteration for the inverse of B modulo 2**k
    for _ in range(5):
        inv = (inv * ((np.uint64(2) - bi * inv) & mask)) & mask
    m = ((mod - np.uint64(d % (1 << k))) * inv) & mask  # M = -d / B mod 2**k
    m = np.where(m < (1 << 24), m + mod, m)
    num = m * bi + np.uint64(d % (1 << 64))  # d = -1 wraps; the sum is exact modulo 2**64
    ai = num >> np.uint64(k)
    ok = (m < (1 << 25)) & (ai >= (1 << 23)) & (ai < (1 << 24)) & ((num & mask) == 0)
    ai, bi = ai[ok], bi[ok]
    exp_a = rng.integers(60, 190, ai.size)
    exp_b = exp_a + rng.integers(-50, 50, ai.size)
    return _from_parts(0, exp_a, ai & 0x7FFFFF), _from_parts(0, exp_b, bi & 0x7FFFFF)


def test_near_ties_and_neighbours():
    rng = np.random.default_rng(2)
    total = 0
    for k in (24, 25):  # quotient significand in [1, 2) and in [0.5, 1)
        for d in (-1, 1, -3, 3):
            a, b = _near_ties(rng, 20000, k, d)
            assert a.size > 1000
            q = (a / b).astype(np.float64)
            dist = np.abs(a.astype(np.float64) / b.astype(np.float64) - q) / np.spacing(a / b)
            assert np.mean(np.abs(dist - 0.5) < 1e-4) > 0.99  # within 1e-4 ulp of a midpoint
            a = np.concatenate([a, np.nextafter(a, 0), np.nextafter(a, np.inf), -a])
            b = np.concatenate([b, b, b, b])
            total += _check(a, b)
    assert total > 100000


def test_exact_quotients():
    """a = b * c exactly (12-bit significands): no remainder, guard and sticky are zero."""
    rng = np.random.default_rng(3)
    n = 50000
    bi = rng.integers(1 << 11, 1 << 12, n).astype(np.float32)
    ci = rng.integers(1 << 11, 1 << 12, n).astype(np.float32)
    scale = np.exp2(rng.integers(-40, 40, n)).astype(np.float32)
    a, b = bi * ci * scale, bi / scale
    np.testing.assert_array_equal(a / b, ci * scale * scale)
    _check(a, b)


def test_special_significands_and_signs():
    pow2 = np.exp2(np.arange(-60, 61)).astype(np.float32)
    ones = _from_parts(0, np.arange(67, 188), 0x7FFFFF)  # all-ones significands
    vals = np.concatenate([pow2, ones, np.float32([1, 3, 7, 0.1, 1 / 3])])
    vals = np.concatenate([vals, -vals])
    a, b = np.meshgrid(vals, vals)
    _check(a, b)
    _check(vals, np.float32(1))
    _check(vals, np.float32(-1))
    got = np.asarray(_divide(np.float32([0.0, -0.0, 0.0, -0.0]), np.float32([2, 2, -2, -2])))
    assert _bits(got).tolist() == _bits(np.float32([0.0, -0.0, -0.0, 0.0])).tolist()
    for x in (vals[:5], vals[-5:]):
        np.testing.assert_array_equal(_bits(jax.jit(reciprocal)(x)), _bits(np.float32(1) / x))


def test_normal_range_edges():
    nxt = np.nextafter
    cases = [
        (MAX, 1),  # largest finite
        (MAX, nxt(np.float32(1), 2)),  # just below the largest finite
        (MAX, nxt(np.float32(1), 0)),  # rounds up past the largest finite -> inf
        (MAX, 0.5),  # overflow -> inf
        (-MAX, 0.25),  # overflow -> -inf
        (nxt(MAX, 0), nxt(np.float32(1), 0)),
        (2.0**-125, 2),  # smallest normal
        (-(2.0**-125), 2),
        (TINY, 1),
        (TINY, nxt(np.float32(1), 2)),  # just below the smallest normal -> flush to zero
        (-TINY, nxt(np.float32(1), 2)),  # -> -0.0
        (nxt(np.float32(2.0**-125), 0), 2),  # NumPy rounds the subnormal tie up to 2**-126
        (nxt(np.float32(2.0**-125), 0), nxt(np.float32(2), 4)),  # subnormal -> flush
        (TINY, 2),  # subnormal -> flush
        (TINY, MAX),  # far below -> flush
        (1e-40, 1),  # subnormal a -> signed zero
        (-1e-40, 3),
    ]
    a = np.float32([c[0] for c in cases])
    b = np.float32([c[1] for c in cases])
    got = np.asarray(_divide(a, b))
    assert got[0] == MAX and got[1] < MAX
    assert got[2:5].tolist() == [np.inf, np.inf, -np.inf]
    assert got[6] == TINY and got[11] == TINY and got[9] == 0 and np.signbit(got[10])
    assert got[15] == 0 and np.signbit(got[16])
    _check(a, b)


def test_special_inputs_fall_back():
    specials = np.float32([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-40, -1e-40, 1.0, -3.5, MAX])
    a, b = np.meshgrid(specials, specials)
    _check(a, b)
    got = np.asarray(_divide(np.float32([1, -1, 0, np.inf, 2]), np.float32([0, 0, 0, 2, np.inf])))
    np.testing.assert_array_equal(got[[0, 1, 3, 4]], np.float32([np.inf, -np.inf, np.inf, 0]))
    assert np.isnan(got[2])


def test_broadcasting_and_scalars():
    x = np.float32([[1.0, 2.0, 3.0]])
    s = np.float32([[3.0], [7.0]])
    got = _divide(x, s)
    assert got.shape == (2, 3) and got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), x / s)
    np.testing.assert_array_equal(np.asarray(divide(1.0, np.float32(3))), np.float32(1) / 3)


@settings(deadline=None, max_examples=150)
@given(st.floats(width=32), st.floats(width=32))
def test_property_matches_numpy(a, b):
    _check(np.float32([a]), np.float32([b]))
