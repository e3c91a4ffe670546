"""Packing speed: pack and unpack 16M 4-bit and 2-bit codes against a memory copy.

The baseline is a copy of the unpacked codes (16 MiB of int8), measured in the
same run: NumPy ``codes.copy()``, and for JAX a jitted elementwise pass over
the same int8 array (``codes ^ 1``: one read, one write), since XLA may elide
a plain copy. Every figure is the median of several runs.

    python benchmarks/packing.py [--repeat 15] [--quick]
"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _timing import block, median_time, parse_repeat, print_table  # noqa: E402

import arrayquant as aq  # noqa: E402

N = 1 << 24  # 16M codes
SHAPE = (4096, N // 4096)


def main(argv=None) -> None:
    repeat = parse_repeat(__doc__, 15, argv)
    rng = np.random.default_rng(0)
    rows = []
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        jax = None
    for bits in (4, 2):
        codes = rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), SHAPE).astype(np.int8)
        packed = aq.pack(codes, bits)
        copy_t = median_time(lambda codes=codes: codes.copy(), repeat)
        pack_t = median_time(lambda codes=codes, bits=bits: aq.pack(codes, bits), repeat)
        unpack_t = median_time(
            lambda p=packed, bits=bits: aq.unpack(p, bits, SHAPE[1], signed=True), repeat
        )
        rows.append(("numpy", f"int{bits}", f"{copy_t * 1e3:.2f}", f"{pack_t * 1e3:.2f}",
                     f"{pack_t / copy_t:.2f}x", f"{unpack_t * 1e3:.2f}",
                     f"{unpack_t / copy_t:.2f}x"))
        if jax is not None:
            dev = jax.devices()[0].platform
            cj, pj = jnp.asarray(codes), jnp.asarray(packed)
            jcopy = jax.jit(lambda a: a ^ 1)
            jpack = jax.jit(lambda a, bits=bits: aq.pack(a, bits))
            junpack = jax.jit(lambda p, bits=bits: aq.unpack(p, bits, SHAPE[1], signed=True))
            np.testing.assert_array_equal(np.asarray(jpack(cj)), packed)
            c_t = median_time(lambda f=jcopy, a=cj: block(f(a)), repeat, warmup=2)
            p_t = median_time(lambda f=jpack, a=cj: block(f(a)), repeat, warmup=2)
            u_t = median_time(lambda f=junpack, a=pj: block(f(a)), repeat, warmup=2)
            rows.append((f"jax[{dev}]", f"int{bits}", f"{c_t * 1e3:.2f}", f"{p_t * 1e3:.2f}",
                         f"{p_t / c_t:.2f}x", f"{u_t * 1e3:.2f}", f"{u_t / c_t:.2f}x"))
    print(f"pack / unpack {N} codes (shape {SHAPE}, last axis), median of {repeat} runs")
    print_table(rows, ("backend", "bits", "copy ms", "pack ms", "pack/copy", "unpack ms",
                       "unpack/copy"))


if __name__ == "__main__":
    main()
