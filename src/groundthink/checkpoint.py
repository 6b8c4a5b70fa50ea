"""Checkpoints: atomic save, verified load, and the one loader the commands share.

Layout inside a run folder:

    checkpoints/
      latest                  name of the newest complete checkpoint, e.g. "step-00001000"
      step-00001000/
        model.safetensors     weights (a tied LM head is stored once)
        config.json           resolved run config: {"model": ..., "data": ..., "train": ...}
        tokenizer.json
        trainer_state.pt      optimizer, scheduler, RNG states, step, tokens, elapsed time
        manifest.json         size and sha256 of every other file, written last

A checkpoint is written into `ckpt.tmp-XXXX`, each file through a temporary
file, fsync and rename, then the folder is renamed to `step-N` and `latest` is
replaced atomically. A crash at any point leaves the previous checkpoint, and
`latest`, intact.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_model

from groundthink.atomic import apply_file_mode, atomic_write, atomic_write_text, fsync_dir, make_temp_dir
from groundthink.config import ConfigError, GroundThinkConfig
from groundthink.model import GroundThinkLM
from groundthink.tokenizer import Tokenizer, TokenizerError, load_tokenizer

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
LATEST = "latest"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
TRAINER_STATE = "trainer_state.pt"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A missing, corrupted or mismatched checkpoint; the message names the file and the fix."""


# ---------------------------------------------------------------------------- RNG state
def capture_rng_state() -> dict[str, Any]:
    """RNG states of python, numpy, torch CPU and every CUDA device, in types torch.load(weights_only) accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": _to_lists(random.getstate()),
             "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                       "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(value):
    if isinstance(value, tuple):
        return [_to_lists(v) for v in value]
    return value


# ---------------------------------------------------------------------------- save
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_weights(path: Path, model: torch.nn.Module) -> None:
    """safetensors `save_model` (it drops tied duplicates) into a temporary name, fsync, rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_model(model, str(tmp), metadata={"format": "pt"})
        apply_file_mode(tmp)  # safetensors creates the file with mode 0600
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise


def _write_trainer_state(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda f: torch.save(state, f))


