"""NumPy fast path of the searching calibration methods, bit-identical to the generic path.

The generic :class:`~arrayquant.affine.search.MSESearch` and
:class:`~arrayquant.affine.search.HQQ` score every candidate with a full
quantize / dequantize over the whole weight, a dozen full-size temporaries per
candidate. Here the blocks are laid out *blocks first*, ``(n, R)`` for ``R``
blocks of ``n`` values, so that :func:`~arrayquant.affine.calibrate.block_sum`'s
pairwise halving adds contiguous rows, and processed a slab of blocks at a time
(2**17 values, in cache) with every candidate scored on the slab before the
next one is read. The arithmetic is the generic path's, element by element, with
three exact rewrites:

- ``x * (1 / s)`` and its rounding are shared by the candidates that share a scale
  (MSESearch's zero-point moves; HQQ's min/max scale in every iteration).
- The dequantized value ``clip(s * (clip(q + z, lo, hi) - z), -big, big)`` equals
  ``clip(s * q, A, B)`` with ``A = clip(s * (lo - z), -big, big)`` and ``B`` likewise
  (per block): ``q + z`` and ``q - z`` are exact for the integers in question (and a
  ``q`` beyond them clips either way), and rounding ``s * v`` and clipping are
  monotone in ``v`` (``s > 0``), so they commute with the clip. Only the sign of a
  zero may differ, and the error is squared.
- HQQ's shrinkage ``W_e`` is zero wherever ``|e| <= B (1 - 1e-3)`` with
  ``B = beta^(-1 / (2 - p))``, where exactly ``|e|^(p - 1) / beta >= |e| (1 + 1e-3)``,
  far beyond float rounding of ``pow``; there ``(x - W_e) / s`` is ``x * (1 / s)``
  itself, and ``pow`` runs only on the other elements (the same ufunc, element by
  element).

The per-block steps (parameters, the scale refit's division and rounding up)
are the generic functions themselves. Tests compare this path with the generic
one bit for bit (tests/test_search_numpy.py).
"""

from __future__ import annotations

import numpy as np

from arrayquant._backend import finfo_limits
from arrayquant.affine.params import clip, clip_range

__all__ = ["hqq_numpy", "sse_numpy"]

# Values per slab: a slab and its scratch arrays (about 3 MiB in float32) stay in the
# last-level cache. Measured on MiniLM's weights (2-core EPYC, 32 MiB L3): slabs of
# 2**13 values were twice as slow (per-call overhead), 2**15 to 2**20 about the same.
_SLAB = 1 << 17
# HQQ: skip pow where |e| <= (1 - _MARGIN) * beta^(-1 / (2 - p)) (see the docstring).
_MARGIN = 1e-3


def _blocks_first(xf):
    """``xf`` of shape ``(*kept, n)`` as a contiguous ``(n, R)`` array, and ``R``."""
    n = xf.shape[-1]
    xt = np.ascontiguousarray(np.asarray(xf).reshape(-1, n).T)
    return xt, xt.shape[1]


def _rows(a, r: int):
    """A per-block array of shape ``(*kept, 1)`` as one row ``(1, R)``."""
    return np.asarray(a).reshape(1, r)


