"""Static plans of a product and THE formulation table.

:class:`WeightPlan` holds the static facts of a 2-D quantized weight,
:class:`ActPlan` the per-row integer activations. :data:`TABLE` is the one
place that says, for every ``formulation`` name, its kind (weight-only or
integer), the function that computes it, when it applies (backend, rows,
packing, granularity), the error raised when it is forced where it does not,
and when ``formulation="auto"`` picks it. :func:`choose` (``auto``) and
:func:`check` (a pinned name) only read the table.

The functions are named as ``"module:attribute"`` and imported on first use:
this module imports no formulation module (no cycle), and the JAX module is
only imported when a JAX formulation runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from arrayquant._backend import is_jax, is_numpy
from arrayquant.qarray import QArray
from arrayquant.qtypes import QType, as_qtype

__all__ = [
    "INT32_MAX", "SLAB_MAX_ROWS", "WeightPlan", "weight_plan", "ActPlan", "code_bound",
    "centered_bound", "fields_fit", "one_row_loops", "Formulation", "TABLE", "FORMULATIONS",
    "WEIGHT_ONLY", "INTEGER", "choose", "check",
]

INT32_MAX = 2**31 - 1

#: NumPy weight-only products with at most this many rows (tokens) dequantize
#: the weight slab by slab (see docs/inference.md).
SLAB_MAX_ROWS = 4


# --------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class WeightPlan:
    """Static facts of a 2-D quantized weight, seen in the (out, in) = (n, k) layout."""

    n: int
    k: int
    bn: int  # block along the output axis
    bk: int  # block along the contraction axis
    qt: QType
    symmetric: bool
    packed_k: bool  # codes packed into bytes along the contraction axis
    packed_n: bool  # codes packed into bytes along the output axis
    kn: bool  # stored as (in, out) (``matmul``) rather than (out, in) (``linear``)

    @property
    def groups(self) -> int:
        return -(-self.k // self.bk)

    @property
    def per_byte(self) -> int:
        return 8 // self.qt.bits

    @property
    def granularity(self) -> str:
        if self.bk == self.k:
            return "per-tensor" if self.bn == self.n else "per output channel"
        if self.bk == 1:
            return "per input channel"
        return f"groups of {self.bk} along the in axis"


def weight_plan(w: QArray, kn: bool) -> WeightPlan:
    a, b = w.shape
    ba, bb = w.block_shape
    n, k, bn, bk = (b, a, bb, ba) if kn else (a, b, ba, bb)
    return WeightPlan(
        n=n, k=k, bn=bn, bk=bk, qt=as_qtype(w.qtype), symmetric=w.zero_point is None,
        packed_k=w.packed_axis is not None and w.packed_axis == (0 if kn else 1),
        packed_n=w.packed_axis is not None and w.packed_axis == (1 if kn else 0), kn=kn,
    )


@dataclass(frozen=True)
class ActPlan:
    """Per-row integer activations: codes (m, k), scale (m, 1), zero point (m, 1) or None."""

    codes: object
    scale: object
    zero_point: object
    qt: QType
    dtype: str


def code_bound(qt: QType, symmetric: bool) -> int:
    """max |code| + max |zero point| once unsigned codes are shifted to signed ones."""
    return qt.qmax if symmetric else 1 << qt.bits


def centered_bound(qt: QType, symmetric: bool) -> int:
    """max |code - zero point|."""
    return qt.qmax if symmetric else qt.qmax - qt.qmin


def fields_fit(wp: WeightPlan) -> bool:
    """Sub-byte codes whose bytes can be split into fields without unpacking: packed
    along the out axis, or along ``k`` with groups made of whole bytes."""
    if wp.packed_n:
        return True
    return wp.packed_k and (wp.groups == 1 or wp.bk % wp.per_byte == 0)


def one_row_loops(m: int, wp: WeightPlan, xp) -> bool:
    """Whether ``auto`` takes a one-row loop (``gemv`` / ``int-gemv``) on JAX: one row, an
    (out, in) weight not packed along out, and loops pay off on this device (one CPU
    device: :func:`arrayquant.products.jax_dot.loops_pay_off`)."""
    if not (is_jax(xp) and m == 1 and not wp.kn and not wp.packed_n):
        return False
    from arrayquant.products.jax_dot import loops_pay_off

    return loops_pay_off()


# --------------------------------------------------------------------------- the table

WEIGHT_ONLY_KIND = "weight-only"
INTEGER_KIND = "integer"

Predicate = Callable[[int, WeightPlan, object], bool]  # (rows m, weight plan, namespace)


@dataclass(frozen=True)
class Formulation:
    """One row of :data:`TABLE`.

    ``applies(m, wp, xp)`` says whether the formulation can compute this product;
    forced where it does not, ``ValueError(refusal(m, wp, xp))`` is raised.
    ``auto(m, wp, xp)`` says whether ``formulation="auto"`` picks it (among those
    that apply, the last such entry of its kind in table order: the table lists the
    generic formulation first, the most specific last).
    ``function`` is ``fn(x2, w, wp, cdt, xp) -> (m, n)`` for weight-only ones and
    ``fn(act, w, wp, zw, xp) -> (G, m, n) int32`` for integer ones.
    """

    name: str
    kind: str  # WEIGHT_ONLY_KIND or INTEGER_KIND
    target: str  # "module:attribute" of the function
    summary: str
    applies: Predicate
    refusal: Callable[[int, WeightPlan, object], str]
    auto: Predicate

    @property
    def function(self) -> Callable:
        module, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module), attr)


_WO = "arrayquant.products.weight_only:"
_INT = "arrayquant.products.integer:"
_USE = "use formulation='auto' or 'dequantize'"


def _always(m, wp, xp) -> bool:
    return True


def _never(m, wp, xp) -> bool:
    return False


def _fields_refusal(m, wp, xp) -> str:
    if not wp.packed_k:
        why = "codes that are not packed (8-bit types are stored one per byte)"
    else:
        why = (f"groups of {wp.bk} along the in axis, not a multiple of the "
               f"{wp.per_byte} codes per byte")
    return (f"formulation='fields' splits packed bytes into bit fields; got a {wp.qt.name} "
            f"weight with {why}: {_USE}")


_ENTRIES = (
    # ------------------------------------------------------------ weight-only
    Formulation(
        "dequantize", WEIGHT_ONLY_KIND, _WO + "dequantized_product",
        "generic: ``x @ dequantize(w).T``",
        applies=_always, refusal=lambda m, wp, xp: "", auto=_always,
    ),
    Formulation(
        "epilogue", WEIGHT_ONLY_KIND, _WO + "epilogue_product",
        "``(x @ codes.T) * s - rowsum(x) * (s z)``; scale constant along in",
        applies=lambda m, wp, xp: wp.bk == wp.k,
        refusal=lambda m, wp, xp: (
            f"formulation='epilogue' needs a weight whose scale is constant along the in axis "
            f"(per tensor, or per output channel with axis={1 if wp.kn else 0}); got "
            f"{wp.granularity}: {_USE}"),
        auto=_always,
    ),
    Formulation(
        "grouped", WEIGHT_ONLY_KIND, _WO + "grouped_product",
        "one batched contraction over the groups along in",
        applies=lambda m, wp, xp: wp.bk != wp.k,
        refusal=lambda m, wp, xp: (
            f"formulation='grouped' needs a weight quantized in groups along the in axis "
            f"(group_size=g, group_axis={0 if wp.kn else -1}); got {wp.granularity}: {_USE}"),
        auto=_never,  # measured slower than dequantize / slabs / fields everywhere
    ),
    Formulation(
        "fields", WEIGHT_ONLY_KIND, _WO + "fields_product",
        "contracts the bit fields of packed bytes, never interleaving the codes",
        applies=lambda m, wp, xp: fields_fit(wp), refusal=_fields_refusal,
        auto=lambda m, wp, xp: is_jax(xp),
    ),
    Formulation(
        "slabs", WEIGHT_ONLY_KIND, _WO + "slabs_product",
        "dequantizes 1 MiB slabs of output rows, each multiplied while in cache",
        applies=lambda m, wp, xp: not wp.packed_n,
        refusal=lambda m, wp, xp: (
            f"formulation='slabs' slices output rows of the stored bytes, but this "
            f"{wp.qt.name} weight is packed along the out axis: {_USE}"),
        auto=lambda m, wp, xp: not is_jax(xp) and (m <= SLAB_MAX_ROWS or wp.packed_k),
    ),
    Formulation(
        "gemv", WEIGHT_ONLY_KIND, _WO + "gemv_product",
        "one row: a reduction per group over its stored bytes",
        applies=lambda m, wp, xp: m == 1,
        refusal=lambda m, wp, xp: (
            f"formulation='gemv' is the one-row product (GEMV); x has {m} rows: {_USE}"),
        auto=one_row_loops,
    ),
    # ------------------------------------------------------------ integer
    Formulation(
        "int32", INTEGER_KIND, _INT + "int32_accumulate",
        "generic: ``(qx - zx) @ (qw - zw).T`` as an int32 matmul",
        applies=_always, refusal=lambda m, wp, xp: "", auto=_always,
    ),
    Formulation(
        "float-exact", INTEGER_KIND, _INT + "float_exact_accumulate",
        "the same sums in float32 (or float64) where they are exact: BLAS",
        applies=lambda m, wp, xp: not is_jax(xp),
        refusal=lambda m, wp, xp: (
            "formulation='float-exact' may need float64, which JAX disables by default: "
            "use 'jax-dot' (or 'auto') with JAX arrays"),
        auto=lambda m, wp, xp: is_numpy(xp),
    ),
    Formulation(
        "int-gemv", INTEGER_KIND, _INT + "int_gemv_accumulate",
        "one row: exact float32 reductions per unit, added in int32",
        applies=lambda m, wp, xp: m == 1,
        refusal=lambda m, wp, xp: (
            f"formulation='int-gemv' is the one-row product (GEMV); x has {m} rows: use "
            f"'auto', 'int32', 'float-exact' or 'jax-dot'"),
        auto=one_row_loops,
    ),
    Formulation(
        "jax-dot", INTEGER_KIND, "arrayquant.products.jax_dot:int_accumulate",
        "``lax.dot_general`` on int8 operands into int32 (int8 tensor cores)",
        applies=lambda m, wp, xp: is_jax(xp),
        refusal=lambda m, wp, xp: (
            f"formulation='jax-dot' needs JAX arrays; got arrays of {xp.__name__}: use "
            f"'auto', 'int32' or 'float-exact'"),
        auto=lambda m, wp, xp: is_jax(xp) and not one_row_loops(m, wp, xp),
    ),
)

#: The formulation table: name -> :class:`Formulation`.
TABLE: dict[str, Formulation] = {f.name: f for f in _ENTRIES}
#: Every accepted ``formulation`` value.
FORMULATIONS: tuple[str, ...] = ("auto", *TABLE)
WEIGHT_ONLY: tuple[str, ...] = tuple(f.name for f in _ENTRIES if f.kind == WEIGHT_ONLY_KIND)
INTEGER: tuple[str, ...] = tuple(f.name for f in _ENTRIES if f.kind == INTEGER_KIND)


def choose(kind: str, m: int, wp: WeightPlan, xp) -> Formulation:
    """``formulation="auto"``: the last entry of ``kind`` in :data:`TABLE` that applies
    and that ``auto`` picks (the generic one, first in the table, always does)."""
    for f in reversed(_ENTRIES):
        if f.kind == kind and f.applies(m, wp, xp) and f.auto(m, wp, xp):
            return f
    raise AssertionError(f"no {kind} formulation applies")  # the generic one always does


def check(name: str, m: int, wp: WeightPlan, xp) -> Formulation:
    """The entry for a pinned ``formulation``; ValueError with its refusal if it does not
    apply."""
    f = TABLE[name]
    if not f.applies(m, wp, xp):
        raise ValueError(f.refusal(m, wp, xp))
    return f
