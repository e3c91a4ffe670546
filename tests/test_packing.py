"""pack / unpack, the packed QArray, and the interop layout converters."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import skip_eager_jax
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import arrayquant as aq


def _codes(draw, bits, signed, shape):
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    dtype = np.int8 if signed else np.uint8
    return draw(hnp.arrays(dtype, shape, elements=st.integers(lo, hi)))


@st.composite
def packing_cases(draw):
    bits = draw(st.sampled_from([1, 2, 4, 8]))
    signed = draw(st.booleans())
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=11))
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    return bits, signed, axis, _codes(draw, bits, signed, shape)


def test_lesson_example_byte():
    # The 2-bit values 1, 0, 3, 2 share one byte, first value in the low bits.
    assert aq.pack(np.array([1, 0, 3, 2], np.uint8), 2).tolist() == [0b10110001]
    assert aq.unpack(np.array([177], np.uint8), 2, 4, signed=False).tolist() == [1, 0, 3, 2]
    # int4: -1 in the low nibble, 7 in the high nibble.
    assert aq.pack(np.array([-1, 7], np.int8), 4).tolist() == [0x7F]


@given(case=packing_cases())
def test_round_trip_every_backend(backend, call, case):
    skip_eager_jax(backend, "test_bit_fields_of_every_byte and the QArray tests pack eagerly")
    bits, signed, axis, codes = case
    c = backend.asarray(codes)
    packed = call(aq.pack)(c, bits, axis)
    p = backend.to_numpy(packed)
    assert p.dtype == np.uint8
    n = codes.shape[axis]
    expected = list(codes.shape)
    expected[axis] = -(-n * bits // 8)
    assert list(p.shape) == expected
    out = backend.to_numpy(call(aq.unpack)(packed, bits, n, axis, signed=signed))
    np.testing.assert_array_equal(out, codes)
    assert out.dtype == (np.int8 if signed else np.uint8)


@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("signed", [True, False])
def test_bit_fields_of_every_byte(backend, call, bits, signed):
    """Field r of byte b is bits [r * bits, (r + 1) * bits) of b, sign-extended when signed."""
    from arrayquant.packing import bit_fields

    b = np.arange(256, dtype=np.uint8).reshape(16, 16)
    fields = call(lambda p: bit_fields(p, bits, signed=signed))(backend.asarray(b))
    assert len(fields) == 8 // bits
    wide = b.astype(np.int64)
    for r, f in enumerate(fields):
        f = backend.to_numpy(f)
        assert f.dtype == (np.int8 if signed else np.uint8)
        expected = (wide >> (r * bits)) & ((1 << bits) - 1)
        if signed:
            expected = np.where(expected >= 1 << (bits - 1), expected - (1 << bits), expected)
        np.testing.assert_array_equal(f.astype(np.int64), expected, err_msg=f"field {r}")


def test_bit_fields_rejects_whole_bytes_and_other_dtypes():
    from arrayquant.packing import bit_fields

    with pytest.raises(ValueError, match="8-bit bytes are the codes"):
        bit_fields(np.zeros(3, np.uint8), 8, signed=True)
    for dtype in (np.int8, np.uint16):
        match = f"needs packed uint8 bytes; got dtype {dtype.__name__}"
        with pytest.raises(TypeError, match=match):
            bit_fields(np.zeros(3, dtype), 4, signed=False)


@given(case=packing_cases())
def test_numpy_fast_path_equals_generic(case):
    import array_api_strict as xps

    bits, signed, axis, codes = case
    fast = aq.pack(codes, bits, axis)
    generic = np.asarray(aq.pack(xps.asarray(codes), bits, axis)._array)
    np.testing.assert_array_equal(fast, generic)
    n = codes.shape[axis]
    np.testing.assert_array_equal(
        aq.unpack(fast, bits, n, axis, signed=signed),
        np.asarray(aq.unpack(xps.asarray(fast), bits, n, axis, signed=signed)._array),
    )


def test_pack_under_vmap():
    jax = pytest.importorskip("jax")
    codes = np.random.default_rng(0).integers(-8, 8, (3, 5, 7)).astype(np.int8)
    packed = jax.vmap(lambda c: aq.pack(c, 4))(codes)
    np.testing.assert_array_equal(packed, np.stack([aq.pack(c, 4) for c in codes]))
    back = jax.vmap(lambda p: aq.unpack(p, 4, 7, signed=True))(packed)
    np.testing.assert_array_equal(back, codes)


def test_errors():
    with pytest.raises(ValueError, match=r"bits must be one of \(1, 2, 4, 8\); got 3"):
        aq.pack(np.zeros(4, np.int8), 3)
    with pytest.raises(ValueError, match=r"outside the signed or unsigned 4-bit range \[-8, 15\]"):
        aq.pack(np.array([0, 16], np.int16), 4)
    with pytest.raises(ValueError, match=r"signed 4-bit range \[-8, 7\]"):
        aq.pack(np.array([0, 9], np.int8), 4, signed=True)
    with pytest.raises(ValueError, match="packed has 3 bytes along axis 0, but 4 values of 4 bits"):
        aq.unpack(np.zeros(3, np.uint8), 4, 4, signed=True)
    with pytest.raises(TypeError, match="uint8"):
        aq.unpack(np.zeros(3, np.int8), 4, 6, signed=True)
    with pytest.raises(TypeError, match="integer array"):
        aq.pack(np.zeros(3, np.float32), 4)
    with pytest.raises(ValueError, match="out of range"):
        aq.pack(np.zeros((2, 2), np.int8), 4, axis=2)


# ---------------------------------------------------------------- packed QArray


@pytest.mark.parametrize("dtype", ["int4", "uint4", "int2", "uint2"])
@pytest.mark.parametrize(
    "kw", [{}, {"axis": 0}, {"group_size": 3}, {"group_size": 2, "group_axis": 0}]
)
def test_packed_qarray_equals_unpacked(backend, call, dtype, kw):
    x = backend.asarray(np.random.default_rng(2).standard_normal((5, 7)), "float32")
    qa = call(aq.quantize)(x, dtype, **kw)
    bits = aq.as_qtype(dtype).bits
    assert qa.packed_axis == 1
    assert backend.to_numpy(qa.data).dtype == np.uint8
    assert qa.data.shape == (5, -(-7 * bits // 8))
    codes = backend.to_numpy(qa.codes)
    assert codes.shape == (5, 7)
    s, z = call(aq.qparams)(x, dtype, **kw)
    gs = {k: v for k, v in kw.items() if k != "axis"}
    unpacked = call(aq.quantize_with)(x, s, z, dtype, **gs)
    np.testing.assert_array_equal(codes, backend.to_numpy(unpacked))
    np.testing.assert_array_equal(
        backend.to_numpy(call(aq.dequantize)(qa)),
        backend.to_numpy(call(aq.dequantize_with)(unpacked, s, z, **gs)),
    )


def test_packed_qarray_under_vmap():
    jax = pytest.importorskip("jax")
    xs = np.random.default_rng(3).standard_normal((4, 6, 9)).astype(np.float32)
    qv = jax.vmap(lambda x: aq.quantize(x, "int4", group_size=4))(xs)
    d = jax.vmap(aq.dequantize)(qv)
    np.testing.assert_array_equal(d, np.stack([aq.dequantize(aq.quantize(x, "int4",
                                                                          group_size=4))
                                               for x in xs]))


def test_nbytes_reports_true_storage():
    x = np.random.default_rng(4).standard_normal((256, 1024)).astype(np.float32)
    qa = aq.quantize(x, "int4", group_size=128)
    assert qa.data.nbytes == 256 * 512
    assert qa.nbytes == 256 * 512 + 256 * 8 * 4 + 256 * 8 * 1
    assert qa.bits_per_element == pytest.approx(4 + 32 / 128 + 8 / 128)
    q16 = aq.quantize(x, "int4", group_size=128, symmetric=True, scale_dtype="float16")
    assert q16.bits_per_element == pytest.approx(4.125)
    assert aq.quantize(x, "int8", axis=0).nbytes == 256 * 1024 + 256 * 4 + 256


# ---------------------------------------------------------------- interop layouts


@given(case=packing_cases())
def test_high_nibble_first_round_trip(case):
    bits, signed, axis, codes = case
    if bits != 4:
        codes = np.clip(codes, -8 if signed else 0, 7 if signed else 15)
    packed = aq.pack(codes, 4, axis)
    hi = aq.to_high_nibble_first(packed)
    np.testing.assert_array_equal(aq.from_high_nibble_first(hi), packed)
    # High-nibble-first: the first value of each pair sits in bits 4..7.
    first = np.take(codes, np.arange(0, codes.shape[axis], 2), axis=axis)
    np.testing.assert_array_equal((hi >> 4).astype(np.int16), first.astype(np.int16) & 15)


def test_high_nibble_first_example():
    assert aq.to_high_nibble_first(aq.pack(np.array([1, 2], np.uint8), 4)).tolist() == [0x12]


@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_planar_round_trip_every_backend(backend, call, bits, axis):
    per = 8 // bits
    codes = np.random.default_rng(bits).integers(0, 1 << bits, (4 * per, 3 * per)).astype(
        np.uint8
    )
    c = backend.asarray(codes)
    packed = call(aq.pack)(c, bits, axis)
    n = codes.shape[axis]
    planar = call(aq.to_planar)(packed, bits, n, axis)
    pl = backend.to_numpy(planar)
    # Planar: byte i of plane k holds value i + k * n / per.
    rows = n // per
    for k in range(per):
        part = np.take(codes, np.arange(k * rows, (k + 1) * rows), axis=axis)
        np.testing.assert_array_equal((pl >> (k * bits)) & ((1 << bits) - 1), part)
    back = call(aq.from_planar)(planar, bits, axis)
    np.testing.assert_array_equal(backend.to_numpy(back), backend.to_numpy(packed))


def test_planar_needs_whole_planes():
    packed = aq.pack(np.zeros(6, np.uint8), 4)
    with pytest.raises(ValueError, match="multiple of 2"):
        aq.to_planar(aq.pack(np.zeros(5, np.uint8), 4), 4, 5)
    assert aq.to_planar(packed, 4, 6).shape == (3,)


def test_planar_matches_optimum_quanto_pack_weights():
    """optimum-quanto's pack_weights (along axis 0), restated: plane i shifted by bits * i."""
    for bits in (2, 4):
        per = 8 // bits
        w = np.random.default_rng(bits).integers(0, 1 << bits, (3 * per, 5)).astype(np.uint8)
        rows = len(w) // per
        ref = np.zeros((rows, 5), np.uint8)
        for i in range(per):
            ref |= w[i * rows : (i + 1) * rows] << (bits * i)
        np.testing.assert_array_equal(aq.to_planar(aq.pack(w, bits, 0), bits, len(w), 0), ref)


