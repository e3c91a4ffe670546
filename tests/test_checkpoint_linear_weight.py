"""LinearWeight leaves in checkpoints (format version 3) and upgrading version-1/2 files."""

from __future__ import annotations

import dataclasses
import itertools
import json
import pathlib
import shutil

import ml_dtypes
import numpy as np
import pytest

import arrayquant as aq
from arrayquant.apps import cli
from arrayquant.checkpoint import FORMAT_VERSION, CheckpointError, upgrade_checkpoint
from arrayquant.linear_weight import LinearWeight
from tests.test_checkpoint import (
    _edit,
    _leaf,
    _read_raw,
    _set_bytes,
    assert_leaf_equal,
    assert_tree_equal,
)

pytest.importorskip("safetensors")

DATA = pathlib.Path(__file__).parent / "data"
RNG = np.random.default_rng(11)

_WEIGHTS = {  # (out, in) = (6, 10): packed int4 per group, per-channel int8 symmetric
    "int4g": dict(dtype="int4", group_size=4),
    "int8c": dict(dtype="int8", symmetric=True),
}
_ACTS = {  # act_qtype, act_zero_point dtype (None: symmetric)
    "none": (None, None),
    "sym": ("int8", None),
    "asym": ("uint8", np.uint8),
    "asym32": ("int8", np.int32),
}


def _lw(weight="int4g", in_axis=1, in_scale=np.float32, perm=np.int32, act="asym",
        dtype=np.float32):
    """A LinearWeight of a (6, 10) (out, in) weight stored with input axis ``in_axis``."""
    w = RNG.standard_normal((6, 10)).astype(dtype)
    w = w if in_axis == 1 else w.T
    kw = dict(_WEIGHTS[weight])
    out_axis = 1 - in_axis
    if "group_size" in kw:
        kw["group_axis"] = in_axis
    else:
        kw["axis"] = out_axis
    q = aq.quantize(w, **kw)
    act_qtype, zp_dtype = _ACTS[act]
    return LinearWeight(
        q,
        None if in_scale is None else RNG.uniform(0.25, 4, 10).astype(in_scale),
        None if perm is None else RNG.permutation(10).astype(perm),
        None if act_qtype is None else np.asarray(RNG.uniform(0.01, 0.1), np.float32),
        None if zp_dtype is None else np.asarray(RNG.integers(0, 100), zp_dtype),
        in_axis=in_axis, act_qtype=act_qtype)


_COMBOS = list(itertools.product(_WEIGHTS, (0, 1), (None, np.float32, np.float16),
                                 (None, np.int32, np.int64), _ACTS))


def _combo_tree():
    return {"layers": {f"{w}-{ax}-{s and np.dtype(s).name}-{p and np.dtype(p).name}-{a}":
                       _lw(w, ax, s, p, a) for w, ax, s, p, a in _COMBOS},
            "bf16": [_lw(dtype=ml_dtypes.bfloat16), np.ones(3, np.float32)]}


# ---------------------------------------------------------------- round trips


def test_every_combination_of_fields_round_trips_bit_exactly(tmp_path):
    tree = _combo_tree()
    f = tmp_path / "m.safetensors"
    aq.save(f, tree)
    back = aq.load(f)
    assert_tree_equal(tree, back)
    for name, lw in tree["layers"].items():  # the represented weight is the same too
        np.testing.assert_array_equal(aq.dequantize(back["layers"][name]), aq.dequantize(lw))
    info = {leaf.path: leaf for leaf in aq.checkpoint_info(f).leaves}
    for name, lw in tree["layers"].items():
        leaf = info[f"layers/{name}"]
        assert leaf.kind == "linear_weight" and leaf.quantized
        assert (leaf.in_axis, leaf.act_qtype, leaf.shape) == (lw.in_axis, lw.act_qtype, lw.shape)
        assert leaf.state == tuple(r for r in ("in_scale", "perm", "act_scale", "act_zero_point")
                                   if getattr(lw, r) is not None)
        assert leaf.nbytes == lw.nbytes and leaf.float_nbytes == 60 * 4
        assert leaf.tensors[-len(leaf.state) or len(leaf.tensors):] == tuple(
            f"layers/{name}:{r}" for r in leaf.state)
    assert info["bf16/1"].kind == "array"


