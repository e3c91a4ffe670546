"""Time of the searching calibration methods (MSESearch, HQQ): NumPy and jax.jit.

    PYTHONPATH=. python benchmarks/calibration_speed.py            # 5 repeats
    PYTHONPATH=. python benchmarks/calibration_speed.py --quick    # 3 repeats

NumPy: ``aq.qparams`` of MiniLM's 36 encoder linear weights with each method,
int4 g128 and int2 g32 (asymmetric), median seconds of whole-model runs. The
printed digest of all scales and zero points shows that a change of speed left
the results bit for bit the same. jax.jit: one 1536 x 384 weight (int4 g128),
seconds of ``lower(...).compile()`` (one fresh compile, cache off) and median
seconds of a run of the compiled function.
"""

from __future__ import annotations

import functools
import hashlib
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import arrayquant as aq  # noqa: E402
from benchmarks._timing import block, median_time, parse_repeat  # noqa: E402

METHODS = {"MSESearch()": aq.MSESearch(), "HQQ()": aq.HQQ()}
SETTINGS = {"int4 g128": {"dtype": "int4", "group_size": 128},
            "int2 g32": {"dtype": "int2", "group_size": 32}}


def _weights() -> list[np.ndarray]:
    import jax

    from arrayquant.apps.models import minilm

    leaves = jax.tree_util.tree_leaves_with_path(minilm.load_params())
    return [np.asarray(v) for k, v in leaves
            if v.ndim == 2 and "encoder" in jax.tree_util.keystr(k)]


def _numpy_table(repeat: int) -> None:
    ws = _weights()
    print(f"# NumPy {np.__version__}, {len(ws)} MiniLM weights; median of {repeat} runs; "
          "wall and process CPU seconds")
    print("| setting | method | wall s | CPU s | digest |")
    print("|---|---|---:|---:|---|")
    for sname, kw in SETTINGS.items():
        for mname, m in METHODS.items():
            walls, cpus = [], []
            for _ in range(repeat):
                t0, c0 = time.perf_counter(), time.process_time()
                out = [aq.qparams(w, **kw, method=m) for w in ws]
                walls.append(time.perf_counter() - t0)
                cpus.append(time.process_time() - c0)
            h = hashlib.sha1()
            for s, z in out:
                h.update(s.tobytes())
                h.update(z.tobytes())
            print(f"| {sname} | {mname} | {statistics.median(walls):.2f} | "
                  f"{statistics.median(cpus):.2f} | {h.hexdigest()[:12]} |", flush=True)


def _jax_table(repeat: int) -> None:
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_compilation_cache", False)
    w = jnp.asarray(np.random.default_rng(0).standard_normal((1536, 384)).astype(np.float32)
                    * 0.05)
    print(f"# jax {jax.__version__}, {jax.devices()[0]}; one 1536 x 384 weight, int4 g128")
    print("| method | compile s | run s (median) |")
    print("|---|---:|---:|")
    for mname, m in METHODS.items():
        f = functools.partial(aq.qparams, dtype="int4", group_size=128, method=m)
        t0 = time.perf_counter()
        compiled = jax.jit(f).lower(w).compile()
        tc = time.perf_counter() - t0
        tr = median_time(functools.partial(lambda c: block(c(w)), compiled), repeat)
        print(f"| {mname} | {tc:.2f} | {tr:.4f} |", flush=True)


def main(argv=None) -> int:
    repeat = parse_repeat(__doc__, 5, argv)
    _numpy_table(repeat)
    print()
    _jax_table(repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
