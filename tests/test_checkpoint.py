"""save / load / quantize_checkpoint: round trips, atomic writes, hostile files, streaming."""

from __future__ import annotations

import json
import os
import pathlib
import struct
import tempfile
import warnings

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import arrayquant as aq
from arrayquant.checkpoint import FORMAT_VERSION, CheckpointError
from arrayquant.checkpoint.stfile import StreamWriter, digest
from arrayquant.linear_weight import LinearWeight
from arrayquant.qtypes import QTYPE_NAMES

safetensors_numpy = pytest.importorskip("safetensors.numpy")

RNG = np.random.default_rng(1)


def _f32(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def _assert_array_equal(x, y):
    if x is None:
        assert y is None
    else:
        x = np.asarray(x)
        assert isinstance(y, np.ndarray) and y.dtype == x.dtype and y.shape == x.shape
        np.testing.assert_array_equal(y, x)


def assert_leaf_equal(a, b):
    if isinstance(a, LinearWeight):
        assert isinstance(b, LinearWeight) and a._static() == b._static()
        assert_leaf_equal(a.qweight, b.qweight)
        for name in ("in_scale", "perm", "act_scale", "act_zero_point"):
            _assert_array_equal(getattr(a, name), getattr(b, name))
    elif isinstance(a, aq.QArray):
        assert isinstance(b, aq.QArray)
        assert a._static() == b._static()
        for name in ("data", "scale", "zero_point"):
            _assert_array_equal(getattr(a, name), getattr(b, name))
    else:
        _assert_array_equal(a, b)


def assert_tree_equal(a, b):
    if isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b)
        for k in a:
            assert_tree_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_tree_equal(x, y)
    elif a is None:
        assert b is None
    else:
        assert_leaf_equal(a, b)


def _nested(depth, leaf):
    for _ in range(depth):
        leaf = {"k": leaf}
    return leaf


def _tree():
    return {
        "encoder": {
            "w8": aq.quantize(_f32(16, 24), "int8", symmetric=True, axis=0),
            "w4": aq.quantize(_f32(5, 37), "int4", group_size=16),  # partial group, odd length
            "w2": aq.quantize(_f32(3, 4, 9), "uint2", axis=(0, 2)),
            "w16": aq.quantize(_f32(6, 6).astype(np.float64), "int16", scale_dtype="float16"),
            "bias": _f32(24),
        },
        "layers": [
            aq.quantize(_f32(8, 8).astype(ml_dtypes.bfloat16), "uint4", group_size=3,
                        group_axis=0),
            (np.arange(6, dtype=np.int64).reshape(2, 3), None),
        ],
        "flags": np.array([True, False]),
        "half": _f32(3).astype(np.float16),
        "bf": _f32(4).astype(ml_dtypes.bfloat16),
        "scalar": np.float32(2.5) * np.ones((), np.float32),
    }


# ---------------------------------------------------------------- round trips


def test_round_trip_nested_tree(tmp_path):
    tree = _tree()
    f = tmp_path / "m.safetensors"
    aq.save(f, tree)
    assert_tree_equal(tree, aq.load(f))
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary left


def test_flat_dict_is_stored_without_a_tree_and_readable_by_safetensors(tmp_path):
    tree = {"encoder.layer.0.weight": aq.quantize(_f32(8, 8), "int4"),
            "encoder.layer.0.bias": _f32(8)}
    f = tmp_path / "flat.safetensors"
    aq.save(f, tree)
    raw = safetensors_numpy.load_file(f)  # any safetensors reader sees plain tensors
    assert sorted(raw) == ["encoder.layer.0.bias", "encoder.layer.0.weight:data",
                           "encoder.layer.0.weight:scale", "encoder.layer.0.weight:zero_point"]
    np.testing.assert_array_equal(raw["encoder.layer.0.weight:data"],
                                  tree["encoder.layer.0.weight"].data)
    header, _ = _read_raw(f)
    doc = json.loads(header["__metadata__"]["arrayquant"])
    assert doc["version"] == FORMAT_VERSION and doc["tree"] is None
    assert doc["leaves"][0] == {
        "path": "encoder.layer.0.weight", "kind": "qarray", "qtype": "int4",
        "dtype": "float32", "shape": [8, 8], "block_shape": [8, 8], "packed_axis": 1,
        "data": "encoder.layer.0.weight:data", "scale": "encoder.layer.0.weight:scale",
        "zero_point": "encoder.layer.0.weight:zero_point",
    }
    assert_tree_equal(tree, aq.load(f))


def test_plain_safetensors_file_loads_as_flat_dict(tmp_path):
    t = {"b": _f32(3), "a": np.arange(4, dtype=np.int32), "c": _f32(2).astype(ml_dtypes.bfloat16)}
    safetensors_numpy.save_file(t, tmp_path / "plain.safetensors")
    out = aq.load(tmp_path / "plain.safetensors")
    assert set(out) == set(t)
    for k in t:
        assert_leaf_equal(t[k], out[k])
    info = aq.checkpoint_info(tmp_path / "plain.safetensors")
    assert info.kind == "safetensors" and info.version is None and len(info.leaves) == 3


_granularity = st.one_of(
    st.just({}),
    st.integers(0, 2).map(lambda a: {"axis": a}),
    st.tuples(st.integers(1, 5), st.integers(0, 2)).map(
        lambda t: {"group_size": t[0], "group_axis": t[1]}
    ),
)


@st.composite
def _qarrays(draw):
    shape = draw(st.lists(st.integers(1, 7), min_size=1, max_size=3).map(tuple))
    dtype = draw(st.sampled_from(["float32", "float16", "float64"]))
    x = draw(hnp.arrays(dtype, shape, elements=st.floats(-1e3, 1e3, width=16)))
    qtype = draw(st.sampled_from(QTYPE_NAMES))
    symmetric = draw(st.booleans()) and not qtype.startswith("u")
    gran = draw(_granularity)
    gran = {k: (v % len(shape) if k.endswith("axis") else v) for k, v in gran.items()}
    scale_dtype = draw(st.sampled_from(["float32", "float16"]))
    return aq.quantize(x, qtype, symmetric, scale_dtype=scale_dtype, **gran)


