"""QArray: container behaviour, pytree registration and the lazy JAX import."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import arrayquant as aq


def test_import_does_not_import_jax_and_registers_after_jax_import():
    code = textwrap.dedent(
        """
        import sys
        import numpy as np
        import arrayquant as aq
        assert "jax" not in sys.modules, "import arrayquant imported jax"
        qa = aq.quantize(np.ones((2, 4), np.float32), "int4", axis=0)
        assert "jax" not in sys.modules
        import importlib.util
        assert importlib.util.find_spec("jax") is not None  # a probe must not use the hook up
        import jax
        leaves = jax.tree_util.tree_leaves(qa)
        assert len(leaves) == 3, leaves
        out = jax.jit(aq.dequantize)(qa)
        assert out.shape == (2, 4)
        print("ok")
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


def test_pytree_round_trip_keeps_static_metadata():
    jax = pytest.importorskip("jax")
    qa = aq.quantize(np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32),
                     "int4", group_size=3)
    leaves, treedef = jax.tree_util.tree_flatten(qa)
    assert len(leaves) == 3
    back = jax.tree_util.tree_unflatten(treedef, leaves)
    assert back.qtype == "int4" and back.shape == (4, 6) and back.block_shape == (1, 3)
    assert back.packed_axis == 1 and back.dtype == "float32"
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(qa)[0]]
    assert paths == [".data", ".scale", ".zero_point"]
    sym = aq.quantize(np.ones((2, 2), np.float32), "int8", symmetric=True)
    assert len(jax.tree_util.tree_leaves(sym)) == 2  # zero_point None has no leaf
    doubled = jax.tree_util.tree_map(lambda a: a, sym)
    assert isinstance(doubled, aq.QArray) and doubled.zero_point is None


def test_properties_and_repr():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    qa = aq.quantize(x, "uint8", axis=0)
    assert qa.ndim == 2 and qa.bits == 8 and not qa.symmetric
    assert qa.granularity == "per-axis(0)"
    assert aq.quantize(x, "int8").granularity == "per-tensor"
    assert aq.quantize(x, "int4", group_size=3).granularity == "per-group(3, axis=1)"
    assert "uint8" in repr(qa) and "per-axis(0)" in repr(qa)
    np.testing.assert_array_equal(qa.dequantize(), aq.dequantize(qa))
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        qa.qtype = "int4"


def test_qtypes():
    assert (aq.as_qtype("int4").qmin, aq.as_qtype("int4").qmax) == (-8, 7)
    assert (aq.as_qtype("uint2").qmin, aq.as_qtype("uint2").qmax) == (0, 3)
    assert aq.as_qtype(np.int8).name == "int8"
    assert aq.as_qtype(np.dtype("uint16")).storage == "uint16"
    import ml_dtypes

    assert aq.as_qtype(ml_dtypes.int4).name == "int4"
    assert aq.as_qtype(ml_dtypes.uint2).name == "uint2"
    jnp = pytest.importorskip("jax.numpy")
    assert aq.as_qtype(jnp.int8).name == "int8"
    assert aq.as_qtype(jnp.uint4).name == "uint4"
    import array_api_strict as xps

    assert aq.as_qtype(xps.int16).name == "int16"
    with pytest.raises(ValueError, match="unsupported quantized dtype"):
        aq.as_qtype(np.int32)


# ---------------------------------------------------------------- construction checks


def _parts():
    """The fields of a valid packed int4 QArray, (4, 6) in groups of 3: data (4, 3) uint8."""
    qa = aq.quantize(np.arange(24, dtype=np.float32).reshape(4, 6), "int4", group_size=3)
    return dict(data=qa.data, scale=qa.scale, zero_point=qa.zero_point, qtype="int4",
                shape=(4, 6), dtype="float32", block_shape=(1, 3), packed_axis=1)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"qtype": "int3"}, ValueError, r"qtype='int3' is not one of"),
        ({"qtype": np.float32}, ValueError, r"qtype=<class 'numpy.float32'> is not one of"),
        ({"dtype": None}, TypeError, r"dtype=None must be one of"),
        ({"scale": None}, TypeError, r"scale must be an array, got NoneType"),
        ({"data": [[1, 2, 3]] * 4}, TypeError, r"data must be an array, got list"),
        ({"shape": (4, 0)}, ValueError, r"shape=\(4, 0\) holds no element"),
        ({"shape": (-4, -6)}, ValueError, r"shape=\(-4, -6\) holds no element"),
        ({"shape": (4, 6.0)}, TypeError, r"shape=\(4, 6.0\) must be a tuple of ints"),
        ({"shape": 24}, TypeError, r"shape=24 must be a tuple of ints"),
        ({"shape": (4, True)}, TypeError, r"shape=\(4, True\) must be a tuple of ints"),
        ({"dtype": "int8"}, TypeError, r"dtype='int8' must be one of"),
        ({"block_shape": (1, 3, 1)}, ValueError, r"block_shape=\(1, 3, 1\) does not fit"),
        ({"block_shape": (0, 3)}, ValueError, r"block_shape=\(0, 3\) does not fit"),
        ({"block_shape": (1, 7)}, ValueError, r"1 <= block_shape\[d\] <= shape\[d\]"),
        ({"packed_axis": 2}, ValueError, r"packed_axis=2 is out of range .* \[-2, 1\]"),
        ({"packed_axis": 1.0}, TypeError, r"packed_axis=1.0 must be None or an int"),
        ({"qtype": "int8", "packed_axis": 1}, ValueError, r"only 2- and 4-bit codes are packed"),
        ({"qtype": "uint4", "zero_point": None}, ValueError,
         r"zero_point=None \(symmetric\) needs a signed qtype, not uint4"),
        ({"data": np.zeros((4, 6), np.uint8)}, ValueError,
         r"data has shape \(4, 6\); expected \(4, 3\) .*packed along axis 1"),
        ({"data": np.zeros((4, 3), np.int8)}, TypeError, r"data has dtype int8; expected uint8"),
        ({"packed_axis": None}, ValueError, r"data has shape \(4, 3\); expected \(4, 6\)"),
        ({"scale": np.ones((4, 3), np.float32)}, ValueError,
         r"scale has shape \(4, 3\); expected \(4, 2\) \(shape=\(4, 6\), block_shape=\(1, 3\)"),
        ({"scale": np.ones((4, 2), np.int32)}, TypeError, r"scale has dtype int32; expected"),
        ({"zero_point": np.zeros((4,), np.int8)}, ValueError, r"zero_point has shape \(4,\)"),
        ({"zero_point": np.zeros((4, 2), np.float32)}, TypeError,
         r"zero_point has dtype float32; expected int8"),
    ],
)
def test_invalid_construction_raises_a_clear_error(change, error, match):
    with pytest.raises(error, match=r"QArray .*" + match):
        aq.QArray(**{**_parts(), **change})


