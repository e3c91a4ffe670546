"""Checks that work the same in eager mode and under ``jax.jit``.

Eager calls (NumPy arrays, concrete JAX arrays) of :func:`arrayquant.quantize`
and friends raise ``ValueError`` on NaN or infinite input. Under ``jax.jit``
values are not known while tracing, so that check cannot run: a NaN then turns
the scale of its block into NaN, and that whole block dequantizes to NaN (an
inf gives an infinite or NaN scale the same way); codes of such a block are
unspecified. To check inside compiled code, use :func:`all_finite` (a boolean
array you can act on) or :func:`check_finite` under ``jax.experimental.checkify``.

The other eager-only checks (docs/semantics.md, "Eager checks and jit") are
skipped under ``jax.jit`` the same way: a block that needs a scale above the
largest allowed one saturates, and scales or zero points given to
``quantize_with`` / ``dequantize_with`` are used as given (results unspecified
when they are not finite, outside ``scale_limits`` or outside the qtype).
"""

from __future__ import annotations

from arrayquant._backend import is_concrete, is_jax, namespace

__all__ = ["all_finite", "check_finite"]


def all_finite(x):
    """0-d boolean array: every element of ``x`` is finite. Works under jit and vmap."""
    xp = namespace(x)
    return xp.all(xp.isfinite(x))


def check_finite(x, what: str = "x") -> None:
    """Raise if ``x`` holds NaN or inf.

    Eagerly this raises ``ValueError`` at once. With a traced JAX array it adds
    a ``checkify.check``: wrap the jitted function with
    ``jax.experimental.checkify.checkify`` and call ``err.throw()``.

    Example:
        >>> import numpy as np, arrayquant as aq
        >>> aq.check_finite(np.array([1.0, np.nan]))
        Traceback (most recent call last):
        ...
        ValueError: x holds NaN or infinite values; quantization needs finite input
    """
    xp = namespace(x)
    if is_concrete(x):
        if not bool(xp.all(xp.isfinite(x))):
            raise ValueError(
                f"{what} holds NaN or infinite values; quantization needs finite input"
            )
        return
    if is_jax(xp):
        from arrayquant._backend.jaxtools import check_finite as _jax_check

        _jax_check(x, what)