def _slabs(n: int, r: int):
    c = max(1, _SLAB // max(n, 1))
    return [slice(c0, min(r, c0 + c)) for c0 in range(0, r, c)]


def tree_sum(t):
    """``block_sum`` over axis 0 of ``t`` (``(n, C)``), in place; returns the row ``t[:1]``.

    Row ``i`` and row ``i + m / 2`` are added, ``m`` halving from the power of two
    at or above ``n``; rows without a partner add the padding's zero, as
    ``block_sum`` does.
    """
    n = t.shape[0]
    m = 1 << max(0, (n - 1).bit_length())
    if m != n:
        h = m // 2
        np.add(t[: n - h], t[h:n], out=t[: n - h])
        np.add(t[n - h : h], 0.0, out=t[n - h : h])
        m = h
    while m > 1:
        m //= 2
        np.add(t[:m], t[m : 2 * m], out=t[:m])
    return t[:1]


def _bounds(s_c, z, lo: float, hi: float, big: float, tame: bool):
    """``(A, B)``: the dequantized values of codes ``lo`` and ``hi``, saturated."""
    if z is None:
        a, b = s_c * lo, s_c * hi
    else:
        a, b = (lo - z) * s_c, (hi - z) * s_c
    if tame:  # both finite: the saturation is a no-op
        return a, b
    return np.clip(a, -big, big), np.clip(b, -big, big)


def _tame(xmax: float, s_c, span: float, big: float) -> bool:
    """True when no ``x - x_hat`` overflows when squared (nor ``x_hat`` itself).

    ``|x_hat| <= span * s`` (``span = hi - lo``: a zero point lies in range), so then
    every saturation (the dequantized values', block_sum's) is a no-op.
    """
    return (xmax + span * float(np.max(s_c))) ** 2 * (1 + 1e-6) < big


def _slab_sse(x, sq, a, b, t, tame: bool, big: float):
    """Each block's squared error of the candidate ``clip(sq, a, b)``, as a row."""
    np.maximum(sq, a, out=t)
    np.minimum(t, b, out=t)
    np.subtract(x, t, out=t)
    np.multiply(t, t, out=t)
    if not tame:
        np.minimum(t, big, out=t)
    return tree_sum(t)


def sse_numpy(xf, groups, qt, cdt):
    """``block_sse`` of every candidate: ``groups`` is ``[(s, [z, ...]), ...]``.

    ``s`` is the stored scale and each ``z`` a zero point (or None, symmetric), all
    of shape ``(*kept, 1)``; returns the errors in the order of the candidates.
    """
    xt, r = _blocks_first(xf)
    n = xt.shape[0]
    big = finfo_limits(cdt)[1]
    xmax = float(np.max(np.abs(xt))) if xt.size else 0.0
    prepared = []
    with np.errstate(over="ignore", invalid="ignore"):
        for s, zs in groups:
            s_c = _rows(s, r).astype(cdt)
            cands = []
            for z in zs:
                lo, hi = clip_range(qt, z is None)
                tame = _tame(xmax, s_c, hi - lo, big)
                z = None if z is None else _rows(z, r).astype(cdt)
                cands.append((*_bounds(s_c, z, lo, hi, big, tame), tame))
            prepared.append((s_c, 1.0 / s_c, cands))
        errs = [np.empty((1, r), dtype=cdt) for _, zs in groups for _ in zs]
        for sl in _slabs(n, r):
            x = np.ascontiguousarray(xt[:, sl])
            sq, t = np.empty_like(x), np.empty_like(x)
            k = 0
            for s_c, inv, cands in prepared:
                np.multiply(x, inv[:, sl], out=sq)
                np.rint(sq, out=sq)
                np.multiply(sq, s_c[:, sl], out=sq)
                for a, b, tame in cands:
                    errs[k][:, sl] = _slab_sse(x, sq, a[:, sl], b[:, sl], t, tame, big)
                    k += 1
    shape = tuple(xf.shape[:-1]) + (1,)
    return [e.reshape(shape) for e in errs]


def _codes(xi, z, lo: float, hi: float, out):
    """HQQ's codes ``clip(round(x / s + z), lo, hi)`` from ``xi = x * (1 / s)``.

    ``np.clip`` may keep a ``-0.0`` that ``maximum`` would turn into ``0.0``; only
    the sign of a zero differs, and no result of the search depends on it.
    """
    np.add(xi, z, out=out)
    np.rint(out, out=out)
    return np.clip(out, lo, hi, out=out)


def _no_shrink_below(beta: float, p: float) -> float:
    """A bound under which HQQ's shrinkage of ``|e|`` is surely zero (-1: none known)."""
    if not 1e-30 < 1.0 / beta < 1e30:
        return -1.0
    return (1.0 - _MARGIN) * beta ** (-1.0 / (2.0 - p))


def _hqq_zero_point(x, xi, wq, s_c, inv, z, beta: float, p: float, t1, t2, big: float, xp):
    """:func:`~arrayquant.affine.search.hqq_step` on a slab (``wq``: the codes for ``z``)."""
    np.subtract(wq, z, out=t1)
    np.multiply(t1, s_c, out=t1)
    e = np.subtract(x, t1, out=t1)
    a = np.abs(e, out=t2)
    c = _no_shrink_below(beta, p)
    idx = None if float(np.max(a)) <= c else np.flatnonzero(a > c)  # NaN max: look
    if idx is not None:
        e_s, a_s = e.ravel()[idx], a.ravel()[idx]
    v = np.subtract(wq, xi, out=t1)  # (x - 0) * (1 / s) is xi wherever W_e is 0
    if idx is not None:
        # The generic expressions, on the elements where W_e may be nonzero.
        safe = xp.where(a_s > 0, a_s, xp.ones_like(a_s))
        thresh = (1.0 / beta) if p == 1 else xp.pow(safe, p - 1.0) * (1.0 / beta)
        we = xp.where(a_s > thresh, xp.sign(e_s) * (a_s - thresh), xp.zeros_like(e_s))
        v.ravel()[idx] = wq.ravel()[idx] - (x.ravel()[idx] - we) * inv[0, idx % x.shape[1]]
    np.clip(v, -big, big, out=v)
    return tree_sum(v) * (1.0 / x.shape[0])


def hqq_numpy(xf, s, z0, method, qt, sdt, cdt, xp):
    """:class:`~arrayquant.affine.search.HQQ`'s search from ``(s, z0)``: ``(scale, z)``."""
    xt, r = _blocks_first(xf)
    s_rows, z_rows = _rows(s, r), _rows(z0, r).astype(cdt)
    out_s, out_z = np.empty_like(s_rows), np.empty_like(z_rows)
    xmax = float(np.max(np.abs(xt))) if xt.size else 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        for sl in _slabs(xt.shape[0], r):
            x = np.ascontiguousarray(xt[:, sl])
            out_s[:, sl], out_z[:, sl] = _hqq_slab(x, s_rows[:, sl], z_rows[:, sl], xmax,
                                                   method, qt, sdt, cdt, xp)
    shape = tuple(xf.shape[:-1]) + (1,)
    return out_s.reshape(shape), out_z.reshape(shape)


def _hqq_slab(x, s0, z, xmax: float, method, qt, sdt, cdt, xp):
    """HQQ on the blocks of one slab ``x`` (``(n, C)``): the best scale and zero point rows."""
    from arrayquant.affine.search import scale_from_sums

    big = finfo_limits(cdt)[1]
    lo, hi = float(qt.qmin), float(qt.qmax)
    p = float(method.lp_norm)
    xi, sq0, wq, t1, t2 = (np.empty_like(x) for _ in range(5))
    s_c = s0.astype(cdt)
    inv = 1.0 / s_c
    np.multiply(x, inv, out=xi)
    np.multiply(np.rint(xi, out=sq0), s_c, out=sq0)  # the candidates with s0 share it

    def sse(sq, sc_c, zi):
        tame = _tame(xmax, sc_c, hi - lo, big)
        return _slab_sse(x, sq, *_bounds(sc_c, zi, lo, hi, big, tame), t1, tame, big).copy()

    num_tame = xmax * (hi - lo) * (1 + 1e-6) < big  # |W_q - zi| <= hi - lo
    best_err, best_s, best_z = sse(sq0, s_c, z), s0, z
    _codes(xi, z, lo, hi, wq)
    for beta in method.betas():
        z = _hqq_zero_point(x, xi, wq, s_c, inv, z, beta, p, t1, t2, big, xp)
        zi = clip(xp.round(z), lo, hi, xp)
        _codes(xi, z, lo, hi, wq)  # also the next iteration's codes
        w2 = np.subtract(wq, zi, out=t2)
        np.multiply(x, w2, out=t1)
        if not num_tame:
            np.clip(t1, -big, big, out=t1)
        num = tree_sum(t1).copy()
        den = tree_sum(np.multiply(w2, w2, out=t2))  # |w2| <= hi - lo: no overflow
        s2 = scale_from_sums(num, den, s_c, sdt, cdt, xp)
        s2_c = s2.astype(cdt)
        np.multiply(x, 1.0 / s2_c, out=t2)
        np.multiply(np.rint(t2, out=t2), s2_c, out=t2)
        for sc, sc_c, sq in ((s0, s_c, sq0), (s2, s2_c, t2)):
            err = sse(sq, sc_c, zi)
            better = err < best_err
            best_err = xp.where(better, err, best_err)
            best_s = xp.where(better, sc, best_s)
            best_z = xp.where(better, zi, best_z)
    return best_s, best_z
