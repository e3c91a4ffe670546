"""arrayquant and qwix side by side on Flax Linen models: user code, compiled program, speed.

    python benchmarks/qwix_compare.py          # MLP 3 x Dense(1024), 8 rows; MiniLM, 20 sentences
    python benchmarks/qwix_compare.py --quick  # smoke run: MLP 256 wide, 4 sentences, 3 repeats

Models: (a) an MLP of three ``nn.Dense(width)`` layers (ReLU between) on an (8, width)
input; (b) all-MiniLM-L6-v2 written as a Linen module
(``arrayquant.apps.models.minilm_flax``) on ``minilm.DEMO_SENTENCES``. Formats:
W8A16 (int8 symmetric per output channel), W4A16 (int4 symmetric, groups of 128 along
the input features: qwix ``tile_size=128``) and W8A8 (int8 weights per channel, int8
activations per token). arrayquant runs through ``arrayquant.integrations.linen``,
qwix through its PTQ API (``QuantizationRule`` + ``PtqProvider`` + ``quantize_model``
+ ``quantize_params``); the code each user writes is in ``arrayquant_snippet`` and
``qwix_snippet`` below, and "user lines" counts their statements (the quantized
model's call included, the imports not).

Columns:

- compile s: ``jax.jit(f).lower(...).compile()`` once, fresh (trace included);
- run / float: median over ``--repeat`` paired runs of (quantized time / float time),
  each ratio from two neighbouring calls (``_timing.paired_ratio``);
- float weight rebuilt: the compiled HLO's ENTRY instructions computed from the
  kernel parameters alone (no activation involved) and kept as arrays in memory
  outside the product's fusion, counted in bytes against the float32 bytes of the
  quantized kernels (100% = a full float-sized copy of every weight on every call),
  with the ops that produce them (from the HLO's op_name metadata);
- agreement: max abs(y - y_float) for the MLP; mean (min) cosine to the float
  embeddings for MiniLM.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import flax  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from _timing import block, paired_ratio  # noqa: E402

import arrayquant as aq  # noqa: E402
from arrayquant.integrations import linen as aql  # noqa: E402
from arrayquant.trees import flatten_tree  # noqa: E402

try:
    import qwix
except ModuleNotFoundError:
    sys.exit("qwix is not installed: pip install qwix (this benchmark compares against it)")

FORMATS = {  # name: (weight dtype, group size along in or None for per channel, act dtype)
    "W8A16": ("int8", None, None),
    "W4A16 g128": ("int4", 128, None),
    "W8A8": ("int8", None, "int8"),
}


# --------------------------------------------------------------------------- user code


def arrayquant_snippet(model, params, args, module_path, dtype, group, act):
    rules = aq.Rule(include="kernel$", dtype=dtype, symmetric=True,
                    **({"axis": -1} if group is None else {"group_size": group, "group_axis": 0}))
    qparams = aql.quantize_params(params, rules)
    return qparams, lambda p, *a: aql.apply(model, {"params": p}, *a, act_dtype=act)


def qwix_snippet(model, params, args, module_path, dtype, group, act):
    rules = [qwix.QuantizationRule(module_path=module_path, weight_qtype=dtype,
                                   act_qtype=act, tile_size=group)]
    ptq_model = qwix.quantize_model(model, qwix.PtqProvider(rules))
    abstract = jax.eval_shape(ptq_model.init, jax.random.key(0), *args)
    qparams = qwix.quantize_params(params, abstract["params"])
    return qparams, lambda p, *a: ptq_model.apply({"params": p}, *a)


def user_lines(fn) -> int:
    """Statements in ``fn``'s body (a statement over several lines counts once)."""
    import ast
    import textwrap

    body = ast.parse(textwrap.dedent(inspect.getsource(fn))).body[0].body
    return len(body)


SNIPPETS = {"arrayquant": arrayquant_snippet, "qwix": qwix_snippet}


# --------------------------------------------------------------------------- HLO


# name = type[dims]{layout} opcode(operands)...; tuple types "(...)" leave type and dims None
_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = (?:(\w+)\[([\d,]*)\]\S*|\(.*?\)) (\S+?)\((.*?)\)")
_BYTES = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s8": 1, "u8": 1, "s4": 0.5,
          "u4": 0.5, "pred": 1}


