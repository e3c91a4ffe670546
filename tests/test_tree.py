"""quantize_tree / dequantize_tree / tree_report: rules on leaf paths, any tree, any backend."""

from __future__ import annotations

import collections
import subprocess
import sys

import numpy as np
import pytest

import arrayquant as aq
from arrayquant.trees import format_bytes

RNG = np.random.default_rng(0)


def _f32(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def _params():
    """A Flax-linen-like nested params dict, with things that must never be quantized."""
    return {
        "params": {
            "embed": {"embedding": _f32(50, 16)},
            "layer_0": {"mlp": {"kernel": _f32(16, 32), "bias": _f32(32)}},
            "layer_1": {"mlp": {"kernel": _f32(32, 16), "bias": _f32(16)}},
            "head": {"kernel": _f32(16, 4)},
        },
        "step": np.array(3, dtype=np.int64),
        "positions": np.arange(8).reshape(2, 4),
    }


# ---------------------------------------------------------------- rules


def test_first_matching_rule_decides_and_unmatched_leaves_stay():
    p = _params()
    rules = [
        aq.Rule(include="head|embed", dtype=None),  # kept in float, as in the lesson
        aq.Rule(include=r"layer_0/.*kernel$", dtype="int4", group_size=8),
        aq.Rule(include="kernel", dtype="int8", symmetric=True, axis=-1),
        aq.Rule(dtype="uint8"),  # would match the head too, but the first rule won
    ]
    q = aq.quantize_tree(p, rules)
    qp = q["params"]
    assert qp["head"]["kernel"] is p["params"]["head"]["kernel"]
    assert qp["embed"]["embedding"] is p["params"]["embed"]["embedding"]
    k0, k1 = qp["layer_0"]["mlp"]["kernel"], qp["layer_1"]["mlp"]["kernel"]
    assert isinstance(k0, aq.QArray) and k0.qtype == "int4" and k0.block_shape == (1, 8)
    assert k0.packed_axis == 1 and not k0.symmetric
    assert isinstance(k1, aq.QArray) and k1.qtype == "int8" and k1.symmetric
    assert k1.granularity == "per-axis(1)"
    # 1-D biases (min_ndim=2), integer arrays and 0-d arrays are never quantized.
    assert qp["layer_0"]["mlp"]["bias"] is p["params"]["layer_0"]["mlp"]["bias"]
    assert q["step"] is p["step"] and q["positions"] is p["positions"]
    # The structure and the key order are the same.
    assert list(q) == list(p) and list(qp) == list(p["params"])


def test_include_exclude_min_ndim_min_size():
    tree = {"a.weight": _f32(4, 4), "b.weight": _f32(64, 64), "b.bias": _f32(64),
            "c.weight": _f32(64, 64)}
    q = aq.quantize_tree(tree, aq.Rule(include=r"\.weight$", exclude="^c", min_size=100))
    assert [type(v).__name__ for v in q.values()] == ["ndarray", "QArray", "ndarray", "ndarray"]
    q = aq.quantize_tree(tree, aq.Rule(min_ndim=1))
    assert all(isinstance(v, aq.QArray) for v in q.values())
    q = aq.quantize_tree(tree, [])
    assert all(q[k] is tree[k] for k in tree)


def test_flat_checkpoint_keys_are_the_paths():
    tree = {"encoder.layer.0.attention.self.query.weight": _f32(8, 8), "pooler.dense.bias": _f32(8)}
    assert aq.tree_paths(tree) == list(tree)
    q = aq.quantize_tree(tree, aq.Rule(include=r"^encoder\.layer\.0\.", axis=0))
    assert isinstance(q["encoder.layer.0.attention.self.query.weight"], aq.QArray)


def test_non_array_leaves_and_containers():
    Pair = collections.namedtuple("Pair", ["w", "b"])
    fn = np.tanh
    tree = {"layers": [Pair(_f32(3, 5), _f32(5)), (_f32(5, 2), None)], "act": fn, "name": "mlp",
            "lr": 0.1}
    assert aq.tree_paths(tree) == ["layers/0/w", "layers/0/b", "layers/1/0"]
    q = aq.quantize_tree(tree, aq.Rule())
    assert isinstance(q["layers"][0], Pair) and isinstance(q["layers"][1], tuple)
    assert isinstance(q["layers"][0].w, aq.QArray) and isinstance(q["layers"][1][0], aq.QArray)
    assert q["layers"][1][1] is None and q["act"] is fn and q["name"] == "mlp" and q["lr"] == 0.1
    # Already-quantized leaves are left alone; dequantize_tree leaves other leaves alone.
    assert aq.quantize_tree(q, aq.Rule(dtype="int2"))["layers"][0].w is q["layers"][0].w
    d = aq.dequantize_tree(q)
    assert d["act"] is fn and d["layers"][0].b is tree["layers"][0].b


def test_paths_agree_with_jax_key_paths():
    jax = pytest.importorskip("jax")
    tree = {"a": [{"w": _f32(2, 2)}, (_f32(3),)], "b": {"c": {"d": _f32(1)}}}
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    jax_paths = [jax.tree_util.keystr(kp, simple=True, separator="/") for kp, _ in flat]
    assert sorted(aq.tree_paths(tree)) == sorted(jax_paths)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"include": "(unclosed"}, r"Rule.include='\(unclosed' is not a valid regular"),
        ({"exclude": "[z-a]"}, "Rule.exclude"),
        ({"dtype": "int3"}, "unknown quantized dtype 'int3'"),
        ({"dtype": "uint8", "symmetric": True}, "needs a signed dtype"),
        ({"axis": 0, "group_size": 32}, "not both"),
        ({"min_ndim": -1}, "min_ndim"),
        ({"min_size": 1.5}, "min_size"),
    ],
)
def test_rule_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        aq.Rule(**kwargs)


