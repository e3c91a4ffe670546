"""Checkpoints: save and load trees of arrays and QArrays as safetensors, and quantize them.

The file is a standard safetensors file (readable by any safetensors reader): every
plain array is one tensor named by its path, every :class:`~arrayquant.QArray` is
two or three tensors (``PATH:data``, ``PATH:scale`` and, when asymmetric,
``PATH:zero_point``), and the static metadata (qtype, granularity, shapes, the
original dtype, the packing layout, the tree structure, a format version) is one
JSON document stored under the key ``"arrayquant"`` of the safetensors header's
``__metadata__``. ``docs/checkpoints.md`` describes it field by field.

- :func:`save` writes atomically (a temporary file in the same folder, flushed to
  disk, then renamed), so a crash or a full disk never leaves a truncated file
  under the final name.
- :func:`load` validates everything it reads (the metadata schema, every tensor's
  dtype and shape against the metadata, code and zero-point ranges, positive
  finite scales, no missing or unreferenced tensors) and raises
  :class:`CheckpointError` with the file name and the offending entry otherwise.
  Plain safetensors files (without arrayquant metadata) load as a flat dict.
- :func:`quantize_checkpoint` quantizes a safetensors or ``.npz`` checkpoint tensor
  by tensor: it reads one tensor (``pread``, no memory map), quantizes it, appends
  it to the output and drops it, so peak memory stays near the largest tensor
  rather than the whole model.

No pickle anywhere: safetensors holds only raw tensors and JSON, and ``.npz`` input
is read with ``allow_pickle=False``.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import struct
import sys
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy, for safetensors' BF16)
import numpy as np

from ._backend import is_float_dtype
from ._blocking import Blocking, plan
from ._io import atomic_path
from ._qtypes import QTYPE_NAMES, as_qtype
from .packing import packed_length, unpack
from .qarray import QArray
from .tree import (
    LeafReport,
    Rule,
    TreeReport,
    _as_rules,
    _is_leaf,
    _jax_tree_util,
    _leaf_report,
    _map,
    _quantize_leaf,
    _select,
)

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "CheckpointInfo",
    "LeafInfo",
    "checkpoint_info",
    "load",
    "quantize_checkpoint",
    "save",
]

#: Version of the metadata layout written by :func:`save`; :func:`load` reads this one.
FORMAT_VERSION = 1
_META_KEY = "arrayquant"
_ROLES = ("data", "scale", "zero_point")

# safetensors dtype codes <-> NumPy dtype names (the ones NumPy can hold).
_ST_TO_NAME = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16",
    "U32": "uint32", "I32": "int32", "U64": "uint64", "I64": "int64",
    "F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64",
}
_NAME_TO_ST = {v: k for k, v in _ST_TO_NAME.items()}
_FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")


class CheckpointError(ValueError):
    """A checkpoint file is malformed, inconsistent or unsupported (the message says where)."""


def _np_dtype(name: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def _to_numpy(a, path: str) -> np.ndarray:
    jtu = _jax_tree_util()
    if jtu is not None:
        from ._jax import is_tracer

        if is_tracer(a):
            raise TypeError(f"cannot save {path!r}: it is a traced JAX value (inside jax.jit?)")
    try:
        out = np.asarray(a)
    except (TypeError, ValueError, RuntimeError):
        out = np.from_dlpack(a)
    if out.dtype.name not in _NAME_TO_ST:
        raise TypeError(
            f"cannot save {path!r}: dtype {out.dtype} is not one safetensors stores here; "
            f"expected one of {', '.join(_NAME_TO_ST)}"
        )
    return out if out.flags.c_contiguous else out.copy(order="C")  # ascontiguousarray makes 0-d 1-d


# --------------------------------------------------------------------------- describing trees


def _tensor_names(path: str, leaf) -> dict[str, str | None]:
    if isinstance(leaf, QArray):
        return {
            "data": f"{path}:data",
            "scale": f"{path}:scale",
            "zero_point": None if leaf.zero_point is None else f"{path}:zero_point",
        }
    return {"tensor": path}


def _leaf_entry(path: str, leaf) -> dict[str, Any]:
    if isinstance(leaf, QArray):
        return {
            "path": path, "kind": "qarray", "qtype": leaf.qtype, "dtype": leaf.dtype,
            "shape": list(leaf.shape), "block_shape": list(leaf.block_shape),
            "packed_axis": leaf.packed_axis, **_tensor_names(path, leaf),
        }
    return {"path": path, "kind": "array", "tensor": path}


def _skeleton(node, prefix: tuple[str, ...], leaves: list) -> dict[str, Any] | None:
    """JSON skeleton of a tree of builtin containers, or None if it has other containers."""
    path = "/".join(prefix)
    if _is_leaf(node):
        leaves.append((path, node))
        return {"type": "leaf", "path": path}
    if node is None:
        return {"type": "none"}
    if type(node) is dict:
        items = []
        for k, v in node.items():
            if not isinstance(k, str):
                raise TypeError(
                    f"cannot save the key {k!r} under {path or 'the root'!r}: dict keys must "
                    "be strings"
                )
            sub = _skeleton(v, (*prefix, k), leaves)
            if sub is None:
                return None
            items.append([k, sub])
        return {"type": "dict", "items": items}
    if isinstance(node, (list, tuple)):
        items = []
        for i, v in enumerate(node):
            sub = _skeleton(v, (*prefix, str(i)), leaves)
            if sub is None:
                return None
            items.append(sub)
        return {"type": "list" if isinstance(node, list) else "tuple", "items": items}
    jtu = _jax_tree_util()
    if jtu is not None and not jtu.treedef_is_leaf(jtu.tree_structure(node)):
        return None  # another pytree container: saved flat, rebuilt with load(..., like=)
    raise TypeError(
        f"cannot save {path or 'the root'!r} of type {type(node).__name__}: save() stores "
        "arrays and QArrays in dicts, lists and tuples (and JAX pytrees when JAX is imported)"
    )


def _describe(tree) -> tuple[list[tuple[str, Any]], dict[str, Any] | None]:
    """(leaves as (path, leaf), skeleton or None for a flat dict)."""
    if _is_leaf(tree):
        raise TypeError(
            "save() needs a tree (a dict, list, tuple or pytree) of arrays, not a single "
            "array; wrap it, e.g. save(path, {'x': x})"
        )
    leaves: list[tuple[str, Any]] = []
    skeleton = _skeleton(tree, (), leaves)
    if skeleton is None:  # generic pytree: its array leaves by path, structure from `like`
        leaves = []

        def visit(path, leaf):
            if _is_leaf(leaf):
                leaves.append((path, leaf))
            return leaf

        _map(visit, tree, ())
    elif (skeleton["type"] == "dict"
          and all(sub["type"] == "leaf" for _, sub in skeleton["items"])):
        skeleton = None  # a flat dict of arrays: the leaf list says it all
    seen: set[str] = set()
    for path, _ in leaves:
        if path in seen:
            raise ValueError(f"two leaves share the path {path!r}; paths must be unique to save")
        seen.add(path)
    return leaves, skeleton


def _metadata(entries: list[dict[str, Any]], skeleton) -> dict[str, str]:
    doc = {"version": FORMAT_VERSION, "leaves": entries, "tree": skeleton}
    return {_META_KEY: json.dumps(doc, separators=(",", ":"))}


def _fsync(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(path, tree) -> None:
    """Write ``tree`` (arrays and QArrays) to ``path`` in safetensors format, atomically.

    ``tree`` is a dict, list or tuple nesting (string dict keys) of arrays of any
    namespace and :class:`QArray` s; ``None`` entries are kept. Any other JAX
    pytree (an Equinox module, an NNX state) is stored as its array leaves by path
    and comes back from ``load(path, like=template)``. Arrays are converted to
    NumPy (JAX arrays are copied to the host).

    Raises:
        TypeError: a leaf that is not an array (under builtin containers), a
            non-string dict key, a dtype safetensors cannot store, a traced value,
            or a single array instead of a tree.
        ValueError: two leaves with the same path, or two tensor names that clash.
        OSError: the file cannot be written (the previous file, if any, is intact).

    Example:
        >>> import numpy as np, arrayquant as aq, tempfile, os
        >>> tree = {"w": aq.quantize(np.ones((2, 8), np.float32), "int4"), "b": np.zeros(2)}
        >>> f = os.path.join(tempfile.mkdtemp(), "m.safetensors")
        >>> aq.save(f, tree)
        >>> aq.load(f)["w"]
        QArray(qtype=int4, shape=(2, 8), dtype=float32, per-tensor, asymmetric, packed_axis=1)
    """
    from safetensors.numpy import save_file

    leaves, skeleton = _describe(tree)
    entries = []
    tensors: dict[str, np.ndarray] = {}
    for p, leaf in leaves:
        entries.append(_leaf_entry(p, leaf))
        names = _tensor_names(p, leaf)
        arrays = ({"data": leaf.data, "scale": leaf.scale, "zero_point": leaf.zero_point}
                  if isinstance(leaf, QArray) else {"tensor": leaf})
        for role, name in names.items():
            if name is None:
                continue
            if name in tensors:
                raise ValueError(
                    f"cannot save {p!r}: its tensor name {name!r} is already used by another "
                    "leaf; rename one of them"
                )
            tensors[name] = _to_numpy(arrays[role], p)
    path = pathlib.Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=_metadata(entries, skeleton))
        _fsync(tmp)


# --------------------------------------------------------------------------- reading headers


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
        return math.prod(self.shape) * _np_dtype(self.dtype).itemsize


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint holds: kind, format version and leaves (see :func:`checkpoint_info`)."""

    path: str
    kind: str  # "arrayquant", "safetensors" (plain) or "npz"
    version: int | None
    leaves: tuple[LeafInfo, ...]
    file_size: int


