"""Peak memory of quantizing a checkpoint larger than 1 GB, streaming versus all at once.

Generates a float32 safetensors checkpoint of ``--tensors`` 4096 x 4096 matrices
(64 MiB each; 17 of them make 1.07 GB) plus a few small tensors in a temporary
folder, then quantizes it in fresh subprocesses and reads each one's peak
resident set size (``VmHWM`` of ``/proc/self/status`` in the child; on Linux
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` also counts the RSS the parent had
when it forked the child, so it is only used where ``/proc`` is missing):

- ``baseline``: the child's imports only (Python, NumPy, safetensors, arrayquant);
- ``streaming``: ``arrayquant.quantize_checkpoint`` (one tensor at a time, the output
  written as it goes);
- ``all at once``: the same tensors read one by one but all quantized tensors kept,
  then written with ``arrayquant.save`` (the safetensors library's writer needs
  every tensor in memory at once);
- ``load_file``: ``safetensors.numpy.load_file`` + ``quantize_tree`` + ``save``, the
  naive way.

Usage::

    python benchmarks/checkpoint_memory.py [--tensors 17] [--markdown OUT.md]

The temporary files are removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

N = 4096
MIB = 1024 * 1024

_CHILD = r"""
import json, resource, sys, time
import numpy as np, safetensors, safetensors.numpy
import arrayquant as aq

mode, src, dst, dtype, group = sys.argv[1:6]
group = int(group) or None
rules = [aq.Rule(include="norm", dtype=None),
         aq.Rule(dtype=dtype, symmetric=group is None, axis=None if group else 0,
                 group_size=group)]
t0 = time.perf_counter()
if mode == "streaming":
    aq.quantize_checkpoint(src, dst, rules)
elif mode == "all at once":
    out = {}
    with safetensors.safe_open(src, framework="numpy", backend="pread") as f:
        for name in f.offset_keys():
            out[name] = aq.quantize_tree({name: f.get_tensor(name)}, rules)[name]
    aq.save(dst, out)
elif mode == "load_file":
    aq.save(dst, aq.quantize_tree(safetensors.numpy.load_file(src), rules))
seconds = time.perf_counter() - t0
maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
try:  # this process image's own peak: ru_maxrss also counts the parent's RSS before exec
    with open("/proc/self/status") as f:
        peak = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
except OSError:
    peak = maxrss
print(json.dumps({"peak": peak, "maxrss": maxrss, "seconds": seconds}))
"""


_NOTES = """\
How to read it: "above baseline" is the child's peak resident set size (VmHWM) minus that of a
child that only imports Python, NumPy, safetensors and arrayquant.

- `streaming` (`arrayquant.quantize_checkpoint`, also what `arrayquant quantize` runs) stays at
  about twice the largest tensor whatever the size of the model: the float tensor being read
  (1x), its codes (0.25x for int8), the quantizer's scratch, and the row-chunked SQNR of the
  report. Tensors are read with safetensors' `pread` backend, not a memory map, and the output is
  written as it is produced (safetensors' own writer needs every output tensor in memory at once,
  so arrayquant writes the file itself: the header is computed from the shapes first).
- `all at once` reads tensor by tensor but keeps every quantized tensor for `arrayquant.save`: the
  peak grows with the whole quantized model (a quarter of it in int8, an eighth in int4).
- `load_file` holds the whole float model (and, here, memory-mapped pages of the file as well):
  it grows with the model, about twice the file.
- `streaming` is about a second slower here because it also computes the per-tensor SQNR for the
  report and fsyncs the output before renaming it.
"""


def _generate(path: Path, n_big: int) -> tuple[int, int]:
    """Write the checkpoint tensor by tensor; returns (file size, largest tensor bytes)."""
    from arrayquant.checkpoint.stfile import StreamWriter

    rng = np.random.default_rng(0)
    specs = [(f"layers.{i}.weight", "float32", (N, N)) for i in range(n_big)]
    specs += [(f"layers.{i}.norm", "float32", (N,)) for i in range(n_big)]
    with open(path, "wb") as fh:
        w = StreamWriter(fh, specs, lambda digests: {"format": "np"})
        for name, _, shape in specs:
            a = rng.standard_normal(shape, dtype=np.float32)
            if name.endswith("weight"):
                a *= 0.02
            w.write(name, a)
        w.close()
    return path.stat().st_size, N * N * 4


def _child(mode: str, src: Path, dst: Path, dtype: str, group: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, mode, str(src), str(dst), dtype, str(group)],
        check=True, capture_output=True, text=True, env=env,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["out_size"] = dst.stat().st_size if dst.exists() else 0
    if dst.exists():
        dst.unlink()
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tensors", type=int, default=17, help="number of 4096 x 4096 tensors")
    ap.add_argument("--markdown", type=Path, help="also write the result to this file")
    ap.add_argument("--skip-naive", action="store_true", help="skip the load_file runs")
    args = ap.parse_args(argv)

    lines: list[str] = []

    def say(line=""):
        print(line, flush=True)
        lines.append(line)

    with tempfile.TemporaryDirectory(prefix="aq-ckpt-bench-") as tmp:
        src, dst = Path(tmp) / "model.safetensors", Path(tmp) / "q.safetensors"
        t0 = time.perf_counter()
        size, largest = _generate(src, args.tensors)
        print(f"generated {size / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)
        base = _child("baseline", src, dst, "int8", 0)
        say(f"input: {args.tensors} float32 tensors of {N} x {N} (+ {args.tensors} of {N}), "
            f"file {size / MIB:.0f} MiB ({size / 1e9:.2f} GB), largest tensor "
            f"{largest / MIB:.0f} MiB")
        say(f"child baseline (imports only): peak RSS {base['peak'] / MIB:.0f} MiB")
        say()
        say("| setting | method | peak RSS | above baseline | / largest tensor | "
            "/ input file | output | time |")
        say("|---|---|---|---|---|---|---|---|")
        modes = ["streaming", "all at once"] + ([] if args.skip_naive else ["load_file"])
        for dtype, group, label in (("int8", 0, "int8 per-channel sym"),
                                    ("int4", 128, "int4 g128 asym")):
            for mode in modes:
                r = _child(mode, src, dst, dtype, group)
                above = r["peak"] - base["peak"]
                say(f"| {label} | {mode} | {r['peak'] / MIB:.0f} MiB | {above / MIB:.0f} MiB | "
                    f"{above / largest:.2f}x | {above / size:.2f}x | "
                    f"{r['out_size'] / MIB:.0f} MiB | {r['seconds']:.1f} s |")
    say()
    say(f"Python {platform.python_version()}, NumPy {np.__version__}, "
        f"{platform.machine()}, {os.cpu_count()} CPUs; temporary files removed.")
    if args.markdown:
        cmd = "python benchmarks/checkpoint_memory.py" + "".join(
            f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
        args.markdown.write_text(
            "# Benchmark: peak memory of quantizing a checkpoint\n\n"
            f"```\n{cmd}\n```\n\n" + "\n".join(lines) + "\n\n" + _NOTES
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
