"""The checkpoint format: its constants, tensor naming, and the rules for one leaf entry.

An arrayquant checkpoint's header holds one JSON document (under ``__metadata__``,
key ``"arrayquant"``): the format version, one entry per leaf, the tree structure
and (version 2 on) the digests. This module names a leaf's tensors (``PATH`` for
an array; ``PATH:data``, ``PATH:scale``, ``PATH:zero_point`` for a QArray, and
also ``PATH:in_scale``, ``PATH:perm``, ``PATH:act_scale``, ``PATH:act_zero_point``
for a LinearWeight), builds leaf entries and checks one entry against the tensors
a file holds
(:mod:`arrayquant.checkpoint.document` checks the whole document).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, NoReturn

from arrayquant.blocking import Blocking
from arrayquant.checkpoint.stfile import (
    ST_TO_NAME,
    CheckpointError,
    canonical_json,
    digest,
    np_dtype,
)
from arrayquant.linear_weight import LinearWeight
from arrayquant.packing import packed_length
from arrayquant.qarray import QArray
from arrayquant.qtypes import QTYPE_NAMES, as_qtype

__all__ = [
    "FORMAT_KEY", "FORMAT_VERSION", "LINEAR_WEIGHT_VERSION", "MAX_JSON_DEPTH",
    "MAX_TREE_DEPTH", "META_KEY", "NODE_KEYS", "READ_VERSIONS", "STATE_ROLES", "LeafInfo",
    "array_leaf", "body_digest", "expect_keys", "fail", "is_int", "leaf_arrays", "leaf_entry",
    "parse_leaf", "plain_leaves", "role_names", "tensor_names",
]

#: Version of the metadata layout written by :func:`save`. Version 2 added the digests,
#: version 3 the ``linear_weight`` leaf kind; :func:`load` reads versions 1, 2 and 3.
FORMAT_VERSION = 3
READ_VERSIONS = (1, 2, 3)
#: The first version whose files may hold ``linear_weight`` leaves.
LINEAR_WEIGHT_VERSION = 3
#: The deepest tree :func:`save` writes and :func:`load` reads (the root is depth 0).
MAX_TREE_DEPTH = 100
# Each tree level nests three JSON levels (node, items, [key, node]) below the document.
MAX_JSON_DEPTH = 3 * MAX_TREE_DEPTH + 3
META_KEY = "arrayquant"
# Version 2 marks its files twice (``format`` and the document's own key), so that
# one damaged byte in either key cannot make a checkpoint read as a plain file.
FORMAT_KEY = "format"
_ROLES = ("data", "scale", "zero_point")
#: The tensors a LinearWeight stores beside its QArray's (each may be absent).
STATE_ROLES = ("in_scale", "perm", "act_scale", "act_zero_point")
_FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")
_INT_NAMES = ("int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64")
_ARRAY_KEYS = ("path", "kind", "tensor")
_QARRAY_KEYS = ("path", "kind", "qtype", "dtype", "shape", "block_shape", "packed_axis",
                *_ROLES)
_LINEAR_KEYS = (*_QARRAY_KEYS, "in_axis", "in_scale", "perm", "act_qtype", "act_scale",
                "act_zero_point")
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
    if isinstance(leaf, LinearWeight):
        return {**role_names(path, leaf.qweight.zero_point is None),
                **{r: None if getattr(leaf, r) is None else f"{path}:{r}" for r in STATE_ROLES}}
    if isinstance(leaf, QArray):
        return role_names(path, leaf.zero_point is None)
    return {"tensor": path}


def leaf_arrays(leaf) -> dict[str, Any]:
    """``{role: array or None}`` of a leaf, the roles of :func:`tensor_names`."""
    if isinstance(leaf, LinearWeight):
        return {**leaf_arrays(leaf.qweight), **{r: getattr(leaf, r) for r in STATE_ROLES}}
    if isinstance(leaf, QArray):
        return {"data": leaf.data, "scale": leaf.scale, "zero_point": leaf.zero_point}
    return {"tensor": leaf}


def leaf_entry(path: str, leaf) -> dict[str, Any]:
    """The document's entry for ``leaf`` at ``path``."""
    if isinstance(leaf, LinearWeight):
        names = tensor_names(path, leaf)
        return {**leaf_entry(path, leaf.qweight), "kind": "linear_weight",
                "in_axis": leaf.in_axis, "in_scale": names["in_scale"], "perm": names["perm"],
                "act_qtype": leaf.act_qtype, "act_scale": names["act_scale"],
                "act_zero_point": names["act_zero_point"]}
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
    nbytes: int = 0  # of every tensor of the leaf (a LinearWeight's state included)
    batch_shape: tuple[int, ...] = ()  # leading axes of a stacked QArray
    # A LinearWeight's static fields, and which of STATE_ROLES it stores (else None, ()).
    in_axis: int | None = None
    act_qtype: str | None = None
    state: tuple[str, ...] = ()

    @property
    def quantized(self) -> bool:
        return self.qtype is not None

    @property
    def kind(self) -> str:
        """``"array"``, ``"qarray"`` or ``"linear_weight"``, as in the document."""
        if self.in_axis is not None:
            return "linear_weight"
        return "array" if self.qtype is None else "qarray"

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