@given(st.lists(_qarrays(), min_size=1, max_size=3), st.booleans())
def test_round_trip_property(qarrays, nested):
    tree = {f"q{i}": q for i, q in enumerate(qarrays)}
    if nested:
        tree = {"a": [tree, (qarrays[0],)]}
    with tempfile.TemporaryDirectory() as tmp:
        f = pathlib.Path(tmp) / "p.safetensors"
        aq.save(f, tree)
        back = aq.load(f)
        info = aq.checkpoint_info(f)
    assert_tree_equal(tree, back)
    assert info.kind == "arrayquant" and all(leaf.quantized for leaf in info.leaves)
    for q, leaf in zip(qarrays, info.leaves):
        assert leaf.nbytes == q.nbytes and leaf.granularity == q.granularity


def test_jax_arrays_and_generic_pytrees(tmp_path):
    jax = pytest.importorskip("jax")
    eqx = pytest.importorskip("equinox")
    import jax.numpy as jnp

    tree = {"w": aq.quantize(jnp.asarray(_f32(4, 8)), "int4", group_size=4), "b": jnp.ones(3)}
    aq.save(tmp_path / "j.safetensors", tree)
    back = aq.load(tmp_path / "j.safetensors")
    np.testing.assert_array_equal(back["w"].data, np.asarray(tree["w"].data))
    # Traced values cannot be saved.
    with pytest.raises(TypeError, match="traced"):
        jax.jit(lambda t: aq.save(tmp_path / "t.safetensors", t))({"x": jnp.ones(2)})
    assert not (tmp_path / "t.safetensors").exists()

    model = eqx.nn.MLP(4, 2, 8, 1, key=jax.random.key(0))
    qmodel = aq.quantize_tree(model, aq.Rule(include="weight", dtype="int8", axis=0))
    f = tmp_path / "mlp.safetensors"
    aq.save(f, qmodel)
    flat = aq.load(f)  # no structure stored for a generic pytree: leaves by path
    assert list(flat) == aq.tree_paths(qmodel) == ["layers/0/weight", "layers/0/bias",
                                                   "layers/1/weight", "layers/1/bias"]
    back = aq.load(f, like=model)  # rebuilt in the template's structure
    assert type(back) is type(model)
    assert_leaf_equal(qmodel.layers[0].weight, back.layers[0].weight)
    x = jnp.ones((3, 4))
    np.testing.assert_allclose(
        jax.vmap(aq.dequantize_tree(back))(x),
        jax.vmap(aq.dequantize_tree(qmodel))(x), rtol=1e-6,
    )
    with pytest.raises(CheckpointError, match="template has a leaf"):
        aq.load(f, like={"other": np.zeros(1)} | {p: np.zeros(1) for p in flat})
    with pytest.raises(CheckpointError, match="which the template does not have"):
        aq.load(f, like={"layers/0/weight": np.zeros(1)})


@pytest.mark.parametrize(
    ("tree", "error", "match"),
    [
        (np.zeros(3), TypeError, "not a single array"),
        ({1: np.zeros(3)}, TypeError, "dict keys must be strings"),
        ({"a": 3.0}, TypeError, "cannot save 'a' of type float"),
        ({"a": np.zeros(2, np.complex64)}, TypeError, "dtype complex64"),
        ({"a/b": np.zeros(1), "a": {"b": np.zeros(1)}}, ValueError, "share the path 'a/b'"),
        ({"w": aq.quantize(np.ones((2, 2), np.float32)), "w:data": np.zeros(1)}, ValueError,
         "tensor name 'w:data'"),
        # What load() would reject is never written (issue 9, item 3).
        ({"w": aq.QArray(np.zeros((2, 2), np.int8), np.zeros((1, 1), np.float32), None, "int8",
                         (2, 2), "float32", (2, 2))}, ValueError,
         r"cannot save 'w': scales outside \[4.70198e-38, 8.50706e\+37\].*load\(\) would reject"),
        ({"w": aq.QArray(np.full((2, 2), -128, np.int8), np.ones((1, 1), np.float32), None,
                         "int8", (2, 2), "float32", (2, 2))}, ValueError,
         r"codes outside \[-127, 127\] .* for int8 symmetric"),
        ({"w": aq.QArray(np.zeros((2, 2), np.uint8), np.ones((1, 1), np.float16),
                         np.full((1, 1), 200, np.uint8), "uint4", (2, 2), "float32", (2, 2))},
         ValueError, r"zero points outside \[0, 15\]"),
        ({"a": _nested(101, np.zeros(1))}, ValueError, "nested more than 100 levels deep"),
    ],
)
def test_save_errors(tmp_path, tree, error, match):
    with pytest.raises(error, match=match):
        aq.save(tmp_path / "e.safetensors", tree)
    assert list(tmp_path.iterdir()) == []


