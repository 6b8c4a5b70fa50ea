"""Command-line options: eval flags and --option reach the suites, generate warns about unknown
characters, and --set type errors give a hint that fits the expected type."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from groundthink import GroundThinkConfig, GroundThinkLM
from groundthink.checkpoint import save_checkpoint
from groundthink.cli import main
from groundthink.config import ConfigError
from groundthink.data import read_text_source
from groundthink.tokenizer import CharTokenizer
from groundthink.train import apply_overrides

TEXT = "to be, or not to be: that is the question.\nwhether 'tis nobler in the mind to suffer\n" * 40


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run folder with a tiny untrained char model whose [data] section points at a small text file."""
    root = tmp_path_factory.mktemp("cli-options")
    text = root / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    tokenizer = CharTokenizer.train(TEXT)
    config = GroundThinkConfig(vocab_size=tokenizer.vocab_size, d_model=16, n_heads=2, head_dim=8, expand_v=1.0,
                               layer_pattern="GS", window_size=8, memory_block=8, chunk_size=8)
    run_config = {"model": config.to_dict(), "data": {"path": str(text), "seq_len": 32, "val_fraction": 0.5},
                  "train": {}}
    save_checkpoint(root / "run", model=GroundThinkLM(config), tokenizer=tokenizer, run_config=run_config, step=1)
    return root / "run"


def eval_json(argv: list[str], capsys) -> dict:
    assert main(["eval", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def eval_error(argv: list[str], capsys) -> str:
    assert main(["eval", *argv]) == 1
    return capsys.readouterr().err


def test_ppl_scores_all_tokens_by_default(run_dir, capsys):
    """Without limits the ppl suite scores every token of the val split after the first."""
    result = eval_json([str(run_dir)], capsys)
    val = read_text_source(run_dir.parent / "text.txt", 0.5).val
    assert result["tokens"] == len(val) - 1
    assert result["seq_len"] == 32


def test_ppl_option_max_windows(run_dir, capsys):
    """--option max_windows=4 scores exactly 4 windows of seq_len tokens."""
    result = eval_json([str(run_dir), "--option", "max_windows=4"], capsys)
    assert result["windows"] == 4
    assert result["tokens"] == 4 * 32


def test_ppl_option_seq_len_and_max_tokens(run_dir, capsys):
    """--option seq_len and max_tokens set the window and the token limit; the smaller limit wins."""
    result = eval_json([str(run_dir), "--option", "seq_len=16", "--option", "max_tokens=101"], capsys)
    assert result["seq_len"] == 16
    assert result["tokens"] == 100
    result = eval_json([str(run_dir), "--seq-len", "16", "--max-tokens", "1000", "--option", "max_windows=2"],
                       capsys)
    assert result["tokens"] == 32


def test_ppl_rejects_unknown_option(run_dir, capsys):
    """An unknown ppl option is an error that lists the valid ones."""
    err = eval_error([str(run_dir), "--option", "bogus=1"], capsys)
    assert "unknown option 'bogus'" in err
    assert "max_windows" in err
    assert "max_tokens" in err


def test_flag_and_option_conflict(run_dir, capsys):
    """A flag and --option that set the same value are rejected, not silently ordered."""
    err = eval_error([str(run_dir), "--seq-len", "16", "--option", "seq_len=8"], capsys)
    assert "--seq-len 16 and --option seq_len=... both set seq_len" in err


@pytest.mark.parametrize("suite, flag", [("mqar", "--seq-len"), ("niah", "--seq-len"), ("mqar", "--max-tokens"),
                                         ("niah", "--max-tokens"), ("honest", "--max-tokens")])
def test_flag_without_suite_option_rejected(run_dir, tmp_path, capsys, suite, flag):
    """A flag the suite has no option for is an error naming the suite and its options, before any work."""
    err = eval_error([str(run_dir), "--suite", suite, flag, "8", "--out", str(tmp_path / "out")], capsys)
    assert f"{flag} does not apply to the {suite} suite" in err
    assert not (tmp_path / "out").exists()


def test_batch_size_reaches_mqar_suite(run_dir, tmp_path, capsys):
    """--batch-size sets batch_size of a generated-data suite and is recorded in its results.json."""
    out = tmp_path / "mqar"
    assert main(["eval", str(run_dir), "--suite", "mqar", "--batch-size", "3", "--out", str(out),
                 "--option", "examples=4", "--option", "num_pairs=2", "--option", "seq_lens=16"]) == 0
    capsys.readouterr()
    saved = json.loads((out / "results.json").read_text())
    assert saved["options"]["batch_size"] == 3


def test_generate_warns_unknown_characters(run_dir, capsys):
    """Characters the char tokenizer lacks are named on stderr with their count; generation still runs."""
    code = main(["generate", str(run_dir), "--prompt", "to 你好 be 你", "--max-new-tokens", "2", "--seed", "0"])
    assert code == 0
    captured = capsys.readouterr()
    assert "does not know 2 distinct character(s) of --prompt (3 in all)" in captured.err
    assert "'你' '好'" in captured.err
    assert captured.out.startswith("to 你好 be 你")


def test_generate_known_prompt_no_warning(run_dir, capsys):
    """A prompt of known characters gives no warning."""
    assert main(["generate", str(run_dir), "--prompt", "to be", "--max-new-tokens", "2", "--seed", "0"]) == 0
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("override, hint", [
    ("train.batch_size=2.5", "in --set, pass an integer, e.g. train.batch_size=2"),
    ("model.expand_v='\"2\"'", "in --set, pass a number without quotes, e.g. model.expand_v="),
    ("train.lr=\"3e-3\"", "in --set, pass a number without quotes"),
    ("model.use_short_conv=1", "in --set, pass true or false, e.g. model.use_short_conv=true"),
    ("data.tokenizer=3", "in --set, quote strings as TOML: data.tokenizer='\"text\"'"),
])
def test_set_type_hint_fits_type(override, hint):
    """The --set type error suggests quotes only for string fields, and removing them for numbers."""
    with pytest.raises(ConfigError) as info:
        apply_overrides({}, [override], "test")
    message = str(info.value)
    assert hint in message
    if "quote strings" not in hint:
        assert "quote strings" not in message
