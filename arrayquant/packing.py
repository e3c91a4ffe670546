"""Sub-byte storage: pack 1-, 2- and 4-bit codes into bytes, and back.

Layout (the ONNX int4 / int2 layout): along the packed axis, ``8 // bits``
consecutive values share one byte, the first value in the least-significant
bits. Value ``i`` of a group sits at bits ``[i * bits, (i + 1) * bits)``.
Signed codes are stored as ``bits``-bit two's complement and sign-extended by
:func:`unpack`. A length that is not a multiple of ``8 // bits`` is padded
with zero bits; :func:`unpack` takes the original length and drops them.

Example: the 2-bit values 1, 0, 3, 2 pack into ``0b10_11_00_01 = 177``.

Everything is array API integer and bitwise arithmetic, so it runs unchanged on
NumPy, JAX (under jit and vmap) and array-api-strict.
"""

from __future__ import annotations

from . import _numpy_packing as _np_fast
from ._backend import as_int8_bits, dtype_name, is_concrete, is_jax, is_numpy, namespace
from ._blocking import normalize_axis

__all__ = [
    "pack",
    "unpack",
    "bit_fields",
    "packed_length",
    "to_high_nibble_first",
    "from_high_nibble_first",
    "to_planar",
    "from_planar",
]

_BITS = (1, 2, 4, 8)
_INT_NAMES = ("int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64")


def _check_bits(bits) -> int:
    if isinstance(bits, bool) or bits not in _BITS:
        raise ValueError(f"bits must be one of {_BITS}; got {bits!r}")
    return bits


