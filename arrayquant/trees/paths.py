"""Walking parameter trees: dict / list / tuple nests, and any JAX pytree when JAX is loaded.

Paths are the keys joined by ``/`` (list and tuple items by their index).
"""

from __future__ import annotations

import collections
import sys
from collections.abc import Callable
from typing import Any

from arrayquant.linear_weight import LinearWeight
from arrayquant.qarray import QArray

# --------------------------------------------------------------------------- walking trees


def is_quantized(x) -> bool:
    """A :class:`QArray` or a :class:`LinearWeight`: a quantized leaf."""
    return isinstance(x, (QArray, LinearWeight))


def is_array(x) -> bool:
    return not is_quantized(x) and hasattr(x, "shape") and hasattr(x, "dtype")


def is_leaf(x) -> bool:
    return is_quantized(x) or is_array(x)


def jax_tree_util():
    """``jax.tree_util`` if the user has imported JAX, else ``None`` (never imports JAX)."""
    if "jax" not in sys.modules:
        return None
    import jax

    return jax.tree_util


def _jax_key_str(key) -> str:
    for attr in ("key", "idx", "name"):  # DictKey / FlattenedIndexKey, SequenceKey, GetAttrKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _join(parts: tuple[str, ...]) -> str:
    return "/".join(parts)


def map_leaves(fn: Callable[[str, Any], Any], node, prefix: tuple[str, ...]):
    """Rebuild ``node`` with ``fn(path, leaf)`` applied to every leaf (see the module doc)."""
    if is_leaf(node):
        return fn(_join(prefix), node)
    t = type(node)
    if t is dict or t is collections.OrderedDict:
        return t((k, map_leaves(fn, v, (*prefix, str(k)))) for k, v in node.items())
    if t is list:
        return [map_leaves(fn, v, (*prefix, str(i))) for i, v in enumerate(node)]
    if t is tuple:
        return tuple(map_leaves(fn, v, (*prefix, str(i))) for i, v in enumerate(node))
    if isinstance(node, tuple) and hasattr(node, "_fields"):  # a named tuple
        return t(*(map_leaves(fn, getattr(node, f), (*prefix, f)) for f in node._fields))
    if node is None:
        return None
    jtu = jax_tree_util()
    if jtu is not None:
        leaves, treedef = jtu.tree_flatten_with_path(node, is_leaf=is_leaf)
        if not jtu.treedef_is_leaf(treedef):
            new = [
                map_leaves(fn, leaf, (*prefix, *(_jax_key_str(k) for k in kp)))
                for kp, leaf in leaves
            ]
            return jtu.tree_unflatten(treedef, new)
    return fn(_join(prefix), node)


def flatten_tree(tree) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []

    def visit(path, leaf):
        out.append((path, leaf))
        return leaf

    map_leaves(visit, tree, ())
    return out


def tree_paths(tree) -> list[str]:
    """The path of every array (or QArray) leaf of ``tree``, in traversal order.

    Example:
        >>> import numpy as np, arrayquant as aq
        >>> aq.tree_paths({"a": {"w": np.zeros(2)}, "b": [np.zeros(1), "not an array"]})
        ['a/w', 'b/0']
    """
    return [p for p, leaf in flatten_tree(tree) if is_leaf(leaf)]