def test_rule_type_errors_and_repr():
    with pytest.raises(TypeError, match="regular expression string"):
        aq.Rule(include=3)
    with pytest.raises(TypeError, match="Rule objects"):
        aq.quantize_tree({"w": _f32(2, 2)}, [{"dtype": "int8"}])
    r = aq.Rule(include="x", dtype=np.int8, axis=[0])
    assert r.dtype == "int8" and r.axis == (0,)
    assert repr(r) == "Rule(include='x', axis=(0,))"
    assert r == aq.Rule(include="x", axis=(0,)) and hash(r) == hash(aq.Rule(include="x", axis=(0,)))
    with pytest.raises(ValueError, match="keeps leaves in float"):
        aq.Rule(dtype=None).quantize(_f32(2, 2))


def test_quantize_errors_name_the_leaf():
    with pytest.raises(ValueError, match=r"cannot quantize 'deep/w' of shape \(3, 4\) .*axis=2"):
        aq.quantize_tree({"deep": {"w": _f32(3, 4)}}, aq.Rule(axis=2))
    bad = _f32(3, 4)
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match="'w'.*NaN"):
        aq.quantize_tree({"w": bad}, aq.Rule())


# ---------------------------------------------------------------- backends


def test_quantize_tree_on_every_backend(backend):
    rules = [aq.Rule(include="head", dtype=None), aq.Rule(dtype="int4", group_size=8)]
    host = {"w": _f32(6, 20), "head": _f32(20, 3), "b": _f32(20)}
    tree = {k: backend.asarray(v) for k, v in host.items()}
    if backend.jit:
        import jax

        q = jax.jit(lambda t: aq.quantize_tree(t, rules))(tree)
        d = jax.jit(aq.dequantize_tree)(q)
    else:
        q = aq.quantize_tree(tree, rules)
        d = aq.dequantize_tree(q)
    assert isinstance(q["w"], aq.QArray) and not isinstance(q["head"], aq.QArray)
    ref = aq.quantize(host["w"], "int4", group_size=8)
    np.testing.assert_array_equal(backend.to_numpy(q["w"].data), ref.data)
    np.testing.assert_array_equal(backend.to_numpy(d["w"]), aq.dequantize(ref))
    assert type(d["w"]) is type(tree["w"])
    np.testing.assert_array_equal(backend.to_numpy(d["head"]), host["head"])


def test_dequantize_tree_dtype_override():
    q = aq.quantize_tree({"w": _f32(4, 4)}, aq.Rule())
    assert aq.dequantize_tree(q)["w"].dtype == np.float32
    assert aq.dequantize_tree(q, dtype="float16")["w"].dtype == np.float16