def weight_buffers(hlo: str):
    """``(bytes, ops)``: the ENTRY arrays computed from kernel parameters alone, outside
    parameters and bitcasts, and the op names that make them."""
    entry = hlo[hlo.index("\nENTRY"):]
    entry = entry[:entry.index("\n}")]
    static, from_weights, total, ops = set(), set(), 0, set()
    for line in entry.splitlines()[1:]:
        m = _INSTR.match(line)
        if not m:
            continue
        name, ty, dims, opcode, operands = m.groups()
        meta = re.search(r'op_name="([^"]*)"', line)
        meta = meta.group(1) if meta else ""
        if opcode == "parameter":
            if "kernel" in meta:
                from_weights.add(name)
            continue
        refs = re.findall(r"%([\w.\-]+)", operands)
        if all(r in static for r in refs):  # constants and what is computed from them alone
            static.add(name)
        elif all(r in static or r in from_weights for r in refs):
            from_weights.add(name)
            if opcode != "bitcast" and ty in _BYTES:
                total += _BYTES[ty] * int(np.prod([int(d) for d in dims.split(",") if d]))
                ops.add(meta.rsplit("/", 1)[-1] or opcode)
    return total, sorted(ops)


def kernel_f32_bytes(params) -> int:
    return sum(4 * int(np.prod(leaf.shape)) for path, leaf in flatten_tree(params)
               if path.endswith("kernel"))


# --------------------------------------------------------------------------- models


def mlp_case(width: int):
    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Dense(width)(x))
            x = nn.relu(nn.Dense(width)(x))
            return nn.Dense(width)(x)

    model = MLP()
    x = jax.random.normal(jax.random.key(1), (8, width))
    params = model.init(jax.random.key(0), x)["params"]
    return model, params, (x,), ".*"


def minilm_case(n_sentences: int):
    from arrayquant.apps.models import minilm, minilm_flax

    model, params = minilm_flax.load()
    tokens = minilm.tokenize(list(minilm.DEMO_SENTENCES[:n_sentences]))
    args = tuple(jnp.asarray(tokens[k]) for k in ("input_ids", "attention_mask",
                                                    "token_type_ids"))
    return model, params, args, r"layer_\d+/.*"  # qwix: the Dense layers, not attention


def agreement(kind: str, y, y_float) -> str:
    y, y_float = np.asarray(y, np.float64), np.asarray(y_float, np.float64)
    if kind.startswith("MLP"):
        return f"max abs diff {np.max(np.abs(y - y_float)):.4f}"
    cos = np.sum(y * y_float, -1) / np.linalg.norm(y, axis=-1) / np.linalg.norm(y_float, axis=-1)
    return f"cos {cos.mean():.5f} (min {cos.min():.5f})"


def run_case(kind, model, params, args, module_path, repeat, rows):
    float_fn = jax.jit(lambda p, *a: model.apply({"params": p}, *a))
    t0 = time.perf_counter()
    float_fn.lower(params, *args).compile()
    float_compile = time.perf_counter() - t0
    y_float = block(float_fn(params, *args))
    w_bytes = kernel_f32_bytes(params)
    fb, fops = weight_buffers(float_fn.lower(params, *args).compile().as_text())
    rows.append((kind, "float32", "-", "0", f"{float_compile:.2f}", "1.00",
                 f"{100 * fb / w_bytes:.0f}%" + (f" ({', '.join(fops)})" if fops else ""), "-"))
    for fmt, (dtype, group, act) in FORMATS.items():
        for lib, snippet in SNIPPETS.items():
            qparams, fn = snippet(model, params, args, module_path, dtype, group, act)
            jitted = jax.jit(fn)
            t0 = time.perf_counter()
            compiled = jitted.lower(qparams, *args).compile()
            compile_s = time.perf_counter() - t0
            y = block(jitted(qparams, *args))
            _, ratio = paired_ratio(lambda j=jitted, q=qparams: j(q, *args),
                                    lambda: float_fn(params, *args), repeat)
            b, ops = weight_buffers(compiled.as_text())
            rebuilt = f"{100 * b / w_bytes:.0f}%" + (f" ({', '.join(ops)})" if ops else "")
            rows.append((kind, fmt, lib, str(user_lines(snippet)), f"{compile_s:.2f}",
                         f"{ratio:.2f}", rebuilt, agreement(kind, y, y_float)))
            print(f"  {kind} {fmt} {lib}: done", file=sys.stderr, flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, 3 repeats")
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--sentences", type=int, default=20)
    a = ap.parse_args(argv)
    repeat, width, sentences = (3, 256, 4) if a.quick else (a.repeat, a.width, a.sentences)
    print(f"jax {jax.__version__}, flax {flax.__version__}, qwix {qwix.__version__}, "
          f"backend {jax.default_backend()}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}; repeat {repeat}\n")
    rows = []
    run_case(f"MLP 3x{width}", *mlp_case(width), repeat, rows)
    try:
        minilm = minilm_case(sentences)
    except (ModuleNotFoundError, FileNotFoundError) as e:
        print(f"MiniLM skipped: {e}")
    else:
        run_case(f"MiniLM ({sentences} sentences)", *minilm, repeat, rows)
    headers = ("model", "format", "library", "user lines", "compile s", "run / float",
               "float weight rebuilt", "agreement with float")
    print("| " + " | ".join(headers) + " |")
    print("|" + "---|" * len(headers))
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
