"""Granularity as a static plan on shapes.

Every granularity is a *block shape*: dimension ``d`` of the input is cut into
``ceil(n_d / b_d)`` consecutive blocks of ``b_d`` elements (the last one may be
partial), and each block gets one scale. Per tensor is ``b = shape``, per
channel along axis ``k`` is ``b_k = 1`` and ``b_d = n_d`` elsewhere, per group
of ``g`` along ``a`` is ``b_a = g`` and ``b_d = 1`` elsewhere.

The array code never branches on this: it pads the grouped axis with zeros to
a multiple of the block (zero never changes a range that is extended to hold
zero), reshapes into a *split view* in which every block is reduced over fixed
axes, and broadcasts the scale back. All of it is computed here in pure Python
and cached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

__all__ = ["Blocking", "plan", "plan_from_scale", "normalize_axis"]


def normalize_axis(axis: int, ndim: int, what: str = "axis") -> int:
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"{what} must be an int, got {axis!r}")
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"{what}={axis} is out of range for an array of {ndim} dimensions; "
            f"expected an int in [{-ndim}, {ndim - 1}]"
        )
    return axis % ndim


@dataclass(frozen=True)
class Blocking:
    """Block shape ``block`` over an array of shape ``shape``, and its split view."""

    shape: tuple[int, ...]
    block: tuple[int, ...]

    @property
    def scale_shape(self) -> tuple[int, ...]:
        """Shape of scale and zero point: ``ceil(n_d / b_d)`` per dimension."""
        return tuple(-(-n // b) for n, b in zip(self.shape, self.block))

    @property
    def padded_shape(self) -> tuple[int, ...]:
        return tuple(c * b for c, b in zip(self.scale_shape, self.block))

    @property
    def needs_padding(self) -> bool:
        return self.padded_shape != self.shape

    def _kinds(self):
        # Per padded dimension: "keep" (one scale per index), "reduce" (one scale
        # for the whole dimension) or "split" (groups of b inside the dimension).
        for n, b in zip(self.padded_shape, self.block):
            if b == 1:
                yield "keep", n, b
            elif b == n:
                yield "reduce", n, b
            else:
                yield "split", n, b

    @property
    def view_shape(self) -> tuple[int, ...]:
        """Shape of the split view of the padded input."""
        out: list[int] = []
        for kind, n, b in self._kinds():
            out.extend((n // b, b) if kind == "split" else (n,))
        return tuple(out)

    @property
    def scale_view_shape(self) -> tuple[int, ...]:
        """Shape the scale takes to broadcast against the split view."""
        out: list[int] = []
        for kind, n, b in self._kinds():
            if kind == "split":
                out.extend((n // b, 1))
            else:
                out.append(n if kind == "keep" else 1)
        return tuple(out)

    @property
    def reduce_axes(self) -> tuple[int, ...]:
        """Axes of the split view that each block reduces over."""
        out: list[int] = []
        pos = 0
        for kind, _n, _b in self._kinds():
            if kind == "split":
                out.append(pos + 1)
                pos += 2
            else:
                if kind == "reduce":
                    out.append(pos)
                pos += 1
        return tuple(out)

    @property
    def padding(self) -> tuple[int, ...]:
        return tuple(p - n for p, n in zip(self.padded_shape, self.shape))

    def describe(self) -> str:
        """A short description: ``per-tensor``, ``per-axis(0)`` or ``per-group(128, axis=1)``."""
        pairs = list(zip(self.block, self.shape))
        if all(b == n for b, n in pairs):
            return "per-tensor"
        grouped = [d for d, (b, n) in enumerate(pairs) if b not in (1, n)]
        if not grouped:
            kept = tuple(d for d, (b, n) in enumerate(pairs) if b == 1 and n > 1)
            return f"per-axis({kept[0] if len(kept) == 1 else kept})"
        if len(grouped) == 1 and all(b == 1 for d, (b, _) in enumerate(pairs) if d != grouped[0]):
            return f"per-group({self.block[grouped[0]]}, axis={grouped[0]})"
        return f"blocks{self.block}"


def _check_shape(shape: tuple[int, ...]) -> None:
    if math.prod(shape) == 0:
        raise ValueError(f"cannot quantize an empty array (shape {shape})")


@lru_cache(maxsize=1024)
def plan(shape: tuple[int, ...], axis, group_size, group_axis: int) -> Blocking:
    """The blocking for ``qparams``' granularity arguments on an array of ``shape``.

    Raises:
        ValueError: an axis is out of range or repeated, ``group_size`` is not a
            positive int, or both ``axis`` and ``group_size`` are given.
        TypeError: an axis or the group size is not an int.
    """
    _check_shape(shape)
    ndim = len(shape)
    if group_size is not None:
        if axis is not None:
            raise ValueError(
                f"pass either axis={axis!r} (per channel) or group_size={group_size!r} "
                "(per group along group_axis), not both"
            )
        if isinstance(group_size, bool) or not isinstance(group_size, int):
            raise TypeError(f"group_size must be a positive int or None, got {group_size!r}")
        if group_size <= 0:
            raise ValueError(f"group_size must be a positive int or None, got {group_size}")
        if ndim == 0:
            raise ValueError("per-group quantization needs an array of at least 1 dimension")
        ga = normalize_axis(group_axis, ndim, "group_axis")
        block = tuple(min(group_size, n) if d == ga else 1 for d, n in enumerate(shape))
        return Blocking(shape, block)
    if axis is None:
        return Blocking(shape, shape)
    axes = axis if isinstance(axis, tuple) else (axis,)
    if isinstance(axis, list):
        axes = tuple(axis)
    kept = tuple(normalize_axis(a, ndim) for a in axes)
    if len(set(kept)) != len(kept):
        raise ValueError(f"axis={axis!r} repeats an axis; expected distinct axes")
    return Blocking(shape, tuple(1 if d in kept else n for d, n in enumerate(shape)))


@lru_cache(maxsize=1024)
def plan_from_scale(
    shape: tuple[int, ...], scale_shape: tuple[int, ...], group_size, group_axis: int
) -> Blocking:
    """The blocking implied by a scale of ``scale_shape`` on an array of ``shape``.

    Dimension ``d`` with ``s_d`` scale entries uses blocks of ``ceil(n_d / s_d)``
    unless ``group_size`` says otherwise for ``group_axis`` (needed when a
    partial last group makes the block size ambiguous, e.g. 100 = 3 * 32 + 4).

    Raises:
        ValueError: the ranks differ, or a scale dimension does not fit.
    """
    _check_shape(shape)
    if len(scale_shape) != len(shape):
        raise ValueError(
            f"scale of shape {scale_shape} does not match an array of shape {shape}: "
            f"expected the same rank ({len(shape)}) with ceil(n_d / block_d) entries "
            "per dimension"
        )
    ga = normalize_axis(group_axis, len(shape), "group_axis") if shape else None
    block = []
    for d, (n, s) in enumerate(zip(shape, scale_shape)):
        if s < 1 or s > n:
            raise ValueError(
                f"scale of shape {scale_shape} does not match an array of shape {shape}: "
                f"dimension {d} has {s} scale entries for {n} elements"
            )
        b = -(-n // s)
        if group_size is not None and d == ga and s not in (1, n):
            b = min(group_size, n)
        if -(-n // b) != s:
            raise ValueError(
                f"scale of shape {scale_shape} does not match an array of shape {shape} "
                f"with group_size={group_size}: dimension {d} needs {-(-n // b)} entries"
            )
        block.append(b)
    return Blocking(shape, tuple(block))


# --------------------------------------------------------------------------- views


def to_view(x, b: Blocking, xp):
    """Pad (with zeros) to whole blocks, then reshape into the split view."""
    if b.needs_padding:
        for d, p in enumerate(b.padding):
            if p:
                pad_shape = tuple(p if i == d else n for i, n in enumerate(x.shape))
                x = xp.concat([x, xp.zeros(pad_shape, dtype=x.dtype)], axis=d)
    return xp.reshape(x, b.view_shape)


def from_view(v, b: Blocking, xp):
    v = xp.reshape(v, b.padded_shape)
    if b.needs_padding:
        v = v[tuple(slice(0, n) for n in b.shape)]
    return v