def test_numpy_trees_do_not_import_jax():
    code = (
        "import sys, numpy as np, arrayquant as aq\n"
        "t = {'a': [np.ones((4, 4), np.float32)], 'b': np.zeros(3)}\n"
        "q = aq.quantize_tree(t, aq.Rule())\n"
        "aq.tree_report(t, q); aq.dequantize_tree(q)\n"
        "assert 'jax' not in sys.modules, 'jax was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- report


def test_tree_report_rows_and_totals():
    p = _params()
    rules = [aq.Rule(include="head", dtype=None), aq.Rule(dtype="int8", symmetric=True, axis=-1)]
    q = aq.quantize_tree(p, rules)
    report = aq.tree_report(p, q)
    paths = [r.path for r in report.rows]
    assert paths == aq.tree_paths(p)
    assert report.n_quantized == 3 and report.n_skipped == len(paths) - 3
    row = report.rows[paths.index("params/layer_0/mlp/kernel")]
    w, qw = p["params"]["layer_0"]["mlp"]["kernel"], q["params"]["layer_0"]["mlp"]["kernel"]
    assert row.shape == (16, 32) and row.dtype == "float32" and row.quantized
    assert row.bytes_before == w.nbytes and row.bytes_after == qw.nbytes == 16 * 32 + 32 * 4
    assert row.sqnr_db == pytest.approx(float(aq.sqnr_db(w, qw)), abs=1e-3)
    assert row.setting == "int8 per-axis(1) sym"
    skipped = report.rows[paths.index("params/head/kernel")]
    assert not skipped.quantized and skipped.sqnr_db is None and skipped.setting == "-"
    assert report.bytes_before == sum(r.bytes_before for r in report.rows)
    assert report.compression == pytest.approx(report.bytes_before / report.bytes_after)
    sq = [r.sqnr_db for r in report.rows if r.quantized]
    assert report.mean_sqnr_db == pytest.approx(np.mean(sq))
    assert report.worst_sqnr_db == min(sq)
    text = str(report)
    assert "params/layer_0/mlp/kernel" in text and "16x32" in text
    assert "3 quantized" in report.summary() and "x smaller" in report.summary()
    assert report.table(max_rows=2).endswith(f"... {len(paths) - 2} more")


def test_tree_report_edge_cases():
    empty = aq.tree_report({"b": np.zeros(3)}, {"b": np.zeros(3)})
    assert empty.mean_sqnr_db is None and empty.worst_sqnr_db is None
    assert "mean -, worst -" in empty.summary()
    with pytest.raises(ValueError, match="same leaves"):
        aq.tree_report({"a": _f32(2, 2)}, {"b": _f32(2, 2)})
    zeros = {"z": np.zeros((4, 4), np.float32)}
    q = aq.quantize_tree(zeros, aq.Rule())
    assert aq.tree_report(zeros, q).rows[0].sqnr_db == np.inf
    again = aq.tree_report(q, q).rows[0]  # an already-quantized leaf: nothing to compare
    assert again.quantized and again.sqnr_db is None and again.bytes_before == q["z"].nbytes
    od = collections.OrderedDict([("b", _f32(2, 2)), ("a", _f32(2, 2))])
    qod = aq.quantize_tree(od, aq.Rule())
    assert type(qod) is collections.OrderedDict and list(qod) == ["b", "a"]
    assert isinstance(qod["a"], aq.QArray)
    assert format_bytes(1536) == "1.5 KiB" and format_bytes(10) == "10 B"


# ---------------------------------------------------------------- JAX models


def _mlp_apply(params, x):
    import jax

    h = jax.nn.relu(x @ params["dense_0"]["kernel"] + params["dense_0"]["bias"])
    return h @ params["dense_1"]["kernel"] + params["dense_1"]["bias"]


def test_flax_style_params_quantized_inside_jit():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    params = {
        "dense_0": {"kernel": jnp.asarray(_f32(16, 64)), "bias": jnp.zeros(64)},
        "dense_1": {"kernel": jnp.asarray(_f32(64, 4)), "bias": jnp.zeros(4)},
    }
    x = jnp.asarray(_f32(8, 16))
    qp = aq.quantize_tree(params, aq.Rule(include="kernel", dtype="int8", symmetric=True,
                                          axis=-1))
    f = jax.jit(lambda qp, x: _mlp_apply(aq.dequantize_tree(qp), x))
    y = f(qp, x)
    np.testing.assert_allclose(y, _mlp_apply(aq.dequantize_tree(qp), x), rtol=1e-5, atol=1e-5)
    y_float = np.asarray(_mlp_apply(params, x))
    assert np.linalg.norm(np.asarray(y) - y_float) < 0.02 * np.linalg.norm(y_float)
    # The compiled function takes the int8 codes, not float weights.
    avals = jax.tree.leaves(jax.make_jaxpr(f)(qp, x).in_avals)
    assert sorted(str(a.dtype) for a in avals).count("int8") == 2


def test_equinox_model_quantized_inside_jit():
    jax = pytest.importorskip("jax")
    eqx = pytest.importorskip("equinox")

    class MLP(eqx.Module):
        layers: list

        def __init__(self, key):
            k0, k1 = jax.random.split(key)
            self.layers = [eqx.nn.Linear(16, 64, key=k0), eqx.nn.Linear(64, 4, key=k1)]

        def __call__(self, x):
            return self.layers[1](jax.nn.relu(self.layers[0](x)))

    def apply(model, x):
        return jax.vmap(model)(x)

    model = MLP(jax.random.key(0))
    x = jax.numpy.asarray(_f32(8, 16))
    assert aq.tree_paths(model) == ["layers/0/weight", "layers/0/bias", "layers/1/weight",
                                    "layers/1/bias"]
    # Equinox Linear weights are (out, in): per output channel is axis 0.
    qmodel = aq.quantize_tree(model, aq.Rule(include="weight", dtype="int4", group_size=16))
    assert isinstance(qmodel, MLP) and isinstance(qmodel.layers[0].weight, aq.QArray)
    assert not isinstance(qmodel.layers[0].bias, aq.QArray)
    f = jax.jit(lambda qp, x: apply(aq.dequantize_tree(qp), x))
    y = f(qmodel, x)
    np.testing.assert_allclose(y, apply(aq.dequantize_tree(qmodel), x), rtol=1e-5, atol=1e-5)
    cos = np.sum(np.asarray(y) * np.asarray(apply(model, x))) / (
        np.linalg.norm(y) * np.linalg.norm(apply(model, x)))
    assert cos > 0.98
    report = aq.tree_report(model, qmodel)
    assert report.n_quantized == 2 and report.compression > 3
