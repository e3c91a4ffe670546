"""NumPy fast path for computing scales and codes, bit-identical to the generic path.

NumPy evaluates one operation at a time over the whole array, so the generic
pipeline (min, max, divide, round, add, clip, cast) makes about seven passes
over memory and allocates a full-size temporary for most of them. Here the
split view is processed in cache-sized slabs (a few MiB) along its first axis, reusing
one scratch buffer: each slab is read from memory once and every later step
runs in cache. The arithmetic is the same operations in the same order on the
same dtypes, so results equal the generic path bit for bit (tests check it).
"""

from __future__ import annotations

import numpy as np

from arrayquant.affine.checks import NONFINITE_MESSAGE
from arrayquant.blocking import Blocking

__all__ = ["qparams_and_codes"]

# 2 MiB: slab plus scratch stay in the last-level cache. Measured on a 2-core EPYC
# (1 MiB L2 per core, 32 MiB L3): 128 KiB to 2 MiB slabs got steadily faster (per-slab
# Python overhead), 16 MiB slower again (out of cache); see docs/benchmarks.md.
_SLAB_BYTES = 1 << 21


def _finite_or_raise(*arrays) -> None:
    for a in arrays:
        if not np.isfinite(a).all():
            raise ValueError(NONFINITE_MESSAGE.format(what="x"))


def _view(x: np.ndarray, b: Blocking) -> np.ndarray:
    if b.needs_padding:
        x = np.pad(x, [(0, p) for p in b.padding])
    return x.reshape(b.view_shape)


def qparams_and_codes(x, qt, symmetric, b: Blocking, sdt, want_codes, params):
    """Scales, zero points and codes; ``params(rmin, rmax)`` -> (s, z float, z stored).

    ``params`` is the generic path's own function (clipping, rounding the scale
    up to ``sdt``, the eager check against the scale cap), called per slab.
    """
    cdt = np.float64 if x.dtype == np.float64 else np.float32
    v = _view(np.asarray(x), b)
    if v.ndim == 0:
        v = v.reshape(1)
    red = b.reduce_axes or ()
    lo_q, hi_q = (max(qt.qmin, -qt.qmax), qt.qmax) if symmetric else (qt.qmin, qt.qmax)
    storage = np.dtype(qt.storage)
    row = int(np.prod(v.shape[1:], dtype=np.int64)) * np.dtype(cdt).itemsize
    rows = max(1, _SLAB_BYTES // max(row, 1))
    n0 = v.shape[0]
    codes = np.empty(v.shape, dtype=storage) if want_codes else None
    scratch = np.empty((min(rows, n0), *v.shape[1:]), dtype=cdt) if want_codes else None
    s_all = np.empty(b.scale_view_shape or (1,), dtype=sdt)
    z_all = None if symmetric else np.empty(s_all.shape, dtype=storage)

    def slab(i):
        xs = v[i : i + rows]
        if xs.dtype != cdt:
            xs = xs.astype(cdt)
        return xs

    def quantize_slab(i, xs, s, z):
        tmp = scratch[: xs.shape[0]]
        np.multiply(xs, 1.0 / s.astype(cdt), out=tmp)
        np.rint(tmp, out=tmp)
        if z is not None:
            np.add(tmp, z.astype(cdt), out=tmp)
        np.clip(tmp, lo_q, hi_q, out=tmp)
        codes[i : i + rows] = tmp

    def whole_array_error(e: ValueError):
        """A slab's error, worded for the whole array (the largest scale any block needs)."""
        rmin = (v.min(axis=red, keepdims=True) if red else v).astype(cdt)
        rmax = (v.max(axis=red, keepdims=True) if red else v).astype(cdt)
        try:
            params(rmin, rmax)
        except ValueError as whole:
            return whole
        return e

    if 0 not in red:
        # Blocks never cross the first axis: each slab holds whole blocks.
        for i in range(0, n0, rows):
            xs = slab(i)
            rmin = xs.min(axis=red, keepdims=True) if red else xs
            rmax = xs.max(axis=red, keepdims=True) if red else xs
            _finite_or_raise(rmin, rmax)
            try:
                s, z, z_int = params(rmin, rmax)
            except ValueError as e:
                raise whole_array_error(e) from None
            s_all[i : i + rows] = s
            if z is not None:
                z_all[i : i + rows] = z_int
            if want_codes:
                quantize_slab(i, xs, s, z)
    else:
        # Blocks span the first axis: ranges first (reductions make no temporaries),
        # then quantize slab by slab.
        rmin = v.min(axis=red, keepdims=True)
        rmax = v.max(axis=red, keepdims=True)
        _finite_or_raise(rmin, rmax)
        s, z, z_int = params(rmin.astype(cdt), rmax.astype(cdt))
        s_all[...] = s
        if z is not None:
            z_all[...] = z_int
        if want_codes:
            for i in range(0, n0, rows):
                quantize_slab(i, slab(i), s, z)
    out_codes = None
    if want_codes:
        out_codes = codes.reshape(b.padded_shape)
        if b.needs_padding:
            out_codes = out_codes[tuple(slice(0, n) for n in b.shape)]
        out_codes = out_codes.reshape(b.shape)
    s_out = s_all.reshape(b.scale_shape)
    z_out = None if z_all is None else z_all.reshape(b.scale_shape)
    return s_out, z_out, out_codes
