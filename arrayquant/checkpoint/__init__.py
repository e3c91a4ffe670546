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
  under the final name. It stores a SHA-256 digest of every tensor and of the
  metadata itself (format version 2).
- :func:`load` accepts exactly what :func:`save` can write (and version-1 files):
  it validates everything it reads (the header's size and nesting, the metadata
  schema with no duplicate or unknown keys, every tensor's dtype and shape
  against the metadata, the tree referencing every leaf exactly once at its own
  path, code and zero-point ranges, scales within :func:`scale_limits`, 0/1
  booleans, the digests) and raises :class:`CheckpointError` with the file name
  and the offending entry otherwise. Plain safetensors files (without
  arrayquant metadata) load as a flat dict.
- :func:`quantize_checkpoint` quantizes a safetensors or ``.npz`` checkpoint tensor
  by tensor: it reads one tensor (``pread``, no memory map), quantizes it, appends
  it to the output and drops it, so peak memory stays near the largest tensor
  rather than the whole model.

No pickle anywhere: safetensors holds only raw tensors and JSON, and ``.npz`` input
is read with ``allow_pickle=False``.
"""

from __future__ import annotations

import math
import os
import pathlib
import re
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from arrayquant._backend import is_float_dtype, scale_limits
from arrayquant._io import atomic_path, check_input_file
from arrayquant.blocking import Blocking, plan
from arrayquant.checkpoint.stfile import (
    DIGEST_PREFIX,
    NAME_TO_ST,
    ST_TO_NAME,
    CheckpointError,
    StreamWriter,
    canonical_json,
    digest,
    np_dtype,
    read_raw_header,
    strict_json,
)
from arrayquant.packing import packed_length, unpack
from arrayquant.qarray import QArray
from arrayquant.qtypes import QTYPE_NAMES, QType, as_qtype
from arrayquant.trees import (
    LeafReport,
    Rule,
    TreeReport,
    as_rules,
    is_leaf,
    jax_tree_util,
    leaf_report,
    map_leaves,
    quantize_leaf,
    select_rule,
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

#: Version of the metadata layout written by :func:`save`. Version 2 added the digests;
#: :func:`load` reads versions 1 and 2.
FORMAT_VERSION = 2
_READ_VERSIONS = (1, 2)
#: The deepest tree :func:`save` writes and :func:`load` reads (the root is depth 0).
MAX_TREE_DEPTH = 100
# Each tree level nests three JSON levels (node, items, [key, node]) below the document.
_MAX_JSON_DEPTH = 3 * MAX_TREE_DEPTH + 3
_META_KEY = "arrayquant"
# Version 2 marks its files twice (``format`` and the document's own key), so that
# one damaged byte in either key cannot make a checkpoint read as a plain file.
_FORMAT_KEY = "format"
_ROLES = ("data", "scale", "zero_point")
_FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")
_ARRAY_KEYS = ("path", "kind", "tensor")
_QARRAY_KEYS = ("path", "kind", "qtype", "dtype", "shape", "block_shape", "packed_axis",
                *_ROLES)
_DIGEST = re.compile(re.escape(DIGEST_PREFIX) + "[0-9a-f]{64}")


def _to_numpy(a, path: str) -> np.ndarray:
    jtu = jax_tree_util()
    if jtu is not None:
        from arrayquant._backend.jaxtools import is_tracer

        if is_tracer(a):
            raise TypeError(f"cannot save {path!r}: it is a traced JAX value (inside jax.jit?)")
    try:
        out = np.asarray(a)
    except (TypeError, ValueError, RuntimeError):
        out = np.from_dlpack(a)
    if out.dtype.name not in NAME_TO_ST:
        raise TypeError(
            f"cannot save {path!r}: dtype {out.dtype} is not one safetensors stores here; "
            f"expected one of {', '.join(NAME_TO_ST)}"
        )
    return out if out.flags.c_contiguous else out.copy(order="C")  # ascontiguousarray makes 0-d 1-d


# --------------------------------------------------------------------------- describing trees


def _role_names(path: str, symmetric: bool) -> dict[str, str | None]:
    """The tensor names of a QArray at ``path`` (the loader checks exactly these)."""
    return {role: None if role == "zero_point" and symmetric else f"{path}:{role}"
            for role in _ROLES}


def _tensor_names(path: str, leaf) -> dict[str, str | None]:
    if isinstance(leaf, QArray):
        return _role_names(path, leaf.zero_point is None)
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
    if len(prefix) > MAX_TREE_DEPTH:
        raise ValueError(f"cannot save {path[:80]!r}...: the tree is nested more than "
                         f"{MAX_TREE_DEPTH} levels deep, the most a checkpoint holds")
    if is_leaf(node):
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
    jtu = jax_tree_util()
    if jtu is not None and not jtu.treedef_is_leaf(jtu.tree_structure(node)):
        return None  # another pytree container: saved flat, rebuilt with load(..., like=)
    raise TypeError(
        f"cannot save {path or 'the root'!r} of type {type(node).__name__}: save() stores "
        "arrays and QArrays in dicts, lists and tuples (and JAX pytrees when JAX is imported)"
    )


def _describe(tree) -> tuple[list[tuple[str, Any]], dict[str, Any] | None]:
    """(leaves as (path, leaf), skeleton or None for a flat dict)."""
    if is_leaf(tree):
        raise TypeError(
            "save() needs a tree (a dict, list, tuple or pytree) of arrays, not a single "
            "array; wrap it, e.g. save(path, {'x': x})"
        )
    leaves: list[tuple[str, Any]] = []
    skeleton = _skeleton(tree, (), leaves)
    if skeleton is None:  # generic pytree: its array leaves by path, structure from `like`
        leaves = []

        def visit(path, leaf):
            if is_leaf(leaf):
                leaves.append((path, leaf))
            return leaf

        map_leaves(visit, tree, ())
    elif (skeleton["type"] == "dict"
          and all(sub["type"] == "leaf" for _, sub in skeleton["items"])):
        skeleton = None  # a flat dict of arrays: the leaf list says it all
    seen: set[str] = set()
    for path, _ in leaves:
        if path in seen:
            raise ValueError(f"two leaves share the path {path!r}; paths must be unique to save")
        seen.add(path)
    return leaves, skeleton


def _body_digest(body: dict[str, Any], tensors: dict[str, tuple[str, tuple[int, ...]]]) -> str:
    """SHA-256 of the document's body and of every tensor's safetensors dtype and shape.

    The dtypes and shapes live in the safetensors header, outside the document:
    covering them here means one damaged byte there (``F32`` -> ``I32``) cannot
    load as other values with every digest matching.
    """
    listing = {name: [code, list(shape)] for name, (code, shape) in sorted(tensors.items())}
    text = canonical_json({**body, "tensors": listing})
    return digest(text.encode())


def _metadata(entries: list[dict[str, Any]], skeleton, specs):
    """``digests -> __metadata__``: the document with the tensors' and its own digests.

    The document is first checked by the loader's own rules, so that save() never
    writes a file load() would refuse.
    """
    body = {"version": FORMAT_VERSION, "leaves": entries, "tree": skeleton}
    header = {name: (NAME_TO_ST[dtype], tuple(shape)) for name, dtype, shape in specs}
    for name in header:
        if name == "__metadata__":
            raise ValueError("a tensor cannot be named '__metadata__': safetensors keeps that "
                             "name for the file's metadata; rename the leaf")
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"the tensor name {name!r} cannot be encoded as UTF-8 (a lone "
                             "surrogate?); rename the leaf") from None
    try:
        _parse_body("<the file to write>", body, header)
    except CheckpointError as e:
        raise ValueError(f"cannot save: {e}; load() would refuse the file") from None
    own = _body_digest(body, header)

    def with_digests(tensor_digests: dict[str, str]) -> dict[str, str]:
        doc = {**body, "digests": {"metadata": own, "tensors": tensor_digests}}
        return {_FORMAT_KEY: _META_KEY, _META_KEY: canonical_json(doc)}

    return with_digests


def _write(out_path, specs, metadata, parts) -> None:
    """Atomically write the tensors ``parts`` yields, in the order of ``specs``."""
    with atomic_path(out_path) as tmp, open(tmp, "wb") as fh:
        writer = StreamWriter(fh, specs, metadata)
        for name, a in parts:
            writer.write(name, a)
        writer.close()


def save(path, tree) -> None:
    """Write ``tree`` (arrays and QArrays) to ``path`` in safetensors format, atomically.

    ``tree`` is a dict, list or tuple nesting (string dict keys) of arrays of any
    namespace and :class:`QArray` s; ``None`` entries are kept. Any other JAX
    pytree (an Equinox module, an NNX state) is stored as its array leaves by path
    and comes back from ``load(path, like=template)``. Arrays are converted to
    NumPy (JAX arrays are copied to the host).

    Every tensor's SHA-256 digest and one of the metadata are stored with it, and
    :func:`load` checks them. A QArray is saved only if :func:`load` would accept
    it: codes and zero points in range, scales within :func:`scale_limits`.

    Raises:
        TypeError: a leaf that is not an array (under builtin containers), a
            non-string dict key, a dtype safetensors cannot store, a traced value,
            or a single array instead of a tree.
        ValueError: two leaves with the same path, two tensor names that clash, a
            tree nested more than ``MAX_TREE_DEPTH`` levels, a QArray whose values
            :func:`load` would reject.
        OSError: the file cannot be written: a missing folder, no permission, a
            full disk, a symbolic link or read-only file as ``path`` (the previous
            file, if any, is intact).

    Example:
        >>> import numpy as np, arrayquant as aq, tempfile, os
        >>> tree = {"w": aq.quantize(np.ones((2, 8), np.float32), "int4"), "b": np.zeros(2)}
        >>> f = os.path.join(tempfile.mkdtemp(), "m.safetensors")
        >>> aq.save(f, tree)
        >>> aq.load(f)["w"]
        QArray(qtype=int4, shape=(2, 8), dtype=float32, per-tensor, asymmetric, packed_axis=1)
    """
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
        if isinstance(leaf, QArray):
            parts = [None if n is None else tensors[n] for n in names.values()]
            problem = _qarray_problem(leaf.qtype, leaf.dtype, leaf.shape, leaf.packed_axis,
                                      *parts)
            if problem:
                raise ValueError(f"cannot save {p!r}: {problem}; load() would reject it")
    # Widest items first keeps every tensor aligned to its item size in the file.
    names = sorted(tensors, key=lambda n: -tensors[n].dtype.itemsize)
    specs = [(n, tensors[n].dtype.name, tensors[n].shape) for n in names]
    _write(path, specs, _metadata(entries, skeleton, specs),
           ((n, tensors[n]) for n in names))


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
        return math.prod(self.shape) * np_dtype(self.dtype).itemsize


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint holds: kind, format version and leaves (see :func:`checkpoint_info`)."""

    path: str
    kind: str  # "arrayquant", "safetensors" (plain) or "npz"
    version: int | None
    leaves: tuple[LeafInfo, ...]
    file_size: int
    #: "sha256" when the file stores a digest of every tensor and of its metadata
    #: (format version 2), else None.
    integrity: str | None = None


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
    """({tensor: (dtype code, shape)} in file order, metadata) from the safetensors header.

    The JSON is read strictly first (size, nesting, duplicate keys, NaN); then
    ``safetensors`` checks the tensor entries (dtypes, shapes, contiguous offsets).
    """
    from safetensors import SafetensorError

    check_input_file(file)
    read_raw_header(file)
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
    got = ST_TO_NAME.get(code, code)
    if got not in dtype_names:
        _raise(file, f"{where}: tensor {name!r} has dtype {got}, expected "
                     f"{' or '.join(dtype_names)}")
    if shape is not None and got_shape != tuple(shape):
        _raise(file, f"{where}: tensor {name!r} has shape {list(got_shape)}, expected "
                     f"{list(shape)}")