def _raise(file, msg: str) -> None:
    raise CheckpointError(f"{file}: {msg}")


def _safe_open(file):
    """``safe_open`` reading with ``pread`` (safetensors >= 0.8), not a memory map.

    Pages of a memory map stay mapped (and counted in the resident set) while the
    file is open; ``pread`` copies each tensor into its own buffer instead, so
    streaming through a big file keeps memory near one tensor. Older safetensors
    have only the memory map.
    """
    from safetensors import safe_open

    try:
        return safe_open(file, framework="numpy", backend="pread")
    except TypeError:
        return safe_open(file, framework="numpy")


def _header(file: pathlib.Path) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict]:
    """({tensor: (dtype code, shape)} in file order, metadata) from the safetensors header."""
    from safetensors import SafetensorError

    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such file")
    try:
        with _safe_open(file) as f:
            tensors = {}
            for name in getattr(f, "offset_keys", f.keys)():
                s = f.get_slice(name)
                tensors[name] = (s.get_dtype(), tuple(int(n) for n in s.get_shape()))
            meta = f.metadata() or {}
    except SafetensorError as e:
        _raise(file, f"not a valid safetensors file ({e})")
    return tensors, meta


def _is_int(v) -> bool:
    return type(v) is int


def _shape_field(file, where: str, v, what: str, ndim: int | None = None) -> tuple[int, ...]:
    if not isinstance(v, list) or not all(_is_int(n) and n >= 0 for n in v):
        _raise(file, f"{where}: {what} must be a list of non-negative ints, got {v!r}")
    if ndim is not None and len(v) != ndim:
        _raise(file, f"{where}: {what} {v} has {len(v)} entries, expected {ndim}")
    return tuple(v)


