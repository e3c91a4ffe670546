"""``LinearWeight``: a quantized weight with the state of its layer's input.

Data-aware methods leave state beside the codes that inference needs:

- ``in_scale`` (AWQ, SmoothQuant): a ``(k,)`` float vector. The codes hold the
  weight multiplied by ``1 / in_scale`` along the input axis, and the
  activations are multiplied by ``in_scale`` before the product, so
  ``x @ W.T == (x * in_scale) @ Q.T`` (``Q = dequantize(qweight)``). A model
  may fold it into the operation before the layer instead.
- ``perm`` (GPTQ with act-order): a ``(k,)`` int32 permutation. The codes hold
  the input features in the order ``perm`` (so that the groups are contiguous
  in the order GPTQ quantized them); the activations are gathered with it.
  ``perm`` is GPTQ's group index in the form contiguous storage needs: input
  feature ``perm[j]`` is in group ``j // group_size``
  (:meth:`LinearWeight.group_index`).
- ``act_scale``, ``act_zero_point`` and the static ``act_qtype``: static
  (calibrated) activation quantization, one scale and zero point for the
  whole activation tensor; :func:`arrayquant.linear` uses them instead of
  per-token dynamic scales.

The represented weight ``W``: along the input axis ``W[..., perm[j]] = Q[..., j]
* in_scale[j]`` (``perm`` the identity and ``in_scale`` one where absent), and
:func:`arrayquant.dequantize` returns it. ``in_axis`` is the input axis of one
item: 1 for PyTorch's ``(out, in)`` layout (:func:`arrayquant.linear`), 0 for
``(in, out)`` (:func:`arrayquant.matmul`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from arrayquant._backend import compute_dtype, dtype_name, finfo_limits, namespace
from arrayquant.qarray import QArray
from arrayquant.qtypes import as_qtype

__all__ = ["LinearWeight"]

_FLOATS = ("float16", "bfloat16", "float32", "float64")


@dataclass(frozen=True, eq=False)
class LinearWeight:
    """A 2-D quantized weight and its input state (see the module docstring).

    Array fields (pytree children under JAX): ``qweight`` (a :class:`QArray`,
    itself a pytree), ``in_scale``, ``perm``, ``act_scale``, ``act_zero_point``
    (each ``None`` when absent). Static: ``in_axis``, ``act_qtype``.

    Raises:
        TypeError: ``qweight`` not a QArray; a field of the wrong dtype.
        ValueError: ``qweight`` not 2-D (or stacked); ``in_axis`` not 0 or 1;
            ``in_scale`` / ``perm`` not of shape ``(k,)``; activation fields
            that do not go together (a scale without a qtype, ...).
    """

    qweight: Any
    in_scale: Any = None
    perm: Any = None
    act_scale: Any = None
    act_zero_point: Any = None
    in_axis: int = 1
    act_qtype: str | None = None

    _children = ("qweight", "in_scale", "perm", "act_scale", "act_zero_point")
    _static_names = ("in_axis", "act_qtype")

    def _static(self) -> tuple:
        return (self.in_axis, self.act_qtype)

    def __post_init__(self) -> None:
        qw = self.qweight
        if not isinstance(qw, QArray):
            raise TypeError(f"LinearWeight qweight must be a QArray, got {type(qw).__name__}")
        if len(qw.shape) != 2 or qw.batch_shape:
            raise ValueError(
                f"LinearWeight qweight must be one 2-D weight; got shape {qw.shape}"
                + (f", batch_shape {qw.batch_shape}" if qw.batch_shape else ""))
        if self.in_axis not in (0, 1) or isinstance(self.in_axis, bool):
            raise ValueError(f"LinearWeight in_axis={self.in_axis!r}: expected 0 ((in, out) "
                             "layout) or 1 ((out, in) layout)")
        k = qw.shape[self.in_axis]
        for name, kinds in (("in_scale", _FLOATS), ("perm", ("int32", "int64"))):
            a = getattr(self, name)
            if a is None:
                continue
            if not (hasattr(a, "shape") and hasattr(a, "dtype")):
                raise TypeError(f"LinearWeight {name} must be an array or None, got "
                                f"{type(a).__name__}")
            if tuple(a.shape) != (k,):
                raise ValueError(f"LinearWeight {name} has shape {tuple(a.shape)}; expected "
                                 f"({k},), one entry per input feature of the weight of "
                                 f"shape {qw.shape} (in_axis={self.in_axis})")
            if dtype_name(a.dtype) not in kinds:
                raise TypeError(f"LinearWeight {name} has dtype {dtype_name(a.dtype)}; "
                                f"expected {' or '.join(kinds)}")
        has_act = self.act_scale is not None
        if has_act != (self.act_qtype is not None):
            raise ValueError("LinearWeight act_scale and act_qtype go together: give both "
                             "(static activation quantization) or neither")
        if self.act_zero_point is not None and not has_act:
            raise ValueError("LinearWeight act_zero_point needs act_scale and act_qtype")
        if has_act:
            qt = as_qtype(self.act_qtype)
            object.__setattr__(self, "act_qtype", qt.name)
            if tuple(self.act_scale.shape) != ():
                raise ValueError(f"LinearWeight act_scale must be a scalar (one scale for "
                                 f"the activation tensor); got shape "
                                 f"{tuple(self.act_scale.shape)}")
            if self.act_zero_point is None and not qt.signed:
                raise ValueError(f"LinearWeight act_zero_point=None (symmetric) needs a "
                                 f"signed act_qtype, not {qt.name}")
            if self.act_zero_point is not None and tuple(self.act_zero_point.shape) != ():
                raise ValueError("LinearWeight act_zero_point must be a scalar")

    @classmethod
    def _from_parts(cls, static, children) -> LinearWeight:
        # As QArray._from_parts: JAX rebuilds from arbitrary leaves, no checks.
        lw = object.__new__(cls)
        for name, value in zip((*cls._children, *cls._static_names), (*children, *static)):
            object.__setattr__(lw, name, value)
        return lw

    # The array-like face of the weight it represents.
    @property
    def shape(self) -> tuple[int, ...]:
        return self.qweight.shape

    @property
    def dtype(self) -> str:
        return self.qweight.dtype

    @property
    def qtype(self) -> str:
        return self.qweight.qtype

    @property
    def ndim(self) -> int:
        return 2

    @property
    def nbytes(self) -> int:
        from arrayquant.qarray import storage_nbytes

        return self.qweight.nbytes + sum(
            storage_nbytes(getattr(self, n)) for n in self._children[1:])

    def group_index(self, group_size: int):
        """GPTQ's ``g_idx``: the group of every input feature in the original order."""
        k = self.shape[self.in_axis]
        xp = namespace(self.qweight.scale)
        pos = xp.arange(k, dtype=xp.int32) // group_size
        if self.perm is None:
            return pos
        inv = xp.argsort(self.perm)
        return xp.take(pos, inv)

    def dequantize(self, dtype=None):
        """The represented weight (original input order and scale)."""
        from arrayquant.affine import dequantize

        return dequantize(self, dtype=dtype)

    def __repr__(self) -> str:
        parts = [repr(self.qweight)]
        if self.in_scale is not None:
            parts.append("in_scale")
        if self.perm is not None:
            parts.append("perm")
        if self.act_qtype is not None:
            parts.append(f"static {self.act_qtype} activations"
                         + (" (symmetric)" if self.act_zero_point is None else ""))
        return f"LinearWeight({', '.join(parts)}, in_axis={self.in_axis})"


