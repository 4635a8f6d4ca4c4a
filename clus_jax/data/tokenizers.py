"""Text tokenizers: CLIP byte-level BPE (id-exact with open_clip) and SentencePiece models.

Every tokenizer maps a string or a list of strings to an int32 array ``[n, context_length]``, padded with
id 0 after the end token; that is what the text tower treats as padding (``models/text.py``: the run of 0s
after a row's last other token). Id 0 inside a text is an ordinary token (CLIP's '!', SentencePiece's
``<unk>`` in most models). A SentencePiece model with a pad piece at another id has that id and id 0
swapped, so its padding is 0 as well. ``create_tokenizer(name, context_length, path)`` picks one by name:
``'clip'`` or ``'sentencepiece'``.

The CLIP vocabulary (``bpe_simple_vocab_16e6.txt.gz``, MIT, from OpenAI CLIP) is not part of the repository.
It is resolved in this order:

1. an explicit ``vocab_path``;
2. the ``CLUS_JAX_CLIP_VOCAB`` environment variable;
3. the copy inside an installed ``open_clip`` package (``pip install --no-deps open-clip-torch``), located
   without importing it (importing open_clip imports torch);
4. the cache directory, ``$CLUS_JAX_CACHE`` or ``~/.cache/clus_jax``;
5. the open-clip-torch wheel fetched from the package index with pip, from which the file is extracted into
   the cache and checked against a pinned sha256.
"""
from __future__ import annotations

import functools
import gzip
import html
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import ftfy
import numpy as np
from absl import logging

from clus_jax.common.cache import (cache_dir, extract_wheel_member, fetch_wheel_member, package_dir,
                                   pip_download_wheel)

CLIP_VOCAB_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
CLIP_VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
CLIP_VOCAB_WHEEL_REQUIREMENT = "open-clip-torch==3.3.0"
CLIP_VOCAB_WHEEL_MEMBER = "open_clip/" + CLIP_VOCAB_FILENAME
CLIP_VOCAB_ENV = "CLUS_JAX_CLIP_VOCAB"

_SOT = "<start_of_text>"
_EOT = "<end_of_text>"
# open_clip's pre-tokenisation pattern (special tokens are matched separately as added tokens).
_CLIP_SPLIT_PATTERN = r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


# ----------------------------------------------------------------------------------------------------------
# CLIP vocabulary resolution
# ----------------------------------------------------------------------------------------------------------


def download_open_clip_wheel(dest_dir: str | Path) -> Path:
    """The open-clip-torch wheel the vocabulary is extracted from, fetched with pip into ``dest_dir``."""
    return pip_download_wheel(dest_dir, CLIP_VOCAB_WHEEL_REQUIREMENT)


def extract_clip_vocab(wheel: str | Path, dest: str | Path, sha256: str = CLIP_VOCAB_SHA256) -> Path:
    """Extracts the CLIP vocabulary from an open-clip-torch wheel to ``dest``, checking its sha256 (written
    beside ``dest`` and renamed into place after the check, so a cache never holds a partial or wrong one)."""
    return extract_wheel_member(wheel, CLIP_VOCAB_WHEEL_MEMBER, dest, sha256)


def fetch_clip_vocab(dest: str | Path,
                     download: Callable[[Path], str | Path] = download_open_clip_wheel) -> Path:
    """Fetches the CLIP vocabulary into ``dest``: ``download(tmpdir)`` returns a wheel, which is extracted."""
    return fetch_wheel_member(CLIP_VOCAB_WHEEL_REQUIREMENT, CLIP_VOCAB_WHEEL_MEMBER, dest, CLIP_VOCAB_SHA256,
                              download=download)


def resolve_clip_vocab(vocab_path: str | os.PathLike | None = None, *,
                       download: Callable[[Path], str | Path] = download_open_clip_wheel) -> str:
    """Returns a path to the CLIP BPE vocabulary, trying the sources listed in the module docstring in order."""
    if vocab_path is not None:
        if not os.path.isfile(vocab_path):
            raise FileNotFoundError(f"CLIP vocabulary not found at the given vocab_path: {os.fspath(vocab_path)!r}")
        logging.info("CLIP vocabulary: %s (explicit path)", vocab_path)
        return os.fspath(vocab_path)

    env_path = os.environ.get(CLIP_VOCAB_ENV)
    if env_path:
        if not os.path.isfile(env_path):
            raise FileNotFoundError(f"CLIP vocabulary not found at ${CLIP_VOCAB_ENV}={env_path!r}")
        logging.info("CLIP vocabulary: %s (from $%s)", env_path, CLIP_VOCAB_ENV)
        return env_path

    pkg = package_dir("open_clip")
    if pkg is not None and (pkg / CLIP_VOCAB_FILENAME).is_file():
        logging.info("CLIP vocabulary: %s (installed open_clip package)", pkg / CLIP_VOCAB_FILENAME)
        return str(pkg / CLIP_VOCAB_FILENAME)

    cached = cache_dir() / CLIP_VOCAB_FILENAME
    if cached.is_file():
        logging.info("CLIP vocabulary: %s (cache)", cached)
        return str(cached)

    logging.warning("CLIP vocabulary: fetching %s from the package index into %s",
                 CLIP_VOCAB_WHEEL_REQUIREMENT, cached)
    path = fetch_clip_vocab(cached, download)
    logging.info("CLIP vocabulary: %s (fetched, sha256 verified)", path)
    return str(path)


