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
