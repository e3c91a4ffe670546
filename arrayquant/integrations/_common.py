"""What the framework integrations share: rule decisions, checks, fake quantization.

Framework-free (JAX is imported inside the one function that traces), so that
each integration module holds only its library's module classes and walk.
"""

from __future__ import annotations

from arrayquant.affine.methods import is_data_aware
from arrayquant.qtypes import as_qtype
from arrayquant.trees import Rule, as_rules, quantize_leaf, select_rule

__all__ = ["Matcher", "check_act", "check_layer", "fake_activations", "fake_weight",
           "join_path", "quantize_weight"]


def join_path(parts, leaf: str) -> str:
    """``"layers/0/weight"``: a module's path parts and its weight's name, as
    :func:`arrayquant.tree_paths` names the weight leaf."""
    return "/".join([*(str(p) for p in parts), leaf])


def check_act(act_dtype, act_symmetric):
    """``act_dtype`` as a qtype name (or None), checked eagerly; TypeError / ValueError."""
    if not isinstance(act_symmetric, bool):
        raise TypeError(f"act_symmetric must be True or False; got {act_symmetric!r}")
    if act_dtype is None:
        return None
    qt = as_qtype(act_dtype)
    if qt.bits > 8:
        raise ValueError(f"act_dtype={act_dtype!r}: integer products take activations of at "
                         "most 8 bits, e.g. 'int8'")
    if act_symmetric and not qt.signed:
        raise ValueError(f"act_dtype={qt.name} is unsigned: pass act_symmetric=False, or a "
                         "signed type such as 'int8'")
    return qt.name


class Matcher:
    """Decides each linear layer's rule by its weight path and remembers what it saw.

    ``decide`` returns the first matching rule (``select_rule``), or None.
    ``finish`` raises a ValueError when the model had no such layer, or when
    no rule matched any of them (a typo in a pattern would otherwise return
    the float model unchanged).
    """

    def __init__(self, rules, layer: str, *, fake: bool = False):
        self.rules = as_rules(rules)
        self.layer = layer
        self.fake = fake
        self.paths: list[str] = []
        self.matched = 0

    def decide(self, path: str, weight) -> Rule | None:
        self.paths.append(path)
        rule = select_rule(self.rules, path, weight.shape, weight.dtype)
        if rule is None:
            return None
        self.matched += 1
        if rule.dtype is None:
            return None
        if len(weight.shape) != 2:
            raise ValueError(f"{path}: a stacked linear layer (weight of shape "
                             f"{tuple(weight.shape)}) is not supported; quantize 2-D weights")
        if rule.batch_axes:
            raise ValueError(f"{path}: {rule!r} has batch_axes={rule.batch_axes}, but a linear "
                             "layer's weight is one 2-D matrix; use batch_axes=0")
        if self.fake and is_data_aware(rule.method):
            raise ValueError(f"{path}: fake quantization takes a data-free calibration method "
                             f"(MinMax, MSE, ...), not the data-aware {rule.method!r}")
        return rule

    def finish(self, done: int = 0) -> None:
        if not self.paths:
            extra = (f" ({done} layer(s) are quantized already)" if done else "")
            raise ValueError(f"the model has no {self.layer} layer{extra}; nothing to quantize")
        if not self.matched:
            shown = ", ".join(repr(p) for p in self.paths[:20])
            more = f" and {len(self.paths) - 20} more" if len(self.paths) > 20 else ""
            raise ValueError(
                f"no rule matched any {self.layer}: the rules {list(self.rules)} against "
                f"their weight paths {shown}{more}. Rules match these paths with re.search "
                "(and need ndim >= min_ndim, size >= min_size)")


def quantize_weight(rule: Rule, path: str, weight):
    """``rule.quantize(weight)``, errors naming ``path``."""
    return quantize_leaf(rule, path, weight)


def fake_weight(w, rule: Rule):
    """``aq.fake_quantize(w, ...)`` with ``rule``'s settings: ``dequantize(rule.quantize(w))``
    bit for bit, with the clipped straight-through gradient."""
    from arrayquant import fake_quantize

    return fake_quantize(w, rule.dtype, rule.symmetric, rule.axis, rule.group_size,
                         rule.group_axis, scale_dtype=rule.scale_dtype, method=rule.method)


def fake_activations(x, act_dtype: str, act_symmetric: bool):
    """``x`` fake-quantized per token: one scale per index of the leading axes (the whole
    vector when ``x`` is 1-D), as :func:`arrayquant.quantize_activations` quantizes it for
    the integer product of W8A8."""
    from arrayquant import fake_quantize

    axis = tuple(range(x.ndim - 1)) if x.ndim > 1 else None
    return fake_quantize(x, act_dtype, act_symmetric, axis)


def check_layer(path: str, layer, x_shape, dtype) -> None:
    """Trace ``layer`` on an input of ``x_shape`` (no compute) so that a weight the
    product refuses (e.g. a granularity W8A8 cannot use) fails now, naming ``path``."""
    import jax

    try:
        # A fresh function: jit caches on it, and comparing modules would compare tracers.
        jax.eval_shape(lambda x: layer(x), jax.ShapeDtypeStruct(tuple(x_shape), dtype))
    except (ValueError, TypeError) as e:
        if type(e) not in (ValueError, TypeError):  # JAX's own errors take other arguments
            raise
        raise type(e)(f"{path}: the quantized layer cannot run: {e}") from e
