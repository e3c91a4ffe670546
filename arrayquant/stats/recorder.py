"""Recording activation statistics through a model's linear hook.

Models written with a pluggable linear layer, ``linear(x, w, b)`` computing
``x @ w.T + b`` (like :func:`arrayquant.apps.models.minilm.encode`), are
calibrated by passing :meth:`StatsRecorder.linear` as that hook: every call
records the statistics of ``x`` (:func:`arrayquant.stats.layer.record`) under the
tree path of ``w`` in the parameter tree, then computes the product. The
statistics are keyed by the same paths as :func:`arrayquant.tree_paths` and
:class:`arrayquant.Rule`, so they feed the data-aware weight methods directly.

:func:`collect_stats` runs a forward function over calibration batches and merges
the statistics; on JAX each batch is one jitted call.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from arrayquant._backend import namespace
from arrayquant.linear_weight import LinearWeight, transform_input
from arrayquant.products import linear as aq_linear
from arrayquant.stats.layer import LayerStats, merge, record
from arrayquant.trees.paths import flatten_tree, is_leaf

__all__ = ["StatsRecorder", "collect_stats", "merge_stats"]


class StatsRecorder:
    """A linear hook that records each layer's input statistics by the weight's tree path.

    ``params`` is the tree the model reads its weights from. Every leaf (arrays,
    :class:`arrayquant.QArray` and :class:`arrayquant.LinearWeight` count as
    leaves) is known by its path; :meth:`linear` finds ``w`` among them by
    *object identity*, so the model must pass its parameters to the hook as they
    are in ``params`` (not a transposed or converted copy).

    The recorder itself is callable as the hook (``rec(x, w, b)`` is
    ``rec.linear(x, w, b)``). An input passed to several layers in a row (the
    same array object) is recorded once, so it must not be modified in place
    between those calls (NumPy).

    Tied weights (one array object at several paths) record under the first
    path in traversal order (:func:`arrayquant.tree_paths`). Under ``jax.jit``
    JAX hands every leaf in as its own tracer, so there the statistics go to the
    path the model reads the weight from.

    Args:
        params: the parameter tree (dicts, lists, tuples, named tuples; any JAX
            pytree once JAX is imported).
        row_mask: ``None`` or one entry per row of every recorded input (e.g. the
            attention mask of the batch, for inputs of shape ``(batch * seq, in)``):
            rows where it is 0, padding tokens, are left out of every statistic.
        gram: record ``X^T X`` per layer (GPTQ and AWQ need it; ``k * k`` numbers
            per layer).
        observer: a static activation-range observer
            (:mod:`arrayquant.stats.observers`) or None.
        linear: the product the hook computes after recording, ``linear(x, w, b)``;
            default :func:`arrayquant.linear`.
        initial: ``{path: LayerStats}`` of earlier batches, which this recording
            merges into (as :func:`merge_stats` would, layer by layer).

    Example (under ``jax.jit``: create the recorder inside the traced function,
    from the traced parameters, and return its statistics, a dict of
    :class:`~arrayquant.stats.layer.LayerStats` pytrees)::

        >>> import jax, jax.numpy as jnp
        >>> params = {"l1": {"w": jnp.ones((8, 4))}, "l2": {"w": jnp.ones((2, 8))}}
        >>> def forward(params, x, linear):
        ...     return linear(linear(x, params["l1"]["w"]), params["l2"]["w"])
        >>> @jax.jit
        ... def calibrate(params, x):
        ...     rec = StatsRecorder(params)
        ...     forward(params, x, rec.linear)
        ...     return rec.stats
        >>> stats = calibrate(params, jnp.ones((3, 4)))
        >>> sorted(stats), float(stats["l1/w"].count), stats["l2/w"].gram.shape
        (['l1/w', 'l2/w'], 3.0, (8, 8))
    """

    def __init__(self, params, *, row_mask=None, gram: bool = True, observer=None,
                 linear: Callable[..., Any] | None = None,
                 initial: Mapping[str, LayerStats] | None = None):
        if not isinstance(gram, bool):
            raise TypeError(f"StatsRecorder gram={gram!r}: expected True or False")
        if linear is not None and not callable(linear):
            raise TypeError(f"StatsRecorder linear={linear!r}: expected a callable "
                            "linear(x, w, b) or None")
        for name in ("batch_range", "combine"):
            if observer is not None and not callable(getattr(observer, name, None)):
                raise TypeError(f"StatsRecorder observer={observer!r} has no {name}(); "
                                "expected an observer of arrayquant.stats.observers or None")
        leaves = [(path, leaf) for path, leaf in flatten_tree(params) if is_leaf(leaf)]
        # The leaves are kept referenced, so that no id is reused while the recorder lives.
        self._leaves = [leaf for _, leaf in leaves]
        self._paths: dict[int, str] = {}
        for path, leaf in leaves:
            self._paths.setdefault(id(leaf), path)
        self.row_mask = row_mask
        self.gram = gram
        self.observer = observer
        self._inner = aq_linear if linear is None else linear
        self._stats: dict[str, LayerStats] = {} if initial is None else dict(initial)
        self._last = None  # (x, its statistics): the last plain input, kept referenced

    def path_of(self, w) -> str:
        """The tree path of the weight ``w`` (a leaf of ``params``, by identity).

        Raises:
            ValueError: ``w`` is not a leaf of ``params``.
        """
        path = self._paths.get(id(w))
        if path is None:
            shape = tuple(w.shape) if hasattr(w, "shape") else None
            raise ValueError(
                f"the weight of shape {shape} ({type(w).__name__}) passed to the linear hook is "
                "not a leaf of the recorder's params (leaves are found by identity): pass the "
                "model's parameters to the hook unchanged (not w.T or a converted copy), and "
                "under jax.jit create the StatsRecorder from the traced params")
        return path

    def linear(self, x, w, b=None):
        """Record ``x`` under ``w``'s path, then return ``linear(x, w, b)``.

        For a :class:`arrayquant.LinearWeight` ``w`` the recorded input is what its
        codes see, ``transform_input(x, w)`` (features gathered by ``perm``, times
        ``in_scale``): a second calibration pass over a SmoothQuant model observes
        the smoothed activations, whose range sets the static activation scale.
        Calls for the same weight merge with the earlier ones. An input passed to
        several layers in a row (the same array object, e.g. to query, key and
        value) is recorded once.

        Raises:
            ValueError: ``w`` is not a leaf of ``params``; ``row_mask`` does not have
                one entry per row of ``x``.
        """
        path = self.path_of(w)
        if isinstance(w, LinearWeight):
            stats = record(transform_input(x, w, namespace(x)), self.row_mask, gram=self.gram,
                           observer=self.observer)
        elif self._last is not None and self._last[0] is x:
            stats = self._last[1]  # one input to several layers (query, key, value)
        else:
            stats = record(x, self.row_mask, gram=self.gram, observer=self.observer)
            self._last = (x, stats)
        self._stats[path] = merge(self._stats.get(path), stats)
        return self._inner(x, w, b)

    __call__ = linear

    @property
    def stats(self) -> dict[str, LayerStats]:
        """``{path: LayerStats}`` of every weight the hook has seen (and ``initial``'s)."""
        return dict(self._stats)


def merge_stats(a: Mapping[str, LayerStats] | None,
                b: Mapping[str, LayerStats]) -> dict[str, LayerStats]:
    """Merge two ``{path: LayerStats}`` dicts path by path (``a`` may be None).

    Paths in only one of them are kept as they are; ``a``'s paths come first.
    :func:`arrayquant.stats.layer.merge` combines each common path (``b`` the newer
    recording, which matters only for :class:`~arrayquant.stats.observers.MovingAverageObserver`).

    Raises:
        ValueError: as :func:`~arrayquant.stats.layer.merge` (different feature counts,
            Gram matrices or observers for one path).
    """
    if a is None:
        return dict(b)
    out = dict(a)
    for path, s in b.items():
        try:
            out[path] = merge(out.get(path), s)
        except ValueError as e:
            raise ValueError(f"statistics of {path!r}: {e}") from None
    return out


def is_jax_tree(params) -> bool:
    """True when ``params`` holds a ``jax.Array`` (never imports JAX)."""
    if "jax" not in sys.modules:
        return False
    import jax

    return any(isinstance(leaf, jax.Array) for leaf in jax.tree_util.tree_leaves(params))


def collect_stats(forward: Callable[..., Any], params, batches: Iterable[Any], *,
                  row_mask: Callable[[Any], Any] | None = None, gram: bool = True,
                  observer=None, jit: bool | None = None,
                  linear: Callable[..., Any] | None = None) -> dict[str, LayerStats]:
    """Run ``forward(params, batch, linear)`` over every batch and merge the statistics.

    Each batch runs with a fresh :class:`StatsRecorder` whose hook is passed as
    ``linear``; the statistics are merged in batch order (:func:`merge_stats`).
    Memory: the totals (a ``k * k`` Gram matrix per layer) plus one batch's
    statistics under jit, one layer's without.

    Args:
        forward: ``forward(params, batch, linear)``; its result is ignored.
        params: the parameter tree.
        batches: an iterable of batches (anything ``forward`` takes; under jit a
            pytree of arrays).
        row_mask: ``row_mask(batch)`` -> the batch's per-row mask (see
            :class:`StatsRecorder`) or None; default: every row counts.
        gram, observer, linear: as for :class:`StatsRecorder`.
        jit: run each batch as one ``jax.jit`` call (``forward`` and ``row_mask``
            traced). Default: True when ``params`` holds JAX arrays, else False. A
            new batch shape compiles again, so pad batches to a few shapes (padding
            rows masked) when there are many. The compiled step is cached on
            ``(forward, row_mask, gram, observer, linear)``: pass the same function
            objects (not new lambdas) to reuse it in a later call.

    Returns:
        ``{path: LayerStats}``, accumulated in float64 on NumPy and on JAX with
        ``jax_enable_x64``, else in float32.

    Raises:
        ValueError: no batches; ``jit=True`` without JAX parameters; and as
            :class:`StatsRecorder`.
    """
    use_jax = is_jax_tree(params)
    jit = use_jax if jit is None else jit
    if jit and not use_jax:
        raise ValueError("collect_stats(jit=True) needs JAX parameters; params holds no "
                         "jax.Array (convert them with jax.numpy.asarray, or pass jit=False)")
    if row_mask is not None and not callable(row_mask):
        raise TypeError(f"collect_stats row_mask={row_mask!r}: expected a function of the "
                        "batch (row_mask(batch) -> mask or None) or None")
    total, n = None, 0
    if jit:
        try:
            step = _jitted_step(forward, row_mask, gram, observer, linear)
        except TypeError:  # an unhashable argument: compile for this call only
            step = _jitted_step.__wrapped__(forward, row_mask, gram, observer, linear)
        for batch in batches:
            total, n = merge_stats(total, step(params, batch)), n + 1
    else:
        # Each layer's batch statistics merge into the total as they are recorded, so
        # that at most one layer's batch Gram matrix is held beside the totals.
        for batch in batches:
            mask = None if row_mask is None else row_mask(batch)
            rec = StatsRecorder(params, row_mask=mask, gram=gram, observer=observer,
                                linear=linear, initial=total)
            total = None  # the recorder holds the totals now; replaced layers are freed
            forward(params, batch, rec.linear)
            total, n = rec.stats, n + 1
    if not n:
        raise ValueError("collect_stats got no batches")
    return total


@functools.lru_cache(maxsize=16)
def _jitted_step(forward, row_mask, gram, observer, linear):
    """One batch's statistics as one jitted function, cached so later calls reuse it."""
    import jax

    def step(p, batch):
        mask = None if row_mask is None else row_mask(batch)
        rec = StatsRecorder(p, row_mask=mask, gram=gram, observer=observer, linear=linear)
        forward(p, batch, rec.linear)
        return rec.stats

    return jax.jit(step)
