"""Quantize whole parameter trees: rules matched on leaf paths, the inverse, and a report.

A *tree* is any nested structure of arrays: a dict of NumPy arrays loaded from a
checkpoint, a Flax params dict, an NNX state, an Equinox module. Every leaf has a
*path*, the keys from the root joined with ``"/"``: ``params/Dense_0/kernel`` in a
nested dict, ``layers/0/weight`` in an Equinox MLP, and the key itself in a flat
checkpoint dict (``encoder.layer.0.attention.self.query.weight``).

Builtin containers (``dict``, ``OrderedDict``, ``list``, ``tuple``, named
tuples) are walked
directly, so that a tree of NumPy arrays needs no JAX and dicts keep their key
order. Any other container is walked with ``jax.tree_util`` key paths when JAX
is imported (the tree then belongs to JAX anyway); dict keys, sequence indices,
attribute names and flattened indices become path components exactly as JAX
names them. Objects that are neither arrays nor containers (functions,
Python scalars, strings, ``None``) are left as they are.

A :class:`Rule` selects leaves by regular expressions on their path
(``re.search``) and by shape, and says how to quantize them; in
:func:`quantize_tree` the first rule that matches a leaf decides, and leaves no
rule matches stay as they are. :func:`dequantize_tree` is the inverse (it runs
under ``jax.jit``), and :func:`tree_report` compares an original tree with its
quantized copy leaf by leaf.

Example:
    >>> import numpy as np, arrayquant as aq
    >>> rng = np.random.default_rng(0)
    >>> params = {"dense": {"kernel": rng.normal(size=(64, 32)).astype(np.float32),
    ...                     "bias": np.zeros(32, np.float32)},
    ...           "head": {"kernel": rng.normal(size=(32, 4)).astype(np.float32)}}
    >>> rules = [aq.Rule(include="head", dtype=None),          # keep the output head
    ...          aq.Rule(dtype="int8", symmetric=True, axis=-1)]
    >>> qp = aq.quantize_tree(params, rules)
    >>> type(qp["dense"]["kernel"]).__name__, type(qp["head"]["kernel"]).__name__
    ('QArray', 'ndarray')
    >>> report = aq.tree_report(params, qp)
    >>> report.n_quantized, report.n_skipped
    (1, 2)
"""

from __future__ import annotations

import collections
import math
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from arrayquant._backend import dtype_name, is_float_dtype
from arrayquant.qarray import QArray, storage_nbytes
from arrayquant.qtypes import as_qtype

__all__ = [
    "LeafReport",
    "Rule",
    "TreeReport",
    "dequantize_tree",
    "format_bytes",
    "quantize_tree",
    "tree_paths",
    "tree_report",
]


# --------------------------------------------------------------------------- walking trees


def _is_array(x) -> bool:
    return not isinstance(x, QArray) and hasattr(x, "shape") and hasattr(x, "dtype")


def is_leaf(x) -> bool:
    return isinstance(x, QArray) or _is_array(x)


def jax_tree_util():
    """``jax.tree_util`` if the user has imported JAX, else ``None`` (never imports JAX)."""
    if "jax" not in sys.modules:
        return None
    import jax

    return jax.tree_util


def _jax_key_str(key) -> str:
    for attr in ("key", "idx", "name"):  # DictKey / FlattenedIndexKey, SequenceKey, GetAttrKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _join(parts: tuple[str, ...]) -> str:
    return "/".join(parts)


def map_leaves(fn: Callable[[str, Any], Any], node, prefix: tuple[str, ...]):
    """Rebuild ``node`` with ``fn(path, leaf)`` applied to every leaf (see the module doc)."""
    if is_leaf(node):
        return fn(_join(prefix), node)
    t = type(node)
    if t is dict or t is collections.OrderedDict:
        return t((k, map_leaves(fn, v, (*prefix, str(k)))) for k, v in node.items())
    if t is list:
        return [map_leaves(fn, v, (*prefix, str(i))) for i, v in enumerate(node)]
    if t is tuple:
        return tuple(map_leaves(fn, v, (*prefix, str(i))) for i, v in enumerate(node))
    if isinstance(node, tuple) and hasattr(node, "_fields"):  # a named tuple
        return t(*(map_leaves(fn, getattr(node, f), (*prefix, f)) for f in node._fields))
    if node is None:
        return None
    jtu = jax_tree_util()
    if jtu is not None:
        leaves, treedef = jtu.tree_flatten_with_path(node, is_leaf=is_leaf)
        if not jtu.treedef_is_leaf(treedef):
            new = [
                map_leaves(fn, leaf, (*prefix, *(_jax_key_str(k) for k in kp)))
                for kp, leaf in leaves
            ]
            return jtu.tree_unflatten(treedef, new)
    return fn(_join(prefix), node)


