"""aq.matmul / aq.linear / aq.quantize_activations on every backend, every formulation."""

from __future__ import annotations

import functools
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import arrayquant as aq
from arrayquant.products import activations, integer, plan
from arrayquant.products.arrays import weight_scales

QTYPES = ["int8", "uint8", "int4", "uint4", "int2", "uint2"]
# Every formulation name, from the one table (arrayquant/products/plan.py).
WEIGHT_ONLY = list(plan.WEIGHT_ONLY)
INTEGER = list(plan.INTEGER)
EPS32 = 2.0**-23


# ---------------------------------------------------------------- helpers


def _np_qarray(qa, backend):
    """The same QArray with NumPy fields (for references)."""
    return aq.QArray(
        backend.to_numpy(qa.data), backend.to_numpy(qa.scale), backend.to_numpy(qa.zero_point),
        *qa._static(),
    )


def _gran_kw(gran, g, kn):
    if gran == "tensor":
        return {}
    if gran == "channel":
        return {"axis": 1 if kn else 0}
    return {"group_size": g, "group_axis": 0 if kn else -1}


def _weight(backend, rng, n, k, qtype, sym, gran, g=4, kn=False):
    """A quantized (out, in) weight, or (in, out) when kn, built on the backend."""
    w = rng.standard_normal((n, k)) + (0.5 if not sym else 0.0)
    w = w.T if kn else w
    qa = aq.quantize(backend.asarray(w, "float32"), qtype, sym, **_gran_kw(gran, g, kn))
    return qa


def _w_hat_nk(qa_np, kn):
    w = np.asarray(aq.dequantize(qa_np), np.float64)
    return w.T if kn else w


def _abs_dequant_nk(qa_np, kn):
    """s * (|codes| + |z|): bounds the terms that formulations with zero points cancel."""
    s = np.asarray(qa_np.scale, np.float64)
    c = np.abs(np.asarray(qa_np.codes, np.float64))
    if qa_np.zero_point is not None:
        z = np.abs(np.asarray(qa_np.zero_point, np.float64))
        for d, b in enumerate(qa_np.block_shape):
            z = np.repeat(z, b, axis=d)
        c = c + z[tuple(slice(0, n) for n in qa_np.shape)]
    for d, b in enumerate(qa_np.block_shape):
        s = np.repeat(s, b, axis=d)
    out = c * s[tuple(slice(0, n) for n in qa_np.shape)]
    return out.T if kn else out


def _assert_close_to(y, ref, x64, qa_np, kn, factor=8.0):
    """|y - ref| within a float32 summation bound: factor * k * eps * |x| @ (s(|q| + |z|))."""
    k = x64.shape[-1]
    bound = factor * (k + 2) * EPS32 * (np.abs(x64) @ _abs_dequant_nk(qa_np, kn).T) + 1e-30
    err = np.abs(np.asarray(y, np.float64) - ref)
    assert np.all(err <= bound), f"max err {err.max()}, bound there {bound.flat[err.argmax()]}"


def _int64_acc(qx_np, qa_np, kn):
    """(G, m, n) int64 reference of sum (qx - zx)(qw - zw) per weight group along in."""
    cx = np.asarray(qx_np.codes, np.int64).reshape(-1, qx_np.shape[-1])
    if qx_np.zero_point is not None:
        cx = cx - np.asarray(qx_np.zero_point, np.int64).reshape(-1, 1)
    cw = np.asarray(qa_np.codes, np.int64)
    block = qa_np.block_shape
    zw = None if qa_np.zero_point is None else np.asarray(qa_np.zero_point, np.int64)
    if kn:
        cw, block = cw.T, block[::-1]
        zw = None if zw is None else zw.T
    n, k = cw.shape
    if zw is not None:
        zw = np.repeat(np.repeat(zw, block[0], axis=0), block[1], axis=1)[:n, :k]
        cw = cw - zw
    g = block[1]
    return np.stack([cx[:, j:j + g] @ cw[:, j:j + g].T for j in range(0, k, g)])


def _applies(formulation, backend, m, qa, kn, act):
    """Whether ``formulation`` applies to this case (else it must raise ValueError), as
    the formulation table says."""
    f = plan.TABLE[formulation]
    if act != (f.kind == plan.INTEGER_KIND):
        return False
    return f.applies(m, plan.weight_plan(qa, kn), backend.xp)


def _skip_eager_jax(backend):
    if backend.name == "jax":
        pytest.skip("eager JAX compiles every operation for every new shape, which makes this "
                    "test slow; jax-jit runs it, and test_every_*_formulation_equals_generic "
                    "runs every formulation eagerly on JAX")


