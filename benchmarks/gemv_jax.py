"""One-token products (GEMV) on JAX, interleaved: the quantized cases against float32.

    python benchmarks/gemv_jax.py               # 4096 x 4096, 9 rounds
    python benchmarks/gemv_jax.py --quick       # a smoke run (512 x 512, 2 rounds)

``benchmarks/matmul.py`` times one row at a time against the float32 baseline;
this script is for comparing versions of the GEMV code on a noisy machine: every
round calls every case (each the minimum of 5 calls), and the ratio to float32
(``w @ x`` with a 1-D x) is taken within the round, then the median over rounds
is reported. All cases use ``aq.linear(x, qw)`` (``formulation="auto"``) under
``jax.jit`` on JAX's default device.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import arrayquant as aq  # noqa: E402

CASES = [  # (name, quantize kwargs, act_dtype)
    ("W8A16 per channel", {"dtype": "int8", "symmetric": True, "axis": 0}, None),
    ("W4A16 per channel", {"dtype": "int4", "symmetric": True, "axis": 0}, None),
    ("W4A16 g128", {"dtype": "int4", "symmetric": True, "group_size": 128}, None),
    ("W4A16 g128 uint4 asym", {"dtype": "uint4", "symmetric": False, "group_size": 128}, None),
    ("W2A16 g128", {"dtype": "int2", "symmetric": True, "group_size": 128}, None),
    ("W8A8 per channel", {"dtype": "int8", "symmetric": True, "axis": 0}, "int8"),
    ("W4A8 g128", {"dtype": "int4", "symmetric": True, "group_size": 128}, "int8"),
]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="512 x 512, 2 rounds (smoke run)")
    p.add_argument("--rounds", type=int, default=9)
    args = p.parse_args(argv)
    import jax
    import jax.numpy as jnp

    n = k = 512 if args.quick else 4096
    rounds = 2 if args.quick else args.rounds
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((1, k)).astype(np.float32)
    w_np = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)
    x, w = jnp.asarray(x_np), jnp.asarray(w_np)
    calls = {"float32 w @ x[0]": (jax.jit(lambda x, w: (w @ x[0])[None]), (x, w))}
    for name, kw, act in CASES:
        qw = jax.tree_util.tree_map(jnp.asarray, aq.quantize(w_np, **kw))
        fn = jax.jit(lambda x, qw, act=act: aq.linear(x, qw, act_dtype=act))
        calls[name] = (fn, (x, qw))
    for fn, a in calls.values():
        jax.block_until_ready(fn(*a))  # compile
    best = {name: [] for name in calls}
    for _ in range(rounds):
        for name, (fn, a) in calls.items():
            ts = []
            for _ in range(5):
                t0 = time.perf_counter()
                jax.block_until_ready(fn(*a))
                ts.append(time.perf_counter() - t0)
            best[name].append(min(ts))
    print(f"# python benchmarks/gemv_jax.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"# jax {jax.__version__}, device: {jax.devices()[0]}; GEMV {n} x {k}, "
          f"{rounds} rounds, min of 5 calls per case per round")
    print()
    print("| case | median ms | vs float32 (median of per-round ratios) |")
    print("|---|---:|---:|")
    base = best["float32 w @ x[0]"]
    for name, ts in best.items():
        ratio = statistics.median(t / b for t, b in zip(ts, base))
        print(f"| {name} | {1e3 * statistics.median(ts):.3f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
