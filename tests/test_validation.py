"""Finite-input checks in eager mode and under jax.jit (checkify)."""

from __future__ import annotations

import numpy as np
import pytest

import arrayquant as aq


def test_all_finite_every_backend(backend, call):
    good = backend.asarray(np.ones(4), "float32")
    bad = backend.asarray(np.array([1.0, np.inf, 0.0, 2.0]), "float32")
    assert bool(backend.to_numpy(call(aq.all_finite)(good)))
    assert not bool(backend.to_numpy(call(aq.all_finite)(bad)))


def test_check_finite_eager():
    aq.check_finite(np.ones(3, np.float32))
    with pytest.raises(ValueError, match="weights holds NaN"):
        aq.check_finite(np.array([1.0, np.nan]), "weights")


def test_check_finite_under_checkify():
    jax = pytest.importorskip("jax")
    from jax.experimental import checkify

    def f(x):
        aq.check_finite(x)
        return aq.dequantize(aq.quantize(x, "int8"))

    checked = jax.jit(checkify.checkify(f))
    err, out = checked(jax.numpy.ones(4))
    err.throw()  # no error
    err, out = checked(jax.numpy.array([1.0, jax.numpy.nan]))
    with pytest.raises(checkify.JaxRuntimeError, match="NaN or infinite"):
        err.throw()


def test_nan_under_jit_poisons_only_its_block():
    jax = pytest.importorskip("jax")
    x = np.ones((2, 4), np.float32)
    x[0, 1] = np.nan
    out = np.asarray(jax.jit(lambda v: aq.dequantize(aq.quantize(v, "int8", axis=0)))(x))
    assert np.all(np.isnan(out[0]))  # the scale of row 0 is NaN
    np.testing.assert_allclose(out[1], 1.0, rtol=1e-2)
