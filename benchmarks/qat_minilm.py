"""Quantization-aware training of MiniLM by distillation, then exact export.

    PYTHONPATH=. python benchmarks/qat_minilm.py --bits 4 [--lsq]    # int4 g128 (~6 min)
    PYTHONPATH=. python benchmarks/qat_minilm.py --bits 3 [--lsq]    # int3 g128, simulated
    PYTHONPATH=. python benchmarks/qat_minilm.py --quick             # CI smoke run (< 60 s)

The student is all-MiniLM-L6-v2 whose 36 encoder linear weights go through
``aq.fake_quantize(w, dtype, group_size=128)`` in the linear hook (asymmetric, groups of
128 input features: the demo's "W4A16 int4 g128" setting); the teacher is the float model.
The loss distils the teacher's sentence embeddings (``1 - cosine``) and, with
``--loss both``, the inputs of every linear layer (token hidden states, relative squared
error over the non-padding tokens). optax's adam updates the float weights (``--train
all``: biases and LayerNorms too, which stay float in the exported model), with a cosine
learning-rate decay. ``--lsq`` also learns the scales and zero points (LSQ+, through
``aq.fake_quantize_with``) from their min/max values.

Training data: the package's 64 calibration sentences only (never the 20 evaluation
sentences, ``minilm.DEMO_SENTENCES``, nor the 100 held-out ones). 64 sentences (1,078
tokens) are few, so with ``--augment mix`` (default) each batch row is, with equal
chance, a whole sentence, a random crop of one, or two sentences joined, and 10% of
the word tokens are replaced by random vocabulary words.

Reported: mean cosine of the embeddings to the float ones on the evaluation and held-out
sentences, at step 0 (round to nearest: RTN) and after training, and the wall time.
Export check (int4): ``aq.quantize_tree`` of the trained weights with the same settings;
the model run with ``x @ aq.dequantize(wq).T + b`` must equal the fake-quantized forward
on the trained float weights bit for bit (NumPy, and under ``jax.jit``), and the model
run with the real quantized products ``aq.linear`` is scored too. arrayquant has no 3-bit
storage type, so int3 is simulated (``aq.QType(3, True)``) and cannot be exported.

Measured (2-core CPU, 1000 steps of 16 x 32 tokens, ~6 min each), mean cosine on the
evaluation / held-out sentences: int4 RTN 0.96302 / 0.96283 -> QAT 0.98894 / 0.98941,
with LSQ 0.99029 / 0.99120 (best post-training, AWQ+GPTQ: 0.98725); int3 RTN
0.84092 / 0.85429 -> QAT 0.95826 / 0.96007, with LSQ 0.96437 / 0.96721.
"""

from __future__ import annotations

import argparse
import functools
import time

import numpy as np

import arrayquant as aq
from arrayquant.apps import demo
from arrayquant.apps.models import minilm
from arrayquant.apps.models.minilm_calibration import load_sentences
from arrayquant.trees import format_bytes

GROUP = 128
WORDS = (1996, 30522)  # BERT uncased ids of whole words (below: unused, characters, marks)


def qtype(bits: int):
    return "int4" if bits == 4 else aq.QType(bits, True)


def linear_names(params) -> list[str]:
    rule = aq.Rule(include=demo.LINEAR_WEIGHTS)
    return [n for n in params if rule.matches(n, params[n].shape, params[n].dtype)]


# ------------------------------------------------------------------------------ data


class Batches:
    """Fixed-shape token batches ``(batch, length)`` drawn from the training sentences."""

    def __init__(self, sentences, batch: int, length: int, augment: str, seed: int):
        ids = minilm.tokenize(sentences)
        self.words = [row[1:int(m.sum()) - 1] for row, m in zip(ids["input_ids"],
                                                                 ids["attention_mask"])]
        self.cls, self.sep = int(ids["input_ids"][0, 0]), int(
            ids["input_ids"][0, int(ids["attention_mask"][0].sum()) - 1])
        self.batch, self.length, self.augment = batch, length, augment
        self.rng = np.random.default_rng(seed)

    def _row(self) -> np.ndarray:
        rng, words = self.rng, self.words
        w = words[rng.integers(len(words))]
        kind = rng.integers(3) if self.augment == "mix" else 0
        if kind == 1:  # a random crop of at least 3 words
            n = rng.integers(min(3, len(w)), len(w) + 1)
            start = rng.integers(len(w) - n + 1)
            w = w[start:start + n]
        elif kind == 2:  # two sentences joined
            w = np.concatenate([w, words[rng.integers(len(words))]])
        w = w[:self.length - 2]
        if self.augment == "mix":
            swap = rng.random(len(w)) < 0.1
            w = np.where(swap, rng.integers(*WORDS, size=len(w)), w)
        return np.concatenate([[self.cls], w, [self.sep]])

    def __next__(self) -> dict[str, np.ndarray]:
        ids = np.zeros((self.batch, self.length), np.int64)
        mask = np.zeros_like(ids)
        for i in range(self.batch):
            r = self._row()
            ids[i, :len(r)], mask[i, :len(r)] = r, 1
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


