"""Needle in a haystack on real text.

A needle sentence "The passkey of <name> is <value>." is inserted at depth d (0 = start of the
context, 1 = end) into real text, the prompt ends with "\\nThe passkey of <name> is", and the
model must continue with " <value>" (greedy decoding, exact match). Accuracy is reported per
(context length, depth) cell and drawn as a heat map.

Exact match stays at zero for small models long before they stop using the needle, so each
prompt is also scored as a forced choice: the log-likelihood of " <value>" against `foils`
wrong values. The foils are the other needles' values where the variant has them (a model
that copies any passkey without binding it to the name scores chance) and fresh random
values otherwise. choice_accuracy (chance 1 / (foils + 1)) and the margin in nats are
reported beside the accuracy.

Variants:
- single: one needle;
- multi: the queried needle at depth d plus `extra_needles` needles of other names at random depths;
- distractor: the queried needle plus `extra_needles` needles whose names differ from the
  queried name in one letter and whose values differ (interference). The confusion rate counts
  continuations that are a distractor's value.
The needle sits at a line start nearest to the depth when the haystack has line breaks, so it
does not split a word.
"""

from __future__ import annotations

import string
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from .common import (EvalError, check_fraction, check_nonempty, check_positive, describe_model, format_table,
                     heatmap, write_results)
from .text import (NAMES, SPLITS, choice_log_likelihoods, encode, encode_exact, forced_choice, greedy_continuations,
                   load_text, starts_with)

VARIANTS = ("single", "multi", "distractor")
VALUE_KINDS = ("word", "number")


@dataclass
class NIAHOptions:
    """Options of the `niah` suite."""

    text: str = ""
    """UTF-8 corpus the haystack is cut from (required)."""
    split: str = "val"
    """Part of the corpus: val (its last val_fraction), train or all."""
    val_fraction: float = 0.1
    """Fraction of the corpus, from its end, that forms the val split."""
    context_lengths: tuple[int, ...] = (256, 512, 1024)
    """Prompt lengths in tokens, needle and question included."""
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    """Needle depths as fractions of the haystack (0 = start, 1 = right before the question)."""
    variants: tuple[str, ...] = VARIANTS
    """Variants to run: single, multi, distractor."""
    extra_needles: int = 3
    """Needles besides the queried one in the multi and distractor variants."""
    value_kind: str = "word"
    """word: 5 random lowercase letters; number: 5 random digits (the tokenizer must know digits)."""
    examples: int = 8
    """Prompts per (variant, context length, depth) cell."""
    foils: int = 3
    """Wrong values each answer competes with in the forced choice."""
    batch_size: int = 8
    """Prompts per forward pass."""

    def validate(self) -> None:
        if self.split not in SPLITS:
            raise EvalError(f"invalid split={self.split!r}: use one of {SPLITS}")
        check_nonempty("context_lengths", self.context_lengths)
        for length in self.context_lengths:
            check_positive("context_lengths", length)
        check_nonempty("depths", self.depths)
        for depth in self.depths:
            check_fraction("depth", depth)
        check_nonempty("variants", self.variants)
        unknown = sorted(set(self.variants) - set(VARIANTS))
        if unknown:
            raise EvalError(f"invalid variants {unknown}: choose from {VARIANTS}")
        if self.value_kind not in VALUE_KINDS:
            raise EvalError(f"invalid value_kind={self.value_kind!r}: use one of {VALUE_KINDS}")
        if not 0 <= self.extra_needles < len(NAMES):
            raise EvalError(f"invalid extra_needles={self.extra_needles!r}: must lie in [0, {len(NAMES) - 1}]")
        check_positive("examples", self.examples)
        check_positive("foils", self.foils)
        check_positive("batch_size", self.batch_size)


def random_value(kind: str, rng: np.random.Generator) -> str:
    alphabet = string.ascii_lowercase if kind == "word" else string.digits
    return "".join(rng.choice(list(alphabet), size=5))


def similar_name(name: str, rng: np.random.Generator, used: set[str]) -> str:
    """Return a name that differs from `name` in one lowercase letter and is not in `used`."""
    for _ in range(1000):
        i = int(rng.integers(1, len(name)))
        letter = str(rng.choice(list(string.ascii_lowercase)))
        candidate = name[:i] + letter + name[i + 1:]
        if candidate != name and candidate not in used:
            return candidate
    raise EvalError(f"could not find a name one letter away from {name!r}; lower extra_needles")