def _flatten(tree) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []

    def visit(path, leaf):
        out.append((path, leaf))
        return leaf

    map_leaves(visit, tree, ())
    return out


def tree_paths(tree) -> list[str]:
    """The path of every array (or QArray) leaf of ``tree``, in traversal order.

    Example:
        >>> import numpy as np, arrayquant as aq
        >>> aq.tree_paths({"a": {"w": np.zeros(2)}, "b": [np.zeros(1), "not an array"]})
        ['a/w', 'b/0']
    """
    return [p for p, leaf in _flatten(tree) if is_leaf(leaf)]


# --------------------------------------------------------------------------- rules


def _compile(pattern, what: str):
    if pattern is None:
        return None
    if not isinstance(pattern, str):
        raise TypeError(f"Rule.{what} must be a regular expression string or None, got "
                        f"{pattern!r}")
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"Rule.{what}={pattern!r} is not a valid regular expression: {e}") \
            from None


def _check_count(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"Rule.{what} must be a non-negative int, got {value!r}")
    return value


@dataclass(frozen=True)
class Rule:
    """Which leaves of a tree to quantize, and how.

    A rule *matches* a leaf when all of these hold: the leaf is a floating-point
    array; ``include`` is ``None`` or ``re.search(include, path)`` finds a match;
    ``exclude`` is ``None`` or finds none; ``ndim >= min_ndim``; ``size >=
    min_size``. The leaf is then quantized with
    ``arrayquant.quantize(leaf, dtype, symmetric, axis, group_size, group_axis,
    scale_dtype=scale_dtype)``, or left as it is when ``dtype`` is ``None``
    (a rule that keeps, say, the output head or the embeddings in float).

    The defaults are those of :func:`arrayquant.quantize` (int8, asymmetric, one
    scale per tensor) with ``min_ndim=2``, so biases and norm scales are never
    quantized unless asked for. Per output channel is ``axis=0`` for PyTorch
    ``(out, in)`` weights and ``axis=-1`` for JAX ``(in, out)`` kernels; per
    group along the input features is ``group_size=g`` with ``group_axis=-1``
    (``(out, in)``) or ``group_axis=0`` (``(in, out)``).

    Raises:
        ValueError: an invalid regular expression, an unknown ``dtype``, a negative
            ``min_ndim``/``min_size``, ``symmetric`` with an unsigned type, or both
            ``axis`` and ``group_size``.
        TypeError: a pattern that is not a string.

    Example:
        >>> import arrayquant as aq
        >>> aq.Rule(include=r"\\.weight$", exclude="embeddings", dtype="int4", group_size=128)
        Rule(include='\\\\.weight$', exclude='embeddings', dtype='int4', group_size=128)
    """

    include: str | None = None
    exclude: str | None = None
    min_ndim: int = 2
    min_size: int = 1
    dtype: Any = "int8"
    symmetric: bool = False
    axis: int | tuple[int, ...] | None = None
    group_size: int | None = None
    group_axis: int = -1
    scale_dtype: str = "float32"
    _include_re: Any = field(default=None, init=False, repr=False, compare=False)
    _exclude_re: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_include_re", _compile(self.include, "include"))
        object.__setattr__(self, "_exclude_re", _compile(self.exclude, "exclude"))
        _check_count(self.min_ndim, "min_ndim")
        _check_count(self.min_size, "min_size")
        if isinstance(self.axis, list):
            object.__setattr__(self, "axis", tuple(self.axis))
        if self.dtype is None:
            return
        qt = as_qtype(self.dtype)
        object.__setattr__(self, "dtype", qt.name)
        if self.symmetric and not qt.signed:
            raise ValueError(
                f"Rule(symmetric=True) needs a signed dtype, got {qt.name}; use "
                f"{qt.name[1:]} or symmetric=False"
            )
        if self.axis is not None and self.group_size is not None:
            raise ValueError(
                f"Rule: pass either axis={self.axis!r} or group_size={self.group_size!r}, "
                "not both"
            )

    def __repr__(self) -> str:
        defaults = Rule.__dataclass_fields__
        parts = [
            f"{name}={getattr(self, name)!r}"
            for name, f in defaults.items()
            if f.init and getattr(self, name) != f.default
        ]
        return f"Rule({', '.join(parts)})"

    def matches(self, path: str, shape: Sequence[int], dtype) -> bool:
        """Whether this rule selects a leaf at ``path`` of this ``shape`` and ``dtype``."""
        if not is_float_dtype(dtype):
            return False
        if len(shape) < self.min_ndim or math.prod(shape) < self.min_size:
            return False
        if self._include_re is not None and self._include_re.search(path) is None:
            return False
        return self._exclude_re is None or self._exclude_re.search(path) is None

    def quantize(self, x) -> QArray:
        """``arrayquant.quantize`` with this rule's settings (``dtype`` must not be None)."""
        from arrayquant.affine import quantize

        if self.dtype is None:
            raise ValueError("this rule keeps leaves in float (dtype=None); nothing to quantize")
        return quantize(
            x, self.dtype, self.symmetric, self.axis, self.group_size, self.group_axis,
            scale_dtype=self.scale_dtype,
        )


