"""The traced program of a jitted product stays small and shards like the float product.

Compile time is measured by benchmarks/compile.py; these tests check the structure
that keeps it bounded, without timing anything: the HLO of a one-token product does
not grow with the number of groups (no loop unrolled over groups), and with the
weight sharded along its in axis over 8 host devices the compiled products use the
same collectives as the float product (weight-only) or only all-reduces (W8A8).
"""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
from conftest import run_on_host_devices

import arrayquant as aq

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")


def _hlo_ops(fn, *args) -> int:
    text = jax.jit(fn).lower(*args).compile().as_text()
    return sum(1 for line in text.splitlines() if " = " in line)


@pytest.mark.parametrize("act", [None, "int8"])
@pytest.mark.parametrize(("qtype", "sym"), [("int4", True), ("uint4", False), ("int8", True)])
def test_one_token_programs_do_not_grow_with_the_number_of_groups(qtype, sym, act):
    rng = np.random.default_rng(0)
    sizes = {}
    for groups in (4, 64):
        k = 32 * groups
        w = rng.standard_normal((64, k)).astype(np.float32)
        qw = jax.tree_util.tree_map(jnp.asarray, aq.quantize(w, qtype, sym, group_size=32))
        x = jnp.asarray(rng.standard_normal((1, k)).astype(np.float32))
        sizes[groups] = _hlo_ops(lambda x, q: aq.linear(x, q, act_dtype=act), x, qw)
    # 16 times the groups: about as many instructions (an unrolled loop over the groups
    # gave several thousand at 128 groups), not 16 times as many.
    assert sizes[64] < 1.25 * sizes[4], sizes


_SHARDED = textwrap.dedent("""
    import json
    import numpy as np, jax, jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import arrayquant as aq

    mesh = Mesh(np.array(jax.devices()), ("x",))
    n, k = 128, 2048
    rng = np.random.default_rng(0)
    w = rng.standard_normal((n, k)).astype(np.float32)
    names = ("all-reduce", "all-gather", "collective-permute", "all-to-all", "reduce-scatter")

    def count(f, *args):
        text = jax.jit(f).lower(*args).compile().as_text()
        return {c: text.count(f" {c}(") + text.count(f" {c}-start(") for c in names}

    def put(a, spec):
        return jax.device_put(a, NamedSharding(mesh, spec))

    out = {"devices": jax.device_count()}
    for tokens in (1, 8):
        x = put(jnp.asarray(rng.standard_normal((tokens, k)).astype(np.float32)), P(None, "x"))
        out[f"{tokens} float"] = count(lambda x, w: x @ w.T, x,
                                       put(jnp.asarray(w), P(None, "x")))
        for name, kw, act in [
            ("int8 per channel", dict(dtype="int8", symmetric=True, axis=0), None),
            ("int4 g128", dict(dtype="int4", symmetric=True, group_size=128), None),
            ("uint4 g128", dict(dtype="uint4", group_size=128), None),
            ("W8A8", dict(dtype="int8", symmetric=True, axis=0), "int8"),
            ("W4A8 g128", dict(dtype="int4", symmetric=True, group_size=128), "int8"),
        ]:
            qa = aq.quantize(w, **kw)
            # The weight's placement, carried over to codes and scales by sharding_like.
            qs = jax.device_put(qa, aq.sharding_like(qa, NamedSharding(mesh, P(None, "x"))))
            out[f"{tokens} {name}"] = count(
                lambda x, q, act=act: aq.linear(x, q, act_dtype=act), x, qs)
    print(json.dumps(out))
""")


def test_in_sharded_products_use_the_float_products_collectives():
    counts = json.loads(run_on_host_devices(_SHARDED))
    assert counts.pop("devices") == 8
    for case, c in counts.items():
        tokens = case.split()[0]
        float_counts = counts[f"{tokens} float"]
        assert float_counts == {**dict.fromkeys(c, 0), "all-reduce": 1}, float_counts
        moves = {k: v for k, v in c.items() if k != "all-reduce"}
        assert not any(moves.values()), (case, c)  # no weight is gathered or moved
        if "A8" in case:
            # Per-token activation ranges need their own reduction across the shards of x
            # (min and max), then the product's: three all-reduces of a few values.
            assert c["all-reduce"] <= 3, (case, c)
        else:
            assert c["all-reduce"] == 1, (case, c)
