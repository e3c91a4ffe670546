"""Shardings for QArrays: place codes and scales the way a float weight is placed.

JAX only; JAX is imported inside the functions, so ``import arrayquant`` stays
free of it.
"""

from __future__ import annotations

import math

from arrayquant.linear_weight import LinearWeight
from arrayquant.packing import packed_length
from arrayquant.qarray import QArray
from arrayquant.qtypes import as_qtype

__all__ = ["sharding_like"]


def _axis_size(mesh, entry) -> int:
    names = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(mesh.shape[n] for n in names)


def sharding_like(qa: QArray, sharding):
    """The shardings of ``qa``'s arrays that match ``sharding`` of its float array.

    ``sharding`` is the placement of the float array that ``qa`` quantizes
    (shape ``qa.batch_shape + qa.shape``), usually a ``NamedSharding(mesh,
    PartitionSpec(...))``. The result is a QArray-shaped tree of shardings, for
    ``jax.device_put(qa, aq.sharding_like(qa, s))``, ``jax.jit``'s
    ``in_shardings`` / ``out_shardings`` and ``aq.load(..., shardings=...)``
    (``.spec`` of each gives ``shard_map``'s ``in_specs``):

    - the codes take the float array's spec (packed bytes along the packed
      axis: each shard must hold whole bytes);
    - scales and zero points take it along every axis where each shard holds
      whole blocks, and are replicated along the others, such as the reduced
      axis of a per-channel scale (one entry for the whole axis).

    Any other sharding (one device, fully replicated) is used for every array.
    For a :class:`~arrayquant.LinearWeight` the codes are placed as above and its
    input state (``in_scale``, ``perm``, static activation parameters) is
    replicated.

    Raises:
        TypeError: ``qa`` is not a QArray.
        ValueError: the spec has more entries than ``qa`` has axes, or shards
            the packed axis into pieces that do not hold whole bytes.
    """
    from jax.sharding import NamedSharding, PartitionSpec

    if isinstance(qa, LinearWeight):
        # The input state is small, and perm gathers across the whole input axis: replicated.
        rep = (NamedSharding(sharding.mesh, PartitionSpec())
               if isinstance(sharding, NamedSharding) else sharding)
        return LinearWeight._from_parts(qa._static(), (
            sharding_like(qa.qweight, sharding),
            *(None if getattr(qa, n) is None else rep for n in LinearWeight._children[1:])))
    if not isinstance(qa, QArray):
        raise TypeError(f"sharding_like expects a QArray or LinearWeight, got "
                        f"{type(qa).__name__}")
    if not isinstance(sharding, NamedSharding):
        return QArray._from_parts(qa._static(), (sharding, sharding,
                                                 None if qa.zero_point is None else sharding))
    full = qa.batch_shape + qa.shape
    spec = tuple(sharding.spec)
    if len(spec) > len(full):
        raise ValueError(
            f"PartitionSpec {sharding.spec} has {len(spec)} entries, but the array that "
            f"the QArray holds has shape {full} ({len(full)} axes)"
        )
    spec = spec + (None,) * (len(full) - len(spec))
    nb, mesh = len(qa.batch_shape), sharding.mesh
    block = (1,) * nb + qa.block_shape
    scale_spec = []
    for d, (entry, n) in enumerate(zip(spec, full)):
        if entry is None:
            scale_spec.append(None)
            continue
        k = _axis_size(mesh, entry)
        entries = -(-n // block[d])
        whole = n % k == 0 and (n // k) % block[d] == 0 and entries % k == 0
        scale_spec.append(entry if whole and entries > 1 else None)
        if qa.packed_axis is not None and d == nb + qa.packed_axis:
            per = 8 // as_qtype(qa.qtype).bits
            if n % k or (n // k) % per or packed_length(n, 8 // per) % k:
                raise ValueError(
                    f"PartitionSpec {sharding.spec} splits the packed axis {d} (length {n}) "
                    f"into {k} pieces, which would cut bytes of {per} codes; expected a "
                    f"length divisible by {k * per}"
                )
    data_s = NamedSharding(mesh, PartitionSpec(*spec))
    scale_s = NamedSharding(mesh, PartitionSpec(*scale_spec))
    return QArray._from_parts(qa._static(), (data_s, scale_s,
                                             None if qa.zero_point is None else scale_s))
