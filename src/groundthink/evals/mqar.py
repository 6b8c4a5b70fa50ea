"""Multi-query associative recall (MQAR), the synthetic recall task of Zoology.

Definition (Arora et al., 2023, "Zoology: Measuring and Improving Recall in Efficient
Language Models"; generator `multiquery_ar` of github.com/HazyResearch/zoology): a sequence
starts with `N` key-value pairs `k_1 v_1 k_2 v_2 ... k_N v_N`, keys drawn without replacement
from ids `1 .. V/2 - 1` and values from `V/2 .. V - 1`. Every key is then queried once in the
remaining `T - 2N` tokens, at even offsets `2N + 2 * gap` where the gaps are drawn without
replacement with probability proportional to `gap_index ** (power_a - 1)` (small gaps are
likelier). The target at a query position is the key's value; every other position is
ignored (label -100). With `random_non_queries`, the filler tokens between the queries are
random ids of the whole vocabulary instead of 0.

Accuracy counts query positions only: argmax of the logits equal to the value.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from .common import (EvalError, batched_logits, check_nonempty, check_positive, describe_model, format_table,
                     pyplot, save_figure, write_results)

IGNORE_INDEX = -100


@dataclass(frozen=True)
class MQARTask:
    """Shape of an MQAR example."""

    vocab_size: int = 8192
    """V: keys come from ids 1 .. V/2 - 1, values from V/2 .. V - 1."""
    seq_len: int = 256
    """T: tokens per example."""
    num_pairs: int = 32
    """N: key-value pairs at the start of the sequence; each key is queried once."""
    power_a: float = 0.01
    """Exponent of the power law that places the queries: P(gap i) ~ i ** (power_a - 1), i >= 1.
    0.01 (Zoology's default) favours queries right after the pairs; 1.0 places them uniformly."""
    random_non_queries: bool = True
    """Fill the non-query positions after the pairs with random ids (else 0)."""

    def validate(self) -> None:
        for name in ("vocab_size", "seq_len", "num_pairs"):
            check_positive(name, getattr(self, name))
        V, T, N = self.vocab_size, self.seq_len, self.num_pairs
        if 4 * N > T:
            raise EvalError(f"invalid num_pairs={N} for seq_len={T}: the {N} pairs take {2 * N} tokens and "
                            f"their {N} queries need {2 * N} more (one per two tokens); use num_pairs <= {T // 4} "
                            f"or seq_len >= {4 * N}")
        if V // 2 - 1 < N:
            raise EvalError(f"invalid vocab_size={V} for num_pairs={N}: only {max(V // 2 - 1, 0)} key ids "
                            f"(1 .. V/2 - 1) for {N} distinct keys; use vocab_size >= {2 * N + 2}")
        if not self.power_a > 0:
            raise EvalError(f"invalid power_a={self.power_a!r}: must be positive (1.0 places queries uniformly)")

    @property
    def num_values(self) -> int:
        return self.vocab_size - self.vocab_size // 2

    @property
    def chance(self) -> float:
        """Accuracy of a model that answers a uniformly random value id."""
        return 1.0 / self.num_values


@dataclass
class MQARBatch:
    """Examples of one MQAR task.

    inputs, labels: [E, T]; labels are -100 except at query positions, where they hold the value.
    query_positions, pair_positions: [E, N]; query j of example e sits at query_positions[e, j]
    and asks for the pair whose key is at pair_positions[e, j] (its value at + 1).
    """

    inputs: torch.Tensor
    labels: torch.Tensor
    query_positions: torch.Tensor
    pair_positions: torch.Tensor

    @property
    def distances(self) -> torch.Tensor:
        """[E, N] tokens from each queried value to its query."""
        return self.query_positions - (self.pair_positions + 1)


def _sample_without_replacement(rng: np.random.Generator, n_examples: int, population: int, k: int,
                                log_weights: np.ndarray | None = None) -> np.ndarray:
    """[n_examples, k] distinct indices of range(population) per row, uniform or weighted.

    Weighted draws use the Gumbel top-k trick, which has the distribution of k successive
    draws without replacement with probabilities proportional to exp(log_weights).
    """
    scores = rng.random((n_examples, population), dtype=np.float32)
    if log_weights is not None:
        scores = log_weights[None, :] - np.log(-np.log(np.clip(scores, 1e-12, 1.0 - 1e-7)))
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def generate_mqar(task: MQARTask, num_examples: int, seed: int | Sequence[int]) -> MQARBatch:
    """Generate `num_examples` MQAR examples; the same (task, num_examples, seed) gives the same batch."""
    task.validate()
    check_positive("num_examples", num_examples)
    rng = np.random.default_rng(seed)
    V, T, N, E = task.vocab_size, task.seq_len, task.num_pairs, num_examples

    # 1. Distinct keys and values per example.
    keys = 1 + _sample_without_replacement(rng, E, V // 2 - 1, N)                  # [E, N]
    values = V // 2 + _sample_without_replacement(rng, E, task.num_values, N)      # [E, N]

    # 2. Pairs first: key j at 2j, value j at 2j + 1.
    inputs = np.zeros((E, T), dtype=np.int64)
    inputs[:, 0:2 * N:2] = keys
    inputs[:, 1:2 * N:2] = values

    # 3. Query key j at 2N + 2 * gap_j; the target of that position is value j.
    slots = (T - 2 * N) // 2
    log_p = (task.power_a - 1.0) * np.log(np.arange(1, slots + 1, dtype=np.float64))
    gaps = _sample_without_replacement(rng, E, slots, N, log_weights=log_p)        # [E, N]
    query_positions = 2 * N + 2 * gaps
    rows = np.arange(E)[:, None]
    inputs[rows, query_positions] = keys
    labels = np.full((E, T), IGNORE_INDEX, dtype=np.int64)
    labels[rows, query_positions] = values

    # 4. Filler tokens between the queries.
    if task.random_non_queries:
        filler = inputs == 0
        inputs[filler] = rng.integers(0, V, size=int(filler.sum()))

    pair_positions = np.broadcast_to(2 * np.arange(N), (E, N)).copy()
    return MQARBatch(inputs=torch.from_numpy(inputs), labels=torch.from_numpy(labels),
                     query_positions=torch.from_numpy(query_positions),
                     pair_positions=torch.from_numpy(pair_positions))


@torch.no_grad()
def query_correct(model: nn.Module, batch: MQARBatch, batch_size: int = 64) -> torch.Tensor:
    """[E, N] bool: whether the model's argmax at each query position is the queried value."""
    positions = batch.query_positions

    def reduce(logits: torch.Tensor, rows: slice) -> torch.Tensor:
        index = positions[rows].to(logits.device)
        at_queries = logits.gather(1, index[..., None].expand(-1, -1, logits.shape[-1]))   # [b, N, vocab]
        return at_queries.argmax(dim=-1)

    predictions = batched_logits(model, batch.inputs, batch_size, reduce)
    targets = batch.labels.gather(1, positions)
    return predictions == targets


def accuracy_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(correct, total) of argmax(logits) [B, T, vocab] against labels [B, T] over labels != -100."""
    mask = labels != IGNORE_INDEX
    correct = (logits.argmax(dim=-1) == labels) & mask
    return int(correct.sum()), int(mask.sum())


def distance_edges(seq_len: int, window: int | None) -> list[int]:
    """Bin edges of query distances: multiples of the window (0, W, 2W, 4W, ...) up to seq_len."""
    step = window if window else max(seq_len // 8, 1)
    edges, edge = [0], step
    while edge < seq_len:
        edges.append(edge)
        edge *= 2
    edges.append(seq_len)
    return edges


def accuracy_by_distance(correct: torch.Tensor, distances: torch.Tensor, edges: Sequence[int]) -> list[dict]:
    """Accuracy of the queries whose distance d lies in [edges[i], edges[i+1])."""
    rows = []
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (distances >= low) & (distances < high)
        n = int(inside.sum())
        rows.append({"min_distance": int(low), "max_distance": int(high), "queries": n,
                     "accuracy": float(correct[inside].float().mean()) if n else float("nan")})
    return rows


def evaluate_mqar(model: nn.Module, task: MQARTask, num_examples: int, seed: int | Sequence[int],
                  batch_size: int = 64, window: int | None = None) -> dict[str, Any]:
    """Accuracy of `model` on freshly generated MQAR examples, overall and by query distance."""
    batch = generate_mqar(task, num_examples, seed)
    correct = query_correct(model, batch, batch_size)
    edges = distance_edges(task.seq_len, window)
    return {"task": asdict(task), "examples": num_examples, "queries": int(correct.numel()),
            "accuracy": float(correct.float().mean()), "chance": task.chance,
            "by_distance": accuracy_by_distance(correct, batch.distances, edges)}


# ---------------------------------------------------------------------------------------------
# Suite
# ---------------------------------------------------------------------------------------------

@dataclass
class MQAROptions:
    """Options of the `mqar` suite; the model's vocabulary is the task's."""

    seq_lens: tuple[int, ...] = (256,)
    """Sequence lengths T to test."""
    num_pairs: tuple[int, ...] = (4, 8, 16, 32, 64)
    """Numbers of key-value pairs N to test; pairs that do not fit (4N > T) are skipped."""
    power_a: float = 0.01
    """Query placement exponent (see MQARTask.power_a)."""
    examples: int = 500
    """Examples per (T, N) cell."""
    batch_size: int = 32
    """Examples per forward pass."""

    def validate(self) -> None:
        check_nonempty("seq_lens", self.seq_lens)
        check_nonempty("num_pairs", self.num_pairs)
        for value in self.seq_lens:
            check_positive("seq_lens", value)
        for value in self.num_pairs:
            check_positive("num_pairs", value)
        check_positive("examples", self.examples)
        check_positive("batch_size", self.batch_size)
        if not self.power_a > 0:
            raise EvalError(f"invalid power_a={self.power_a!r}: must be positive")


def model_window(model: nn.Module) -> int | None:
    """The SWA window of a model with S layers, else None."""
    config = getattr(model, "config", None)
    if config is None or "S" not in getattr(config, "layer_pattern", ""):
        return None
    return config.window_size


def run(model: nn.Module, tokenizer, options: MQAROptions, out_dir: Path, seed: int) -> dict[str, Any]:
    """Evaluate MQAR over a grid of (T, N); print a table, write results.json and plots."""
    vocab_size = model.config.vocab_size
    window = model_window(model)
    cells, skipped = [], []
    start = time.perf_counter()
    for T in options.seq_lens:
        for N in options.num_pairs:
            task = MQARTask(vocab_size=vocab_size, seq_len=T, num_pairs=N, power_a=options.power_a)
            try:
                task.validate()
            except EvalError as err:
                skipped.append({"seq_len": T, "num_pairs": N, "reason": str(err)})
                continue
            cells.append(evaluate_mqar(model, task, options.examples, seed=[seed, T, N],
                                       batch_size=options.batch_size, window=window))
    if not cells:
        raise EvalError(f"no (seq_len, num_pairs) cell fits vocab_size={vocab_size}: {skipped[0]['reason']}")

    rows = [[c["task"]["seq_len"], c["task"]["num_pairs"], c["accuracy"], c["chance"]] for c in cells]
    print(f"MQAR, model {model.config.layer_pattern}, vocab {vocab_size}, {options.examples} examples per cell")
    print(format_table(["T", "pairs", "accuracy", "chance"], rows))
    for reason in skipped:
        print(f"skipped T={reason['seq_len']} pairs={reason['num_pairs']}: {reason['reason']}")

    results = {"suite": "mqar", "seed": seed, "options": asdict(options), "model": describe_model(model),
               "cells": cells, "skipped": skipped, "seconds": time.perf_counter() - start}
    out_dir = Path(out_dir)
    write_results(out_dir, results)
    plot_accuracy(cells, out_dir / "mqar_accuracy.png", title=f"MQAR, {model.config.layer_pattern}")
    return results


def plot_accuracy(cells: list[dict], path: Path, title: str) -> Path:
    """Accuracy against the number of pairs, one line per sequence length, with chance dashed."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for T in sorted({c["task"]["seq_len"] for c in cells}):
        row = sorted((c for c in cells if c["task"]["seq_len"] == T), key=lambda c: c["task"]["num_pairs"])
        ax.plot([c["task"]["num_pairs"] for c in row], [c["accuracy"] for c in row], marker="o", label=f"T={T}")
    ax.axhline(cells[0]["chance"], color="gray", linestyle="--", label="chance")
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("key-value pairs")
    ax.set_ylabel("query accuracy")
    ax.set_title(title)
    ax.legend()
    return save_figure(fig, path)
