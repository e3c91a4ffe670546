"""AWQ, bias correction and SmoothQuant on MiniLM: mean cosine to the float embeddings.

    PYTHONPATH=. python benchmarks/awq_minilm.py [--quick]

Calibrates on the package's 64 calibration sentences (or their first 8), never on
the evaluation ones: records the statistics of the 36 encoder linear layers' inputs
(minilm_calibration.collect_stats, padding tokens dropped), quantizes the linear
weights with each method through aq.quantize_tree on NumPy, and embeds
minilm.DEMO_SENTENCES and the 100 held-out sentences. Times are wall times of one
run on this machine: statistics recording, then quantizing the whole model.
``--quick`` runs a few rows only. (arrayquant has no 3-bit type, so the issue's
int3 g64 row is not measured.)
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import numpy as np

import arrayquant as aq
from arrayquant.apps import demo
from arrayquant.apps.models import minilm
from arrayquant.apps.models.minilm_calibration import collect_stats, load_sentences
from arrayquant.dataaware.awq import AWQ
from arrayquant.dataaware.bias import correct_biases
from arrayquant.dataaware.smoothquant import SmoothQuant

try:  # written concurrently (issue 11); the AWQ + GPTQ rows need it
    from arrayquant.dataaware.gptq import GPTQ
except ImportError:
    GPTQ = None

SETTINGS = {"int4 g128 asym": {"dtype": "int4", "group_size": 128},
            "int2 g32 asym": {"dtype": "int2", "group_size": 32}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    quick = ap.parse_args().quick
    params = minilm.load_params()
    evals = {"demo": minilm.tokenize(minilm.DEMO_SENTENCES),
             "held-out": minilm.tokenize(load_sentences("heldout"))}
    refs = {k: np.asarray(minilm.encode(params, t), np.float64) for k, t in evals.items()}
    calib = list(load_sentences("calibration"))
    assert not set(calib) & set(minilm.DEMO_SENTENCES)

    def score(q, lin=aq.linear):
        out = []
        for k, t in evals.items():
            e = np.asarray(minilm.encode(q, t, linear=lin), np.float64)
            r = refs[k]
            cos = np.sum(e * r, 1) / (np.linalg.norm(e, axis=1) * np.linalg.norm(r, axis=1))
            out += [cos.mean(), cos.min()] if k == "demo" else [cos.mean()]
        return out

    def row(setting, method, q, t_stats, t_quant, lin=aq.linear):
        d_mean, d_min, h_mean = score(q, lin)
        print(f"| {setting} | {method} | {d_mean:.5f} | {d_min:.5f} | {h_mean:.5f} | "
              f"{t_stats:.1f} s | {t_quant:.1f} s |", flush=True)

    def timed(f, *a, **k):
        t = time.perf_counter()
        out = f(*a, **k)
        return out, time.perf_counter() - t

    stats, t_stats = timed(collect_stats, params, calib)
    stats8, t_stats8 = timed(collect_stats, params, calib[:8])
    first = next(iter(stats))
    print(f"calibration: {len(calib)} package sentences, {int(float(stats[first].count))} "
          f"tokens; the first 8: {int(float(stats8[first].count))} tokens")
    print("| setting | method | demo mean cos | demo min cos | held-out mean cos | "
          "stats time | quantize time |")
    print("|---|---|---|---|---|---|---|")

    def tree(quant, method=None, st=None):
        rules = demo.weight_rules(**quant, **({} if method is None else {"method": method}))
        return timed(aq.quantize_tree, params, rules, stats=st)

    settings = {"int4 g128 asym": SETTINGS["int4 g128 asym"]} if quick else SETTINGS
    for sname, quant in settings.items():
        rtn, t_rtn = tree(quant)
        row(sname, "RTN", rtn, 0.0, t_rtn)
        q, tq = tree(quant, AWQ(), stats)
        row(sname, "AWQ (64 sentences)", q, t_stats, tq)
        if sname.startswith("int4"):
            bc, t_bc = timed(correct_biases, params, rtn, stats)
            row(sname, "RTN + bias correction", bc, t_stats, t_rtn + t_bc)
            bc, t_bc = timed(correct_biases, params, q, stats)
            row(sname, "AWQ + bias correction", bc, t_stats, tq + t_bc)
            q8, tq8 = tree(quant, AWQ(), stats8)
            row(sname, "AWQ (8 sentences)", q8, t_stats8, tq8)
            q, tq = tree(quant, AWQ(clip=False), stats)
            row(sname, "AWQ scales only (clip=False)", q, t_stats, tq)
        if GPTQ is None:
            print(f"| {sname} | AWQ + GPTQ | (arrayquant.dataaware.gptq not in this tree) "
                  "| | | | |")
            continue
        q, tq = tree(quant, AWQ(inner=GPTQ()), stats)
        row(sname, "AWQ + GPTQ (64 sentences)", q, t_stats, tq)
        if sname.startswith("int4"):
            q, tq = tree(quant, AWQ(inner=GPTQ()), stats8)
            row(sname, "AWQ + GPTQ (8 sentences)", q, t_stats8, tq)

    w8 = {"dtype": "int8", "symmetric": True, "axis": 0}
    q8, t8 = tree(w8)
    s = "W8A8"
    row(s, "per-token sym (today)", q8, 0.0, t8, partial(aq.linear, act_dtype="int8"))
    asym = partial(aq.linear, act_dtype="int8", act_symmetric=False)
    row(s, "per-token asym", q8, 0.0, t8, asym)
    alphas = (0.5, 0.6) if quick else (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    for alpha in alphas:  # one alpha for the whole model, chosen on the end result
        q, tq = tree(w8, SmoothQuant(alpha=alpha), stats)
        row(s, f"SmoothQuant alpha {alpha}, per-token asym", q, t_stats, tq, asym)
        row(s, f"SmoothQuant alpha {alpha}, per-token sym", q, t_stats, tq,
            partial(aq.linear, act_dtype="int8"))
        for sym in (False, True):
            q, tq = tree(w8, SmoothQuant(alpha=alpha, static=True, act_symmetric=sym), stats)
            row(s, f"SmoothQuant alpha {alpha}, static per-tensor "
                   f"{'sym' if sym else 'asym'}", q, t_stats, tq)


if __name__ == "__main__":
    main()