def test_the_document_entry_and_tensor_names(tmp_path):
    lw = _lw("int4g", 1, np.float16, np.int64, "asym")
    f = tmp_path / "m.safetensors"
    aq.save(f, {"enc.w": lw})
    header, _ = _read_raw(f)
    doc = json.loads(header["__metadata__"]["arrayquant"])
    assert doc["version"] == FORMAT_VERSION == 3
    assert doc["leaves"] == [{
        "path": "enc.w", "kind": "linear_weight", "qtype": "int4", "dtype": "float32",
        "shape": [6, 10], "block_shape": [1, 4], "packed_axis": 1, "data": "enc.w:data",
        "scale": "enc.w:scale", "zero_point": "enc.w:zero_point", "in_axis": 1,
        "in_scale": "enc.w:in_scale", "perm": "enc.w:perm", "act_qtype": "uint8",
        "act_scale": "enc.w:act_scale", "act_zero_point": "enc.w:act_zero_point"}]
    assert {k: (v["dtype"], v["shape"]) for k, v in header.items() if k != "__metadata__"} == {
        "enc.w:data": ("U8", [6, 5]), "enc.w:scale": ("F32", [6, 3]),
        "enc.w:zero_point": ("I8", [6, 3]), "enc.w:in_scale": ("F16", [10]),
        "enc.w:perm": ("I64", [10]), "enc.w:act_scale": ("F32", []),
        "enc.w:act_zero_point": ("U8", [])}
    assert set(doc["digests"]["tensors"]) == {k for k in header if k != "__metadata__"}
    # Absent state is null and has no tensor.
    aq.save(f, {"w": _lw("int8c", 0, None, None, "sym")})
    header, _ = _read_raw(f)
    entry = json.loads(header["__metadata__"]["arrayquant"])["leaves"][0]
    assert [entry[k] for k in ("in_scale", "perm", "act_qtype", "act_zero_point")] == \
        [None, None, "int8", None]
    assert sorted(k for k in header if k != "__metadata__") == ["w:act_scale", "w:data",
                                                               "w:scale"]


def test_like_jax_arrays_and_shardings(tmp_path):
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    tree = {"a": _lw("int4g", 1),  # keys sorted, as jax.tree.map returns them
            "b": {"bias": np.ones(6, np.float32), "w": _lw("int8c", 0, act="sym")}}
    on_jax = jax.tree.map(jnp.asarray, tree)
    assert isinstance(on_jax["a"], LinearWeight) and isinstance(on_jax["a"].perm, jax.Array)
    f = tmp_path / "j.safetensors"
    aq.save(f, on_jax)
    assert_tree_equal(tree, aq.load(f))
    # like=: float leaves (or LinearWeights) of a template are replaced by the stored leaves.
    template = {"a": np.zeros((6, 10), np.float32),
                "b": {"bias": np.zeros(6), "w": tree["b"]["w"]}}
    back = aq.load(f, like=template)
    assert_tree_equal(tree, back)
    # shardings=: the float weight's sharding places the QArray; the state is replicated.
    mesh = Mesh(np.array(jax.devices()[:1]), ("x",))
    s = NamedSharding(mesh, PartitionSpec("x", None))
    placed = aq.load(f, shardings={"a": s, "b/w": s})
    for path in ("a", "b/w"):
        lw = placed["a"] if path == "a" else placed["b"]["w"]
        ref = tree["a"] if path == "a" else tree["b"]["w"]
        assert isinstance(lw, LinearWeight) and isinstance(lw.qweight.data, jax.Array)
        assert lw.act_scale.sharding.spec == PartitionSpec()
        np.testing.assert_array_equal(np.asarray(aq.dequantize(lw)), aq.dequantize(ref))
    assert isinstance(placed["b"]["bias"], np.ndarray)


# ---------------------------------------------------------------- corruption


