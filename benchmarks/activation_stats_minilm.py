"""Activation statistics of MiniLM over the 64 calibration sentences: time and peak memory.

    PYTHONPATH=. python benchmarks/activation_stats_minilm.py [--quick]

Runs ``minilm_calibration.collect_stats`` (batches of 16 sentences, Gram matrices
on) on NumPy and on JAX (each in a fresh process, so that peak memory is its own):
the first call (JAX: including the compiles) and the median of the next ones,
against the plain forward pass over the same batches (the ratio is the cost of
recording), per observer. Peak memory: ``tracemalloc`` (Python and NumPy
allocations) and the process's peak resident set (``ru_maxrss``, which includes
XLA's buffers and the loaded model).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc

OBSERVERS = ("none", "minmax", "percentile", "mse")


def _observer(name):
    from arrayquant.stats import observers

    return {"none": None, "minmax": observers.MinMaxObserver(),
            "percentile": observers.PercentileObserver(),
            "mse": observers.MSEObserver()}[name]


def _run(backend: str, repeats: int, names: list[str]) -> dict:
    from arrayquant.apps.models import minilm, minilm_calibration

    params = minilm.load_params()
    if backend == "jax":
        import jax

        params = jax.tree_util.tree_map(jax.numpy.asarray, params)
    sentences = minilm_calibration.load_sentences("calibration")
    batches = [minilm.tokenize(sentences[i:i + 16]) for i in range(0, len(sentences), 16)]

    def forward():
        if backend == "jax":
            import jax

            fn = jax.jit(minilm.encode)
            return [fn(params, t).block_until_ready() for t in batches]
        return [minilm.encode(params, t) for t in batches]

    def block(stats):
        if backend == "jax":
            import jax

            jax.block_until_ready(stats)
        return stats

    forward()
    plain = statistics.median(_time(forward) for _ in range(repeats))
    out = {"backend": backend, "forward_s": plain, "tokens": int(sum(
        t["attention_mask"].sum() for t in batches)), "rows": {}}
    for name in names:
        obs = _observer(name)

        def collect(obs=obs):
            return block(minilm_calibration.collect_stats(params, sentences, observer=obs))

        tracemalloc.start()
        t0 = time.perf_counter()
        stats = collect()
        first = time.perf_counter() - t0
        traced_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        steady = statistics.median(_time(collect) for _ in range(repeats))
        nbytes = sum(getattr(s, f).nbytes for s in stats.values()
                     for f in ("gram", "sum", "abs_sum", "abs_max", "min", "max"))
        out["rows"][name] = {"first_s": first, "steady_s": steady,
                             "tracemalloc_peak_mb": traced_peak / 2**20,
                             "stats_mb": nbytes / 2**20, "layers": len(stats),
                             "dtype": str(stats[next(iter(stats))].gram.dtype)}
    out["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one repeat, no observers")
    ap.add_argument("--backends", default="numpy,jax")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    repeats = 1 if args.quick else 3
    names = ["none"] if args.quick else list(OBSERVERS)
    if args.child:
        print(json.dumps(_run(args.child, repeats, names)))
        return
    print("| backend | observer | first call | steady | forward alone | steady / forward "
          "| tracemalloc peak | stats held | peak RSS |")
    print("|---|---|---|---|---|---|---|---|---|")
    for backend in args.backends.split(","):
        cmd = [sys.executable, __file__, "--child", backend] + (["--quick"] if args.quick else [])
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        r = json.loads(done.stdout.strip().splitlines()[-1])
        for name, row in r["rows"].items():
            print(f"| {backend} | {name} | {row['first_s']:.2f} s | {row['steady_s']:.2f} s | "
                  f"{r['forward_s']:.2f} s | {row['steady_s'] / r['forward_s']:.1f}x | "
                  f"{row['tracemalloc_peak_mb']:.0f} MiB | {row['stats_mb']:.0f} MiB "
                  f"({row['layers']} layers, {row['dtype']}) | {r['maxrss_mb']:.0f} MiB |",
                  flush=True)
    print(f"\n{r['tokens']} tokens (64 sentences, batches of 16)")


if __name__ == "__main__":
    main()
