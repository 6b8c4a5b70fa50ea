"""Training: run configuration, optimizer groups, learning-rate schedule, and the training loop.

The command line (`groundthink train`) only parses arguments and calls `train`.
Under `torchrun --nproc_per_node=N` the same loop trains with
DistributedDataParallel (gloo on CPU, nccl on CUDA); rank 0 alone logs and
writes files.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import sys
import time
import typing
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from groundthink.atomic import atomic_write_text
from groundthink.checkpoint import (CheckpointError, capture_rng_state, load_model_weights, load_trainer_state,
                                    read_run_config, resolve_checkpoint, restore_rng_state, save_checkpoint,
                                    verify_checkpoint)
from groundthink.config import ConfigError, GroundThinkConfig
from groundthink.data import (TRAIN_STREAM, VAL_STREAM, DataConfig, PreparedData, eval_windows, prepare_data,
                              sample_batch)
from groundthink.model import GroundThinkLM
from groundthink.ops import resolve_backend
from groundthink.tokenizer import Tokenizer

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
SAMPLES = "samples.txt"
RUN_CONFIG = "config.json"


@dataclass
class TrainConfig:
    """Optimisation, evaluation and logging settings of a run."""

    max_steps: int = 5000
    """Optimizer updates to run; the cosine schedule ends here."""
    max_minutes: float = 0.0
    """Wall-clock budget in minutes (0 = none). When set, training stops once it is spent and the
    cosine schedule follows whichever budget, steps or time, is closer to exhausted, so a timed
    run is not reproducible bit for bit."""
    batch_size: int = 32
    """Sequences per micro-batch on each rank."""
    grad_accum: int = 1
    """Micro-batches per optimizer update; tokens per update = batch_size * grad_accum * seq_len * ranks."""
    lr: float = 1e-3
    """Peak learning rate, reached after warm-up."""
    min_lr: float = 1e-4
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 100
    """Updates of linear warm-up from lr / warmup_steps to lr."""
    weight_decay: float = 0.1
    """Decoupled AdamW weight decay on matrices; 1-D parameters and embeddings get none."""
    beta1: float = 0.9
    """AdamW first-moment decay."""
    beta2: float = 0.95
    """AdamW second-moment decay."""
    eps: float = 1e-8
    """AdamW denominator epsilon."""
    grad_clip: float = 1.0
    """Maximum global gradient norm (0 disables clipping)."""
    eval_interval: int = 250
    """Updates between validation-loss estimates (also run at the last step)."""
    eval_batches: int = 20
    """Validation micro-batches per estimate, at fixed random offsets shared by every evaluation."""
    save_interval: int = 1000
    """Updates between checkpoints (one is also written at the last step)."""
    keep_checkpoints: int = 2
    """Checkpoints kept in the run folder; older ones are deleted."""
    log_interval: int = 10
    """Updates between log lines and metrics.jsonl records."""
    sample_tokens: int = 200
    """Tokens of generated text logged at each evaluation (0 disables)."""
    sample_temperature: float = 0.8
    """Softmax temperature of the generated samples."""
    seed: int = 1337
    """Seed of the initialisation, batch sampling and text sampling."""
    device: str = "auto"
    """auto (cuda when available, else cpu), cpu, cuda or cuda:N."""
    dtype: str = "auto"
    """Autocast dtype: auto (bfloat16 on CUDA, float32 on CPU), float32 or bfloat16."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass (less memory, one more forward pass per block)."""
    num_threads: int = 0
    """torch CPU threads (0 keeps torch's default)."""
    progress_bar: bool = True
    """Show a tqdm progress bar on rank 0."""

    def validate(self) -> None:
        def fail(name: str, fix: str) -> None:
            raise ConfigError(f"invalid train.{name}={getattr(self, name)!r}: {fix}")

        for name in ("max_steps", "batch_size", "grad_accum", "eval_interval", "eval_batches", "save_interval",
                     "keep_checkpoints", "log_interval"):
            if getattr(self, name) < 1:
                fail(name, "must be at least 1")
        for name in ("warmup_steps", "sample_tokens", "num_threads"):
            if getattr(self, name) < 0:
                fail(name, "must be 0 or more")
        if self.max_minutes < 0:
            fail("max_minutes", "must be 0 (no time budget) or a positive number of minutes")
        if not self.lr > 0:
            fail("lr", "must be positive")
        if not 0 <= self.min_lr <= self.lr:
            fail("min_lr", f"must lie in [0, lr={self.lr}]")
        if self.weight_decay < 0:
            fail("weight_decay", "must be 0 or more")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                fail(name, "must lie in [0, 1)")
        if self.grad_clip < 0:
            fail("grad_clip", "must be 0 (off) or positive")
        if self.sample_temperature <= 0:
            fail("sample_temperature", "must be positive")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            fail("dtype", "use auto, float32 or bfloat16")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            fail("device", "use auto, cpu, cuda or cuda:N")


