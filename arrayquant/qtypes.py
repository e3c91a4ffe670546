"""Quantized types: kind, names, bit widths, ranges and storage dtypes.

A quantized type ("qtype") is a static Python value. Today every qtype is of
kind ``"int"``: its codes live in the smallest standard integer dtype that
holds them (int8 / uint8 for the sub-byte types), restricted to the n-bit
range, and ``round -> clip -> cast`` encodes them. The ``kind`` is where float
(FP8, FP4) and microscaling encodings go: a new kind brings its own code range,
storage dtype and encode/decode, and the quantize step
(:func:`arrayquant.affine.codes.quantize_view`) dispatches on it (see
docs/architecture.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

__all__ = ["QType", "as_qtype", "QTYPE_NAMES"]

QTYPE_NAMES = ("int2", "uint2", "int4", "uint4", "int8", "uint8", "int16", "uint16")


KINDS = ("int",)


@dataclass(frozen=True)
class QType:
    """A signed or unsigned integer type of ``bits`` bits (``kind="int"``).

    ``qmin``/``qmax`` are the n-bit two's complement (signed) or unsigned range,
    for example ``int4`` -> [-8, 7] and ``uint4`` -> [0, 15].
    """

    bits: int
    signed: bool
    kind: str = "int"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown qtype kind {self.kind!r}; expected one of {KINDS}")

    @property
    def name(self) -> str:
        return f"{'' if self.signed else 'u'}int{self.bits}"

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    @property
    def storage(self) -> str:
        """Name of the standard integer dtype that stores one code per element."""
        width = 8 if self.bits <= 8 else 16
        return f"{'' if self.signed else 'u'}int{width}"

    def __str__(self) -> str:
        return self.name


def _accepted() -> str:
    return (
        "one of " + ", ".join(repr(n) for n in QTYPE_NAMES)
        + " or an equivalent NumPy / JAX / ml_dtypes integer dtype"
    )


@cache
def _from_name(name: str) -> QType:
    for bits in (2, 4, 8, 16):
        for signed in (True, False):
            q = QType(bits, signed)
            if q.name == name:
                return q
    raise ValueError(f"unknown quantized dtype {name!r}; expected {_accepted()}")


def as_qtype(dtype: object) -> QType:
    """Resolve ``dtype`` (a name, a QType, or an integer dtype object) to a :class:`QType`.

    Raises:
        ValueError: the name or dtype is not one of the supported integer types.
    """
    if isinstance(dtype, QType):
        return dtype
    if isinstance(dtype, str):
        return _from_name(dtype)
    name = None
    try:
        name = np.dtype(dtype).name  # NumPy, JAX and ml_dtypes dtypes
    except TypeError:
        # Other array API libraries (array_api_strict, torch) print their dtypes
        # as "<library>.int8": take the last component.
        text = str(dtype)
        name = text.rsplit(".", 1)[-1]
    if name in QTYPE_NAMES:
        return _from_name(name)
    raise ValueError(f"unsupported quantized dtype {dtype!r}; expected {_accepted()}")
