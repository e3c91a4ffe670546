"""Rewriting an older checkpoint as the current format version (:func:`upgrade_checkpoint`)."""

from __future__ import annotations

import json
import pathlib

from arrayquant._io import check_input_file
from arrayquant.checkpoint.document import is_arrayquant, parse_document
from arrayquant.checkpoint.loading import (
    leaf_from_tensors,
    open_safetensors,
    read_header,
    read_tensor,
)
from arrayquant.checkpoint.saving import build_metadata, write_atomic
from arrayquant.checkpoint.schema import FORMAT_VERSION, META_KEY, fail
from arrayquant.checkpoint.stfile import ST_TO_NAME, digest

__all__ = ["upgrade_checkpoint"]


def upgrade_checkpoint(src, dst=None) -> int:
    """Rewrite the checkpoint ``src`` in the current format version; return the version it had.

    Every leaf entry, the tree and every tensor (name, dtype, shape, bytes and
    order in the file) are kept; only the document changes: its ``version``, and
    the SHA-256 digests of the metadata and of every tensor, which version-1
    files lack. ``src`` is first validated as :func:`~arrayquant.load` validates
    it (version-2 digests included), one leaf at a time, so memory stays near the
    largest leaf; the tensors are then copied and checked to be the bytes that
    were validated. The write is atomic: ``dst=None`` replaces ``src`` itself (a
    reader sees the old file or the new one), and a failure leaves ``src`` and
    ``dst`` as they were.

    A file already at the current version is validated, and copied to ``dst``
    when one is given (``dst=None`` leaves it untouched).

    Raises:
        FileNotFoundError, IsADirectoryError, PermissionError, ValueError: as
            :func:`~arrayquant.load` for ``src``; ``dst`` cannot be written (as
            :func:`~arrayquant.save`).
        CheckpointError: ``src`` is malformed, damaged, newer than this
            arrayquant, or not an arrayquant checkpoint (a plain safetensors or
            ``.npz`` file has no version to upgrade).

    Example:
        >>> import arrayquant as aq                                 # doctest: +SKIP
        >>> aq.checkpoint.upgrade_checkpoint("model-v1.safetensors")        # doctest: +SKIP
        1
    """
    file = check_input_file(src)
    if file.suffix == ".npz":
        fail(file, "is an .npz file, not an arrayquant checkpoint: nothing to upgrade "
                   "(quantize it with quantize_checkpoint)")
    tensors, meta = read_header(file)
    if not is_arrayquant(meta):
        fail(file, "is a plain safetensors file, not an arrayquant checkpoint: it has no "
                   "format version to upgrade")
    version, leaves, skeleton, digests = parse_document(file, tensors, meta)
    # Pass 1: every leaf's values, as load() checks them (digests first).
    written = _validate(file, leaves, digests)
    if dst is None and version == FORMAT_VERSION:
        return version
    doc = json.loads(meta[META_KEY])  # already parsed strictly by parse_document
    specs = [(name, ST_TO_NAME[code], shape) for name, (code, shape) in tensors.items()]
    metadata = build_metadata(doc["leaves"], skeleton, specs)

    def check(copied: dict[str, str]) -> None:
        changed = [n for n in written if copied.get(n) != written[n]]
        if changed:
            fail(file, f"tensor {changed[0]!r} changed while the file was being upgraded; "
                       "nothing was written")

    # Pass 2: the tensors in the file's order, into the new file.
    with open_safetensors(file) as f:
        write_atomic(file if dst is None else pathlib.Path(dst), specs, metadata,
                     ((name, read_tensor(file, f, name)) for name in tensors), check)
    return version


def _validate(file, leaves, digests: dict[str, str] | None) -> dict[str, str]:
    """``{tensor: digest}`` of the file, after every leaf's tensors passed load()'s checks."""
    out: dict[str, str] = {}
    with open_safetensors(file) as f:
        for leaf in leaves:
            arrays = {name: read_tensor(file, f, name) for name in leaf.tensors}
            for name, a in arrays.items():
                out[name] = digest(a)
                if digests is not None and out[name] != digests[name]:
                    fail(file, f"tensor {name!r} does not match its digest: its bytes were "
                               "changed or damaged after the file was written")
            leaf_from_tensors(file, leaf, arrays)
    return out