# ----------------------------------------------------------------------------------------------------------
# CLIP BPE
# ----------------------------------------------------------------------------------------------------------


@functools.lru_cache()
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 byte-to-character map: every byte gets a printable, non-whitespace character."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clip_clean_text(text: str) -> str:
    """open_clip's 'lower' cleaning: ftfy, HTML unescape twice, whitespace collapse, lower case.

    The order matters and follows open_clip (ftfy first). Lower-casing happens here in Python rather than in
    the Rust normaliser so that context-sensitive cases (final sigma) match ``str.lower``.
    """
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).strip().lower()


@functools.lru_cache(maxsize=4)
def _build_clip_bpe(vocab_path: str):
    """Builds the fast `tokenizers` BPE equivalent to open_clip's SimpleTokenizer (cached per file)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    with gzip.open(vocab_path) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    base = list(bytes_to_unicode().values())
    vocab = base + [v + "</w>" for v in base] + ["".join(m) for m in merges] + [_SOT, _EOT]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(vocab)}, merges=merges,
                               end_of_word_suffix="</w>", continuing_subword_prefix="", fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.BPEDecoder(suffix="</w>")
    tok.add_special_tokens([_SOT, _EOT])
    return tok, vocab


def _pack(rows: Sequence[list[int]], context_length: int, pad_id: int, end_id: int | None) -> np.ndarray:
    """Stacks id lists into ``[n, context_length]``; over-long rows are cut, keeping ``end_id`` last if given."""
    out = np.full((len(rows), context_length), pad_id, dtype=np.int32)
    for i, ids in enumerate(rows):
        if len(ids) > context_length:
            ids = ids[:context_length]
            if end_id is not None:
                ids[-1] = end_id
        out[i, :len(ids)] = ids
    return out


class ClipTokenizer:
    """CLIP byte-level BPE (49408 tokens) giving the same ids as ``open_clip.tokenize``.

    Rows are ``<start_of_text> ids <end_of_text>`` zero padded to ``context_length``; longer texts are cut to
    ``context_length`` with ``<end_of_text>`` as the last token, as open_clip does.
    """

    def __init__(self, vocab_path: str | None = None, context_length: int = 77):
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (room for start and end tokens), got {context_length}")
        self.vocab_path = resolve_clip_vocab(vocab_path)
        self.context_length = int(context_length)
        self._tok, self._vocab = _build_clip_bpe(self.vocab_path)
        self._byte_decoder = {c: b for b, c in bytes_to_unicode().items()}

    def __getstate__(self):
        return {"vocab_path": self.vocab_path, "context_length": self.context_length}

    def __setstate__(self, state):
        self.__init__(state["vocab_path"], state["context_length"])

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    @property
    def sot_token_id(self) -> int:
        return len(self._vocab) - 2

    @property
    def eot_token_id(self) -> int:
        return len(self._vocab) - 1

    @property
    def pad_token_id(self) -> int:
        return 0

    def _encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        cleaned = [clip_clean_text(t) for t in texts]
        return [e.ids for e in self._tok.encode_batch(cleaned, add_special_tokens=False)]

    def encode(self, text: str) -> list[int]:
        """BPE ids of one text, without start/end tokens and without truncation."""
        return self._encode_batch([text])[0]

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
        """Tokenises a text or a batch of texts to int32 ``[n, context_length]``."""
        if isinstance(texts, str):
            texts = [texts]
        rows = [[self.sot_token_id, *ids, self.eot_token_id] for ids in self._encode_batch(list(texts))]
        return _pack(rows, self.context_length, self.pad_token_id, self.eot_token_id)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of a token sequence: stops at the first end token, skips start tokens, word-ends become spaces.

        Padding after the end token is ignored. Id 0 is a real token ('!'), so a sequence without an end token
        is decoded in full.
        """
        data = bytearray()
        for i in np.asarray(ids).reshape(-1).tolist():
            if i == self.eot_token_id:
                break
            if i == self.sot_token_id:
                continue
            piece = self._vocab[i]
            word_end = piece.endswith("</w>")
            data.extend(self._byte_decoder[c] for c in (piece[:-4] if word_end else piece))
            if word_end:
                data.extend(b" ")
        return data.decode("utf-8", errors="replace").strip()