# ------------------------------------------------------------------------------ model


def forward(params, tokens, quant=None, record=False):
    """Embeddings (and every linear layer's input, if ``record``); ``quant(name, w)`` gives
    the weight each linear layer uses (None: float). NumPy or JAX, as ``params``."""
    names = {id(params[n]): n for n in linear_names(params)}
    inputs = []

    def hook(x, w, b):
        if record:
            inputs.append(x)
        if quant is not None:
            w = quant(names[id(w)], w)
        return x @ w.T + b

    return minilm.encode(params, tokens, linear=hook), inputs


def make_quant(qt, lsq):
    """The student's weight: min/max fake quantization, or LSQ+ with learned (s, z)."""
    if lsq is None:
        return lambda name, w: aq.fake_quantize(w, qt, group_size=GROUP)
    return lambda name, w: aq.fake_quantize_with(w, lsq[name][0], lsq[name][1], qt,
                                                 group_size=GROUP)


def distill_loss(train, frozen, teacher, tokens, qt, loss_kind):
    """``1 - cos`` of the embeddings, plus (``both``) the relative squared error of every
    linear layer's input over the real tokens. ``train`` = (params, lsq or None)."""
    import jax.numpy as jnp

    params, lsq = train
    student = {**frozen, **params}
    rec = loss_kind == "both"
    e_s, h_s = forward(student, tokens, make_quant(qt, lsq), rec)
    e_t, h_t = teacher
    loss = jnp.mean(1.0 - jnp.sum(e_s * e_t, axis=-1))  # both rows have unit norm
    if rec:
        m = jnp.reshape(tokens["attention_mask"], (-1, 1)).astype(jnp.float32)
        rel = [jnp.sum(m * (a - b) ** 2) / jnp.sum(m * b * b) for a, b in zip(h_s, h_t)]
        loss = loss + jnp.mean(jnp.stack(rel))
    return loss


def make_step(opt, qt, loss_kind):
    """One jitted optimizer step; the teacher runs inside it on the same batch."""
    import jax
    import optax

    def step(train, opt_state, float_params, tokens):
        teacher = forward(float_params, tokens, None, loss_kind == "both")
        teacher = jax.lax.stop_gradient(teacher)
        frozen = {k: v for k, v in float_params.items() if k not in train[0]}
        loss, grads = jax.value_and_grad(distill_loss)(train, frozen, teacher, tokens, qt,
                                                       loss_kind)
        updates, opt_state = opt.update(grads, opt_state, train)
        return optax.apply_updates(train, updates), opt_state, loss

    return jax.jit(step)


# ------------------------------------------------------------------------------ scoring


