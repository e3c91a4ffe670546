"""Linear (affine) quantization: scales and zero points, quantize, dequantize.

The semantics, in one place:

- Asymmetric: the range is first extended to hold zero,
  ``r_min = min(min(x), 0)`` and ``r_max = max(max(x), 0)``, so that 0.0 is
  always exactly representable. Then ``s = (r_max / 2 - r_min / 2) * (2 /
  (q_max - q_min))`` with the constant rounded to the compute dtype: the
  lesson's ``(r_max - r_min) / (q_max - q_min)``, written so that it cannot
  overflow for huge inputs and so that NumPy and XLA (which turns a division
  by a constant into a multiplication by its reciprocal, and may fuse
  multiply-adds) compute the same bits. Then
  ``z = clip(round(q_min - r_min / s), q_min, q_max)``, stored as an integer.
- Symmetric: ``s = max|x| * (1 / q_max)``, no zero point, codes restricted to
  ``[-q_max, q_max]`` so that quantization is odd-symmetric.
- Every scale is clipped to ``scale_limits(scale dtype, x's dtype)`` =
  ``[max(smallest normal of the scale dtype, 4 * smallest normal of the
  compute dtype), min(largest finite, 1 / smallest normal)]``, so constant or
  all-zero blocks get a finite, non-zero scale. A block that needs a scale
  above the cap raises ``ValueError`` eagerly (under ``jax.jit`` it
  saturates). Range ends smaller than twice the compute dtype's smallest
  normal (2.4e-38 in float32) count as zero: XLA flushes subnormals, and doing
  it explicitly keeps every backend identical.
- The scale is stored in the scale dtype rounded *up* (the smallest
  representable value >= the computed one), so that a narrow scale dtype
  (float16, bfloat16) still covers the block's range. Codes are computed from
  the *stored* scale.
- Quantize: ``q = clip(round(x * (1 / s)) + z, q_min, q_max)`` then cast,
  where ``round`` is round-half-to-even. The reciprocal is taken once per
  block: XLA rewrites ``x / s`` with a broadcast ``s`` into exactly this, so
  writing it out keeps NumPy and JAX bit-identical (it can differ from
  ``round(x / s)`` by one code when ``x / s`` lies within an ulp of a half).
- Dequantize: ``x_hat = s * (q - z)``, computed in the compute dtype and
  saturated to the output dtype's finite range ``[-max, max]`` before the
  cast (ONNX's DequantizeLinear would give +-inf there).
- Error: ``|x - x_hat| <= s / 2 + 4 eps_c (|x| + s (q_max - q_min)) +
  eps_out (|x| + s) / 2 + ulp_min_out / 2`` for every element (see
  docs/semantics.md).
- ``quantize_with`` / ``dequantize_with`` check eagerly that scales are finite
  and within ``scale_limits`` and zero points within the qtype's range; under
  ``jax.jit`` they are used as given and results are unspecified.
- Arithmetic runs in float32 (float64 for float64 input); float16 and
  bfloat16 inputs are upcast first.
"""

from __future__ import annotations

from arrayquant._backend import (
    compute_dtype,
    dtype_name,
    finfo_limits,
    float_dtype,
    is_float_dtype,
    is_numpy,
    namespace,
    scale_limits,
)
from arrayquant.affine.calibrate import DEFAULT_METHOD, MinMax, Percentile
from arrayquant.affine.checks import (
    check_float_input,
    raise_if_bad_qparams,
    raise_if_not_finite,
)
from arrayquant.affine.codes import dequantize_codes, packed_codes, quantize_view
from arrayquant.affine.methods import as_method, calibrate
from arrayquant.affine.params import (
    check_symmetric,
    params_from_range,
    qparams_from_range,
    store_zero_point,
)
from arrayquant.affine.search import HQQ, MSESearch
from arrayquant.blocking import Blocking, from_view, plan, plan_from_scale, to_view
from arrayquant.linear_weight import LinearWeight, weight_from_stored
from arrayquant.qarray import QArray, check_fits, check_integer_codes
from arrayquant.qtypes import QType, as_qtype

__all__ = [
    "qparams", "qparams_from_range", "quantize_with", "dequantize_with", "quantize", "dequantize",
    "MinMax", "Percentile", "MSESearch", "HQQ",
]

