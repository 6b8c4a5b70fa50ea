"""A small training loop for synthetic tasks (MQAR) on generated batches.

Every update draws a fresh batch from the seed sequence [seed, 0, step], so a run repeats
exactly from its seed and never trains on the evaluation examples, drawn from [seed, 1].
The optimizer follows the text trainer: AdamW with weight decay on matrices only, linear
warm-up, cosine decay to min_lr, gradient clipping, and a finite-loss check before each update.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from .common import EvalError, check_positive
from .mqar import MQARTask, accuracy_from_logits, evaluate_mqar, generate_mqar

log = logging.getLogger(__name__)

TRAIN_STREAM, EVAL_STREAM, MIXTURE_STREAM = 0, 1, 2
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
ZOOLOGY_MIXTURE = "64:4:5,128:8:1,256:16:1,256:32:1,256:64:1"
"""T:N:weight of Zoology's standard MQAR training set: 100k examples of (T=64, N=4), 20k of each other."""


def curriculum_mixture(target: MQARTask) -> list[tuple[MQARTask, float, float]]:
    """A curriculum towards `target` (T, N): (T/8, N/8) and (T/4, N/4) from the first update,
    (T/2, N/2) and (T, N) after a quarter of the updates, weighted 3 : 2 : 1 : 2.

    On a CPU budget this left the loss plateau in a few hundred updates where Zoology's mixture,
    which has T = 256 tasks from the start, had not after 1000 (benchmarks/README.md, Recall).
    """
    items = []
    for divisor, weight, start in ((8, 3.0, 0.0), (4, 2.0, 0.0), (2, 1.0, 0.25), (1, 2.0, 0.25)):
        seq_len, num_pairs = max(target.seq_len // divisor, 4), max(target.num_pairs // divisor, 1)
        if any(t.seq_len == seq_len and t.num_pairs == num_pairs for t, _, _ in items):
            continue
        task = replace(target, seq_len=seq_len, num_pairs=num_pairs)
        items.append((task, weight, start))
    return items


@dataclass
class TaskTraining:
    """Optimisation settings of a synthetic-task run."""

    max_steps: int = 2000
    """Upper bound on optimizer updates; the cosine schedule spans this many (or the budget's estimate)."""
    batch_size: int = 32
    """Examples per update."""
    lr: float = 2e-3
    """Peak learning rate after warm-up."""
    min_lr: float = 2e-4
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 100
    """Updates of linear warm-up."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay on matrices (none on norms, biases, gates and embeddings)."""
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    """Maximum global gradient norm; 0 disables clipping."""
    time_budget_s: float = 0.0
    """Time limit in seconds of `budget_clock` (0: none). After `calibration_steps` updates the
    schedule is shortened to the number of updates that fit, then the run stops at the limit."""
    budget_clock: str = "wall"
    """Clock of the time budget: wall (elapsed time) or cpu (CPU time of this process, which a
    CPU shared with other jobs does not eat into)."""
    calibration_steps: int = 20
    """Updates timed to size the schedule under a time budget."""
    eval_every: int = 100
    """Updates between evaluations on the fixed evaluation set."""
    eval_examples: int = 256
    """Examples of the evaluation set (drawn from the seed sequence [seed, 1])."""
    target_accuracy: float = 1.0
    """Stop once the evaluation accuracy reaches this value (1.0: never stop early unless perfect)."""
    seed: int = 0
    """Seed of the training batches and of the evaluation set."""

    def validate(self) -> None:
        for name in ("max_steps", "batch_size", "eval_every", "eval_examples", "calibration_steps"):
            check_positive(name, getattr(self, name))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise EvalError(f"invalid seed={self.seed!r}: must be a non-negative integer")
        if self.warmup_steps < 0:
            raise EvalError(f"invalid warmup_steps={self.warmup_steps!r}: must be 0 or more")
        if not self.lr > 0 or not 0 <= self.min_lr <= self.lr:
            raise EvalError(f"invalid lr={self.lr!r} / min_lr={self.min_lr!r}: need lr > 0 and 0 <= min_lr <= lr")
        if self.time_budget_s < 0:
            raise EvalError(f"invalid time_budget_s={self.time_budget_s!r}: must be 0 (no limit) or positive")
        if self.budget_clock not in CLOCKS:
            raise EvalError(f"invalid budget_clock={self.budget_clock!r}: use one of {tuple(CLOCKS)}")
        if not 0 < self.target_accuracy <= 1:
            raise EvalError(f"invalid target_accuracy={self.target_accuracy!r}: must lie in (0, 1]")


@dataclass
class TaskHistory:
    """Record of a synthetic-task run, one entry per evaluation."""

    steps: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    budget_seconds: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    eval_accuracy: list[float] = field(default_factory=list)
    planned_steps: int = 0
    stop_reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on matrices, none on 1-D/0-D parameters and embeddings."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if parameter.dim() >= 2 and "embed" not in name:
            decay.append(parameter)
        else:
            no_decay.append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def learning_rate(settings: TaskTraining, step: int, total_steps: int) -> float:
    """Linear warm-up to lr, then cosine decay to min_lr at total_steps."""
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    span = max(total_steps - settings.warmup_steps, 1)
    progress = min((step - settings.warmup_steps) / span, 1.0)
    return settings.min_lr + (settings.lr - settings.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


class Mixture:
    """Training tasks drawn per update with probability proportional to their weights.

    A task with start fraction f enters once f of the planned updates are done, so short, easy
    tasks can come first (a curriculum).
    """

    def __init__(self, items: Sequence[tuple], target: MQARTask):
        self.tasks, weights, starts = [], [], []
        for item in items or [(target, 1.0)]:
            task, weight, start = (*item, 0.0) if len(item) == 2 else item
            task.validate()
            if task.vocab_size != target.vocab_size:
                raise EvalError(f"mixture task vocab_size={task.vocab_size} differs from the evaluation task's "
                                f"{target.vocab_size}; every task must use the model's vocabulary")
            if not weight > 0:
                raise EvalError(f"invalid mixture weight {weight!r}: every weight must be positive")
            if not 0.0 <= start < 1.0:
                raise EvalError(f"invalid mixture start {start!r}: must lie in [0, 1), the fraction of updates "
                                "done before the task enters")
            self.tasks.append(task)
            weights.append(float(weight))
            starts.append(float(start))
        self.weights, self.starts = np.array(weights), np.array(starts)
        if not (self.starts == 0).any():
            raise EvalError(f"invalid mixture starts {starts}: at least one task must start at 0")

    def probabilities(self, progress: float) -> np.ndarray:
        active = np.where(self.starts <= progress, self.weights, 0.0)
        return active / active.sum()

    def expected_tokens(self, progress: float) -> float:
        return float(self.probabilities(progress) @ np.array([t.seq_len for t in self.tasks]))

    def steps_within(self, token_budget: float, max_steps: int) -> int:
        """The most updates n <= max_steps whose expected tokens, summed over the schedule, fit the budget."""
        boundaries = sorted(set(self.starts.tolist())) + [1.0]

        def cost(n: int) -> float:
            # Updates i with i / n in [a, b) number ceil(b n) - ceil(a n); the expected tokens are
            # constant between two start fractions.
            return sum((math.ceil(b * n) - math.ceil(a * n)) * self.expected_tokens(a)
                       for a, b in zip(boundaries[:-1], boundaries[1:]))

        low, high = 1, max_steps
        while low < high:
            mid = (low + high + 1) // 2
            if cost(mid) <= token_budget:
                low = mid
            else:
                high = mid - 1
        return low


def train_mqar(model: nn.Module, task: MQARTask, settings: TaskTraining,
               on_eval: Callable[[int, float, float], None] | None = None,
               mixture: Sequence[tuple] = (), resume: dict[str, Any] | None = None,
               on_checkpoint: Callable[[dict[str, Any]], None] | None = None,
               checkpoint_every: int = 0) -> TaskHistory:
    """Train `model` in place on MQAR batches and evaluate it on `task`; returns the history.

    Without a mixture every batch is drawn from `task`. With `mixture` [(task, weight) or
    (task, weight, start), ...], each update draws its whole batch from one task picked with
    probability proportional to its weight among the tasks whose start fraction has been
    reached, as Zoology trains on several (T, N) settings at once. Loss and accuracy count
    query positions only. `on_eval(step, train_loss, accuracy)` is called after every
    evaluation (for logging or checkpoints).

    `on_checkpoint(state)` is called every `checkpoint_every` updates (0: never) and once when
    the run ends, with the state that `resume` takes to continue the run: step, optimizer
    state, history, losses since the last evaluation, tokens drawn, schedule length and the
    seconds spent. Batches depend on the seed and the step only and the model draws no random
    numbers while training, so a resumed run repeats the uninterrupted one's losses exactly
    when max_steps is unchanged and no time budget shortens the schedule.
    """
    task.validate()
    settings.validate()
    tasks = Mixture(mixture, task)
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(parameter_groups(model, settings.weight_decay), lr=settings.lr,
                                  betas=(settings.beta1, settings.beta2))
    history = TaskHistory(planned_steps=settings.max_steps)
    window = getattr(getattr(model, "config", None), "window_size", None)
    clock = CLOCKS[settings.budget_clock]
    start, budget_start = time.perf_counter(), clock()
    total_steps = settings.max_steps
    recent_losses: list[float] = []
    tokens_done = 0
    step = 0
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        history = TaskHistory(**{**resume["history"], "stop_reason": ""})
        step, tokens_done = int(resume["step"]), int(resume["tokens_done"])
        recent_losses = [float(x) for x in resume["recent_losses"]]
        start -= float(resume["seconds"])
        budget_start -= float(resume["budget_seconds"])
        if settings.time_budget_s and step >= settings.calibration_steps:
            # The schedule was already sized to the budget; a raised max_steps still caps it.
            total_steps = min(int(resume["total_steps"]), settings.max_steps)
        history.planned_steps = total_steps

    def snapshot() -> dict[str, Any]:
        return {"step": step, "optimizer": optimizer.state_dict(), "history": history.to_dict(),
                "recent_losses": list(recent_losses), "tokens_done": tokens_done, "total_steps": total_steps,
                "seconds": time.perf_counter() - start, "budget_seconds": clock() - budget_start}

    while step < total_steps:
        # Learning rate of this update.
        lr = learning_rate(settings, step, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # Forward and backward on a fresh batch; loss on query positions only.
        model.train()
        rng = np.random.default_rng([settings.seed, MIXTURE_STREAM, step])
        chosen = tasks.tasks[rng.choice(len(tasks.tasks), p=tasks.probabilities(step / total_steps))]
        batch = generate_mqar(chosen, settings.batch_size, seed=[settings.seed, TRAIN_STREAM, step])
        tokens_done += chosen.seq_len
        out = model(batch.inputs.to(device), labels=batch.labels.to(device))
        loss = out.loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite MQAR loss {loss.item()} at update {step} (lr {lr:.3g}); "
                                     "lower lr or raise warmup_steps")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if settings.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        recent_losses.append(loss.item())
        step += 1
        elapsed = clock() - budget_start

        # Under a time budget, shrink the schedule to the updates that fit, taking an update's cost
        # as proportional to its sequence length (an estimate: attention grows faster than T).
        if settings.time_budget_s and step == settings.calibration_steps:
            seconds_per_token = elapsed / tokens_done
            fitting = tasks.steps_within(0.95 * settings.time_budget_s / seconds_per_token, settings.max_steps)
            total_steps = max(step, fitting)
            history.planned_steps = total_steps
            log.info("time budget %.0f s (%s clock): %.3f s per update so far, schedule set to %d updates",
                     settings.time_budget_s, settings.budget_clock, elapsed / step, total_steps)

        # Evaluate on the fixed evaluation set; stop at the target accuracy or the time limit.
        over_time = bool(settings.time_budget_s) and elapsed >= settings.time_budget_s
        if step % settings.eval_every == 0 or step == total_steps or over_time:
            model.eval()
            result = evaluate_mqar(model, task, settings.eval_examples, seed=[settings.seed, EVAL_STREAM],
                                   batch_size=settings.batch_size, window=window)
            train_loss = sum(recent_losses) / len(recent_losses)
            recent_losses.clear()
            history.steps.append(step)
            history.seconds.append(time.perf_counter() - start)
            history.budget_seconds.append(clock() - budget_start)
            history.train_loss.append(train_loss)
            history.eval_accuracy.append(result["accuracy"])
            log.info("step %d/%d | loss %.4f | eval accuracy %.4f | lr %.2e | %.1f min", step, total_steps,
                     train_loss, result["accuracy"], lr, history.seconds[-1] / 60)
            if on_eval is not None:
                on_eval(step, train_loss, result["accuracy"])
            if result["accuracy"] >= settings.target_accuracy:
                history.stop_reason = f"reached target accuracy {settings.target_accuracy}"
            elif over_time:
                history.stop_reason = f"time budget of {settings.time_budget_s:.0f} s ({settings.budget_clock} clock) spent"
        if not history.stop_reason and step >= total_steps:
            history.stop_reason = f"schedule of {total_steps} updates done"
        if on_checkpoint is not None and (history.stop_reason or (checkpoint_every and step % checkpoint_every == 0)):
            on_checkpoint(snapshot())
        if history.stop_reason:
            break
    if not history.stop_reason:
        history.stop_reason = f"schedule of {total_steps} updates done"
    model.eval()
    return history


def batch_accuracy(model: nn.Module, task: MQARTask, examples: int, seed: int) -> float:
    """Query accuracy of the model on one generated batch (a quick check for tests and logs)."""
    batch = generate_mqar(task, examples, seed)
    with torch.no_grad():
        logits = model(batch.inputs.to(next(model.parameters()).device)).logits
    correct, total = accuracy_from_logits(logits.cpu(), batch.labels)
    return correct / total