def _str_field(file, where: str, entry: dict, key: str) -> str:
    v = entry.get(key)
    if not isinstance(v, str):
        _raise(file, f"{where}: field {key!r} must be a string, got {v!r}")
    return v


def _expect_tensor(file, where, tensors, name, dtype_names, shape) -> None:
    if name not in tensors:
        _raise(file, f"{where}: tensor {name!r} is missing from the file")
    code, got_shape = tensors[name]
    got = _ST_TO_NAME.get(code, code)
    if got not in dtype_names:
        _raise(file, f"{where}: tensor {name!r} has dtype {got}, expected "
                     f"{' or '.join(dtype_names)}")
    if shape is not None and got_shape != tuple(shape):
        _raise(file, f"{where}: tensor {name!r} has shape {list(got_shape)}, expected "
                     f"{list(shape)}")


def _tensor_nbytes(tensors, name) -> int:
    code, shape = tensors[name]
    return math.prod(shape) * _np_dtype(_ST_TO_NAME[code]).itemsize


def _parse_leaf(file, i: int, entry, tensors) -> LeafInfo:
    where = f"leaf #{i}"
    if not isinstance(entry, dict):
        _raise(file, f"{where}: expected a JSON object, got {entry!r}")
    path = _str_field(file, where, entry, "path")
    where = f"leaf {path!r}"
    kind = entry.get("kind")
    if kind == "array":
        name = _str_field(file, where, entry, "tensor")
        if name not in tensors:
            _raise(file, f"{where}: tensor {name!r} is missing from the file")
        code, shape = tensors[name]
        if code not in _ST_TO_NAME:
            _raise(file, f"{where}: tensor {name!r} has dtype {code}, which arrayquant does not "
                         f"read (expected one of {', '.join(_ST_TO_NAME)})")
        return LeafInfo(path, shape, _ST_TO_NAME[code], tensors=(name,),
                        nbytes=_tensor_nbytes(tensors, name))
    if kind != "qarray":
        _raise(file, f"{where}: field 'kind' must be 'array' or 'qarray', got {kind!r}")
    qtype = entry.get("qtype")
    if qtype not in QTYPE_NAMES:
        _raise(file, f"{where}: unknown qtype {qtype!r}; expected one of {', '.join(QTYPE_NAMES)}")
    qt = as_qtype(qtype)
    dtype = entry.get("dtype")
    if dtype not in _FLOAT_NAMES:
        _raise(file, f"{where}: field 'dtype' must be one of {', '.join(_FLOAT_NAMES)}, got "
                     f"{dtype!r}")
    shape = _shape_field(file, where, entry.get("shape"), "shape")
    if math.prod(shape) == 0:
        _raise(file, f"{where}: shape {list(shape)} is empty; a QArray holds at least one value")
    block = _shape_field(file, where, entry.get("block_shape"), "block_shape", len(shape))
    for d, (b, n) in enumerate(zip(block, shape)):
        if not 1 <= b <= n:
            _raise(file, f"{where}: block_shape[{d}] = {b} must be in [1, {n}]")
    packed_axis = entry.get("packed_axis")
    if packed_axis is not None:
        if qt.bits >= 8:
            _raise(file, f"{where}: packed_axis must be null for {qtype} (only 2- and 4-bit "
                         f"codes are packed), got {packed_axis!r}")
        if not _is_int(packed_axis) or not 0 <= packed_axis < len(shape):
            _raise(file, f"{where}: packed_axis must be null or an int in [0, {len(shape)}), "
                         f"got {packed_axis!r}")
    names = {}
    for role in _ROLES:
        v = entry.get(role)
        if role == "zero_point" and v is None:
            names[role] = None
        elif not isinstance(v, str):
            _raise(file, f"{where}: field {role!r} must be a tensor name (string), got {v!r}")
        else:
            names[role] = v
    if packed_axis is None:
        data_shape, data_dtypes = shape, (qt.storage,)
    else:
        data_shape = tuple(packed_length(n, qt.bits) if d == packed_axis else n
                           for d, n in enumerate(shape))
        data_dtypes = ("uint8",)
    _expect_tensor(file, where, tensors, names["data"], data_dtypes, data_shape)
    scale_shape = Blocking(shape, block).scale_shape
    _expect_tensor(file, where, tensors, names["scale"], _FLOAT_NAMES, scale_shape)
    if names["zero_point"] is not None:
        _expect_tensor(file, where, tensors, names["zero_point"], (qt.storage,), scale_shape)
    used = tuple(n for n in names.values() if n is not None)
    return LeafInfo(path, shape, dtype, qtype, block, packed_axis, names["zero_point"] is None,
                    used, sum(_tensor_nbytes(tensors, n) for n in used))