# ---------------------------------------------------------------------------- run configuration
SECTIONS: dict[str, type] = {"model": GroundThinkConfig, "data": DataConfig, "train": TrainConfig}


@dataclass
class RunConfig:
    """Everything a run needs: the [model], [data] and [train] sections of a TOML config."""

    model: GroundThinkConfig = field(default_factory=GroundThinkConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {"model": self.model.to_dict(), "data": dataclasses.asdict(self.data),
                "train": dataclasses.asdict(self.train)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], origin: str = "config") -> "RunConfig":
        """Build from {"model": {...}, "data": {...}, "train": {...}}; unknown sections and keys are rejected."""
        unknown = sorted(set(data) - set(SECTIONS))
        if unknown:
            raise ConfigError(f"{origin}: unknown section(s) {unknown}; valid sections are {sorted(SECTIONS)}")
        sections = {}
        for name, section_cls in SECTIONS.items():
            values = data.get(name, {})
            if not isinstance(values, dict):
                raise ConfigError(f"{origin}: [{name}] must be a table of key = value pairs")
            sections[name] = _build_section(name, section_cls, values, origin)
        run = cls(**sections)
        run.data.validate()
        run.train.validate()
        return run


def _build_section(name: str, section_cls: type, values: dict[str, Any], origin: str):
    hints = typing.get_type_hints(section_cls)
    known = [f.name for f in dataclasses.fields(section_cls)]
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{origin}: unknown key {name}.{key}; valid keys of [{name}] are {known}")
        _check_type(f"{name}.{key}", value, hints[key])
    return section_cls(**values)


def _check_type(key: str, value: Any, expected: Any) -> None:
    if expected is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, expected)
    if not ok:
        raise ConfigError(f"invalid value for {key}: expected {expected.__name__}, got {value!r} "
                          f"({type(value).__name__}); {_set_hint(key, value, expected)}")


def _set_hint(key: str, value: Any, expected: Any) -> str:
    """Return how to write a value of type `expected` in --set, for the type error of `key`."""
    if expected is str:
        return f"in --set, quote strings as TOML: {key}='\"text\"'"
    example = {int: ("an integer", "2"), float: ("a number", "0.5"), bool: ("true or false", "true")}.get(expected)
    if example is None:
        return f"pass a value of type {expected.__name__}"
    what, literal = example
    unquote = " without quotes" if isinstance(value, str) else ""
    return f"in --set, pass {what}{unquote}, e.g. {key}={literal}"


def parse_override(item: str) -> tuple[str, str, Any]:
    """Parse `section.key=value` with `value` read as a TOML literal (a bare word is taken as a string)."""
    if "=" not in item or "." not in item.split("=", 1)[0]:
        raise ConfigError(f"invalid override {item!r}: use section.key=value, e.g. train.lr=3e-3 or "
                          "model.layer_pattern='\"AAAA\"'")
    path, raw = item.split("=", 1)
    section, key = path.strip().split(".", 1)
    if section not in SECTIONS:
        raise ConfigError(f"invalid override {item!r}: unknown section {section!r}; valid sections are "
                          f"{sorted(SECTIONS)}")
    try:
        value = tomllib.loads(f"value = {raw.strip()}")["value"]
    except tomllib.TOMLDecodeError:
        if not raw.strip() or any(c in raw for c in "\"'[]{}=,"):
            raise ConfigError(f"invalid override {item!r}: {raw!r} is not a TOML value; quote strings, "
                              f"e.g. {path}='\"text\"'") from None
        value = raw.strip()
    return section, key, value


def load_run_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> RunConfig:
    """Read a TOML config (or start from defaults when `path` is None) and apply `section.key=value` overrides."""
    data: dict[str, dict[str, Any]] = {}
    origin = "defaults"
    if path is not None:
        path = Path(path)
        origin = str(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}; see configs/ for presets, e.g. configs/tiny.toml") \
                from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
    return apply_overrides(data, overrides, origin)