def transform_input(x, lw: LinearWeight, xp):
    """``x`` as the codes see it: features gathered by ``perm``, times ``in_scale``.

    ``x`` has its features along the last axis, in the original order. With
    ``in_scale``, the product is in ``x``'s compute dtype (float32 for float16 and
    bfloat16 ``x``, whose range and precision ``in_scale`` may exceed).
    """
    if lw.perm is not None:
        x = xp.take(x, lw.perm, axis=len(x.shape) - 1)
    if lw.in_scale is not None:
        cdt = compute_dtype(xp, x.dtype)
        x = xp.astype(x, cdt, copy=False) * xp.astype(lw.in_scale, cdt)
    return x


def weight_from_stored(q, lw: LinearWeight, xp):
    """The represented weight from ``q``, the dequantized stored one (same dtype as ``q``).

    Multiplied by ``in_scale`` along the input axis (in the compute dtype, then
    saturated to ``q``'s finite range, never inf), then put back into the original
    input order.
    """
    ax = lw.in_axis
    if lw.in_scale is not None:
        # In the compute dtype: in_scale may not fit a float16 q (SmoothQuant's 1e5).
        cdt = compute_dtype(xp, q.dtype)
        m = xp.astype(lw.in_scale, cdt)
        qc = xp.astype(q, cdt) * (m[None, :] if ax == 1 else m[:, None])
        big = finfo_limits(q.dtype)[1]
        q = xp.astype(xp.clip(qc, -big, big), q.dtype)
    if lw.perm is not None:
        q = xp.take(q, xp.argsort(lw.perm), axis=ax)
    return q
