"""Which product formulation makes XLA:GPU abort while compiling?

Two jax-jit tests of tests/test_matmul.py (``test_leading_axes_bias_and_dtypes``
and ``test_empty_batch_gives_empty_result``) abort the process on an H200
(JAX 0.11.2) inside XLA's Triton GEMM fusion (``Check failed:
subdim_size_accumulator == dim_size``). This script compiles their products one
formulation at a time, each weight format and dtype in its own child process
(an abort kills only that child), and prints OK / ABORT per case.
``jax-dot+barrier`` is ``jax-dot`` with ``lax.optimization_barrier`` on the int8
operands, a candidate workaround (it stops XLA fusing their producers into the GEMM).

    python benchmarks/gpu_compile_crash.py
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

WEIGHTS = {"int4 sym g8": ("int4", True, {"group_size": 8}),
           "uint4 g8": ("uint4", False, {"group_size": 8}),
           "int8 per channel": ("int8", True, {"axis": 0})}
FORMS = [(None, "dequantize"), (None, "epilogue"), (None, "grouped"), (None, "fields"),
         (None, "auto"), ("int8", "int32"), ("int8", "jax-dot"), ("int8", "jax-dot+barrier"),
         ("int8", "auto"), ("uint8", "jax-dot")]
LEADS = [(2, 3), (6,), (), (0,), (3, 0)]

CHILD = r"""
import sys, numpy as np, jax, jax.numpy as jnp
from jax import lax
import arrayquant as aq
import arrayquant.products.jax_dot as J
wname, dt, qt, sym, kw, act, form = eval(sys.argv[1])
if form == "jax-dot+barrier":
    orig = J.int8_dot
    def _barrier_dot(a, b, dims):
        a, b = lax.optimization_barrier((a, b))
        return orig(a, b, dims)
    J.int8_dot = _barrier_dot
    form = "jax-dot"
rng = np.random.default_rng(5)
w = aq.quantize(jnp.asarray(rng.standard_normal((5, 16)), dt), qt, sym, **kw)
for lead in eval(sys.argv[2]):
    print("compiling", lead, flush=True)
    x = jnp.asarray(rng.standard_normal((*lead, 16)), dt)
    f = jax.jit(lambda x, w: aq.linear(x, w, act_dtype=act, act_symmetric=(act != "uint8"),
                                       formulation=form))
    try:
        f(x, w).block_until_ready()
    except (ValueError, TypeError) as e:
        print("refused", lead, str(e)[:80], flush=True)
print("done", flush=True)
"""


def run(case):
    (wname, (qt, sym, kw)), dt, (act, form) = case
    if form in ("grouped", "fields") and qt == "int8":
        return f"{wname:17s} {dt:8s} {act!s:5s} {form:16s} n/a"
    args = repr((wname, dt, qt, sym, kw, act, form))
    p = subprocess.run([sys.executable, "-c", CHILD, args, repr(LEADS)], capture_output=True,
                       text=True, timeout=120)
    lines = p.stdout.strip().splitlines()
    status = "OK" if p.returncode == 0 else f"ABORT (rc {p.returncode}) at {lines[-1:]}"
    refused = [ln for ln in lines if ln.startswith("refused")]
    check = [ln for ln in p.stderr.splitlines() if "Check failed" in ln][:1]
    return f"{wname:17s} {dt:8s} {act!s:5s} {form:16s} {status} {refused[:1]} {check}"


def main() -> None:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    cases = list(itertools.product(WEIGHTS.items(), ["float32", "float16"], FORMS))
    with ThreadPoolExecutor(8) as pool:
        for line in pool.map(run, cases):
            print(line, flush=True)


if __name__ == "__main__":
    main()
