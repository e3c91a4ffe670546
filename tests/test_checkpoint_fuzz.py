"""Loader fuzz test: every mutation of a valid checkpoint loads correctly or raises CheckpointError.

Mutations of a valid file, drawn from a seeded generator:

- damage, as a disk or a transfer would do it: single bit flips anywhere in the
  file, random byte runs overwritten, truncations, and a tensor's dtype or shape
  in the safetensors header changed (another dtype of the same size, a dimension
  one longer or shorter, dimensions reversed). The file's digests are left
  as they are, so a "correct load" means a tree equal to the original, bit for
  bit;
- hostile edits, as a writer who knows the format would make them: JSON edits
  of the arrayquant metadata (a key dropped, a value replaced by another JSON
  value, an item duplicated, keys swapped) and edits of the safetensors header
  (dtype, shape, offsets), after which the digests are recomputed so that the
  edit itself, not the digest check, is what ``load`` meets. A "correct load"
  then means a tree that ``save`` writes again and ``load`` reads back equal,
  whose QArrays dequantize to finite values: the loader accepted something
  ``save`` could have written.

Any other exception (or a NumPy warning: pytest turns warnings into errors) is
a failure. ``ARRAYQUANT_FUZZ_CASES`` sets the number of cases per kind (default
150, about 10 s in all here); ``ARRAYQUANT_FUZZ_SEED`` the seed.
"""

from __future__ import annotations

import copy
import json
import os
import pathlib
import struct

import numpy as np
import pytest

import arrayquant as aq
from arrayquant.checkpoint import CheckpointError
from arrayquant.linear_weight import LinearWeight
from tests.test_checkpoint import _resign, assert_tree_equal

CASES = int(os.environ.get("ARRAYQUANT_FUZZ_CASES", "150"))
SEED = int(os.environ.get("ARRAYQUANT_FUZZ_SEED", "20261130"))


