"""Benchmark of arrayquant.linear: float32 vs weight-only and W8A8 formulations.

    python benchmarks/matmul.py            # the table in docs/benchmarks.md
    python benchmarks/matmul.py --quick    # a smoke run (tiny shapes, 2 repeats)
    python benchmarks/matmul.py --large    # also a 4096 x 4096 x 4096 GEMM (JAX only)

Every row is ``y = x @ W.T`` for x (m, k) and W (n, k) float32, computed by one
formulation (``aq.linear(..., formulation=...)``); times are medians of
``--repeats`` calls after a warm-up (JAX: one compiled ``jax.jit`` function per
row, timed to ``block_until_ready``). ``vs f32`` is the median, over those calls,
of the row's time divided by the time of a call of the fastest float32
formulation (same shape and backend) made just before it: the two alternate, so
load on a shared machine mostly cancels out of the ratio. On JAX, rows ``int8
primitive alone`` time the XLA operation the quantized rows rest on (the fused
int8 -> float32 multiply-reduce for one token, the int8 GEMM otherwise) on
ready codes without scales: a reference for the rows that add unpacking, scales and
activation quantization to it (noise can put a row below it). ``rel.err``
is ``|y - x @ W.T| / |x @ W.T|`` (Frobenius), against the float64 product of the inputs.
JAX runs on its default device (a GPU when there is one); NumPy runs on the CPU.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _timing import median_time, paired_ratio  # noqa: E402

import arrayquant as aq  # noqa: E402

SHAPES = [  # (label, m, k, n): m tokens, k in-features, n out-features
    ("GEMV", 1, 4096, 4096),
    ("GEMM 64 tokens", 64, 4096, 4096),
    ("MiniLM FFN in", 512, 384, 1536),
]
LARGE = [("GEMM large", 4096, 4096, 4096)]
QUICK = [("GEMV", 1, 256, 512), ("small", 64, 256, 512)]

# (name, weight quantization kwargs, act_dtype, formulations)
CASES = [
    ("W8A16 per-channel", {"dtype": "int8", "symmetric": True, "axis": 0}, None,
     ("dequantize", "epilogue", "slabs", "gemv", "auto")),
    ("W4A16 per-channel packed", {"dtype": "int4", "symmetric": True, "axis": 0}, None,
     ("dequantize", "fields", "slabs", "gemv", "auto")),
    ("W4A16 g128 packed", {"dtype": "int4", "symmetric": True, "group_size": 128}, None,
     ("dequantize", "grouped", "fields", "slabs", "gemv", "auto")),
    ("W8A8 per-token", {"dtype": "int8", "symmetric": True, "axis": 0}, "int8",
     ("int32", "float-exact", "int-gemv", "jax-dot", "auto")),
    ("W4A8 g128", {"dtype": "int4", "symmetric": True, "group_size": 128}, "int8",
     ("int32", "float-exact", "int-gemv", "jax-dot", "auto")),
]


def _applies(backend: str, formulation: str, m: int, k: int, n: int) -> bool:
    if formulation == "jax-dot":
        return backend == "jax"
    if formulation == "float-exact":
        return backend == "numpy"
    if formulation in ("gemv", "int-gemv"):
        return m == 1
    if formulation == "slabs":  # a Python loop over slabs: unrolled (and slow) under jit
        return backend == "numpy" and m <= 64
    if formulation == "int32":  # no BLAS for int32 (NumPy loops; XLA on GPU: no cuBLAS)
        return m * n * k <= 1 << 26
    if formulation == "grouped":  # (groups, m, n) intermediate
        return m * (k // 128) * n <= 1 << 28
    return True


def _timed(f, base, repeats: int, sync) -> tuple[float, float]:
    """``(median ms of f(), median ratio to base())``, the two called alternately."""
    t, ratio = paired_ratio(f, base, repeats, sync)
    return 1e3 * t, ratio


def _rel_err(y, ref) -> float:
    y = np.asarray(y, np.float64)
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


HEADER = ("| shape (m x k x n) | backend | case | formulation | median ms | vs f32 | rel.err |\n"
          "|---|---|---|---|---:|---:|---:|")


def _format(shape, backend, case, form, t, ratio, err) -> str:
    e = "" if err is None else f"{err:.1e}"
    return f"| {shape} | {backend} | {case} | {form} | {t:.3f} | {ratio:.2f} | {e} |"


def _row(rows, *fields) -> None:
    """Record a row and print it at once (a run cut short still shows its rows)."""
    rows.append(fields)
    print(_format(*fields), flush=True)


def _primitive_rows(rows, shape, m, x_np, w_np, best, repeats, sync):
    """References on JAX: the int8 primitives the quantized formulations rest on,
    with codes ready and no scales (``vs f32`` against the same float32 baseline)."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    codes = jnp.asarray(np.clip(np.round(w_np * 127 / np.abs(w_np).max()), -127, 127)
                        .astype(np.int8))
    if m == 1:
        name = "sum(int8 codes * x, axis=1)"
        fn = jax.jit(lambda c, x: jnp.sum(c.astype(jnp.float32) * jnp.reshape(x, (-1,)), axis=1))
        args = (codes, jnp.asarray(x_np))
    else:
        name = "dot_general(int8, int8) -> int32"
        fn = jax.jit(lambda a, c: lax.dot_general(a, c, (((1,), (1,)), ((), ())),
                                                  preferred_element_type=jnp.int32))
        args = (jnp.asarray(np.clip(np.round(x_np * 30), -127, 127).astype(np.int8)), codes)
    t, ratio = _timed(lambda: fn(*args), best, repeats, sync)
    _row(rows, shape, "jax", "int8 primitive alone", name, t, ratio, None)


