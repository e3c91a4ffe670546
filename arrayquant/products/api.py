"""The public products: :func:`linear` (``x @ w.T``) and :func:`matmul` (``x @ w``).

Checks the arguments, quantizes the activations when asked, and hands a quantized
weight to :mod:`arrayquant.products.weight_only` or :mod:`arrayquant.products.integer`,
which pick the formulation from :data:`arrayquant.products.plan.TABLE`.
"""

from __future__ import annotations

import math
from dataclasses import replace

from arrayquant._backend import compute_dtype
from arrayquant._backend import namespace as _namespace
from arrayquant.affine import dequantize
from arrayquant.linear_weight import LinearWeight, transform_input
from arrayquant.products.activations import act_rows, quantize_activations, static_act_rows
from arrayquant.products.arrays import check_float, out_dtype
from arrayquant.products.integer import integer_product
from arrayquant.products.plan import FORMULATIONS, INTEGER, INTEGER_KIND, TABLE, weight_plan
from arrayquant.products.weight_only import weight_only
from arrayquant.qarray import QArray, check_fits, check_integer_codes
from arrayquant.qtypes import as_qtype

__all__ = ["linear", "matmul"]


def _product(x, w, bias, act_dtype, act_symmetric, formulation, kn: bool):
    lw = None
    if isinstance(w, LinearWeight):
        lw, w = w, w.qweight
        if lw.in_axis != (0 if kn else 1):
            raise ValueError(
                f"w is a LinearWeight with in_axis={lw.in_axis} ("
                + ("(out, in)" if lw.in_axis == 1 else "(in, out)") + " layout); "
                + ("matmul takes (in, out) weights (in_axis=0): use linear"
                   if kn else "linear takes (out, in) weights (in_axis=1): use matmul"))
        if isinstance(x, QArray):
            raise ValueError("x is quantized, but w is a LinearWeight, whose in_scale / perm "
                             "apply to float activations: pass a float x")
    x_is_q = isinstance(x, QArray)
    w_is_q = isinstance(w, QArray)
    if not x_is_q:
        check_float(x, "x")
    if not w_is_q:
        check_float(w, "w")
    if bias is not None:
        check_float(bias, "bias")
    xp = _namespace(
        *((x.data, x.scale, x.zero_point) if x_is_q else (x,)),
        *((w.data, w.scale, w.zero_point) if w_is_q else (w,)),
        bias,
    )
    for name, q in (("x", x), ("w", w)):
        if isinstance(q, QArray):
            check_integer_codes(q, name)
            check_fits(q)
        if isinstance(q, QArray) and q.batch_shape:
            raise ValueError(
                f"{name} is a stacked QArray (batch_shape {q.batch_shape}, items of shape "
                f"{q.shape}); a product takes one item: index it ({name}[i]) or run "
                "jax.lax.scan over the stack"
            )
    x_shape = tuple(x.shape)
    w_shape = tuple(w.shape)
    layout = "(in, out)" if kn else "(out, in)"
    if len(w_shape) != 2:
        raise ValueError(f"w must be 2-D {layout}; got shape {w_shape}")
    k, n = w_shape if kn else w_shape[::-1]
    if len(x_shape) == 0:
        raise ValueError("x must have at least 1 dimension (features along the last); got 0-d")
    if x_shape[-1] != k:
        raise ValueError(
            f"x has {x_shape[-1]} features along its last axis, but w of shape {w_shape} "
            f"{layout} expects {k}"
        )
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},) (out features); got {tuple(bias.shape)}")
    if act_dtype is not None and x_is_q:
        raise ValueError(
            f"x is already quantized ({x.qtype}); pass act_dtype=None to use its codes, or a "
            "float x to quantize it per token"
        )
    if not isinstance(act_symmetric, bool):
        raise TypeError(f"act_symmetric must be True or False; got {act_symmetric!r}")
    if formulation not in FORMULATIONS:
        raise ValueError(f"unknown formulation {formulation!r}; expected one of {FORMULATIONS}")
    lead = x_shape[:-1]
    m = math.prod(lead)
    act = None
    x_dtype = x.dtype  # the output's, also when in_scale is applied in float32
    if lw is not None:
        x = transform_input(x, lw, xp)
        if act_dtype is None and lw.act_qtype is not None:
            act = static_act_rows(xp.reshape(x, (m, k)), lw, xp)
            x_is_q = True
    if act_dtype is not None:
        act_qt = as_qtype(act_dtype)
        if m:
            x = quantize_activations(x, act_qt, act_symmetric)
        else:
            # quantize rejects empty arrays: quantize one zero row instead (the same
            # checks and dtypes) and keep none of its rows.
            one = act_rows(quantize_activations(xp.zeros((1, k), dtype=x.dtype), act_qt,
                                                 act_symmetric), k, xp)
            act = replace(one, codes=one.codes[:0, ...], scale=one.scale[:0, ...],
                          zero_point=None if one.zero_point is None else one.zero_point[:0, ...])
        x_is_q = True
    odt = out_dtype(xp, x_dtype, w.dtype)  # a QArray's dtype is its original one

    if not w_is_q:
        xf = dequantize(x) if isinstance(x, QArray) else x  # an empty x stays as it is
        xf = xp.astype(xf, odt, copy=False)
        wf = xp.astype(w, odt, copy=False)
        y = xp.matmul(xf, wf if kn else xp.permute_dims(wf, (1, 0)))
    else:
        wp = weight_plan(w, kn)
        cdt = compute_dtype(xp, odt)
        if formulation != "auto" and x_is_q != (TABLE[formulation].kind == INTEGER_KIND):
            raise ValueError(
                f"formulation={formulation!r} is "
                + ("an integer formulation: it needs act_dtype (e.g. 'int8') or a quantized x"
                   if not x_is_q else
                   "a weight-only formulation, but x is quantized: use one of " + str(INTEGER))
            )
        if x_is_q:
            act = act_rows(x, k, xp) if act is None else act
            y2 = integer_product(act, w, wp, cdt, xp, formulation)
        else:
            y2 = weight_only(xp.reshape(xp.astype(x, cdt, copy=False), (m, k)), w, wp, cdt, xp,
                              formulation)
        y = xp.reshape(xp.astype(y2, odt), (*lead, n))
    if bias is not None:
        y = y + bias
    return y