# Tests flip this to compare the NumPy fast path with the generic one.
_USE_NUMPY_FAST_PATH = True


def params_and_codes(x, qt, symmetric, b: Blocking, scale_dtype, want_codes, xp,
                       method=DEFAULT_METHOD, packed: bool = False):
    """``(scale, zero_point, codes, codes_are_packed)``; ``packed=True`` asks for codes
    packed along the last axis where that can be done while quantizing."""
    cdt = compute_dtype(xp, x.dtype)
    sdt = float_dtype(xp, scale_dtype)
    if _USE_NUMPY_FAST_PATH and is_numpy(xp) and isinstance(method, MinMax):
        from arrayquant.affine._numpy import qparams_and_codes

        def params(rmin, rmax):
            s, z = params_from_range(rmin, rmax, qt, symmetric, sdt, cdt, xp)
            return s, z, store_zero_point(z, qt, xp)

        return (*qparams_and_codes(x, qt, symmetric, b, sdt, want_codes, params), False)
    xv = to_view(xp.astype(x, cdt), b, xp)
    s, z = calibrate(method, xv, b, qt, symmetric, sdt, cdt, xp)
    codes = packed_codes(xv, s, z, qt, b, cdt, xp) if want_codes and packed else None
    is_packed = codes is not None
    if want_codes and codes is None:
        codes = from_view(quantize_view(xv, s, z, qt, cdt, xp), b, xp)
    s = xp.reshape(s, b.scale_shape)
    z = store_zero_point(z, qt, xp)
    z = None if z is None else xp.reshape(z, b.scale_shape)
    return s, z, codes, is_packed


def resolve(x, dtype, symmetric, axis, group_size, group_axis, batch_axes: int = 0,
             method=None):
    """Namespace, qtype and blocking; with ``batch_axes=k`` the granularity arguments
    refer to one item (the shape after the first ``k`` axes), and the blocking of the
    whole array has blocks of one element along the batch axes."""
    xp = namespace(x)
    check_float_input(x, xp)
    qt = as_qtype(dtype)
    check_symmetric(qt, symmetric)
    method = as_method(method)
    if isinstance(axis, list):
        axis = tuple(axis)
    shape = tuple(x.shape)
    if isinstance(batch_axes, bool) or not isinstance(batch_axes, int) or not (
            0 <= batch_axes <= len(shape)):
        raise ValueError(
            f"batch_axes={batch_axes!r} does not fit x of shape {shape}: expected an int in "
            f"[0, {len(shape)}], the number of leading axes that stack items"
        )
    b = plan(shape[batch_axes:], axis, group_size, group_axis)
    if batch_axes:
        b = Blocking(shape, (1,) * batch_axes + b.block)
    return xp, qt, b, method


# --------------------------------------------------------------------------- public API


