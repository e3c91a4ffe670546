"""Cost of the integer-only, correctly rounded float32 division against XLA's ``a / b`` (CPU).

    python benchmarks/jax_divide.py            # 30 repeats
    python benchmarks/jax_divide.py --quick    # a smoke run

Sizes are the scale arrays of a 4096 x 4096 weight: per-channel (4096), int4 g128 (131072)
and g32 (524288). Each case times ``jax.jit(divide)(x, s)`` and ``jax.jit(lambda x, s: x / s)``
(medians of alternating runs, after a warm-up), and the compile time of a jitted quantizer
``round(x * reciprocal(s))`` for a (4096, 4096) weight and g128 scales, against the same
quantizer with ``1 / s`` (``lower(...).compile()``, each in a fresh ``jit``).
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from _timing import block, parse_repeat  # noqa: E402

from arrayquant._backend.jax_divide import divide, reciprocal  # noqa: E402


def _alternating(fns, repeat):
    for fn in fns:
        block(fn())
    times = [[] for _ in fns]
    for _ in range(repeat):
        for t, fn in zip(times, fns):
            t0 = time.perf_counter()
            block(fn())
            t.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def _compile_s(fn, *args):
    t0 = time.perf_counter()
    jax.jit(fn).lower(*args).compile()
    return time.perf_counter() - t0


def main() -> None:
    repeat = parse_repeat(__doc__, default=30)
    rng = np.random.default_rng(0)
    ours, plain = jax.jit(divide), jax.jit(lambda x, s: x / s)
    print(f"JAX {jax.__version__}, {jax.devices()[0].platform}, medians of {repeat} runs\n")
    print("| elements | scales of | `a / b` (us) | `divide` (us) | ratio |")
    print("|---:|---|---:|---:|---:|")
    for n, what in ((4096, "per-channel"), (131072, "g128"), (524288, "g32")):
        x = jnp.asarray(rng.standard_normal(n).astype(np.float32))
        s = jnp.asarray((rng.random(n) * 0.1 + 1e-3).astype(np.float32))
        fns = [lambda x=x, s=s: plain(x, s), lambda x=x, s=s: ours(x, s)]
        t_plain, t_ours = _alternating(fns, repeat)
        print(
            f"| {n} | {what} | {t_plain * 1e6:.0f} | {t_ours * 1e6:.0f} | {t_ours / t_plain:.1f}x |"
        )

    w = jnp.zeros((4096, 4096), jnp.float32)
    s = jnp.ones((4096, 32, 1), jnp.float32)

    def quantizer(inv):
        def q(w, s):
            codes = jnp.round(w.reshape(4096, 32, 128) * inv(s))
            return jnp.clip(codes, -8, 7).astype(jnp.int8)

        return q

    c_plain = min(_compile_s(quantizer(lambda s: 1 / s), w, s) for _ in range(3))
    c_ours = min(_compile_s(quantizer(reciprocal), w, s) for _ in range(3))
    print(
        f"\nCompile time, jitted int4 g128 quantizer of a 4096x4096 weight (best of 3): "
        f"`1 / s` {c_plain * 1e3:.0f} ms, `reciprocal(s)` {c_ours * 1e3:.0f} ms"
    )


if __name__ == "__main__":
    main()
