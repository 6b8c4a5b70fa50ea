"""Command line: train a tiny preset, evaluate it, and report bad input as one clear error line."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from groundthink.checkpoint import load_checkpoint
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


def mqar_args(run_dir: Path, *extra: str) -> list[str]:
    return ["-q", "train", "--task", "mqar", "--out", str(run_dir), "--set", "train.num_threads=1", *extra]


def test_mqar_run_folder_and_exact_resume(tmp_path, capsys):
    """`train --task mqar` writes config.json and metrics.jsonl, and --resume repeats the uninterrupted run."""
    task = ["--config", str(REPO / "configs" / "tiny.toml"), "--mqar", "vocab_size=32", "--mqar", "seq_len=32",
            "--mqar", "num_pairs=4", "--set", "train.eval_interval=2", "--set", "train.save_interval=4",
            "--set", "train.keep_checkpoints=3"]
    full = tmp_path / "full"
    assert main(mqar_args(full, *task, "--set", "train.max_steps=8")) == 0
    saved = json.loads((full / "config.json").read_text())
    assert saved["mqar"]["task"] == {"vocab_size": 32, "seq_len": 32, "num_pairs": 4, "power_a": 0.01,
                                     "random_non_queries": True}
    assert saved["train"]["max_steps"] == 8
    assert "data" not in saved
    assert not (full / "samples.txt").exists(), "MQAR ids have no text to sample"
    records = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6, 8]

    # Stopped after the step-4 checkpoint, with metrics written past it; then resumed to 8 and on to 10.
    part = tmp_path / "part"
    assert main(mqar_args(part, *task, "--set", "train.max_steps=8")) == 0
    shutil.rmtree(part / "checkpoints" / "step-00000008")
    (part / "checkpoints" / "latest").write_text("step-00000004\n")
    assert main(mqar_args(part, "--resume")) == 0
    resumed = [json.loads(line) for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"], r["eval_accuracy"]) for r in resumed] == \
        [(r["step"], r["loss"], r["eval_accuracy"]) for r in records], "resumed losses equal the full run's"
    a, b = load_checkpoint(full)[0], load_checkpoint(part)[0]
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), f"{name} differs after resume"
    assert main(["-q", "train", "--out", str(part), "--resume", "--set", "train.max_steps=10"]) == 0
    assert (part / "checkpoints" / "latest").read_text().strip() == "step-00000010"
    capsys.readouterr()
    assert main(mqar_args(part, "--resume", "--mqar", "num_pairs=8")) == 1
    assert "drop --mqar" in capsys.readouterr().err
    assert main(["-q", "train", "--task", "text", "--out", str(part), "--resume"]) == 1
    assert "contains a --task mqar run; drop --task text" in capsys.readouterr().err


@pytest.mark.parametrize("task", ["text", "mqar"])
def test_run_folder_without_checkpoint_rejected(task, text_file, tmp_path, capsys):
    """A folder left by a run stopped before its first checkpoint is not silently mixed with a new run."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text("{}\n")
    (run_dir / "metrics.jsonl").write_text('{"step": 5}\n')
    data = ["--data", str(text_file)] if task == "text" else ["--mqar", "vocab_size=32", "--mqar", "seq_len=32",
                                                             "--mqar", "num_pairs=4"]
    code = main(["train", "--task", task, "--config", str(REPO / "configs" / "tiny.toml"), *data,
                 "--out", str(run_dir), "--set", "train.max_steps=2", *common_args(tmp_path)])
    assert code == 1
    err = capsys.readouterr().err
    assert f"run folder {run_dir} already contains config.json, metrics.jsonl" in err
    assert "pass another --out, or delete the folder" in err
    assert (run_dir / "config.json").read_text() == "{}\n"
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 5}\n'


@pytest.mark.parametrize("content", [b"", b"  \n", b"\x00\x01binary\x00"])
def test_failed_start_leaves_no_run_folder(content, tmp_path, monkeypatch, capsys):
    """Bad --data stops `train` before the default runs/<date>-<time> folder is created."""
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["train", "--config", str(REPO / "configs" / "tiny.toml"), "--data", str(bad),
                 *common_args(tmp_path)]) == 1
    assert "bad.txt" in capsys.readouterr().err
    assert not (work / "runs").exists() or not any((work / "runs").iterdir())


def test_eval_unpadded_step_folder(text_file, tmp_path, capsys):
    """`eval RUN/checkpoints/step-2` finds step-00000002; a missing step lists the run's checkpoints."""
    run_dir = tmp_path / "run"
    assert main(["-q", "train", "--config", str(REPO / "configs" / "tiny.toml"), "--data", str(text_file),
                 "--out", str(run_dir), "--set", "train.max_steps=2", *common_args(tmp_path)]) == 0
    capsys.readouterr()
    assert main(["eval", str(run_dir / "checkpoints" / "step-2"), "--json", "--max-tokens", "200"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 2
    assert main(["eval", str(run_dir / "checkpoints" / "step-50")]) == 1
    assert f"{run_dir} has {run_dir / 'checkpoints' / 'step-00000002'}" in capsys.readouterr().err


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