# ---------------------------------------------------------------- import, float weights


def test_import_does_not_import_jax():
    code = (
        "import sys, numpy as np, arrayquant as aq\n"
        "x = np.ones((2, 8), np.float32)\n"
        "w = aq.quantize(np.ones((4, 8), np.float32), 'int4', True, group_size=4)\n"
        "aq.linear(x, w); aq.linear(x, w, act_dtype='int8')\n"
        "assert 'jax' not in sys.modules, 'arrayquant imported jax'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_float_weight_and_bias(backend, call):
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((5, 7)), rng.standard_normal((3, 7)), rng.standard_normal(3)
    xa, wa, ba = (backend.asarray(a, "float32") for a in (x, w, b))
    y = call(aq.linear)(xa, wa, ba)
    assert y.shape == (5, 3) and backend.to_numpy(y).dtype == np.float32
    np.testing.assert_allclose(backend.to_numpy(y), x @ w.T + b, rtol=1e-5, atol=1e-5)
    y = call(aq.matmul)(xa, backend.asarray(w.T, "float32"))
    np.testing.assert_allclose(backend.to_numpy(y), x @ w.T, rtol=1e-5, atol=1e-5)
    # A float weight with act_dtype: x is quantized per token, then a float product.
    y = backend.to_numpy(call(aq.linear)(xa, wa, None, act_dtype="int8"))
    x_hat = np.asarray(aq.dequantize(aq.quantize_activations(x.astype(np.float32))), np.float64)
    np.testing.assert_allclose(y, x_hat @ w.T, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- weight-only vs float64


# A few shapes (JAX compiles once per shape), every granularity and group size:
# k = 37 and 5 leave partial last groups and odd byte counts for most g.
MS, KS, NS, GS = [1, 3], [5, 37], [3, 8], [1, 2, 3, 4, 8, 16]


def _draw_weight_case(draw, group_sizes):
    """(m, k, n, qtype, symmetric, granularity, group size, (in, out) layout)."""
    m = draw(st.sampled_from(MS))
    k = draw(st.sampled_from(KS))
    n = draw(st.sampled_from(NS))
    qtype = draw(st.sampled_from(QTYPES))
    sym = qtype.startswith("i") and draw(st.booleans())
    gran = draw(st.sampled_from(["tensor", "channel", "group"]))
    g = draw(st.sampled_from(group_sizes))
    kn = draw(st.booleans())
    return m, k, n, qtype, sym, gran, g, kn


@st.composite
def weight_cases(draw):
    return (*_draw_weight_case(draw, GS), draw(st.integers(0, 2**16)))


# A third of the profile's examples: each one compiles a new program under jax-jit (at 30,
# these two tests took 2 of CI's 16 minutes).
HALF = settings(max_examples=max(10, settings.default.max_examples // 3))


@HALF
@given(case=weight_cases())
def test_weight_only_matches_float64_reference(backend, call, case):
    _skip_eager_jax(backend)
    m, k, n, qtype, sym, gran, g, kn, seed = case
    rng = np.random.default_rng(seed)
    qa = _weight(backend, rng, n, k, qtype, sym, gran, g, kn)
    x64 = rng.standard_normal((m, k))
    x = backend.asarray(x64, "float32")
    fn = aq.matmul if kn else aq.linear
    y = call(fn)(x, qa)
    assert y.shape == (m, n)
    y = backend.to_numpy(y)
    assert y.dtype == np.float32
    qa_np = _np_qarray(qa, backend)
    x32 = x64.astype(np.float32).astype(np.float64)
    _assert_close_to(y, x32 @ _w_hat_nk(qa_np, kn).T, x32, qa_np, kn)


# ---------------------------------------------------------------- integer sums are exact


@st.composite
def integer_cases(draw):
    # Group size 1 (per input channel) cannot take the integer path.
    weight = _draw_weight_case(draw, GS[1:])
    act = draw(st.sampled_from([("int8", True), ("int8", False), ("uint8", False),
                                ("int4", True), ("int2", False)]))
    return (*weight, act, draw(st.integers(0, 2**16)))


@HALF
@given(case=integer_cases())
def test_integer_accumulation_is_exact_and_rescaled(backend, call, case):
    _skip_eager_jax(backend)
    m, k, n, qtype, sym, gran, g, kn, (act, act_sym), seed = case
    rng = np.random.default_rng(seed)
    qa = _weight(backend, rng, n, k, qtype, sym, gran, g, kn)
    x64 = rng.standard_normal((m, k)) * 3 + 1
    x = backend.asarray(x64, "float32")
    xp = backend.xp
    wp = plan.weight_plan(qa, kn)
    forms = [f for f in INTEGER if _applies(f, backend, m, qa, kn, True)]
    fn = aq.matmul if kn else aq.linear

    def run(x, qa):  # everything in one function: one compilation under jit
        qx = aq.quantize_activations(x, act, act_sym)
        act_rows = activations.act_rows(qx, k, xp)
        accs = [integer.integer_accumulate(act_rows, qa, wp, xp, f)[0] for f in forms]
        y = fn(x, qa, act_dtype=act, act_symmetric=act_sym)
        return qx, accs, y, fn(qx, qa)

    qx, accs, y, y2 = call(run)(x, qa)
    qa_np, qx_np = _np_qarray(qa, backend), _np_qarray(qx, backend)
    ref = _int64_acc(qx_np, qa_np, kn)
    for formulation, acc in zip(forms, accs):
        acc = backend.to_numpy(acc)
        assert acc.dtype == np.int32, formulation
        np.testing.assert_array_equal(acc, ref, err_msg=formulation)
    # End to end: y = s_x * sum_g s_w * acc, compared with the dequantized product.
    y = backend.to_numpy(y)
    assert y.shape == (m, n) and y.dtype == np.float32
    x_hat = np.asarray(aq.dequantize(qx_np), np.float64)
    w_hat = _w_hat_nk(qa_np, kn)
    bound = 16 * EPS32 * (np.abs(x_hat) @ np.abs(w_hat).T) + 1e-30
    assert np.all(np.abs(y - x_hat @ w_hat.T) <= bound)
    # The same with the quantized x passed in (XLA may contract the epilogue into FMAs
    # differently in the two copies, so equal up to rounding).
    np.testing.assert_allclose(y, backend.to_numpy(y2), rtol=1e-6, atol=1e-6 * np.abs(y).max())


# ---------------------------------------------------------------- each fast path = generic

FAST_CASES = [
    # (m, k, n, qtype, sym, gran, g, kn)
    (1, 37, 6, "int8", True, "channel", 4, False),
    (3, 37, 6, "uint8", False, "channel", 4, False),
    (1, 37, 6, "int4", True, "group", 8, False),
    (3, 37, 6, "uint4", False, "group", 6, False),
    (1, 37, 6, "int4", False, "group", 5, False),  # odd groups: the fields do not line up
    (3, 37, 6, "int2", True, "tensor", 4, False),
    (1, 37, 9, "uint4", False, "group", 4, True),  # (in, out), packed along out
    (3, 37, 9, "int8", False, "group", 7, True),
]


@pytest.mark.parametrize("case", FAST_CASES)
def test_every_formulation_equals_generic(backend, call, case):
    """Each weight-only formulation against ``dequantize`` (float32 rounding), each
    integer one against ``int32`` (same exact sums, same epilogue); the ones that do
    not apply raise ValueError naming the formulation."""
    m, k, n, qtype, sym, gran, g, kn = case
    if backend.name == "jax" and FAST_CASES.index(case) % 2:
        pytest.skip("eager JAX compiles every operation per shape: half the cases eagerly, "
                    "all of them under jax-jit")
    rng = np.random.default_rng(k * n + m)
    qa = _weight(backend, rng, n, k, qtype, sym, gran, g, kn)
    x64 = rng.standard_normal((m, k)) + 0.3
    x = backend.asarray(x64, "float32")
    fn = aq.matmul if kn else aq.linear
    runs = [("auto", {}), ("auto", {"act_dtype": "int8"}),
            ("auto", {"act_dtype": "int8", "act_symmetric": False})]
    for formulation in WEIGHT_ONLY + INTEGER:
        act = formulation in INTEGER
        kw = {"act_dtype": "int8"} if act else {}
        if not _applies(formulation, backend, m, qa, kn, act):
            with pytest.raises(ValueError, match=f"formulation='{formulation}'"):
                fn(x, qa, formulation=formulation, **kw)
            continue
        runs.append((formulation, kw))
        if act:
            runs.append((formulation, {"act_dtype": "int8", "act_symmetric": False}))

    def run(x, qa):  # one function: one compilation under jit
        return [fn(x, qa, formulation=f, **kw) for f, kw in runs]

    ys = [backend.to_numpy(y) for y in call(run)(x, qa)]
    qa_np = _np_qarray(qa, backend)
    x32 = x64.astype(np.float32).astype(np.float64)
    ref = {}
    for (formulation, kw), y in zip(runs, ys):
        assert y.shape == (m, n) and y.dtype == np.float32, formulation
        ref.setdefault(tuple(kw.items()), []).append((formulation, y))
    for key, results in ref.items():
        generic = dict(results)["int32" if key else "dequantize"]
        for formulation, y in results:
            if key:  # exact integer sums, the same epilogue: equal up to summation order
                np.testing.assert_allclose(y, generic, rtol=1e-6,
                                           atol=1e-6 * np.abs(generic).max(), err_msg=formulation)
            else:
                _assert_close_to(y, generic.astype(np.float64), x32, qa_np, kn)


# Cases where each table entry both applies and does not: (out, in) per channel int8,
# uint4 in groups of 6 (whole bytes), int4 in groups of 5 (not), (in, out) packed along out.
TABLE_CASES = [FAST_CASES[i] for i in (0, 3, 4, 6)]


@pytest.mark.parametrize("name", list(plan.TABLE))
def test_table_predicate_agrees_with_the_function(backend, call, name):
    """For every entry of the formulation table: where its predicate says it does not
    apply, forcing it raises the table's error; where it does, its function computes the
    product: weight-only equal to ``dequantize`` up to float32 rounding, integer sums
    equal to the ``int32`` ones and to an int64 reference exactly."""
    _skip_eager_jax(backend)
    f = plan.TABLE[name]
    is_int = f.kind == plan.INTEGER_KIND
    xp = backend.xp
    for case in TABLE_CASES:
        m, k, n, qtype, sym, gran, g, kn = case
        rng = np.random.default_rng(k * n + m)
        qa = _weight(backend, rng, n, k, qtype, sym, gran, g, kn)
        x64 = rng.standard_normal((m, k)) + 0.3
        x = backend.asarray(x64, "float32")
        fn = aq.matmul if kn else aq.linear
        kw = {"act_dtype": "int8", "act_symmetric": False} if is_int else {}
        wp = plan.weight_plan(qa, kn)
        if not f.applies(m, wp, xp):
            with pytest.raises(ValueError) as err:
                fn(x, qa, formulation=name, **kw)
            assert str(err.value) == f.refusal(m, wp, xp), case
            continue

        def run(x, qa, wp=wp, fn=fn, kw=kw, m=m, k=k):
            if is_int:
                act = activations.act_rows(aq.quantize_activations(x, "int8", False), k, xp)
                _, zw = weight_scales(qa, wp, xp)
                return (f.function(act, qa, wp, zw, xp),
                        integer.integer_accumulate(act, qa, wp, xp, "int32")[0],
                        fn(x, qa, formulation=name, **kw), fn(x, qa, formulation="int32", **kw))
            x2 = xp.reshape(x, (m, k))
            return (f.function(x2, qa, wp, xp.float32, xp), fn(x, qa, formulation=name),
                    fn(x, qa, formulation="dequantize"))

        out = [backend.to_numpy(a) for a in call(run)(x, qa)]
        qa_np = _np_qarray(qa, backend)
        if is_int:
            direct, generic_acc, y, generic = out
            assert direct.dtype == np.int32, case
            np.testing.assert_array_equal(direct, generic_acc, err_msg=str(case))
            qx_np = aq.quantize_activations(x64.astype(np.float32), "int8", False)
            np.testing.assert_array_equal(direct, _int64_acc(qx_np, qa_np, kn), err_msg=str(case))
            np.testing.assert_allclose(y, generic, rtol=1e-6, atol=1e-6 * np.abs(generic).max())
        else:
            x32 = x64.astype(np.float32).astype(np.float64)
            for y in out[:2]:
                assert y.shape == (m, n), case
                _assert_close_to(y, out[2].astype(np.float64), x32, qa_np, kn)


def test_docstring_lists_the_table():
    """``linear``'s docstring lists every formulation of the table with its summary."""
    for name, f in plan.TABLE.items():
        assert f'``"{name}"``: {f.summary}' in aq.linear.__doc__, name
    assert plan.FORMULATIONS == ("auto", *plan.TABLE)
    assert aq.products.FORMULATIONS == plan.FORMULATIONS


def test_large_gemv_paths_match_generic():
    """Shapes with several slabs and chunks: slabs, gemv, int-gemv, float-exact (float64)."""
    rng = np.random.default_rng(3)
    k, n = 2100, 300  # k * 127 * 127 > 2**24: int-gemv needs 3 chunks, float-exact float64
    x = rng.standard_normal((1, k)).astype(np.float32)
    for kw in ({"dtype": "int8", "axis": 0}, {"dtype": "int4", "group_size": 128},
               {"dtype": "uint4", "group_size": 64}):
        qa = aq.quantize(rng.standard_normal((n, k)).astype(np.float32), **kw)
        generic = aq.linear(x, qa, formulation="dequantize")
        for f in ("slabs", "gemv", "auto"):
            np.testing.assert_allclose(aq.linear(x, qa, formulation=f), generic, rtol=2e-4,
                                       atol=2e-4 * np.abs(generic).max())
        exact = aq.linear(x, qa, act_dtype="int8", formulation="int32")
        act = activations.act_rows(aq.quantize_activations(x), k, np)
        wp = plan.weight_plan(qa, False)
        acc = integer.integer_accumulate(act, qa, wp, np, "int32")[0]
        for f in ("float-exact", "int-gemv"):
            np.testing.assert_array_equal(integer.integer_accumulate(act, qa, wp, np, f)[0], acc)
            # Same sums, same epilogue; the sum over groups may add in another order.
            np.testing.assert_allclose(aq.linear(x, qa, act_dtype="int8", formulation=f),
                                       exact, rtol=1e-6, atol=1e-6 * np.abs(exact).max())


# ---------------------------------------------------------------- int32 overflow boundary


@pytest.mark.parametrize(
    ("act", "act_sym", "wt", "w_sym", "limit"),
    [("int8", True, "int8", True, 133144), ("int8", False, "int8", False, 32767),
     ("int8", True, "int8", False, 66052), ("int8", True, "int4", True, 2415617)],
)
def test_int32_safe_in_features(act, act_sym, wt, w_sym, limit):
    assert aq.int32_safe_in_features(act, wt, act_symmetric=act_sym,
                                     weight_symmetric=w_sym) == limit


def test_overflow_boundary_is_static_and_exact(backend, call):
    _skip_eager_jax(backend)
    limit = aq.int32_safe_in_features("int8", "int8")
    ones = np.ones((1, limit + 1))
    w = aq.quantize(backend.asarray(ones, "float32"), "int8", True, axis=0)
    x = backend.asarray(ones, "float32")
    with pytest.raises(ValueError, match=r"int32 accumulation could overflow: 133145 terms"):
        aq.linear(x, w, act_dtype="int8")
    # At the limit, every code at q_max: the largest sum, 133144 * 127 * 127, is exact.
    w = aq.quantize(backend.asarray(ones[:, :limit], "float32"), "int8", True, axis=0)
    x = backend.asarray(ones[:, :limit], "float32")
    qx = aq.quantize_activations(x)
    xp = backend.xp
    for formulation in INTEGER:
        if not _applies(formulation, backend, 1, w, False, True):
            continue
        acc, _ = integer.integer_accumulate(activations.act_rows(qx, limit, xp), w,
                                            plan.weight_plan(w, False), xp, formulation)
        assert int(backend.to_numpy(acc)[0, 0, 0]) == limit * 127 * 127 == 2147479576
    # Groups along in reset the bound: each group's sum is checked on its own.
    w = aq.quantize(backend.asarray(ones, "float32"), "int8", True, group_size=1024)
    y = backend.to_numpy(call(aq.linear)(backend.asarray(ones, "float32"), w, act_dtype="int8"))
    np.testing.assert_allclose(y, [[limit + 1]], rtol=1e-5)


# ---------------------------------------------------------------- activations


def test_quantize_activations_is_per_token(backend, call):
    rng = np.random.default_rng(4)
    x64 = rng.standard_normal((2, 3, 10)) * np.array([1.0, 10.0, 0.0])[None, :, None]
    x = backend.asarray(x64, "float32")
    qx = call(aq.quantize_activations)(x)
    assert qx.block_shape == (1, 1, 10) and qx.zero_point is None
    s = backend.to_numpy(qx.scale)
    assert s.shape == (2, 3, 1)
    expected = np.abs(x64.astype(np.float32)).max(axis=-1, keepdims=True) / 127
    np.testing.assert_allclose(s[:, :2], expected[:, :2], rtol=1e-6)
    qa = call(aq.quantize_activations)(x, "uint8", False)
    assert backend.to_numpy(qa.zero_point).shape == (2, 3, 1)
    q1 = call(aq.quantize_activations)(backend.asarray(x64[0, 0], "float32"))
    assert q1.scale.shape == (1,)
    with pytest.raises(ValueError, match="at least 1 dimension"):
        aq.quantize_activations(backend.asarray(np.float32(1.0)))
    with pytest.raises(TypeError, match="floating-point"):
        aq.quantize_activations(backend.asarray(np.ones((2, 2), np.int32)))


def test_leading_axes_bias_and_dtypes(backend, call):
    _skip_eager_jax(backend)
    rng = np.random.default_rng(5)
    x64, w64, b64 = rng.standard_normal((2, 3, 16)), rng.standard_normal((5, 16)), np.arange(5.0)
    qa = aq.quantize(backend.asarray(w64, "float32"), "int4", True, group_size=8)
    b = backend.asarray(b64, "float32")
    for act in (None, "int8"):
        y = call(aq.linear)(backend.asarray(x64, "float32"), qa, b, act_dtype=act)
        assert y.shape == (2, 3, 5)
        flat = call(aq.linear)(backend.asarray(x64.reshape(6, 16), "float32"), qa, b,
                               act_dtype=act)
        np.testing.assert_allclose(backend.to_numpy(y).reshape(6, 5), backend.to_numpy(flat),
                                   rtol=1e-6, atol=1e-6)
        y1 = call(aq.linear)(backend.asarray(x64[0, 0], "float32"), qa, b, act_dtype=act)
        assert y1.shape == (5,)
    for fdt in ("float16", "bfloat16", "float64"):
        if fdt not in backend.float_dtypes():
            continue
        xl = backend.asarray(x64, fdt)
        ql = aq.quantize(backend.asarray(w64, fdt), "int8", True, axis=0)
        for act in (None, "int8"):
            y = call(aq.linear)(xl, ql, act_dtype=act)
            assert aq._backend.dtype_name(y.dtype) == fdt


def test_empty_batch_gives_empty_result(backend, call):
    """An x without rows gives ``(..., 0, n)`` on every path, as a non-empty x would."""
    rng = np.random.default_rng(8)
    w64 = rng.standard_normal((5, 16))
    fdts = [f for f in ("float32", "float16") if f in backend.float_dtypes()]
    for fdt in fdts:
        weights = [backend.asarray(w64, fdt),
                   aq.quantize(backend.asarray(w64, fdt), "int8", True, axis=0),
                   aq.quantize(backend.asarray(w64, fdt), "uint4", group_size=8)]
        for w in weights:
            for act, sym in ((None, True), ("int8", True), ("int8", False), ("uint8", False)):
                for lead in ((0,), (3, 0)):
                    x = backend.asarray(np.ones((*lead, 16)), fdt)
                    y = call(aq.linear)(x, w, act_dtype=act, act_symmetric=sym)
                    full = call(aq.linear)(backend.asarray(np.ones((2, 16)), fdt), w,
                                           act_dtype=act, act_symmetric=sym)
                    assert tuple(y.shape) == (*lead, 5)
                    assert aq._backend.dtype_name(y.dtype) == aq._backend.dtype_name(full.dtype)
    # The checks of a non-empty x still apply.
    with pytest.raises(ValueError, match="symmetric=True needs a signed dtype"):
        aq.linear(backend.asarray(np.ones((0, 16)), "float32"),
                  aq.quantize(backend.asarray(w64, "float32"), "int8", True, axis=0),
                  act_dtype="uint8")


def test_linear_partial_for_a_model(backend, call):
    """How a model picks W8A8: functools.partial(aq.linear, act_dtype="int8")."""
    _skip_eager_jax(backend)
    rng = np.random.default_rng(6)
    params = {
        "a.weight": aq.quantize(backend.asarray(rng.standard_normal((8, 12)), "float32"), "int8",
                                True, axis=0),
        "a.bias": backend.asarray(rng.standard_normal(8), "float32"),
        "b.weight": aq.quantize(backend.asarray(rng.standard_normal((4, 8)), "float32"), "int4",
                                True, group_size=4),
        "c.weight": backend.asarray(rng.standard_normal((4, 4)), "float32"),  # left in float
    }
    x = backend.asarray(rng.standard_normal((7, 12)), "float32")
    for linear in (aq.linear, functools.partial(aq.linear, act_dtype="int8")):
        def forward(params, x, linear=linear):
            for name in ("a", "b", "c"):
                x = linear(x, params[name + ".weight"], params.get(name + ".bias"))
            return x

        y = backend.to_numpy(call(forward)(params, x) if not backend.jit else
                             _jit_tree(forward)(params, x))
        assert y.shape == (7, 4) and np.all(np.isfinite(y))


def _jit_tree(f):
    import jax

    return jax.jit(f)


# ---------------------------------------------------------------- jit and vmap


@pytest.mark.parametrize(("qtype", "kw", "act"), [("int8", {"axis": 0}, "int8"),
                                                  ("uint4", {"group_size": 8}, None)])
def test_vmap_over_tokens_and_weights(qtype, kw, act):
    """vmap over tokens, over single rows (the GEMV formulations) and over weights;
    references computed with NumPy (cheaper than eager JAX, and the same numbers)."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    rng = np.random.default_rng(7)
    xs_np = rng.standard_normal((3, 2, 16)).astype(np.float32)
    ws_np = rng.standard_normal((3, 5, 16)).astype(np.float32)
    xs = jnp.asarray(xs_np)
    qa = aq.quantize(jnp.asarray(ws_np[0]), qtype, **kw)
    qa_np = aq.quantize(ws_np[0], qtype, **kw)
    ys = np.stack([aq.linear(x, qa_np, act_dtype=act) for x in xs_np])
    yv = jax.vmap(lambda x: aq.linear(x, qa, act_dtype=act))(xs)
    np.testing.assert_allclose(yv, ys, rtol=1e-5, atol=1e-5)
    yv1 = jax.vmap(lambda x: aq.linear(x[None], qa, act_dtype=act))(xs[:, 0])
    np.testing.assert_allclose(yv1[:, 0], ys[:, 0], rtol=1e-5, atol=1e-5)
    qs = jax.vmap(lambda w: aq.quantize(w, qtype, **kw))(jnp.asarray(ws_np))
    yw = jax.vmap(lambda q: aq.linear(xs[0], q, act_dtype=act))(qs)
    one = [aq.linear(xs_np[0], aq.quantize(w, qtype, **kw), act_dtype=act) for w in ws_np]
    np.testing.assert_allclose(yw, np.stack(one), rtol=1e-5, atol=1e-5)


def test_jit_equals_eager():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.standard_normal((4, 32)), jnp.float32)
    b = jnp.asarray(rng.standard_normal(6), jnp.float32)
    for qtype, kw in (("uint4", {"group_size": 8}),):
        qa = aq.quantize(jnp.asarray(rng.standard_normal((6, 32)), jnp.float32), qtype, **kw)
        for act in (None, "int8"):
            for xx in (x[:1],):
                eager = aq.linear(xx, qa, b, act_dtype=act)
                jitted = jax.jit(lambda x, q, b, act=act: aq.linear(x, q, b, act_dtype=act))
                np.testing.assert_allclose(jitted(xx, qa, b), eager, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- layouts agree


@pytest.mark.parametrize("qtype", ["int4"])
def test_matmul_in_out_layout_equals_linear(backend, call, qtype):
    _skip_eager_jax(backend)
    rng = np.random.default_rng(9)
    w = backend.asarray(rng.standard_normal((6, 20)), "float32")
    wt = backend.asarray(backend.to_numpy(w).T.copy())
    x = backend.asarray(rng.standard_normal((3, 20)), "float32")
    for kw_nk, kw_kn in (({"axis": 0}, {"axis": 1}),
                         ({"group_size": 4}, {"group_size": 4, "group_axis": 0})):
        q_nk = aq.quantize(w, qtype, **kw_nk)
        q_kn = aq.quantize(wt, qtype, **kw_kn)
        for act in (None, "int8"):
            a = backend.to_numpy(call(aq.linear)(x, q_nk, act_dtype=act))
            b = backend.to_numpy(call(aq.matmul)(x, q_kn, act_dtype=act))
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- errors


def test_errors():
    rng = np.random.default_rng(10)
    x = rng.standard_normal((2, 8)).astype(np.float32)
    w = rng.standard_normal((4, 8)).astype(np.float32)
    qw = aq.quantize(w, "int8", True, axis=0)
    with pytest.raises(ValueError, match=r"x has 7 features .* w of shape \(4, 8\) \(out, in\)"):
        aq.linear(x[:, :7], qw)
    with pytest.raises(ValueError, match=r"x has 8 features .* \(in, out\) expects 4"):
        aq.matmul(x, w)
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        aq.linear(x, qw, np.ones(3, np.float32))
    with pytest.raises(ValueError, match="w must be 2-D"):
        aq.linear(x, w[None])
    with pytest.raises(ValueError, match="at least 1 dimension"):
        aq.linear(np.float32(1.0), w)
    with pytest.raises(TypeError, match="x must be a floating-point array"):
        aq.linear(x.astype(np.int32), qw)
    with pytest.raises(TypeError, match="w must be an array or an arrayquant.QArray; got list"):
        aq.linear(x, [[1.0]])
    with pytest.raises(ValueError, match="unknown formulation 'fast'"):
        aq.linear(x, qw, formulation="fast")
    with pytest.raises(ValueError, match="'jax-dot' is an integer formulation"):
        aq.linear(x, qw, formulation="jax-dot")
    with pytest.raises(ValueError, match="weight-only formulation, but x is quantized"):
        aq.linear(x, qw, act_dtype="int8", formulation="epilogue")
    with pytest.raises(ValueError, match="per input channel .* cannot be taken out"):
        aq.linear(x, aq.quantize(w, "int8", True, axis=1), act_dtype="int8")
    with pytest.raises(ValueError, match="at most 8 bits; the weight is int16"):
        aq.linear(x, aq.quantize(w, "int16", True, axis=0), act_dtype="int8")
    with pytest.raises(ValueError, match="at most 8 bits; the activation is int16"):
        aq.linear(x, qw, act_dtype="int16")
    with pytest.raises(ValueError, match="symmetric=True needs a signed dtype"):
        aq.linear(x, qw, act_dtype="uint8")
    with pytest.raises(ValueError, match="x is already quantized"):
        aq.linear(aq.quantize_activations(x), qw, act_dtype="int8")
    with pytest.raises(ValueError, match="one scale per row"):
        aq.linear(aq.quantize(x, "int8", axis=1), qw)
    with pytest.raises(TypeError, match="act_symmetric must be True or False"):
        aq.linear(x, qw, act_dtype="int8", act_symmetric=None)
    with pytest.raises(ValueError, match="'epilogue' needs a weight whose scale is constant"):
        aq.linear(x, aq.quantize(w, "int8", group_size=4), formulation="epilogue")
    with pytest.raises(ValueError, match="'grouped' needs a weight quantized in groups"):
        aq.linear(x, qw, formulation="grouped")
    with pytest.raises(ValueError, match="'fields' .* not packed"):
        aq.linear(x, qw, formulation="fields")
    with pytest.raises(ValueError, match="groups of 3 along the in axis, not a multiple of the 2"):
        aq.linear(x, aq.quantize(w, "int4", group_size=3), formulation="fields")
    with pytest.raises(ValueError, match="'slabs' .* packed along the out axis"):
        aq.matmul(x, aq.quantize(w.T.copy(), "int4", axis=1), formulation="slabs")
    with pytest.raises(ValueError, match="'gemv' is the one-row product .* x has 2 rows"):
        aq.linear(x, qw, formulation="gemv")
    with pytest.raises(ValueError, match="'int-gemv' is the one-row product"):
        aq.linear(x, qw, act_dtype="int8", formulation="int-gemv")
    with pytest.raises(ValueError, match="'jax-dot' needs JAX arrays"):
        aq.linear(x, qw, act_dtype="int8", formulation="jax-dot")
    with pytest.raises(ValueError, match=r"w must be 2-D \(out, in\); got shape \(1, 4, 8\)"):
        aq.linear(x, aq.quantize(w[None], "int8"))


def test_float_exact_refused_on_jax():
    jnp = pytest.importorskip("jax.numpy")
    x = jnp.ones((2, 8), jnp.float32)
    qw = aq.quantize(jnp.ones((4, 8), jnp.float32), "int8", True, axis=0)
    with pytest.raises(ValueError, match="'float-exact' may need float64"):
        aq.linear(x, qw, act_dtype="int8", formulation="float-exact")


# ---------------------------------------------------------------- a real model


def test_minilm_w8a8_and_weight_only_embeddings():
    """all-MiniLM-L6-v2 through aq.linear: W8A16 and W8A8 stay close to the reference."""
    from arrayquant.apps.models import minilm

    try:
        params = minilm.load_params()
    except ModuleNotFoundError as e:
        pytest.skip(str(e))
    ref = np.load("tests/data/minilm_reference.npz")["embeddings"]
    tokens = minilm.tokenize(minilm.DEMO_SENTENCES)
    names = [f"encoder.layer.{i}.{n}" for i in range(6) for n in minilm._LINEAR_NAMES]
    qparams = dict(params)
    for name in names:
        qparams[name + ".weight"] = aq.quantize(params[name + ".weight"], "int8", True, axis=0)
    for linear, min_cos in ((aq.linear, 0.999),
                            (functools.partial(aq.linear, act_dtype="int8"), 0.99)):
        emb = minilm.encode(qparams, tokens, linear=linear)
        assert emb.shape == (20, 384) and emb.dtype == np.float32
        assert np.sum(emb * ref, axis=1).min() >= min_cos
