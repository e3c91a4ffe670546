"""The checkpoint format: its constants, tensor naming, and the rules for one leaf entry.

An arrayquant checkpoint's header holds one JSON document (under ``__metadata__``,
key ``"arrayquant"``): the format version, one entry per leaf, the tree structure
and (version 2) the digests. This module names a leaf's tensors (``PATH`` for an
array; ``PATH:data``, ``PATH:scale``, ``PATH:zero_point`` for a QArray), builds
leaf entries and checks one entry against the tensors a file holds
(:mod:`arrayquant.checkpoint.document` checks the whole document).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NoReturn

from arrayquant.blocking import Blocking
from arrayquant.checkpoint.stfile import (
    ST_TO_NAME,
    CheckpointError,
    canonical_json,
    digest,
    np_dtype,
)
from arrayquant.packing import packed_length
from arrayquant.qarray import QArray
from arrayquant.qtypes import QTYPE_NAMES, as_qtype

__all__ = [
    "FORMAT_KEY", "FORMAT_VERSION", "MAX_JSON_DEPTH", "MAX_TREE_DEPTH", "META_KEY",
    "NODE_KEYS", "READ_VERSIONS", "LeafInfo", "array_leaf", "body_digest", "expect_keys",
    "fail", "is_int", "leaf_entry", "parse_leaf", "plain_leaves", "role_names", "tensor_names",
]

#: Version of the metadata layout written by :func:`save`. Version 2 added the digests;
#: :func:`load` reads versions 1 and 2.
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)
#: The deepest tree :func:`save` writes and :func:`load` reads (the root is depth 0).
MAX_TREE_DEPTH = 100
# Each tree level nests three JSON levels (node, items, [key, node]) below the document.
MAX_JSON_DEPTH = 3 * MAX_TREE_DEPTH + 3
META_KEY = "arrayquant"
# Version 2 marks its files twice (``format`` and the document's own key), so that
# one damaged byte in either key cannot make a checkpoint read as a plain file.
FORMAT_KEY = "format"
_ROLES = ("data", "scale", "zero_point")
_FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")
_ARRAY_KEYS = ("path", "kind", "tensor")
_QARRAY_KEYS = ("path", "kind", "qtype", "dtype", "shape", "block_shape", "packed_axis",
                *_ROLES)
# Written only for a stacked QArray (leading batch axes), so other files are unchanged.
_BATCH_KEY = "batch_shape"
NODE_KEYS = {"leaf": ("type", "path"), "none": ("type",), "dict": ("type", "items"),
              "list": ("type", "items"), "tuple": ("type", "items")}


def fail(file, msg: str) -> NoReturn:
    """Raise :class:`CheckpointError` naming ``file``."""
    raise CheckpointError(f"{file}: {msg}")


# --------------------------------------------------------------------------- naming


def role_names(path: str, symmetric: bool) -> dict[str, str | None]:
    """The tensor names of a QArray at ``path`` (the loader checks exactly these)."""
    return {role: None if role == "zero_point" and symmetric else f"{path}:{role}"
            for role in _ROLES}


def tensor_names(path: str, leaf) -> dict[str, str | None]:
    """``{role: tensor name or None}`` of a leaf (``{"tensor": path}`` for an array)."""
    if isinstance(leaf, QArray):
        return role_names(path, leaf.zero_point is None)
    return {"tensor": path}


def leaf_entry(path: str, leaf) -> dict[str, Any]:
    """The document's entry for ``leaf`` at ``path``."""
    if isinstance(leaf, QArray):
        return {
            "path": path, "kind": "qarray", "qtype": leaf.qtype, "dtype": leaf.dtype,
            "shape": list(leaf.shape), "block_shape": list(leaf.block_shape),
            "packed_axis": leaf.packed_axis, **tensor_names(path, leaf),
            **({_BATCH_KEY: list(leaf.batch_shape)} if leaf.batch_shape else {}),
        }
    return {"path": path, "kind": "array", "tensor": path}


def body_digest(body: dict[str, Any], tensors: dict[str, tuple[str, tuple[int, ...]]]) -> str:
    """SHA-256 of the document's body and of every tensor's safetensors dtype and shape.

    The dtypes and shapes live in the safetensors header, outside the document:
    covering them here means one damaged byte there (``F32`` -> ``I32``) cannot
    load as other values with every digest matching.
    """
    listing = {name: [code, list(shape)] for name, (code, shape) in sorted(tensors.items())}
    text = canonical_json({**body, "tensors": listing})
    return digest(text.encode())