# ---------------------------------------------------------------- HQQ layouts

# HQQ's BitPack.pack_4bit_u8 / pack_2bit_u8 / pack_1bit_u8 (hqq/core/bitpack.py), restated
# in NumPy: unsigned codes W of shape (rows, ...) packed along axis 0, R = rows / (8 // bits).
HQQ_PACK = {
    4: lambda W, R: (W[:R] << 4) | W[R:],
    2: lambda W, R: W[:R] << 6 | W[R : 2 * R] << 4 | W[2 * R : 3 * R] << 2 | W[3 * R :],
    1: lambda W, R: (
        W[:R] << 7 | W[R : 2 * R] << 6 | W[2 * R : 3 * R] << 5 | W[3 * R : 4 * R] << 4
        | W[4 * R : 5 * R] << 3 | W[5 * R : 6 * R] << 2 | W[6 * R : 7 * R] << 1 | W[7 * R :]
    ),
}
# ... and BitPack.unpack_*_u8: the planes, first plane from the high bits, concatenated on axis 0.
HQQ_UNPACK = {
    4: lambda P: np.concatenate([(P & 0b11110000) >> 4, P & 0b00001111]),
    2: lambda P: np.concatenate(
        [(P & 0b11000000) >> 6, (P & 0b00110000) >> 4, (P & 0b00001100) >> 2, P & 0b00000011]
    ),
    1: lambda P: np.concatenate([(P >> (7 - k)) & 1 for k in range(8)]),
}