def qparams(
    x,
    dtype="int8",
    symmetric: bool = False,
    axis=None,
    group_size: int | None = None,
    group_axis: int = -1,
    *,
    scale_dtype="float32",
    method=DEFAULT_METHOD,
):
    """Scale and zero point that map the range of ``x`` onto the codes of ``dtype``.

    Granularity: ``axis=None, group_size=None`` gives one scale for the whole
    tensor; ``axis=k`` (or a tuple) one scale per index along those axes,
    reducing over the others (``axis=0`` on an (out, in) weight is per output
    channel); ``group_size=g`` one scale per ``g`` consecutive elements along
    ``group_axis`` and per index of every other axis (the last group may be
    partial).

    Asymmetric: ``r_min = min(min(x), 0)``, ``r_max = max(max(x), 0)``,
    ``s = (r_max - r_min) / (q_max - q_min)``,
    ``z = clip(round(q_min - r_min / s), q_min, q_max)``. Symmetric:
    ``s = max|x| / q_max`` and no zero point. Scales are clipped to
    ``[lo, hi]`` (the scale dtype's smallest normal and largest finite value,
    narrowed so that ``1 / s`` stays a normal number of the compute dtype) and
    stored rounded up to the scale dtype; rounding is half to even.

    Args:
        x: floating array (float16, bfloat16, float32, float64).
        dtype: quantized type: ``"int8"``, ``"uint8"``, ``"int16"``, ``"uint16"``,
            ``"int4"``, ``"uint4"``, ``"int2"``, ``"uint2"``, or an integer dtype.
        symmetric: symmetric quantization (signed types only).
        axis: keep one scale per index along this axis (or tuple of axes).
        group_size: one scale per this many consecutive elements along ``group_axis``.
        group_axis: the axis the groups run along (default: the last).
        scale_dtype: dtype of the returned scale (default float32).
        method: the calibration method that chooses each block's range or
            parameters: :class:`~arrayquant.MinMax` (default, the formulas
            above), :class:`~arrayquant.Percentile`,
            :class:`~arrayquant.MSESearch`, :class:`~arrayquant.HQQ`, or one
            of the names ``"minmax"``, ``"percentile"``, ``"mse"``, ``"hqq"``
            for their default settings (see docs/calibration.md).

    Returns:
        ``(scale, zero_point)``, both of the rank of ``x`` with
        ``ceil(n_d / block_d)`` entries along dimension ``d``. ``zero_point``
        has the codes' storage dtype (int8/uint8/int16/uint16), or is ``None``
        when ``symmetric``.

    Raises:
        TypeError: ``x`` is not a floating array; an axis is not an int.
        ValueError: unknown ``dtype``; axis out of range; ``group_size <= 0``;
            both ``axis`` and ``group_size``; symmetric with an unsigned type;
            an unknown ``method``; eager mode only: NaN or inf in ``x``, or a block that needs a
            scale above ``hi`` (it would saturate; the message names the scale
            needed, the cap and a scale dtype or input dtype that works).
            Under ``jax.jit`` such a block's scale is clipped to ``hi`` and its
            largest values saturate.

    Example:
        >>> import numpy as np, arrayquant as aq
        >>> x = np.array([[191.6, -13.5, 728.6], [92.14, 295.5, -184], [0, 684.6, 245.5]],
        ...              dtype=np.float32)
        >>> s, z = aq.qparams(x, "int8")
        >>> round(float(s[0, 0]), 4), int(z[0, 0])
        (3.5788, -77)
    """
    xp, qt, b, method = resolve(x, dtype, symmetric, axis, group_size, group_axis, 0, method)
    s, z, _, _ = params_and_codes(x, qt, symmetric, b, scale_dtype, False, xp, method)
    return s, z


def qparams_blocking(x_shape, scale, zero_point, group_size, group_axis) -> Blocking:
    if not hasattr(scale, "shape"):
        raise TypeError(f"scale must be an array, got {type(scale).__name__}")
    if not is_float_dtype(scale.dtype):
        raise TypeError(f"scale must be a floating array; got dtype {dtype_name(scale.dtype)}")
    if zero_point is not None:
        if tuple(zero_point.shape) != tuple(scale.shape):
            raise ValueError(
                f"zero_point of shape {tuple(zero_point.shape)} does not match scale of shape "
                f"{tuple(scale.shape)}; expected the same shape"
            )
        if is_float_dtype(zero_point.dtype) or dtype_name(zero_point.dtype) == "bool":
            raise TypeError(
                f"zero_point must be an integer array; got dtype {dtype_name(zero_point.dtype)}"
            )
    scale_shape = tuple(scale.shape)
    if not scale_shape:
        # A 0-d scale is per tensor (ONNX QuantizeLinear's scalar scale): the
        # blocking of a (1, ..., 1) scale; callers reshape it to scale_view_shape.
        scale_shape = (1,) * len(x_shape)
    return plan_from_scale(tuple(x_shape), scale_shape, group_size, group_axis)


