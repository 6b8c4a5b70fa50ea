"""Tokenizers: character level (with an `<unk>` id) and byte-level BPE.

Both expose the same small interface: `vocab_size`, `encode(text) -> np.ndarray`
of int64 ids, `decode(ids) -> str`, `unknown_chars(text) -> list[str]`,
`to_json() -> str` and `save(path)`.
`load_tokenizer(path)` reads either kind back from its JSON file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Union

import numpy as np

from groundthink.atomic import atomic_write_text

CHAR_FORMAT_VERSION = 1
MIN_BPE_VOCAB = 256


class TokenizerError(ValueError):
    """An invalid tokenizer file or setting; the message names the value and the fix."""


class CharTokenizer:
    """One id per Unicode code point seen at build time, plus `<unk>` at id 0.

    Id 0 is reserved for characters absent from the text the tokenizer was built
    from: `encode` maps every such character to 0 instead of raising. `decode`
    turns id 0 into U+FFFD, the Unicode replacement character, so one id still
    decodes to one character. Known characters take ids 1..n in code point order.
    """

    kind = "char"
    unk_id = 0
    unk_text = "\ufffd"

    def __init__(self, chars: Iterable[str]):
        chars = sorted(set(chars))
        for ch in chars:
            if len(ch) != 1:
                raise TokenizerError(f"char tokenizer entries must be single characters, got {ch!r}")
        self.chars: list[str] = chars
        self._code_points = np.array([ord(ch) for ch in chars], dtype=np.uint32)
        self._id_to_text = [self.unk_text] + chars

    @classmethod
    def train(cls, text: str) -> "CharTokenizer":
        """Build the vocabulary from the distinct characters of `text`."""
        if not text:
            raise TokenizerError("cannot build a char tokenizer from empty text; pass a non-empty corpus")
        return cls(set(text))

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 1

    def encode(self, text: str) -> np.ndarray:
        """Map each character to its id (unseen characters to `unk_id`); returns int64 ids."""
        if not text:
            return np.zeros(0, dtype=np.int64)
        code_points = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
        if len(self._code_points) == 0:
            return np.zeros(len(code_points), dtype=np.int64)
        position = np.searchsorted(self._code_points, code_points)
        position = np.minimum(position, len(self._code_points) - 1)
        known = self._code_points[position] == code_points
        return np.where(known, position + 1, self.unk_id).astype(np.int64)

    def unknown_chars(self, text: str) -> list[str]:
        """Return the distinct characters of `text` that encode to `unk_id`, in order of first occurrence."""
        ids = self.encode(text)
        return list(dict.fromkeys(ch for ch, i in zip(text, ids.tolist()) if i == self.unk_id))

    def decode(self, ids: Iterable[int]) -> str:
        table = self._id_to_text
        out = []
        for i in np.asarray(ids, dtype=np.int64).reshape(-1).tolist():
            if not 0 <= i < len(table):
                raise TokenizerError(f"token id {i} is outside the char vocabulary of size {len(table)}")
            out.append(table[i])
        return "".join(out)

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "version": CHAR_FORMAT_VERSION, "unk_id": self.unk_id,
                           "chars": self.chars}, ensure_ascii=True)

    def save(self, path: Union[str, os.PathLike]) -> None:
        atomic_write_text(Path(path), self.to_json())


class BPETokenizer:
    """Byte-level BPE (GPT-2 style) trained locally with the `tokenizers` library.

    Every byte has an id, so any text encodes without unknown tokens and
    `decode(encode(text)) == text`.
    """

    kind = "bpe"

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    @classmethod
    def train(cls, text: str, vocab_size: int) -> "BPETokenizer":
        """Train a byte-level BPE with `vocab_size` ids (at least 256, one per byte) on `text`."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_BPE_VOCAB:
            raise TokenizerError(f"invalid BPE vocab_size={vocab_size!r}: byte-level BPE needs at least "
                                 f"{MIN_BPE_VOCAB} ids (one per byte); pass --vocab-size {MIN_BPE_VOCAB} or more")
        if not text:
            raise TokenizerError("cannot train a BPE tokenizer on empty text; pass a non-empty corpus")
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        # Lines keep their newline so the merges can learn newline-bearing tokens.
        tokenizer.train_from_iterator(_chunks(text), trainer=trainer)
        return cls(tokenizer)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    def encode(self, text: str) -> np.ndarray:
        if not text:
            return np.zeros(0, dtype=np.int64)
        # Encoding in pieces bounds memory; the byte-level pre-tokenizer splits
        # before whitespace, so cutting right after a newline changes no token.
        pieces = self._tokenizer.encode_batch(list(_chunks(text)), add_special_tokens=False)
        return np.concatenate([np.asarray(p.ids, dtype=np.int64) for p in pieces])

    def unknown_chars(self, text: str) -> list[str]:
        """Return [], because every byte has an id."""
        return []

    def decode(self, ids: Iterable[int]) -> str:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1).tolist()
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(f"token id {bad[0]} is outside the BPE vocabulary of size {self.vocab_size}")
        return self._tokenizer.decode(ids, skip_special_tokens=False)

    def to_json(self) -> str:
        return self._tokenizer.to_str()

    def save(self, path: Union[str, os.PathLike]) -> None:
        atomic_write_text(Path(path), self.to_json())


Tokenizer = Union[CharTokenizer, BPETokenizer]


def _chunks(text: str, size: int = 1 << 20) -> Iterable[str]:
    """Split `text` into pieces of about `size` characters, each ending just after a newline when possible."""
    start = 0
    while start < len(text):
        end = min(start + size, len(text))
        if end < len(text):
            newline = text.rfind("\n", start, end)
            if newline >= start:
                end = newline + 1
        yield text[start:end]
        start = end


def tokenizer_from_json(data: str, origin: str = "tokenizer JSON") -> Tokenizer:
    """Rebuild a tokenizer from the string written by `to_json`."""
    try:
        parsed = json.loads(data)
    except json.JSONDecodeError as err:
        raise TokenizerError(f"{origin} is not valid JSON ({err}); it is corrupted, re-create it") from None
    if isinstance(parsed, dict) and parsed.get("kind") == "char":
        if parsed.get("version") != CHAR_FORMAT_VERSION or parsed.get("unk_id") != CharTokenizer.unk_id:
            raise TokenizerError(f"{origin} is a char tokenizer of an unsupported format "
                                 f"(version {parsed.get('version')!r}, unk_id {parsed.get('unk_id')!r})")
        return CharTokenizer(parsed["chars"])
    if isinstance(parsed, dict) and "model" in parsed:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            return BPETokenizer(HFTokenizer.from_str(data))
        except Exception as err:  # the tokenizers library raises its own Exception subclass
            raise TokenizerError(f"{origin} could not be read by the tokenizers library: {err}") from None
    raise TokenizerError(f"{origin} is neither a GroundThink char tokenizer nor a tokenizers-library JSON file")


def load_tokenizer(path: Union[str, os.PathLike]) -> Tokenizer:
    path = Path(path)
    try:
        data = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TokenizerError(f"tokenizer file not found: {path}") from None
    return tokenizer_from_json(data, origin=f"tokenizer file {path}")