def apply_overrides(data: dict[str, dict[str, Any]], overrides: list[str], origin: str) -> RunConfig:
    data = {name: dict(values) if isinstance(values, dict) else values for name, values in data.items()}
    for item in overrides:
        section, key, value = parse_override(item)
        known = [f.name for f in dataclasses.fields(SECTIONS[section])]
        if key not in known:
            raise ConfigError(f"invalid override {item!r}: unknown key {section}.{key}; valid keys of "
                              f"[{section}] are {known}")
        data.setdefault(section, {})[key] = value
    return RunConfig.from_dict(data, origin=origin)


# ---------------------------------------------------------------------------- optimizer and schedule
def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups by name: decay on matrices, none on 1-D/0-D parameters (norms, biases,
    A_log, dt_bias, mixing logits) and embeddings. Checks that the groups cover every parameter once."""
    embedding_names = {f"{module_name}.weight" if module_name else "weight"
                       for module_name, module in model.named_modules() if isinstance(module, nn.Embedding)}
    decay, no_decay = {}, {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        target = no_decay if param.dim() < 2 or name in embedding_names else decay
        target[name] = param
    every = {name for name, p in model.named_parameters() if p.requires_grad}
    if set(decay) | set(no_decay) != every or set(decay) & set(no_decay):
        raise RuntimeError("optimizer groups must cover every trainable parameter exactly once")
    return [{"params": list(decay.values()), "names": sorted(decay), "weight_decay": weight_decay},
            {"params": list(no_decay.values()), "names": sorted(no_decay), "weight_decay": 0.0}]


def learning_rate(config: TrainConfig, step: int, elapsed_s: float) -> float:
    """lr of update `step` (0-based): linear warm-up times cosine decay from lr to min_lr.

    The cosine runs over progress = step / max_steps, or, with a time budget,
    the larger of that and elapsed time / max_minutes.
    """
    progress = step / config.max_steps
    if config.max_minutes > 0:
        progress = max(progress, elapsed_s / (60.0 * config.max_minutes))
    progress = min(progress, 1.0)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    warmup = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps > 0 else 1.0
    return warmup * (config.min_lr + (config.lr - config.min_lr) * cosine)


# ---------------------------------------------------------------------------- devices and ranks
@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    autocast_dtype: torch.dtype | None
    distributed: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_runtime(config: TrainConfig) -> Runtime:
    """Pick the device and autocast dtype, and join the process group when launched by torchrun."""
    if config.num_threads > 0:
        torch.set_num_threads(config.num_threads)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    if config.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(config.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"invalid train.device={config.device!r}: CUDA is not available; use cpu or auto")
        if world_size > 1 or device.index is None:
            device = torch.device("cuda", local_rank if world_size > 1 else 0)
        torch.cuda.set_device(device)

    distributed = world_size > 1
    if distributed and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")

    if config.dtype == "auto":
        autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    else:
        autocast_dtype = torch.bfloat16 if config.dtype == "bfloat16" else None
    return Runtime(rank, world_size, local_rank, device, autocast_dtype, distributed)


def _autocast(runtime: Runtime):
    if runtime.autocast_dtype is None:
        return nullcontext()
    return torch.autocast(device_type=runtime.device.type, dtype=runtime.autocast_dtype)


def _all_reduce_mean(value: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    if runtime.distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= runtime.world_size
    return value


def enable_activation_checkpointing(model: GroundThinkLM) -> str:
    """Recompute block activations in backward: the model's own switch when it has one, else
    each block's forward wrapped in torch.utils.checkpoint. Returns how it was enabled."""
    if hasattr(model, "gradient_checkpointing"):
        model.gradient_checkpointing = True
        return "model.gradient_checkpointing"
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        original = block.forward

        @functools.wraps(original)
        def checkpointed(*args, _forward=original, **kwargs):
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = checkpointed
    return "torch.utils.checkpoint around each block"


