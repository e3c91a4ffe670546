"""The checkpoint document as a whole: its version, marks, tree structure and digests.

:func:`parse_document` checks the JSON document of an arrayquant checkpoint's
header against the tensors the file holds; :func:`parse_body` is the part that
:func:`~arrayquant.save` also runs on what it is about to write.
"""

from __future__ import annotations

import re
from typing import Any

from arrayquant.checkpoint.schema import (
    FORMAT_KEY,
    MAX_JSON_DEPTH,
    MAX_TREE_DEPTH,
    META_KEY,
    NODE_KEYS,
    READ_VERSIONS,
    LeafInfo,
    body_digest,
    expect_keys,
    fail,
    is_int,
    parse_leaf,
)
from arrayquant.checkpoint.stfile import DIGEST_PREFIX, canonical_json, strict_json

__all__ = ["is_arrayquant", "parse_body", "parse_document"]

_DIGEST = re.compile(re.escape(DIGEST_PREFIX) + "[0-9a-f]{64}")


# --------------------------------------------------------------------------- the tree


def _check_skeleton(file, node, prefix: tuple[str, ...], paths: set[str], seen: set[str]) -> None:
    """The tree is what save() writes: each leaf once, at the path of its position."""
    here = "/".join(prefix) or "the root"
    if len(prefix) > MAX_TREE_DEPTH:
        fail(file, f"the 'tree' structure is nested more than {MAX_TREE_DEPTH} levels deep")
    if not (isinstance(node, dict) and isinstance(node.get("type"), str)
            and node["type"] in NODE_KEYS):
        fail(file, f"tree node at {here!r} must be an object whose 'type' is one of "
                   f"{', '.join(NODE_KEYS)}; got {canonical_json(node)[:80]}")
    t = node["type"]
    expect_keys(file, f"tree node at {here!r}", node, NODE_KEYS[t])
    if t == "none":
        return
    if t == "leaf":
        p, want = node["path"], "/".join(prefix)
        if not isinstance(p, str):
            fail(file, f"tree leaf at {here!r}: 'path' must be a string, got {p!r}")
        if p != want:
            fail(file, f"tree leaf at {here!r} refers to leaf {p!r}; a leaf is stored at "
                       f"its own path")
        if p not in paths:
            fail(file, f"the tree refers to leaf {p!r}, which is not in 'leaves'")
        if p in seen:
            fail(file, f"the tree refers to leaf {p!r} twice")
        seen.add(p)
        return
    items = node["items"]
    if not isinstance(items, list):
        fail(file, f"tree node at {here!r}: 'items' must be a list")
    keys: set[str] = set()
    for i, item in enumerate(items):
        key = str(i)
        if t == "dict":
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
                fail(file, f"dict items must be [key, node] pairs, got {item!r}"[:200])
            key, item = item
            if key in keys:
                fail(file, f"the dict at {here!r} has the key {key!r} twice")
            keys.add(key)
        _check_skeleton(file, item, (*prefix, key), paths, seen)


# --------------------------------------------------------------------------- the document


def _check_digests(file, doc: dict, tensors) -> dict[str, str]:
    """The tensors' digests of a version-2 (or later) document, after checking its own."""
    where = "metadata field 'digests'"
    d = doc["digests"]
    if not isinstance(d, dict):
        fail(file, f"{where} must be an object")
    expect_keys(file, where, d, ("metadata", "tensors"))
    own, per_tensor = d["metadata"], d["tensors"]
    if not isinstance(per_tensor, dict):
        fail(file, f"{where}: 'tensors' must be an object")
    for name, v in [("metadata", own), *per_tensor.items()]:
        if not isinstance(v, str) or not _DIGEST.fullmatch(v):
            fail(file, f"{where}: the digest of {name!r} must be 'sha256:' and 64 lowercase "
                       f"hex digits, got {v!r}"[:200])
    body = {k: doc[k] for k in ("version", "leaves", "tree")}
    if body_digest(body, tensors) != own:
        fail(file, "the metadata does not match its digest: the header was changed or "
                   "damaged after it was written")
    if set(per_tensor) != set(tensors):
        odd = sorted(set(per_tensor) ^ set(tensors))[0]
        fail(file, f"{where}: the digests name other tensors than the file holds (first: "
                   f"{odd!r})")
    return per_tensor


