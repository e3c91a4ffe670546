"""Shared timing helpers for the benchmark scripts: medians of repeated runs."""

from __future__ import annotations

import argparse
import statistics
import time


def parse_repeat(doc: str, default: int, argv=None) -> int:
    """Parse ``--repeat N`` and ``--quick`` (3 repeats, a smoke run); return the repeat count."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=default)
    ap.add_argument("--quick", action="store_true", help="3 repeats, for a smoke run")
    args = ap.parse_args(argv)
    return 3 if args.quick else args.repeat


def median_time(fn, repeat: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeat`` runs, after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def block(x):
    """Wait for an asynchronous (JAX) result; a no-op for NumPy."""
    for leaf in x if isinstance(x, (tuple, list)) else (x,):
        ready = getattr(leaf, "block_until_ready", None)
        if ready is not None:
            ready()
    return x


def print_table(rows, headers) -> None:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    print(line.format(*headers))
    print(line.format(*("-" * w for w in widths)))
    for r in rows:
        print(line.format(*r))


def paired_ratio(fn, base, repeat: int, sync=block) -> tuple[float, float]:
    """``(median seconds of fn(), median of fn()/base() time ratios)``.

    ``fn`` and ``base`` are called alternately (after one warm-up call each) and
    each ratio divides two neighbouring calls, so load that comes and goes on a
    shared machine mostly cancels out of the ratio.
    """
    sync(fn())
    sync(base())
    times, ratios = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        sync(base())
        t1 = time.perf_counter()
        sync(fn())
        t2 = time.perf_counter()
        times.append(t2 - t1)
        ratios.append((t2 - t1) / (t1 - t0))
    return statistics.median(times), statistics.median(ratios)