# ---------------------------------------------------------------------------- one step, evaluation, samples
def forward_backward(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
                     runtime: Runtime) -> torch.Tensor:
    """Accumulate the gradients of the mean loss over `batches` (one update's micro-batches) on this rank.

    Under DDP the gradient all-reduce runs on the last micro-batch only.
    Returns this rank's mean loss as a detached 0-d tensor.
    """
    total = torch.zeros((), device=runtime.device)
    for i, (x, y) in enumerate(batches):
        x, y = x.to(runtime.device, non_blocking=True), y.to(runtime.device, non_blocking=True)
        is_last = i == len(batches) - 1
        sync = model.no_sync() if runtime.distributed and not is_last else nullcontext()
        with sync:
            with _autocast(runtime):
                loss = model(x, labels=y).loss / len(batches)
            loss.backward()
        total += loss.detach()
    return total


@torch.no_grad()
def estimate_val_loss(model: nn.Module, val: np.ndarray, config: TrainConfig, seq_len: int,
                      runtime: Runtime) -> float:
    """Mean loss over `eval_batches` fixed random validation windows, shared out across ranks."""
    seq_len = min(seq_len, len(val) - 1)
    total = torch.zeros(2, device=runtime.device, dtype=torch.float64)
    was_training = model.training
    model.eval()
    for index in range(runtime.rank, config.eval_batches, runtime.world_size):
        x, y = sample_batch(val, config.batch_size, seq_len, config.seed, VAL_STREAM, rank=0, index=index)
        with _autocast(runtime):
            loss = model(x.to(runtime.device), labels=y.to(runtime.device)).loss
        total += torch.stack([loss.double() * y.numel(), torch.tensor(float(y.numel()), device=runtime.device,
                                                                       dtype=torch.float64)])
    if runtime.distributed:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    model.train(was_training)
    return float(total[0] / total[1])


@torch.no_grad()
def evaluate_tokens(model: nn.Module, tokens: np.ndarray, seq_len: int, batch_size: int,
                    device: torch.device, autocast_dtype: torch.dtype | None = None) -> tuple[float, int]:
    """Sum of the next-token losses (nats) over every token of `tokens` after the first, and their count.

    The text is cut into consecutive windows of `seq_len` tokens, so each
    window's first prediction sees no earlier context.
    """
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    for x, y in eval_windows(tokens, seq_len, batch_size):
        x, y = x.to(device), y.to(device)
        context = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
        with context:
            logits = model(x).logits
        losses = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100,
                                                   reduction="sum")
        total += float(losses)
        count += int((y != -100).sum())
    model.train(was_training)
    return total, count


@torch.no_grad()
def sample_text(model: GroundThinkLM, tokenizer: Tokenizer, prompt: np.ndarray, n_tokens: int, temperature: float,
                context: int, seed: int, device: torch.device) -> str:
    """Generate `n_tokens` after `prompt` with draws fixed by `seed`; returns the new text.

    Uses the model's cached `generate` when it has one, else repeated full
    forward passes over the last `context` tokens.
    """
    was_training = model.training
    model.eval()
    ids = torch.as_tensor(np.asarray(prompt, dtype=np.int64), device=device).view(1, -1)
    if hasattr(model, "generate"):
        new_ids = model.generate(ids, n_tokens, temperature=temperature, seed=seed)[0]
    else:
        generator = torch.Generator(device=device).manual_seed(seed)
        for _ in range(n_tokens):
            logits = model(ids[:, -context:]).logits[:, -1].float()                # [1, vocab]
            probs = torch.softmax(logits / temperature, dim=-1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator)], dim=1)
        new_ids = ids[0, len(prompt):]
    model.train(was_training)
    return tokenizer.decode(new_ids.cpu().numpy())


# ---------------------------------------------------------------------------- run folder
def _check_no_checkpoints(run_dir: Path) -> None:
    checkpoints = run_dir / "checkpoints"
    if checkpoints.is_dir() and any(checkpoints.iterdir()):
        raise CheckpointError(f"run folder {run_dir} already contains checkpoints; pass --resume to continue it "
                              "or choose another --out")


def check_new_run_folder(run_dir: str | os.PathLike) -> None:
    """Raise CheckpointError for a run folder that another run has written into, so two runs never mix files.

    A folder with checkpoints can be continued with --resume. A folder with only config.json,
    metrics.jsonl or samples.txt contains a run stopped before its first checkpoint.
    """
    run_dir = Path(run_dir)
    _check_no_checkpoints(run_dir)
    used = [name for name in (RUN_CONFIG, METRICS, SAMPLES) if (run_dir / name).exists()]
    if used:
        raise CheckpointError(f"run folder {run_dir} already contains {', '.join(used)} of a run that saved no "
                              "checkpoint, so it cannot be resumed; pass another --out, or delete the folder "
                              "to start that run again")


