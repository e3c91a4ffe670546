"""GPTQ's column loop and its group-parameter search, on the array API.

The loops are written once, through :func:`scan`: on JAX they become
``lax.scan`` (a traced loop: one body per level, whatever the layer size), on
every other namespace a Python loop. Slices at loop-dependent offsets go
through :func:`take_slice` (a static slice, or ``lax.dynamic_slice`` under a
JAX loop). Everything else is plain ``xp`` code.

Layout here is always ``(rows, columns) = (out, in)``: the caller transposes.
See :mod:`arrayquant.dataaware.gptq` for the algorithm and the public API.
"""

from __future__ import annotations

from dataclasses import dataclass

from arrayquant._backend import is_jax
from arrayquant.affine.calibrate import block_sum
from arrayquant.affine.codes import dequantize_view, quantize_view
from arrayquant.affine.params import clip, params_from_range
from arrayquant.affine.search import shrink_factors
from arrayquant.qtypes import QType

__all__ = [
    "Plan", "fix_dead", "hessian_factor", "make_plan", "run_columns", "scan", "slab_params",
    "take_slice",
]


# --------------------------------------------------------------------------- loops


def _stack(ys, xp):
    first = ys[0]
    if first is None:
        return None
    if isinstance(first, tuple):
        return tuple(_stack([y[i] for y in ys], xp) for i in range(len(first)))
    return xp.stack(ys, axis=0)


def scan(body, carry, n: int, xp):
    """``body(carry, i) -> (carry, y)`` for ``i`` in ``range(n)``; the ``y`` stacked on axis 0.

    ``y`` is an array, ``None`` or a tuple of those. On JAX ``i`` is a traced
    int32 (``lax.scan``); elsewhere a Python int.
    """
    if is_jax(xp):
        from jax import lax

        return lax.scan(body, carry, xp.arange(n, dtype=xp.int32))
    ys = []
    for i in range(n):
        carry, y = body(carry, i)
        ys.append(y)
    return carry, _stack(ys, xp)