def _hqq_pack_ref(codes, bits, axis):
    w = np.moveaxis(codes.astype(np.uint8), axis, 0)
    return np.moveaxis(HQQ_PACK[bits](w, len(w) // (8 // bits)), 0, axis)


@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize(("shape", "axis"), [((2, 5), 0), ((3, 2), 1), ((2, 3, 4), 1),
                                             ((4,), 0), ((6, 3), -2)])
def test_hqq_matches_reference_every_backend(backend, call, bits, shape, axis):
    per = 8 // bits
    shape = tuple(n * per if d == axis % len(shape) else n for d, n in enumerate(shape))
    codes = np.random.default_rng(bits + len(shape)).integers(0, 1 << bits, shape).astype(
        np.uint8
    )
    n = shape[axis]
    packed = call(aq.pack)(backend.asarray(codes), bits, axis)
    hqq = call(aq.to_hqq)(packed, bits, n, axis)
    h = backend.to_numpy(hqq)
    assert h.dtype == np.uint8
    ref = _hqq_pack_ref(codes, bits, axis)
    assert h.shape == ref.shape
    np.testing.assert_array_equal(h, ref)
    # HQQ's own unpacking of our bytes gives the codes back.
    np.testing.assert_array_equal(
        np.moveaxis(HQQ_UNPACK[bits](np.moveaxis(h, axis, 0)), 0, axis), codes
    )
    back = call(aq.from_hqq)(hqq, bits, axis)
    np.testing.assert_array_equal(backend.to_numpy(back), backend.to_numpy(packed))
    # HQQ's bytes, computed by the reference alone, read back into arrayquant's layout.
    from_ref = call(aq.from_hqq)(backend.asarray(ref), bits, axis)
    codes_back = call(aq.unpack)(from_ref, bits, n, axis, signed=False)
    np.testing.assert_array_equal(backend.to_numpy(codes_back), codes)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_hqq_every_byte_round_trips(backend, call, bits):
    """from_hqq then to_hqq is the identity on every byte value, and the reverse too."""
    per = 8 // bits
    h = np.arange(256, dtype=np.uint8).reshape(16, 16)
    ours = call(aq.from_hqq)(backend.asarray(h), bits, 0)
    assert ours.shape == (16, 16)  # 16 * per codes of bits bits: 16 bytes again
    back = call(aq.to_hqq)(ours, bits, 16 * per, 0)
    np.testing.assert_array_equal(backend.to_numpy(back), h)
    on_last = call(aq.from_hqq)(backend.asarray(h), bits, axis=-1)
    np.testing.assert_array_equal(
        backend.to_numpy(call(aq.to_hqq)(on_last, bits, 16 * per, axis=-1)), h
    )
    if bits < 8:
        np.testing.assert_array_equal(
            backend.to_numpy(call(aq.unpack)(ours, bits, 16 * per, 0, signed=False)),
            HQQ_UNPACK[bits](h),
        )


@given(case=packing_cases())
def test_hqq_round_trip(case):
    bits, signed, axis, codes = case
    per = 8 // bits
    n = codes.shape[axis] - codes.shape[axis] % per
    if n == 0:
        return
    codes = np.take(codes, np.arange(n), axis=axis)
    packed = aq.pack(codes, bits, axis)
    hqq = aq.to_hqq(packed, bits, n, axis)
    assert hqq.shape[axis] == n // per
    np.testing.assert_array_equal(aq.from_hqq(hqq, bits, axis), packed)
    if bits < 8 and not signed:
        np.testing.assert_array_equal(hqq, _hqq_pack_ref(codes, bits, axis))


def test_hqq_examples():
    # Issue 10: codes [[1], [2]] packed along axis 0. HQQ gives 0x12; the low-bits-first
    # planar layout (optimum-quanto) gives 0x21.
    codes = np.array([[1], [2]], np.uint8)
    packed = aq.pack(codes, 4, axis=0)
    assert aq.to_hqq(packed, 4, 2).tolist() == [[0x12]]
    assert aq.to_planar(packed, 4, 2, axis=0).tolist() == [[0x21]]
    assert aq.unpack(aq.from_hqq(np.array([[0x12]], np.uint8), 4), 4, 2, 0,
                     signed=False).tolist() == [[1], [2]]
    two = aq.pack(np.array([1, 2, 3, 0], np.uint8), 2, 0)
    assert aq.to_hqq(two, 2, 4).tolist() == [0b01_10_11_00]
    one = aq.pack(np.array([1, 1, 0, 0, 0, 0, 0, 1], np.uint8), 1, 0)
    assert aq.to_hqq(one, 1, 8).tolist() == [0b1100_0001]
    assert aq.to_planar(one, 1, 8, 0).tolist() == [0b1000_0011]
    # Signed codes move as raw bit patterns: -1 is 0xF.
    assert aq.to_hqq(aq.pack(np.array([-1, 7], np.int8), 4, 0), 4, 2).tolist() == [0xF7]
    # bits=8 is the identity (HQQ's pack_8bit_u8).
    b = np.array([[3, 250]], np.uint8)
    np.testing.assert_array_equal(aq.to_hqq(b, 8, 1), b)
    np.testing.assert_array_equal(aq.from_hqq(b, 8), b)


def test_hqq_errors():
    with pytest.raises(ValueError, match="the HQQ layout needs a length that is a multiple of 4 "
                                         "for 2-bit values; got length 6"):
        aq.to_hqq(aq.pack(np.zeros((6, 2), np.uint8), 2, 0), 2, 6)
    with pytest.raises(ValueError, match="multiple of 8 for 1-bit values; got length 12"):
        aq.to_hqq(aq.pack(np.zeros(12, np.uint8), 1, 0), 1, 12)
    with pytest.raises(ValueError, match="multiple of 2 for 4-bit values; got length 3"):
        aq.to_hqq(aq.pack(np.zeros(3, np.uint8), 4), 4, 3)
    with pytest.raises(ValueError, match="packed has 2 bytes along axis 0, but 8 values of 4 bits "
                                         "need 4"):
        aq.to_hqq(np.zeros((2, 3), np.uint8), 4, 8)
    for bad in (-2, 2.0, True, None):
        with pytest.raises(ValueError, match=f"length must be a non-negative int; got {bad!r}"):
            aq.to_hqq(np.zeros(1, np.uint8), 4, bad)
    with pytest.raises(ValueError, match=r"bits must be one of \(1, 2, 4, 8\); got 3"):
        aq.to_hqq(np.zeros(3, np.uint8), 3, 8)
    with pytest.raises(ValueError, match=r"bits must be one of"):
        aq.from_hqq(np.zeros(3, np.uint8), 3)
    with pytest.raises(TypeError, match="uint8"):
        aq.to_hqq(np.zeros(3, np.int8), 4, 6)
    with pytest.raises(TypeError, match="expected packed uint8 bytes; got dtype int8"):
        aq.from_hqq(np.zeros(3, np.int8), 4)
    with pytest.raises(ValueError, match="axis=1 is out of range"):
        aq.from_hqq(np.zeros(3, np.uint8), 4, axis=1)


# ---------------------------------------------------------------- ONNX int4 / int2 bytes


def _onnx_pack(codes, bits):
    """ONNX int4 / int2 storage: the tensor flattened in C order, ``8 // bits`` consecutive
    elements per byte, the first in the least-significant bits, zero bits padding the
    last byte."""
    per = 8 // bits
    flat = codes.reshape(-1).astype(np.int64) & ((1 << bits) - 1)
    flat = np.concatenate([flat, np.zeros(-flat.size % per, np.int64)])
    groups = flat.reshape(-1, per)
    return sum(groups[:, k] << (k * bits) for k in range(per)).astype(np.uint8)


def _agrees_with_onnx(shape, axis, bits) -> bool:
    """The rule docs/packing.md states."""
    axis %= len(shape)
    before, after = math.prod(shape[:axis]), math.prod(shape[axis + 1 :])
    return after == 1 and (shape[axis] % (8 // bits) == 0 or before == 1)


@pytest.mark.parametrize(
    ("shape", "axis", "bits", "agrees"),
    [
        ((7,), 0, 4, True),  # 1-D: one row, padded at its end like ONNX
        ((7,), 0, 2, True),
        ((3, 6), -1, 4, True),  # rows fill whole bytes
        ((3, 8), -1, 2, True),
        ((2, 3, 4), -1, 2, True),
        ((1, 5), -1, 4, True),  # a single row
        ((4, 1), 0, 4, True),  # every later axis has size 1
        ((3, 5), -1, 4, False),  # each row padded: 3 x 3 bytes against ONNX's 8
        ((3, 6), -1, 2, False),
        ((6, 4), 0, 4, False),  # pairs run down columns, ONNX pairs along rows
        ((2, 4, 3), 1, 2, False),
    ],
)
def test_onnx_layout_agrees_only_where_documented(backend, call, shape, axis, bits, agrees):
    assert _agrees_with_onnx(shape, axis, bits) == agrees
    codes = np.random.default_rng(sum(shape)).integers(-(1 << (bits - 1)), 1 << (bits - 1),
                                                       shape).astype(np.int8)
    c = backend.asarray(codes)
    ours = backend.to_numpy(call(aq.pack)(c, bits, axis)).reshape(-1)
    onnx = _onnx_pack(codes, bits)
    assert (ours.shape == onnx.shape and np.array_equal(ours, onnx)) == agrees
    # Packing the flattened codes always gives ONNX's bytes.
    flat = call(aq.pack)(backend.xp.reshape(c, (-1,)), bits)
    np.testing.assert_array_equal(backend.to_numpy(flat), onnx)


@given(case=packing_cases())
def test_onnx_layout_where_the_rule_says(case):
    bits, signed, axis, codes = case
    if bits not in (2, 4) or not _agrees_with_onnx(codes.shape, axis, bits):
        return
    np.testing.assert_array_equal(aq.pack(codes, bits, axis).reshape(-1), _onnx_pack(codes, bits))
