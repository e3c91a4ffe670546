"""Activation statistics: record / merge against float64 NumPy references, the recording
hook (NumPy, JAX, under jax.jit), the static activation-range observers, the activation
scale, and MiniLM's calibration data."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import arrayquant as aq
from arrayquant.linear_weight import LinearWeight
from arrayquant.stats.layer import LayerStats, merge, record
from arrayquant.stats.observers import (
    MinMaxObserver,
    MovingAverageObserver,
    MSEObserver,
    PercentileObserver,
    activation_qparams,
)
from arrayquant.stats.recorder import StatsRecorder, collect_stats, merge_stats

OBSERVERS = [MinMaxObserver(), MovingAverageObserver(0.8), PercentileObserver(99.0),
             MSEObserver(bits=8, grid=2)]
FIELDS = ("count", "gram", "sum", "abs_sum", "abs_max", "min", "max", "range_min", "range_max")


def _x(shape=(2, 5, 6), seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * np.linspace(0.5, 3.0, shape[-1])
    x.flat[min(7, x.size - 1)] = 8.0  # an outlier
    return x.astype(np.float32)


def _mask(n, seed=1):
    m = (np.random.default_rng(seed).random(n) < 0.7).astype(np.int32)
    m[0] = 1
    return m


def _reference(x, mask=None):
    """Float64 NumPy statistics of the kept rows."""
    r = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    if mask is not None:
        r = r[np.asarray(mask).reshape(-1) != 0]
    return dict(count=len(r), gram=r.T @ r, sum=r.sum(0), abs_sum=np.abs(r).sum(0),
                abs_max=np.abs(r).max(0), min=r.min(0), max=r.max(0))


def _np(a):
    return None if a is None else np.asarray(a._array if hasattr(a, "_array") else a,
                                             np.float64)


def _close(stats: LayerStats, ref: dict, rtol):
    for name, want in ref.items():
        np.testing.assert_allclose(_np(getattr(stats, name)), want, rtol=rtol, atol=rtol,
                                   err_msg=name)


def _same(a: LayerStats, b: LayerStats, rtol=1e-6):
    for name in FIELDS:
        va, vb = getattr(a, name), getattr(b, name)
        assert (va is None) == (vb is None), name
        if va is not None:
            np.testing.assert_allclose(_np(va), _np(vb), rtol=rtol, atol=rtol, err_msg=name)


def _rtol(backend):
    return 1e-12 if backend.name == "numpy" else 2e-5


# ------------------------------------------------------------------- record and merge


@pytest.mark.parametrize("masked", [False, True])
def test_record_against_float64_reference(backend, call, masked):
    x = _x()
    mask = _mask(10) if masked else None
    xb = backend.asarray(x)
    mb = None if mask is None else backend.asarray(mask)
    stats = call(lambda a, m: record(a, m))(xb, mb)
    _close(stats, _reference(x, mask), _rtol(backend))
    assert stats.range_min is None and stats.observer is None


def test_merge_streams_batches_in_any_order(backend):
    if backend.is_jax:
        pytest.skip("eager JAX compiles every op of record for new shapes (3 s); "
                    "test_collect_stats_numpy_and_jax_jit merges JAX statistics")
    x = _x((12, 6))
    mask = _mask(12)
    parts = [record(backend.asarray(x[i:j]), backend.asarray(mask[i:j]),
                    observer=MinMaxObserver()) for i, j in ((0, 5), (5, 6), (6, 12))]
    ref = _reference(x, mask)
    orders = itertools.permutations(parts) if backend.name == "numpy" else [parts[::-1]]
    for order in orders:
        total = None
        for p in order:
            total = merge(total, p)
        _close(total, ref, _rtol(backend))
        kept = x[mask != 0]
        np.testing.assert_allclose(_np(total.range_min), kept.min())
        np.testing.assert_allclose(_np(total.range_max), kept.max())


@pytest.mark.parametrize("observer", OBSERVERS[2:], ids=repr)
def test_weighted_observers_merge_in_any_order(observer):
    x = _x((12, 6))
    mask = _mask(12)
    parts = [record(x[i:j], mask[i:j], observer=observer) for i, j in ((0, 3), (3, 7), (7, 12))]
    results = []
    for order in itertools.permutations(parts):
        total = None
        for p in order:
            total = merge(total, p)
        results.append((float(total.range_min), float(total.range_max)))
    np.testing.assert_allclose(results, [results[0]] * len(results), rtol=1e-12)
    counts = [float(p.count) for p in parts]
    want_lo = sum(c * float(p.range_min) for c, p in zip(counts, parts)) / sum(counts)
    np.testing.assert_allclose(results[0][0], want_lo, rtol=1e-12)


def test_moving_average_depends_on_order():
    obs = MovingAverageObserver(0.75)
    x = _x((9, 4))
    parts = [record(x[i:i + 3], observer=obs) for i in (0, 3, 6)]
    his = [float(p.range_max) for p in parts]
    total = None
    for p in parts:
        total = merge(total, p)
    want = (0.75 * his[0] + 0.25 * his[1]) * 0.75 + 0.25 * his[2]
    np.testing.assert_allclose(float(total.range_max), want, rtol=1e-12)
    rev = merge(merge(parts[2], parts[1]), parts[0])
    assert float(rev.range_max) != pytest.approx(float(total.range_max))
    # An empty batch leaves the average as it is.
    empty = record(x[:3], np.zeros(3, np.int32), observer=obs)
    again = merge(total, empty)
    assert float(again.range_max) == float(total.range_max)
    assert float(merge(empty, parts[0]).range_min) == float(parts[0].range_min)


# ------------------------------------------------------------------- observers


@pytest.mark.parametrize("observer", OBSERVERS, ids=repr)
def test_observers_on_every_backend_ignore_padding(backend, call, observer):
    if backend.name == "jax" and isinstance(observer, MSEObserver):
        pytest.skip("eager JAX compiles each of MSEObserver's ~300 ops once (5 s); jax-jit "
                    "runs the same code")
    x = _x()
    mask = _mask(10)
    big = x.copy()
    big.reshape(-1, 6)[mask == 0] = 1e4  # padding values must not widen any range
    want = observer.batch_range(x.reshape(-1, 6)[mask != 0])
    lo, hi = call(observer.batch_range)(backend.asarray(big), backend.asarray(mask))
    rtol = 1e-12 if backend.name == "numpy" else 2e-5
    np.testing.assert_allclose([_np(lo), _np(hi)], [want[0], want[1]], rtol=rtol, atol=rtol)
    assert tuple(lo.shape) == tuple(hi.shape) == ()


def test_minmax_observer_range():
    x = _x()
    mask = _mask(10)
    lo, hi = MinMaxObserver().batch_range(x, mask)
    kept = x.reshape(-1, 6)[mask != 0]
    assert (float(lo), float(hi)) == (kept.min(), kept.max())


@pytest.mark.parametrize("q", [99.0, 90.0, 75.5, 100])
def test_percentile_observer_is_numpy_percentile(q):
    x = _x((7, 9, 5), seed=3)
    mask = _mask(63, seed=4)
    lo, hi = PercentileObserver(q).batch_range(x, mask)
    kept = x.reshape(-1, 5)[mask != 0].astype(np.float64).ravel()
    np.testing.assert_allclose([float(lo), float(hi)], np.percentile(kept, [100 - q, q]),
                               rtol=1e-12)


@pytest.mark.parametrize("symmetric", [False, True])
def test_mse_observer_never_worse_than_minmax(symmetric):
    obs = MSEObserver(bits=4, symmetric=symmetric, grid=8, min_shrink=0.3)
    for seed in range(3):
        x = _x((40, 8), seed=seed)
        mask = _mask(40, seed=seed)
        los, his, errs = (np.asarray(a, np.float64) for a in obs.errors(x, mask))
        lo, hi = obs.batch_range(x, mask)
        best = int(np.argmin(errs))
        assert (float(lo), float(hi)) == (los[best], his[best])
        assert errs[best] <= errs[0]
        # The error of the min/max candidate, recomputed in float64 from its qparams.
        kept = x[mask != 0]
        assert (los[0], his[0]) == (kept.min(), kept.max())
        s, z = aq.qparams_from_range(np.float32(kept.min()), np.float32(kept.max()), "int4",
                                     symmetric)
        xh = aq.dequantize_with(aq.quantize_with(kept, s, z, "int4"), s, z)
        np.testing.assert_allclose(errs[0], np.sum((kept - xh) ** 2.0), rtol=1e-5)
    assert errs[best] < errs[0]  # the outlier makes shrinking pay off at 4 bits


def test_empty_batches():
    x = _x((3, 4))
    none = np.zeros(3, np.int32)
    lo, hi = MinMaxObserver().batch_range(x, none)
    assert (float(lo), float(hi)) == (np.inf, -np.inf)
    for obs in OBSERVERS[2:]:
        lo, hi = obs.batch_range(x, none)
        assert (float(lo), float(hi)) == (0.0, 0.0)
        full = record(x, observer=obs)
        merged = merge(record(x, none, observer=obs), full)
        assert float(merged.range_max) == float(full.range_max)


def test_observer_arguments_are_checked():
    for bad in (lambda: MovingAverageObserver(1.0), lambda: MovingAverageObserver("0.9"),
                lambda: PercentileObserver(40), lambda: PercentileObserver(True),
                lambda: MSEObserver(bits=3), lambda: MSEObserver(grid=0),
                lambda: MSEObserver(min_shrink=0), lambda: MSEObserver(symmetric=1)):
        with pytest.raises(ValueError):
            bad()
    with pytest.raises(ValueError, match="row_mask has 3 entries"):
        MinMaxObserver().batch_range(_x((4, 2)), [1, 1, 0])
    hash(MSEObserver())  # static configuration under jax.jit


# ------------------------------------------------------------------- activation_qparams


@pytest.mark.parametrize("dtype,symmetric", [("int8", False), ("uint8", False),
                                             ("int8", True), ("int4", False)])
def test_activation_qparams(dtype, symmetric):
    x = _x() + 0.5
    stats = record(x)
    s, z = activation_qparams(stats, dtype, symmetric)
    ws, wz = aq.qparams_from_range(np.float32(x.min()), np.float32(x.max()), dtype, symmetric)
    assert s.shape == () and float(s) == float(ws)
    assert (z is None) == symmetric and (z is None or int(z) == int(wz))
    zero = aq.dequantize_with(aq.quantize_with(np.zeros(3, np.float32), s, z, dtype), s, z)
    assert np.all(zero == 0.0)
    # With an observer its range is used.
    obs = record(x, observer=PercentileObserver(90.0))
    s2, _ = activation_qparams(obs, dtype, symmetric)
    assert float(s2) < float(s)


def test_activation_qparams_errors():
    with pytest.raises(TypeError, match="LayerStats"):
        activation_qparams({"count": 1})
    with pytest.raises(ValueError, match="unknown quantized dtype"):
        activation_qparams(record(_x()), "int7")
    empty = record(_x((2, 3)), np.zeros(2, np.int32), observer=MinMaxObserver())
    with pytest.raises(ValueError):
        activation_qparams(empty)


# ------------------------------------------------------------------- the recording hook


def _model(xp_params):
    return {"l1": {"w": xp_params[0], "b": xp_params[1]}, "l2": {"w": xp_params[2]}}


def _weights(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in ((7, 6), (7,), (3, 7))]


def _forward(params, x, linear):
    h = linear(x, params["l1"]["w"], params["l1"]["b"])
    h = h * (h > 0)
    return linear(h, params["l2"]["w"])


def _direct(params, x, mask, observer=None):
    """The inputs of both layers, recorded without the hook."""
    h = x @ params["l1"]["w"].T + params["l1"]["b"]
    h = h * (h > 0)
    return {"l1/w": record(x, mask, observer=observer), "l2/w": record(h, mask,
                                                                        observer=observer)}


@pytest.mark.parametrize("where", ["numpy", "jax", "jax-jit"])
def test_recorder_matches_direct_record(where):
    obs = MinMaxObserver()
    x = _x((2, 5, 6))
    mask = _mask(10)
    params = _model(_weights())
    if where != "numpy":
        jnp = pytest.importorskip("jax.numpy")
        params = {k: {n: jnp.asarray(v) for n, v in d.items()} for k, d in params.items()}
        x, mask = jnp.asarray(x), jnp.asarray(mask)

    def run(p, xx, m):
        rec = StatsRecorder(p, row_mask=m, observer=obs)
        y = _forward(p, xx, rec.linear)
        return rec.stats, y

    if where == "jax-jit":
        import jax

        run = jax.jit(run)
    stats, y = run(params, x, mask)
    want = _direct(params, x, mask, obs)
    assert list(stats) == ["l1/w", "l2/w"]
    for path in want:
        _same(stats[path], want[path], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(y), np.asarray(_forward(params, x, aq.linear)),
                               rtol=1e-6)


def test_recorder_merges_repeated_calls_and_records_tied_weights_once():
    w = _weights()[0]
    params = {"a": w, "b": w, "c": np.ones((2, 6), np.float32)}
    rec = StatsRecorder(params, gram=False)
    x1, x2 = _x((3, 6)), _x((4, 6), seed=5)
    rec(x1, params["b"])
    rec.linear(x2, params["a"])
    assert list(rec.stats) == ["a"]  # tied: the first path in traversal order
    _close(rec.stats["a"], {k: v for k, v in _reference(np.concatenate([x1, x2])).items()
                            if k != "gram"}, 1e-12)
    assert rec.stats["a"].gram is None


def test_recorder_linear_weight_records_what_the_codes_see():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((5, 6)).astype(np.float32)
    s = rng.uniform(0.5, 2.0, 6).astype(np.float32)
    perm = np.asarray([2, 0, 1, 5, 3, 4], np.int32)
    lw = LinearWeight(aq.quantize(w[:, perm] / s, "int8", axis=0), in_scale=s, perm=perm)
    x = _x((4, 6))
    seen = []

    def inner(xx, ww, b):
        seen.append(ww)
        return xx @ aq.dequantize(ww).T

    rec = StatsRecorder({"layer": {"w": lw}}, linear=inner, observer=MinMaxObserver())
    y = rec.linear(x, lw)
    _close(rec.stats["layer/w"], _reference(x[:, perm] * s), 1e-6)
    assert seen == [lw] and y.shape == (4, 5)


def test_recorder_errors():
    params = {"w": np.ones((3, 4), np.float32)}
    rec = StatsRecorder(params)
    with pytest.raises(ValueError, match=r"shape \(4, 3\).*not a leaf"):
        rec.linear(np.ones((2, 3), np.float32), params["w"].T)
    with pytest.raises(ValueError, match="row_mask has 3 entries"):
        StatsRecorder(params, row_mask=np.ones(3)).linear(np.ones((2, 4), np.float32),
                                                           params["w"])
    with pytest.raises(TypeError, match="observer"):
        StatsRecorder(params, observer="minmax")
    with pytest.raises(TypeError, match="gram"):
        StatsRecorder(params, gram=1)


# ------------------------------------------------------------------- collect_stats


def _batches():
    return [{"x": _x((3, 6), seed=i), "mask": _mask(3, seed=i)} for i in range(3)]


def _fwd(params, batch, linear):
    return _forward(params, batch["x"], linear)


def test_collect_stats_numpy_and_jax_jit():
    params = _model(_weights())
    obs = MovingAverageObserver()
    got = collect_stats(_fwd, params, _batches(), row_mask=lambda b: b["mask"], observer=obs)
    want = None
    for b in _batches():
        want = merge_stats(want, _direct(params, b["x"], b["mask"], obs))
    for path in want:
        _same(got[path], want[path], rtol=1e-12)

    jax = pytest.importorskip("jax")
    jparams = jax.tree_util.tree_map(jax.numpy.asarray, params)
    jgot = collect_stats(_fwd, jparams, _batches(), row_mask=lambda b: b["mask"],
                         observer=obs)  # jit by default on JAX
    for path in want:
        _same(jgot[path], want[path], rtol=1e-5)
        assert isinstance(jgot[path].sum, jax.Array)


def test_collect_stats_errors():
    params = _model(_weights())
    with pytest.raises(ValueError, match="no batches"):
        collect_stats(_fwd, params, [])
    with pytest.raises(ValueError, match=r"jit=True\) needs JAX"):
        collect_stats(_fwd, params, _batches(), jit=True)
    with pytest.raises(ValueError, match="'l1/w'.*observers"):
        merge_stats({"l1/w": record(_x((2, 6)))},
                    {"l1/w": record(_x((2, 6)), observer=MinMaxObserver())})


# ------------------------------------------------------------------- MiniLM


def test_minilm_calibration_data_and_stats():
    from arrayquant.apps.models import minilm, minilm_calibration

    cal = minilm_calibration.load_sentences("calibration")
    held = minilm_calibration.load_sentences("heldout")
    assert (len(cal), len(held)) == (64, 100)
    assert len(set(cal) | set(held) | set(minilm.DEMO_SENTENCES)) == 184
    with pytest.raises(ValueError, match="unknown sentence set"):
        minilm_calibration.load_sentences("demo")

    params = minilm.load_params()
    sentences = cal[:4]
    first = []  # each batch's input to the first layer

    def dense(x, w, b):
        if w is params["encoder.layer.0.attention.self.query.weight"]:
            first.append(x)
        return x @ w.T + b

    stats = minilm_calibration.collect_stats(params, sentences, batch_size=2,
                                             observer=MinMaxObserver(), linear=dense)
    assert len(stats) == 36 and len(first) == 2
    masks = [minilm.tokenize(sentences[i:i + 2])["attention_mask"].reshape(-1) for i in (0, 2)]
    p = "encoder.layer.0."
    q, k = stats[p + "attention.self.query.weight"], stats[p + "attention.self.key.weight"]
    _same(q, k, rtol=0)  # one input, recorded once
    assert float(q.count) == sum(int(m.sum()) for m in masks) and q.gram.shape == (384, 384)
    assert stats[p + "output.dense.weight"].features == 1536
    kept = np.concatenate([x[m != 0] for x, m in zip(first, masks)])
    _close(q, _reference(kept), 1e-9)
