"""Calibration data for all-MiniLM-L6-v2, and its activation statistics.

Two sentence sets ship as package data (``arrayquant/apps/models/data``), both
disjoint from :data:`~arrayquant.apps.models.minilm.DEMO_SENTENCES` (the
evaluation sentences, never used to calibrate) and from each other:

- ``"calibration"``: 64 English sentences on many topics, 7 to 42 tokens
  (1,078 tokens in all), to record statistics on;
- ``"heldout"``: 100 more, to check that a calibrated model generalizes.

:func:`collect_stats` runs the model over sentences with a
:class:`~arrayquant.stats.recorder.StatsRecorder` as its linear hook and returns
the statistics of the 36 encoder linear layers, keyed by weight name
(``encoder.layer.0.attention.self.query.weight``, ...), padding tokens dropped.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from arrayquant.apps.models.minilm import encode, tokenize
from arrayquant.stats.layer import LayerStats
from arrayquant.stats.recorder import collect_stats as collect_with_hook
from arrayquant.stats.recorder import is_jax_tree

__all__ = ["SENTENCE_SETS", "collect_stats", "load_sentences"]

#: The names :func:`load_sentences` accepts.
SENTENCE_SETS = ("calibration", "heldout")

#: Under JAX each batch shape compiles once: sequences are padded (masked) to a
#: multiple of this many tokens, so that batches share a few shapes.
_JAX_PAD_MULTIPLE = 16


def load_sentences(name: str) -> tuple[str, ...]:
    """The sentences of the package data set ``name`` (``"calibration"`` or ``"heldout"``).

    Raises:
        ValueError: an unknown name.

    Example:
        >>> len(load_sentences("calibration")), len(load_sentences("heldout"))
        (64, 100)
    """
    if name not in SENTENCE_SETS:
        raise ValueError(f"unknown sentence set {name!r}; expected one of {SENTENCE_SETS}")
    path = importlib.resources.files("arrayquant.apps.models") / "data" / f"{name}_sentences.txt"
    lines = path.read_text(encoding="utf-8").splitlines()
    return tuple(line.strip() for line in lines if line.strip())


def _pad(tokens: dict[str, np.ndarray], multiple: int) -> dict[str, np.ndarray]:
    seq = tokens["input_ids"].shape[1]
    extra = -seq % multiple
    if not extra:
        return tokens
    # Padding tokens (id 0, mask 0) are invisible to attention and dropped from the stats.
    return {k: np.pad(v, ((0, 0), (0, extra))) for k, v in tokens.items()}


def _forward(params, tokens, linear):
    return encode(params, tokens, linear=linear)


def _attention_mask(tokens):
    return tokens["attention_mask"]


def collect_stats(params, sentences: Sequence[str], *, batch_size: int = 16,
                  gram: bool = True, observer=None,
                  linear: Callable[..., Any] | None = None) -> dict[str, LayerStats]:
    """Activation statistics of MiniLM's 36 encoder linear layers over ``sentences``.

    The sentences are tokenized ``batch_size`` at a time (in order) and run through
    :func:`~arrayquant.apps.models.minilm.encode` with the recorder's hook; the
    attention mask is the row mask, so padding tokens count in no statistic. With
    JAX parameters each batch is one jitted call (batches padded to a multiple of 16
    tokens, so that few shapes compile).

    Args:
        params: as :func:`~arrayquant.apps.models.minilm.load_params` returns (NumPy),
            or converted to JAX arrays; quantized leaves are fine when ``linear``
            handles them.
        sentences: the calibration sentences (e.g. ``load_sentences("calibration")``).
        batch_size: sentences per batch (default 16).
        gram, observer, linear: as for :class:`arrayquant.stats.recorder.StatsRecorder`.

    Returns:
        ``{weight name: LayerStats}`` for the 36 linear weights, in call order.

    Raises:
        ValueError: no sentences; ``batch_size`` not a positive int.
    """
    if isinstance(sentences, str):
        sentences = [sentences]
    sentences = list(sentences)
    if not sentences:
        raise ValueError("collect_stats needs at least one sentence")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: expected a positive int")
    multiple = _JAX_PAD_MULTIPLE if is_jax_tree(params) else 1
    batches = (_pad(tokenize(sentences[i:i + batch_size]), multiple)
               for i in range(0, len(sentences), batch_size))
    return collect_with_hook(_forward, params, batches, row_mask=_attention_mask, gram=gram,
                             observer=observer, linear=linear)
