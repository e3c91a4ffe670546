"""Choosing a calibration method: names, validation, and the one call site.

:func:`as_method` turns ``method=`` (an instance, or one of the names
``"minmax"``, ``"percentile"``, ``"mse"``, ``"hqq"`` for the default instances)
into a method; :func:`calibrate` runs it on a split view and returns the
parameters of every block.
"""

from __future__ import annotations

from arrayquant.affine.calibrate import MinMax, Percentile, minmax_ranges
from arrayquant.affine.checks import raise_if_not_finite
from arrayquant.affine.params import params_from_range
from arrayquant.affine.search import HQQ, MSESearch
from arrayquant.blocking import Blocking

__all__ = ["METHOD_NAMES", "as_method", "calibrate", "is_data_aware"]

METHOD_NAMES = {"minmax": MinMax, "percentile": Percentile, "mse": MSESearch, "hqq": HQQ}


def is_data_aware(method) -> bool:
    """A data-aware weight method (GPTQ, AWQ, ...): it needs activation statistics.

    The protocol: a frozen dataclass with ``needs_stats = True`` and
    ``quantize_weight(w, stats, *, dtype, symmetric, axis, group_size, group_axis,
    scale_dtype)`` returning a QArray or a LinearWeight.
    """
    return getattr(method, "needs_stats", False) is True and callable(
        getattr(method, "quantize_weight", None))


def as_method(method, *, data_aware: bool = False):
    """A calibration method from ``method=``: an instance, a name, or None (MinMax).

    ``data_aware=True`` (rules of :func:`arrayquant.quantize_tree`) also accepts
    data-aware weight methods (:func:`is_data_aware`).

    Raises:
        ValueError: an unknown name or an object that is not a method; a
            data-aware method where only per-block methods work.
    """
    if method is None:
        return MinMax()
    if is_data_aware(method):
        if not data_aware:
            raise ValueError(
                f"method={method!r} is a data-aware method: it needs activation statistics. "
                "Use it in a rule, aq.quantize_tree(params, aq.Rule(..., method=...), "
                "stats=aq.collect_stats(...)), or call its function with the statistics")
        _check_hashable(method)
        return method
    if isinstance(method, str):
        cls = METHOD_NAMES.get(method.lower())
        if cls is not None:
            return cls()
    elif isinstance(method, type) and method in METHOD_NAMES.values():
        return method()
    elif getattr(method, "output", None) in ("range", "params") and callable(method):
        _check_hashable(method)
        return method
    raise ValueError(
        f"method={method!r} is not a calibration method; expected one of "
        f"{', '.join(repr(n) for n in METHOD_NAMES)}, or an instance such as "
        "arrayquant.Percentile(99.9), arrayquant.MSESearch(grid=20), arrayquant.HQQ()"
    )


def _check_hashable(method) -> None:
    try:
        hash(method)
    except TypeError:
        raise ValueError(
            f"method={method!r} is not hashable; a calibration method must be a frozen "
            "dataclass (it is static configuration under jax.jit)") from None


def calibrate(method, xv, b: Blocking, qt, symmetric: bool, sdt, cdt, xp):
    """``(scale, z)`` per block of the split view ``xv`` (``b.scale_view_shape``).

    ``z`` is an integer-valued ``cdt`` array, or None when symmetric. Eager mode
    checks that ``xv`` is finite (on its min and max: they propagate NaN and inf).
    """
    rmin, rmax = minmax_ranges(xv, b, xp)
    raise_if_not_finite(xp, rmin, rmax)
    if isinstance(method, MinMax):
        return params_from_range(rmin, rmax, qt, symmetric, sdt, cdt, xp)
    out = method(xv, b, qt, symmetric, sdt, cdt, xp)
    if method.output == "range":
        return params_from_range(out[0], out[1], qt, symmetric, sdt, cdt, xp)
    return out
