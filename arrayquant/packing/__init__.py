"""Sub-byte storage: pack 1-, 2- and 4-bit codes into bytes, and back.

Layout: along the packed axis, ``8 // bits`` consecutive values share one
byte, the first value in the least-significant bits (ONNX int4 / int2's value
order). Value ``i`` of a group sits at bits ``[i * bits, (i + 1) * bits)``.
Signed codes are stored as ``bits``-bit two's complement and sign-extended by
:func:`unpack`. Each row along the packed axis is packed on its own: a length
that is not a multiple of ``8 // bits`` pads the row's last byte with zero
bits; :func:`unpack` takes the original length and drops them. ONNX packs the
flattened tensor instead, so the bytes equal ONNX's only when the packed axis
is the last one (or every later axis has size 1) and its length is a multiple
of ``8 // bits``, or the tensor is a single row (see docs/packing.md).

Example: the 2-bit values 1, 0, 3, 2 pack into ``0b10_11_00_01 = 177``.

Everything is array API integer and bitwise arithmetic, so it runs unchanged on
NumPy, JAX (under jit and vmap) and array-api-strict.
"""

from __future__ import annotations

from arrayquant._backend import as_int8_bits, dtype_name, is_concrete, is_jax, is_numpy, namespace
from arrayquant.blocking import normalize_axis
from arrayquant.packing import _numpy as _np_fast

