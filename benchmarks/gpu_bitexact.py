"""Compare codes and scales from JAX on its default device (a GPU) with NumPy's.

Informational: prints, per case, how many codes, scales and zero points differ
between ``aq.quantize`` on NumPy and under ``jax.jit`` on the JAX device.

    python benchmarks/gpu_bitexact.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import arrayquant as aq


def inputs(rng):
    halves = ((np.arange(-64, 64) + 0.5) * 0.25).astype(np.float32)
    return {
        "normal(4096x4096)": rng.standard_normal((4096, 4096)).astype(np.float32),
        "1e30 * normal": (rng.standard_normal((256, 512)) * 1e30).astype(np.float32),
        "1e-30 * normal": (rng.standard_normal((256, 512)) * 1e-30).astype(np.float32),
        "exact halves": np.concatenate([halves, [31.75, -31.75]])[None, :].astype(np.float32),
        "near subnormal": np.array([[3e-38, -1.5e-38, 1e-39, -5e-39, 2e-38]], np.float32),
    }


def main() -> None:
    print("JAX device:", jax.devices()[0])
    rng = np.random.default_rng(0)
    cases = [("int8", True, {"axis": 0}), ("int8", False, {}), ("int4", False, {"group_size": 128}),
             ("uint4", False, {"group_size": 32}), ("int2", True, {"axis": 0})]
    total = 0
    for name, x in inputs(rng).items():
        for dtype, sym, kw in cases:
            if "group_size" in kw and x.shape[-1] < kw["group_size"]:
                kw = {"group_size": 2}
            a = aq.quantize(x, dtype, sym, **kw)
            f = jax.jit(lambda v, dtype=dtype, sym=sym, kw=kw: aq.quantize(v, dtype, sym, **kw))
            b = f(jnp.asarray(x))
            dc = int(np.sum(np.asarray(a.codes) != np.asarray(b.codes)))
            ds = int(np.sum(np.asarray(a.scale) != np.asarray(b.scale)))
            dz = 0 if sym else int(np.sum(np.asarray(a.zero_point) != np.asarray(b.zero_point)))
            dd = int(np.sum(aq.dequantize(a) != np.asarray(jax.jit(aq.dequantize)(b))))
            total += dc + ds + dz + dd
            print(f"{name:20s} {dtype:5s} sym={sym!s:5s} {kw!s:20s} codes differ: {dc:6d}  "
                  f"scales: {ds:4d}  zero points: {dz:4d}  dequantized: {dd:6d}")
    print("total differences:", total)


if __name__ == "__main__":
    main()