def take_slice(x, start, size: int, axis: int):
    """``x[..., start:start + size, ...]`` along ``axis``; ``start`` an int or a JAX tracer."""
    if isinstance(start, int):
        idx = [slice(None)] * len(x.shape)
        idx[axis] = slice(start, start + size)
        return x[tuple(idx)]
    from jax import lax

    return lax.dynamic_slice_in_dim(x, start, size, axis)


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Plan:
    """Static facts of one GPTQ run (Python values only; hashable, so a jit cache key).

    ``group`` is the group size along the columns (``None``: the parameters are
    fixed before the loop, per row or per tensor). ``block`` is the lazy-update
    block, adjusted so that a group never starts inside a block unless it ends
    there too: a multiple of ``group`` when ``group <= block``, else a divisor
    of it of at least half the requested block (or the group itself).
    ``unit = max(block, group)``; the columns are padded to ``padded``, a
    multiple of ``unit``.
    """

    rows: int
    cols: int
    qt: QType
    symmetric: bool
    group: int | None
    block: int
    per_row: bool
    search: tuple  # () for min/max, else (grid, min_shrink, zero-point radius)

    @property
    def unit(self) -> int:
        return max(self.block, self.group or 1)

    @property
    def padded(self) -> int:
        return -(-self.cols // self.unit) * self.unit


def make_plan(rows, cols, qt, symmetric, group, block, per_row, search) -> Plan:
    """A :class:`Plan` with the block size adjusted to the groups (see :class:`Plan`)."""
    if group is not None:
        group = min(group, cols)
        if group <= block:
            block = group * max(1, min(block // group, -(-cols // group)))
        else:
            d = max(d for d in range(1, block + 1) if group % d == 0)
            block = d if 2 * d >= block else group  # no small blocks for awkward groups
    else:
        block = min(block, cols)
    return Plan(rows, cols, qt, symmetric, group, block, per_row or group is not None, search)


# --------------------------------------------------------------------------- Hessian


def fix_dead(h, hdt, xp):
    """``(h, dead)``: ``h`` in ``hdt`` with ``h_ii = 1`` where ``h_ii == 0`` (dead inputs)."""
    h = xp.astype(h, hdt)
    dead = xp.linalg.diagonal(h) == 0
    return h + xp.astype(dead, hdt)[:, None] * xp.eye(h.shape[0], dtype=hdt), dead


def hessian_factor(h, damp: float, xp):
    """The upper triangular ``U`` with ``U^T U = (h + damp * mean(diag h) * I)^-1``.

    With ``J`` the reversal of both axes, ``J h J = M M^T`` (lower Cholesky
    factor ``M``) gives ``h = R R^T`` with ``R = J M J`` upper triangular, so
    ``h^-1 = (R^-1)^T R^-1`` and ``U = R^-1 = J M^-1 J``: one Cholesky
    factorization and one triangular inverse, without forming ``h^-1``.
    """
    k = h.shape[0]
    eye = xp.eye(k, dtype=h.dtype)
    h = h + (damp * xp.mean(xp.linalg.diagonal(h))) * eye
    m = xp.linalg.cholesky(xp.flip(h))
    if is_jax(xp):
        # Named fast path: a triangular solve (half the time of linalg.inv at k = 1536).
        from jax.scipy.linalg import solve_triangular

        m_inv = solve_triangular(m, eye, lower=True)
    else:
        m_inv = xp.linalg.inv(m)
    return xp.triu(xp.flip(m_inv))


# --------------------------------------------------------------------------- parameters


def slab_params(slab, wts, p: Plan, sdt, cdt, xp):
    """Scale and zero point for the columns ``slab`` (``(rows, n)``) as one group.

    Per row (``(rows, 1)``) or, when ``p.per_row`` is False and the slab is the
    whole weight, per tensor (``(1, 1)``). Min/max: the library's formulas on
    the slab's range. Search: candidates ``[f * min, f * max]`` for the shrink
    factors ``f`` (min/max first), and for asymmetric the zero point moved by
    up to ``radius`` codes; the one with the smallest error
    ``sum_c wts_c (x_rc - x_hat_rc)^2`` wins (ties keep the earlier one).
    The zero point is an integer-valued ``cdt`` array (``None`` when symmetric).
    """
    qt, sym = p.qt, p.symmetric
    e_w = xp.broadcast_to(wts[None, :], slab.shape)
    if not p.per_row:
        n = slab.shape[0] * slab.shape[1]
        slab, e_w = xp.reshape(slab, (1, n)), xp.reshape(e_w, (1, n))
    rmin = xp.min(slab, axis=1, keepdims=True)
    rmax = xp.max(slab, axis=1, keepdims=True)
    if not p.search:
        return params_from_range(rmin, rmax, qt, sym, sdt, cdt, xp)
    grid, min_shrink, radius = p.search
    radius = 0 if sym else radius
    moves = [0] + [d for r in range(1, radius + 1) for d in (-r, r)]
    factors = xp.asarray(shrink_factors(grid, min_shrink), dtype=cdt)

    def error(s, z):
        codes = xp.astype(quantize_view(slab, s, z, qt, cdt, xp), cdt)
        e = slab - dequantize_view(codes, s, z, cdt, xp)
        return block_sum(e * e * e_w, xp)

    def candidates(f):
        s, z0 = params_from_range(rmin * f, rmax * f, qt, sym, sdt, cdt, xp)
        for d in moves:
            z = None if z0 is None else (
                z0 if d == 0 else clip(z0 + float(d), float(qt.qmin), float(qt.qmax), xp))
            yield error(s, z), s, z

    def pick(best, cand):
        better = cand[0] < best[0]
        return tuple(None if b is None else xp.where(better, c, b) for b, c in zip(best, cand))

    # The first candidate (min/max) beats the infinite error, and each later one must
    # be strictly better: ties keep the earlier candidate, so min/max wins them.
    inf = xp.full(rmin.shape, float("inf"), dtype=cdt)
    best = (inf, xp.astype(xp.ones_like(rmin), sdt), None if sym else xp.zeros_like(rmin))

    def body(best, i):
        for cand in candidates(take_slice(factors, i, 1, 0)):
            best = pick(best, cand)
        return best, None

    best, _ = scan(body, best, grid, xp)
    return best[1], best[2]


# --------------------------------------------------------------------------- the loop


def run_columns(w, u, wts, fixed, p: Plan, sdt, cdt, xp):
    """GPTQ over the columns of ``w`` (``(rows, padded)``, padded columns zero).

    ``u``: ``(padded, padded)`` upper Cholesky factor of the damped inverse
    Hessian (identity on padded columns); ``wts``: ``(padded,)`` column weights
    of the parameter search; ``fixed``: ``(scale, zero)`` used for every column
    when ``p.group`` is None. Returns ``(codes, scales, zeros)``: codes
    ``(rows, padded)`` in the storage dtype; per group ``(rows, groups)``
    scale (``sdt``) and integer-valued zero point (``cdt``; ``None`` when
    symmetric), or ``fixed`` as given.
    """
    rows, padded, blk, g = p.rows, p.padded, p.block, p.group
    qt = p.qt
    col_ids = xp.arange(padded, dtype=xp.int32)

    def params_of(slab, start):
        s, z = slab_params(slab, take_slice(wts, start, slab.shape[1], 0), p, sdt, cdt, xp)
        return (s, z), (s[:, 0], None if z is None else z[:, 0])

    def columns(w1, u1, j0, n, prm):
        s, z = prm

        def step(w1, c):
            j = j0 + c
            x = take_slice(w1, j, 1, 1)                     # (rows, 1)
            hrow = take_slice(u1, j, 1, 0)                  # (1, blk)
            codes = quantize_view(x, s, z, qt, cdt, xp)
            q = dequantize_view(xp.astype(codes, cdt), s, z, cdt, xp)
            err = (x - q) / take_slice(hrow, j, 1, 1)
            # Columns before j get 0 (U is upper triangular); column j itself gets
            # x - q and is never read again.
            return w1 - err * hrow, (codes[:, 0], err[:, 0])

        return scan(step, w1, n, xp)

    def block(w, i1, prm):
        w1 = take_slice(w, i1, blk, 1)
        u1 = take_slice(take_slice(u, i1, blk, 0), i1, blk, 1)
        if g is not None and g < blk:
            def segment(w1, si):
                j0 = si * g
                prm_s, out = params_of(take_slice(w1, j0, g, 1), i1 + j0)
                w1, ys = columns(w1, u1, j0, g, prm_s)
                return w1, (ys, out)

            w1, ((codes, errs), out) = scan(segment, w1, blk // g, xp)
            out = tuple(None if o is None else xp.reshape(o, (-1, o.shape[-1])) for o in out)
        else:
            w1, (codes, errs) = columns(w1, u1, 0, blk, prm)
            out = None
        codes = xp.reshape(codes, (blk, rows))
        errs = xp.permute_dims(xp.reshape(errs, (blk, rows)), (1, 0))
        # The lazy batch update of every later column, one matmul per block.
        urows = take_slice(u, i1, blk, 0)
        urows = xp.where(col_ids[None, :] >= i1 + blk, urows, xp.zeros_like(urows))
        return w - xp.matmul(errs, urows), (codes, out)

    def unit(w, ui):
        u0 = ui * p.unit
        prm, out = fixed, None
        if g is not None and g >= blk:
            prm, out = params_of(take_slice(w, u0, g, 1), u0)
        w, (codes, out_b) = scan(lambda w, bi: block(w, u0 + bi * blk, prm), w,
                                 p.unit // blk, xp)
        if out is None and out_b is not None:
            out = tuple(None if o is None else xp.reshape(o, (-1, o.shape[-1])) for o in out_b)
        elif out is not None:
            out = tuple(None if o is None else o[None, :] for o in out)
        return w, (xp.reshape(codes, (p.unit, rows)), out)

    _, (codes, out) = scan(unit, w, padded // p.unit, xp)
    codes = xp.permute_dims(xp.reshape(codes, (padded, rows)), (1, 0))
    if g is None:
        return codes, fixed[0], fixed[1]
    groups = -(-p.cols // g)
    s, z = (None if o is None else xp.permute_dims(xp.reshape(o, (-1, o.shape[-1])),
                                                   (1, 0))[:, :groups] for o in out)
    return codes, s, z