def save_checkpoint(run_dir: str | os.PathLike, *, model: torch.nn.Module, tokenizer: Tokenizer,
                    run_config: dict[str, Any], step: int, trainer_state: dict[str, Any] | None = None,
                    keep: int = 2) -> Path:
    """Write checkpoint `step-<step>` under `run_dir/checkpoints`, point `latest` at it, and keep the newest `keep`.

    `model` is the bare module (not a DDP wrapper); `run_config` must hold the
    model config under "model". Returns the checkpoint folder.
    """
    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    final = root / name
    if _read_latest(root) == name and final.exists():
        return final
    for stale in root.glob("ckpt.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)

    tmp = make_temp_dir("ckpt.tmp-", root)
    try:
        # 1. Every file through a temporary name, fsync and rename.
        _write_weights(tmp / WEIGHTS, model)
        atomic_write_text(tmp / CONFIG, json.dumps(run_config, indent=2, sort_keys=True) + "\n")
        tokenizer.save(tmp / TOKENIZER)
        state = {"format": FORMAT_VERSION, "step": int(step)}
        state.update(trainer_state or {})
        _write_trainer_state(tmp / TRAINER_STATE, state)

        # 2. The manifest last: a folder with a valid manifest is complete.
        files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
        atomic_write_text(tmp / MANIFEST, json.dumps({"format": FORMAT_VERSION, "step": int(step),
                                                      "files": files}, indent=2) + "\n")
        fsync_dir(tmp)

        # 3. Publish the folder, then the pointer.
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(root)
        atomic_write_text(root / LATEST, name + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    # 4. Prune older complete checkpoints.
    previous = sorted(p for p in root.glob("step-*") if p.is_dir() and p.name != name)
    for old in previous[:max(0, len(previous) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------- locate and verify
def _read_latest(root: Path) -> str | None:
    try:
        return (root / LATEST).read_text(encoding="utf-8").strip() or None
    except FileNotFoundError:
        return None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """Find the checkpoint folder of a run folder, of its `checkpoints` folder, or return a checkpoint folder itself."""
    path = Path(path).expanduser()
    if not path.exists():
        padded = _padded_step_name(path)
        if padded is not None and (padded / MANIFEST).exists():
            return padded
        raise CheckpointError(f"checkpoint path not found: {path}; pass a run folder (the --out of "
                              f"`groundthink train`) or one of its checkpoints/step-N folders{_listing(path)}")
    if (path / MANIFEST).exists():
        return path
    for root in (path / CHECKPOINTS_DIR, path):
        latest = _read_latest(root)
        if latest is not None:
            folder = root / latest
            if not (folder / MANIFEST).exists():
                raise CheckpointError(f"{root / LATEST} points to {latest}, which is missing or incomplete; "
                                      f"pass one of {_available(root)} explicitly")
            return folder
    raise CheckpointError(f"no checkpoint in {path}: expected {CHECKPOINTS_DIR}/{LATEST} or {MANIFEST}; "
                          "has the run saved one yet (train.save_interval)?")


def _padded_step_name(path: Path) -> Path | None:
    """checkpoints/step-50 -> checkpoints/step-00000050, the name `save_checkpoint` gives step 50."""
    prefix, _, number = path.name.partition("-")
    if prefix != "step" or not number.isdigit():
        return None
    return path.with_name(f"step-{int(number):08d}")


def _listing(path: Path) -> str:
    """List the checkpoints of the run folder that `path` points into, as the end of a not-found message."""
    for run_dir in (path.parent.parent if path.parent.name == CHECKPOINTS_DIR else None, path.parent):
        if run_dir is not None and (run_dir / CHECKPOINTS_DIR).is_dir():
            root = run_dir / CHECKPOINTS_DIR
            names = _complete_steps(root)
            if not names:
                return f"; {run_dir} has no complete checkpoint yet"
            return f"; {run_dir} has {', '.join(str(root / name) for name in names)}"
    return ""


def _complete_steps(root: Path) -> list[str]:
    """Return the names of the checkpoint folders in `root` that have a manifest, oldest first."""
    return sorted(p.name for p in root.glob("step-*") if (p / MANIFEST).exists())


def _available(root: Path) -> list[str]:
    return _complete_steps(root) or ["(none)"]


def verify_checkpoint(folder: Path) -> dict[str, Any]:
    """Check every file against manifest.json; returns the manifest."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{folder / MANIFEST} is unreadable ({err}); the checkpoint is corrupted, "
                              "use an earlier one") from None
    if manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{folder} has checkpoint format {manifest.get('format')!r}, this version reads "
                              f"{FORMAT_VERSION}")
    for name, expected in manifest["files"].items():
        path = folder / name
        if not path.exists():
            raise CheckpointError(f"checkpoint file {path} is missing; the checkpoint is incomplete, "
                                  f"use another one from {_available(folder.parent)}")
        size, digest = path.stat().st_size, _sha256(path)
        if size != expected["bytes"] or digest != expected["sha256"]:
            raise CheckpointError(f"checkpoint file {path} is corrupted: {size} bytes, sha256 {digest[:12]}..., "
                                  f"expected {expected['bytes']} bytes, sha256 {expected['sha256'][:12]}...; "
                                  f"use another checkpoint from {_available(folder.parent)}")
    return manifest


# ---------------------------------------------------------------------------- load
def load_model_weights(model: torch.nn.Module, path: Path) -> None:
    """Load safetensors weights into `model`, first checking names and shapes against it.

    A tied LM head is stored under one name only, so names the file lacks are
    accepted when the model ties them to a stored tensor.
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = {name: f.get_slice(name).get_shape() for name in f.keys()}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file ({err})") from None
    expected = {name: list(t.shape) for name, t in model.state_dict().items()}
    problems = [f"{name}: checkpoint {shape}, model {expected[name]}"
                for name, shape in stored.items() if name in expected and list(shape) != expected[name]]
    problems += [f"{name}: in the checkpoint, not in the model" for name in stored if name not in expected]
    tied = _tied_names(model)
    problems += [f"{name}: in the model, not in the checkpoint"
                 for name in expected if name not in stored and not (tied.get(name, set()) & set(stored))]
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise CheckpointError(f"checkpoint weights {path} do not match the model config: {shown}. "
                              "Build the model from the checkpoint's config.json (load_checkpoint does this)")
    from safetensors.torch import load_model

    load_model(model, str(path), strict=True)


def _tied_names(model: torch.nn.Module) -> dict[str, set[str]]:
    """For each state_dict name, the other names sharing its storage."""
    by_storage: dict[int, set[str]] = {}
    for name, tensor in model.state_dict().items():
        by_storage.setdefault(tensor.untyped_storage().data_ptr(), set()).add(name)
    return {name: group - {name} for group in by_storage.values() for name in group}


def read_run_config(folder: Path) -> dict[str, Any]:
    try:
        run_config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{folder / CONFIG} is unreadable ({err})") from None
    if not isinstance(run_config, dict) or not isinstance(run_config.get("model"), dict):
        raise CheckpointError(f"{folder / CONFIG} has no 'model' section; it is not a GroundThink checkpoint")
    return run_config


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu",
                    verify: bool = True) -> tuple[GroundThinkLM, Tokenizer, GroundThinkConfig, dict[str, Any]]:
    """Load a checkpoint for inference: (model in eval mode, tokenizer, model config, extra).

    `path` is a run folder (its latest checkpoint is used) or a checkpoint folder.
    `extra` contains "step", "tokens" (training tokens seen), "run_config" (the full
    resolved config with model, data and train sections) and "path" (the folder).
    """
    folder = resolve_checkpoint(path)
    if verify:
        verify_checkpoint(folder)
    run_config = read_run_config(folder)
    try:
        config = GroundThinkConfig.from_dict(run_config["model"])
    except (ConfigError, TypeError) as err:
        raise CheckpointError(f"{folder / CONFIG} holds an invalid model config: {err}") from None
    try:
        tokenizer = load_tokenizer(folder / TOKENIZER)
    except TokenizerError as err:
        raise CheckpointError(str(err)) from None
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(f"{folder}: tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
                              f"{config.vocab_size}; the checkpoint's files do not belong together")
    model = GroundThinkLM(config)
    load_model_weights(model, folder / WEIGHTS)
    model.to(device).eval()
    state = load_trainer_state(folder)
    extra = {"step": state["step"], "tokens": state.get("tokens", 0), "run_config": run_config, "path": folder}
    return model, tokenizer, config, extra


def load_trainer_state(folder: Path) -> dict[str, Any]:
    try:
        return torch.load(folder / TRAINER_STATE, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as err:
        raise CheckpointError(f"{folder / TRAINER_STATE} is unreadable ({err}); the checkpoint is corrupted") \
            from None