def packed_length(length: int, bits: int) -> int:
    """Bytes needed for ``length`` values of ``bits`` bits: ``ceil(length * bits / 8)``."""
    return -(-length * _check_bits(bits) // 8)


def _check_range(codes, bits: int, signed, xp) -> None:
    if not is_concrete(codes) or codes.size == 0:
        return
    lo = -(1 << (bits - 1)) if signed in (True, None) else 0
    hi = (1 << bits) - 1 if signed in (False, None) else (1 << (bits - 1)) - 1
    mn, mx = int(xp.min(codes)), int(xp.max(codes))  # eager only: concrete arrays
    if mn < lo or mx > hi:
        kind = {True: "signed", False: "unsigned", None: "signed or unsigned"}[signed]
        raise ValueError(
            f"codes hold values outside the {kind} {bits}-bit range [{lo}, {hi}] "
            f"(min {mn}, max {mx}); they cannot be packed "
            f"into {bits} bits"
        )


def pack(codes, bits: int, axis: int = -1, *, signed: bool | None = None, _checked=False):
    """Pack integer ``codes`` of ``bits`` bits into a uint8 array along ``axis``.

    The output has ``ceil(n * bits / 8)`` bytes along ``axis`` (``n`` codes) and
    the input's size elsewhere; the first value goes in the low bits (see the
    module docstring). ``bits=8`` stores the codes' 8-bit pattern as uint8.

    Args:
        codes: integer array (any integer dtype).
        bits: 1, 2, 4 or 8.
        axis: the axis whose consecutive values share a byte.
        signed: if given, the range the codes are checked against; by default
            either the signed or the unsigned ``bits``-bit range is accepted.

    Raises:
        TypeError: ``codes`` is not an integer array.
        ValueError: ``bits`` not in {1, 2, 4, 8}; codes out of range (eager mode);
            ``axis`` out of range; a 0-d array.
    """
    bits = _check_bits(bits)
    xp = namespace(codes)
    if dtype_name(codes.dtype) not in _INT_NAMES:
        raise TypeError(
            f"pack needs an integer array of codes; got dtype {dtype_name(codes.dtype)}"
        )
    if codes.ndim == 0:
        raise ValueError("pack needs an array of at least 1 dimension; got a 0-d array")
    axis = normalize_axis(axis, codes.ndim)
    if not _checked:
        _check_range(codes, bits, signed, xp)
    if bits < 8 and is_numpy(xp) and _np_fast.can_use(codes, bits, axis):
        return _np_fast.pack_last(codes, bits)
    mask = (1 << bits) - 1
    # Two's complement bits of the low `bits`, computed in the codes' own dtype:
    # bitwise_and is defined on negative integers, the result is non-negative.
    if bits == 8 and dtype_name(codes.dtype) != "uint8":
        codes = xp.astype(codes, xp.int16)  # so that the mask 0xFF fits the dtype
    v = xp.astype(xp.bitwise_and(codes, mask), xp.uint8)
    if bits == 8:
        return v
    per = 8 // bits
    v = xp.moveaxis(v, axis, -1)
    n = v.shape[-1]
    m = -(-n // per)
    if m * per != n:
        pad = xp.zeros((*v.shape[:-1], m * per - n), dtype=xp.uint8)
        v = xp.concat([v, pad], axis=-1)
    # Strided slices rather than a (..., m, per) reshape: XLA handles a minor
    # dimension of size 2 or 4 poorly (measured 2x slower on CPU).
    out = v[..., 0::per]
    for k in range(1, per):
        out = xp.bitwise_or(out, xp.bitwise_left_shift(v[..., k::per], k * bits))
    return xp.moveaxis(out, -1, axis)


def unpack(packed, bits: int, length: int, axis: int = -1, *, signed: bool):
    """Unpack ``length`` codes of ``bits`` bits per row of ``packed`` along ``axis``.

    The inverse of :func:`pack`: returns int8 codes (sign-extended from
    ``bits``-bit two's complement) when ``signed``, else uint8 codes, with
    ``length`` entries along ``axis``.

    Raises:
        TypeError: ``packed`` is not uint8.
        ValueError: ``bits`` not in {1, 2, 4, 8}; ``packed.shape[axis]`` is not
            ``ceil(length * bits / 8)``; ``axis`` out of range.
    """
    bits = _check_bits(bits)
    xp = namespace(packed)
    if dtype_name(packed.dtype) != "uint8":
        raise TypeError(f"unpack needs a uint8 array; got dtype {dtype_name(packed.dtype)}")
    if packed.ndim == 0:
        raise ValueError("unpack needs an array of at least 1 dimension; got a 0-d array")
    axis = normalize_axis(axis, packed.ndim)
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise ValueError(f"length must be a non-negative int; got {length!r}")
    need = packed_length(length, bits)
    if packed.shape[axis] != need:
        raise ValueError(
            f"packed has {packed.shape[axis]} bytes along axis {axis}, but {length} values of "
            f"{bits} bits need {need}"
        )
    if bits == 8:
        if not signed:
            return packed
        wide = xp.astype(packed, xp.int16)  # sign-extend: values >= 128 are v - 256
        return xp.astype(xp.where(wide >= 128, wide - 256, wide), xp.int8)
    if is_numpy(xp) and _np_fast.can_use(packed, bits, axis):
        return _np_fast.unpack_last(packed, bits, length, bool(signed))
    per = 8 // bits
    p = xp.moveaxis(packed, axis, -1)
    parts = bit_fields(p, bits, signed=signed)
    v = xp.reshape(xp.stack(parts, axis=-1), (*p.shape[:-1], p.shape[-1] * per))
    return xp.moveaxis(v[..., :length], -1, axis)


def bit_fields(packed, bits: int, *, signed: bool) -> list:
    """The ``8 // bits`` fields of packed bytes, without interleaving them.

    Field ``r`` holds, for every byte, the value stored in bits ``[r * bits,
    (r + 1) * bits)``: along the packed axis, codes ``r, r + 8 // bits, ...``.
    Returned as int8 (sign-extended) when ``signed``, else uint8, each with the
    shape of ``packed``. Consumers such as the quantized matmul contract each
    field separately instead of unpacking.
    """
    bits = _check_bits(bits)
    if bits == 8:
        raise ValueError("bit_fields is for 1-, 2- and 4-bit codes; 8-bit bytes are the codes")
    if dtype_name(packed.dtype) != "uint8":
        raise TypeError(
            f"bit_fields needs packed uint8 bytes; got dtype {dtype_name(packed.dtype)}"
        )
    xp = namespace(packed)
    # Shift field r to the top of the byte, then back down: the bits above it fall
    # off the top, and an arithmetic right shift of the int8 view sign-extends.
    # Shifts only (no masks, no selects), so that compilers fuse the extraction into
    # the consumer: XLA:CPU's YNNPACK fusions take shifts, bitcasts and converts but
    # not bitwise and / select. JAX shifts the int8 bitcast (XLA defines the
    # wrap-around of a left shift); elsewhere the uint8 byte is shifted, where the
    # array API defines it, and then read as int8.
    jax_view = as_int8_bits(packed, xp) if signed and is_jax(xp) else None
    out = []
    for r in range(8 // bits):
        left = 8 - bits * (r + 1)
        if jax_view is not None:
            v = xp.bitwise_left_shift(jax_view, left) if left else jax_view
        else:
            v = xp.bitwise_left_shift(packed, left) if left else packed
            v = as_int8_bits(v, xp) if signed else v
        out.append(xp.bitwise_right_shift(v, 8 - bits))
    return out


# --------------------------------------------------------------------------- interop layouts


def _swap_nibbles(packed):
    xp = namespace(packed)
    if dtype_name(packed.dtype) != "uint8":
        raise TypeError(f"expected packed uint8 bytes; got dtype {dtype_name(packed.dtype)}")
    return xp.bitwise_or(
        xp.bitwise_left_shift(xp.bitwise_and(packed, 0x0F), 4), xp.bitwise_right_shift(packed, 4)
    )


def to_high_nibble_first(packed):
    """Convert 4-bit bytes from arrayquant's low-nibble-first layout to high-nibble-first.

    High-nibble-first (bitsandbytes' 4-bit layout) keeps adjacent pairs in one
    byte like arrayquant does, but puts the *first* value in bits 4..7. The
    conversion swaps the nibbles of every byte, so it is its own inverse.
    """
    return _swap_nibbles(packed)


def from_high_nibble_first(packed):
    """Convert 4-bit bytes from high-nibble-first (bitsandbytes) to arrayquant's layout."""
    return _swap_nibbles(packed)


def to_planar(packed, bits: int, length: int, axis: int = -1):
    """Convert arrayquant-packed bytes to the planar layout along ``axis``.

    Planar (optimum-quanto / HQQ style): with ``per = 8 // bits`` and ``R =
    length / per``, byte ``i`` holds value ``i + k * R`` in bits ``[k * bits,
    (k + 1) * bits)``: rows ``[0, R)`` fill the low bits, rows ``[R, 2R)`` the
    next ones, and so on. Values are moved as raw bit patterns (sign is kept).

    Raises:
        ValueError: ``length`` is not a multiple of ``per``; bad ``bits`` or size.
    """
    bits = _check_bits(bits)
    per = 8 // bits
    if length % per:
        raise ValueError(
            f"the planar layout needs a length that is a multiple of {per} for {bits}-bit "
            f"values; got length {length}"
        )
    xp = namespace(packed)
    codes = unpack(packed, bits, length, axis, signed=False)
    axis = normalize_axis(axis, codes.ndim)
    codes = xp.moveaxis(codes, axis, -1)
    rows = length // per
    out = codes[..., :rows]
    for k in range(1, per):
        plane = codes[..., k * rows : (k + 1) * rows]
        out = xp.bitwise_or(out, xp.bitwise_left_shift(plane, k * bits))
    return xp.moveaxis(out, -1, axis)


def from_planar(planar, bits: int, axis: int = -1):
    """Convert planar bytes (see :func:`to_planar`) back to arrayquant's layout."""
    bits = _check_bits(bits)
    xp = namespace(planar)
    if dtype_name(planar.dtype) != "uint8":
        raise TypeError(f"expected packed uint8 bytes; got dtype {dtype_name(planar.dtype)}")
    axis = normalize_axis(axis, planar.ndim)
    mask = (1 << bits) - 1
    planes = [
        xp.bitwise_and(xp.bitwise_right_shift(planar, k * bits) if k else planar, mask)
        for k in range(8 // bits)
    ]
    return pack(xp.concat(planes, axis=axis), bits, axis, _checked=True)