def parse_leaf(file, i: int, entry, tensors, version: int = FORMAT_VERSION) -> LeafInfo:
    """The leaf of the ``i``-th entry of 'leaves', checked against the file's tensors."""
    where = f"leaf #{i}"
    if not isinstance(entry, dict):
        fail(file, f"{where}: expected a JSON object, got {entry!r}")
    path = _str_field(file, where, entry, "path")
    where = f"leaf {path!r}"
    kind = entry.get("kind")
    if kind == "linear_weight" and version < LINEAR_WEIGHT_VERSION:
        fail(file, f"{where}: kind 'linear_weight' is new in format version "
                   f"{LINEAR_WEIGHT_VERSION}, but the file says version {version}")
    if kind in ("array", "qarray", "linear_weight"):
        keys = {"array": _ARRAY_KEYS, "qarray": _QARRAY_KEYS, "linear_weight": _LINEAR_KEYS}[kind]
        if kind == "qarray" and _BATCH_KEY in entry:
            keys = (*keys, _BATCH_KEY)
        expect_keys(file, where, entry, keys)
    if kind == "array":
        name = _str_field(file, where, entry, "tensor")
        if name != path:
            fail(file, f"{where}: field 'tensor' must be the leaf's path {path!r}, got "
                       f"{name!r}")
        return array_leaf(file, tensors, name, where)
    if kind not in ("qarray", "linear_weight"):
        fail(file, f"{where}: field 'kind' must be 'array', 'qarray' or 'linear_weight', got "
                   f"{kind!r}")
    leaf = _qarray_leaf(file, where, path, entry, tensors)
    return leaf if kind == "qarray" else _linear_leaf(file, where, entry, tensors, leaf)


def _qarray_leaf(file, where: str, path: str, entry: dict, tensors) -> LeafInfo:
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


def _linear_leaf(file, where: str, entry: dict, tensors, qleaf: LeafInfo) -> LeafInfo:
    """A linear_weight entry: its QArray (``qleaf``, already checked) and its input state."""
    if len(qleaf.shape) != 2:
        fail(file, f"{where}: a linear_weight is 2-D; shape {list(qleaf.shape)} has "
                   f"{len(qleaf.shape)} entries")
    in_axis = entry["in_axis"]
    if not is_int(in_axis) or in_axis not in (0, 1):
        fail(file, f"{where}: field 'in_axis' must be 0 ((in, out) layout) or 1 ((out, in) "
                   f"layout), got {in_axis!r}")
    act_qtype = entry["act_qtype"]
    if act_qtype is not None and act_qtype not in QTYPE_NAMES:
        fail(file, f"{where}: field 'act_qtype' must be null or one of {', '.join(QTYPE_NAMES)}, "
                   f"got {act_qtype!r}")
    names: dict[str, str | None] = {}
    for role in STATE_ROLES:
        v, want = entry[role], f"{qleaf.path}:{role}"
        if v is not None and v != want:
            fail(file, f"{where}: field {role!r} must be null or name the tensor {want!r}, "
                       f"got {v!r}")
        names[role] = v
    if (act_qtype is None) != (names["act_scale"] is None):
        fail(file, f"{where}: fields 'act_qtype' and 'act_scale' go together (static activation "
                   f"quantization: both set or both null), got {act_qtype!r} and "
                   f"{names['act_scale']!r}")
    if names["act_zero_point"] is not None and act_qtype is None:
        fail(file, f"{where}: field 'act_zero_point' needs 'act_qtype' and 'act_scale'")
    if act_qtype is not None and names["act_zero_point"] is None \
            and not as_qtype(act_qtype).signed:
        fail(file, f"{where}: act_qtype {act_qtype} is unsigned, so it needs 'act_zero_point' "
                   "(only signed activation types are symmetric)")
    k = qleaf.shape[in_axis]
    wanted = {"in_scale": (_FLOAT_NAMES, (k,)), "perm": (("int32", "int64"), (k,)),
              "act_scale": (_FLOAT_NAMES, ()), "act_zero_point": (_INT_NAMES, ())}
    state = tuple(r for r in STATE_ROLES if names[r] is not None)
    for role in state:
        _expect_tensor(file, where, tensors, names[role], *wanted[role])
    extra = tuple(names[r] for r in state)
    return replace(qleaf, tensors=qleaf.tensors + extra,
                   nbytes=qleaf.nbytes + sum(_tensor_nbytes(tensors, n) for n in extra),
                   in_axis=in_axis, act_qtype=act_qtype, state=state)


def expect_keys(file, where: str, obj: dict, keys: tuple[str, ...]) -> None:
    """``obj`` has exactly the fields ``keys``."""
    if set(obj) != set(keys):
        extra = sorted(set(obj) - set(keys))
        missing = sorted(set(keys) - set(obj))
        fail(file, f"{where}: expected the fields {', '.join(keys)}"
                   + (f"; unknown: {', '.join(map(repr, extra))}" if extra else "")
                   + (f"; missing: {', '.join(map(repr, missing))}" if missing else ""))
