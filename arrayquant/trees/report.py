"""Reports on a quantized tree: bytes, bits per element and SQNR per leaf and in total."""

from __future__ import annotations

import math
from dataclasses import dataclass

from arrayquant._backend import dtype_name
from arrayquant.linear_weight import LinearWeight
from arrayquant.qarray import QArray, check_integer_codes, storage_nbytes
from arrayquant.qtypes import as_qtype
from arrayquant.trees.paths import flatten_tree, is_leaf, is_quantized

# --------------------------------------------------------------------------- report


def format_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``: bytes in binary units, 3 significant digits."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class LeafReport:
    """One array leaf: where it is, what it was, and what it became."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    qtype: str | None
    granularity: str | None
    symmetric: bool | None
    bytes_before: int
    bytes_after: int
    sqnr_db: float | None

    @property
    def quantized(self) -> bool:
        return self.qtype is not None

    @property
    def setting(self) -> str:
        """``int4 per-group(128, axis=1) asym``, or ``-`` for a leaf kept as it is."""
        if self.qtype is None:
            return "-"
        return f"{self.qtype} {self.granularity} {'sym' if self.symmetric else 'asym'}"


def _expand_rows(a, block: tuple[int, ...], shape: tuple[int, ...], i: int, j: int):
    """Rows ``i:j`` of a scale-shaped NumPy array broadcast to the full shape (repeat, trim)."""
    import numpy as np

    b0 = block[0]
    lo = i // b0
    part = np.repeat(a[lo : (j - 1) // b0 + 1], b0, axis=0)[i - lo * b0 : j - lo * b0]
    for d in range(1, len(shape)):
        if block[d] > 1:
            part = np.repeat(part, block[d], axis=d)[(slice(None),) * d + (slice(0, shape[d]),)]
    return part


def _sqnr(x, qa: QArray) -> float:
    """SQNR in dB of ``qa`` against ``x``.

    NumPy inputs are compared in float64, in chunks of rows, without building the
    whole dequantized array (so that reporting a big tensor costs little memory).
    """
    import numpy as np

    from arrayquant.packing import unpack

    if (not isinstance(x, np.ndarray) or not isinstance(qa.data, np.ndarray)
            or x.ndim == 0 or qa.packed_axis == 0 or qa.batch_shape):
        from arrayquant.metrics import sqnr_db

        return float(sqnr_db(x, qa))
    shape, block = qa.shape, qa.block_shape
    step = max(1, (1 << 20) // max(1, math.prod(shape[1:])))  # about 1M elements per chunk
    qt = as_qtype(qa.qtype)
    signal = noise = 0.0
    for i in range(0, shape[0], step):
        j = min(shape[0], i + step)
        codes = qa.data[i:j]
        if qa.packed_axis is not None:
            codes = unpack(codes, qt.bits, shape[qa.packed_axis], axis=qa.packed_axis,
                           signed=qt.signed)
        q = codes.astype(np.float64)
        if qa.zero_point is not None:
            q -= _expand_rows(qa.zero_point, block, shape, i, j)
        q *= _expand_rows(qa.scale, block, shape, i, j)
        xc = x[i:j].astype(np.float64)
        signal += float(np.sum(xc * xc))
        q -= xc
        noise += float(np.sum(q * q))
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def leaf_report(path: str, original, new) -> LeafReport:
    shape = tuple(int(n) for n in original.shape)
    if is_quantized(original):  # already quantized before: nothing to compare with
        oq = original.qweight if isinstance(original, LinearWeight) else original
        shape = oq.batch_shape + shape
        return LeafReport(path, shape, original.dtype, original.qtype, oq.granularity,
                          oq.symmetric, original.nbytes,
                          new.nbytes if is_quantized(new) else storage_nbytes(new), None)
    before = storage_nbytes(original)
    if isinstance(new, LinearWeight):
        from arrayquant.metrics import sqnr_db

        check_integer_codes(new.qweight)
        return LeafReport(
            path, shape, dtype_name(original.dtype), new.qtype, new.qweight.granularity,
            new.qweight.symmetric, before, new.nbytes,
            float(sqnr_db(original, new.dequantize(dtype_name(original.dtype)))))
    if isinstance(new, QArray):
        check_integer_codes(new)
        return LeafReport(
            path, shape, dtype_name(original.dtype), new.qtype, new.granularity, new.symmetric,
            before, new.nbytes, _sqnr(original, new),
        )
    return LeafReport(path, shape, dtype_name(original.dtype), None, None, None, before,
                      storage_nbytes(new), None)


@dataclass(frozen=True)
class TreeReport:
    """Per-leaf rows (:class:`LeafReport`) and their totals; ``str()`` gives the table."""

    rows: tuple[LeafReport, ...]

    @property
    def n_quantized(self) -> int:
        return sum(r.quantized for r in self.rows)

    @property
    def n_skipped(self) -> int:
        return len(self.rows) - self.n_quantized

    @property
    def bytes_before(self) -> int:
        return sum(r.bytes_before for r in self.rows)

    @property
    def bytes_after(self) -> int:
        return sum(r.bytes_after for r in self.rows)

    @property
    def compression(self) -> float:
        """``bytes_before / bytes_after`` over all leaves (quantized or not)."""
        return self.bytes_before / self.bytes_after if self.bytes_after else math.inf

    def _sqnrs(self) -> list[float]:
        return [r.sqnr_db for r in self.rows if r.sqnr_db is not None]

    @property
    def mean_sqnr_db(self) -> float | None:
        """Mean SQNR (dB) over the quantized leaves, ``None`` when none was quantized."""
        s = self._sqnrs()
        return sum(s) / len(s) if s else None

    @property
    def worst_sqnr_db(self) -> float | None:
        s = self._sqnrs()
        return min(s) if s else None

    def summary(self) -> str:
        """A few lines: tensors quantized and skipped, bytes, compression, SQNR."""

        def db(v):
            return "-" if v is None else f"{v:.1f} dB"

        return "\n".join([
            f"tensors:     {self.n_quantized} quantized, {self.n_skipped} kept",
            f"bytes:       {format_bytes(self.bytes_before)} -> {format_bytes(self.bytes_after)}"
            f" ({self.compression:.2f}x smaller)",
            f"SQNR:        mean {db(self.mean_sqnr_db)}, worst {db(self.worst_sqnr_db)}",
        ])

    def table(self, max_rows: int | None = None) -> str:
        """One line per leaf (the first ``max_rows`` if given), aligned columns."""
        head = ("path", "shape", "dtype", "quantized as", "before", "after", "SQNR dB")
        rows = self.rows if max_rows is None else self.rows[:max_rows]
        body = [
            (
                r.path, "x".join(map(str, r.shape)) or "()", r.dtype, r.setting,
                format_bytes(r.bytes_before), format_bytes(r.bytes_after),
                "-" if r.sqnr_db is None else f"{r.sqnr_db:.1f}",
            )
            for r in rows
        ]
        lines = align_columns([head, *body], right=(4, 5, 6))
        if len(rows) < len(self.rows):
            lines.append(f"... {len(self.rows) - len(rows)} more")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table() + "\n\n" + self.summary()


def align_columns(rows: list[tuple[str, ...]], right: tuple[int, ...] = ()) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for r in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in
                 enumerate(zip(r, widths))]
        out.append("  ".join(cells).rstrip())
    return out


def tree_report(original, quantized) -> TreeReport:
    """Compare ``original`` with ``quantize_tree(original, rules)``, leaf by leaf.

    One :class:`LeafReport` per array leaf of ``original`` (in traversal order):
    path, shape, dtype, how it was quantized (or not), bytes before and after
    (codes, scales and zero points count), and the SQNR
    ``10 log10(sum x^2 / sum (x - x_hat)^2)`` in dB of quantized leaves. Eager
    only (it reads values).

    Raises:
        ValueError: the two trees do not have the same array leaf paths.
    """
    before = [(p, leaf) for p, leaf in flatten_tree(original) if is_leaf(leaf)]
    after = [(p, leaf) for p, leaf in flatten_tree(quantized) if is_leaf(leaf)]
    if [p for p, _ in before] != [p for p, _ in after]:
        missing = sorted({p for p, _ in before} ^ {p for p, _ in after})
        raise ValueError(
            "the trees do not hold the same leaves; pass the original tree and its "
            f"quantize_tree() result (paths in only one of them: {missing[:5]})"
        )
    return TreeReport(tuple(leaf_report(p, a, b) for (p, a), (_, b) in zip(before, after)))
