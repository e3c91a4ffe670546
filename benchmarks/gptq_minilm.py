"""GPTQ on the MiniLM demo: mean cosine to the float embeddings, time and peak memory.

    PYTHONPATH=. python benchmarks/gptq_minilm.py            # the table (one process per row)
    PYTHONPATH=. python benchmarks/gptq_minilm.py --compare  # NumPy against JAX, int4 g128
    PYTHONPATH=. python benchmarks/gptq_minilm.py --quick    # smoke run: NumPy, 3 weights

Calibrates on 64 sentences that are not the evaluation sentences (the package's
``arrayquant/apps/models/data/calibration_sentences.txt`` when it exists, else the
list below), records each encoder linear layer's input statistics with
:func:`arrayquant.stats.record` (padding tokens dropped), quantizes the 36 weights
with :func:`arrayquant.dataaware.gptq.gptq_codes` (int3, which arrayquant does
not store, is simulated that way; RTN too) and embeds ``minilm.DEMO_SENTENCES``
with the dequantized weights. Each row runs in a fresh process, so its time
includes JAX's compilation and its peak memory (max RSS) is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import time

import numpy as np

import arrayquant as aq
from arrayquant.apps.models import minilm
from arrayquant.dataaware.gptq import gptq_codes
from arrayquant.qtypes import QType, as_qtype
from arrayquant.stats import merge, record

CALIBRATION = (
    "The committee will meet on Thursday to review the budget proposal.",
    "Volcanic ash grounded flights across northern Europe for a week.",
    "She learned to play chess from her grandfather when she was six.",
    "The new bridge reduces the commute between the two towns by half.",
    "Researchers sequenced the genome of an ancient wheat variety.",
    "A power outage left thousands of homes without heating overnight.",
    "The museum reopened after a two-year renovation of its east wing.",
    "He forgot his umbrella and arrived at the interview soaking wet.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Quantum computers may one day break widely used encryption schemes.",
    "The orchestra rehearsed the symphony for the opening night.",
    "Farmers are worried about the lack of rain this spring.",
    "The city council approved a plan to plant ten thousand trees.",
    "My neighbour's dog barks every time the mail arrives.",
    "The spacecraft entered orbit around Mars after a seven-month journey.",
    "Inflation rose to its highest level in a decade last month.",
    "The children built a sandcastle before the tide came in.",
    "A software update fixed the battery drain on older phones.",
    "The hikers reached the summit just before sunrise.",
    "Local elections will be held in early November.",
    "The library extended its opening hours during the exam period.",
    "A rare species of orchid was discovered in the rainforest.",
    "The marathon route passes through the historic old town.",
    "Engineers tested the prototype engine in freezing conditions.",
    "The restaurant is known for its handmade pasta and fresh seafood.",
    "He translated the novel from Portuguese into English.",
    "The startup raised fifty million dollars in its latest funding round.",
    "Heavy snow closed the mountain pass for three days.",
    "The teacher asked the students to write an essay about their summer.",
    "Scientists measured a sharp decline in the bee population.",
    "The court ruled that the contract was not legally binding.",
    "She painted the kitchen walls a pale shade of green.",
    "The festival attracts musicians from all over the world.",
    "Traffic was diverted after a lorry overturned on the motorway.",
    "The vaccine trial enrolled more than thirty thousand volunteers.",
    "Our flight was cancelled, so we took the night train instead.",
    "The company announced plans to cut its carbon emissions by 2030.",
    "He repaired the old bicycle with parts from a scrapyard.",
    "The documentary follows a family of elephants across the savanna.",
    "A strong earthquake shook the coastal region early this morning.",
    "The database query timed out because the index was missing.",
    "The bakery on the corner sells fresh bread every morning at seven.",
    "Voters will decide on the referendum next spring.",
    "The garden is full of tomatoes, beans and courgettes this year.",
    "The pilot reported turbulence over the Atlantic.",
    "Students protested against the increase in tuition fees.",
    "The detective found a clue hidden behind the painting.",
    "Solar panels now cover the roof of the school gymnasium.",
    "The team lost the final after a penalty shootout.",
    "Her first novel was shortlisted for a major literary prize.",
    "The river burst its banks after days of continuous rain.",
    "A new study links poor sleep to higher blood pressure.",
    "The old lighthouse has been converted into a small hotel.",
    "He compiled the kernel with debugging symbols enabled.",
    "The price of coffee beans has doubled since last year.",
    "The choir sang carols in the town square on Christmas Eve.",
    "Archaeologists uncovered Roman coins beneath the car park.",
    "The nurse checked the patient's temperature every hour.",
    "A robot vacuum cleaner maps the rooms as it cleans.",
    "The ferry to the island runs twice a day in winter.",
    "The senator gave a long speech on healthcare reform.",
    "Wolves have returned to the forest after a century of absence.",
    "The printer jammed halfway through the report.",
    "They celebrated their anniversary with a picnic by the lake.",
)

SETTINGS = {"int4 g128": ("int4", 128), "int3 g64": ("int3", 64), "int2 g32": ("int2", 32)}
VARIANTS = {"mse, damp 0.1": ("mse", 0.1, False), "minmax, damp 0.01": ("minmax", 0.01, False),
            "mse, damp 0.1, act-order": ("mse", 0.1, True)}
# Parameter searches by name (--one): the GPTQ default and two variants.
PARAMS = {"mse": "mse", "minmax": "minmax", "mse-nozp": aq.MSESearch(search_zero_point=False),
          "mse-grid10": aq.MSESearch(grid=10, search_zero_point=False)}


def calibration_sentences() -> list[str]:
    path = (pathlib.Path(minilm.__file__).parent / "data" / "calibration_sentences.txt")
    if path.is_file():
        lines = [s.strip() for s in path.read_text().splitlines()]
        return [s for s in lines if s and not s.startswith("#")][:8 if QUICK else 64]
    return list(CALIBRATION[:8] if QUICK else CALIBRATION)


QUICK = False  # --quick: only encoder layer 0's query, key and value weights, on 8 sentences


def weight_names(params) -> list[str]:
    prefix = "encoder.layer.0.attention.self." if QUICK else "encoder.layer."
    return sorted(n for n in params if n.startswith(prefix) and n.endswith(".weight")
                  and "LayerNorm" not in n)


def collect(params, tokens, xp) -> dict:
    """Per weight name, the LayerStats of its layer's input (padding tokens dropped).

    Pure, so that JAX can jit it: the hook maps each weight (by object identity) to
    its name and records the layer's input.
    """
    mask = xp.reshape(xp.asarray(tokens["attention_mask"]), (-1,))
    names = {id(params[n]): n for n in weight_names(params)}
    stats: dict = {}

    def hook(x, w, b):
        name = names.get(id(w))
        if name is not None:
            stats[name] = merge(stats.get(name), record(x, mask))
        y = x @ w.T
        return y if b is None else y + b

    minilm.encode(params, tokens, linear=hook, xp=xp)
    return stats


def qtype(name: str):
    """``int3`` is not an arrayquant storage type: GPTQ and RTN codes are simulated."""
    return QType(3, True) if name == "int3" else as_qtype(name)


def rtn(w, qt, group: int):
    s, z = aq.qparams(w, qt, group_size=group)
    return np.asarray(aq.dequantize_with(aq.quantize_with(w, s, z, qt, group_size=group), s, z,
                                         group_size=group), np.float32)


def cosines(params, dequantized: dict, tokens, ref) -> np.ndarray:
    q = dict(params)
    for n, wq in dequantized.items():
        q[n] = np.asarray(wq, np.float32)
    a = np.asarray(minilm.encode(q, tokens), np.float64)
    return np.sum(a * ref, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(ref, axis=1))


def run(backend: str, dtype: str, group: int, pm: str, damp: float, keep=False,
        act_order=False) -> dict:
    params = minilm.load_params()
    if backend == "jax":
        import jax
        import jax.numpy as xp

        dev = {n: xp.asarray(v) for n, v in params.items()}
        sync = jax.block_until_ready
        calibrate = jax.jit(lambda p, t: collect(p, t, xp))
    else:
        import array_api_compat.numpy as xp

        dev, sync = params, (lambda a: a)
        calibrate = lambda p, t: collect(p, t, xp)  # noqa: E731
    t0, c0 = time.perf_counter(), time.process_time()
    stats = calibrate(dev, minilm.tokenize(calibration_sentences()))
    sync([s.gram for s in stats.values()])
    t1 = time.perf_counter()
    qt = qtype(dtype)
    out = {n: gptq_codes(dev[n], stats[n], qt, group_size=group, params=PARAMS[pm], damp=damp,
                         act_order=act_order)
           for n in weight_names(params)}
    sync([q[0] for q in out.values()])
    t2, c2 = time.perf_counter(), time.process_time()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before evaluating
    deq = {n: np.asarray(aq.dequantize_with(c, s, z, group_size=group))
           for n, (c, s, z, _) in out.items()}
    if act_order:  # stored column j is input perm[j]
        deq = {n: d[:, np.argsort(np.asarray(out[n][3]))] for n, d in deq.items()}
    tokens = minilm.tokenize(minilm.DEMO_SENTENCES)
    ref = np.asarray(minilm.encode(params, tokens), np.float64)
    cos = cosines(params, deq, tokens, ref)
    base = {n: rtn(params[n], qt, group) for n in weight_names(params)}
    res = {"cos": float(cos.mean()), "min": float(cos.min()),
           "rtn": float(cosines(params, base, tokens, ref).mean()),
           "calib_s": t1 - t0, "quant_s": t2 - t1, "cpu_s": c2 - c0,
           "load": os.getloadavg()[0],
           "peak_mb": peak}
    if keep:
        res["q"] = {n: np.asarray(q[0]) for n, q in out.items()}
        res["stats"] = {n: np.asarray(s.gram, np.float64) for n, s in stats.items()}
        res["deq"] = {n: np.asarray(d, np.float64) for n, d in deq.items()}
    return res


def compare() -> None:
    """NumPy (float64 Hessian) against JAX (float32): identical codes and layer losses."""
    a = run("numpy", "int4", 128, "mse", 0.1, keep=True)
    b = run("jax", "int4", 128, "mse", 0.1, keep=True)
    params = minilm.load_params()
    same = sum(int(np.sum(a["q"][n] == b["q"][n])) for n in a["q"])
    total = sum(a["q"][n].size for n in a["q"])
    rel = []
    for n in a["q"]:
        h, w = a["stats"][n], params[n].astype(np.float64)
        la, lb = (np.trace((w - d[n]) @ h @ (w - d[n]).T) for d in (a["deq"], b["deq"]))
        rel.append(abs(lb - la) / la)
    print(f"identical codes NumPy vs JAX: {same / total:.4%}; layer loss relative difference: "
          f"median {np.median(rel):.2e}, max {np.max(rel):.2e}; mean cos NumPy {a['cos']:.4f}, "
          f"JAX {b['cos']:.4f}; NumPy calibrate+quantize {a['calib_s'] + a['quant_s']:.1f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--compare", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--one", nargs=5, metavar=("BACKEND", "DTYPE", "GROUP", "PARAMS", "DAMP"))
    ap.add_argument("--act-order", action="store_true", help="with --one")
    args = ap.parse_args()
    if args.quick:
        global QUICK
        QUICK = True
        print(json.dumps(run("numpy", "int4", 128, "mse", 0.1)))
        return
    if args.compare:
        compare()
        return
    if args.one:
        b, dt, g, pm, damp = args.one
        print(json.dumps(run(b, dt, int(g), pm, float(damp), act_order=args.act_order)))
        return
    print("| setting | GPTQ params | mean cos | min cos | RTN mean cos | calibrate | quantize "
          "(JAX, incl. compile) | CPU time, both | peak RSS | load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for sname, (dt, g) in SETTINGS.items():
        for vname, (pm, damp, act) in VARIANTS.items():
            cmd = [sys.executable, __file__, "--one", "jax", dt, str(g), pm, str(damp)]
            done = subprocess.run(cmd + (["--act-order"] if act else []), capture_output=True,
                                  text=True, check=True)
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"| {sname} asym | {vname} | {r['cos']:.4f} | {r['min']:.4f} | "
                  f"{r['rtn']:.4f} | {r['calib_s']:.1f} s | {r['quant_s']:.1f} s | "
                  f"{r['cpu_s']:.1f} s | {r['peak_mb']:.0f} MB | {r['load']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
