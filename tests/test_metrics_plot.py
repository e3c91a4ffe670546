"""Error metrics and the quantization-error plot."""

from __future__ import annotations

import numpy as np
import pytest

import arrayquant as aq


def test_metrics_against_float64_reference(backend, call):
    rng = np.random.default_rng(0)
    x64 = rng.standard_normal((8, 16))
    x = backend.asarray(x64, "float32")
    qa = call(aq.quantize)(x, "int4", group_size=8)
    x_hat = call(aq.dequantize)(qa)
    xn = backend.to_numpy(x).astype(np.float64)
    hn = backend.to_numpy(x_hat).astype(np.float64)
    err = xn - hn
    assert float(backend.to_numpy(call(aq.mse)(x, x_hat))) == pytest.approx(np.mean(err**2),
                                                                          rel=1e-5)
    assert float(backend.to_numpy(call(aq.max_abs_error)(x, qa))) == pytest.approx(
        np.max(np.abs(err)), rel=1e-5)
    ref = 10 * np.log10(np.sum(xn**2) / np.sum(err**2))
    assert float(backend.to_numpy(call(aq.sqnr_db)(x, qa))) == pytest.approx(ref, rel=1e-4)


def test_metric_errors():
    with pytest.raises(ValueError, match="shapes differ"):
        aq.mse(np.ones(3, np.float32), np.ones(4, np.float32))
    assert aq.sqnr_db(np.ones(3, np.float32), np.ones(3, np.float32)) == np.inf


def test_plot_quantization_error(tmp_path):
    pytest.importorskip("matplotlib")
    from tests.test_affine import LESSON

    qa = aq.quantize(LESSON, "int8")
    path = aq.plot_quantization_error(LESSON, qa, tmp_path / "err.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert [p.name for p in tmp_path.iterdir()] == ["err.png"]  # no temp file left
    with pytest.raises(TypeError, match="QArray"):
        aq.plot_quantization_error(LESSON, LESSON, tmp_path / "x.png")
