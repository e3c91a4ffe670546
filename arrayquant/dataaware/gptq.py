"""GPTQ (Frantar et al. 2022): quantize a linear weight column by column, compensating errors.

For a layer ``y = x @ W.T`` (``W`` of shape ``(out, in)``), GPTQ minimizes the
layer-wise loss ``tr((W - Q) H (W - Q)^T)`` with ``H = X^T X`` (the input
Gram matrix; its scale does not matter) one input column at a time:

1. Dead inputs (``H_ii == 0``) get ``H_ii = 1`` and ``W[:, i] = 0``.
2. With ``act_order``, the columns are processed in the order of decreasing
   ``H_ii`` (``perm``); ``W`` and ``H`` are permuted.
3. ``damp * mean(diag H)`` is added to the diagonal, and ``U`` is the upper
   Cholesky factor of ``H^-1`` (``H^-1 = U^T U``).
4. Columns are processed in blocks of ``block_size``. For column ``j``:
   ``q = dequantize(quantize(w_j))`` with the current group's parameters,
   ``err = (w_j - q) / U_jj``, and the rest of the block gets
   ``w_c -= err * U_jc``; after the block, every later column gets the
   block's errors at once (``W[:, later] -= Err @ U[block, later]``: the lazy
   batch update, one matmul per block).
5. A group's parameters are computed when its first column is reached, from
   the group's columns as the earlier errors left them. ``params="minmax"``:
   the library's min/max formulas; ``"mse"`` (or an
   :class:`~arrayquant.MSESearch`): the shrink factor (and for asymmetric,
   the zero point within ``+-radius`` codes) minimizing
   ``sum_c H_cc (w_rc - q_rc)^2`` per row of the group (``H`` after the
   dead-input fix, before damping). Per channel and per tensor, the
   parameters are computed once from the whole weight before the loop.

The codes of the result are exactly those the loop used. Scales and zero
points come from :func:`arrayquant.affine.params.params_from_range`, so they
respect ``scale_limits`` and zero points are integers in range.

On JAX the whole computation is one jitted function per (shape, settings),
with ``lax.scan`` loops (compiled once per weight shape); under an outer
``jax.jit`` it is traced inline. The Hessian is inverted in float64 where the
namespace has it (NumPy, JAX with x64), else float32; the column loop runs in
the weight's compute dtype (float32, or float64 for float64 weights).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache, partial

from arrayquant._backend import (
    compute_dtype,
    dtype_name,
    float_dtype,
    is_concrete,
    is_jax,
    namespace,
)
from arrayquant.affine import make_qarray
from arrayquant.affine.calibrate import MinMax
from arrayquant.affine.checks import check_float_input, eager, raise_if_not_finite
from arrayquant.affine.params import check_symmetric, store_zero_point
from arrayquant.affine.search import MSESearch
from arrayquant.blocking import normalize_axis, plan
from arrayquant.dataaware.gptq_core import (
    fix_dead,
    hessian_factor,
    make_plan,
    run_columns,
    slab_params,
)
from arrayquant.dataaware.layout import check_recorded
from arrayquant.linear_weight import LinearWeight
from arrayquant.packing import pack
from arrayquant.qtypes import QTYPE_NAMES, as_qtype
from arrayquant.stats.layer import LayerStats, accumulation_dtype

__all__ = ["GPTQ", "gptq", "gptq_codes"]

_PARAMS = {"minmax": MinMax(), "mse": MSESearch()}


def _search(params) -> tuple:
    """``()`` for min/max, ``(grid, min_shrink, radius)`` for a search."""
    p = _PARAMS.get(params.lower(), params) if isinstance(params, str) else params
    if isinstance(p, MinMax):
        return ()
    if isinstance(p, MSESearch):
        return (p.grid, float(p.min_shrink), p.zero_point_radius if p.search_zero_point else 0)
    raise ValueError(f"GPTQ params={params!r}: expected 'mse', 'minmax', an "
                     "arrayquant.MSESearch(...) or arrayquant.MinMax()")


def _check_settings(damp, block_size, act_order, in_axis) -> None:
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not damp >= 0:
        raise ValueError(f"GPTQ damp={damp!r}: expected a number >= 0 (a fraction of the "
                         "mean of the Hessian's diagonal; 0.01 to 0.1 is usual)")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"GPTQ block_size={block_size!r}: expected an int >= 1")
    if not isinstance(act_order, bool):
        raise ValueError(f"GPTQ act_order={act_order!r}: expected True or False")
    if isinstance(in_axis, bool) or in_axis not in (0, 1):
        raise ValueError(f"GPTQ in_axis={in_axis!r}: expected 1 ((out, in) layout, as "
                         "PyTorch) or 0 ((in, out) layout)")


@dataclass(frozen=True)
class _Setup:
    """Everything static about one call (the jit cache key)."""

    plan: object
    damp: float
    act_order: bool
    in_axis: int
    scale_dtype: str
    hessian_dtype: str
    pack: bool = False


def _core(w, h, setup: _Setup):
    """``(codes, scale, zero_point, perm, ok)`` in the weight's layout; codes packed along
    the last axis when ``setup.pack``; ``ok``: the Hessian factor is finite."""
    xp = namespace(w, h)
    p = setup.plan
    cdt = compute_dtype(xp, w.dtype)
    sdt = float_dtype(xp, setup.scale_dtype)
    w = xp.astype(w, cdt)
    if setup.in_axis == 0:
        w = xp.permute_dims(w, (1, 0))
    h, dead = fix_dead(h, float_dtype(xp, setup.hessian_dtype), xp)
    w = xp.where(dead[None, :], xp.zeros_like(w), w)
    perm = None
    if setup.act_order:
        perm = xp.argsort(xp.linalg.diagonal(h), descending=True, stable=True)
        w = xp.take(w, perm, axis=1)
        h = xp.take(xp.take(h, perm, axis=0), perm, axis=1)
    wts = xp.astype(xp.linalg.diagonal(h), cdt)
    u = hessian_factor(h, setup.damp, xp)
    ok = xp.all(xp.isfinite(u))
    u = xp.astype(u, cdt)
    k, pad = p.cols, p.padded - p.cols
    fixed = None
    if p.group is None:
        fixed = slab_params(w, wts, p, sdt, cdt, xp)
    if pad:
        w = xp.concat([w, xp.zeros((p.rows, pad), dtype=cdt)], axis=1)
        u = xp.concat([xp.concat([u, xp.zeros((k, pad), dtype=cdt)], axis=1),
                       xp.concat([xp.zeros((pad, k), dtype=cdt), xp.eye(pad, dtype=cdt)],
                                 axis=1)], axis=0)
        wts = xp.concat([wts, xp.ones((pad,), dtype=cdt)])
    codes, s, z = run_columns(w, u, wts, fixed, p, sdt, cdt, xp)
    codes, z = codes[:, :k], store_zero_point(z, p.qt, xp)
    if setup.in_axis == 0:
        codes, s = xp.permute_dims(codes, (1, 0)), xp.permute_dims(s, (1, 0))
        z = None if z is None else xp.permute_dims(z, (1, 0))
    if setup.pack:
        codes = pack(codes, p.qt.bits, axis=1)
    return codes, s, z, None if perm is None else xp.astype(perm, xp.int32), ok


@lru_cache(maxsize=64)
def _jitted(setup: _Setup):
    import jax

    return jax.jit(partial(_core, setup=setup))


def _hessian_of(stats, k: int):
    if isinstance(stats, LayerStats):
        if stats.gram is None:
            raise ValueError("GPTQ needs the input Gram matrix; these LayerStats were "
                             "recorded with gram=False (record with gram=True)")
        check_recorded(stats, "GPTQ")
        h, what = stats.gram, "stats.gram"
    elif hasattr(stats, "shape") and hasattr(stats, "dtype"):
        h, what = stats, "the Hessian"
    else:
        raise TypeError(f"GPTQ stats must be arrayquant LayerStats or a (k, k) array, got "
                        f"{type(stats).__name__}")
    if tuple(h.shape) != (k, k):
        raise ValueError(f"{what} has shape {tuple(h.shape)}; expected ({k}, {k}), one row "
                         f"and column per input feature of the weight")
    check_float_input(h, namespace(h))
    return h


def _prepare(w, stats, dtype, group_size, axis, symmetric, in_axis, damp, block_size,
             act_order, params, scale_dtype):
    """Validate; return ``(xp, qt, blocking, h, setup)``."""
    xp = namespace(w)
    check_float_input(w, xp)
    if len(w.shape) != 2:
        raise ValueError(f"GPTQ quantizes one 2-D weight; got shape {tuple(w.shape)}")
    _check_settings(damp, block_size, act_order, in_axis)
    qt = as_qtype(dtype)
    check_symmetric(qt, symmetric)
    out_axis = 1 - in_axis
    if axis is not None:
        if isinstance(axis, (tuple, list)) and len(axis) == 1:
            axis = axis[0]
        if normalize_axis(axis, 2) != out_axis:
            raise ValueError(
                f"GPTQ axis={axis!r} with in_axis={in_axis}: expected None (per tensor) or "
                f"{out_axis} (per output channel); groups go along the input axis "
                f"(group_size=...)")
        axis = out_axis
    shape = tuple(w.shape)
    blocking = plan(shape, axis, group_size, in_axis)  # checks group_size and axis together
    rows, cols = shape[out_axis], shape[in_axis]
    h = _hessian_of(stats, cols)
    raise_if_not_finite(xp, w, what="the weight")
    raise_if_not_finite(xp, h, what="the Hessian")
    setup = _Setup(
        make_plan(rows, cols, qt, symmetric, group_size, block_size, axis is not None,
                  _search(params)),
        float(damp), act_order, in_axis,
        dtype_name(float_dtype(xp, "float32" if scale_dtype is None else scale_dtype)),
        dtype_name(accumulation_dtype(xp)))
    return xp, qt, blocking, h, setup


def gptq_codes(w, stats, dtype, *, group_size=None, axis=None, symmetric=False, in_axis=1,
               damp=0.1, block_size=128, act_order=False, params="mse", scale_dtype=None):
    """GPTQ's raw result: ``(codes, scale, zero_point, perm)``, nothing packed.

    Arguments as for :func:`gptq`; ``dtype`` may also be any
    :class:`~arrayquant.qtypes.QType` (e.g. ``QType(3, True)``, to measure a bit
    width that arrayquant does not store). ``codes`` has the weight's shape and
    layout, one code per element in the storage dtype (with ``act_order``: the
    input axis in the order ``perm``); ``scale`` and ``zero_point`` have the
    shapes :func:`arrayquant.qparams` gives; ``perm`` is ``None`` without
    ``act_order``. ``dequantize_with(codes, scale, zero_point)`` is the stored
    weight.
    """
    xp, qt, _, h, setup = _prepare(w, stats, dtype, group_size, axis, symmetric, in_axis,
                                   damp, block_size, act_order, params, scale_dtype)
    return _solve(w, h, xp, setup)


def _solve(w, h, xp, setup: _Setup):
    """``_core``, as one jitted call on JAX outside a trace."""
    run = (_jitted(setup) if is_jax(xp) and is_concrete(w) and is_concrete(h)
           else partial(_core, setup=setup))
    codes, s, z, perm, ok = run(w, h)
    if eager(ok) == 0.0:
        raise ValueError(f"GPTQ: the damped Hessian is not positive definite "
                         f"(damp={setup.damp}); use a larger damp, or more calibration data")
    return codes, s, z, perm


def gptq(w, stats, dtype, *, group_size=None, axis=None, symmetric=False, in_axis=1,
         damp=0.1, block_size=128, act_order=False, params="mse", scale_dtype=None):
    """Quantize the 2-D weight ``w`` with GPTQ (see the module docstring for the algorithm).

    Args:
        w: floating weight, ``(out, in)`` (``in_axis=1``) or ``(in, out)`` (``in_axis=0``).
        stats: :class:`~arrayquant.stats.LayerStats` of the layer's input (its
            ``gram``), or a ``(in, in)`` Hessian-like array (``X^T X`` up to scale).
        dtype, symmetric, scale_dtype: as for :func:`arrayquant.quantize`
            (``scale_dtype=None``: float32).
        group_size: one scale per this many consecutive inputs (along ``in_axis``).
        axis: without ``group_size``: ``None`` (per tensor) or the output axis
            (``1 - in_axis``, per output channel).
        damp: dampening, a fraction of the mean of the Hessian's diagonal added
            to it (0.1 helps when there are fewer calibration tokens than inputs).
        block_size: columns per lazy batch update (the result changes only by
            floating-point rounding; a block never splits a group that starts in it).
        act_order: process the inputs by decreasing ``H_ii``; the result is then a
            :class:`~arrayquant.LinearWeight` whose ``perm`` holds that order (the
            stored codes are ``W[:, perm]``, with contiguous groups).
        params: group parameters: ``"mse"`` (a Hessian-weighted search,
            :class:`~arrayquant.MSESearch`'s grid) or ``"minmax"``, or an
            ``MSESearch(...)`` / ``MinMax()`` instance.

    Returns:
        A :class:`~arrayquant.QArray` packed as :func:`arrayquant.quantize` packs
        it, or a :class:`~arrayquant.LinearWeight` with ``perm`` when ``act_order``.

    Raises:
        TypeError: a non-float weight or Hessian; ``stats`` of another type.
        ValueError: ``w`` not 2-D; a Hessian not ``(in, in)`` or recorded without
            the Gram matrix; ``axis`` not None or the output axis; ``axis`` with
            ``group_size``; a bad setting; eager only: NaN or inf in ``w`` or the
            Hessian, or a damped Hessian that is not positive definite; LayerStats
            with no rows (count 0).

    Example:
        >>> import numpy as np, arrayquant as aq
        >>> from arrayquant.dataaware import gptq
        >>> rng = np.random.default_rng(0)
        >>> w = rng.standard_normal((8, 32)).astype(np.float32)
        >>> x = rng.standard_normal((64, 32)).astype(np.float32)
        >>> qa = gptq(w, x.T @ x, "int4", group_size=16)
        >>> qa.shape, qa.scale.shape, qa.data.shape
        ((8, 32), (8, 2), (8, 16))
        >>> def loss(q):
        ...     e = w - aq.dequantize(q)
        ...     return float(np.trace(e @ (x.T @ x) @ e.T))
        >>> loss(qa) < loss(aq.quantize(w, "int4", group_size=16))
        True
    """
    xp, qt, blocking, h, setup = _prepare(w, stats, dtype, group_size, axis, symmetric,
                                          in_axis, damp, block_size, act_order, params,
                                          scale_dtype)
    if qt.name not in QTYPE_NAMES:
        raise ValueError(f"GPTQ dtype={dtype!r}: arrayquant stores {', '.join(QTYPE_NAMES)}; "
                         "gptq_codes gives the codes of other bit widths")
    packed = qt.bits < 8
    data, s, z, perm = _solve(w, h, xp, replace(setup, pack=packed))
    qa = make_qarray(data, s, z, qt, blocking, dtype_name(w.dtype), 0, packed=packed)
    return qa if perm is None else LinearWeight(qa, perm=perm, in_axis=in_axis)


@dataclass(frozen=True)
class GPTQ:
    """GPTQ as a data-aware weight method (``Rule(method=GPTQ())``, ``quantize_tree(stats=)``).

    Fields as the keyword arguments of :func:`gptq`. ``quantize_weight`` takes
    the granularity of :func:`arrayquant.quantize`; groups must lie along the
    input axis (``group_axis == in_axis``).
    """

    damp: float = 0.1
    block_size: int = 128
    act_order: bool = False
    params: object = "mse"
    in_axis: int = 1

    needs_stats = True

    def __post_init__(self):
        _check_settings(self.damp, self.block_size, self.act_order, self.in_axis)
        _search(self.params)

    def quantize_weight(self, w, stats, *, dtype, symmetric=False, axis=None,
                        group_size=None, group_axis=-1, scale_dtype="float32"):
        if group_size is not None and len(getattr(w, "shape", ())) == 2 and normalize_axis(
                group_axis, 2, "group_axis") != self.in_axis:
            raise ValueError(
                f"GPTQ groups must lie along the input axis: group_axis={group_axis} but "
                f"in_axis={self.in_axis}; use group_axis={self.in_axis}, or GPTQ(in_axis=...)"
                " for the layout of this weight")
        return gptq(w, stats, dtype, group_size=group_size, axis=axis, symmetric=symmetric,
                    in_axis=self.in_axis, damp=self.damp, block_size=self.block_size,
                    act_order=self.act_order, params=self.params, scale_dtype=scale_dtype)
