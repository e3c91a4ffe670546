"""First-call compile time of jitted quantized products, against the float32 product.

    python benchmarks/compile.py              # 4096 x 4096 at 1 and 64 tokens, decoder block
    python benchmarks/compile.py --quick      # a smoke run (512 x 512, no decoder block)

Every new shape compiles on an accelerator, so compile time is part of a product's
cost. For each weight format this lowers and compiles ``jax.jit(aq.linear)`` for a
(tokens, k) activation and a (n, k) weight (``formulation="auto"``), timing
``lower(...).compile()`` alone (no execution), each case once in a fresh ``jit``
(XLA's in-memory cache does not carry over between differently shaped programs;
the persistent cache is off). The float32 product ``x @ w.T`` is the baseline.
The decoder block is seven linears of a Llama-7B layer (q, k, v, o: 4096 x 4096;
gate, up: 11008 x 4096; down: 4096 x 11008) at one token, int4 g128, in one jit.
Also counted: the HLO instructions of each compiled module (a loop unrolled over
groups shows up there first).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import arrayquant as aq  # noqa: E402

FORMATS = [  # (name, quantize kwargs, act_dtype)
    ("float32", None, None),
    ("int8 per channel", {"dtype": "int8", "symmetric": True, "axis": 0}, None),
    ("int4 g128", {"dtype": "int4", "symmetric": True, "group_size": 128}, None),
    ("int4 g32", {"dtype": "int4", "symmetric": True, "group_size": 32}, None),
    ("uint4 g128 asym", {"dtype": "uint4", "group_size": 128}, None),
    ("uint4 g32 asym", {"dtype": "uint4", "group_size": 32}, None),
    ("W8A8 per channel", {"dtype": "int8", "symmetric": True, "axis": 0}, "int8"),
    ("W4A8 g128", {"dtype": "int4", "symmetric": True, "group_size": 128}, "int8"),
]


def _hlo_size(compiled) -> int:
    text = compiled.as_text() or ""
    return sum(1 for line in text.splitlines() if " = " in line)


def compile_seconds(fn, *args) -> tuple[float, int]:
    import jax

    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return time.perf_counter() - t0, _hlo_size(compiled)


def _weight(rng, n, k, kw):
    import jax
    import jax.numpy as jnp

    w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)
    if kw is None:
        return jnp.asarray(w)
    return jax.tree_util.tree_map(jnp.asarray, aq.quantize(w, **kw))


def _linear(act):
    def f(x, w):
        if not isinstance(w, aq.QArray):
            return x @ w.T
        return aq.linear(x, w, act_dtype=act)
    return f


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="512 x 512, no decoder block")
    args = ap.parse_args(argv)
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_compilation_cache", False)
    n = k = 512 if args.quick else 4096
    rng = np.random.default_rng(0)
    print(f"# python benchmarks/compile.py {' '.join(sys.argv[1:] if argv is None else argv)}"
          .rstrip())
    print(f"# jax {jax.__version__}, device {jax.devices()[0]}, {n} x {k} weights; "
          "seconds of lower+compile, HLO instructions")
    print()
    print("| weight | tokens | compile s | HLO ops | vs float32 |")
    print("|---|---:|---:|---:|---:|")
    for tokens in (1, 64):
        x = jnp.asarray(rng.standard_normal((tokens, k)).astype(np.float32))
        base = None
        for name, kw, act in FORMATS:
            w = _weight(rng, n, k, kw)
            t, ops = compile_seconds(_linear(act), x, w)
            base = t if base is None else base
            print(f"| {name} | {tokens} | {t:.2f} | {ops} | {t / base:.1f}x |", flush=True)
    if not args.quick:
        dims = {"q": (4096, 4096), "k": (4096, 4096), "v": (4096, 4096), "o": (4096, 4096),
                "gate": (11008, 4096), "up": (11008, 4096), "down": (4096, 11008)}
        x = jnp.asarray(rng.standard_normal((1, 4096)).astype(np.float32))

        def block(x, ws):
            h = aq.linear(x, ws["q"]) + aq.linear(x, ws["k"]) + aq.linear(x, ws["v"])
            h = aq.linear(h, ws["o"])
            g = aq.linear(h, ws["gate"]) * aq.linear(h, ws["up"])
            return aq.linear(g, ws["down"])

        for name, kw in [("float32", None),
                         ("int4 g128", {"dtype": "int4", "symmetric": True, "group_size": 128})]:
            ws = {key: _weight(rng, *shape, kw) for key, shape in dims.items()}
            t, ops = compile_seconds(block, x, ws)
            print(f"| decoder block (7 linears) {name} | 1 | {t:.2f} | {ops} | |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
