"""``QArray``: quantized codes with their scale, zero point and static metadata."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ._blocking import Blocking
from ._qtypes import as_qtype

__all__ = ["QArray"]


def _nbytes(a) -> int:
    if a is None:
        return 0
    size = math.prod(a.shape)
    itemsize = getattr(getattr(a, "dtype", None), "itemsize", None)
    if itemsize is None:  # array_api_strict dtypes have no itemsize
        import numpy as np

        from ._backend import dtype_name

        itemsize = np.dtype(dtype_name(a.dtype)).itemsize
    return size * itemsize


@dataclass(frozen=True, eq=False)
class QArray:
    """A quantized array: ``x ~= scale * (codes - zero_point)``.

    Array fields (pytree children under JAX): ``data`` (the stored codes: one
    per element in the qtype's storage dtype, or packed bytes for sub-byte
    types), ``scale`` (float) and ``zero_point`` (integer, ``None`` when
    symmetric). Scale and zero point have the rank of the original array, with
    ``ceil(n_d / block_d)`` entries along dimension ``d``.

    Static metadata: ``qtype`` (e.g. ``"int4"``), ``shape`` and ``dtype`` (the
    original float dtype's name), ``block_shape`` (the granularity) and
    ``packed_axis`` (the axis packed into bytes, or ``None``).

    Build one with :func:`arrayquant.quantize`; it is frozen.
    """

    data: Any
    scale: Any
    zero_point: Any
    qtype: str
    shape: tuple[int, ...]
    dtype: str
    block_shape: tuple[int, ...]
    packed_axis: int | None = None

    _children = ("data", "scale", "zero_point")

    def _static(self) -> tuple:
        return (self.qtype, self.shape, self.dtype, self.block_shape, self.packed_axis)

    @classmethod
    def _from_parts(cls, static, children) -> QArray:
        return cls(*children, *static)

    @property
    def codes(self):
        """The integer codes, one per element, shaped like the original array."""
        if self.packed_axis is None:
            return self.data
        from .packing import unpack

        qt = as_qtype(self.qtype)
        return unpack(
            self.data, qt.bits, self.shape[self.packed_axis], axis=self.packed_axis,
            signed=qt.signed,
        )

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def symmetric(self) -> bool:
        return self.zero_point is None

    @property
    def bits(self) -> int:
        return as_qtype(self.qtype).bits

    @property
    def granularity(self) -> str:
        """``per-tensor``, ``per-axis(k)`` or ``per-group(g, axis=k)``."""
        return Blocking(self.shape, self.block_shape).describe()

    @property
    def nbytes(self) -> int:
        """Bytes actually stored: codes (packed where packed) + scales + zero points."""
        return _nbytes(self.data) + _nbytes(self.scale) + _nbytes(self.zero_point)

    @property
    def bits_per_element(self) -> float:
        """Stored bits per original element, metadata arrays included."""
        return 8 * self.nbytes / math.prod(self.shape)

    def dequantize(self, dtype=None):
        """``scale * (codes - zero_point)`` in the original dtype (or ``dtype``)."""
        from .affine import dequantize

        return dequantize(self, dtype=dtype)

    def __repr__(self) -> str:
        packed = f", packed_axis={self.packed_axis}" if self.packed_axis is not None else ""
        sym = "symmetric" if self.symmetric else "asymmetric"
        return (
            f"QArray(qtype={self.qtype}, shape={self.shape}, dtype={self.dtype}, "
            f"{self.granularity}, {sym}{packed})"
        )