__all__ = [
    "pack",
    "unpack",
    "bit_fields",
    "packed_length",
    "to_high_nibble_first",
    "from_high_nibble_first",
    "to_planar",
    "from_planar",
    "to_hqq",
    "from_hqq",
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
    if bits == 8:
        if dtype_name(codes.dtype) != "uint8":
            codes = xp.astype(codes, xp.int16)  # so that the mask 0xFF fits the dtype
        return xp.astype(xp.bitwise_and(codes, 0xFF), xp.uint8)
    per = 8 // bits
    v = xp.moveaxis(codes, axis, -1)
    n = v.shape[-1]
    m = -(-n // per)
    if m * per != n:
        pad = xp.zeros((*v.shape[:-1], m * per - n), dtype=v.dtype)
        v = xp.concat([v, pad], axis=-1)
    # Strided slices rather than a (..., m, per) reshape: XLA handles a minor
    # dimension of size 2 or 4 poorly (measured 2x slower on CPU).
    return xp.moveaxis(join_phases([v[..., k::per] for k in range(per)], bits, xp), -1, axis)


def join_phases(phases, bits: int, xp):
    """Bytes from the codes of each position in a byte: THE sub-byte layout rule.

    ``phases[k]`` holds the codes at positions ``k, k + per, k + 2 per, ...``
    along the packed axis (``per = 8 // bits``, all phases the same shape); code
    ``k`` of a byte goes to its bits ``[k * bits, (k + 1) * bits)``, the first
    code in the low bits. :func:`pack` is this applied to ``codes[..., k::per]``;
    quantizing each phase of the input on its own and joining the phases gives
    the same bytes without reading the codes back with a stride.
    """
    mask = (1 << bits) - 1
    out = None
    for k, c in enumerate(phases):
        # Two's complement bits of the low `bits`, computed in the codes' own dtype:
        # bitwise_and is defined on negative integers, the result is non-negative.
        v = xp.astype(xp.bitwise_and(c, mask), xp.uint8)
        out = v if out is None else xp.bitwise_or(out, xp.bitwise_left_shift(v, k * bits))
    return out


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


def _check_length(length) -> int:
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise ValueError(f"length must be a non-negative int; got {length!r}")
    return length


def _plane_shift(k: int, bits: int, high_first: bool) -> int:
    """Where plane ``k`` starts in a planar byte: low bits first, or high bits first."""
    return 8 - (k + 1) * bits if high_first else k * bits


def _to_planes(packed, bits, length, axis, *, high_first: bool, layout: str):
    """arrayquant-packed bytes -> planar: plane ``k`` (rows ``[kR, (k+1)R)``) at its shift."""
    bits = _check_bits(bits)
    length = _check_length(length)
    per = 8 // bits
    if length % per:
        raise ValueError(
            f"the {layout} layout needs a length that is a multiple of {per} for {bits}-bit "
            f"values; got length {length}"
        )
    xp = namespace(packed)
    codes = unpack(packed, bits, length, axis, signed=False)
    axis = normalize_axis(axis, codes.ndim)
    codes = xp.moveaxis(codes, axis, -1)
    rows = length // per
    out = None
    for k in range(per):
        plane = codes[..., k * rows : (k + 1) * rows]
        shift = _plane_shift(k, bits, high_first)
        plane = xp.bitwise_left_shift(plane, shift) if shift else plane
        out = plane if out is None else xp.bitwise_or(out, plane)
    return xp.moveaxis(out, -1, axis)


def _from_planes(planar, bits, axis, *, high_first: bool):
    """A planar layout -> arrayquant-packed bytes of ``(8 // bits) * planar.shape[axis]`` codes."""
    bits = _check_bits(bits)
    xp = namespace(planar)
    if dtype_name(planar.dtype) != "uint8":
        raise TypeError(f"expected packed uint8 bytes; got dtype {dtype_name(planar.dtype)}")
    axis = normalize_axis(axis, planar.ndim)
    mask = (1 << bits) - 1
    planes = []
    for k in range(8 // bits):
        shift = _plane_shift(k, bits, high_first)
        planes.append(
            xp.bitwise_and(xp.bitwise_right_shift(planar, shift) if shift else planar, mask)
        )
    return pack(xp.concat(planes, axis=axis), bits, axis, _checked=True)


def to_planar(packed, bits: int, length: int, axis: int = -1):
    """Convert arrayquant-packed bytes to the planar, low-bits-first layout along ``axis``.

    Planar, low bits first: with ``per = 8 // bits`` and ``R = length / per``,
    byte ``i`` holds value ``i + k * R`` in bits ``[k * bits, (k + 1) * bits)``:
    rows ``[0, R)`` fill the low bits, rows ``[R, 2R)`` the next ones, and so
    on. This is optimum-quanto's ``pack_weights`` layout (along axis 0) for
    lengths that are multiples of ``per``; HQQ puts the planes the other way
    round (see :func:`to_hqq`). Values are moved as raw bit patterns (sign is
    kept). ``packed`` holds ``length`` codes along ``axis``, as from
    :func:`pack`; the result has ``R`` bytes there.

    Raises:
        TypeError: ``packed`` is not uint8.
        ValueError: ``length`` is not a non-negative multiple of ``per``;
            ``packed.shape[axis]`` does not fit ``length``; bad ``bits`` or ``axis``.

    Example:
        >>> import numpy as np, arrayquant as aq
        >>> codes = np.array([[1], [2]], np.uint8)
        >>> hex(int(aq.to_planar(aq.pack(codes, 4, axis=0), 4, 2, axis=0)[0, 0]))
        '0x21'
    """
    return _to_planes(packed, bits, length, axis, high_first=False, layout="planar")


def from_planar(planar, bits: int, axis: int = -1):
    """Convert planar bytes (see :func:`to_planar`) back to arrayquant's layout.

    The result holds ``(8 // bits) * planar.shape[axis]`` codes along ``axis``.

    Raises:
        TypeError: ``planar`` is not uint8.
        ValueError: bad ``bits`` or ``axis``.
    """
    return _from_planes(planar, bits, axis, high_first=False)


def to_hqq(packed, bits: int, length: int, axis: int = 0):
    """Convert arrayquant-packed bytes to HQQ's uint8 bit-packing layout along ``axis``.

    HQQ (``hqq.core.bitpack.BitPack.pack_4bit_u8``, ``pack_2bit_u8``,
    ``pack_1bit_u8``) is planar with the *first* plane in the *high* bits:
    with ``per = 8 // bits`` and ``R = length / per``, byte ``i`` holds value
    ``i + k * R`` in bits ``[8 - (k + 1) * bits, 8 - k * bits)``. For codes
    ``W`` of shape ``(per * R, ...)`` packed along axis 0 that is
    ``W[:R] << 4 | W[R:]`` (4-bit), ``W[:R] << 6 | W[R:2R] << 4 | W[2R:3R] << 2
    | W[3R:]`` (2-bit) and ``W[:R] << 7 | W[R:2R] << 6 | ... | W[7R:]`` (1-bit),
    byte for byte; ``bits=8`` is the identity (``pack_8bit_u8``).

    ``packed`` holds ``length`` codes along ``axis`` in arrayquant's layout, as
    from :func:`pack` (1-bit codes too: arrayquant has no 1-bit qtype, but
    ``aq.pack(codes, 1, axis)`` packs them). The result has ``R`` bytes along
    ``axis``. HQQ packs along axis 0 of its (rows, columns) code matrix, hence
    the default. HQQ's codes are unsigned; signed codes are moved as their
    raw ``bits``-bit two's complement patterns. Only the codes are converted:
    HQQ keeps its scales, zero points and shapes in separate metadata.

    Raises:
        TypeError: ``packed`` is not uint8.
        ValueError: ``length`` is not a non-negative multiple of ``per`` (HQQ
            cannot pack other lengths); ``packed.shape[axis]`` does not fit
            ``length``; bad ``bits`` or ``axis``.

    Example:
        >>> import numpy as np, arrayquant as aq
        >>> codes = np.array([[1], [2]], np.uint8)
        >>> hex(int(aq.to_hqq(aq.pack(codes, 4, axis=0), 4, 2)[0, 0]))
        '0x12'
    """
    return _to_planes(packed, bits, length, axis, high_first=True, layout="HQQ")


def from_hqq(packed, bits: int, axis: int = 0):
    """Convert HQQ-packed uint8 bytes (see :func:`to_hqq`) to arrayquant's layout.

    The result holds ``(8 // bits) * packed.shape[axis]`` codes along ``axis``,
    packed as :func:`pack` does; ``aq.unpack(out, bits, n, axis, signed=False)``
    gives HQQ's unsigned codes (what ``BitPack.unpack_4bit_u8`` and friends
    return).

    Raises:
        TypeError: ``packed`` is not uint8.
        ValueError: bad ``bits`` or ``axis``.
    """
    return _from_planes(packed, bits, axis, high_first=True)
