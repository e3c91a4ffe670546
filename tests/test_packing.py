"""pack / unpack, the packed QArray, and the interop layout converters."""

from __future__ import annotations

import numpy as np
import pytest
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
