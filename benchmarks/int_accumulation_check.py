"""Sweep the exact integer sums of W8A8 / W4A8 on JAX's default device (a GPU).

A diagnostic, not a benchmark: one H100 run of the test suite once gave a wrong
integer sum (-117 instead of -83, x (3, 5) uint8 asymmetric, a uint2 asymmetric
per-tensor weight) that no CPU backend reproduces. This script checks, case by
case, under ``jax.jit`` on the default device:

1. the XLA primitive alone: ``lax.dot_general`` of int8 operands with
   ``preferred_element_type=int32``, for contraction lengths 1 to 40 and a few
   longer ones, and the same through ``int8_dot`` (zero-padded to a multiple
   of 4, the workaround for XLA:GPU's wrong sums; see docs/inference.md);
2. every integer formulation that applies on JAX (``int32``, ``jax-dot``, and
   ``int-gemv`` for one row) on the failing case, then on ``--cases`` cases drawn
   from: every weight type (int8 ... uint2), symmetric and asymmetric weights and
   activations, per tensor / channel / group, both layouts, and short contraction
   lengths (1 to 9, 16, 37). Each case is one compiled program.

Each result is compared with an int64 NumPy reference. Every mismatch is
printed with its case; with ``--dump DIR`` the optimized HLO of the first
mismatching program of each kind is written there. Exit status 1 if any
mismatch of arrayquant's own products was seen.

    python benchmarks/int_accumulation_check.py              # 120 cases
    python benchmarks/int_accumulation_check.py --dump hlo/  # and the HLO of failures
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import arrayquant as aq  # noqa: E402
from arrayquant.products import activations, integer, plan  # noqa: E402

WEIGHTS = ["int8", "uint8", "int4", "uint4", "int2", "uint2"]
ACTS = [("int8", True), ("int8", False), ("uint8", False), ("int4", True), ("int2", False)]
KS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 37]


def _reference(qx, qw, kn):
    """(G, m, n) int64 sums of (qx - zx)(qw - zw) per weight group along the in axis."""
    cx = np.asarray(qx.codes, np.int64)
    if qx.zero_point is not None:
        cx = cx - np.asarray(qx.zero_point, np.int64).reshape(-1, 1)
    cw, block = np.asarray(qw.codes, np.int64), qw.block_shape
    zw = None if qw.zero_point is None else np.asarray(qw.zero_point, np.int64)
    if kn:
        cw, block = cw.T, block[::-1]
        zw = None if zw is None else zw.T
    n, k = cw.shape
    if zw is not None:
        cw = cw - np.repeat(np.repeat(zw, block[0], axis=0), block[1], axis=1)[:n, :k]
    g = block[1]
    return np.stack([cx[:, j:j + g] @ cw[:, j:j + g].T for j in range(0, k, g)])


def _dump(dump_dir, name, fn, *args):
    if dump_dir is None:
        return
    os.makedirs(dump_dir, exist_ok=True)
    path = os.path.join(dump_dir, re.sub(r"[^A-Za-z0-9_.-]+", "_", name) + ".hlo.txt")
    if not os.path.exists(path):
        with open(path, "w") as f:
            f.write(fn.lower(*args).compile().as_text())


def check_primitive(jax, jnp, lax, dump_dir) -> tuple[int, int]:
    """lax.dot_general(int8, int8) -> int32 against int64, short contractions: alone
    (XLA's own result) and through arrayquant's ``int8_dot``, which pads the
    contraction to a multiple of 4. Returns (raw mismatches, padded mismatches)."""
    from arrayquant.products.jax_dot import int8_dot

    raw = padded = 0
    rng = np.random.default_rng(1)
    dims = (((1,), (1,)), ((), ()))
    dot = jax.jit(lambda a, b: lax.dot_general(a, b, dims, preferred_element_type=jnp.int32))
    ours = jax.jit(lambda a, b: int8_dot(a, b, dims))
    ks = list(range(1, 18)) + [33, 63, 65]
    for k, m, n in itertools.product(ks, [1, 3, 64], [1, 8]):
        a = rng.integers(-128, 128, (m, k)).astype(np.int8)
        b = rng.integers(-128, 128, (n, k)).astype(np.int8)
        ref = a.astype(np.int64) @ b.astype(np.int64).T
        for label, fn in (("primitive", dot), ("padded", ours)):
            got = np.asarray(fn(jnp.asarray(a), jnp.asarray(b)))
            if got.dtype != np.int32 or not np.array_equal(got, ref):
                diff = np.abs(got.astype(np.int64) - ref).max()
                print(f"MISMATCH {label} int8 dot m={m} k={k} n={n}: dtype {got.dtype}, "
                      f"max |diff| {diff}")
                if label == "primitive":
                    raw += 1
                else:
                    padded += 1
                    _dump(dump_dir, f"padded_m{m}_k{k}_n{n}", fn, jnp.asarray(a), jnp.asarray(b))
    return raw, padded


def _weight(rng, n, k, qtype, sym, gran, kn):
    w = rng.standard_normal((n, k)) + (0.0 if sym else 0.5)
    w = (w.T if kn else w).astype(np.float32)
    if gran == "tensor":
        kw = {}
    elif gran == "channel":
        kw = {"axis": 1 if kn else 0}
    else:
        kw = {"group_size": 4, "group_axis": 0 if kn else -1}
    return aq.quantize(w, qtype, sym, **kw)


def _cases(count: int, seed: int):
    """The case of the H100 failure (both layouts), then ``count`` drawn at random
    from the product of the options (one compilation each)."""
    known = [("uint2", False, "tensor", kn, ("uint8", False), 5, 3) for kn in (False, True)]
    every = [c for c in itertools.product(WEIGHTS, [True, False], ["tensor", "channel", "group"],
                                          [False, True], ACTS, KS, [1, 3])
             if not (c[1] and c[0].startswith("u")) and not (c[2] == "group" and c[5] < 8)]
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(every), size=min(count, len(every)), replace=False)
    return known + [every[i] for i in sorted(picks)]


def check_formulations(jax, jnp, dump_dir, count: int) -> tuple[int, int]:
    """Each case is one jitted program computing every formulation that applies."""
    bad = total = 0
    rng = np.random.default_rng(2)
    xp = jnp
    for qtype, sym, gran, kn, (act, act_sym), k, m in _cases(count, 3):
        n = 5
        qw_np = _weight(rng, n, k, qtype, sym, gran, kn)
        x = (rng.standard_normal((m, k)) * 3 + 1).astype(np.float32)
        qx_np = aq.quantize_activations(x, act, act_sym)
        wp = plan.weight_plan(qw_np, kn)
        forms = ["int32", "jax-dot"] + (["int-gemv"] if m == 1 else [])
        qw = jax.tree_util.tree_map(jnp.asarray, qw_np)
        qx = jax.tree_util.tree_map(jnp.asarray, qx_np)
        ref = _reference(qx_np, qw_np, kn)
        fn = jax.jit(lambda qx, qw, forms=forms, wp=wp, k=k: [integer.integer_accumulate(
            activations.act_rows(qx, k, xp), qw, wp, xp, f)[0] for f in forms])
        for form, got in zip(forms, fn(qx, qw)):
            got = np.asarray(got)
            total += 1
            if got.dtype != np.int32 or not np.array_equal(got, ref):
                bad += 1
                diff = np.abs(got.astype(np.int64) - ref).max()
                name = (f"{form} w={qtype} {'sym' if sym else 'asym'} {gran} "
                        f"{'(in,out)' if kn else '(out,in)'} act={act} "
                        f"{'sym' if act_sym else 'asym'} m={m} k={k} n={n}")
                print(f"MISMATCH {name}: dtype {got.dtype}, max |diff| {diff}")
                _dump(dump_dir, name, fn, qx, qw)
    return bad, total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dump", default=None, help="write the optimized HLO of failures here")
    p.add_argument("--cases", type=int, default=120,
                   help="weight/activation cases drawn at random (default 120)")
    args = p.parse_args(argv)
    import jax
    import jax.numpy as jnp
    from jax import lax

    print(f"# jax {jax.__version__}, device: {jax.devices()[0]} ({jax.devices()[0].platform})")
    raw, padded = check_primitive(jax, jnp, lax, args.dump)
    print(f"# int8 dot_general alone: {raw} mismatching shapes; padded to a multiple of 4 "
          f"(arrayquant's int8_dot): {padded}")
    bad, total = check_formulations(jax, jnp, args.dump, args.cases)
    print(f"# integer formulations: {bad} of {total} programs mismatch")
    return 1 if padded or bad else 0


if __name__ == "__main__":
    sys.exit(main())