@pytest.fixture
def good(tmp_path):
    f = tmp_path / "good.safetensors"
    aq.save(f, {"lw": LinearWeight(
        aq.quantize(RNG.standard_normal((3, 4)).astype(np.float32), "int4", group_size=2),
        np.array([0.5, 1, 2, 4], np.float32), np.array([2, 0, 3, 1], np.int32),
        np.asarray(0.1, np.float32), np.asarray(-3, np.int8), act_qtype="int8"),
        "sym": _lw("int8c", 0, None, None, "sym"), "b": np.zeros(3, np.float32)})
    return f


def _set(field, value):
    return dict(edit_doc=lambda d: _leaf(d, "lw").update({field: value}))


def _header(name, **kw):
    return dict(edit_header=lambda h: h[name].update(kw))


CORRUPTIONS = {
    "perm twice": (dict(edit_data=_set_bytes("lw:perm", 1, 2, np.int32)),
                   r"perm is not a permutation of range\(4\): it holds 2 2 times and misses 0"),
    "perm out of range": (dict(edit_data=_set_bytes("lw:perm", 3, 4, np.int32)),
                          r"perm is not a permutation of range\(4\): it holds 4"),
    "perm negative": (dict(edit_data=_set_bytes("lw:perm", 0, -1, np.int32)), "it holds -1"),
    "missing tensor": (dict(edit_header=lambda h: h.update(x=h.pop("lw:in_scale"))),
                       "leaf 'lw': tensor 'lw:in_scale' is missing"),
    "in_scale dtype": (_header("lw:in_scale", dtype="I32"),
                       "tensor 'lw:in_scale' has dtype int32, expected float16 or"),
    "perm dtype": (_header("lw:perm", dtype="F32"),
                   "tensor 'lw:perm' has dtype float32, expected int32 or int64"),
    "act zero point dtype": (_header("lw:act_zero_point", dtype="BOOL"),
                             "tensor 'lw:act_zero_point' has dtype bool, expected int8"),
    "act scale shape": (_header("lw:act_scale", shape=[1]),
                        r"tensor 'lw:act_scale' has shape \[1\], expected \[\]"),
    "in_axis vs shape": (_set("in_axis", 0),
                         r"tensor 'lw:in_scale' has shape \[4\], expected \[3\]"),
    "in_axis 2": (_set("in_axis", 2), "field 'in_axis' must be 0 .* or 1 .*, got 2"),
    "in_axis bool": (_set("in_axis", True), "field 'in_axis' must be 0"),
    "act zero point out of range": (_set("act_qtype", "uint8"),
                                    r"act_zero_point outside \[0, 255\] \(min -3, max -3\)"),
    "act zero point beyond int4": (dict(edit_doc=lambda d: _leaf(d, "lw").update(
                                       act_qtype="int4"),
                                        edit_data=_set_bytes("lw:act_zero_point", 0, 9, np.int8)),
                                   r"act_zero_point outside \[-8, 7\]"),
    "act scale NaN": (dict(edit_data=_set_bytes("lw:act_scale", 0, np.nan, np.float32)),
                      r"act_scale outside \[4.70198e-38, 8.50706e\+37\]"),
    "act scale zero": (dict(edit_data=_set_bytes("lw:act_scale", 0, 0.0, np.float32)),
                       "act_scale outside"),
    "in_scale negative": (dict(edit_data=_set_bytes("lw:in_scale", 2, -2.0, np.float32)),
                          "in_scale outside .* for float32 in_scale of float32 values"),
    "in_scale inf": (dict(edit_data=_set_bytes("lw:in_scale", 0, np.inf, np.float32)),
                     "in_scale outside"),
    "unknown field": (_set("note", 1), "leaf 'lw': expected the fields .*; unknown: 'note'"),
    "missing field": (dict(edit_doc=lambda d: _leaf(d, "lw").pop("perm")), "missing: 'perm'"),
    "batch_shape": (_set("batch_shape", [1]), "unknown: 'batch_shape'"),
    "unknown act qtype": (_set("act_qtype", "int3"), "'act_qtype' must be null or one of"),
    "act scale without qtype": (_set("act_qtype", None), "'act_qtype' and 'act_scale' go "
                                                         "together"),
    "act zero point alone": (dict(edit_doc=lambda d: _leaf(d, "lw").update(
                                 act_qtype=None, act_scale=None)),
                             "'act_zero_point' needs 'act_qtype' and 'act_scale'"),
    "unsigned act without zero point": (dict(edit_doc=lambda d: _leaf(d, "sym").update(
                                            act_qtype="uint8")),
                                        "act_qtype uint8 is unsigned, so it needs"),
    "tensor name": (_set("perm", "lw:in_scale"),
                    "field 'perm' must be null or name the tensor 'lw:perm', got 'lw:in_scale'"),
    "state dropped": (_set("perm", None), "tensor 'lw:perm' is not described by the metadata"),
    "not 2-D": (dict(edit_doc=lambda d: _leaf(d, "lw").update(
                    shape=[3, 4, 1], block_shape=[1, 2, 1], packed_axis=1),
                     edit_header=lambda h: (h["lw:data"].update(shape=[3, 2, 1]),
                                            h["lw:scale"].update(shape=[3, 2, 1]),
                                            h["lw:zero_point"].update(shape=[3, 2, 1]))),
                "a linear_weight is 2-D; shape \\[3, 4, 1\\]"),
    "kind in version 2": (dict(edit_doc=lambda d: d.update(version=2)),
                          "kind 'linear_weight' is new in format version 3, but the file says "
                          "version 2"),
    "kind in version 1": (dict(edit_doc=lambda d: (d.update(version=1), d.pop("digests")),
                               edit_header=lambda h: h["__metadata__"].pop("format")),
                          "kind 'linear_weight' is new in format version 3"),
    "qarray kind": (_set("kind", "qarray"), "unknown: 'act_qtype', 'act_scale'"),
    "damaged perm bytes": (dict(edit_data=_set_bytes("lw:perm", 0, 1, np.int32), resign=False),
                           "tensor 'lw:perm' does not match its digest"),
    "damaged in_axis": (dict(edit_doc=lambda d: _leaf(d, "sym").update(in_axis=1),
                             resign=False), "the metadata does not match its digest"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_load_rejects_corrupted_linear_weights(good, case):
    edits, match = CORRUPTIONS[case]
    aq.load(good)
    _edit(good, **edits)
    with pytest.raises(CheckpointError, match=match) as info:
        aq.load(good)
    assert str(good) in str(info.value)
    if "digest" not in match:
        assert "leaf 'lw'" in str(info.value) or "leaf 'sym'" in str(info.value) \
            or "not described" in str(info.value)


def _bad(**fields):
    base = _lw("int4g", 1, np.float32, np.int32, "asym32")
    return LinearWeight(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
                        | fields)


@pytest.mark.parametrize(("leaf", "match"), [
    (_bad(perm=np.array([0, 0, *range(2, 10)], np.int32)), "perm is not a permutation"),
    (_bad(in_scale=np.zeros(10, np.float32)), "in_scale outside"),
    (_bad(act_scale=np.asarray(np.inf, np.float32)), "act_scale outside"),
    (_bad(act_zero_point=np.asarray(300, np.int32)), r"act_zero_point outside \[-128, 127\]"),
    (_bad(act_zero_point=np.asarray(1.0, np.float32)), "'w:act_zero_point' has dtype float32"),
    # Built without checks (as JAX rebuilds pytrees): the schema speaks before any value rule.
    (LinearWeight._from_parts((1, None), (_bad().qweight, None, np.zeros(10, np.float32), None,
                                          None)), "tensor 'w:perm' has dtype float32"),
    (LinearWeight._from_parts((1, None), (_bad().qweight, None, np.zeros((2, 5), np.int32),
                                          None, None)), r"'w:perm' has shape \[2, 5\]"),
    (LinearWeight._from_parts((1, None), (aq.quantize(np.ones((2, 3, 4), np.float32),
                                                      batch_axes=1), None, None, None, None)),
     "unknown: 'batch_shape'"),
])
def test_save_refuses_what_load_would_reject(tmp_path, leaf, match):
    with pytest.raises(ValueError, match=match):
        aq.save(tmp_path / "m.safetensors", {"w": leaf})
    assert list(tmp_path.iterdir()) == []


def test_inspect_shows_the_state(capsys, good):
    assert cli.main(["inspect", str(good), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "int4 per-group(2, axis=1) asym packed(axis=1) (in_axis=1) +in_scale +perm, " \
           "static int8 asym activations" in out
    assert "(in_axis=0), static int8 sym activations" in out
    assert "quantized:   2 of 3 leaves" in out


# ---------------------------------------------------------------- versions 1 and 2, upgrade


def _v2_tree():
    """tests/data/checkpoint_v2.safetensors was written by the format-2 writer (commit
    5a6871c, before format version 3) from exactly this tree."""
    rng = np.random.default_rng(2)

    def f(*s):
        return rng.standard_normal(s).astype(np.float32)

    return {
        "layer": {
            "w4": aq.quantize(f(4, 10), "int4", group_size=4),
            "w8": aq.quantize(f(3, 5), "int8", True, axis=0, scale_dtype="float16"),
            "u2": aq.quantize(f(2, 7).astype(ml_dtypes.bfloat16), "uint2", axis=0),
            "stack": aq.quantize(f(2, 3, 6), "int4", True, axis=1, batch_axes=1),
            "b": np.arange(3, dtype=np.float32),
        },
        "mask": np.array([True, False]),
        "items": (np.arange(4, dtype=np.int64), None,
                  [np.float16(1.5) * np.ones(2, np.float16)]),
    }


def test_version_2_files_still_load_bit_exactly():
    f = DATA / "checkpoint_v2.safetensors"
    info = aq.checkpoint_info(f)
    assert info.version == 2 and info.integrity == "sha256"
    assert_tree_equal(_v2_tree(), aq.load(f))


def _tensors(path):
    header, _ = _read_raw(path)
    return [(k, v["dtype"], v["shape"]) for k, v in header.items() if k != "__metadata__"]


@pytest.mark.parametrize("version", [1, 2])
def test_upgrade_keeps_every_leaf_and_tensor(tmp_path, version):
    src = DATA / f"checkpoint_v{version}.safetensors"
    f = tmp_path / "m.safetensors"
    shutil.copy(src, f)
    assert upgrade_checkpoint(f) == version  # in place
    info = aq.checkpoint_info(f)
    assert info.version == FORMAT_VERSION and info.integrity == "sha256"
    assert_tree_equal(aq.load(src), aq.load(f))
    assert _tensors(f) == _tensors(src)  # names, dtypes, shapes, file order
    old = json.loads(_read_raw(src)[0]["__metadata__"]["arrayquant"])
    new = json.loads(_read_raw(f)[0]["__metadata__"]["arrayquant"])
    assert (new["leaves"], new["tree"]) == (old["leaves"], old["tree"])
    if version == 2:  # the same bytes save() writes today, tensor digests unchanged
        assert new["digests"]["tensors"] == old["digests"]["tensors"]
        aq.save(tmp_path / "again.safetensors", aq.load(src))
        assert (tmp_path / "again.safetensors").read_bytes() == f.read_bytes()
    # To another file; a current file is left alone in place and copied to a dst.
    assert upgrade_checkpoint(src, tmp_path / "out.safetensors") == version
    assert (tmp_path / "out.safetensors").read_bytes() == f.read_bytes()
    before = f.stat().st_mtime_ns, f.read_bytes()
    assert upgrade_checkpoint(f) == FORMAT_VERSION
    assert (f.stat().st_mtime_ns, f.read_bytes()) == before
    assert upgrade_checkpoint(f, tmp_path / "copy.safetensors") == FORMAT_VERSION
    assert (tmp_path / "copy.safetensors").read_bytes() == before[1]


def test_upgrade_refuses_bad_files_and_writes_nothing(tmp_path, monkeypatch):
    f = tmp_path / "v1.safetensors"
    shutil.copy(DATA / "checkpoint_v1.safetensors", f)
    raw = f.read_bytes()
    # Version 1 has no digests: the value checks catch a bad code.
    _edit(f, edit_data=_set_bytes("layer/w8:data", 0, -128, np.int8))
    with pytest.raises(CheckpointError, match="leaf 'layer/w8': codes outside"):
        upgrade_checkpoint(f, tmp_path / "out.safetensors")
    f.write_bytes(raw)
    v2 = tmp_path / "v2.safetensors"
    shutil.copy(DATA / "checkpoint_v2.safetensors", v2)
    _edit(v2, edit_data=_set_bytes("layer/b", 0, 9.0, np.float32), resign=False)
    damaged = v2.read_bytes()
    with pytest.raises(CheckpointError, match="'layer/b' does not match its digest"):
        upgrade_checkpoint(v2)
    assert v2.read_bytes() == damaged
    # Bytes that change between the check and the copy are caught before the rename.
    import arrayquant.checkpoint.upgrade as up

    reads = []
    real = up.read_tensor

    def flaky(file, handle, name):
        a = real(file, handle, name)
        reads.append(name)
        return a + 1 if name == "layer/b" and reads.count(name) == 2 else a

    monkeypatch.setattr(up, "read_tensor", flaky)
    with pytest.raises(CheckpointError, match="'layer/b' changed while the file was being"):
        upgrade_checkpoint(f)
    monkeypatch.undo()
    assert f.read_bytes() == raw and sorted(p.name for p in tmp_path.iterdir()) == [
        "v1.safetensors", "v2.safetensors"]
    aq.save(tmp_path / "plain.safetensors", {"a": np.zeros(2)})
    import safetensors.numpy

    safetensors.numpy.save_file({"a": np.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(CheckpointError, match="plain safetensors file"):
        upgrade_checkpoint(tmp_path / "plain.safetensors")
    np.savez(tmp_path / "m.npz", a=np.zeros(2))
    with pytest.raises(CheckpointError, match="is an .npz file"):
        upgrade_checkpoint(tmp_path / "m.npz")


def test_cli_upgrade(capsys, tmp_path):
    f = tmp_path / "v1.safetensors"
    shutil.copy(DATA / "checkpoint_v1.safetensors", f)
    assert cli.main(["inspect", str(f)]) == 0
    assert "'arrayquant upgrade FILE' adds them" in capsys.readouterr().out
    assert cli.main(["upgrade", str(f), "-o", str(tmp_path / "o.safetensors")]) == 0
    assert "format version 1 -> 3" in capsys.readouterr().out
    assert cli.main(["upgrade", str(f)]) == 0
    capsys.readouterr()
    assert cli.main(["upgrade", str(f)]) == 0
    assert "already format version 3; validated" in capsys.readouterr().out
    assert cli.main(["upgrade", str(tmp_path / "missing.safetensors")]) == 1
    assert "no such file" in capsys.readouterr().err


def test_quantize_checkpoint_refuses_data_aware_methods_up_front(tmp_path):
    import safetensors.numpy

    @dataclasses.dataclass(frozen=True)
    class Needy:
        needs_stats = True

        def quantize_weight(self, w, stats, **kw):
            raise AssertionError("never called")

    src = tmp_path / "in.safetensors"
    safetensors.numpy.save_file({"w": np.ones((4, 4), np.float32)}, src)
    with pytest.raises(ValueError, match="'w'.*reads no calibration data"):
        aq.quantize_checkpoint(src, tmp_path / "out.safetensors", aq.Rule(method=Needy()))
    assert not (tmp_path / "out.safetensors").exists()


def test_a_loaded_linear_weight_saves_again_identically(tmp_path, good):
    back = aq.load(good)
    aq.save(tmp_path / "again.safetensors", back)
    assert (tmp_path / "again.safetensors").read_bytes() == good.read_bytes()
    assert_leaf_equal(back["lw"], aq.load(tmp_path / "again.safetensors")["lw"])