def cosines(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def make_eval(evals, refs, qt):
    import jax

    @jax.jit
    def emb(params, lsq, tokens):
        return forward(params, tokens, make_quant(qt, lsq))[0]

    def score(params, lsq):
        return {k: float(cosines(emb(params, lsq, t), refs[k]).mean()) for k, t in
                evals.items()}

    return score


def export_check(params_np, lsq, qt, evals, refs) -> bool:
    """Whether the exported QArrays reproduce the fake-quantized forward bit for bit."""
    import jax
    import jax.numpy as jnp

    names = linear_names(params_np)
    t0 = time.perf_counter()
    if lsq is None:
        q = aq.quantize_tree(params_np, demo.weight_rules(dtype=qt, group_size=GROUP))
    else:
        q = dict(params_np)
        for n in names:
            s, z = (np.asarray(a) for a in lsq[n])
            q[n] = aq.quantize_learned(params_np[n], s, z, qt, group_size=GROUP)
    print(f"export: {len(names)} weights to {type(q[names[0]]).__name__} "
          f"({q[names[0]].qtype}) in {time.perf_counter() - t0:.2f} s; linear weights "
          f"{format_bytes(sum(demo.storage_nbytes(q[n]) for n in names))}")
    def exported(x, w, b):
        return x @ aq.dequantize(w).T + b

    def fake(params, lsq, tokens):
        return forward(params, tokens, make_quant(qt, lsq))[0]

    pj, lj, qj = jax.tree.map(jnp.asarray, (params_np, lsq, q))
    fake_jit = jax.jit(fake)
    exported_jit = jax.jit(functools.partial(minilm.encode, linear=exported))
    real_jit = jax.jit(functools.partial(minilm.encode, linear=aq.linear))
    exact = True
    for k, tokens in evals.items():
        a = fake(params_np, lsq, tokens)
        b = minilm.encode(q, tokens, linear=exported)
        print(f"  {k}: NumPy fake-quantized forward == exported forward bit for bit: "
              f"{np.array_equal(a, b)}")
        aj, bj = np.asarray(fake_jit(pj, lj, tokens)), np.asarray(exported_jit(qj, tokens))
        exact = exact and np.array_equal(a, b) and np.array_equal(aj, bj)
        print(f"  {k}: jax.jit fake-quantized forward == exported forward bit for bit: "
              f"{np.array_equal(aj, bj)}")
        real = np.asarray(real_jit(qj, tokens))
        print(f"  {k}: exported model with aq.linear: mean cos {cosines(real, refs[k]).mean():.5f}"
              f" (fake-quantized {cosines(a, refs[k]).mean():.5f}); max |aq.linear - fake| "
              f"{np.max(np.abs(real - a)):.2e}")
    return exact


# ------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bits", type=int, choices=(4, 3), default=4)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=None,
                    help="peak learning rate (default 5e-5 for int4, 1e-4 for int3)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=32, help="tokens per row (padded)")
    ap.add_argument("--loss", choices=("cos", "both"), default="both")
    ap.add_argument("--train", choices=("weights", "all"), default="weights")
    ap.add_argument("--augment", choices=("none", "mix"), default="mix")
    ap.add_argument("--lsq", action="store_true", help="also learn scales and zero points")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a few steps on 4 sentences")
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp
    import optax

    t_start = time.perf_counter()
    if args.lr is None:
        args.lr = 5e-5 if args.bits == 4 else 1e-4
    qt = qtype(args.bits)
    sentences = list(load_sentences("calibration"))
    assert not set(sentences) & (set(minilm.DEMO_SENTENCES) | set(load_sentences("heldout")))
    if args.quick:
        sentences, args.steps, args.batch = sentences[:4], 4, 4
    params_np = minilm.load_params()
    evals = {"demo": minilm.tokenize(minilm.DEMO_SENTENCES),
             "held-out": minilm.tokenize(load_sentences("heldout"))}
    if args.quick:
        evals = {"demo": evals["demo"]}
    refs = {k: np.asarray(minilm.encode(params_np, t), np.float64) for k, t in evals.items()}
    float_params = jax.tree.map(jnp.asarray, params_np)
    names = linear_names(params_np)
    keep_float = ("embeddings", "pooler")
    trainable = names if args.train == "weights" else [
        n for n in params_np if not n.startswith(keep_float)]
    train = ({n: float_params[n] for n in trainable}, None)
    if args.lsq:
        train = (train[0], {n: aq.lsq_init(float_params[n], qt, group_size=GROUP)
                            for n in names})
    schedule = optax.cosine_decay_schedule(args.lr, max(args.steps, 1))
    opt = optax.adam(schedule)
    opt_state = opt.init(train)
    step = make_step(opt, qt, args.loss)
    score = make_eval(evals, refs, qt)
    batches = Batches(sentences, args.batch, args.length, args.augment, args.seed)
    print(f"int{args.bits} g{GROUP} asym, {len(sentences)} training sentences, steps "
          f"{args.steps}, lr {args.lr} (cosine decay), batch {args.batch}x{args.length}, "
          f"loss {args.loss}, train {args.train} ({len(trainable)} arrays), augment "
          f"{args.augment}, lsq {args.lsq}", flush=True)
    before = score(float_params, train[1])
    print("step 0 (RTN): " + ", ".join(f"{k} mean cos {v:.5f}" for k, v in before.items()),
          flush=True)
    t0 = time.perf_counter()
    losses = []
    for i in range(args.steps):
        train, opt_state, loss = step(train, opt_state, float_params, next(batches))
        losses.append(float(loss))
        if i == 0:
            t_compile = time.perf_counter() - t0
        if (i + 1) % max(1, args.steps // 5) == 0 or i + 1 == args.steps:
            print(f"step {i + 1}: loss {np.mean(losses[-20:]):.5f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    t_train = time.perf_counter() - t0
    trained = {**float_params, **train[0]}
    after = score(trained, train[1])
    print(f"after {args.steps} steps: " + ", ".join(
        f"{k} mean cos {v:.5f}" for k, v in after.items()))
    print(f"training {t_train:.0f} s ({t_compile:.0f} s of it the first step, compile "
          f"included), {(t_train - t_compile) / max(args.steps - 1, 1):.2f} s/step")
    trained_np = {k: np.asarray(v) for k, v in trained.items()}
    if args.bits == 3:
        print("export: not possible, arrayquant has no 3-bit storage type (int3 is "
              "simulated by fake_quantize with aq.QType(3, True))")
    else:
        lsq_np = None if train[1] is None else jax.tree.map(np.asarray, train[1])
        exact = export_check(trained_np, lsq_np, qt, evals, refs)
    print(f"wall time {time.perf_counter() - t_start:.0f} s")
    if args.bits == 4 and not exact:
        raise SystemExit("export check failed: the exported model differs from the "
                         "fake-quantized one")


if __name__ == "__main__":
    main()