def quantize_with(
    x, scale, zero_point=None, dtype="int8", *, group_size=None, group_axis: int = -1
):
    """Codes ``clip(round(x * (1 / scale)) + zero_point, q_min, q_max)`` in the storage dtype.

    ``scale`` and ``zero_point`` are as returned by :func:`qparams`: the rank of
    ``x``, dimension ``d`` holding ``ceil(n_d / block_d)`` entries. The block
    size along each dimension is ``ceil(n_d / s_d)``; pass ``group_size`` (and
    ``group_axis``) when a partial last group makes that ambiguous. A 0-d
    ``scale`` (with a 0-d ``zero_point``, or none) quantizes per tensor, for
    ``x`` of any rank, as ONNX QuantizeLinear's scalar scale does: the codes
    equal those given by the scale and zero point reshaped to
    ``(1,) * x.ndim``. With
    ``zero_point=None`` (symmetric) codes are restricted to ``[-q_max, q_max]``.
    Rounding is half to even; values are clipped before the cast.

    Scales must be finite and in ``[lo, hi]`` for their dtype and ``x``'s (the
    range :func:`qparams` produces: normal numbers whose reciprocal is normal),
    zero points in ``[q_min, q_max]`` of ``dtype``. That is checked eagerly;
    under ``jax.jit`` they are used as given and the codes are unspecified
    when they are invalid.

    Returns:
        integer array shaped like ``x``: int8/uint8 for 2-, 4- and 8-bit types,
        int16/uint16 for 16-bit ones.

    Example:
        >>> import numpy as np, arrayquant as aq
        >>> x = np.array([[-1.0, 0.0], [0.5, 1.0]], dtype=np.float32)
        >>> aq.quantize_with(x, np.asarray(0.5, np.float32), np.asarray(3, np.int8)).tolist()
        [[1, 3], [4, 5]]

    Raises:
        TypeError: non-float ``x`` or ``scale``; non-integer ``zero_point``.
        ValueError: unknown ``dtype``; scale / zero point shapes that do not
            fit ``x`` or each other (a 0-d scale needs a 0-d zero point); eager
            mode only: NaN or inf in ``x``, a scale outside ``[lo, hi]`` or not
            finite, a zero point outside the qtype's range (the message names
            the offending values and the accepted range).
    """
    xp = namespace(x, scale, zero_point)
    check_float_input(x, xp)
    qt = as_qtype(dtype)
    b = qparams_blocking(x.shape, scale, zero_point, group_size, group_axis)
    if zero_point is None and not qt.signed:
        raise ValueError(
            f"zero_point=None (symmetric) needs a signed dtype: {qt.name} codes would clip "
            f"every negative value to 0; pass the zero point, or use {qt.name[1:]}"
        )
    raise_if_not_finite(xp, x)
    raise_if_bad_qparams(
        xp, scale, zero_point, scale_limits(scale.dtype, x.dtype),
        f"{dtype_name(scale.dtype)} scales with {dtype_name(x.dtype)} values", qt)
    cdt = compute_dtype(xp, x.dtype)
    xv = to_view(xp.astype(x, cdt), b, xp)
    s = xp.reshape(scale, b.scale_view_shape)
    z = None if zero_point is None else xp.reshape(zero_point, b.scale_view_shape)
    return from_view(quantize_view(xv, s, z, qt, cdt, xp), b, xp)


def dequantize_with(
    codes, scale, zero_point=None, *, dtype=None, group_size=None, group_axis: int = -1
):
    """``scale * (codes - zero_point)``, the inverse of :func:`quantize_with`.

    Computed in float32 (float64 when ``scale`` or ``dtype`` is float64),
    saturated to the finite range of ``dtype`` and returned in ``dtype``
    (default: float32, or float64 for float64 scales). Block sizes are found as
    in :func:`quantize_with`, and a 0-d ``scale`` (with a 0-d ``zero_point``,
    or none) is per tensor for ``codes`` of any rank, the same as a scale of
    shape ``(1,) * codes.ndim``. Scales must be finite and in ``[lo, hi]`` for
    their dtype and the output dtype: checked eagerly; under ``jax.jit`` they
    are used as given and the result is unspecified when they are invalid.

    Raises:
        TypeError: ``codes`` not integer, ``scale`` not float.
        ValueError: shapes of scale / zero point that do not fit ``codes``; a
            scale outside ``[lo, hi]`` or not finite (eager mode only).
    """
    xp = namespace(codes, scale, zero_point)
    if not hasattr(codes, "dtype") or is_float_dtype(codes.dtype):
        raise TypeError(
            "codes must be an integer array; got "
            + (f"dtype {dtype_name(codes.dtype)}" if hasattr(codes, "dtype") else repr(codes))
        )
    b = qparams_blocking(codes.shape, scale, zero_point, group_size, group_axis)
    out_dtype = compute_dtype(xp, scale.dtype) if dtype is None else float_dtype(xp, dtype)
    # No reciprocal here, and the result saturates: any normal finite scale is fine, as
    # long as the products stay normal in the compute dtype (XLA flushes subnormals).
    tiny_s, big_s = finfo_limits(scale.dtype)
    tiny_c = finfo_limits(compute_dtype(xp, scale.dtype))[0]
    raise_if_bad_qparams(xp, scale, None, (max(tiny_s, tiny_c), big_s),
                          f"{dtype_name(scale.dtype)} scales", None)
    return dequantize_codes(codes, scale, zero_point, b, out_dtype, xp)