def _tree():
    rng = np.random.default_rng(0)

    def f32(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    return {
        "w8": aq.quantize(f32(4, 6), "int8", symmetric=True, axis=0),
        "w4": aq.quantize(f32(3, 5), "int4", group_size=2),
        "u2": aq.quantize(f32(2, 7), "uint2", axis=0, scale_dtype="float16"),
        "layers": [{"b": f32(3), "mask": np.array([True, False, True])}, None],
        "pair": (np.arange(4, dtype=np.int16), f32(2).astype(np.float64)),
        # Every LinearWeight field: in_scale, perm, static asymmetric activations.
        "lw": LinearWeight(aq.quantize(f32(3, 4), "int4", group_size=2), f32(4) ** 2 + 0.5,
                           np.array([2, 0, 3, 1], np.int32), np.asarray(0.1, np.float32),
                           np.asarray(-3, np.int8), in_axis=1, act_qtype="int8"),
    }


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "good.safetensors"
    tree = _tree()
    aq.save(path, tree)
    return tree, path.read_bytes()


def _split(raw: bytes):
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _join(header, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


# ------------------------------------------------------------------ damage


_SAME_SIZE = [("I8", "U8", "BOOL"), ("I16", "U16", "F16", "BF16"), ("I32", "U32", "F32"),
              ("I64", "U64", "F64")]


def _damage_header_field(raw: bytes, rng) -> bytes:
    """Another dtype of the same item size, or another shape: bytes the per-tensor digests
    do not cover (the metadata digest does)."""
    header, data = _split(raw)
    name = rng.choice(sorted(k for k in header if k != "__metadata__"))
    entry = header[name]
    if rng.integers(2):
        group = next(g for g in _SAME_SIZE if entry["dtype"] in g)
        entry["dtype"] = str(rng.choice(group))
    elif entry["shape"]:
        shape = entry["shape"]
        i = int(rng.integers(len(shape)))
        shape[i] = max(0, shape[i] + int(rng.choice([-1, 1])))
        if rng.integers(2):
            shape.reverse()
    return _join(header, data)


def _damage(raw: bytes, rng) -> bytes:
    kind = rng.integers(4)
    if kind == 3:
        return _damage_header_field(raw, rng)
    if kind == 0:  # one bit flip
        out = bytearray(raw)
        i = int(rng.integers(len(raw)))
        out[i] ^= 1 << int(rng.integers(8))
        return bytes(out)
    if kind == 1:  # a run of random bytes
        out = bytearray(raw)
        i = int(rng.integers(len(raw)))
        run = rng.integers(0, 256, size=int(rng.integers(1, 9)), dtype=np.uint8).tobytes()
        out[i : i + len(run)] = run
        return bytes(out[: len(raw)])
    return raw[: int(rng.integers(len(raw)))]  # truncation


# ------------------------------------------------------------------ hostile edits

_VALUES = [None, True, 0, 1, 2, -1, 7, 128, 2**40, 1.5, "", "int4", "uint8", "float32",
           "w8", "w8:data", "lw:perm", "lw:act_zero_point", [], [1], [0, 0], [1, 2, 3], {},
           {"type": "none"},
           {"type": "leaf", "path": "w8"}]


def _containers(node, out):
    if isinstance(node, (dict, list)):
        out.append(node)
        for v in (node.values() if isinstance(node, dict) else node):
            _containers(v, out)
    return out


def _edit_doc(doc, rng) -> None:
    spots = _containers(doc, [])
    node = spots[int(rng.integers(len(spots)))]
    if not node:
        return
    keys = list(node) if isinstance(node, dict) else list(range(len(node)))
    key = keys[int(rng.integers(len(keys)))]
    kind = rng.integers(4)
    if kind == 0:
        del node[key]
    elif kind == 1:
        node[key] = copy.deepcopy(_VALUES[int(rng.integers(len(_VALUES)))])
    elif kind == 2 and isinstance(node, list):
        node.insert(int(key), copy.deepcopy(node[key]))
    else:
        other = keys[int(rng.integers(len(keys)))]
        node[key], node[other] = node[other], node[key]


def _edit_header(header, rng) -> None:
    name = rng.choice(sorted(k for k in header if k != "__metadata__"))
    entry = header[name]
    field = rng.choice(["dtype", "shape", "data_offsets"])
    if field == "dtype":
        entry["dtype"] = str(rng.choice(["U8", "I8", "I16", "U16", "F16", "BF16", "F32", "F64",
                                         "BOOL", "I64"]))
    elif field == "shape":
        entry["shape"] = [int(n) for n in rng.integers(0, 8, size=int(rng.integers(0, 4)))]
    else:
        entry["data_offsets"] = [int(o) + int(rng.integers(-2, 3)) for o in entry["data_offsets"]]


def _hostile(raw: bytes, rng) -> bytes:
    header, data = _split(raw)
    if rng.integers(2):
        doc = json.loads(header["__metadata__"]["arrayquant"])
        for _ in range(int(rng.integers(1, 3))):
            _edit_doc(doc, rng)
        header["__metadata__"]["arrayquant"] = json.dumps(doc)
    else:
        _edit_header(header, rng)
    _resign(header, data)
    return _join(header, data)


# ------------------------------------------------------------------ outcomes


def _leaves(tree):
    if isinstance(tree, dict):
        tree = list(tree.values())
    if isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _leaves(v)
    elif tree is not None:
        yield tree


def _assert_savable(tree, tmp_path) -> None:
    """What load() returned is what save() writes: it saves, loads back equal, dequantizes."""
    again = tmp_path / "again.safetensors"
    aq.save(again, tree)
    assert_tree_equal(tree, aq.load(again))
    for leaf in _leaves(tree):
        if isinstance(leaf, (aq.QArray, LinearWeight)):
            assert np.all(np.isfinite(aq.dequantize(leaf)))


def _outcome(raw: bytes, path) -> tuple[str, object]:
    path.write_bytes(raw)
    try:
        aq.checkpoint_info(path)
    except CheckpointError:
        pass
    try:
        return "loaded", aq.load(path)
    except CheckpointError as e:
        assert str(path) in str(e)
        return "rejected", e


@pytest.mark.parametrize("kind", ["damage", "hostile"])
def test_mutated_checkpoints_load_correctly_or_raise_checkpoint_error(original, tmp_path, kind):
    tree, raw = original
    rng = np.random.default_rng([SEED, kind == "hostile"])
    path = tmp_path / "mutant.safetensors"
    counts = {"loaded": 0, "rejected": 0}
    for case in range(CASES):
        mutant = (_damage if kind == "damage" else _hostile)(raw, rng)
        try:
            outcome, value = _outcome(mutant, path)
            if outcome == "loaded":
                if kind == "damage":
                    assert_tree_equal(tree, value)
                else:
                    _assert_savable(value, tmp_path)
        except Exception as e:
            (tmp_path / "failing.safetensors").write_bytes(mutant)
            raise AssertionError(f"case {case} of {kind} (seed {SEED}): {type(e).__name__}: {e}"
                                 f"; the file is {tmp_path / 'failing.safetensors'}") from e
        counts[outcome] += 1
    # The mutations must reach the loader's checks, not only its first one.
    assert counts["rejected"] > CASES // 2
    print(f"{kind}: {counts}")


def test_damaged_version_1_files_never_crash(tmp_path):
    """Version-1 files have no digests: a damaged one may load changed values, but the
    loader still never raises anything other than CheckpointError."""
    raw = (pathlib.Path(__file__).parent / "data" / "checkpoint_v1.safetensors").read_bytes()
    rng = np.random.default_rng([SEED, 2])
    path = tmp_path / "mutant.safetensors"
    for case in range(CASES):
        mutant = _damage(raw, rng)
        try:
            _outcome(mutant, path)
        except Exception as e:
            raise AssertionError(f"case {case} (seed {SEED}): {type(e).__name__}: {e}") from e