def line_starts(tokenizer, haystack: np.ndarray) -> np.ndarray:
    """Positions i of the haystack where token i - 1 ends with a newline, and 0."""
    ends_line = {}
    starts = [0]
    for i, token in enumerate(haystack[:-1].tolist()):
        if token not in ends_line:
            ends_line[token] = tokenizer.decode([token]).endswith("\n")
        if ends_line[token]:
            starts.append(i + 1)
    return np.asarray(starts)


def insertion_point(starts: np.ndarray, length: int, depth: float) -> int:
    """Return the line start nearest to depth * length."""
    target = depth * length
    return int(starts[np.argmin(np.abs(starts - target))])


def build_prompt(tokenizer, corpus: np.ndarray, length: int, depth: float, variant: str, extra: int,
                 value_kind: str, rng: np.random.Generator, foils: int = 3) -> dict[str, Any]:
    """Build one needle-in-a-haystack prompt of exactly `length` tokens, with the expected value, the
    values of the other needles and `foils` wrong values for the forced choice."""
    # 1. Needles: the queried one and, per variant, others with other or similar names.
    name = str(rng.choice(NAMES))
    value = random_value(value_kind, rng)
    others: list[tuple[str, str]] = []
    if variant == "multi":
        names = [n for n in NAMES if n != name]
        for i in rng.choice(len(names), size=extra, replace=False):
            others.append((names[i], random_value(value_kind, rng)))
    elif variant == "distractor":
        used = {name}
        for _ in range(extra):
            similar = similar_name(name, rng, used)
            used.add(similar)
            other_value = random_value(value_kind, rng)
            while other_value == value:
                other_value = random_value(value_kind, rng)
            others.append((similar, other_value))

    def needle(key: str, val: str) -> np.ndarray:
        return encode_exact(tokenizer, f"The passkey of {key} is {val}.\n", "needle")

    main = needle(name, value)
    extra_ids = [needle(k, v) for k, v in others]
    question = encode_exact(tokenizer, f"\nThe passkey of {name} is", "question")
    answer = encode_exact(tokenizer, f" {value}", "value")
    other_answers = [encode_exact(tokenizer, f" {v}", "value") for _, v in others]

    # 2. Haystack: real text filling the rest of the prompt.
    fill = length - len(main) - sum(len(e) for e in extra_ids) - len(question)
    if fill < 1:
        raise EvalError(f"context length {length} is too short for the needles and the question "
                        f"({length - fill} tokens); use longer context_lengths or fewer extra_needles")
    if fill > len(corpus):
        raise EvalError(f"the text has {len(corpus)} tokens, fewer than the {fill} haystack tokens of context "
                        f"length {length}; use a longer text or shorter context_lengths")
    start = int(rng.integers(0, len(corpus) - fill + 1))
    haystack = corpus[start:start + fill]
    starts = np.append(line_starts(tokenizer, haystack), fill)

    # 3. Insert: the other needles at random depths first, then the queried one at `depth`.
    inserts = [(insertion_point(starts, fill, float(rng.random())), 0, e) for e in extra_ids]
    inserts.append((insertion_point(starts, fill, depth), 1, main))
    pieces, cursor = [], 0
    for point, _, ids in sorted(inserts, key=lambda item: (item[0], item[1])):
        pieces += [haystack[cursor:point], ids]
        cursor = point
    pieces += [haystack[cursor:], question]
    prompt = np.concatenate(pieces)

    # 4. Foils: the other needles' values first, then fresh values that occur in no needle.
    wrong = [v for _, v in others][:foils]
    while len(wrong) < foils:
        candidate = random_value(value_kind, rng)
        if candidate != value and candidate not in wrong and all(candidate != v for _, v in others):
            wrong.append(candidate)
    foil_ids = [encode_exact(tokenizer, f" {v}", "value") for v in wrong]
    return {"prompt": prompt, "answer": answer, "others": other_answers, "foils": foil_ids}


def build_cell(tokenizer, corpus: np.ndarray, length: int, depth: float, variant: str, options: NIAHOptions,
               seed: Sequence[int]) -> list[dict[str, Any]]:
    """Build the `options.examples` prompts of one (variant, context length, depth) cell."""
    rng = np.random.default_rng(seed)
    return [build_prompt(tokenizer, corpus, length, depth, variant, options.extra_needles, options.value_kind, rng,
                         options.foils)
            for _ in range(options.examples)]