def _check_skeleton(file, node, paths: set[str], seen: set[str], depth: int = 0) -> None:
    if depth > 100:
        _raise(file, "the 'tree' structure is nested more than 100 levels deep")
    if not isinstance(node, dict):
        _raise(file, f"tree node must be a JSON object, got {node!r}")
    t = node.get("type")
    if t == "none":
        return
    if t == "leaf":
        p = node.get("path")
        if p not in paths:
            _raise(file, f"the tree refers to leaf {p!r}, which is not in 'leaves'")
        if p in seen:
            _raise(file, f"the tree refers to leaf {p!r} twice")
        seen.add(p)
        return
    items = node.get("items")
    if t not in ("dict", "list", "tuple") or not isinstance(items, list):
        _raise(file, f"tree node must have a 'type' of dict, list, tuple, leaf or none and a "
                     f"list of 'items'; got {json.dumps(node)[:80]}")
    for item in items:
        if t == "dict":
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
                _raise(file, f"dict items must be [key, node] pairs, got {item!r}"[:200])
            item = item[1]
        _check_skeleton(file, item, paths, seen, depth + 1)


def _parse(file, tensors, meta) -> tuple[int, list[LeafInfo], Any]:
    raw = meta[_META_KEY]
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as e:
        _raise(file, f"the {_META_KEY!r} metadata is not valid JSON ({e})")
    if not isinstance(doc, dict):
        _raise(file, f"the {_META_KEY!r} metadata must be a JSON object")
    version = doc.get("version")
    if not _is_int(version) or version < 1:
        _raise(file, f"metadata field 'version' must be a positive int, got {version!r}")
    if version > FORMAT_VERSION:
        _raise(file, f"written with checkpoint format version {version}; this arrayquant reads "
                     f"version {FORMAT_VERSION}: upgrade arrayquant")
    entries = doc.get("leaves")
    if not isinstance(entries, list):
        _raise(file, "metadata field 'leaves' must be a list")
    leaves = [_parse_leaf(file, i, e, tensors) for i, e in enumerate(entries)]
    owner: dict[str, str] = {}
    paths: set[str] = set()
    for leaf in leaves:
        if leaf.path in paths:
            _raise(file, f"two leaves have the path {leaf.path!r}")
        paths.add(leaf.path)
        for name in leaf.tensors:
            if name in owner:
                _raise(file, f"tensor {name!r} is used by both {owner[name]!r} and {leaf.path!r}")
            owner[name] = leaf.path
    extra = [n for n in tensors if n not in owner]
    if extra:
        _raise(file, f"tensor {extra[0]!r} is not described by the metadata"
                     + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    skeleton = doc.get("tree")
    if skeleton is not None:
        seen: set[str] = set()
        _check_skeleton(file, skeleton, paths, seen)
        if seen != paths:
            _raise(file, f"leaf {sorted(paths - seen)[0]!r} is missing from the 'tree' structure")
    return version, leaves, skeleton


def _plain_leaves(file, tensors) -> list[LeafInfo]:
    out = []
    for name, (code, shape) in tensors.items():
        if code not in _ST_TO_NAME:
            _raise(file, f"tensor {name!r} has dtype {code}, which arrayquant does not read "
                         f"(expected one of {', '.join(_ST_TO_NAME)})")
        out.append(LeafInfo(name, shape, _ST_TO_NAME[code], tensors=(name,),
                            nbytes=_tensor_nbytes(tensors, name)))
    return out


def _npz_headers(file: pathlib.Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{array name: (dtype name, shape)} of an .npz file, from the .npy headers only."""
    out = {}
    try:
        with zipfile.ZipFile(file) as zf:
            for member in zf.namelist():
                if not member.endswith(".npy"):
                    continue
                with zf.open(member) as f:
                    version = np.lib.format.read_magic(f)
                    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                            else np.lib.format.read_array_header_2_0)
                    shape, fortran, dtype = read(f)
                if dtype.hasobject or dtype.name not in _NAME_TO_ST:
                    _raise(file, f"array {member[:-4]!r} has dtype {dtype}, which arrayquant "
                                 "does not read (no pickled objects)")
                out[member[:-4]] = (dtype.name, tuple(shape))
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        if isinstance(e, CheckpointError):
            raise
        _raise(file, f"not a valid .npz file ({e})")
    return out


def checkpoint_info(path) -> CheckpointInfo:
    """Describe a checkpoint from its header, without reading tensor data.

    Works on arrayquant checkpoints, plain safetensors files and ``.npz`` files.
    The header is validated as by :func:`load` (schema, dtypes and shapes); code
    ranges and scale values are only checked by :func:`load`.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: a malformed file.
    """
    file = pathlib.Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such file")
    size = file.stat().st_size
    if file.suffix == ".npz":
        headers = _npz_headers(file)
        leaves = tuple(
            LeafInfo(n, s, d, tensors=(n,), nbytes=math.prod(s) * _np_dtype(d).itemsize)
            for n, (d, s) in headers.items()
        )
        return CheckpointInfo(str(file), "npz", None, leaves, size)
    tensors, meta = _header(file)
    if _META_KEY not in meta:
        return CheckpointInfo(str(file), "safetensors", None,
                              tuple(_plain_leaves(file, tensors)), size)
    version, leaves, _ = _parse(file, tensors, meta)
    return CheckpointInfo(str(file), "arrayquant", version, tuple(leaves), size)


# --------------------------------------------------------------------------- loading


def _read(file, f, name: str) -> np.ndarray:
    from safetensors import SafetensorError

    try:
        return f.get_tensor(name)
    except (SafetensorError, TypeError, ValueError) as e:
        _raise(file, f"cannot read tensor {name!r} ({e})")


def _check_range(file, leaf: LeafInfo, what: str, values: np.ndarray, lo: int, hi: int) -> None:
    if values.size and (values.min() < lo or values.max() > hi):
        _raise(file, f"leaf {leaf.path!r}: {what} outside [{lo}, {hi}] (min {values.min()}, "
                     f"max {values.max()}) for {leaf.qtype}"
                     + (" symmetric" if leaf.symmetric and what == "codes" else ""))


def _load_qarray(file, f, leaf: LeafInfo) -> QArray:
    qt = as_qtype(leaf.qtype)
    names = dict(zip(("data", "scale", "zero_point"), leaf.tensors))
    data = _read(file, f, names["data"])
    scale = _read(file, f, names["scale"])
    zp = None if leaf.symmetric else _read(file, f, names["zero_point"])
    lo = max(qt.qmin, -qt.qmax) if leaf.symmetric else qt.qmin
    if leaf.packed_axis is None:
        _check_range(file, leaf, "codes", data, lo, qt.qmax)
    else:
        n = leaf.shape[leaf.packed_axis]
        per = 8 // qt.bits
        if n % per:  # the unused high bits of each row's last byte must be zero
            last = np.take(data, [data.shape[leaf.packed_axis] - 1], axis=leaf.packed_axis)
            if np.any(last >> ((n % per) * qt.bits)):
                _raise(file, f"leaf {leaf.path!r}: the padding bits after the last packed code "
                             "are not zero")
        if lo != qt.qmin:
            codes = unpack(data, qt.bits, n, axis=leaf.packed_axis, signed=qt.signed)
            _check_range(file, leaf, "codes", codes, lo, qt.qmax)
    if not np.all(np.isfinite(scale)) or not np.all(scale > 0):
        _raise(file, f"leaf {leaf.path!r}: scales must be finite and positive")
    if zp is not None:
        _check_range(file, leaf, "zero points", zp, qt.qmin, qt.qmax)
    return QArray(data, scale, zp, leaf.qtype, leaf.shape, leaf.dtype, leaf.block_shape,
                  leaf.packed_axis)


def _build(node, leaves: dict[str, Any]):
    t = node["type"]
    if t == "leaf":
        return leaves[node["path"]]
    if t == "none":
        return None
    if t == "dict":
        return {k: _build(v, leaves) for k, v in node["items"]}
    items = [_build(v, leaves) for v in node["items"]]
    return items if t == "list" else tuple(items)


def _fill(like, leaves: dict[str, Any], file):
    used: set[str] = set()

    def fn(path, leaf):
        if not _is_leaf(leaf):
            return leaf
        if path not in leaves:
            _raise(file, f"the template has a leaf {path!r} that the checkpoint does not hold")
        used.add(path)
        return leaves[path]

    out = _map(fn, like, ())
    if used != set(leaves):
        _raise(file, f"the checkpoint holds {sorted(set(leaves) - used)[0]!r}, which the "
                     "template does not have")
    return out


def load(path, *, like=None):
    """Read a checkpoint written by :func:`save` (or any plain safetensors file).

    Returns the saved tree with NumPy arrays and :class:`QArray` s of NumPy arrays
    (convert with ``jax.tree.map(jnp.asarray, tree)``): nested dicts, lists and
    tuples as saved, or a flat ``{path: leaf}`` dict for a flat dict, a generic
    pytree, or a plain safetensors file (in file order). With ``like`` (a tree
    with the same leaf paths, e.g. the float model the checkpoint was made from),
    the leaves are put into ``like``'s structure instead: every array or QArray
    leaf of ``like`` is replaced by the stored leaf of the same path.

    Everything is validated before it is returned: metadata schema and version;
    each tensor's presence, dtype and shape against the metadata; codes within the
    qtype's range (``[-qmax, qmax]`` when symmetric) and zero bits after the last
    packed code; zero points within ``[qmin, qmax]``; finite positive scales; no
    tensor left unreferenced.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: (a ValueError) a malformed, truncated, inconsistent or
            newer-format file, or ``like`` does not fit; the message names the
            file and the entry.
    """
    from safetensors import SafetensorError

    file = pathlib.Path(path)
    tensors, meta = _header(file)
    if _META_KEY in meta:
        _, leaves, skeleton = _parse(file, tensors, meta)
    else:
        leaves, skeleton = _plain_leaves(file, tensors), None
    out: dict[str, Any] = {}
    try:
        with _safe_open(file) as f:
            for leaf in leaves:
                if leaf.quantized:
                    out[leaf.path] = _load_qarray(file, f, leaf)
                else:
                    out[leaf.path] = _read(file, f, leaf.tensors[0])
    except SafetensorError as e:
        _raise(file, f"not a valid safetensors file ({e})")
    if like is not None:
        return _fill(like, out, file)
    return out if skeleton is None else _build(skeleton, out)


# --------------------------------------------------------------------------- streaming


class _StreamWriter:
    """Writes a safetensors file whose tensors are known up front, one tensor at a time.

    The header (8-byte little-endian length, then JSON padded with spaces to a
    multiple of 8) lists every tensor's dtype, shape and byte range; the data
    follows in the same order, so each tensor can be written and dropped.
    """

    def __init__(self, fh, specs: list[tuple[str, str, tuple[int, ...]]], metadata: dict):
        header: dict[str, Any] = {"__metadata__": metadata}
        offset = 0
        self._order = []
        for name, dtype, shape in specs:
            nbytes = math.prod(shape) * _np_dtype(dtype).itemsize
            header[name] = {"dtype": _NAME_TO_ST[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            self._order.append((name, dtype, tuple(shape)))
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        fh.write(struct.pack("<Q", len(text)))
        fh.write(text)
        self._fh = fh
        self._next = 0

    def write(self, name: str, a) -> None:
        exp_name, exp_dtype, exp_shape = self._order[self._next]
        a = np.asarray(a)
        if (name, a.dtype.name, a.shape) != (exp_name, exp_dtype, exp_shape):
            raise RuntimeError(
                f"internal error: tensor {name!r} {a.dtype.name}{list(a.shape)} does not match "
                f"the header's {exp_name!r} {exp_dtype}{list(exp_shape)}"
            )
        if sys.byteorder != "little" and a.dtype.itemsize > 1:
            a = a.byteswap()
        self._fh.write(a.copy(order="C").reshape(-1).view(np.uint8).data
                       if not a.flags.c_contiguous else a.reshape(-1).view(np.uint8).data)
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._order):
            raise RuntimeError("internal error: not every tensor was written")
        self._fh.flush()
        os.fsync(self._fh.fileno())


class _Source:
    """Tensors of an input checkpoint: names, dtypes and shapes up front, data one by one."""

    def __init__(self, file: pathlib.Path):
        self.file = file
        if file.suffix == ".npz":
            self.kind = "npz"
            self.specs = _npz_headers(file)
        else:
            self.kind = "safetensors"
            tensors, meta = _header(file)
            if _META_KEY in meta:
                _raise(file, "is already an arrayquant checkpoint; quantize the float original")
            for leaf in _plain_leaves(file, tensors):
                tensors[leaf.path] = (leaf.dtype, leaf.shape)
            self.specs = tensors
        self._handle = None

    def __enter__(self):
        if self.kind == "npz":
            self._handle = np.load(self.file, allow_pickle=False)
        else:
            self._ctx = _safe_open(self.file)
            self._handle = self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        if self.kind == "npz":
            self._handle.close()
        else:
            self._ctx.__exit__(*exc)

    def get(self, name: str) -> np.ndarray:
        if self.kind == "npz":
            try:
                return self._handle[name]
            except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
                _raise(self.file, f"cannot read array {name!r} ({e})")
        return _read(self.file, self._handle, name)


def _plan_leaf(name: str, dtype: str, shape, rules) -> tuple[Rule | None, list, dict]:
    """The rule for a tensor, its output tensors [(name, dtype, shape)] and its leaf entry."""
    rule = _select(rules, name, shape, dtype)
    if rule is None or rule.dtype is None or not is_float_dtype(dtype):
        return None, [(name, dtype, shape)], {"path": name, "kind": "array", "tensor": name}
    qt = as_qtype(rule.dtype)
    try:
        b = plan(tuple(shape), rule.axis, rule.group_size, rule.group_axis)
    except (ValueError, TypeError) as e:
        raise type(e)(f"cannot quantize {name!r} of shape {tuple(shape)} with {rule!r}: {e}") \
            from e
    packed_axis = len(shape) - 1 if qt.bits < 8 and len(shape) > 0 else None
    if packed_axis is None:
        data_shape, data_dtype = tuple(shape), qt.storage
    else:
        data_shape = (*shape[:-1], packed_length(shape[-1], qt.bits))
        data_dtype = "uint8"
    scale_dtype = rule.scale_dtype if isinstance(rule.scale_dtype, str) \
        else np.dtype(rule.scale_dtype).name
    names = {"data": f"{name}:data", "scale": f"{name}:scale",
             "zero_point": None if rule.symmetric else f"{name}:zero_point"}
    outs = [(names["data"], data_dtype, data_shape), (names["scale"], scale_dtype, b.scale_shape)]
    if not rule.symmetric:
        outs.append((names["zero_point"], qt.storage, b.scale_shape))
    entry = {"path": name, "kind": "qarray", "qtype": qt.name, "dtype": dtype,
             "shape": list(shape), "block_shape": list(b.block), "packed_axis": packed_axis,
             **names}
    return rule, outs, entry


def quantize_checkpoint(in_path, out_path, rules: Rule | Iterable[Rule], *,
                        progress: bool = False) -> TreeReport:
    """Quantize a float checkpoint file into an arrayquant checkpoint, one tensor at a time.

    ``in_path`` is a safetensors file or an ``.npz`` file (read without pickle);
    its tensors are the leaves of a flat dict, their names the paths that
    ``rules`` match (see :class:`Rule`; the first matching rule decides, others
    are copied unchanged). The output is what ``save(out_path,
    quantize_tree(load(in_path), rules))`` would hold, but it is written as it
    goes: the header is computed from the shapes first, then each tensor is read,
    quantized, appended and dropped. Peak memory is a small multiple of the
    largest tensor (see ``docs/benchmarks.md``). The write is atomic.

    Args:
        progress: show a tqdm progress bar (bytes read) on stderr.

    Returns:
        the :class:`TreeReport` (per tensor: bytes before and after, SQNR).

    Raises:
        FileNotFoundError: no input file.
        CheckpointError: a malformed input, or an input that is already quantized.
        ValueError, TypeError: a rule that does not fit a tensor (named), NaN or inf
            in a selected tensor, ``out_path`` equal to ``in_path``.
    """
    rules = _as_rules(rules)
    src_file, out_file = pathlib.Path(in_path), pathlib.Path(out_path)
    if not src_file.is_file():
        raise FileNotFoundError(f"{src_file}: no such file")
    if out_file.exists() and out_file.resolve() == src_file.resolve():
        raise ValueError(f"the output {out_file} is the input; choose another output path")
    source = _Source(src_file)
    plans = [(name, *_plan_leaf(name, dtype, shape, rules))
             for name, (dtype, shape) in source.specs.items()]
    specs = [spec for _, _, outs, _ in plans for spec in outs]
    seen: set[str] = set()
    for name, _, _ in specs:
        if name in seen:
            raise ValueError(f"tensor name {name!r} would be written twice; rename the input "
                             "tensor that clashes with it")
        seen.add(name)
    metadata = _metadata([entry for *_, entry in plans], None)
    total = sum(math.prod(s) * _np_dtype(d).itemsize for d, s in source.specs.values())
    rows: list[LeafReport] = []
    from tqdm import tqdm

    with atomic_path(out_file) as tmp, open(tmp, "wb") as fh, source, tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress,
        desc=src_file.name, leave=False,
    ) as bar:
        writer = _StreamWriter(fh, specs, metadata)
        for name, rule, outs, entry in plans:
            x = source.get(name)
            if rule is None:
                writer.write(name, x)
                rows.append(_leaf_report(name, x, x))
            else:
                qa = _quantize_leaf(rule, name, x)
                for (tname, _, _), part in zip(outs, (qa.data, qa.scale, qa.zero_point)):
                    writer.write(tname, part)
                if (qa.block_shape, qa.packed_axis) != (tuple(entry["block_shape"]),
                                                        entry["packed_axis"]):
                    raise RuntimeError(f"internal error: {name!r} was quantized as {qa!r}, not "
                                       "as planned")
                rows.append(_leaf_report(name, x, qa))
                del qa
            bar.update(x.nbytes)
            del x
        writer.close()
    return TreeReport(tuple(rows))