def _tensor_nbytes(tensors, name) -> int:
    code, shape = tensors[name]
    return math.prod(shape) * np_dtype(ST_TO_NAME[code]).itemsize


def _parse_leaf(file, i: int, entry, tensors) -> LeafInfo:
    where = f"leaf #{i}"
    if not isinstance(entry, dict):
        _raise(file, f"{where}: expected a JSON object, got {entry!r}")
    path = _str_field(file, where, entry, "path")
    where = f"leaf {path!r}"
    kind = entry.get("kind")
    if kind in ("array", "qarray"):
        _expect_keys(file, where, entry, _ARRAY_KEYS if kind == "array" else _QARRAY_KEYS)
    if kind == "array":
        name = _str_field(file, where, entry, "tensor")
        if name != path:
            _raise(file, f"{where}: field 'tensor' must be the leaf's path {path!r}, got "
                         f"{name!r}")
        if name not in tensors:
            _raise(file, f"{where}: tensor {name!r} is missing from the file")
        code, shape = tensors[name]
        if code not in ST_TO_NAME:
            _raise(file, f"{where}: tensor {name!r} has dtype {code}, which arrayquant does not "
                         f"read (expected one of {', '.join(ST_TO_NAME)})")
        return LeafInfo(path, shape, ST_TO_NAME[code], tensors=(name,),
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
            if not qt.signed:
                _raise(file, f"{where}: {qtype} is unsigned, so it needs a zero point (only "
                             "signed types are stored symmetric, with 'zero_point' null)")
            names[role] = None
        elif v != _role_names(path, False)[role]:
            _raise(file, f"{where}: field {role!r} must name the tensor "
                         f"{_role_names(path, False)[role]!r}, got {v!r}")
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


def _expect_keys(file, where: str, obj: dict, keys: tuple[str, ...]) -> None:
    if set(obj) != set(keys):
        extra = sorted(set(obj) - set(keys))
        missing = sorted(set(keys) - set(obj))
        _raise(file, f"{where}: expected the fields {', '.join(keys)}"
                     + (f"; unknown: {', '.join(map(repr, extra))}" if extra else "")
                     + (f"; missing: {', '.join(map(repr, missing))}" if missing else ""))


_NODE_KEYS = {"leaf": ("type", "path"), "none": ("type",), "dict": ("type", "items"),
              "list": ("type", "items"), "tuple": ("type", "items")}


def _check_skeleton(file, node, prefix: tuple[str, ...], paths: set[str], seen: set[str]) -> None:
    """The tree is what save() writes: each leaf once, at the path of its position."""
    here = "/".join(prefix) or "the root"
    if len(prefix) > MAX_TREE_DEPTH:
        _raise(file, f"the 'tree' structure is nested more than {MAX_TREE_DEPTH} levels deep")
    if not (isinstance(node, dict) and isinstance(node.get("type"), str)
            and node["type"] in _NODE_KEYS):
        _raise(file, f"tree node at {here!r} must be an object whose 'type' is one of "
                     f"{', '.join(_NODE_KEYS)}; got {canonical_json(node)[:80]}")
    t = node["type"]
    _expect_keys(file, f"tree node at {here!r}", node, _NODE_KEYS[t])
    if t == "none":
        return
    if t == "leaf":
        p, want = node["path"], "/".join(prefix)
        if not isinstance(p, str):
            _raise(file, f"tree leaf at {here!r}: 'path' must be a string, got {p!r}")
        if p != want:
            _raise(file, f"tree leaf at {here!r} refers to leaf {p!r}; a leaf is stored at "
                         f"its own path")
        if p not in paths:
            _raise(file, f"the tree refers to leaf {p!r}, which is not in 'leaves'")
        if p in seen:
            _raise(file, f"the tree refers to leaf {p!r} twice")
        seen.add(p)
        return
    items = node["items"]
    if not isinstance(items, list):
        _raise(file, f"tree node at {here!r}: 'items' must be a list")
    keys: set[str] = set()
    for i, item in enumerate(items):
        key = str(i)
        if t == "dict":
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
                _raise(file, f"dict items must be [key, node] pairs, got {item!r}"[:200])
            key, item = item
            if key in keys:
                _raise(file, f"the dict at {here!r} has the key {key!r} twice")
            keys.add(key)
        _check_skeleton(file, item, (*prefix, key), paths, seen)


def _check_digests(file, doc: dict, tensors) -> dict[str, str]:
    """The tensors' digests of a version-2 document, after checking its own."""
    where = "metadata field 'digests'"
    d = doc["digests"]
    if not isinstance(d, dict):
        _raise(file, f"{where} must be an object")
    _expect_keys(file, where, d, ("metadata", "tensors"))
    own, per_tensor = d["metadata"], d["tensors"]
    if not isinstance(per_tensor, dict):
        _raise(file, f"{where}: 'tensors' must be an object")
    for name, v in [("metadata", own), *per_tensor.items()]:
        if not isinstance(v, str) or not _DIGEST.fullmatch(v):
            _raise(file, f"{where}: the digest of {name!r} must be 'sha256:' and 64 lowercase "
                         f"hex digits, got {v!r}"[:200])
    body = {k: doc[k] for k in ("version", "leaves", "tree")}
    if _body_digest(body, tensors) != own:
        _raise(file, "the metadata does not match its digest: the header was changed or "
                     "damaged after it was written")
    if set(per_tensor) != set(tensors):
        odd = sorted(set(per_tensor) ^ set(tensors))[0]
        _raise(file, f"{where}: the digests name other tensors than the file holds (first: "
                     f"{odd!r})")
    return per_tensor


def _is_arrayquant(meta: dict) -> bool:
    """Either of the two marks: one damaged byte must not turn a checkpoint into a plain file."""
    return _META_KEY in meta or meta.get(_FORMAT_KEY) == _META_KEY


def _parse(file, tensors, meta) -> tuple[int, list[LeafInfo], Any, dict[str, str] | None]:
    """(version, leaves, tree skeleton, tensor digests or None for version 1)."""
    if _META_KEY not in meta:
        _raise(file, f"the safetensors metadata says format {_META_KEY!r} but has no "
                     f"{_META_KEY!r} entry: the header was changed or damaged")
    doc = strict_json(meta[_META_KEY], f"{_META_KEY!r} metadata", file, _MAX_JSON_DEPTH)
    if not isinstance(doc, dict):
        _raise(file, f"the {_META_KEY!r} metadata must be a JSON object")
    version = doc.get("version")
    if not _is_int(version) or version < 1:
        _raise(file, f"metadata field 'version' must be a positive int, got {version!r}")
    if version not in _READ_VERSIONS:
        _raise(file, f"written with checkpoint format version {version}; this arrayquant reads "
                     f"versions {', '.join(map(str, _READ_VERSIONS))}: upgrade arrayquant")
    _expect_keys(file, "the metadata", doc,
                 ("version", "leaves", "tree", *(("digests",) if version >= 2 else ())))
    if version >= 2 and meta.get(_FORMAT_KEY) != _META_KEY:
        _raise(file, f"the safetensors metadata field {_FORMAT_KEY!r} must be {_META_KEY!r} in "
                     f"format version {version}, got {meta.get(_FORMAT_KEY)!r}: the header was "
                     "changed or damaged")
    expected_meta = {_FORMAT_KEY, _META_KEY} if version >= 2 else {_META_KEY}
    if set(meta) != expected_meta:
        _raise(file, f"the safetensors metadata holds the keys {sorted(meta)}; arrayquant writes "
                     f"exactly {sorted(expected_meta)}")
    digests = _check_digests(file, doc, tensors) if version >= 2 else None
    leaves, skeleton = _parse_body(file, doc, tensors)
    return version, leaves, skeleton, digests


def _parse_body(file, doc: dict, tensors) -> tuple[list[LeafInfo], Any]:
    """(leaves, tree skeleton) from the document's 'leaves' and 'tree', checked against the
    tensors ``{name: (dtype code, shape)}``; save() runs it on what it is about to write."""
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
        if isinstance(skeleton, dict) and skeleton.get("type") == "leaf":
            _raise(file, "the tree's root is a single leaf; arrayquant saves a dict, list or "
                         "tuple of leaves")
        seen: set[str] = set()
        _check_skeleton(file, skeleton, (), paths, seen)
        if seen != paths:
            _raise(file, f"leaf {sorted(paths - seen)[0]!r} is missing from the 'tree' structure")
        if skeleton["type"] == "dict" and all(v["type"] == "leaf" for _, v in skeleton["items"]):
            _raise(file, "a flat dict of leaves is stored with 'tree' null, not as a tree")
    return leaves, skeleton


def _plain_leaves(file, tensors) -> list[LeafInfo]:
    out = []
    for name, (code, shape) in tensors.items():
        if code not in ST_TO_NAME:
            _raise(file, f"tensor {name!r} has dtype {code}, which arrayquant does not read "
                         f"(expected one of {', '.join(ST_TO_NAME)})")
        out.append(LeafInfo(name, shape, ST_TO_NAME[code], tensors=(name,),
                            nbytes=_tensor_nbytes(tensors, name)))
    return out


def _npz_headers(file: pathlib.Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{array name: (dtype name, shape)} of an .npz file, from the .npy headers only."""
    out = {}
    try:
        with zipfile.ZipFile(file) as zf:
            names = zf.namelist()
            if len(set(names)) != len(names):
                twice = sorted(n for n in set(names) if names.count(n) > 1)[0]
                _raise(file, f"the .npz archive holds {twice!r} twice; one copy would be lost")
            for member in names:
                if not member.endswith(".npy"):
                    continue
                with zf.open(member) as f:
                    version = np.lib.format.read_magic(f)
                    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                            else np.lib.format.read_array_header_2_0)
                    shape, fortran, dtype = read(f)
                if dtype.hasobject or dtype.name not in NAME_TO_ST:
                    _raise(file, f"array {member[:-4]!r} has dtype {dtype}, which arrayquant "
                                 "does not read (no pickled objects)")
                out[member[:-4]] = (dtype.name, tuple(shape))
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001  (zipfile, zlib and NumPy's header parser raise
        # many kinds: BadZipFile, zlib.error, NotImplementedError, RuntimeError, SyntaxError)
        _raise(file, f"not a valid .npz file ({type(e).__name__}: {e})")
    return out


def checkpoint_info(path) -> CheckpointInfo:
    """Describe a checkpoint from its header, without reading tensor data.

    Works on arrayquant checkpoints, plain safetensors files and ``.npz`` files.
    The header is validated as by :func:`load` (schema, dtypes, shapes and the
    metadata's own digest); code ranges, scale values and tensor digests are only
    checked by :func:`load`.

    Raises:
        FileNotFoundError, IsADirectoryError, PermissionError: ``path`` is missing,
            a folder, or unreadable.
        ValueError: ``path`` is empty, or a FIFO, socket or device (not opened).
        CheckpointError: a malformed file.
    """
    file = check_input_file(path)
    size = file.stat().st_size
    if file.suffix == ".npz":
        headers = _npz_headers(file)
        leaves = tuple(
            LeafInfo(n, s, d, tensors=(n,), nbytes=math.prod(s) * np_dtype(d).itemsize)
            for n, (d, s) in headers.items()
        )
        return CheckpointInfo(str(file), "npz", None, leaves, size)
    tensors, meta = _header(file)
    if not _is_arrayquant(meta):
        return CheckpointInfo(str(file), "safetensors", None,
                              tuple(_plain_leaves(file, tensors)), size)
    version, leaves, _, digests = _parse(file, tensors, meta)
    return CheckpointInfo(str(file), "arrayquant", version, tuple(leaves), size,
                          None if digests is None else "sha256")


# --------------------------------------------------------------------------- loading


def _read(file, f, name: str) -> np.ndarray:
    from safetensors import SafetensorError

    try:
        return f.get_tensor(name)
    except (SafetensorError, TypeError, ValueError) as e:
        _raise(file, f"cannot read tensor {name!r} ({e})")


def _read_all(file, names, digests: dict[str, str]) -> dict[str, np.ndarray]:
    """Every named tensor, each checked against its digest (where given) on a thread pool.

    hashlib releases the GIL, so the digests of earlier tensors are taken while
    later ones are read. Digests are checked before any value check, so damage is
    reported as damage.
    """
    from concurrent.futures import ThreadPoolExecutor

    from safetensors import SafetensorError

    out: dict[str, np.ndarray] = {}
    try:
        with _safe_open(file) as f, ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
            pending = []
            for name in names:
                out[name] = _read(file, f, name)
                if name in digests:
                    pending.append((name, pool.submit(digest, out[name])))
            for name, done in pending:
                if done.result() != digests[name]:
                    _raise(file, f"tensor {name!r} does not match its digest: its bytes were "
                                 "changed or damaged after the file was written")
    except SafetensorError as e:
        _raise(file, f"not a valid safetensors file ({e})")
    return out


def _load_array(file, name: str, a: np.ndarray) -> np.ndarray:
    if a.dtype == np.bool_ and a.size and a.view(np.uint8).max() > 1:
        _raise(file, f"tensor {name!r} is boolean but holds bytes other than 0 and 1")
    return a


def _range_problem(what: str, values: np.ndarray, lo, hi, of: str) -> str | None:
    if values.size and not (values.min() >= lo and values.max() <= hi):  # NaN fails too
        return (f"{what} outside [{lo:.6g}, {hi:.6g}] (min {values.min()}, max {values.max()}) "
                f"for {of}")
    return None


def _qarray_problem(qtype: str, dtype: str, shape, packed_axis, data: np.ndarray,
                    scale: np.ndarray, zp: np.ndarray | None) -> str | None:
    """What makes these QArray values unsavable and unloadable, or None.

    Codes within the qtype's range (``[-qmax, qmax]`` when symmetric), zero bits
    after the last packed code, zero points within ``[qmin, qmax]``, and scales
    within :func:`scale_limits` (finite, normal, with a normal reciprocal).
    """
    qt: QType = as_qtype(qtype)
    lo = max(qt.qmin, -qt.qmax) if zp is None else qt.qmin
    codes = data
    if packed_axis is not None:
        n = shape[packed_axis]
        per = 8 // qt.bits
        if n % per:  # the unused high bits of each row's last byte must be zero
            last = np.take(data, [data.shape[packed_axis] - 1], axis=packed_axis)
            if np.any(last >> ((n % per) * qt.bits)):
                return "the padding bits after the last packed code are not zero"
        codes = None if lo == qt.qmin else unpack(data, qt.bits, n, axis=packed_axis,
                                                  signed=qt.signed)
    s_lo, s_hi = scale_limits(scale.dtype, dtype)
    with np.errstate(invalid="ignore"):  # a damaged scale may be a signalling NaN
        s64 = scale.astype(np.float64)
    return (
        (None if codes is None else _range_problem(
            "codes", codes, lo, qt.qmax, qt.name + (" symmetric" if zp is None else "")))
        or _range_problem("scales", s64, s_lo, s_hi,
                          f"{scale.dtype} scales of {dtype} values (see arrayquant.scale_limits)")
        or (None if zp is None else _range_problem("zero points", zp, qt.qmin, qt.qmax, qt.name))
    )


def _load_qarray(file, leaf: LeafInfo, data, scale, zp=None) -> QArray:
    problem = _qarray_problem(leaf.qtype, leaf.dtype, leaf.shape, leaf.packed_axis, data,
                              scale, zp)
    if problem:
        _raise(file, f"leaf {leaf.path!r}: {problem}")
    try:
        return QArray(data, scale, zp, leaf.qtype, leaf.shape, leaf.dtype, leaf.block_shape,
                      leaf.packed_axis)
    except (TypeError, ValueError) as e:
        _raise(file, f"leaf {leaf.path!r}: {e}")


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
        if not is_leaf(leaf):
            return leaf
        if path not in leaves:
            _raise(file, f"the template has a leaf {path!r} that the checkpoint does not hold")
        used.add(path)
        return leaves[path]

    out = map_leaves(fn, like, ())
    if used != set(leaves):
        _raise(file, f"the checkpoint holds {sorted(set(leaves) - used)[0]!r}, which the "
                     "template does not have")
    return out


def load(path, *, like=None, verify: bool = True):
    """Read a checkpoint written by :func:`save` (or any plain safetensors file).

    Returns the saved tree with NumPy arrays and :class:`QArray` s of NumPy arrays
    (convert with ``jax.tree.map(jnp.asarray, tree)``): nested dicts, lists and
    tuples as saved, or a flat ``{path: leaf}`` dict for a flat dict, a generic
    pytree, or a plain safetensors file (in file order). With ``like`` (a tree
    with the same leaf paths, e.g. the float model the checkpoint was made from),
    the leaves are put into ``like``'s structure instead: every array or QArray
    leaf of ``like`` is replaced by the stored leaf of the same path.

    It accepts exactly what :func:`save` can write (and format-version-1 files).
    Everything is validated before it is returned: the header's size and nesting,
    metadata schema and version (no duplicate, unknown or missing keys, no NaN
    literals); the metadata's own digest; each tensor's presence, dtype and shape
    against the metadata; the tree referencing every leaf exactly once, at its own
    path; codes within the qtype's range (``[-qmax, qmax]`` when symmetric) and
    zero bits after the last packed code; zero points within ``[qmin, qmax]``;
    scales within :func:`scale_limits`; booleans 0 or 1; no tensor left
    unreferenced; and, with ``verify`` (the default), every tensor's SHA-256
    digest. Hashing costs about 0.7 s per GB on one core (``docs/benchmarks.md``);
    ``verify=False`` skips only that. Version-1 files have no digests: a damaged
    byte in their tensor data loads as a changed value.

    Raises:
        FileNotFoundError, IsADirectoryError, PermissionError: ``path`` is missing,
            a folder, or unreadable.
        ValueError: ``path`` is empty, or a FIFO, socket or device (not opened).
        CheckpointError: (a ValueError) a malformed, truncated, damaged,
            inconsistent or newer-format file, or ``like`` does not fit; the
            message names the file and the entry.
    """

    file = check_input_file(path)
    tensors, meta = _header(file)
    digests: dict[str, str] | None = None
    if _is_arrayquant(meta):
        _, leaves, skeleton, digests = _parse(file, tensors, meta)
    else:
        leaves, skeleton = _plain_leaves(file, tensors), None
    raw = _read_all(file, [n for leaf in leaves for n in leaf.tensors],
                    digests if verify and digests is not None else {})
    out: dict[str, Any] = {}
    for leaf in leaves:
        parts = [raw[n] for n in leaf.tensors]
        out[leaf.path] = (_load_qarray(file, leaf, *parts) if leaf.quantized
                          else _load_array(file, leaf.tensors[0], *parts))
    if like is not None:
        return _fill(like, out, file)
    return out if skeleton is None else _build(skeleton, out)


# --------------------------------------------------------------------------- streaming


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
            if _is_arrayquant(meta):
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
            except Exception as e:  # noqa: BLE001  (as in _npz_headers)
                _raise(self.file, f"cannot read array {name!r} ({type(e).__name__}: {e})")
        return _read(self.file, self._handle, name)


def _plan_leaf(name: str, dtype: str, shape, rules) -> tuple[Rule | None, list, dict]:
    """The rule for a tensor, its output tensors [(name, dtype, shape)] and its leaf entry."""
    rule = select_rule(rules, name, shape, dtype)
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
    names = _role_names(name, rule.symmetric)
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
    rules = as_rules(rules)
    src_file, out_file = check_input_file(in_path), pathlib.Path(out_path)
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
    metadata = _metadata([entry for *_, entry in plans], None, specs)
    total = sum(math.prod(s) * np_dtype(d).itemsize for d, s in source.specs.values())
    rows: list[LeafReport] = []
    from tqdm import tqdm

    def parts(bar):
        """Read, quantize and yield one tensor at a time, then drop it."""
        for name, rule, outs, entry in plans:
            x = source.get(name)
            if rule is None:
                yield name, x
                rows.append(leaf_report(name, x, x))
            else:
                qa = quantize_leaf(rule, name, x)
                if (qa.block_shape, qa.packed_axis) != (tuple(entry["block_shape"]),
                                                        entry["packed_axis"]):
                    raise RuntimeError(f"internal error: {name!r} was quantized as {qa!r}, not "
                                       "as planned")
                for (tname, _, _), part in zip(outs, (qa.data, qa.scale, qa.zero_point)):
                    yield tname, part
                rows.append(leaf_report(name, x, qa))
                del qa
            bar.update(x.nbytes)
            del x

    with source, tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                      disable=not progress, desc=src_file.name, leave=False) as bar:
        _write(out_path, specs, metadata, parts(bar))
    return TreeReport(tuple(rows))