def test_save_is_atomic(tmp_path, monkeypatch):
    f = tmp_path / "m.safetensors"
    aq.save(f, {"a": np.ones(3)})
    before = f.read_bytes()
    real_write = StreamWriter.write

    def crash(self, name, a):
        real_write(self, name, a)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(StreamWriter, "write", crash)
    with pytest.raises(OSError, match="No space left"):
        aq.save(f, {"a": np.zeros(3)})
    assert f.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_save_on_a_full_disk_raises_oserror_not_safetensors_error(tmp_path):
    """Issue 9 (7): /dev/full fails every write with ENOSPC, as a full disk does."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    import arrayquant._io as aio

    class Full:
        def __init__(self, *a, **k):
            self._fh = open("/dev/full", "wb")  # noqa: SIM115

        def __getattr__(self, name):
            return getattr(self._fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._fh.close()

    f = tmp_path / "m.safetensors"
    import builtins

    real_open = builtins.open

    def fake_open(path, mode="r", *a, **k):
        if "w" in mode and str(path).startswith(str(tmp_path / ".m.safetensors")):
            return Full()
        return real_open(path, mode, *a, **k)

    try:
        builtins.open = fake_open
        with pytest.raises(OSError) as info:
            aq.save(f, {"a": np.ones(1 << 16)})
    finally:
        builtins.open = real_open
    assert info.value.errno == 28 and type(info.value).__module__ == "builtins"
    assert not f.exists() and list(tmp_path.iterdir()) == []
    assert aio is not None


# ---------------------------------------------------------------- hostile files


def _read_raw(path):
    raw = pathlib.Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write_raw(path, header, data):
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    pathlib.Path(path).write_bytes(struct.pack("<Q", len(text)) + text + data)


def _canonical(obj):
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _resign(header, data):
    """Recompute the digests after an edit, as a hostile writer who knows the format would."""
    try:
        doc = json.loads(header["__metadata__"]["arrayquant"])
    except (KeyError, TypeError, ValueError):
        return
    if not isinstance(doc, dict) or not isinstance(doc.get("digests"), dict):
        return
    body = {k: doc[k] for k in ("version", "leaves", "tree") if k in doc}
    # The metadata digest covers the tensors' dtypes and shapes from the header too.
    body["tensors"] = {name: [e["dtype"], e["shape"]] for name, e in sorted(header.items())
                       if name != "__metadata__"}
    doc["digests"]["metadata"] = digest(np.frombuffer(_canonical(body).encode(), np.uint8))
    doc["digests"]["tensors"] = {
        name: digest(np.frombuffer(data[e["data_offsets"][0] : e["data_offsets"][1]], np.uint8))
        for name, e in header.items() if name != "__metadata__"
    }
    header["__metadata__"]["arrayquant"] = json.dumps(doc)


def _edit(path, edit_doc=None, edit_header=None, edit_data=None, resign=True):
    """Edit a checkpoint's metadata, header or data; by default re-sign the digests, so
    that the edit itself (not the digest check) is what load() has to catch."""
    header, data = _read_raw(path)
    if edit_doc is not None:
        doc = json.loads(header["__metadata__"]["arrayquant"])
        edit_doc(doc)
        header["__metadata__"]["arrayquant"] = json.dumps(doc)
    if edit_header is not None:
        edit_header(header)
    if edit_data is not None:
        data = bytearray(data)
        edit_data(header, data)
        data = bytes(data)
    if resign:
        _resign(header, data)
    _write_raw(path, header, data)


def _leaf(doc, path):
    return next(e for e in doc["leaves"] if e["path"] == path)


def _set_bytes(name, index, value, dtype):
    def edit(header, data):
        start = header[name]["data_offsets"][0] + index * np.dtype(dtype).itemsize
        data[start : start + np.dtype(dtype).itemsize] = np.array(value, dtype).tobytes()
    return edit


def _set_meta(key, value):
    def edit(header):
        header["__metadata__"][key] = value
    return edit


@pytest.fixture
def good(tmp_path):
    """A small valid checkpoint with one leaf of every kind worth corrupting."""
    w8 = aq.quantize(_f32(4, 6), "int8", symmetric=True, axis=0)
    w4 = aq.quantize(_f32(3, 5), "int4", symmetric=True, axis=0)  # packed, 1 padding nibble
    u4 = aq.quantize(_f32(2, 8), "uint4", group_size=4)
    i4 = aq.QArray(w4.codes, w4.scale, None, "int4", w4.shape, "float32", w4.block_shape, None)
    f = tmp_path / "good.safetensors"
    aq.save(f, {"w8": w8, "w4": w4, "u4": u4, "i4": i4, "bias": _f32(6),
                "nested": [np.zeros(2)], "flags": np.array([True, False])})
    return f


CORRUPTIONS = {
    "bad JSON": (dict(edit_header=_set_meta("arrayquant", "{not json")), "not valid JSON"),
    "not an object": (dict(edit_header=_set_meta("arrayquant", "[1, 2]")), "JSON object"),
    "newer version": (dict(edit_doc=lambda d: d.update(version=FORMAT_VERSION + 1)),
                      f"format version {FORMAT_VERSION + 1}; this arrayquant reads versions "
                      "1, 2, 3"),
    "bad version": (dict(edit_doc=lambda d: d.update(version="1")), "'version' must be"),
    "leaves not a list": (dict(edit_doc=lambda d: d.update(leaves={})), "'leaves' must be"),
    "leaf not an object": (dict(edit_doc=lambda d: d["leaves"].append(3)), "leaf #7"),
    "unknown kind": (dict(edit_doc=lambda d: _leaf(d, "bias").update(kind="pickle")),
                     "'kind' must be"),
    "unknown qtype": (dict(edit_doc=lambda d: _leaf(d, "w8").update(qtype="int3")),
                      "unknown qtype 'int3'"),
    "bad float dtype": (dict(edit_doc=lambda d: _leaf(d, "w8").update(dtype="int8")),
                        "'dtype' must be one of"),
    "shape not ints": (dict(edit_doc=lambda d: _leaf(d, "w8").update(shape=[4, "6"])),
                       "shape must be a list of non-negative ints"),
    "bool in shape": (dict(edit_doc=lambda d: _leaf(d, "w8").update(shape=[4, True])),
                      "shape must be"),
    "empty shape": (dict(edit_doc=lambda d: _leaf(d, "w8").update(shape=[0, 6])), "is empty"),
    "shape vs data": (dict(edit_doc=lambda d: _leaf(d, "w8").update(shape=[6, 4],
                                                                   block_shape=[1, 4])),
                      r"tensor 'w8:data' has shape \[4, 6\], expected \[6, 4\]"),
    "block rank": (dict(edit_doc=lambda d: _leaf(d, "w8").update(block_shape=[1])),
                   r"block_shape \[1\] has 1 entries, expected 2"),
    "block too big": (dict(edit_doc=lambda d: _leaf(d, "w8").update(block_shape=[1, 7])),
                      r"block_shape\[1\] = 7 must be in \[1, 6\]"),
    "block vs scale": (dict(edit_doc=lambda d: _leaf(d, "w8").update(block_shape=[2, 6])),
                       r"tensor 'w8:scale' has shape \[4, 1\], expected \[2, 1\]"),
    "packed int8": (dict(edit_doc=lambda d: _leaf(d, "w8").update(packed_axis=1)),
                    "packed_axis must be null for int8"),
    "packed axis range": (dict(edit_doc=lambda d: _leaf(d, "w4").update(packed_axis=2)),
                          r"packed_axis must be null or an int in \[0, 2\)"),
    "unpacked int4 data": (dict(edit_doc=lambda d: _leaf(d, "w4").update(packed_axis=None)),
                           "tensor 'w4:data' has dtype uint8, expected int8"),
    "data dtype": (dict(edit_header=lambda h: h["w8:data"].update(dtype="U8")),
                   "tensor 'w8:data' has dtype uint8, expected int8"),
    "scale dtype": (dict(edit_header=lambda h: h["w8:scale"].update(dtype="I32")),
                    "tensor 'w8:scale' has dtype int32, expected float16 or"),
    "missing tensor": (dict(edit_header=lambda h: h.update(gone=h.pop("u4:zero_point"))),
                       "tensor 'u4:zero_point' is missing"),
    "tensor name not str": (dict(edit_doc=lambda d: _leaf(d, "u4").update(scale=7)),
                            "field 'scale' must name the tensor 'u4:scale', got 7"),
    "tensor not named by path": (dict(edit_doc=lambda d: _leaf(d, "u4").update(scale="w8:scale")),
                                 "field 'scale' must name the tensor 'u4:scale'"),
    "unreferenced tensor": (dict(edit_doc=lambda d: d["leaves"].remove(_leaf(d, "bias"))),
                            "tensor 'bias' is not described"),
    "tensor used twice": (dict(edit_doc=lambda d: _leaf(d, "nested/0").update(tensor="bias")),
                          "field 'tensor' must be the leaf's path 'nested/0', got 'bias'"),
    "duplicate path": (dict(edit_doc=lambda d: d["leaves"].append(dict(_leaf(d, "bias")))),
                       "two leaves have the path 'bias'"),
    "unknown leaf field": (dict(edit_doc=lambda d: _leaf(d, "w8").update(note="hi")),
                           "unknown: 'note'"),
    "missing leaf field": (dict(edit_doc=lambda d: _leaf(d, "w8").pop("packed_axis")),
                           "missing: 'packed_axis'"),
    "unknown doc field": (dict(edit_doc=lambda d: d.update(extra=1)), "unknown: 'extra'"),
    "unsigned without zero point": (dict(edit_doc=lambda d: _leaf(d, "u4").update(
                                        zero_point=None)),
                                    "uint4 is unsigned, so it needs a zero point"),
    "tree bad node": (dict(edit_doc=lambda d: d.update(tree={"type": "set", "items": []})),
                      "whose 'type' is one of"),
    "tree unknown leaf": (dict(edit_doc=lambda d: d["tree"]["items"][0][1].update(path="zz")),
                          "refers to leaf 'zz'"),
    "tree leaf elsewhere": (dict(edit_doc=lambda d: d["tree"]["items"][1][1].update(path="w8")),
                            "tree leaf at 'w4' refers to leaf 'w8'"),
    "tree duplicate key": (dict(edit_doc=lambda d: d["tree"]["items"].__setitem__(
                               1, ["w8", {"type": "leaf", "path": "w8"}])),
                           "the dict at 'the root' has the key 'w8' twice"),
    "tree path not a string": (dict(edit_doc=lambda d: d["tree"]["items"][0][1].update(
                                   path=["w8"])),
                               "'path' must be a string, got \\['w8'\\]"),
    "tree node field": (dict(edit_doc=lambda d: d["tree"]["items"][0][1].update(x=1)),
                        "unknown: 'x'"),
    "tree leaf missing": (dict(edit_doc=lambda d: d["tree"]["items"].pop(0)),
                          "leaf 'w8' is missing from the 'tree'"),
    "symmetric -128": (dict(edit_data=_set_bytes("w8:data", 5, -128, np.int8)),
                       r"codes outside \[-127, 127\].*int8 symmetric"),
    "unpacked int4 range": (dict(edit_data=_set_bytes("i4:data", 2, 9, np.int8)),
                            r"codes outside \[-7, 7\]"),
    "packed symmetric -8": (dict(edit_data=_set_bytes("w4:data", 0, 0x08, np.uint8)),
                            r"codes outside \[-7, 7\]"),
    "padding bits": (dict(edit_data=_set_bytes("w4:data", 2, 0x70, np.uint8)),
                     "padding bits"),
    "zero point range": (dict(edit_data=_set_bytes("u4:zero_point", 1, 16, np.uint8)),
                         r"zero points outside \[0, 15\]"),
    "NaN scale": (dict(edit_data=_set_bytes("w8:scale", 2, np.nan, np.float32)),
                  r"scales outside \[4.70198e-38, 8.50706e\+37\]"),
    "negative scale": (dict(edit_data=_set_bytes("u4:scale", 0, -1.0, np.float32)),
                       "scales outside"),
    "zero scale": (dict(edit_data=_set_bytes("w4:scale", 1, 0.0, np.float32)),
                   "scales outside"),
    "scale above the cap": (dict(edit_data=_set_bytes("w8:scale", 1, 3e38, np.float32)),
                            r"scales outside .*for float32 scales of float32 values"),
    "subnormal scale": (dict(edit_data=_set_bytes("w8:scale", 1, 1e-40, np.float32)),
                        "scales outside"),
    "bool byte 2": (dict(edit_data=_set_bytes("flags", 1, 2, np.uint8)),
                    "'flags' is boolean but holds bytes other than 0 and 1"),
    "NaN literal": (dict(edit_header=lambda h: h["__metadata__"].update(
                        arrayquant=h["__metadata__"]["arrayquant"].replace(
                            f'"version":{FORMAT_VERSION}', '"version":NaN')), resign=False),
                    "NaN is not a JSON number"),
    "JSON duplicate key": (dict(edit_header=lambda h: h["__metadata__"].update(
                               arrayquant=h["__metadata__"]["arrayquant"].replace(
                                   f'"version":{FORMAT_VERSION}',
                                   f'"version":{FORMAT_VERSION},"version":2')), resign=False),
                           "the key 'version' appears twice"),
    "deep nesting": (dict(edit_header=lambda h: h["__metadata__"].update(
                         arrayquant='{"version": 2, "x": ' + "[" * 1000 + "]" * 1000 + "}"),
                     resign=False),
                     "nested too deeply; arrayquant reads at most 303"),
    "version 1 with digests": (dict(edit_doc=lambda d: d.update(version=1)),
                               "unknown: 'digests'"),
    "version 2 without digests": (dict(edit_doc=lambda d: d.pop("digests")),
                                  "missing: 'digests'"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_load_rejects_corrupted_files(good, case):
    edits, match = CORRUPTIONS[case]
    aq.load(good)  # valid before
    _edit(good, **edits)
    with pytest.raises(CheckpointError, match=match) as info:
        aq.load(good)
    assert str(good) in str(info.value)


def _container(header: bytes, data_bytes: int) -> bytes:
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + b"\0" * data_bytes


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda raw: raw[:-3], "not a valid safetensors file"),  # truncated data
        (lambda raw: raw[:40], "header length field says .* the file holds only 32"),
        (lambda raw: b"", "0 bytes is too short for a safetensors file"),
        (lambda raw: b"\x00" * 7, "7 bytes is too short"),
        (lambda raw: struct.pack("<Q", 1 << 62) + raw[8:], "header length field says"),
        (lambda raw: struct.pack("<Q", 8) + b'{"a":1} ', "must hold exactly 'dtype', 'shape'"),
        (lambda raw: _container(b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,9]}}', 8),
         "not a valid safetensors file"),  # offsets that do not fit the data
        (lambda raw: os.urandom(64), "header length field says|not valid JSON"),
        (lambda raw: raw[:8] + b"[" + raw[9:], "safetensors header is not valid JSON"),
    ],
)
def test_load_rejects_broken_containers(good, make, match):
    """Broken at the safetensors level (checked by arrayquant's strict reader, then by
    safetensors itself)."""
    good.write_bytes(make(good.read_bytes()))
    with pytest.raises(CheckpointError, match=match):
        aq.load(good)
    with pytest.raises(CheckpointError, match=match):
        aq.checkpoint_info(good)


def test_load_errors_for_missing_files_and_odd_dtypes(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        aq.load(tmp_path / "nope.safetensors")
    f = tmp_path / "f8.safetensors"
    _write_raw(f, {"x": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}, b"\0\0")
    with pytest.raises(CheckpointError, match="dtype F8_E4M3, which arrayquant does not read"):
        aq.load(f)


def test_checkpoint_info_reads_headers_only(good):
    info = aq.checkpoint_info(good)
    assert info.kind == "arrayquant" and info.version == FORMAT_VERSION
    by_path = {leaf.path: leaf for leaf in info.leaves}
    assert by_path["w4"].packed_axis == 1 and by_path["w4"].symmetric
    assert by_path["u4"].tensors == ("u4:data", "u4:scale", "u4:zero_point")
    assert by_path["u4"].granularity == "per-group(4, axis=1)"
    assert by_path["bias"].nbytes == by_path["bias"].float_nbytes == 24
    assert info.file_size == good.stat().st_size
    # Value checks need the data: the header alone looks fine.
    _edit(good, edit_data=_set_bytes("w8:scale", 0, np.nan, np.float32))
    aq.checkpoint_info(good)
    with pytest.raises(CheckpointError):
        aq.load(good)


def test_the_deepest_tree_save_writes_loads(tmp_path):
    f = tmp_path / "deep.safetensors"
    tree = {"a": _nested(99, np.arange(3))}  # the leaf sits at depth 100
    aq.save(f, tree)
    assert_tree_equal(tree, aq.load(f))


def _two_leaves_one_key(doc):
    """Issue 9 (1): a dict node with two items named "k" pointing at leaves a and b."""
    doc["tree"] = {"type": "dict", "items": [["k", {"type": "leaf", "path": "a"}],
                                             ["k", {"type": "leaf", "path": "b"}]]}


@pytest.mark.parametrize("resign", [True, False])
def test_a_repeated_dict_key_never_drops_a_leaf(tmp_path, capsys, resign):
    f = tmp_path / "m.safetensors"
    aq.save(f, {"a": np.zeros(2), "b": {"c": np.ones(2)}})
    _edit(f, edit_doc=lambda d: (_two_leaves_one_key(d), _leaf(d, "b/c").update(
        path="b", tensor="b")), edit_header=lambda h: h.update(b=h.pop("b/c")), resign=resign)
    # Re-signed, the structure check catches it; left unsigned, the metadata digest does.
    match = "tree leaf at 'k' refers to leaf 'a'" if resign else "does not match its digest"
    for read in (aq.load, aq.checkpoint_info):
        with pytest.raises(CheckpointError, match=match):
            read(f)
    from arrayquant.apps import cli
    assert cli.main(["inspect", str(f), "--verify"]) == 1
    assert "verified" not in capsys.readouterr().out


def test_a_repeated_dict_key_in_a_version_1_file(tmp_path):
    """Version-1 files have no digests: the structure check alone must catch it."""
    f = tmp_path / "v1.safetensors"
    f.write_bytes((pathlib.Path(__file__).parent / "data" / "checkpoint_v1.safetensors")
                  .read_bytes())
    _edit(f, edit_doc=lambda d: d["tree"]["items"][0][1]["items"].__setitem__(
        1, ["w", {"type": "leaf", "path": "layer/w8"}]))
    with pytest.raises(CheckpointError, match="has the key 'w' twice"):
        aq.load(f)


def test_version_1_files_still_load_bit_exactly():
    """tests/data/checkpoint_v1.safetensors was written by the format-1 writer (commit
    b5edc57) from exactly this tree; it must keep loading as the same values."""
    rng = np.random.default_rng(1)
    expected = {
        "layer": {
            "w": aq.quantize(rng.standard_normal((4, 10)).astype(np.float32), "int4",
                             group_size=4),
            "w8": aq.quantize(rng.standard_normal((3, 5)).astype(np.float32), "int8", True,
                              axis=0),
            "b": np.arange(3, dtype=np.float32),
        },
        "mask": np.array([True, False]),
        "items": [np.float16(1.5) * np.ones(2, np.float16), None],
    }
    f = pathlib.Path(__file__).parent / "data" / "checkpoint_v1.safetensors"
    assert aq.checkpoint_info(f).version == 1 and aq.checkpoint_info(f).integrity is None
    assert_tree_equal(expected, aq.load(f))


def test_digests_catch_damaged_bytes_and_verify_false_skips_them(good):
    before = aq.load(good)
    assert aq.checkpoint_info(good).integrity == "sha256"
    _edit(good, edit_data=_set_bytes("bias", 2, 7.0, np.float32), resign=False)
    with pytest.raises(CheckpointError, match="tensor 'bias' does not match its digest"):
        aq.load(good)
    changed = aq.load(good, verify=False)  # what a damaged version-1 file would give
    assert changed["bias"][2] == 7.0 and before["bias"][2] != 7.0
    _edit(good, edit_doc=lambda d: _leaf(d, "u4").update(block_shape=[1, 8]), resign=False)
    for read in (aq.load, aq.checkpoint_info):
        with pytest.raises(CheckpointError, match="the metadata does not match its digest"):
            read(good)


@pytest.mark.parametrize("edit", [
    lambda h: h["__metadata__"].update(arrayquantx=h["__metadata__"].pop("arrayquant")),
    lambda h: h["__metadata__"].update(format="arrayquanu"),
    lambda h: h["__metadata__"].update(formau=h["__metadata__"].pop("format")),
])
def test_one_damaged_mark_never_turns_a_checkpoint_into_a_plain_file(good, edit):
    _edit(good, edit_header=edit, resign=False)
    with pytest.raises(CheckpointError, match="changed or damaged"):
        aq.load(good)


# ---------------------------------------------------------------- streaming


def _float_checkpoint(path, fmt="safetensors"):
    t = {
        "embeddings.weight": _f32(40, 16),
        "layer.0.weight": _f32(32, 16),
        "layer.0.bias": _f32(32),
        "layer.1.weight": _f32(16, 33),
        "positions": np.arange(10, dtype=np.int64),
        "half.weight": _f32(8, 8).astype(np.float16),
    }
    if fmt == "npz":
        np.savez(path, **t)
    else:
        safetensors_numpy.save_file(t, path)
    return t


@pytest.mark.parametrize("fmt", ["safetensors", "npz"])
def test_quantize_checkpoint_matches_quantize_tree(tmp_path, fmt):
    src = tmp_path / f"in.{fmt}"
    t = _float_checkpoint(src, fmt)
    rules = [aq.Rule(include="embeddings", dtype=None), aq.Rule(dtype="int4", group_size=8)]
    report = aq.quantize_checkpoint(src, tmp_path / "out.safetensors", rules)
    out = aq.load(tmp_path / "out.safetensors")
    expected = aq.quantize_tree(t, rules)
    assert set(out) == set(expected)
    for k in expected:
        assert_leaf_equal(expected[k], out[k])
    ref = aq.tree_report(t, expected)
    assert sorted(report.rows, key=lambda r: r.path) == sorted(ref.rows, key=lambda r: r.path)
    assert report.n_quantized == 3 and report.n_skipped == 3
    info = aq.checkpoint_info(tmp_path / "out.safetensors")
    (header_len,) = struct.unpack("<Q", (tmp_path / "out.safetensors").read_bytes()[:8])
    assert info.file_size == 8 + header_len + sum(leaf.nbytes for leaf in info.leaves)
    assert sum(leaf.nbytes for leaf in info.leaves) < sum(a.nbytes for a in t.values())


def test_quantize_checkpoint_bfloat16_input(tmp_path):
    t = {"w": _f32(6, 8).astype(ml_dtypes.bfloat16), "b": _f32(6).astype(ml_dtypes.bfloat16)}
    safetensors_numpy.save_file(t, tmp_path / "bf.safetensors")
    aq.quantize_checkpoint(tmp_path / "bf.safetensors", tmp_path / "q.safetensors", aq.Rule())
    back = aq.load(tmp_path / "q.safetensors")
    assert_leaf_equal(t["b"], back["b"])  # kept as is, bfloat16 bytes streamed unchanged
    q = back["w"]
    assert q.dtype == "bfloat16" and aq.dequantize(q).dtype == t["w"].dtype
    assert_leaf_equal(aq.quantize(t["w"]), q)


def test_quantize_checkpoint_errors(tmp_path):
    src = tmp_path / "in.safetensors"
    t = _float_checkpoint(src)
    out = tmp_path / "out.safetensors"
    with pytest.raises(FileNotFoundError):
        aq.quantize_checkpoint(tmp_path / "missing.safetensors", out, aq.Rule())
    with pytest.raises(ValueError, match="is the input"):
        aq.quantize_checkpoint(src, src, aq.Rule())
    # A rule that does not fit a tensor fails before anything is written.
    with pytest.raises(ValueError, match=r"cannot quantize 'embeddings.weight' .*axis=2"):
        aq.quantize_checkpoint(src, out, aq.Rule(axis=2))
    assert not out.exists()
    # A bad value found midway leaves no output behind.
    t["layer.1.weight"][3, 3] = np.inf
    safetensors_numpy.save_file(t, src)
    with pytest.raises(ValueError, match="'layer.1.weight'.*infinite"):
        aq.quantize_checkpoint(src, out, aq.Rule())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]
    # Already quantized input, clashing names, malformed input.
    aq.save(tmp_path / "q.safetensors", {"w": aq.quantize(_f32(2, 2))})
    with pytest.raises(CheckpointError, match="already an arrayquant checkpoint"):
        aq.quantize_checkpoint(tmp_path / "q.safetensors", out, aq.Rule())
    safetensors_numpy.save_file({"w": _f32(2, 2), "w:scale": _f32(1)}, src)
    with pytest.raises(ValueError, match="'w:scale' would be written twice"):
        aq.quantize_checkpoint(src, out, aq.Rule())
    (tmp_path / "bad.npz").write_bytes(b"PK not a zip")
    with pytest.raises(CheckpointError, match="not a valid .npz file"):
        aq.quantize_checkpoint(tmp_path / "bad.npz", out, aq.Rule())
    np.savez(tmp_path / "obj.npz", a=np.array([{"x": 1}], dtype=object))
    with pytest.raises(CheckpointError, match="no pickled objects"):
        aq.quantize_checkpoint(tmp_path / "obj.npz", out, aq.Rule())


def test_quantize_checkpoint_progress_bar(tmp_path, capsys):
    src = tmp_path / "in.safetensors"
    _float_checkpoint(src)
    aq.quantize_checkpoint(src, tmp_path / "out.safetensors", aq.Rule(), progress=True)
    assert "in.safetensors" in capsys.readouterr().err


# ---------------------------------------------------------------- review findings


def _header_fields(path):
    header, _ = _read_raw(path)
    return {k: v for k, v in header.items() if k != "__metadata__"}


_SAME_SIZE = [("I8", "U8", "BOOL"), ("I16", "U16", "F16", "BF16"), ("I32", "U32", "F32"),
              ("I64", "U64", "F64")]


def test_every_dtype_substitution_in_the_header_is_caught(tmp_path):
    """The tensors' dtypes and shapes live in the safetensors header, outside the arrayquant
    document: the metadata digest covers them, so no substitution loads other values."""
    f = tmp_path / "m.safetensors"
    aq.save(f, {"f32": np.array([1.5, -2], np.float32), "i8": np.array([1, -1], np.int8),
                "f16": np.ones(2, np.float16), "i64": np.arange(2, dtype=np.int64),
                "w": aq.quantize(_f32(2, 4), "int4", group_size=2, scale_dtype="bfloat16"),
                "empty": np.zeros((0, 5), np.float32), "m": np.zeros((2, 3), np.float32)})
    raw = f.read_bytes()
    cases = 0
    for name, entry in _header_fields(f).items():
        group = next(g for g in _SAME_SIZE if entry["dtype"] in g)
        edits = [("dtype", code) for code in group if code != entry["dtype"]]
        shape = entry["shape"]
        if 0 in shape:
            edits.append(("shape", [0, shape[1] + 1]))
        if len(shape) == 2 and shape[0] != shape[1]:
            edits.append(("shape", shape[::-1]))
        for field, value in edits:
            f.write_bytes(raw)
            _edit(f, edit_header=lambda h, n=name, k=field, v=value: h[n].update({k: v}),
                  resign=False)
            with pytest.raises(CheckpointError):
                aq.load(f)
            cases += 1
    assert cases >= 12


def test_big_endian_arrays_round_trip(tmp_path):
    f = tmp_path / "m.safetensors"
    tree = {"f": np.arange(3, dtype=">f4"), "i": np.array([1, -2], ">i2"),
            "d": np.array([0.5], ">f8")}
    aq.save(f, tree)
    back = aq.load(f)
    for k, v in tree.items():
        np.testing.assert_array_equal(back[k], v)
        assert back[k].dtype == v.dtype.newbyteorder("=")


def test_quantize_checkpoint_copies_big_endian_npz_arrays(tmp_path):
    src = tmp_path / "in.npz"
    np.savez(src, w=_f32(4, 8).astype(">f4"), pos=np.arange(4, dtype=">i8"))
    aq.quantize_checkpoint(src, tmp_path / "out.safetensors", aq.Rule(dtype="int8", axis=0))
    out = aq.load(tmp_path / "out.safetensors")
    np.testing.assert_array_equal(out["pos"], np.arange(4))
    ref = aq.quantize(np.load(src)["w"].astype(np.float32), "int8", axis=0)
    assert_leaf_equal(ref, out["w"])


def test_numbers_that_overflow_are_refused(good):
    def raw_edit(h):
        doc = json.loads(h["__metadata__"]["arrayquant"])
        doc["tree"]["items"][0][1]["x"] = 1e400
        h["__metadata__"]["arrayquant"] = json.dumps(doc).replace("Infinity", "1e400")
    _edit(good, edit_header=raw_edit, resign=False)
    with pytest.raises(CheckpointError, match="the number 1e400 overflows to inf"):
        aq.load(good)


def test_a_root_leaf_tree_is_refused(tmp_path):
    f = tmp_path / "m.safetensors"
    aq.save(f, {"w8": np.zeros(2)})
    _edit(f, edit_doc=lambda d: d.update(tree={"type": "leaf", "path": "w8"}))
    with pytest.raises(CheckpointError, match="root is a single leaf"):
        aq.load(f)


def test_a_flat_dict_stored_as_a_tree_is_refused(tmp_path):
    f = tmp_path / "m.safetensors"
    aq.save(f, {"a": np.zeros(2), "b": np.ones(2)})
    _edit(f, edit_doc=lambda d: d.update(tree={"type": "dict", "items": [
        ["a", {"type": "leaf", "path": "a"}], ["b", {"type": "leaf", "path": "b"}]]}))
    with pytest.raises(CheckpointError, match="flat dict of leaves is stored with 'tree' null"):
        aq.load(f)


@pytest.mark.parametrize(("edit", "match"), [
    (lambda h: h["w8:data"].update(extra=[1]), "must hold exactly 'dtype', 'shape'"),
    (lambda h: h["__metadata__"].update(note="hi"), "arrayquant writes exactly"),
])
def test_header_fields_save_never_writes_are_refused(good, edit, match):
    _edit(good, edit_header=edit)
    with pytest.raises(CheckpointError, match=match):
        aq.load(good)


def test_an_unclosed_string_in_the_header_is_refused_in_linear_time(tmp_path):
    """A regular-expression pre-scan once took minutes on this input (quadratic)."""
    f = tmp_path / "m.safetensors"
    body = b'"' + b'\\"' * 200_000
    body += b" " * (-len(body) % 8)
    f.write_bytes(struct.pack("<Q", len(body)) + body)
    with pytest.raises(CheckpointError, match="not valid JSON"):
        aq.load(f)


@pytest.mark.parametrize(("tree", "match"), [
    ({"__metadata__": np.zeros(1)}, "cannot be named '__metadata__'"),
    ({"\ud800": np.zeros(1)}, "cannot be encoded as UTF-8"),
])
def test_save_refuses_names_safetensors_cannot_hold(tmp_path, tree, match):
    with pytest.raises(ValueError, match=match):
        aq.save(tmp_path / "m.safetensors", tree)
    assert list(tmp_path.iterdir()) == []


def test_an_empty_container_at_the_deepest_level_round_trips(tmp_path):
    f = tmp_path / "m.safetensors"
    for empty in ({}, [], ()):
        tree = {"a": _nested(98, {"e": empty, "x": np.zeros(1)})}  # "e" at depth 100
        aq.save(f, tree)
        assert_tree_equal(tree, aq.load(f))


def test_damaged_npz_inputs_raise_checkpoint_errors(tmp_path):
    src = tmp_path / "in.npz"
    np.savez_compressed(src, w=_f32(16, 16), b=_f32(16))
    raw = src.read_bytes()
    rng = np.random.default_rng(0)
    outcomes = {"ok": 0, "error": 0}
    for _ in range(200):
        mutant = bytearray(raw)
        i = int(rng.integers(len(raw)))
        mutant[i : i + 4] = rng.integers(0, 256, 4, dtype=np.uint8).tobytes()
        src.write_bytes(bytes(mutant[: len(raw)]))
        try:
            aq.checkpoint_info(src)
            aq.quantize_checkpoint(src, tmp_path / "out.safetensors", aq.Rule(dtype="int8"))
            outcomes["ok"] += 1
        except CheckpointError:
            outcomes["error"] += 1
    assert outcomes["error"] > 20


def test_an_npz_with_a_member_twice_is_refused(tmp_path):
    import zipfile

    src = tmp_path / "in.npz"
    with warnings.catch_warnings(), zipfile.ZipFile(src, "w") as zf:
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name
        for value in (1.0, 2.0):
            with zf.open("w.npy", "w") as fh:
                np.lib.format.write_array(fh, np.full(2, value))
    with pytest.raises(CheckpointError, match="holds 'w.npy' twice"):
        aq.checkpoint_info(src)


def test_stacked_qarrays_round_trip_and_hostile_batch_shapes(tmp_path):
    """Stacked QArrays (leading batch axes) save with a 'batch_shape' field, written only
    for them; load, checkpoint_info and inspect see the whole stack."""
    rng = np.random.default_rng(7)
    ws = rng.standard_normal((2, 3, 6, 33)).astype(np.float32)
    tree = {"layers": aq.quantize(ws, "uint4", group_size=16, batch_axes=2),
            "sym": aq.quantize(ws[0], "int2", True, axis=0, batch_axes=1),
            "one": aq.quantize(ws[0, 0], "int8")}
    p = tmp_path / "s.safetensors"
    aq.save(p, tree)
    back = aq.load(p)
    assert_tree_equal(back, tree)
    assert back["layers"].batch_shape == (2, 3) and back["sym"].batch_shape == (3,)
    info = {leaf.path: leaf for leaf in aq.checkpoint_info(p).leaves}
    assert info["layers"].batch_shape == (2, 3) and info["one"].batch_shape == ()
    assert info["layers"].float_nbytes == ws.nbytes
    doc = json.loads(_read_raw(p)[0]["__metadata__"]["arrayquant"])
    assert "batch_shape" not in _leaf(doc, "one")  # unstacked entries are unchanged
    for value, match in (([], "must be a non-empty list"), ([3], "has shape"),
                         ([2, 0], "must be a non-empty list"), ("2", "batch_shape")):
        q = tmp_path / f"bad{len(str(value))}.safetensors"
        q.write_bytes(p.read_bytes())
        _edit(q, edit_doc=lambda d, v=value: _leaf(d, "layers").__setitem__("batch_shape", v))
        with pytest.raises(CheckpointError, match=match):
            aq.load(q)
    q = tmp_path / "nobatch.safetensors"
    q.write_bytes(p.read_bytes())
    _edit(q, edit_doc=lambda d: _leaf(d, "sym").pop("batch_shape"))
    with pytest.raises(CheckpointError, match="has shape"):
        aq.load(q)
