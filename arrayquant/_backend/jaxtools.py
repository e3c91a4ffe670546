"""JAX-specific glue, imported only once JAX itself is imported.

- registers :class:`arrayquant.QArray`, :class:`arrayquant.LinearWeight` and
  :class:`arrayquant.LayerStats` as pytrees (array fields are children, the rest
  is static metadata), so they pass through ``jax.jit``, ``jax.vmap`` and
  ``jax.tree_util``;
- tells tracers from concrete arrays, so eager-only checks can be skipped
  under ``jit``;
- a checkify-compatible finiteness check.

``arrayquant`` never imports JAX on its own: :func:`install_hook` arranges for
:func:`register_pytrees` to run right after the user's own ``import jax``.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

_registered = False


def register_pytrees() -> None:
    """Register arrayquant's containers with ``jax.tree_util`` (idempotent)."""
    global _registered
    if _registered:
        return
    import jax

    from arrayquant.linear_weight import LinearWeight
    from arrayquant.qarray import QArray
    from arrayquant.stats.layer import LayerStats

    _registered = True
    for cls in (QArray, LinearWeight, LayerStats):
        _register(jax, cls)


def _register(jax, cls) -> None:
    """Array fields (``cls._children``) are children; ``obj._static()`` is the aux data."""
    names = cls._children
    jax.tree_util.register_pytree_with_keys(
        cls,
        lambda o: (tuple((jax.tree_util.GetAttrKey(n), getattr(o, n)) for n in names),
                   o._static()),
        cls._from_parts,
        flatten_func=lambda o: (tuple(getattr(o, n) for n in names), o._static()),
    )


def is_tracer(x) -> bool:
    import jax

    return isinstance(x, jax.core.Tracer)


def min_max(x, axes):
    """``(min(x), max(x))`` over ``axes`` (kept as size-1 axes) as one variadic reduce.

    One pass over ``x``: XLA:CPU runs ``min`` and ``max`` as two reductions.
    NaN propagates as in ``jnp.min`` / ``jnp.max`` (XLA's minimum and maximum).
    """
    import jax.numpy as jnp
    from jax import lax

    axes = tuple(axes)
    init = (jnp.asarray(jnp.inf, x.dtype), jnp.asarray(-jnp.inf, x.dtype))
    lo, hi = lax.reduce((x, x), init,
                        lambda a, b: (lax.min(a[0], b[0]), lax.max(a[1], b[1])), axes)
    keep = tuple(1 if d in axes else n for d, n in enumerate(x.shape))
    return lax.reshape(lo, keep), lax.reshape(hi, keep)


def check_finite(x, what: str = "x") -> None:
    """``checkify.check`` that every element of ``x`` is finite (use under checkify)."""
    import jax.numpy as jnp
    from jax.experimental import checkify

    checkify.check(
        jnp.all(jnp.isfinite(x)),
        f"{what} holds NaN or infinite values; quantization needs finite input",
    )


class _RegisteringLoader(importlib.abc.Loader):
    """Wraps JAX's own loader; registers arrayquant's pytrees once ``jax`` has loaded."""

    def __init__(self, loader, finder):
        self._loader = loader
        self._finder = finder

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        if self._finder in sys.meta_path:
            sys.meta_path.remove(self._finder)
        register_pytrees()


class _AfterJaxImport(importlib.abc.MetaPathFinder):
    """Finds ``jax`` through the other finders and wraps its loader.

    It stays on ``sys.meta_path`` until JAX has really been loaded: a mere probe
    such as ``importlib.util.find_spec("jax")`` must not use it up.
    """

    def __init__(self):
        self._busy = False

    def find_spec(self, fullname, path, target=None):
        if fullname != "jax" or self._busy:
            return None
        self._busy = True  # the find_spec below asks the finders again, us included
        try:
            spec = importlib.util.find_spec("jax")
        finally:
            self._busy = False
        if spec is None or spec.loader is None:
            return None
        spec.loader = _RegisteringLoader(spec.loader, self)
        return spec


def install_hook() -> None:
    """Register now if JAX is already imported, else right after it is."""
    if "jax" in sys.modules:
        register_pytrees()
    elif not any(isinstance(f, _AfterJaxImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterJaxImport())


def fori_loop(start: int, stop: int, body, carry, tables=()):
    """``carry = body(i, [t[i] for t in tables], carry)`` as one ``lax.fori_loop``.

    The body is traced and compiled once. Each step's rows of ``tables`` come in
    through the loop's carry (read one step ahead), so XLA materializes them:
    indexed inside the body, the dynamic slice was fused into every element of
    the loops that use the rows (5x slower on XLA:CPU for MSESearch).
    """
    from jax import lax

    def rows(i):
        return [lax.dynamic_index_in_dim(t, i, 0, keepdims=False) for t in tables]

    def step(i, c):
        row, c = c
        return rows(lax.min(i + 1, stop - 1)), body(i, row, c)

    return lax.fori_loop(start, stop, step, (rows(start), carry))[1]
