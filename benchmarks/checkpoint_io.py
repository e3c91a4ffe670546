"""What the digests cost: save and load with and without verification, against reading the file.

Builds a checkpoint of int8 per-channel QArrays (4096 x 4096 each, about 16 MiB a
tensor) in a temporary folder and times, median of ``--repeat`` runs in one
process, with the file in the page cache:

- ``read file``: reading every byte of the file into memory (the baseline);
- ``sha256 alone``: hashlib over the same bytes (one core);
- ``load(verify=False)``: parsing and validation (code, zero-point and scale
  ranges) without digests;
- ``load()``: the same plus every tensor's SHA-256 (the default);
- ``save``: writing the file (digests are always taken), fsync included;
- ``safetensors save_file``: the same tensors written by safetensors' own writer
  (no digests), then fsynced, for comparison.

Seconds per GB and the ratio to ``read file`` are printed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _timing import median_time, print_table  # noqa: E402

import arrayquant as aq  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tensors", type=int, default=32, help="4096 x 4096 int8 tensors")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="2 tensors, 3 repeats (smoke run)")
    args = ap.parse_args(argv)
    n, repeat = (2, 3) if args.quick else (args.tensors, args.repeat)
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4096, 4096), dtype=np.float32)
    qa = aq.quantize(w, "int8", axis=0)
    tree = {f"layers/{i}/w": qa for i in range(n)}
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "m.safetensors"
        aq.save(f, tree)
        gb = f.stat().st_size / 1e9

        def read():
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass

        def sha():
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 24):
                    h.update(chunk)

        flat = {}
        for path, q in tree.items():
            flat.update({f"{path}:data": q.data, f"{path}:scale": q.scale,
                         f"{path}:zero_point": q.zero_point})
        other = Path(tmp) / "plain.safetensors"

        def plain_save():
            from safetensors.numpy import save_file

            save_file(flat, other)
            fd = os.open(other, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)

        rows = []
        base = median_time(read, repeat)
        for name, fn in [("read file", read), ("sha256 alone", sha),
                         ("load(verify=False)", lambda: aq.load(f, verify=False)),
                         ("load()", lambda: aq.load(f)),
                         ("save", lambda: aq.save(f, tree)),
                         ("safetensors save_file", plain_save)]:
            t = base if name == "read file" else median_time(fn, repeat)
            rows.append((name, f"{t:.3f}", f"{t / gb:.2f}", f"{t / base:.1f}x"))
        print(f"{n} tensors, {gb:.3f} GB file, median of {repeat}")
        print_table(rows, ("step", "seconds", "s per GB", "vs read"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