def is_arrayquant(meta: dict) -> bool:
    """Either of the two marks: one damaged byte must not turn a checkpoint into a plain file."""
    return META_KEY in meta or meta.get(FORMAT_KEY) == META_KEY


def parse_document(file, tensors, meta) -> tuple[int, list[LeafInfo], Any, dict[str, str] | None]:
    """(version, leaves, tree skeleton, tensor digests or None for version 1).

    Versions 2 and 3 differ only in the leaf kinds they may hold (``linear_weight``
    is new in 3); version 1 has no digests and no ``format`` mark.
    """
    if META_KEY not in meta:
        fail(file, f"the safetensors metadata says format {META_KEY!r} but has no "
                   f"{META_KEY!r} entry: the header was changed or damaged")
    doc = strict_json(meta[META_KEY], f"{META_KEY!r} metadata", file, MAX_JSON_DEPTH)
    if not isinstance(doc, dict):
        fail(file, f"the {META_KEY!r} metadata must be a JSON object")
    version = doc.get("version")
    if not is_int(version) or version < 1:
        fail(file, f"metadata field 'version' must be a positive int, got {version!r}")
    if version not in READ_VERSIONS:
        fail(file, f"written with checkpoint format version {version}; this arrayquant reads "
                   f"versions {', '.join(map(str, READ_VERSIONS))}: upgrade arrayquant")
    expect_keys(file, "the metadata", doc,
                 ("version", "leaves", "tree", *(("digests",) if version >= 2 else ())))
    if version >= 2 and meta.get(FORMAT_KEY) != META_KEY:
        fail(file, f"the safetensors metadata field {FORMAT_KEY!r} must be {META_KEY!r} in "
                   f"format version {version}, got {meta.get(FORMAT_KEY)!r}: the header was "
                   "changed or damaged")
    expected_meta = {FORMAT_KEY, META_KEY} if version >= 2 else {META_KEY}
    if set(meta) != expected_meta:
        fail(file, f"the safetensors metadata holds the keys {sorted(meta)}; arrayquant writes "
                   f"exactly {sorted(expected_meta)}")
    digests = _check_digests(file, doc, tensors) if version >= 2 else None
    leaves, skeleton = parse_body(file, doc, tensors)
    return version, leaves, skeleton, digests


def parse_body(file, doc: dict, tensors) -> tuple[list[LeafInfo], Any]:
    """(leaves, tree skeleton) from the document's 'leaves' and 'tree', checked against the
    tensors ``{name: (dtype code, shape)}``; save() runs it on what it is about to write."""
    entries = doc.get("leaves")
    if not isinstance(entries, list):
        fail(file, "metadata field 'leaves' must be a list")
    version = doc.get("version")
    leaves = [parse_leaf(file, i, e, tensors, version) for i, e in enumerate(entries)]
    owner: dict[str, str] = {}
    paths: set[str] = set()
    for leaf in leaves:
        if leaf.path in paths:
            fail(file, f"two leaves have the path {leaf.path!r}")
        paths.add(leaf.path)
        for name in leaf.tensors:
            if name in owner:
                fail(file, f"tensor {name!r} is used by both {owner[name]!r} and {leaf.path!r}")
            owner[name] = leaf.path
    extra = [n for n in tensors if n not in owner]
    if extra:
        fail(file, f"tensor {extra[0]!r} is not described by the metadata"
                   + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    skeleton = doc.get("tree")
    if skeleton is not None:
        if isinstance(skeleton, dict) and skeleton.get("type") == "leaf":
            fail(file, "the tree's root is a single leaf; arrayquant saves a dict, list or "
                       "tuple of leaves")
        seen: set[str] = set()
        _check_skeleton(file, skeleton, (), paths, seen)
        if seen != paths:
            fail(file, f"leaf {sorted(paths - seen)[0]!r} is missing from the 'tree' structure")
        if skeleton["type"] == "dict" and all(v["type"] == "leaf" for _, v in skeleton["items"]):
            fail(file, "a flat dict of leaves is stored with 'tree' null, not as a tree")
    return leaves, skeleton