def quantize(
    x,
    dtype="int8",
    symmetric: bool = False,
    axis=None,
    group_size: int | None = None,
    group_axis: int = -1,
    *,
    scale_dtype="float32",
    batch_axes: int = 0,
    method=DEFAULT_METHOD,
) -> QArray:
    """Quantize ``x`` into a :class:`QArray` (scale and zero point from :func:`qparams`).

    Same arguments (``method=`` included) and errors as :func:`qparams`. Sub-byte types (int2, int4,
    uint2, uint4) are stored packed along the last axis (see
    :mod:`arrayquant.packing`); ``qa.codes`` always gives one code per element.

    ``batch_axes=k`` stacks items: the first ``k`` axes of ``x`` index
    independent items (layers), each quantized as ``quantize(x[i], ...)``
    would, with ``axis`` / ``group_axis`` counted within one item. The result
    is a stacked QArray (``qa.batch_shape == x.shape[:k]``), the same as
    ``jax.vmap`` of ``quantize`` gives.

    Example:
        >>> import numpy as np, arrayquant as aq
        >>> qa = aq.quantize(np.linspace(-1, 1, 8, dtype=np.float32), "int4", symmetric=True)
        >>> qa.codes.tolist()
        [-7, -5, -3, -1, 1, 3, 5, 7]
        >>> float(np.max(np.abs(aq.dequantize(qa) - np.linspace(-1, 1, 8)))) < 0.1
        True
    """
    xp, qt, b, method = resolve(x, dtype, symmetric, axis, group_size, group_axis,
                                 batch_axes, method)
    sub_byte = qt.bits < 8 and len(b.shape) > batch_axes
    s, z, codes, packed = params_and_codes(x, qt, symmetric, b, scale_dtype, True, xp, method,
                                             packed=sub_byte)
    return make_qarray(codes, s, z, qt, b, dtype_name(x.dtype), batch_axes, packed)


def make_qarray(codes, s, z, qt: QType, b: Blocking, orig_dtype: str, nb: int,
                 packed: bool = False) -> QArray:
    """Every QArray producer's container, with THE storage rule: sub-byte codes packed
    along the last axis (``packed``: already packed that way while quantizing)."""
    packed_axis = None
    item, block = b.shape[nb:], b.block[nb:]
    if qt.bits < 8 and len(item) > 0:
        from arrayquant.packing import pack

        packed_axis = len(item) - 1
        if not packed:
            codes = pack(codes, qt.bits, axis=nb + packed_axis, _checked=True)
    return QArray(codes, s, z, qt.name, item, orig_dtype, block, packed_axis)


def dequantize(qa: QArray, dtype=None):
    """``scale * (codes - zero_point)`` of a :class:`QArray`, in its original dtype.
    A :class:`~arrayquant.LinearWeight` gives the weight it represents.

    Packed codes are unpacked on the fly. ``dtype`` overrides the output dtype.
    Values beyond the output dtype's largest finite value saturate to it
    (never inf): every original value lies within that range.

    Raises:
        TypeError: ``qa`` is not a QArray.
    """
    if isinstance(qa, LinearWeight):
        return weight_from_stored(dequantize(qa.qweight, dtype), qa, namespace(qa.qweight.scale))
    if not isinstance(qa, QArray):
        raise TypeError(
            f"dequantize expects an arrayquant.QArray, got {type(qa).__name__}; "
            "for bare codes use dequantize_with(codes, scale, zero_point)"
        )
    check_integer_codes(qa)
    check_fits(qa)
    xp = namespace(qa.data, qa.scale, qa.zero_point)
    out_dtype = float_dtype(xp, qa.dtype if dtype is None else dtype)
    return dequantize_codes(qa.codes, qa.scale, qa.zero_point, qa.blocking(), out_dtype, xp)
