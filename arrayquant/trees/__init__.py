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

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from arrayquant._backend import is_float_dtype
from arrayquant.affine.calibrate import DEFAULT_METHOD
from arrayquant.affine.methods import as_method, is_data_aware
from arrayquant.qtypes import as_qtype

# The tree API is one namespace for users and for the checkpoint code and CLI.
from arrayquant.trees.paths import flatten_tree as flatten_tree
from arrayquant.trees.paths import is_array as is_array
from arrayquant.trees.paths import is_leaf as is_leaf
from arrayquant.trees.paths import is_quantized as is_quantized
from arrayquant.trees.paths import jax_tree_util as jax_tree_util
from arrayquant.trees.paths import map_leaves as map_leaves
from arrayquant.trees.paths import tree_paths as tree_paths
from arrayquant.trees.report import LeafReport as LeafReport
from arrayquant.trees.report import TreeReport as TreeReport
from arrayquant.trees.report import align_columns as align_columns
from arrayquant.trees.report import format_bytes as format_bytes
from arrayquant.trees.report import leaf_report as leaf_report
from arrayquant.trees.report import tree_report as tree_report

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
    scale_dtype=scale_dtype, method=method, batch_axes=batch_axes)``, or left as
    it is when ``dtype`` is ``None`` (a rule that keeps, say, the output head or
    the embeddings in float). For stacked layers (an ``(L, out, in)`` leaf),
    ``batch_axes=1`` quantizes each layer on its own, with ``axis`` and
    ``group_axis`` counted within one layer; without it, ``axis=0`` would give
    one scale per layer.

    The defaults are those of :func:`arrayquant.quantize` (int8, asymmetric, one
    scale per tensor) with ``min_ndim=2``, so biases and norm scales are never
    quantized unless asked for. Per output channel is ``axis=0`` for PyTorch
    ``(out, in)`` weights and ``axis=-1`` for JAX ``(in, out)`` kernels; per
    group along the input features is ``group_size=g`` with ``group_axis=-1``
    (``(out, in)``) or ``group_axis=0`` (``(in, out)``). ``method`` is the
    calibration method (:class:`~arrayquant.MinMax` by default; a name such as
    ``"mse"`` is turned into its default instance).

    Raises:
        ValueError: an invalid regular expression, an unknown ``dtype``, a negative
            ``min_ndim``/``min_size``, ``symmetric`` with an unsigned type, both
            ``axis`` and ``group_size``, or an unknown ``method``.
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
    method: Any = DEFAULT_METHOD
    batch_axes: int = 0
    _include_re: Any = field(default=None, init=False, repr=False, compare=False)
    _exclude_re: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_include_re", _compile(self.include, "include"))
        object.__setattr__(self, "_exclude_re", _compile(self.exclude, "exclude"))
        _check_count(self.min_ndim, "min_ndim")
        _check_count(self.min_size, "min_size")
        _check_count(self.batch_axes, "batch_axes")
        if isinstance(self.axis, list):
            object.__setattr__(self, "axis", tuple(self.axis))
        try:
            object.__setattr__(self, "method", as_method(self.method, data_aware=True))
        except ValueError as e:
            raise ValueError(f"Rule: {e}") from None
        if is_data_aware(self.method) and self.batch_axes:
            raise ValueError(f"Rule: the data-aware method {self.method!r} quantizes one 2-D "
                             f"weight with its statistics; batch_axes={self.batch_axes} "
                             "(stacked layers) is not supported with it")
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

    def quantize(self, x, stats=None):
        """``arrayquant.quantize`` with this rule's settings (``dtype`` must not be None).

        A data-aware ``method`` (GPTQ, AWQ, ...) quantizes with ``stats``, the
        :class:`~arrayquant.LayerStats` of the leaf's input, and may return a
        :class:`~arrayquant.LinearWeight`.
        """
        from arrayquant.affine import quantize

        if self.dtype is None:
            raise ValueError("this rule keeps leaves in float (dtype=None); nothing to quantize")
        if is_data_aware(self.method):
            if stats is None:
                raise ValueError(
                    f"the data-aware method {self.method!r} needs this leaf's activation "
                    "statistics, and none were given for it: pass stats={path: LayerStats} "
                    "(aq.collect_stats) to quantize_tree, keyed by the weight's path")
            return self.method.quantize_weight(
                x, stats, dtype=self.dtype, symmetric=self.symmetric, axis=self.axis,
                group_size=self.group_size, group_axis=self.group_axis,
                scale_dtype=self.scale_dtype)
        if stats is not None:
            raise ValueError(f"statistics were given for a leaf that {self.method!r} quantizes "
                             "without data; only data-aware methods use them")
        return quantize(
            x, self.dtype, self.symmetric, self.axis, self.group_size, self.group_axis,
            scale_dtype=self.scale_dtype, method=self.method, batch_axes=self.batch_axes,
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


def quantize_leaf(rule: Rule, path: str, x, stats=None):
    try:
        return rule.quantize(x, stats)
    except (ValueError, TypeError) as e:
        if type(e) not in (ValueError, TypeError):
            raise  # a subclass (JAX's tracer errors) may not take one message: keep it as is
        raise type(e)(f"cannot quantize {path!r} of shape {tuple(x.shape)} with {rule!r}: {e}") \
            from e


# --------------------------------------------------------------------------- public API


def quantize_tree(tree, rules: Rule | Iterable[Rule], *, stats=None):
    """The same tree with the leaves selected by ``rules`` replaced by :class:`QArray` s.

    For every floating-point array leaf, the first rule that matches its path and
    shape (see :class:`Rule`) decides: it is quantized with that rule's settings,
    or kept when the rule's ``dtype`` is ``None``. Leaves that no rule matches,
    non-float arrays, non-array leaves and existing QArrays are returned as they
    are (the same objects). Works on NumPy, JAX (also inside ``jax.jit``) and any
    array API library.

    Rules with a data-aware ``method`` (GPTQ, AWQ, SmoothQuant) quantize a leaf
    with its entry of ``stats``, a mapping from weight paths to
    :class:`~arrayquant.LayerStats` (as :func:`arrayquant.collect_stats`
    records them); such a leaf may become a :class:`~arrayquant.LinearWeight`.

    Raises:
        TypeError: ``rules`` holds something other than :class:`Rule` objects.
        ValueError, TypeError: quantizing a selected leaf failed (an axis out of
            range for it, NaN or inf values, no statistics for a data-aware
            rule...); the message names its path. ``stats`` names a path that
            is not an array leaf of ``tree`` (statistics recorded on another
            tree would otherwise be silently unused).

    Example:
        >>> import numpy as np, arrayquant as aq
        >>> qt = aq.quantize_tree({"w": np.ones((4, 8), np.float32)}, aq.Rule(dtype="int4"))
        >>> qt["w"].qtype, qt["w"].shape
        ('int4', (4, 8))
    """
    rules = as_rules(rules)
    stats = {} if stats is None else dict(stats)
    if stats:
        unknown = sorted(set(stats) - {p for p, leaf in flatten_tree(tree) if is_array(leaf)})
        if unknown:
            raise ValueError(
                f"stats has entries for {len(unknown)} path(s) that are not float array leaves "
                f"of the tree, e.g. {unknown[:3]}; statistics are keyed by the weight leaf's "
                "path (aq.tree_paths(tree))")

    def fn(path, leaf):
        if not is_array(leaf):
            return leaf
        rule = select_rule(rules, path, leaf.shape, leaf.dtype)
        if rule is None or rule.dtype is None:
            return leaf
        return quantize_leaf(rule, path, leaf,
                             stats.get(path) if is_data_aware(rule.method) else None)

    return map_leaves(fn, tree, ())


def dequantize_tree(tree, dtype=None):
    """The same tree with every quantized leaf replaced by ``arrayquant.dequantize(leaf)``.

    Quantized leaves are :class:`QArray` s and :class:`~arrayquant.LinearWeight` s.

    The inverse of :func:`quantize_tree` up to quantization error. Other leaves
    are returned as they are. ``dtype`` overrides the output dtype of every
    dequantized leaf (default: each one's original dtype). Runs under
    ``jax.jit``, so a model can keep its parameters quantized and dequantize
    them inside the compiled function::

        jax.jit(lambda qp, x: apply(aq.dequantize_tree(qp), x))
    """
    from arrayquant.affine import dequantize

    return map_leaves(
        lambda _path, leaf: dequantize(leaf, dtype) if is_quantized(leaf) else leaf, tree, ())



def cast_floats(tree, dtype):
    """The same tree with every floating array leaf cast to ``dtype``; QArrays unchanged.

    The safe form of ``jax.tree.map(lambda a: a.astype(dtype), tree)``, which
    would also reach a QArray's integer codes (arrayquant refuses that with a
    TypeError rather than let products run on float codes). Integer and
    non-array leaves are returned as they are.

    Example:
        >>> import numpy as np, arrayquant as aq
        >>> t = {"w": aq.quantize(np.ones((2, 4), np.float32), "int8"), "b": np.zeros(2)}
        >>> out = aq.cast_floats(t, np.float16)
        >>> out["b"].dtype, out["w"].data.dtype
        (dtype('float16'), dtype('int8'))
    """
    from arrayquant._backend import float_dtype, namespace

    def cast(_path, leaf):
        if not is_array(leaf) or not is_float_dtype(leaf.dtype):
            return leaf
        xp = namespace(leaf)
        return xp.astype(leaf, float_dtype(xp, dtype))

    return map_leaves(cast, tree, ())