def _run_backend(backend, shapes, repeats, rows):
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        def to(a):
            return jnp.asarray(a)

        def wrap(fn):
            return jax.jit(fn)

        sync = jax.block_until_ready
    else:
        def to(a):
            return a

        def wrap(fn):
            return fn

        def sync(a):
            return a

    for label, m, k, n in shapes:
        if backend == "numpy" and m * k * n > 1 << 32:
            continue
        rng = np.random.default_rng(0)
        x_np = rng.standard_normal((m, k)).astype(np.float32)
        w_np = (rng.standard_normal((n, k)) / math.sqrt(k)).astype(np.float32)
        ref = x_np.astype(np.float64) @ w_np.T.astype(np.float64)
        x, w = to(x_np), to(w_np)
        wt = to(np.ascontiguousarray(w_np.T))
        shape = f"{label} {m}x{k}x{n}"
        baselines = [
            ("f32 x @ w.T", wrap(lambda a, b: a @ b.T), (x, w)),
            ("f32 x @ w_t (w stored (in, out))", wrap(lambda a, b: a @ b), (x, wt)),
        ]
        if m == 1:  # XLA on CPU: a matrix-vector product is ~20x faster than (1, k) @ (k, n)
            baselines.append(("f32 w @ x[0] (1-D x)", wrap(lambda a, b: (b @ a[0])[None]), (x, w)))
        calls = [lambda fn=fn, args=args: fn(*args) for _, fn, args in baselines]
        for c in calls:  # compile, then pick the fastest float32 formulation as the baseline
            sync(c())
        solo = [median_time(lambda c=c: sync(c()), 5, warmup=0) for c in calls]
        best = calls[solo.index(min(solo))]
        for (name, fn, args), c in zip(baselines, calls):
            t, ratio = _timed(c, best, repeats, sync)
            _row(rows, shape, backend, "float32", name, t, ratio, _rel_err(fn(*args), ref))
        if backend == "jax":  # what XLA's int8 primitives cost alone, without arrayquant
            _primitive_rows(rows, shape, m, x_np, w_np, best, repeats, sync)
        qa_fn = wrap(aq.quantize_activations)
        t, ratio = _timed(lambda qa_fn=qa_fn, x=x: qa_fn(x), best, repeats, sync)
        _row(rows, shape, backend, "quantize_activations", "int8 per token", t, ratio, None)
        for case, qkw, act, formulations in CASES:
            qw = aq.quantize(w_np, **qkw)
            if backend == "jax":
                qw = jax.tree_util.tree_map(jnp.asarray, qw)
            for form in formulations:
                if not _applies(backend, form, m, k, n):
                    continue
                fn = wrap(lambda a, b, form=form, act=act: aq.linear(
                    a, b, act_dtype=act, formulation=form))
                t, ratio = _timed(lambda fn=fn, x=x, qw=qw: fn(x, qw), best, repeats, sync)
                _row(rows, shape, backend, case, form, t, ratio, _rel_err(fn(x, qw), ref))
        print(f"# done: {backend} {shape}", file=sys.stderr, flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes, 2 repeats (smoke run)")
    p.add_argument("--large", action="store_true", help="also a 4096^3 GEMM (JAX only)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per row (default 11)")
    p.add_argument("--backends", default="numpy,jax", help="comma-separated: numpy,jax")
    args = p.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 11)
    shapes = QUICK if args.quick else SHAPES + (LARGE if args.large else [])
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]

    print(f"# arrayquant.linear benchmark: python {' '.join(sys.argv)}")
    print(f"# numpy {np.__version__} on {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs")
    if "jax" in backends:
        try:
            import jax
        except ImportError:
            backends.remove("jax")
            print("# jax not installed: skipped")
        else:
            print(f"# jax {jax.__version__}, device: {jax.devices()[0]} "
                  f"({jax.devices()[0].platform})")
    print(f"# medians of {repeats} runs; 'vs f32' = median of time / time of the fastest "
          "float32 row of the same shape and backend, called alternately")
    print()
    print(HEADER, flush=True)
    rows: list = []
    for backend in backends:
        _run_backend(backend, shapes, repeats, rows)


if __name__ == "__main__":
    main()
