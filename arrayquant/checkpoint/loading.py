"""Reading checkpoints: headers (:func:`checkpoint_info`), tensors and digests, :func:`load`."""

from __future__ import annotations

import math
import os
import pathlib
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from arrayquant._io import check_input_file
from arrayquant.checkpoint.document import is_arrayquant, parse_document
from arrayquant.checkpoint.schema import STATE_ROLES, LeafInfo, fail, plain_leaves
from arrayquant.checkpoint.stfile import (
    NAME_TO_ST,
    CheckpointError,
    digest,
    np_dtype,
    read_raw_header,
)
from arrayquant.checkpoint.values import linear_state_problem, qarray_problem
from arrayquant.linear_weight import LinearWeight
from arrayquant.qarray import QArray
from arrayquant.trees import is_leaf, map_leaves

__all__ = [
    "CheckpointInfo", "checkpoint_info", "leaf_from_tensors", "load", "npz_headers",
    "open_safetensors", "read_header", "read_tensor",
]


# --------------------------------------------------------------------------- reading headers


@contextmanager
def _invalid_safetensors(file):
    """Report the ``safetensors`` package's errors as a :class:`CheckpointError` for ``file``."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as e:
        fail(file, f"not a valid safetensors file ({e})")


def open_safetensors(file):
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


def read_header(file: pathlib.Path) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict]:
    """({tensor: (dtype code, shape)} in file order, metadata) from the safetensors header.

    The JSON is read strictly first (size, nesting, duplicate keys, NaN); then
    ``safetensors`` checks the tensor entries (dtypes, shapes, contiguous offsets).
    """
    check_input_file(file)
    read_raw_header(file)
    with _invalid_safetensors(file), open_safetensors(file) as f:
        tensors = {}
        for name in getattr(f, "offset_keys", f.keys)():
            s = f.get_slice(name)
            tensors[name] = (s.get_dtype(), tuple(int(n) for n in s.get_shape()))
        meta = f.metadata() or {}
    return tensors, meta


def npz_headers(file: pathlib.Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{array name: (dtype name, shape)} of an .npz file, from the .npy headers only."""
    out = {}
    try:
        with zipfile.ZipFile(file) as zf:
            names = zf.namelist()
            if len(set(names)) != len(names):
                twice = sorted(n for n in set(names) if names.count(n) > 1)[0]
                fail(file, f"the .npz archive holds {twice!r} twice; one copy would be lost")
            for member in names:
                if not member.endswith(".npy"):
                    continue
                with zf.open(member) as f:
                    version = np.lib.format.read_magic(f)
                    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                            else np.lib.format.read_array_header_2_0)
                    shape, fortran, dtype = read(f)
                if dtype.hasobject or dtype.name not in NAME_TO_ST:
                    fail(file, f"array {member[:-4]!r} has dtype {dtype}, which arrayquant "
                               "does not read (no pickled objects)")
                out[member[:-4]] = (dtype.name, tuple(shape))
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001  (zipfile, zlib and NumPy's header parser raise
        # many kinds: BadZipFile, zlib.error, NotImplementedError, RuntimeError, SyntaxError)
        fail(file, f"not a valid .npz file ({type(e).__name__}: {e})")
    return out


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint holds: kind, format version and leaves (see :func:`checkpoint_info`)."""

    path: str
    kind: str  # "arrayquant", "safetensors" (plain) or "npz"
    version: int | None
    leaves: tuple[LeafInfo, ...]
    file_size: int
    #: "sha256" when the file stores a digest of every tensor and of its metadata
    #: (format version 2 and later), else None.
    integrity: str | None = None


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
        headers = npz_headers(file)
        leaves = tuple(
            LeafInfo(n, s, d, tensors=(n,), nbytes=math.prod(s) * np_dtype(d).itemsize)
            for n, (d, s) in headers.items()
        )
        return CheckpointInfo(str(file), "npz", None, leaves, size)
    tensors, meta = read_header(file)
    if not is_arrayquant(meta):
        return CheckpointInfo(str(file), "safetensors", None,
                              tuple(plain_leaves(file, tensors)), size)
    version, leaves, _, digests = parse_document(file, tensors, meta)
    return CheckpointInfo(str(file), "arrayquant", version, tuple(leaves), size,
                          None if digests is None else "sha256")


# --------------------------------------------------------------------------- loading


def read_tensor(file, f, name: str) -> np.ndarray:
    from safetensors import SafetensorError

    try:
        return f.get_tensor(name)
    except (SafetensorError, TypeError, ValueError) as e:
        fail(file, f"cannot read tensor {name!r} ({e})")


def _read_all(file, names, digests: dict[str, str]) -> dict[str, np.ndarray]:
    """Every named tensor, each checked against its digest (where given) on a thread pool.

    hashlib releases the GIL, so the digests of earlier tensors are taken while
    later ones are read. Digests are checked before any value check, so damage is
    reported as damage.
    """
    from concurrent.futures import ThreadPoolExecutor

    out: dict[str, np.ndarray] = {}
    with (_invalid_safetensors(file), open_safetensors(file) as f,
          ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool):
        pending = []
        for name in names:
            out[name] = read_tensor(file, f, name)
            if name in digests:
                pending.append((name, pool.submit(digest, out[name])))
        for name, done in pending:
            if done.result() != digests[name]:
                fail(file, f"tensor {name!r} does not match its digest: its bytes were "
                           "changed or damaged after the file was written")
    return out


def _load_array(file, name: str, a: np.ndarray) -> np.ndarray:
    if a.dtype == np.bool_ and a.size and a.view(np.uint8).max() > 1:
        fail(file, f"tensor {name!r} is boolean but holds bytes other than 0 and 1")
    return a


def _load_qarray(file, leaf: LeafInfo, data, scale, zp=None) -> QArray:
    problem = qarray_problem(leaf.qtype, leaf.dtype, leaf.shape, leaf.packed_axis, data,
                              scale, zp, len(leaf.batch_shape))
    if problem:
        fail(file, f"leaf {leaf.path!r}: {problem}")
    try:
        return QArray(data, scale, zp, leaf.qtype, leaf.shape, leaf.dtype, leaf.block_shape,
                      leaf.packed_axis)
    except (TypeError, ValueError) as e:
        fail(file, f"leaf {leaf.path!r}: {e}")


def leaf_from_tensors(file, leaf: LeafInfo, arrays: dict[str, np.ndarray]):
    """The array, QArray or LinearWeight ``leaf`` describes, from its tensors ``{name: array}``,
    after the value checks (codes, zero points, scales, a LinearWeight's state)."""
    if not leaf.quantized:
        return _load_array(file, leaf.tensors[0], arrays[leaf.tensors[0]])
    # Every tensor of a quantized leaf is named PATH:ROLE (the schema checked it).
    parts = {name[len(leaf.path) + 1:]: arrays[name] for name in leaf.tensors}
    qa = _load_qarray(file, leaf, parts["data"], parts["scale"], parts.get("zero_point"))
    if leaf.in_axis is None:
        return qa
    state = {role: parts.get(role) for role in STATE_ROLES}
    problem = linear_state_problem(leaf.dtype, leaf.act_qtype, *state.values())
    if problem:
        fail(file, f"leaf {leaf.path!r}: {problem}")
    try:
        return LinearWeight(qa, **state, in_axis=leaf.in_axis, act_qtype=leaf.act_qtype)
    except (TypeError, ValueError) as e:
        fail(file, f"leaf {leaf.path!r}: {e}")


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
            fail(file, f"the template has a leaf {path!r} that the checkpoint does not hold")
        used.add(path)
        return leaves[path]

    out = map_leaves(fn, like, ())
    if used != set(leaves):
        fail(file, f"the checkpoint holds {sorted(set(leaves) - used)[0]!r}, which the "
                   "template does not have")
    return out


def load(path, *, like=None, verify: bool = True, shardings=None):
    """Read a checkpoint written by :func:`save` (or any plain safetensors file).

    Returns the saved tree with NumPy arrays, and :class:`QArray` s and
    :class:`~arrayquant.LinearWeight` s of NumPy arrays (convert with
    ``jax.tree.map(jnp.asarray, tree)``): nested dicts, lists and
    tuples as saved, or a flat ``{path: leaf}`` dict for a flat dict, a generic
    pytree, or a plain safetensors file (in file order). With ``like`` (a tree
    with the same leaf paths, e.g. the float model the checkpoint was made from),
    the leaves are put into ``like``'s structure instead: every array, QArray or
    LinearWeight leaf of ``like`` is replaced by the stored leaf of the same path.

    It accepts exactly what :func:`save` can write (and format-version-1 and -2
    files; :func:`~arrayquant.checkpoint.upgrade_checkpoint` rewrites them in the
    current version).
    Everything is validated before it is returned: the header's size and nesting,
    metadata schema and version (no duplicate, unknown or missing keys, no NaN
    literals); the metadata's own digest; each tensor's presence, dtype and shape
    against the metadata; the tree referencing every leaf exactly once, at its own
    path; codes within the qtype's range (``[-qmax, qmax]`` when symmetric) and
    zero bits after the last packed code; zero points within ``[qmin, qmax]``;
    scales within :func:`scale_limits`; a LinearWeight's ``in_scale`` and
    ``act_scale`` within :func:`scale_limits`, ``perm`` a permutation, its
    activation zero point in ``act_qtype``'s range; booleans 0 or 1; no tensor left
    unreferenced; and, with ``verify`` (the default), every tensor's SHA-256
    digest. Hashing costs about 0.7 s per GB on one core (``docs/benchmarks.md``);
    ``verify=False`` skips only that. Version-1 files have no digests: a damaged
    byte in their tensor data loads as a changed value.

    With ``shardings`` (JAX), leaves are placed on devices as they are loaded:
    a dict ``{path: sharding}`` or a function ``(path, leaf) -> sharding or
    None``; leaves without one stay NumPy arrays. A QArray leaf takes the
    sharding of its float array (``NamedSharding(mesh, PartitionSpec(...))``),
    converted by :func:`arrayquant.sharding_like`, or a QArray-shaped tree of
    shardings. A stacked QArray's spec covers its batch axes too. A LinearWeight
    takes its float weight's sharding the same way for its QArray, with its input
    state replicated (or a LinearWeight-shaped tree of shardings).

    Raises:
        FileNotFoundError, IsADirectoryError, PermissionError: ``path`` is missing,
            a folder, or unreadable.
        ValueError: ``path`` is empty, or a FIFO, socket or device (not opened).
        CheckpointError: (a ValueError) a malformed, truncated, damaged,
            inconsistent or newer-format file, or ``like`` does not fit; the
            message names the file and the entry.
    """

    file = check_input_file(path)
    tensors, meta = read_header(file)
    digests: dict[str, str] | None = None
    if is_arrayquant(meta):
        _, leaves, skeleton, digests = parse_document(file, tensors, meta)
    else:
        leaves, skeleton = plain_leaves(file, tensors), None
    raw = _read_all(file, [n for leaf in leaves for n in leaf.tensors],
                    digests if verify and digests is not None else {})
    out = {leaf.path: leaf_from_tensors(file, leaf, raw) for leaf in leaves}
    if shardings is not None:
        out = _place(out, shardings, file)
    if like is not None:
        return _fill(like, out, file)
    return out if skeleton is None else _build(skeleton, out)


def _place(out: dict[str, Any], shardings, file) -> dict[str, Any]:
    """``out`` with each leaf that ``shardings`` names put on its devices."""
    if isinstance(shardings, dict):
        unknown = sorted(set(shardings) - set(out))
        if unknown:
            fail(file, f"shardings name paths that the checkpoint does not hold: "
                       f"{', '.join(map(repr, unknown[:5]))}; its paths are "
                       f"{', '.join(map(repr, list(out)[:5]))}{' ...' if len(out) > 5 else ''}")
    elif not callable(shardings):
        raise TypeError(f"shardings must be a dict {{path: sharding}} or a function "
                        f"(path, leaf) -> sharding, got {type(shardings).__name__}")
    import jax

    from arrayquant.sharding import sharding_like

    placed = {}
    for path, leaf in out.items():
        s = shardings.get(path) if isinstance(shardings, dict) else shardings(path, leaf)
        if s is not None and isinstance(leaf, QArray) and not isinstance(s, QArray):
            s = sharding_like(leaf, s)
        if s is not None and isinstance(leaf, LinearWeight) and not isinstance(s, LinearWeight):
            s = _linear_sharding(leaf, s)
        placed[path] = leaf if s is None else jax.device_put(leaf, s)
    return placed


def _linear_sharding(lw: LinearWeight, s):
    """A LinearWeight-shaped tree of shardings from ``s``, the float weight's: the QArray's by
    :func:`~arrayquant.sharding_like`, the input state replicated (small vectors and scalars;
    ``x`` is gathered and scaled by them whole)."""
    from jax.sharding import NamedSharding, PartitionSpec

    from arrayquant.sharding import sharding_like

    rest = NamedSharding(s.mesh, PartitionSpec()) if isinstance(s, NamedSharding) else s
    state = tuple(None if getattr(lw, r) is None else rest for r in STATE_ROLES)
    return LinearWeight._from_parts(lw._static(), (sharding_like(lw.qweight, s), *state))