# ----------------------------------------------------------------------------------------------------------
# SentencePiece
# ----------------------------------------------------------------------------------------------------------


class SentencePieceTokenizer:
    """A SentencePiece model loaded from a file (``sentencepiece`` is an optional dependency).

    Rows are ``[bos] ids [eos]`` (each optional) padded with id 0; longer texts are cut to ``context_length``,
    keeping eos last when ``add_eos``. Ids are the model's, except that a pad piece at id p > 0 trades places
    with id 0 (in ``encode``, rows, the special ids and ``decode``): the text tower reads the 0s after the
    last token as padding, and a pad piece is never produced by encoding, so no text then holds id 0. Without
    a pad piece, padding is id 0 (usually ``<unk>``): an ``<unk>`` inside a text stays a token for the tower,
    and with ``add_eos`` (the default) every row ends with eos, so padding is never ambiguous.
    """

    def __init__(self, model_path: str, context_length: int, add_bos: bool = False, add_eos: bool = True):
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"SentencePiece model not found: {model_path!r}")
        try:
            import sentencepiece
        except ImportError as e:
            raise ImportError("SentencePieceTokenizer needs the optional `sentencepiece` package "
                              "(pip install sentencepiece)") from e
        self.model_path = os.fspath(model_path)
        self.context_length = int(context_length)
        self.add_bos = bool(add_bos)
        self.add_eos = bool(add_eos)
        self._sp = sentencepiece.SentencePieceProcessor(model_file=self.model_path)
        self._swap = max(int(self._sp.pad_id()), 0)  # the model id that trades places with 0 (0: none)
        if self.add_bos and self._sp.bos_id() < 0:
            raise ValueError(f"{model_path} has no bos token, so add_bos=True is impossible")
        if self.add_eos and self._sp.eos_id() < 0:
            raise ValueError(f"{model_path} has no eos token, so add_eos=True is impossible")
        logging.info("SentencePiece model: %s (vocab %d, pad id %d)", self.model_path, self.vocab_size,
                     self._sp.pad_id())

    def __getstate__(self):
        return {"model_path": self.model_path, "context_length": self.context_length,
                "add_bos": self.add_bos, "add_eos": self.add_eos}

    def __setstate__(self, state):
        self.__init__(**state)

    def _remap(self, i: int) -> int:
        """Model id <-> tokenizer id (the swap is its own inverse)."""
        return self._swap if i == 0 else 0 if i == self._swap else i

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    @property
    def bos_token_id(self) -> int:
        bos = int(self._sp.bos_id())
        return self._remap(bos) if bos >= 0 else bos

    @property
    def eos_token_id(self) -> int:
        eos = int(self._sp.eos_id())
        return self._remap(eos) if eos >= 0 else eos

    @property
    def pad_token_id(self) -> int:
        return 0

    def encode(self, text: str) -> list[int]:
        """Piece ids of one text, without bos/eos and without truncation."""
        return [self._remap(i) for i in self._sp.encode(text)]

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
        """Tokenises a text or a batch of texts to int32 ``[n, context_length]``."""
        if isinstance(texts, str):
            texts = [texts]
        prefix = [self.bos_token_id] if self.add_bos else []
        suffix = [self.eos_token_id] if self.add_eos else []
        rows = [prefix + [self._remap(i) for i in ids] + suffix for ids in self._sp.encode(list(texts))]
        return _pack(rows, self.context_length, self.pad_token_id, self.eos_token_id if self.add_eos else None)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of a token sequence: stops at eos, drops trailing padding and control ids (bos, eos, pad)."""
        seq = np.asarray(ids).reshape(-1).tolist()
        while seq and seq[-1] == self.pad_token_id:
            seq.pop()
        out = []
        for i in map(self._remap, seq):
            if i == self._sp.eos_id():
                break
            if not self._sp.is_control(i) and i != self._sp.pad_id():
                out.append(i)
        return self._sp.decode(out)


# ----------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------

TextTokenizer = ClipTokenizer | SentencePieceTokenizer


def create_tokenizer(name: str, context_length: int, path: str | None = None) -> TextTokenizer:
    """Tokenizer by name: ``'clip'`` (``path`` = optional vocabulary) or ``'sentencepiece'`` (``path`` = model)."""
    if name == "clip":
        return ClipTokenizer(vocab_path=path, context_length=context_length)
    if name == "sentencepiece":
        if path is None:
            raise ValueError("create_tokenizer('sentencepiece', ...) needs path= to a SentencePiece model file")
        return SentencePieceTokenizer(path, context_length)
    raise ValueError(f"unknown tokenizer {name!r}; expected one of 'clip', 'sentencepiece'")
