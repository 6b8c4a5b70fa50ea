"""Checkpoints: round trip, atomic save under a simulated crash, corruption and mismatch errors."""

from __future__ import annotations

import json

import pytest
import torch

from groundthink import GroundThinkConfig, GroundThinkLM
from groundthink import checkpoint as ckpt
from groundthink.checkpoint import CheckpointError, load_checkpoint, load_model_weights, save_checkpoint
from groundthink.tokenizer import CharTokenizer

TEXT = "to be, or not to be: that is the question.\n"


def tiny(**overrides) -> tuple[GroundThinkLM, CharTokenizer, dict]:
    tokenizer = CharTokenizer.train(TEXT)
    values = dict(vocab_size=tokenizer.vocab_size, d_model=16, n_heads=2, head_dim=8, expand_v=1.0,
                  layer_pattern="GS", window_size=8, memory_block=8, chunk_size=8)
    values.update(overrides)
    config = GroundThinkConfig(**values)
    model = GroundThinkLM(config)
    run_config = {"model": config.to_dict(), "data": {"path": "", "seq_len": 16}, "train": {}}
    return model, tokenizer, run_config


def save(run_dir, model, tokenizer, run_config, step, **kwargs):
    return save_checkpoint(run_dir, model=model, tokenizer=tokenizer, run_config=run_config, step=step,
                           trainer_state={"tokens": step * 10}, **kwargs)


def test_round_trip_same_logits(tmp_path):
    model, tokenizer, run_config = tiny()
    save(tmp_path, model, tokenizer, run_config, step=7)
    loaded, loaded_tokenizer, config, extra = load_checkpoint(tmp_path)
    ids = torch.as_tensor(tokenizer.encode(TEXT)).view(1, -1)
    model.eval()
    assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert loaded.lm_head.weight.data_ptr() == loaded.embed.weight.data_ptr(), "tied weights stay tied"
    assert config.to_dict() == run_config["model"]
    assert loaded_tokenizer.to_json() == tokenizer.to_json()
    assert extra["step"] == 7
    assert extra["tokens"] == 70
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-00000007"


def test_crash_mid_save_keeps_previous(tmp_path, monkeypatch):
    model, tokenizer, run_config = tiny()
    save(tmp_path, model, tokenizer, run_config, step=1)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    def crash(path, state):
        raise OSError("simulated crash while writing the trainer state")
    monkeypatch.setattr(ckpt, "_write_trainer_state", crash)
    with pytest.raises(OSError, match="simulated crash"):
        save(tmp_path, model, tokenizer, run_config, step=2)

    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text().strip() == "step-00000001"
    assert not (root / "step-00000002").exists()
    assert not list(root.glob("ckpt.tmp-*")), "the temporary folder is removed"
    loaded, _, _, extra = load_checkpoint(tmp_path)
    assert extra["step"] == 1
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, reference[name]), name


def test_crash_before_pointer_update(tmp_path, monkeypatch):
    """A crash after the folder rename but before `latest` is replaced still loads the previous checkpoint."""
    model, tokenizer, run_config = tiny()
    save(tmp_path, model, tokenizer, run_config, step=1)
    real_write = ckpt.atomic_write_text

    def crash_on_latest(path, text):
        if path.name == "latest":
            raise OSError("simulated crash before the pointer update")
        real_write(path, text)
    monkeypatch.setattr(ckpt, "atomic_write_text", crash_on_latest)
    with pytest.raises(OSError, match="simulated crash"):
        save(tmp_path, model, tokenizer, run_config, step=2)
    monkeypatch.setattr(ckpt, "atomic_write_text", real_write)
    assert load_checkpoint(tmp_path)[3]["step"] == 1
    save(tmp_path, model, tokenizer, run_config, step=2)
    assert load_checkpoint(tmp_path)[3]["step"] == 2


def test_keeps_newest(tmp_path):
    model, tokenizer, run_config = tiny()
    for step in (10, 20, 30):
        save(tmp_path, model, tokenizer, run_config, step=step, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert names == ["step-00000020", "step-00000030"]


def test_corrupted_weights(tmp_path):
    model, tokenizer, run_config = tiny()
    folder = save(tmp_path, model, tokenizer, run_config, step=3)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(tmp_path)


def test_truncated_checkpoint_file(tmp_path):
    model, tokenizer, run_config = tiny()
    folder = save(tmp_path, model, tokenizer, run_config, step=3)
    (folder / "trainer_state.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="trainer_state.pt is corrupted"):
        load_checkpoint(folder)


def test_different_config_rejected(tmp_path):
    model, tokenizer, run_config = tiny()
    folder = save(tmp_path, model, tokenizer, run_config, step=3)
    other, _, _ = tiny(d_model=32)
    with pytest.raises(CheckpointError, match=r"do not match the model config: .*"
                                              r"blocks.0.ffn_norm.weight: checkpoint \[16\], model \[32\]"):
        load_model_weights(other, folder / "model.safetensors")


def test_config_json_mismatch_rejected(tmp_path):
    """A config.json that no longer describes the stored weights gives a clear error, not garbage."""
    model, tokenizer, run_config = tiny()
    folder = save(tmp_path, model, tokenizer, run_config, step=3)
    edited = json.loads((folder / "config.json").read_text())
    edited["model"]["layer_pattern"] = "GSG"
    (folder / "config.json").write_text(json.dumps(edited))
    with pytest.raises(CheckpointError, match="do not match"):
        load_checkpoint(folder, verify=False)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint path not found"):
        load_checkpoint(tmp_path / "no-such-run")
    (tmp_path / "empty-run").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        load_checkpoint(tmp_path / "empty-run")


def test_unpadded_step_name_and_listing(tmp_path):
    """checkpoints/step-20 loads step-00000020; a missing step lists the run's checkpoints, or reports that there are none."""
    model, tokenizer, run_config = tiny()
    for step in (10, 20):
        save(tmp_path, model, tokenizer, run_config, step=step)
    root = tmp_path / "checkpoints"
    assert load_checkpoint(root / "step-20")[3]["step"] == 20
    with pytest.raises(CheckpointError, match=r"step-5; .* has .*step-00000010, .*step-00000020$"):
        load_checkpoint(root / "step-5")
    with pytest.raises(CheckpointError, match=r"step-00000010, .*step-00000020$"):
        load_checkpoint(tmp_path / "step-10")
    (tmp_path / "fresh" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="fresh has no complete checkpoint yet"):
        load_checkpoint(tmp_path / "fresh" / "checkpoints" / "step-1")
