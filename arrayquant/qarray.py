"""``QArray``: quantized codes with their scale, zero point and static metadata."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

from arrayquant._backend import dtype_name
from arrayquant.blocking import Blocking
from arrayquant.packing import packed_length
from arrayquant.qtypes import QTYPE_NAMES, QType, as_qtype

__all__ = ["QArray"]


def storage_nbytes(a) -> int:
    if a is None:
        return 0
    size = math.prod(a.shape)
    itemsize = getattr(getattr(a, "dtype", None), "itemsize", None)
    if itemsize is None:  # array_api_strict dtypes have no itemsize
        import numpy as np

        from arrayquant._backend import dtype_name

        itemsize = np.dtype(dtype_name(a.dtype)).itemsize
    return size * itemsize


_FLOATS = ("float16", "bfloat16", "float32", "float64")


def _int_tuple(value, field: str) -> tuple[int, ...]:
    """``value`` (a tuple or list of ints) as a tuple of Python ints, else TypeError."""
    ok = isinstance(value, (tuple, list)) and all(
        isinstance(n, numbers.Integral) and not isinstance(n, bool) for n in value
    )
    if not ok:
        raise TypeError(f"QArray {field}={value!r} must be a tuple of ints")
    return tuple(int(n) for n in value)


def _check_array(a, field: str, shape: tuple[int, ...], dtypes: tuple[str, ...], why: str):
    if not (hasattr(a, "shape") and hasattr(a, "dtype")):
        raise TypeError(f"QArray {field} must be an array, got {type(a).__name__}")
    if tuple(a.shape) != shape:
        raise ValueError(f"QArray {field} has shape {tuple(a.shape)}; expected {shape} ({why})")
    if dtype_name(a.dtype) not in dtypes:
        raise TypeError(
            f"QArray {field} has dtype {dtype_name(a.dtype)}; expected {' or '.join(dtypes)}"
        )


def check_integer_codes(qa: QArray, what: str = "QArray") -> None:
    """TypeError unless ``qa``'s codes and zero points are integers (static: works under jit).

    A dtype cast mapped over a whole tree (``jax.tree.map(lambda a:
    a.astype(jnp.bfloat16), params)``) also reaches a QArray's codes; dequantizing
    or multiplying with float codes would run silently on the wrong kind of
    values, so every consumer calls this first.
    """
    for name in ("data", "zero_point"):
        dt = getattr(getattr(qa, name), "dtype", None)
        if dt is not None and dtype_name(dt) in _FLOATS:
            raise TypeError(
                f"{what} {name} has dtype {dtype_name(dt)} (qtype {qa.qtype}): a dtype cast "
                "mapped over a tree reached the integer codes of a QArray. Cast only the "
                "float leaves: aq.cast_floats(tree, dtype), or jax.tree.map(f, tree, "
                "is_leaf=lambda a: isinstance(a, aq.QArray)) with f returning QArrays "
                "unchanged"
            )


def check_fits(qa: QArray) -> None:
    """ValueError unless ``qa``'s arrays fit its metadata (static: works under jit).

    They always do for QArrays that arrayquant builds. Inside ``jax.shard_map`` a
    QArray holds one shard, and its metadata is rebuilt from the local arrays; that
    fails where the shards do not hold whole blocks (``aq.sharding_like`` then
    replicates the scales, which is fine under ``jit`` and ``device_put``).
    """
    qt = as_qtype(qa.qtype)
    nb = len(qa.batch_shape)
    data = tuple(packed_length(n, qt.bits) if d == qa.packed_axis else n
                 for d, n in enumerate(qa.shape))
    scale = Blocking(qa.shape, qa.block_shape).scale_shape
    got_data, got_scale = tuple(qa.data.shape[nb:]), tuple(qa.scale.shape[nb:])
    if got_data != data or got_scale != scale:
        raise ValueError(
            f"QArray arrays of shapes data {tuple(qa.data.shape)}, scale "
            f"{tuple(qa.scale.shape)} do not fit its metadata (shape {qa.shape}, block_shape "
            f"{qa.block_shape}: data {data}, scale {scale}). Inside shard_map each shard must "
            "hold whole blocks along every split axis (whole bytes along a packed axis); "
            "split such axes into pieces of whole groups, or use jit with device_put"
        )


def _local_static(static: tuple, data, scale) -> tuple:
    """``static`` for arrays that hold a shard of the QArray it describes.

    Inside ``jax.shard_map`` JAX rebuilds a QArray from the local pieces of its
    arrays with the global metadata. Where the arrays do not fit that metadata,
    the item shape is read from them (along the packed axis: whole bytes, 8 //
    bits codes each, unless the axis is not split) and an axis whose scale has
    one entry gets one block spanning its local length; other block sizes stay.
    Anything that still does not fit (or is not an array) keeps ``static``.
    """
    qtype, shape, dtype, block, packed = static
    dshape, sshape = getattr(data, "shape", None), getattr(scale, "shape", None)
    if not isinstance(dshape, tuple) or not isinstance(sshape, tuple):
        return static
    nb = len(dshape) - len(shape)
    if nb < 0 or len(sshape) != len(dshape):
        return static
    bits = as_qtype(qtype).bits
    item, scale_item = dshape[nb:], sshape[nb:]
    stored = tuple(packed_length(n, bits) if d == packed else n for d, n in enumerate(shape))
    if item == stored:
        return static
    new_shape = tuple(
        (n if m == packed_length(n, bits) else m * (8 // bits)) if d == packed else m
        for d, (n, m) in enumerate(zip(shape, item)))
    new_block = tuple(m if e == 1 else b for m, e, b in zip(new_shape, scale_item, block))
    if (min(new_shape, default=1) < 1 or not all(b <= m for b, m in zip(new_block, new_shape))
            or Blocking(new_shape, new_block).scale_shape != scale_item):
        return static
    return (qtype, new_shape, dtype, new_block, packed)


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

    Stacked QArrays: the arrays may carry leading batch axes (stacked layers,
    as ``jax.vmap(aq.quantize)`` or ``aq.quantize(ws, ..., batch_axes=1)``
    give), ``batch_shape``, in front of one item's ``shape``; every item has
    the same static metadata. ``qa[i]`` is the ``i``-th item, ``jax.lax.scan``
    over a stacked QArray hands one item per step, and dequantizing gives
    ``batch_shape + shape``.

    Build one with :func:`arrayquant.quantize`; it is frozen. Construction
    checks the metadata and, for array fields (anything with ``shape`` and
    ``dtype``), their shapes and dtypes; lists for ``shape`` / ``block_shape``
    become tuples and a negative ``packed_axis`` is normalized.

    Raises:
        TypeError: a field of the wrong type (``qtype`` not a str, ``shape`` not
            a tuple of ints, a non-float ``dtype`` or ``scale``, ``data`` / ``zero_point`` not in
            the storage dtype: uint8 when packed, else the qtype's int8 / uint8 /
            int16 / uint16).
        ValueError: unknown ``qtype``; an empty ``shape``; ``block_shape`` not
            ``1 <= b_d <= n_d`` per dimension; ``packed_axis`` out of range or
            on an 8- or 16-bit qtype; ``zero_point=None`` (symmetric) with an
            unsigned qtype; array shapes that do not fit ``shape`` and
            ``block_shape``.
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
    _static_names = ("qtype", "shape", "dtype", "block_shape", "packed_axis")

    def _static(self) -> tuple:
        return (self.qtype, self.shape, self.dtype, self.block_shape, self.packed_axis)

    def __post_init__(self) -> None:
        qt = self._check_static()
        b = Blocking(self.shape, self.block_shape)
        why = f"shape={self.shape}, block_shape={self.block_shape}, qtype {qt.name}"
        packed = self.packed_axis
        data_shape = tuple(
            packed_length(n, qt.bits) if d == packed else n for d, n in enumerate(self.shape)
        )
        # Leading axes beyond one item's rank are batch axes (stacked items), the same
        # for every array field.
        if not (hasattr(self.data, "shape") and hasattr(self.data, "dtype")):
            raise TypeError(f"QArray data must be an array, got {type(self.data).__name__}")
        nb = max(len(self.data.shape) - len(self.shape), 0)
        batch = tuple(self.data.shape[:nb])
        if batch:
            why = f"{why}, batch_shape {batch}"
        if packed is None:
            _check_array(self.data, "data", batch + data_shape, (qt.storage,), why)
        else:
            _check_array(self.data, "data", batch + data_shape, ("uint8",),
                         f"{why}, packed along axis {packed}")
        _check_array(self.scale, "scale", batch + b.scale_shape, _FLOATS, why)
        if self.zero_point is not None:
            _check_array(self.zero_point, "zero_point", batch + b.scale_shape, (qt.storage,),
                         why)

    def _check_static(self) -> QType:
        """Check and normalize the static fields; return the qtype."""
        try:
            qt = as_qtype(self.qtype)  # a name, or an integer dtype (np.int8, jnp.uint4)
        except ValueError:
            raise ValueError(f"QArray qtype={self.qtype!r} is not one of {QTYPE_NAMES} (or an "
                             "equivalent integer dtype)") from None
        shape = _int_tuple(self.shape, "shape")
        if min(shape, default=1) <= 0:
            raise ValueError(
                f"QArray shape={shape} holds no element; expected sizes >= 1 (or shape ())"
            )
        dtype = (self.dtype if isinstance(self.dtype, str)
                 else None if self.dtype is None else dtype_name(self.dtype))
        if dtype not in _FLOATS:
            raise TypeError(f"QArray dtype={self.dtype!r} must be one of {_FLOATS}")
        block = _int_tuple(self.block_shape, "block_shape")
        if len(block) != len(shape) or not all(1 <= b <= n for b, n in zip(block, shape)):
            raise ValueError(
                f"QArray block_shape={block} does not fit shape={shape}: expected "
                f"{len(shape)} block sizes with 1 <= block_shape[d] <= shape[d]"
            )
        axis = self.packed_axis
        if axis is not None:
            if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
                raise TypeError(f"QArray packed_axis={axis!r} must be None or an int")
            if not -len(shape) <= axis < len(shape):
                raise ValueError(
                    f"QArray packed_axis={axis} is out of range for shape={shape}; expected "
                    f"None or an int in [{-len(shape)}, {len(shape) - 1}]"
                )
            if qt.bits >= 8:
                raise ValueError(
                    f"QArray packed_axis={axis} with qtype {qt.name}: only 2- and 4-bit "
                    "codes are packed; expected packed_axis=None"
                )
            axis = int(axis) % len(shape)
        if self.zero_point is None and not qt.signed:
            raise ValueError(
                f"QArray zero_point=None (symmetric) needs a signed qtype, not {qt.name}"
            )
        for name, value in (("qtype", qt.name), ("shape", shape), ("dtype", dtype),
                            ("block_shape", block), ("packed_axis", axis)):
            object.__setattr__(self, name, value)
        return qt

    @classmethod
    def _from_parts(cls, static, children) -> QArray:
        # JAX rebuilds QArrays from arbitrary leaves (tracers, None, object()
        # sentinels, ShapeDtypeStructs, arrays with a vmap batch axis, float0
        # cotangents, results of any function mapped over a tree) and static
        # metadata that was checked when the original was built: no checks here.
        # Codes that a mapped cast turned into floats are refused where they are used
        # (check_integer_codes), not here, so that reductions and optimizer states
        # mapped over a tree keep working.
        static = _local_static(static, children[0], children[1])
        qa = object.__new__(cls)
        for name, value in zip(("data", "scale", "zero_point", *cls._static_names),
                               (*children, *static)):
            object.__setattr__(qa, name, value)
        return qa

    @property
    def codes(self):
        """The integer codes, one per element, shaped ``batch_shape + shape``."""
        check_integer_codes(self)
        if self.packed_axis is None:
            return self.data
        from arrayquant.packing import unpack

        qt = as_qtype(self.qtype)
        nb = len(self.batch_shape)
        return unpack(
            self.data, qt.bits, self.shape[self.packed_axis], axis=nb + self.packed_axis,
            signed=qt.signed,
        )

    @property
    def ndim(self) -> int:
        """Rank of one item (``len(shape)``); batch axes are ``batch_shape``."""
        return len(self.shape)

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """Leading batch axes of a stacked QArray (``()`` for a single array)."""
        return tuple(self.data.shape[: max(len(self.data.shape) - len(self.shape), 0)])

    def blocking(self) -> Blocking:
        """The blocking of the whole stored array: blocks of one element along batch axes."""
        nb = len(self.batch_shape)
        return Blocking(self.batch_shape + self.shape, (1,) * nb + self.block_shape)

    def __getitem__(self, index) -> QArray:
        """Item(s) of a stacked QArray: ``qa[i]``, ``qa[i:j]``, ``qa[i, j]`` index batch axes."""
        batch = self.batch_shape
        idx = index if isinstance(index, tuple) else (index,)
        if not batch or len(idx) > len(batch) or any(
                i is Ellipsis or i is None for i in idx):
            raise TypeError(
                f"QArray indexing selects items of a stacked QArray along its batch axes "
                f"(batch_shape {batch}); got index {index!r}. Dequantize first to index "
                "elements"
            )
        idx = (*idx, Ellipsis)  # the array API wants the item axes spelled out
        zp = None if self.zero_point is None else self.zero_point[idx]
        return QArray._from_parts(self._static(), (self.data[idx], self.scale[idx], zp))

    def __len__(self) -> int:
        if not self.batch_shape:
            raise TypeError("len() of a QArray without batch axes; use qa.shape")
        return self.batch_shape[0]

    @property
    def symmetric(self) -> bool:
        return self.zero_point is None

    @property
    def bits(self) -> int:
        return as_qtype(self.qtype).bits

    @property
    def granularity(self) -> str:
        """``per-tensor``, ``per-axis(k)`` or ``per-group(g, axis=k)`` (of one item)."""
        return Blocking(self.shape, self.block_shape).describe()

    @property
    def nbytes(self) -> int:
        """Bytes actually stored: codes (packed where packed) + scales + zero points."""
        return sum(storage_nbytes(a) for a in (self.data, self.scale, self.zero_point))

    @property
    def bits_per_element(self) -> float:
        """Stored bits per original element, metadata arrays included."""
        return 8 * self.nbytes / math.prod(self.batch_shape + self.shape)

    def dequantize(self, dtype=None):
        """``scale * (codes - zero_point)`` in the original dtype (or ``dtype``).

        Saturated to that dtype's finite range, never inf (see
        :func:`arrayquant.dequantize`).
        """
        from arrayquant.affine import dequantize

        return dequantize(self, dtype=dtype)

    def __repr__(self) -> str:
        packed = f", packed_axis={self.packed_axis}" if self.packed_axis is not None else ""
        sym = "symmetric" if self.symmetric else "asymmetric"
        batch = f"batch_shape={self.batch_shape}, " if self.batch_shape else ""
        return (
            f"QArray(qtype={self.qtype}, {batch}shape={self.shape}, dtype={self.dtype}, "
            f"{self.granularity}, {sym}{packed})"
        )