def linear(x, w, bias=None, *, act_dtype=None, act_symmetric: bool = True,
           formulation: str = "auto"):
    """``y = x @ w.T + bias`` for a weight in (out, in) layout, float or quantized.

    - ``w`` a float array: the plain product, in the inputs' dtype.
    - ``w`` a :class:`QArray`, ``act_dtype=None``: weight-only quantization;
      the result equals ``x @ dequantize(w).T + bias`` computed in float32
      (float64 for float64 inputs), for any granularity of ``w``.
    - ``act_dtype="int8"`` (W8A8): ``x`` is quantized per token by
      :func:`quantize_activations` (symmetric unless ``act_symmetric=False``)
      and the codes are multiplied and summed exactly in int32:
      ``y[m, n] = s_x[m] * sum_g s_w[n, g] * sum_{k in g} (qx - zx)(qw - zw)``.
      ``w`` must then be quantized per tensor, per output channel (``axis=0``)
      or in groups along the in axis (``group_size=g``), with at most 8 bits.
      With a float ``w``, ``x`` is quantized and dequantized before a float
      product (simulated activation quantization).
    - ``x`` a QArray with one scale per row: its codes are used as they are.
    - ``w`` a :class:`~arrayquant.LinearWeight` (AWQ, SmoothQuant, GPTQ with
      act-order): ``x``'s features are gathered by its ``perm`` and multiplied
      by its ``in_scale`` first; with static activation parameters and
      ``act_dtype=None``, that ``x`` is quantized with them (one scale for the
      tensor) and the integer product runs; an explicit ``act_dtype`` uses
      dynamic per-token scales instead.

    To make a model use W8A8 everywhere: ``functools.partial(aq.linear,
    act_dtype="int8")``.

    Args:
        x: float array ``(..., in)`` or a QArray with one scale per row.
        w: float array or QArray ``(out, in)``; sub-byte codes packed along ``in``
            (as :func:`arrayquant.quantize` stores them) are used in place.
        bias: ``None`` or a float array ``(out,)``.
        act_dtype: ``None`` (no activation quantization) or an integer qtype of at
            most 8 bits, e.g. ``"int8"``.
        act_symmetric: symmetric per-token codes (default) or asymmetric ones.
        formulation: ``"auto"`` (default: picked from the namespace, the number of
            rows, the bit width and the granularity, all static) or one of
            :data:`FORMULATIONS` to pin one; one that does not apply raises a
            ValueError saying why. Every formulation gives the same result
            (integer sums exactly, float sums up to rounding); see
            ``docs/inference.md``. Ignored for a float ``w``. The names, from
            the table in ``arrayquant/products/plan.py`` (a test checks this list):

            Weight-only:

            - ``"dequantize"``: generic: ``x @ dequantize(w).T``
            - ``"epilogue"``: ``(x @ codes.T) * s - rowsum(x) * (s z)``; scale constant along in
            - ``"grouped"``: one batched contraction over the groups along in
            - ``"fields"``: contracts the bit fields of packed bytes, never interleaving the codes
            - ``"slabs"``: dequantizes 1 MiB slabs of output rows, each multiplied while in cache
            - ``"gemv"``: one row: a reduction per group over its stored bytes

            Integer:

            - ``"int32"``: generic: ``(qx - zx) @ (qw - zw).T`` as an int32 matmul
            - ``"float-exact"``: the same sums in float32 (or float64) where they are exact: BLAS
            - ``"int-gemv"``: one row: exact float32 reductions per unit, added in int32
            - ``"jax-dot"``: ``lax.dot_general`` on int8 operands into int32 (int8 tensor cores)

    Returns:
        ``(..., out)`` array of dtype ``result_type(x.dtype, w.dtype)`` (the
        QArrays' original dtypes), promoted with ``bias``.

    Raises:
        TypeError: non-float ``x``, ``w`` or ``bias``.
        ValueError: ``w`` not 2-D; ``x.shape[-1] != in``; ``bias`` not ``(out,)``;
            for integer products a weight quantized per input channel, 16-bit
            codes, or ``in_features * M_x * M_w > 2**31 - 1`` (see
            :func:`int32_safe_in_features`), decided from shapes and bit widths;
            an unknown ``formulation``, or one that does not apply (e.g.
            ``"epilogue"`` on a weight with groups along in, ``"jax-dot"`` on
            NumPy arrays, an integer formulation without ``act_dtype``).

    Example:
        >>> import numpy as np, arrayquant as aq
        >>> rng = np.random.default_rng(0)
        >>> x = rng.standard_normal((3, 64)).astype(np.float32)
        >>> w = rng.standard_normal((16, 64)).astype(np.float32)
        >>> qw = aq.quantize(w, "int8", symmetric=True, axis=0)
        >>> y = aq.linear(x, qw, act_dtype="int8")
        >>> y.shape, y.dtype, bool(np.allclose(y, x @ w.T, atol=0.3))
        ((3, 16), dtype('float32'), True)
    """
    return _product(x, w, bias, act_dtype, act_symmetric, formulation, kn=False)


def matmul(x, w, *, act_dtype=None, act_symmetric: bool = True, formulation: str = "auto"):
    """``y = x @ w`` for a weight in (in, out) layout, float or quantized.

    The same products, arguments and errors as :func:`linear` (see there) with
    the weight transposed, as in JAX/Flax kernels: quantize ``w`` per output
    channel with ``axis=1``, in groups along the in axis with ``group_size=g,
    group_axis=0``. :func:`arrayquant.quantize` packs sub-byte codes along the
    last axis, here the out axis: the ``"fields"`` formulation splits the bytes
    into bit fields that give the even and odd output columns, interleaved once
    at the end.

    Example:
        >>> import numpy as np, arrayquant as aq
        >>> x = np.ones((2, 8), np.float32)
        >>> w = aq.quantize(np.eye(8, 4, dtype=np.float32), "int8", symmetric=True, axis=1)
        >>> aq.matmul(x, w).tolist()
        [[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]
    """
    return _product(x, w, None, act_dtype, act_symmetric, formulation, kn=True)