def as_rules(rules) -> tuple[Rule, ...]:
    if isinstance(rules, Rule):
        return (rules,)
    rules = tuple(rules)
    for r in rules:
        if not isinstance(r, Rule):
            raise TypeError(f"rules must be arrayquant.Rule objects, got {type(r).__name__}")
    return rules


def select_rule(rules: tuple[Rule, ...], path: str, shape, dtype) -> Rule | None:
    """The rule that decides a leaf (the first that matches), or None when none does."""
    for r in rules:
        if r.matches(path, tuple(shape), dtype):
            return r
    return None


def quantize_leaf(rule: Rule, path: str, x) -> QArray:
    try:
        return rule.quantize(x)
    except (ValueError, TypeError) as e:
        raise type(e)(f"cannot quantize {path!r} of shape {tuple(x.shape)} with {rule!r}: {e}") \
            from e


# --------------------------------------------------------------------------- public API


def quantize_tree(tree, rules: Rule | Iterable[Rule]):
    """The same tree with the leaves selected by ``rules`` replaced by :class:`QArray` s.

    For every floating-point array leaf, the first rule that matches its path and
    shape (see :class:`Rule`) decides: it is quantized with that rule's settings,
    or kept when the rule's ``dtype`` is ``None``. Leaves that no rule matches,
    non-float arrays, non-array leaves and existing QArrays are returned as they
    are (the same objects). Works on NumPy, JAX (also inside ``jax.jit``) and any
    array API library.

    Raises:
        TypeError: ``rules`` holds something other than :class:`Rule` objects.
        ValueError, TypeError: quantizing a selected leaf failed (an axis out of
            range for it, NaN or inf values...); the message names its path.

    Example:
        >>> import numpy as np, arrayquant as aq
        >>> qt = aq.quantize_tree({"w": np.ones((4, 8), np.float32)}, aq.Rule(dtype="int4"))
        >>> qt["w"].qtype, qt["w"].shape
        ('int4', (4, 8))
    """
    rules = as_rules(rules)

    def fn(path, leaf):
        if not _is_array(leaf):
            return leaf
        rule = select_rule(rules, path, leaf.shape, leaf.dtype)
        if rule is None or rule.dtype is None:
            return leaf
        return quantize_leaf(rule, path, leaf)

    return map_leaves(fn, tree, ())


def dequantize_tree(tree, dtype=None):
    """The same tree with every :class:`QArray` leaf replaced by ``arrayquant.dequantize(leaf)``.

    The inverse of :func:`quantize_tree` up to quantization error. Other leaves
    are returned as they are. ``dtype`` overrides the output dtype of every
    dequantized leaf (default: each one's original dtype). Runs under
    ``jax.jit``, so a model can keep its parameters quantized and dequantize
    them inside the compiled function::

        jax.jit(lambda qp, x: apply(aq.dequantize_tree(qp), x))
    """
    from arrayquant.affine import dequantize

    return map_leaves(
        lambda _path, leaf: dequantize(leaf, dtype) if isinstance(leaf, QArray) else leaf, tree, ()
    )


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
            or x.ndim == 0 or qa.packed_axis == 0):
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
    if isinstance(original, QArray):  # already quantized before: nothing to compare with
        return LeafReport(path, shape, original.dtype, original.qtype, original.granularity,
                          original.symmetric, original.nbytes,
                          new.nbytes if isinstance(new, QArray) else storage_nbytes(new), None)
    before = storage_nbytes(original)
    if isinstance(new, QArray):
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
    before = [(p, leaf) for p, leaf in _flatten(original) if is_leaf(leaf)]
    after = [(p, leaf) for p, leaf in _flatten(quantized) if is_leaf(leaf)]
    if [p for p, _ in before] != [p for p, _ in after]:
        missing = sorted({p for p, _ in before} ^ {p for p, _ in after})
        raise ValueError(
            "the trees do not hold the same leaves; pass the original tree and its "
            f"quantize_tree() result (paths in only one of them: {missing[:5]})"
        )
    return TreeReport(tuple(leaf_report(p, a, b) for (p, a), (_, b) in zip(before, after)))
