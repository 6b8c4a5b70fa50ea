"""Command line: train a tiny preset, evaluate it, and report bad input as one clear error line."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from groundthink.cli import COMMANDS, EVAL_SUITES, main

from conftest import REPO, SHARED_DATA


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    source = SHARED_DATA / "tinyshakespeare.txt"
    if not source.exists():
        pytest.skip(f"{source} is not present")
    path = tmp_path_factory.mktemp("text") / "slice.txt"
    path.write_text(source.read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    return path


def common_args(tmp_path: Path) -> list[str]:
    return ["--set", f"data.cache_dir={json.dumps(str(tmp_path / 'cache'))}", "--set", "train.num_threads=1",
            "--set", "train.progress_bar=false"]


def test_train_then_eval(text_file, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["-q", "train", "--config", str(REPO / "configs" / "tiny.toml"), "--data", str(text_file),
                 "--out", str(run_dir), "--set", "train.max_steps=12", "--set", "train.eval_interval=6",
                 *common_args(tmp_path)])
    assert code == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 12
    assert records[-1]["val_loss"] is not None
    assert (run_dir / "checkpoints" / "step-00000012" / "model.safetensors").exists()
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["train"]["max_steps"] == 12
    assert saved["data"]["path"] == str(text_file.resolve())
    capsys.readouterr()

    assert main(["eval", str(run_dir), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["step"] == 12
    assert result["split"] == "val"
    assert result["tokenizer"] == "char"
    assert result["tokens"] == 5_999, "every validation character after the first is scored"
    assert result["perplexity"] == pytest.approx(2.718281828 ** result["loss"])
    assert result["bits_per_char"] == pytest.approx(result["loss"] / 0.693147181)
    assert 1.0 < result["loss"] < 4.5


def test_eval_text_with_unseen_characters(text_file, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["-q", "train", "--config", str(REPO / "configs" / "tiny.toml"), "--data", str(text_file),
                 "--out", str(run_dir), "--set", "train.max_steps=2", *common_args(tmp_path)]) == 0
    other = tmp_path / "other.txt"
    other.write_text("Ünïcödé text — with ∑ symbols the tokenizer never saw. 東京\n" * 20, encoding="utf-8")
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--data", str(other), "--split", "all", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["unknown_chars"] >= 8 * 20
    assert result["bytes"] > result["chars"]
    assert math.isfinite(result["loss"])


def test_resume_through_cli(text_file, tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = ["-q", "train", "--out", str(run_dir), *common_args(tmp_path)]
    assert main([*args[:2], "--config", str(REPO / "configs" / "tiny.toml"), "--data", str(text_file),
                 *args[2:], "--set", "train.max_steps=4"]) == 0
    assert main([*args, "--resume", "--set", "train.max_steps=6"]) == 0
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 6
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-00000006"


@pytest.mark.parametrize("argv, message", [
    (["train", "--set", "train.learning_rate=1"], "unknown key train.learning_rate; valid keys of [train]"),
    (["train", "--data", "/no/such/file.txt"], "data path not found: /no/such/file.txt"),
    (["train", "--config", "/no/such.toml"], "config file not found: /no/such.toml"),
    (["eval", "/no/such/run"], "checkpoint path not found"),
    (["train", "--resume"], "--resume needs --out"),
])
def test_bad_input_one_error_line(argv, message, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_module_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "groundthink", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for name in COMMANDS:
        assert name in out.stdout
    assert "ppl" in EVAL_SUITES
