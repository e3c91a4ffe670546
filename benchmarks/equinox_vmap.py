"""Equinox's idiom, ``jax.vmap(model)(xs)``, on quantized layers: batched or per vector.

    python benchmarks/equinox_vmap.py            # MLP 1024 -> 4096 -> 1024, 1 and 64 vectors
    python benchmarks/equinox_vmap.py --quick    # a smoke run (256 -> 512 -> 256)

An Equinox layer acts on one vector and users vmap it over a batch. ``aq.linear``
picks its formulation from the static number of rows, which vmap hides (it sees
one row). ``arrayquant.integrations.equinox.QuantizedLinear`` runs its product
through a ``custom_vmap`` that calls ``aq.linear`` once on the whole batch.
This compares, in one ``jax.jit`` each: the float MLP vmapped; the quantized MLP
vmapped (the integration); and a "naive" quantized MLP that vmaps
``aq.linear`` on single vectors. Columns: milliseconds (median) and the ratio to
the float MLP (median of paired ratios, so load that comes and goes cancels).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from _timing import paired_ratio, parse_repeat, print_table  # noqa: E402

import arrayquant as aq  # noqa: E402

CASES = [  # (name, rule kwargs for (out, in) weights, act_dtype)
    ("W8A16 per channel", {"dtype": "int8", "symmetric": True, "axis": 0}, None),
    ("W4A16 g128", {"dtype": "int4", "symmetric": True, "group_size": 128}, None),
    ("W8A8 per channel", {"dtype": "int8", "symmetric": True, "axis": 0}, "int8"),
]


def main(argv=None) -> None:
    repeat = parse_repeat(__doc__, 15, argv)
    quick = repeat == 3
    import equinox as eqx
    import jax

    from arrayquant.integrations.equinox import quantize_model

    d_in, hidden, d_out = (256, 512, 256) if quick else (1024, 4096, 1024)
    mlp = eqx.nn.MLP(d_in, d_out, hidden, 1, key=jax.random.key(0))

    def compiled(model, naive=False):
        params, static = eqx.partition(model, eqx.is_array)

        def run(p, xs):
            m = eqx.combine(p, static)
            if not naive:
                return jax.vmap(m)(xs)
            lin = [lambda v, la=la: aq.linear(v, la.weight, la.bias, act_dtype=la.act_dtype)
                   for la in m.layers]
            return jax.vmap(lambda v: lin[1](jax.nn.relu(lin[0](v))))(xs)

        f = jax.jit(run)
        return lambda xs: f(params, xs)

    def ratio(f, base, xs):
        return paired_ratio(lambda: f(xs), lambda: base(xs), repeat)

    rows = []
    base = compiled(mlp)
    for n in (1, 64):
        xs = jax.random.normal(jax.random.key(1), (n, d_in))
        t, _ = ratio(base, base, xs)
        rows.append((n, "float32", f"{1e3 * t:.2f}", "1.00", "", ""))
        for name, kw, act in CASES:
            q = quantize_model(mlp, aq.Rule(**kw), act_dtype=act)
            t1, r1 = ratio(compiled(q), base, xs)
            t2, r2 = ratio(compiled(q, naive=True), base, xs)
            rows.append((n, name, f"{1e3 * t1:.2f}", f"{r1:.2f}", f"{1e3 * t2:.2f}",
                         f"{r2:.2f}"))
    print(f"MLP {d_in} -> {hidden} -> {d_out}, jax.vmap over n vectors, {repeat} repeats")
    print_table(rows, ("n", "weights", "vmap(model) ms", "x float", "naive vmap ms",
                       "x float"))


if __name__ == "__main__":
    main()