def write_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    with open(run_dir / METRICS, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop metrics records after `step`, written by an interrupted run after its last checkpoint."""
    path = run_dir / METRICS
    if not path.exists():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def _config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: checkpoint {old.get(k)!r}, requested {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


@dataclass
class TrainResult:
    step: int
    tokens: int
    train_loss: float
    val_loss: float | None
    elapsed_s: float
    checkpoint: Path | None


# ---------------------------------------------------------------------------- the training loop
def train(run: RunConfig, out_dir: str | os.PathLike, resume: bool = False) -> TrainResult:
    """Train a GroundThinkLM as configured, writing checkpoints and metrics into `out_dir`.

    The folder is created once the data and model are ready. Without `resume`, a folder with
    checkpoints is rejected. The command line also calls `check_new_run_folder`, which rejects
    a folder left by a run that saved no checkpoint, whereas a sweep restarts such a point in place.

    With `resume`, continue from the latest checkpoint in `out_dir`. Model,
    optimizer, RNG states and the batch index all resume, so on CPU and without
    a time budget the continued run reproduces an uninterrupted one's losses exactly.
    """
    cfg = run.train
    cfg.validate()
    run_dir = Path(out_dir)
    runtime = setup_runtime(cfg)
    try:
        return _train(run, run_dir, resume, runtime)
    finally:
        if runtime.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _train(run: RunConfig, run_dir: Path, resume: bool, runtime: Runtime) -> TrainResult:
    cfg, main = run.train, runtime.is_main

    # 1. Run folder and checkpoint to resume from.
    checkpoint_dir = None
    if resume:
        checkpoint_dir = resolve_checkpoint(run_dir)
        verify_checkpoint(checkpoint_dir)
    else:
        _check_no_checkpoints(run_dir)

    # 2. Data: rank 0 fills the cache first, the other ranks then read it.
    if runtime.distributed and not main:
        dist.barrier()
    data = prepare_data(run.data)
    if runtime.distributed and main:
        dist.barrier()
    if run.model.vocab_size != data.tokenizer.vocab_size:
        if main:
            log.info("model.vocab_size set to %d from the %s tokenizer (config had %d)",
                     data.tokenizer.vocab_size, data.tokenizer.kind, run.model.vocab_size)
        run.model = GroundThinkConfig.from_dict({**run.model.to_dict(), "vocab_size": data.tokenizer.vocab_size})
    run_config = run.to_dict()

    # 3. Model, optimizer and, when resuming, their saved state.
    torch.manual_seed(cfg.seed)
    model = GroundThinkLM(run.model).to(runtime.device)
    groups = parameter_groups(model, cfg.weight_decay)
    optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], lr=cfg.lr,
                                  betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay)
    step, tokens, elapsed_offset, cpu_offset = 0, 0, 0.0, 0.0
    if checkpoint_dir is not None:
        step, tokens, elapsed_offset, cpu_offset = _restore(checkpoint_dir, run_config, data, model, optimizer)
        if step >= cfg.max_steps:
            log.warning("the checkpoint is at step %d, not below train.max_steps=%d: nothing to train; raise "
                        "it with --set train.max_steps=N", step, cfg.max_steps)
    if cfg.activation_checkpointing:
        how = enable_activation_checkpointing(model)
        if main:
            log.info("activation checkpointing: %s", how)
    train_model = model
    if runtime.distributed:
        device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        train_model = DistributedDataParallel(model, device_ids=device_ids)

    tokens_per_step = cfg.batch_size * cfg.grad_accum * run.data.seq_len * runtime.world_size
    if main:
        # Created only now, after the data and config passed their checks, so a failed start leaves no folder.
        run_dir.mkdir(parents=True, exist_ok=True)
        _log_startup(run, run_config, run_dir, data, model, groups, runtime, tokens_per_step, step)
        atomic_write_text(run_dir / RUN_CONFIG, json.dumps(run_config, indent=2) + "\n")
        if resume:
            truncate_metrics(run_dir, step)

    prompt = np.asarray(data.val[:min(16, len(data.val))], dtype=np.int64)
    # disable=None hides the bar when stderr is not a terminal (a log file), leaving the log lines.
    bar = tqdm(total=cfg.max_steps, initial=step, disable=True if not (main and cfg.progress_bar) else None,
               unit="step", dynamic_ncols=True, mininterval=1.0)
    start_step = step
    start = time.perf_counter() - elapsed_offset
    # CPU seconds of this process (all its threads): on a shared machine they show the
    # cost of training better than wall time does.
    cpu_start = time.process_time() - cpu_offset
    # Throughput counts the time of the updates only, not evaluation, sampling or checkpoints.
    interval_train_s, interval_tokens, interval_losses = 0.0, 0, []
    loss_value, val_loss, saved = float("nan"), None, None
    model.train()
    with logging_redirect_tqdm():
        while step < cfg.max_steps:
            # 1. Learning rate of this update.
            update_start = time.perf_counter()
            lr = learning_rate(cfg, step, update_start - start)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # 2. Forward and backward over the micro-batches; each rank draws its own.
            batches = [sample_batch(data.train, cfg.batch_size, run.data.seq_len, cfg.seed, TRAIN_STREAM,
                                    runtime.rank, step * cfg.grad_accum + i) for i in range(cfg.grad_accum)]
            loss = _all_reduce_mean(forward_backward(train_model, batches, runtime), runtime)

            # 3. Clip, then reject a non-finite loss or gradient before the update.
            if cfg.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            else:
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
            loss_value = float(loss)
            if not (math.isfinite(loss_value) and math.isfinite(float(grad_norm))):
                raise FloatingPointError(
                    f"non-finite training loss {loss_value} (gradient norm {float(grad_norm)}) at update {step + 1}, "
                    f"lr {lr:.3g}; the update was not applied. Lower train.lr, raise train.warmup_steps or set "
                    f"train.grad_clip, then resume from the last checkpoint in {run_dir}")

            # 4. Optimizer step.
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            interval_train_s += time.perf_counter() - update_start
            tokens += tokens_per_step
            interval_tokens += tokens_per_step
            interval_losses.append(loss_value)
            elapsed = time.perf_counter() - start
            stop = step >= cfg.max_steps or (cfg.max_minutes > 0 and elapsed >= 60.0 * cfg.max_minutes)
            if runtime.distributed:
                flag = torch.tensor(float(stop), device=runtime.device)
                dist.broadcast(flag, src=0)
                stop = bool(flag.item())
            bar.update(1)

            # 5. Evaluation and samples.
            val_loss = None
            if step % cfg.eval_interval == 0 or stop:
                val_loss = estimate_val_loss(model, data.val, cfg, run.data.seq_len, runtime)
                if main and cfg.sample_tokens > 0:
                    text = sample_text(model, data.tokenizer, prompt, cfg.sample_tokens, cfg.sample_temperature,
                                       run.data.seq_len, cfg.seed + step, runtime.device)
                    log.info("sample at step %d:\n%s%s", step, data.tokenizer.decode(prompt), text)
                    with open(run_dir / SAMPLES, "a", encoding="utf-8") as f:
                        f.write(f"=== step {step}, val_loss {val_loss:.4f}\n{data.tokenizer.decode(prompt)}{text}\n")

            # 6. Log one line and one metrics record per interval (rank 0).
            first_step = step == start_step + 1
            if main and (step % cfg.log_interval == 0 or val_loss is not None or stop or first_step):
                now = time.perf_counter()
                record = {"step": step, "tokens": tokens, "loss": float(np.mean(interval_losses)),
                          "val_loss": val_loss, "lr": lr,
                          "tokens_per_s": interval_tokens / max(interval_train_s, 1e-9),
                          "elapsed_s": now - start, "cpu_s": time.process_time() - cpu_start}
                write_metrics(run_dir, record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:,.0f}",
                                lr=f"{lr:.2e}", refresh=False)
                log.info("step %d/%d | loss %.4f | val %s | lr %.2e | %s tok/s | %.1f min", step, cfg.max_steps,
                         record["loss"], "-" if val_loss is None else f"{val_loss:.4f}", lr,
                         f"{record['tokens_per_s']:,.0f}", record["elapsed_s"] / 60)
                interval_train_s, interval_tokens, interval_losses = 0.0, 0, []

            # 7. Checkpoint (rank 0), last in the step so that it contains everything above.
            if main and (step % cfg.save_interval == 0 or stop):
                state = {"optimizer": optimizer.state_dict(), "tokens": tokens, "elapsed_s": time.perf_counter() - start,
                         "cpu_s": time.process_time() - cpu_start,
                         "rng": capture_rng_state(), "world_size": runtime.world_size,
                         "scheduler": {"step": step, "elapsed_s": time.perf_counter() - start}}
                saved = save_checkpoint(run_dir, model=model, tokenizer=data.tokenizer, run_config=run_config,
                                        step=step, trainer_state=state, keep=cfg.keep_checkpoints)
                log.info("checkpoint: %s", saved)
            if stop:
                break
    bar.close()
    return TrainResult(step=step, tokens=tokens, train_loss=loss_value, val_loss=val_loss,
                       elapsed_s=time.perf_counter() - start, checkpoint=saved)


def _restore(checkpoint_dir: Path, run_config: dict[str, Any], data: PreparedData, model: nn.Module,
             optimizer: torch.optim.Optimizer) -> tuple[int, int, float, float]:
    """Load weights, optimizer and RNG states; returns (step, tokens, elapsed seconds, CPU seconds)."""
    saved = read_run_config(checkpoint_dir)
    for section in ("model", "data"):
        differences = _config_differences(saved.get(section, {}), run_config[section])
        if differences:
            raise CheckpointError(f"cannot resume from {checkpoint_dir}: the [{section}] config differs from the "
                                  f"checkpoint's ({'; '.join(differences)}); resume with the run's own config or "
                                  "start a new run with another --out")
    saved_tokenizer = (checkpoint_dir / "tokenizer.json").read_text(encoding="utf-8")
    if saved_tokenizer != data.tokenizer.to_json():
        raise CheckpointError(f"cannot resume from {checkpoint_dir}: the tokenizer built from the training text "
                              "differs from the checkpoint's; the text changed since the run started")
    load_model_weights(model, checkpoint_dir / "model.safetensors")
    state = load_trainer_state(checkpoint_dir)
    optimizer.load_state_dict(state["optimizer"])
    restore_rng_state(state["rng"])
    log.info("resumed from %s at step %d", checkpoint_dir, state["step"])
    return int(state["step"]), int(state["tokens"]), float(state["elapsed_s"]), float(state.get("cpu_s", 0.0))


def _log_startup(run: RunConfig, run_config: dict[str, Any], run_dir: Path, data: PreparedData, model: GroundThinkLM,
                 groups: list[dict[str, Any]], runtime: Runtime, tokens_per_step: int, step: int) -> None:
    counts = model.parameter_counts()
    backend, reason = resolve_backend(run.model.backend, runtime.device)
    log.info("run folder: %s", run_dir)
    log.info("config: %s", json.dumps(run_config, sort_keys=True))
    log.info("data: %s; %s", data.meta["source"], _data_summary(data))
    log.info("parameters: %s", ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    log.info("optimizer: AdamW, %d tensors with weight decay %g, %d without (1-D and embeddings)",
             len(groups[0]["params"]), run.train.weight_decay, len(groups[1]["params"]))
    dtype = runtime.autocast_dtype or torch.float32
    log.info("device: %s, dtype %s (%s), ranks %d, torch threads %d", runtime.device, str(dtype).removeprefix("torch."),
             "autocast" if runtime.autocast_dtype else "no autocast", runtime.world_size, torch.get_num_threads())
    log.info("gated delta rule backend: %s (%s)", backend, reason)
    log.info("tokens per update: %s; starting at step %d of %d%s", f"{tokens_per_step:,}", step,
             run.train.max_steps, f", time budget {run.train.max_minutes:g} min" if run.train.max_minutes else "")
    if run.train.warmup_steps > run.train.max_steps:
        final_lr = learning_rate(run.train, run.train.max_steps - 1, 0.0)
        log.warning("warmup_steps=%d exceeds max_steps=%d: the lr peaks below lr=%g and ends at %.3g, under "
                    "min_lr=%g; lower train.warmup_steps", run.train.warmup_steps, run.train.max_steps,
                    run.train.lr, final_lr, run.train.min_lr)


def _data_summary(data: PreparedData) -> str:
    s = data.meta["splits"]
    return (f"{data.tokenizer.kind} tokenizer with {data.tokenizer.vocab_size} ids, train {s['train']['tokens']:,} "
            f"tokens, val {s['val']['tokens']:,} tokens, cache {data.cache_path}")