def test_construction_normalizes_lists_and_negative_axes():
    qa = aq.QArray(**{**_parts(), "shape": [4, np.int64(6)], "block_shape": [1, 3],
                      "packed_axis": -1})
    assert qa.shape == (4, 6) and qa.block_shape == (1, 3) and qa.packed_axis == 1
    assert all(type(n) is int for n in qa.shape)
    np.testing.assert_array_equal(qa.dequantize(), aq.QArray(**_parts()).dequantize())
    # Unpacked int4 codes (as a checkpoint may hold them) and 0-d arrays are fine.
    x = np.random.default_rng(1).standard_normal((3, 5)).astype(np.float32)
    w = aq.quantize(x, "int4", symmetric=True, axis=0)
    aq.QArray(w.codes, w.scale, None, "int4", w.shape, "float32", w.block_shape, None)
    s = aq.quantize(np.float32(2.5), "int8")
    assert aq.QArray(s.data, s.scale, s.zero_point, *s._static()).shape == ()


def test_jax_rebuilds_qarrays_from_any_leaves():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    qa = aq.quantize(np.arange(24, dtype=np.float32).reshape(4, 6), "int4", group_size=3)
    shapes = jax.tree.map(lambda a: a.shape, qa)
    assert shapes.data == (4, 3) and shapes.scale == (4, 2)
    assert jax.tree.map(lambda a: None, qa).zero_point is None
    assert jax.tree.map(lambda a: 1, qa).data == 1
    sentinel = object()
    assert jax.tree.map(lambda a: sentinel, qa).scale is sentinel
    assert jax.eval_shape(lambda q: q, qa).data == jax.ShapeDtypeStruct((4, 3), jnp.uint8)
    on_jax = jax.tree.map(jnp.asarray, qa)
    np.testing.assert_array_equal(aq.dequantize(on_jax), aq.dequantize(qa))
    # jit returning a QArray, and vmap giving arrays with a leading batch axis.
    xs = jnp.asarray(np.random.default_rng(2).standard_normal((3, 4, 6)), jnp.float32)
    jq = jax.jit(lambda x: aq.quantize(x, "int4", group_size=3))(xs[0])
    assert isinstance(jq, aq.QArray) and jq.data.shape == (4, 3)
    vq = jax.vmap(aq.quantize)(xs)
    assert vq.data.shape == (3, 4, 6) and vq.scale.shape == (3, 1, 1) and vq.shape == (4, 6)
    vq4 = jax.vmap(lambda x: aq.quantize(x, "int4", group_size=3))(xs)
    assert vq4.data.shape == (3, 4, 3)
    np.testing.assert_array_equal(jax.vmap(aq.dequantize)(vq4)[1], aq.dequantize(
        aq.quantize(xs[1], "int4", group_size=3)))


def test_a_qtype_given_as_an_integer_dtype_is_normalized_to_its_name():
    codes = np.zeros((2, 3), np.int8)
    qa = aq.QArray(codes, np.ones((1, 1), np.float32), None, np.int8, (2, 3), np.float32, (2, 3))
    assert qa.qtype == "int8" and qa.dtype == "float32"
    np.testing.assert_array_equal(aq.dequantize(qa), np.zeros((2, 3), np.float32))


def test_qtype_kind():
    qt = aq.as_qtype("uint4")
    assert (qt.kind, qt.bits, qt.signed, qt.qmin, qt.qmax) == ("int", 4, False, 0, 15)
    with pytest.raises(ValueError, match="unknown qtype kind 'float'"):
        aq.QType(4, True, "float")
