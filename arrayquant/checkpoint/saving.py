"""Writing checkpoints: the tree encoding, the document with its digests, the atomic write."""

from __future__ import annotations

from typing import Any

import numpy as np

from arrayquant._io import atomic_path
from arrayquant.checkpoint.document import parse_body
from arrayquant.checkpoint.schema import (
    FORMAT_KEY,
    FORMAT_VERSION,
    MAX_TREE_DEPTH,
    META_KEY,
    body_digest,
    leaf_arrays,
    leaf_entry,
    tensor_names,
)
from arrayquant.checkpoint.stfile import (
    NAME_TO_ST,
    CheckpointError,
    StreamWriter,
    canonical_json,
)
from arrayquant.checkpoint.values import linear_state_problem, qarray_problem
from arrayquant.linear_weight import LinearWeight
from arrayquant.qarray import QArray, check_integer_codes
from arrayquant.trees import is_leaf, jax_tree_util, map_leaves

__all__ = ["build_metadata", "save", "write_atomic"]


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
        "arrays, QArrays and LinearWeights in dicts, lists and tuples (and JAX pytrees when "
        "JAX is imported)"
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


def build_metadata(entries: list[dict[str, Any]], skeleton, specs):
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
        parse_body("<the file to write>", body, header)
    except CheckpointError as e:
        raise ValueError(f"cannot save: {e}; load() would refuse the file") from None
    own = body_digest(body, header)

    def with_digests(tensor_digests: dict[str, str]) -> dict[str, str]:
        doc = {**body, "digests": {"metadata": own, "tensors": tensor_digests}}
        return {FORMAT_KEY: META_KEY, META_KEY: canonical_json(doc)}

    return with_digests


def write_atomic(out_path, specs, metadata, parts, check=None) -> None:
    """Atomically write the tensors ``parts`` yields, in the order of ``specs``.

    ``check``, if given, is called with ``{name: digest}`` of what was written before
    the file is completed; an exception from it leaves no file behind.
    """
    with atomic_path(out_path) as tmp, open(tmp, "wb") as fh:
        writer = StreamWriter(fh, specs, metadata)
        for name, a in parts:
            writer.write(name, a)
        if check is not None:
            check(writer.digests)
        writer.close()


def save(path, tree) -> None:
    """Write ``tree`` (arrays, QArrays, LinearWeights) to ``path`` as safetensors, atomically.

    ``tree`` is a dict, list or tuple nesting (string dict keys) of arrays of any
    namespace, :class:`QArray` s and :class:`~arrayquant.LinearWeight` s (stored
    with their input state: ``in_scale``, ``perm``, static activation
    parameters); ``None`` entries are kept. Any other JAX
    pytree (an Equinox module, an NNX state) is stored as its array leaves by path
    and comes back from ``load(path, like=template)``. Arrays are converted to
    NumPy (JAX arrays are copied to the host).

    Every tensor's SHA-256 digest and one of the metadata are stored with it, and
    :func:`load` checks them. A QArray is saved only if :func:`load` would accept
    it: codes and zero points in range, scales within :func:`scale_limits`; a
    LinearWeight also needs ``in_scale`` and ``act_scale`` within
    :func:`scale_limits`, ``perm`` a permutation and the activation zero point in
    ``act_qtype``'s range.

    Raises:
        TypeError: a leaf that is not an array (under builtin containers), a
            non-string dict key, a dtype safetensors cannot store, a traced value,
            or a single array instead of a tree.
        ValueError: two leaves with the same path, two tensor names that clash, a
            tree nested more than ``MAX_TREE_DEPTH`` levels, a QArray or LinearWeight
            whose values :func:`load` would reject.
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
        qa = leaf.qweight if isinstance(leaf, LinearWeight) else leaf
        if isinstance(qa, QArray):
            check_integer_codes(qa, f"cannot save {p!r}: QArray")
        entries.append(leaf_entry(p, leaf))
        arrays = leaf_arrays(leaf)
        for role, name in tensor_names(p, leaf).items():
            if name is None:
                continue
            if name in tensors:
                raise ValueError(
                    f"cannot save {p!r}: its tensor name {name!r} is already used by another "
                    "leaf; rename one of them"
                )
            tensors[name] = _to_numpy(arrays[role], p)
    # Widest items first keeps every tensor aligned to its item size in the file.
    names = sorted(tensors, key=lambda n: -tensors[n].dtype.itemsize)
    specs = [(n, tensors[n].dtype.name, tensors[n].shape) for n in names]
    metadata = build_metadata(entries, skeleton, specs)  # the loader's schema checks
    for p, leaf in leaves:  # then its value checks, as load() runs them
        problem = _value_problem(leaf, {r: None if n is None else tensors[n]
                                        for r, n in tensor_names(p, leaf).items()})
        if problem:
            raise ValueError(f"cannot save {p!r}: {problem}; load() would reject it")
    write_atomic(path, specs, metadata, ((n, tensors[n]) for n in names))


def _value_problem(leaf, parts: dict[str, np.ndarray | None]) -> str | None:
    qa = leaf.qweight if isinstance(leaf, LinearWeight) else leaf
    if not isinstance(qa, QArray):
        return None
    return (qarray_problem(qa.qtype, qa.dtype, qa.shape, qa.packed_axis, parts["data"],
                           parts["scale"], parts["zero_point"], len(qa.batch_shape))
            or (None if qa is leaf else linear_state_problem(
                qa.dtype, leaf.act_qtype, parts["in_scale"], parts["perm"],
                parts["act_scale"], parts["act_zero_point"])))