# --------------------------------------------------------------------------- leaves


@dataclass(frozen=True)
class LeafInfo:
    """One leaf of a checkpoint, from its header alone (no tensor data read)."""

    path: str
    shape: tuple[int, ...]
    dtype: str  # the array's dtype, or the QArray's original float dtype
    qtype: str | None = None
    block_shape: tuple[int, ...] | None = None
    packed_axis: int | None = None
    symmetric: bool | None = None
    tensors: tuple[str, ...] = ()
    nbytes: int = 0
    batch_shape: tuple[int, ...] = ()  # leading axes of a stacked QArray

    @property
    def quantized(self) -> bool:
        return self.qtype is not None

    @property
    def granularity(self) -> str | None:
        if self.block_shape is None:
            return None
        return Blocking(self.shape, self.block_shape).describe()

    @property
    def float_nbytes(self) -> int:
        """Bytes of the leaf as a plain array of ``dtype`` (before quantization)."""
        return math.prod(self.batch_shape + self.shape) * np_dtype(self.dtype).itemsize


def is_int(v) -> bool:
    """``v`` is an int (not a bool)."""
    return type(v) is int


def _shape_field(file, where: str, v, what: str, ndim: int | None = None) -> tuple[int, ...]:
    if not isinstance(v, list) or not all(is_int(n) and n >= 0 for n in v):
        fail(file, f"{where}: {what} must be a list of non-negative ints, got {v!r}")
    if ndim is not None and len(v) != ndim:
        fail(file, f"{where}: {what} {v} has {len(v)} entries, expected {ndim}")
    return tuple(v)


def _str_field(file, where: str, entry: dict, key: str) -> str:
    v = entry.get(key)
    if not isinstance(v, str):
        fail(file, f"{where}: field {key!r} must be a string, got {v!r}")
    return v


def _stored(file, where: str | None, tensors, name) -> tuple[str, tuple[int, ...]]:
    """(dtype code, shape) of the tensor ``name``, which must be in the file."""
    if name not in tensors:
        prefix = "" if where is None else f"{where}: "
        fail(file, f"{prefix}tensor {name!r} is missing from the file")
    return tensors[name]


def _expect_tensor(file, where, tensors, name, dtype_names, shape) -> None:
    code, got_shape = _stored(file, where, tensors, name)
    got = ST_TO_NAME.get(code, code)
    if got not in dtype_names:
        fail(file, f"{where}: tensor {name!r} has dtype {got}, expected "
                   f"{' or '.join(dtype_names)}")
    if shape is not None and got_shape != tuple(shape):
        fail(file, f"{where}: tensor {name!r} has shape {list(got_shape)}, expected "
                   f"{list(shape)}")


def _tensor_nbytes(tensors, name) -> int:
    code, shape = tensors[name]
    return math.prod(shape) * np_dtype(ST_TO_NAME[code]).itemsize


def array_leaf(file, tensors, name: str, where: str | None = None) -> LeafInfo:
    """The plain-array leaf stored as the tensor ``name`` (a dtype arrayquant reads)."""
    prefix = "" if where is None else f"{where}: "
    code, shape = _stored(file, where, tensors, name)
    if code not in ST_TO_NAME:
        fail(file, f"{prefix}tensor {name!r} has dtype {code}, which arrayquant does not read "
                   f"(expected one of {', '.join(ST_TO_NAME)})")
    return LeafInfo(name, shape, ST_TO_NAME[code], tensors=(name,),
                    nbytes=_tensor_nbytes(tensors, name))


def plain_leaves(file, tensors) -> list[LeafInfo]:
    """The leaves of a plain safetensors file: one array per tensor, in file order."""
    return [array_leaf(file, tensors, name) for name in tensors]


