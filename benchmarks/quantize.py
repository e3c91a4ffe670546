"""Quantization speed: arrayquant against a naive NumPy version and a memory copy.

Cases (4096 x 4096 float32):
- per-channel int8, symmetric (one scale per row);
- group-128 int4 and uint4, asymmetric (packed two codes per byte).

NumPy: ``aq.quantize`` against a straightforward NumPy implementation of the
same result (codes, packed for int4, plus scales and zero points) and against
``x.copy()``. JAX: ``jax.jit(aq.quantize)`` against a hand-written jitted
version of the same math. Every figure is the median of several runs in this
process; ratios are what to compare across machines.

    python benchmarks/quantize.py [--repeat 10] [--quick]
"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _timing import block, median_time, parse_repeat, print_table  # noqa: E402

import arrayquant as aq  # noqa: E402

N = 4096


def naive_numpy(x, case):
    if case == "int8-per-channel-sym":
        s = np.abs(x).max(axis=1, keepdims=True) / 127
        return np.clip(np.round(x / s), -127, 127).astype(np.int8), s
    lo, hi, dt = (0, 15, np.uint8) if case.startswith("uint4") else (-8, 7, np.int8)
    v = x.reshape(N, N // 128, 128)
    rmin = np.minimum(v.min(axis=-1, keepdims=True), 0)
    rmax = np.maximum(v.max(axis=-1, keepdims=True), 0)
    s = (rmax - rmin) / 15
    z = np.clip(np.round(lo - rmin / s), lo, hi)
    q = np.clip(np.round(v / s) + z, lo, hi).astype(dt).reshape(N, N)
    packed = ((q[:, 0::2] & 15) | (q[:, 1::2] << 4)).astype(np.uint8)
    return packed, s, z.astype(dt)


def handwritten_jax(case):
    import jax
    import jax.numpy as jnp

    if case == "int8-per-channel-sym":

        def f(x):
            s = jnp.max(jnp.abs(x), axis=1, keepdims=True) * (1 / 127)
            return jnp.clip(jnp.round(x * (1 / s)), -127, 127).astype(jnp.int8), s

    else:

        lo, hi, dt = (0, 15, jnp.uint8) if case.startswith("uint4") else (-8, 7, jnp.int8)

        def f(x):
            v = x.reshape(N, N // 128, 128)
            rmin = jnp.minimum(v.min(axis=-1, keepdims=True), 0)
            rmax = jnp.maximum(v.max(axis=-1, keepdims=True), 0)
            s = (rmax - rmin) * (1 / 15)
            z = jnp.clip(jnp.round(lo - rmin / s), lo, hi)
            q = jnp.clip(jnp.round(v * (1 / s)) + z, lo, hi).astype(dt).reshape(N, N)
            packed = ((q[:, 0::2] & 15) | (q[:, 1::2] << 4)).astype(jnp.uint8)
            return packed, s, z.astype(dt)

    return jax.jit(f)


CASES = {
    "int8-per-channel-sym": {"dtype": "int8", "symmetric": True, "axis": 0},
    "int4-group128-asym": {"dtype": "int4", "group_size": 128},
    "uint4-group128-asym": {"dtype": "uint4", "group_size": 128},
}


def main(argv=None) -> None:
    repeat = parse_repeat(__doc__, 10, argv)
    x = np.random.default_rng(0).standard_normal((N, N)).astype(np.float32)

    rows = []
    copy_t = median_time(lambda: x.copy(), repeat)
    rows.append(("numpy", "memory copy (x.copy())", f"{copy_t * 1e3:.1f}", "1.00x", ""))
    for case, kw in CASES.items():
        naive_t = median_time(lambda case=case: naive_numpy(x, case), repeat)
        aq_t = median_time(lambda kw=kw: aq.quantize(x, **kw), repeat)
        rows.append(("numpy", f"{case}: naive", f"{naive_t * 1e3:.1f}",
                     f"{naive_t / copy_t:.2f}x", ""))
        rows.append(("numpy", f"{case}: aq.quantize", f"{aq_t * 1e3:.1f}",
                     f"{aq_t / copy_t:.2f}x", f"{naive_t / aq_t:.2f}x faster than naive"))
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        jax = None
    if jax is not None:
        dev = jax.devices()[0]
        xj = jnp.asarray(x)
        jcopy = jax.jit(lambda a: a + 1.0)
        jc_t = median_time(lambda: block(jcopy(xj)), repeat, warmup=2)
        rows.append((f"jax[{dev.platform}]", "elementwise pass (x + 1)", f"{jc_t * 1e3:.2f}",
                     "1.00x", ""))
        for case, kw in CASES.items():
            hand = handwritten_jax(case)
            ours = jax.jit(lambda a, kw=kw: aq.quantize(a, **kw))
            h_t = median_time(lambda hand=hand: block(hand(xj)), repeat, warmup=2)
            o_t = median_time(lambda ours=ours: block(jax.tree_util.tree_leaves(ours(xj))),
                              repeat, warmup=2)
            rows.append((f"jax[{dev.platform}]", f"{case}: hand-written jit",
                         f"{h_t * 1e3:.2f}", f"{h_t / jc_t:.2f}x", ""))
            rows.append((f"jax[{dev.platform}]", f"{case}: jit(aq.quantize)", f"{o_t * 1e3:.2f}",
                         f"{o_t / jc_t:.2f}x", f"{o_t / h_t:.2f}x of hand-written"))
    print(f"quantize {N}x{N} float32, median of {repeat} runs")
    print_table(rows, ("backend", "what", "ms", "vs baseline", "ratio"))


if __name__ == "__main__":
    main()
