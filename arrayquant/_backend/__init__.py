"""Namespace and dtype helpers shared by the core.

The core finds the array namespace from its inputs (array-api-compat) and only
calls array API functions on it. The helpers here answer static questions
about dtypes with Python values, never by looking at array contents.
"""

from __future__ import annotations

import sys

import array_api_compat
import numpy as np

__all__ = [
    "namespace",
    "is_numpy",
    "is_jax",
    "float_dtype",
    "dtype_name",
    "is_float_dtype",
    "compute_dtype",
    "int_dtype",
    "finfo_limits",
    "scale_limits",
    "is_concrete",
]

_FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")


def namespace(*arrays):
    """The array API namespace of the given arrays (``None`` entries are ignored)."""
    return array_api_compat.array_namespace(*(a for a in arrays if a is not None))


def is_numpy(xp) -> bool:
    return array_api_compat.is_numpy_namespace(xp)


def is_jax(xp) -> bool:
    return array_api_compat.is_jax_namespace(xp)


def _uses_numpy_dtypes(xp) -> bool:
    """NumPy, Dask and CuPy arrays carry NumPy dtypes (and so ml_dtypes' bfloat16)."""
    return (
        is_numpy(xp)
        or array_api_compat.is_dask_namespace(xp)
        or array_api_compat.is_cupy_namespace(xp)
    )


def dtype_name(dtype) -> str:
    """A dtype's plain name ("float32", "bfloat16", "int8") for any namespace."""
    try:
        return np.dtype(dtype).name
    except TypeError:
        return str(dtype).rsplit(".", 1)[-1]


def is_float_dtype(dtype) -> bool:
    return dtype_name(dtype) in _FLOAT_NAMES


def float_dtype(xp, name):
    """The floating dtype called ``name`` (or given as a dtype) in namespace ``xp``.

    bfloat16 comes from ml_dtypes for NumPy and from ``xp.bfloat16`` elsewhere.

    Raises:
        ValueError: ``name`` is not a floating dtype, or ``xp`` lacks it.
    """
    key = name if isinstance(name, str) else dtype_name(name)
    if key not in _FLOAT_NAMES:
        raise ValueError(
            f"expected a floating dtype, one of {', '.join(_FLOAT_NAMES)}; got {name!r}"
        )
    if _uses_numpy_dtypes(xp):
        if key == "bfloat16":
            import ml_dtypes

            return np.dtype(ml_dtypes.bfloat16)
        return np.dtype(key)
    dtype = getattr(xp, key, None)
    if dtype is None:
        raise ValueError(f"the array namespace {xp.__name__} has no {key} dtype")
    return dtype


def int_dtype(xp, name: str):
    return getattr(xp, name)


def compute_dtype(xp, dtype):
    """The dtype scales and quantization are computed in: float64 stays, the rest float32."""
    return xp.float64 if dtype_name(dtype) == "float64" else xp.float32


def finfo_limits(dtype) -> tuple[float, float]:
    """(smallest normal, largest finite) of a floating dtype, as Python floats."""
    name = dtype_name(dtype)
    if name == "bfloat16":
        import ml_dtypes

        info = ml_dtypes.finfo(ml_dtypes.bfloat16)
    else:
        info = np.finfo(np.dtype(name))
    return float(info.smallest_normal), float(info.max)


def scale_limits(scale_dtype, value_dtype) -> tuple[float, float]:
    """``(lo, hi)``: the scales arrayquant computes, stores, accepts and loads.

    ``lo = max(smallest normal of the scale dtype, 4 * smallest normal of the
    compute dtype)`` and ``hi = min(largest finite of the scale dtype, 1 /
    smallest normal of the compute dtype)``, where the compute dtype is float64
    for float64 values and float32 otherwise. Both ends are exactly
    representable in the scale dtype. Inside ``[lo, hi]`` a scale is a normal
    number whose reciprocal is normal too, so no backend flushes either to
    zero and NumPy and XLA compute the same codes.
    """
    tiny_c, _ = finfo_limits("float64" if dtype_name(value_dtype) == "float64" else "float32")
    tiny_s, big_s = finfo_limits(scale_dtype)
    return max(tiny_s, 4.0 * tiny_c), min(big_s, 1.0 / tiny_c)


def is_concrete(x) -> bool:
    """True when ``x`` holds values that can be inspected now (not a JAX tracer)."""
    if "jax" in sys.modules:
        from arrayquant._backend.jaxtools import is_tracer

        return not is_tracer(x)
    return True


def as_int8_bits(a, xp):
    """The bytes of a uint8 array read as int8 (two's complement), same shape.

    JAX gets a bitcast (XLA:CPU fuses it into the consumer; a ``convert`` ends
    the fusion), NumPy a zero-copy view; other namespaces ``astype``, which wraps
    modulo 256 on every supported library.
    """
    if is_jax(xp):
        from jax import lax  # lazy: the core never imports JAX at import time

        return lax.bitcast_convert_type(a, xp.int8)
    if is_numpy(xp):
        return a.view(np.int8)
    return xp.astype(a, xp.int8)


def exact_divide(a, b, xp):
    """``a / b`` rounded correctly (to nearest even) on every backend and device.

    XLA:GPU's float32 division is not correctly rounded (on an H200 ``x / b``
    differed from NumPy at 30% of random values, ``1 / b`` at 13%), which made
    codes at near-ties differ from NumPy's. For float32 JAX arrays the quotient
    is built from integer operations (:mod:`arrayquant._backend.jax_divide`),
    exact on every device; elsewhere it is ``a / b``. ``b`` must be normal, as
    every stored scale is; quotients below the normal range flush to zero, as
    XLA flushes subnormals.
    """
    if is_jax(xp) and dtype_name(a.dtype) == dtype_name(b.dtype) == "float32":
        from arrayquant._backend.jax_divide import divide

        return divide(a, b)
    return a / b


def exact_reciprocal(b, xp):
    """``1 / b`` rounded correctly on every backend and device (see :func:`exact_divide`)."""
    if is_jax(xp) and dtype_name(b.dtype) == "float32":
        from arrayquant._backend.jax_divide import reciprocal

        return reciprocal(b)
    return 1.0 / b
