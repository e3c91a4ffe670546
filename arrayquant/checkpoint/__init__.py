"""Checkpoints: save and load trees of arrays and quantized leaves as safetensors.

The file is a standard safetensors file (readable by any safetensors reader): every
plain array is one tensor named by its path, every :class:`~arrayquant.QArray` is
two or three tensors (``PATH:data``, ``PATH:scale`` and, when asymmetric,
``PATH:zero_point``), every :class:`~arrayquant.LinearWeight` its QArray's tensors
plus those of its input state (``PATH:in_scale``, ``PATH:perm``,
``PATH:act_scale``, ``PATH:act_zero_point``, each when present), and the static
metadata (qtype, granularity, shapes, the original dtype, the packing layout, a
LinearWeight's input axis and activation qtype, the tree structure, a format
version) is one JSON document stored under the key ``"arrayquant"`` of the
safetensors header's ``__metadata__``. ``docs/checkpoints.md`` describes it field
by field.

- :func:`save` writes atomically (a temporary file in the same folder, flushed to
  disk, then renamed), so a crash or a full disk never leaves a truncated file
  under the final name. It stores a SHA-256 digest of every tensor and of the
  metadata itself (format version 3; version 2 added the digests, version 3 the
  ``linear_weight`` leaf kind).
- :func:`load` accepts exactly what :func:`save` can write (and version-1 and -2
  files): it validates everything it reads (the header's size and nesting, the
  metadata schema with no duplicate or unknown keys, every tensor's dtype and shape
  against the metadata, the tree referencing every leaf exactly once at its own
  path, code and zero-point ranges, scales within :func:`scale_limits`, a
  LinearWeight's permutation and activation parameters, 0/1 booleans, the
  digests) and raises :class:`CheckpointError` with the file name and the
  offending entry otherwise. Plain safetensors files (without arrayquant
  metadata) load as a flat dict.
- :func:`upgrade_checkpoint` rewrites a version-1 or -2 file in the current
  version (atomically, in place or to a new file), keeping every leaf and tensor.
- :func:`quantize_checkpoint` quantizes a safetensors or ``.npz`` checkpoint tensor
  by tensor: it reads one tensor (``pread``, no memory map), quantizes it, appends
  it to the output and drops it, so peak memory stays near the largest tensor
  rather than the whole model.

No pickle anywhere: safetensors holds only raw tensors and JSON, and ``.npz`` input
is read with ``allow_pickle=False``.

The modules, each importing only those before it: ``stfile`` (the safetensors
container: strict header reader, streaming writer, digests), ``schema`` (format
constants, tensor naming, one leaf entry's rules), ``document`` (the whole
document: version, tree, digests), ``values`` (the value rules of a stored
QArray and LinearWeight), ``saving`` (:func:`save`), ``loading`` (:func:`load`,
:func:`checkpoint_info`), ``convert`` (:func:`quantize_checkpoint`), ``upgrade``
(:func:`upgrade_checkpoint`).
"""

from arrayquant.checkpoint.convert import quantize_checkpoint
from arrayquant.checkpoint.loading import CheckpointInfo, checkpoint_info, load
from arrayquant.checkpoint.saving import save
from arrayquant.checkpoint.schema import FORMAT_VERSION, MAX_TREE_DEPTH, LeafInfo
from arrayquant.checkpoint.stfile import CheckpointError
from arrayquant.checkpoint.upgrade import upgrade_checkpoint

__all__ = [
    "FORMAT_VERSION",
    "MAX_TREE_DEPTH",
    "CheckpointError",
    "CheckpointInfo",
    "LeafInfo",
    "checkpoint_info",
    "load",
    "quantize_checkpoint",
    "save",
    "upgrade_checkpoint",
]
