"""Training loop: learning, exact resume, budgets, non-finite losses, config parsing, optimizer groups."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from groundthink import GroundThinkConfig, GroundThinkLM
from groundthink import train as train_module
from groundthink.checkpoint import CheckpointError, load_checkpoint
from groundthink.config import ConfigError
from groundthink.data import DataError
from groundthink.train import (RunConfig, TrainConfig, check_new_run_folder, enable_activation_checkpointing,
                               learning_rate, load_run_config, parameter_groups, parse_override, train)

from conftest import REPO, SHARED_DATA


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    source = SHARED_DATA / "tinyshakespeare.txt"
    if not source.exists():
        pytest.skip(f"{source} is not present")
    path = tmp_path_factory.mktemp("text") / "shakespeare-slice.txt"
    path.write_text(source.read_text(encoding="utf-8")[:100_000], encoding="utf-8")
    return path


def tiny_run(text_file: Path, cache: Path, *overrides: str) -> RunConfig:
    """The tiny preset on a text slice, quiet and single-threaded."""
    base = [f"data.path={json.dumps(str(text_file))}", f"data.cache_dir={json.dumps(str(cache))}",
            "train.num_threads=1", "train.progress_bar=false", "train.sample_tokens=0"]
    return load_run_config(REPO / "configs" / "tiny.toml", base + list(overrides))


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_loss_decreases(text_file, tmp_path):
    run = tiny_run(text_file, tmp_path / "cache", "train.max_steps=40", "train.sample_tokens=20")
    result = train(run, tmp_path / "run")
    records = read_metrics(tmp_path / "run")
    first, last = records[0]["loss"], records[-1]["loss"]
    assert first > math.log(66) - 0.3, f"an untrained model starts near ln(vocab), got {first:.3f}"
    assert last < first - 0.7, f"loss went from {first:.3f} to only {last:.3f} in 40 steps"
    assert result.val_loss is not None and result.val_loss < 3.5
    assert {"step", "tokens", "loss", "val_loss", "lr", "tokens_per_s", "elapsed_s", "cpu_s"} <= set(records[-1])
    assert (tmp_path / "run" / "samples.txt").read_text().count("=== step") == 2


def test_resume_matches_uninterrupted(text_file, tmp_path):
    overrides = ("train.max_steps=12", "train.save_interval=6", "train.eval_interval=6", "train.log_interval=1",
                 "train.keep_checkpoints=3", "train.sample_tokens=5")
    full = tmp_path / "full"
    train(tiny_run(text_file, tmp_path / "cache", *overrides), full)

    # An interrupted copy: its newest checkpoint is step 6, and its metrics ran on past it.
    interrupted = tmp_path / "interrupted"
    shutil.copytree(full, interrupted)
    shutil.rmtree(interrupted / "checkpoints" / "step-00000012")
    (interrupted / "checkpoints" / "latest").write_text("step-00000006\n")
    train(tiny_run(text_file, tmp_path / "cache", *overrides), interrupted, resume=True)

    expected = [(r["step"], r["loss"], r["val_loss"]) for r in read_metrics(full)]
    resumed = [(r["step"], r["loss"], r["val_loss"]) for r in read_metrics(interrupted)]
    assert resumed == expected, "resumed losses must equal the uninterrupted run's exactly"
    a, b = load_checkpoint(full)[0], load_checkpoint(interrupted)[0]
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), f"{name} differs after resume"


def test_resume_rejects_changed_model(text_file, tmp_path):
    train(tiny_run(text_file, tmp_path / "cache", "train.max_steps=2"), tmp_path / "run")
    changed = tiny_run(text_file, tmp_path / "cache", "train.max_steps=4", "model.d_model=48")
    with pytest.raises(CheckpointError, match=r"\[model\] config differs .*d_model: checkpoint 32, requested 48"):
        train(changed, tmp_path / "run", resume=True)


def test_existing_run_folder_needs_resume(text_file, tmp_path):
    run = tiny_run(text_file, tmp_path / "cache", "train.max_steps=2")
    train(run, tmp_path / "run")
    with pytest.raises(CheckpointError, match="already contains checkpoints; pass --resume"):
        train(run, tmp_path / "run")


def test_failed_start_creates_no_folder(tmp_path):
    """Data that fails its checks stops the run before the run folder exists."""
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    run = load_run_config(REPO / "configs" / "tiny.toml", [f"data.path={json.dumps(str(empty))}",
                                                            f"data.cache_dir={json.dumps(str(tmp_path / 'cache'))}"])
    with pytest.raises(DataError, match="is empty"):
        train(run, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_check_new_run_folder(tmp_path):
    check_new_run_folder(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    check_new_run_folder(tmp_path / "empty")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "metrics.jsonl").write_text("")
    with pytest.raises(CheckpointError, match=r"already contains metrics.jsonl .*pass another --out, or delete"):
        check_new_run_folder(tmp_path / "used")
    (tmp_path / "used" / "checkpoints" / "step-00000001").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="already contains checkpoints; pass --resume"):
        check_new_run_folder(tmp_path / "used")


def test_time_budget_stops_early(text_file, tmp_path):
    run = tiny_run(text_file, tmp_path / "cache", "train.max_steps=1000", "train.max_minutes=1e-6")
    result = train(run, tmp_path / "run")
    assert result.step == 1
    assert load_checkpoint(tmp_path / "run")[3]["step"] == 1


def test_warmup_longer_than_run_warns(text_file, tmp_path, caplog):
    """A run that ends inside its warm-up logs that its lr never reaches lr and ends below min_lr."""
    run = tiny_run(text_file, tmp_path / "cache", "train.max_steps=2", "train.warmup_steps=10")
    with caplog.at_level("WARNING", logger="groundthink.train"):
        train(run, tmp_path / "run")
    assert "warmup_steps=10 exceeds max_steps=2" in caplog.text
    caplog.clear()
    run = tiny_run(text_file, tmp_path / "cache", "train.max_steps=2", "train.warmup_steps=1")
    with caplog.at_level("WARNING", logger="groundthink.train"):
        train(run, tmp_path / "run2")
    assert "warmup_steps" not in caplog.text


def test_non_finite_loss_rejected(text_file, tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "forward_backward", lambda model, batches, runtime: torch.tensor(float("nan")))
    run = tiny_run(text_file, tmp_path / "cache", "train.save_interval=1")
    with pytest.raises(FloatingPointError, match="non-finite training loss nan .* at update 1.*not applied"):
        train(run, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists(), "no checkpoint of a rejected update"


# ---------------------------------------------------------------------------- config parsing
def test_overrides_parse_toml_values():
    assert parse_override("train.lr=3e-3") == ("train", "lr", 3e-3)
    assert parse_override("model.layer_pattern=\"AAAA\"") == ("model", "layer_pattern", "AAAA")
    assert parse_override("data.tokenizer=bpe") == ("data", "tokenizer", "bpe")
    assert parse_override("train.activation_checkpointing=true") == ("train", "activation_checkpointing", True)
    run = load_run_config(None, ["train.max_steps=7", "model.d_model=64", "train.max_minutes=15"])
    assert (run.train.max_steps, run.model.d_model, run.train.max_minutes) == (7, 64, 15)


def test_unknown_override_key_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown key train.learning_rate; valid keys of \[train\] are .*'lr'"):
        load_run_config(None, ["train.learning_rate=1e-3"])
    with pytest.raises(ConfigError, match=r"unknown section 'optim'; valid sections are \['data', 'model', 'train'\]"):
        load_run_config(None, ["optim.lr=1e-3"])
    with pytest.raises(ConfigError, match="use section.key=value"):
        load_run_config(None, ["lr=1e-3"])


def test_override_type_checked():
    with pytest.raises(ConfigError, match="invalid value for train.max_steps: expected int, got 'ten'"):
        load_run_config(None, ["train.max_steps=ten"])
    with pytest.raises(ConfigError, match="invalid value for model.d_model: expected int, got 1.5"):
        load_run_config(None, ["model.d_model=1.5"])
    with pytest.raises(ConfigError, match="invalid train.warmup_steps=-1"):
        load_run_config(None, ["train.warmup_steps=-1"])


def test_toml_file_unknown_key(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[model]\nd_model = 64\nwidth = 3\n")
    with pytest.raises(ConfigError, match=r"unknown key model.width; valid keys of \[model\]"):
        load_run_config(path)


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.toml")))
def test_presets_load(name):
    run = load_run_config(REPO / "configs" / name)
    GroundThinkLM(run.model)


# ---------------------------------------------------------------------------- optimizer and schedule
def test_parameter_groups_by_name():
    model = GroundThinkLM(GroundThinkConfig(vocab_size=40, d_model=32, n_heads=2, head_dim=8, layer_pattern="GSGA",
                                            window_size=8, memory_block=8, chunk_size=8))
    decay, no_decay = parameter_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    for name in no_decay["names"]:
        assert name.endswith(("norm.weight", "bias", "A_log", "dt_bias")) or name == "embed.weight" \
            or name.startswith("memory_mix_logits"), name
    assert "embed.weight" in no_decay["names"] and "blocks.0.mixer.A_log" in no_decay["names"]
    assert "blocks.0.mixer.q_proj.weight" in decay["names"] and "blocks.0.mixer.q_conv.conv.weight" in decay["names"]
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_learning_rate_schedule():
    config = TrainConfig(max_steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-4)
    assert learning_rate(config, 0, 0.0) == pytest.approx(1e-4)
    assert learning_rate(config, 9, 0.0) == pytest.approx(1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi * 0.09)))
    assert learning_rate(config, 50, 0.0) == pytest.approx(5.5e-4)
    assert learning_rate(config, 100, 0.0) == pytest.approx(1e-4)
    timed = TrainConfig(max_steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-4, max_minutes=1.0)
    assert learning_rate(timed, 20, 30.0) == pytest.approx(5.5e-4), "half the time budget is half the cosine"


def test_activation_checkpointing_same_gradients():
    config = GroundThinkConfig(vocab_size=40, d_model=32, n_heads=2, head_dim=8, layer_pattern="GSA",
                               window_size=8, memory_block=8, chunk_size=8)
    ids = torch.randint(0, 40, (2, 33))
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = GroundThinkLM(config)
        if checkpointed:
            enable_activation_checkpointing(model)
        model(ids[:, :-1], labels=ids[:, 1:]).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)
