"""Calibration methods on the MiniLM demo: mean cosine to the float embeddings, and time.

    PYTHONPATH=. python benchmarks/calibration_minilm.py

Quantizes the encoder's linear weights (the demo's rules) with each method at
int4 g128 and int2 g32 (asymmetric), on NumPy, and embeds the demo sentences.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import arrayquant as aq
from arrayquant.apps import demo
from arrayquant.apps.models import minilm

METHODS = {"RTN (MinMax)": aq.MinMax(), "Percentile(99.9)": aq.Percentile(),
           "Percentile(99)": aq.Percentile(99.0), "MSESearch()": aq.MSESearch(),
           "HQQ()": aq.HQQ()}
SETTINGS = {"int4 g128 asym": {"dtype": "int4", "group_size": 128},
            "int2 g32 asym": {"dtype": "int2", "group_size": 32}}


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()
    params = minilm.load_params()
    tokens = minilm.tokenize(minilm.DEMO_SENTENCES)
    ref = minilm.encode(params, tokens, linear=aq.linear)
    print("| setting | method | mean cos | min cos | quantize time |")
    print("|---|---|---|---|---|")
    for sname, quant in SETTINGS.items():
        for mname, m in METHODS.items():
            t0 = time.perf_counter()
            q = aq.quantize_tree(params, demo.weight_rules(**quant, method=m))
            dt = time.perf_counter() - t0
            emb = minilm.encode(q, tokens, linear=aq.linear)
            a, b = np.asarray(emb, np.float64), np.asarray(ref, np.float64)
            cos = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
            print(f"| {sname} | {mname} | {cos.mean():.4f} | {cos.min():.4f} | {dt:.1f} s |",
                  flush=True)


if __name__ == "__main__":
    main()
