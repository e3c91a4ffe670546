"""Which float32 operation makes quantize's codes differ between NumPy and a GPU?

A diagnostic for ``benchmarks/gpu_bitexact.py``, which found codes (never
scales) that differ between NumPy and ``jax.jit`` on an H200 (3 of 16.7M for
int8 per channel; 128 of 130 for one per-tensor asymmetric case). This script
compares, bit for bit against NumPy, under ``jax.jit`` on the default device:

1. single operations on 4M random float32 values of every magnitude used by
   scales: ``1 / a``, ``a / b``, ``a * b``, ``round(a * b)``, ``c - a / b``;
2. the stages of the failing cases: the reciprocal of the scales, the codes
   from NumPy's reciprocal passed in as an argument (isolates the product and
   the rounding), the codes from ``x / s`` written as a division.

    python benchmarks/gpu_arith_check.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import arrayquant as aq


def _diff(a, b) -> int:
    a, b = np.asarray(a), np.asarray(b)
    return int(np.sum(a.view(np.uint32) != b.view(np.uint32))) if a.dtype == np.float32 else int(
        np.sum(a != b))


def ops(rng) -> None:
    n = 1 << 22
    a = (rng.uniform(1, 2, n) * 2.0 ** rng.integers(-40, 40, n)).astype(np.float32)
    b = (rng.uniform(1, 2, n) * 2.0 ** rng.integers(-20, 20, n)).astype(np.float32)
    x = rng.standard_normal(n).astype(np.float32) * 64
    ja, jb, jx = jnp.asarray(a), jnp.asarray(b), jnp.asarray(x)
    one = np.float32(1)
    with np.errstate(all="ignore"):
        cases = {
            "1 / a": (jax.jit(lambda a: 1.0 / a)(ja), one / a),
            "x / b": (jax.jit(lambda x, b: x / b)(jx, jb), x / b),
            "x * b": (jax.jit(lambda x, b: x * b)(jx, jb), x * b),
            "round(x * (1 / b))": (jax.jit(lambda x, b: jnp.round(x * (1.0 / b)))(jx, jb),
                                   np.round(x * (one / b))),
            "-128 - x / b": (jax.jit(lambda x, b: -128.0 - x / b)(jx, jb),
                             np.float32(-128) - x / b),
        }
    for name, (got, ref) in cases.items():
        print(f"{name:22s} differs at {_diff(got, ref):8d} of {n}")


def stages(rng) -> None:
    x = rng.standard_normal((4096, 4096)).astype(np.float32)  # gpu_bitexact's first input
    halves = ((np.arange(-64, 64) + 0.5) * 0.25).astype(np.float32)
    h = np.concatenate([halves, [31.75, -31.75]])[None, :].astype(np.float32)
    for name, v, sym, kw in [("normal int8 sym axis=0", x, True, {"axis": 0}),
                             ("halves int8 asym tensor", h, False, {})]:
        s, z = aq.qparams(v, "int8", sym, **kw)
        inv = np.float32(1) / s
        js = jnp.asarray(s)
        jinv = jax.jit(lambda s: 1.0 / s)(js)
        print(f"{name}: reciprocal of {s.size} scales differs at {_diff(jinv, inv)}")
        zf = 0.0 if z is None else z.astype(np.float32)
        ref = np.clip(np.round(v * inv) + zf, -128, 127)
        f_inv = jax.jit(lambda v, i, zf: jnp.clip(jnp.round(v * i) + zf, -128, 127))
        f_div = jax.jit(lambda v, s, zf: jnp.clip(jnp.round(v / s) + zf, -128, 127))
        f_own = jax.jit(lambda v, s, zf: jnp.clip(jnp.round(v * (1.0 / s)) + zf, -128, 127))
        print(f"  codes with NumPy's 1/s passed in: {_diff(f_inv(v, inv, zf), ref)} differ")
        print(f"  codes with 1/s on the device:     {_diff(f_own(v, js, zf), ref)} differ")
        print(f"  codes of x / s on the device:     {_diff(f_div(v, js, zf), ref)} differ")
        print(f"  NumPy x / s vs x * (1/s):         "
              f"{_diff(np.clip(np.round(v / s) + zf, -128, 127), ref)} differ")
        if z is not None:
            rmin = np.minimum(v.min(), 0).astype(np.float32)
            zref = np.round(np.float32(-128) - rmin / s)
            zgot = jax.jit(lambda r, s: jnp.round(-128.0 - r / s))(jnp.asarray(rmin), js)
            print(f"  zero point round(-128 - rmin / s): {_diff(zgot, zref)} differ "
                  f"(NumPy {zref.ravel()[:1]}, device {np.asarray(zgot).ravel()[:1]})")
        got = jax.jit(lambda v, sym=sym, kw=kw: aq.quantize(v, "int8", sym, **kw))(jnp.asarray(v))
        print(f"  aq.quantize codes: {_diff(got.codes, aq.quantize(v, 'int8', sym, **kw).codes)}"
              " differ")


def main() -> None:
    print("# jax", jax.__version__, "device:", jax.devices()[0])
    ops(np.random.default_rng(5))
    stages(np.random.default_rng(0))


if __name__ == "__main__":
    main()