def score_cell(model: nn.Module, examples: list[dict[str, Any]], length: int, depth: float, variant: str,
               options: NIAHOptions) -> dict[str, Any]:
    """Score one cell's prompts: exact-match accuracy, confusion rate and the forced choice."""
    prompts = torch.from_numpy(np.stack([e["prompt"] for e in examples]))
    longest = max(len(a) for e in examples for a in [e["answer"], *e["others"]])
    generated = greedy_continuations(model, prompts, longest, options.batch_size).tolist()
    correct = [starts_with(g, e["answer"]) for g, e in zip(generated, examples)]
    confused = [not c and any(starts_with(g, o) for o in e["others"]) for g, c, e in zip(generated, correct, examples)]
    scores = choice_log_likelihoods(model, prompts, [[e["answer"], *e["foils"]] for e in examples],
                                    options.batch_size)
    return {"variant": variant, "context_length": length, "depth": depth, "examples": len(examples),
            "accuracy": float(np.mean(correct)), "confusion_rate": float(np.mean(confused)),
            **forced_choice(scores)}


def evaluate_cell(model: nn.Module, tokenizer, corpus: np.ndarray, length: int, depth: float, variant: str,
                  options: NIAHOptions, seed: Sequence[int]) -> dict[str, Any]:
    """Build and score the prompts of one cell: exact-match accuracy, confusion rate and the forced choice."""
    examples = build_cell(tokenizer, corpus, length, depth, variant, options, seed)
    return score_cell(model, examples, length, depth, variant, options)


def run(model: nn.Module, tokenizer, options: NIAHOptions, out_dir: Path, seed: int,
        corpus: str | None = None) -> dict[str, Any]:
    """Evaluate every (variant, context length, depth) cell; print tables, write results.json and heat maps."""
    if tokenizer is None:
        raise EvalError("the niah suite needs the model's tokenizer; load the model with load_checkpoint")
    start = time.perf_counter()
    out_dir = Path(out_dir)
    pattern = model.config.layer_pattern
    text = corpus if corpus is not None else load_text(options.text, options.split, options.val_fraction)
    corpus = encode(tokenizer, text)

    # Every prompt is built before the model runs, so a context length too short for the needles,
    # or longer than the text, raises before any table is printed or any file is written.
    prompts = {(v, length, d): build_cell(tokenizer, corpus, length, depth, variant, options,
                                          seed=[seed, v, length, d])
               for v, variant in enumerate(options.variants)
               for length in options.context_lengths
               for d, depth in enumerate(options.depths)}

    cells = []
    for v, variant in enumerate(options.variants):
        for length in options.context_lengths:
            for d, depth in enumerate(options.depths):
                cells.append(score_cell(model, prompts[v, length, d], length, depth, variant, options))

        rows = [c for c in cells if c["variant"] == variant]

        def grid(key: str) -> np.ndarray:
            return np.array([[next(c[key] for c in rows if c["context_length"] == n and c["depth"] == depth)
                              for n in options.context_lengths] for depth in options.depths])

        columns = ["depth"] + [str(n) for n in options.context_lengths]
        accuracy, choice = grid("accuracy"), grid("choice_accuracy")
        print(f"\nneedle in a haystack ({pattern}), variant {variant}: accuracy, rows = depth, columns = context length")
        print(format_table(columns, [[depth, *accuracy[i]] for i, depth in enumerate(options.depths)]))
        if variant != "single":
            confusion = float(np.mean([c["confusion_rate"] for c in rows]))
            print(f"mean confusion rate (answered another needle's value): {confusion:.3f}")
        chance = rows[0]["choice_chance"]
        print(f"forced choice against {options.foils} foils (chance {chance:.3f}): choice accuracy, "
              f"mean margin {np.mean([c['margin_nats'] for c in rows]):+.3f} nats")
        print(format_table(columns, [[depth, *choice[i]] for i, depth in enumerate(options.depths)]))
        heatmap(accuracy, options.depths, options.context_lengths, f"NIAH {variant}, {pattern}",
                "context length (tokens)", "needle depth", out_dir / f"niah_{variant}.png")
        heatmap(choice, options.depths, options.context_lengths,
                f"NIAH {variant} forced choice, {pattern} (chance {chance:.2f})",
                "context length (tokens)", "needle depth", out_dir / f"niah_{variant}_choice.png")

    results = {"suite": "niah", "seed": seed, "options": asdict(options), "model": describe_model(model),
               "cells": cells, "seconds": time.perf_counter() - start}
    write_results(out_dir, results)
    return results