def parse_leaf(file, i: int, entry, tensors) -> LeafInfo:
    """The leaf of the ``i``-th entry of 'leaves', checked against the file's tensors."""
    where = f"leaf #{i}"
    if not isinstance(entry, dict):
        fail(file, f"{where}: expected a JSON object, got {entry!r}")
    path = _str_field(file, where, entry, "path")
    where = f"leaf {path!r}"
    kind = entry.get("kind")
    if kind in ("array", "qarray"):
        keys = _ARRAY_KEYS if kind == "array" else _QARRAY_KEYS
        if kind == "qarray" and _BATCH_KEY in entry:
            keys = (*keys, _BATCH_KEY)
        expect_keys(file, where, entry, keys)
    if kind == "array":
        name = _str_field(file, where, entry, "tensor")
        if name != path:
            fail(file, f"{where}: field 'tensor' must be the leaf's path {path!r}, got "
                       f"{name!r}")
        return array_leaf(file, tensors, name, where)
    if kind != "qarray":
        fail(file, f"{where}: field 'kind' must be 'array' or 'qarray', got {kind!r}")
    qtype = entry.get("qtype")
    if qtype not in QTYPE_NAMES:
        fail(file, f"{where}: unknown qtype {qtype!r}; expected one of {', '.join(QTYPE_NAMES)}")
    qt = as_qtype(qtype)
    dtype = entry.get("dtype")
    if dtype not in _FLOAT_NAMES:
        fail(file, f"{where}: field 'dtype' must be one of {', '.join(_FLOAT_NAMES)}, got "
                   f"{dtype!r}")
    shape = _shape_field(file, where, entry.get("shape"), "shape")
    if math.prod(shape) == 0:
        fail(file, f"{where}: shape {list(shape)} is empty; a QArray holds at least one value")
    block = _shape_field(file, where, entry.get("block_shape"), "block_shape", len(shape))
    for d, (b, n) in enumerate(zip(block, shape)):
        if not 1 <= b <= n:
            fail(file, f"{where}: block_shape[{d}] = {b} must be in [1, {n}]")
    batch = ()
    if _BATCH_KEY in entry:
        batch = _shape_field(file, where, entry[_BATCH_KEY], _BATCH_KEY)
        if not batch or math.prod(batch) == 0:
            fail(file, f"{where}: field {_BATCH_KEY!r} must be a non-empty list of sizes >= 1 "
                       f"(save writes it only for stacked QArrays), got {list(batch)}")
    packed_axis = entry.get("packed_axis")
    if packed_axis is not None:
        if qt.bits >= 8:
            fail(file, f"{where}: packed_axis must be null for {qtype} (only 2- and 4-bit "
                       f"codes are packed), got {packed_axis!r}")
        if not is_int(packed_axis) or not 0 <= packed_axis < len(shape):
            fail(file, f"{where}: packed_axis must be null or an int in [0, {len(shape)}), "
                       f"got {packed_axis!r}")
    names = {}
    for role in _ROLES:
        v = entry.get(role)
        if role == "zero_point" and v is None:
            if not qt.signed:
                fail(file, f"{where}: {qtype} is unsigned, so it needs a zero point (only "
                           "signed types are stored symmetric, with 'zero_point' null)")
            names[role] = None
        elif v != role_names(path, False)[role]:
            fail(file, f"{where}: field {role!r} must name the tensor "
                       f"{role_names(path, False)[role]!r}, got {v!r}")
        else:
            names[role] = v
    if packed_axis is None:
        data_shape, data_dtypes = shape, (qt.storage,)
    else:
        data_shape = tuple(packed_length(n, qt.bits) if d == packed_axis else n
                           for d, n in enumerate(shape))
        data_dtypes = ("uint8",)
    _expect_tensor(file, where, tensors, names["data"], data_dtypes, batch + data_shape)
    scale_shape = batch + Blocking(shape, block).scale_shape
    _expect_tensor(file, where, tensors, names["scale"], _FLOAT_NAMES, scale_shape)
    if names["zero_point"] is not None:
        _expect_tensor(file, where, tensors, names["zero_point"], (qt.storage,), scale_shape)
    used = tuple(n for n in names.values() if n is not None)
    return LeafInfo(path, shape, dtype, qtype, block, packed_axis, names["zero_point"] is None,
                    used, sum(_tensor_nbytes(tensors, n) for n in used), batch)


def expect_keys(file, where: str, obj: dict, keys: tuple[str, ...]) -> None:
    """``obj`` has exactly the fields ``keys``."""
    if set(obj) != set(keys):
        extra = sorted(set(obj) - set(keys))
        missing = sorted(set(keys) - set(obj))
        fail(file, f"{where}: expected the fields {', '.join(keys)}"
                   + (f"; unknown: {', '.join(map(repr, extra))}" if extra else "")
                   + (f"; missing: {', '.join(map(repr, missing))}" if missing else ""))
