"""Tests a model cannot pass by pattern matching alone.

1. State ablation: perplexity on real text when the GDN memory is zeroed at position p, or
   the global pathway is cut from p on, against the intact model. A model whose perplexity
   after p does not move does not use its memory. Skipped, with the reason, for models
   without G layers (zero_memory) or without an S layer above a G layer (cut_global).
2. Copy-dependent tokens: perplexity only on tokens that complete a repeat of a token
   sequence whose previous occurrence lies more than W tokens back (names, terms), against
   all tokens. Only the memory (or full attention) can carry such a repeat.
3. Entity tracking: "X has a Y." for 5 to 50 entities, real distractor text, then the
   question "X has a". It reports accuracy by entity count and distance, and the confusion
   rate (the model continues with another entity's attribute). A forced choice scores the
   right attribute against other entities' attributes from the same prompt, so a model
   that copies any mentioned object without binding it to the name scores chance.
4. Zero-shot associative recall: MQAR over the tokenizer's alphabetic tokens, for a model
   trained only on language modelling.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from .ablation import ABLATIONS
from .common import (EvalError, check_fraction, check_nonempty, check_positive, describe_model, format_table,
                     pyplot, save_figure, write_results)
from .mqar import MQARTask, generate_mqar, query_correct
from .text import (NAMES, OBJECTS, SPLITS, choice_log_likelihoods, encode, encode_exact, forced_choice,
                   greedy_continuations, load_text, perplexity, starts_with, token_nll, token_windows)

PARTS = ("state_ablation", "copy", "entities", "zero_shot_ar")


@dataclass
class HonestOptions:
    """Options of the `honest` suite."""

    text: str = ""
    """UTF-8 corpus of the real-text parts (required)."""
    split: str = "val"
    """Part of the corpus: val (its last val_fraction), train or all."""
    val_fraction: float = 0.1
    """Fraction of the corpus, from its end, that forms the val split."""
    parts: tuple[str, ...] = PARTS
    """Tests to run: state_ablation, copy, entities, zero_shot_ar."""
    seq_len: int = 512
    """Tokens per window of the state-ablation and copy tests."""
    max_windows: int = 64
    """Windows scored at most by the state-ablation and copy tests."""
    batch_size: int = 8
    """Sequences per forward pass."""
    ablation_position: float = 0.5
    """Ablated position p as a fraction of the window length."""
    copy_distance: int = 0
    """W of the copy test and of the "far" tokens of the ablation test; 0 means the model's window_size."""
    match_tokens: int = 8
    """Length in tokens of the repeated sequence that makes a token copy-dependent."""
    entity_counts: tuple[int, ...] = (5, 10, 20, 50)
    """Numbers of entities (at most 60)."""
    distractor_tokens: tuple[int, ...] = (0, 256)
    """Minimum tokens of real text between the facts and the question."""
    entity_examples: int = 16
    """Questions per (entity count, distractor length) cell."""
    entity_foils: int = 4
    """Other entities' attributes each answer competes with in the forced choice (fewer when
    there are fewer other entities; a single entity competes with unmentioned objects)."""
    ar_pairs: tuple[int, ...] = (4, 8, 16)
    """Key-value pairs of the zero-shot recall test."""
    ar_seq_len: int = 128
    """Tokens per zero-shot recall example."""
    ar_examples: int = 200
    """Examples per zero-shot recall cell."""

    def validate(self) -> None:
        if self.split not in SPLITS:
            raise EvalError(f"invalid split={self.split!r}: use one of {SPLITS}")
        check_nonempty("parts", self.parts)
        unknown = sorted(set(self.parts) - set(PARTS))
        if unknown:
            raise EvalError(f"invalid parts {unknown}: choose from {PARTS}")
        for name in ("seq_len", "max_windows", "batch_size", "match_tokens", "entity_examples", "entity_foils",
                     "ar_seq_len", "ar_examples"):
            check_positive(name, getattr(self, name))
        check_fraction("ablation_position", self.ablation_position)
        if self.copy_distance < 0:
            raise EvalError(f"invalid copy_distance={self.copy_distance!r}: 0 (the model's window) or positive")
        check_nonempty("entity_counts", self.entity_counts)
        for count in self.entity_counts:
            if not 1 <= count <= len(NAMES):
                raise EvalError(f"invalid entity count {count}: must lie in [1, {len(NAMES)}] (names available)")
        check_nonempty("distractor_tokens", self.distractor_tokens)
        if min(self.distractor_tokens) < 0:
            raise EvalError(f"invalid distractor_tokens={self.distractor_tokens!r}: must be 0 or more")
        check_nonempty("ar_pairs", self.ar_pairs)


# ---------------------------------------------------------------------------------------------
# 1. State ablation
# ---------------------------------------------------------------------------------------------

def offset_bins(length: int) -> list[int]:
    """Edges 0, 1, 2, 4, 8, ... of token offsets after the ablated position, ending at length."""
    edges, edge = [0, 1], 2
    while edge < length:
        edges.append(edge)
        edge *= 2
    edges.append(length)
    return edges


def state_ablation(model: nn.Module, windows: torch.Tensor, position: int, far: int,
                   batch_size: int) -> dict[str, Any]:
    """Per-token loss with each memory ablation at `position` against the intact model.

    windows [n, T]; the model reads windows[:, :-1], so output position j predicts token j + 1.
    "after" counts outputs j >= position, "far" outputs j >= position + far (beyond the window).
    """
    T = windows.shape[1] - 1
    if not 0 < position < T:
        raise EvalError(f"ablation position {position} must lie inside the window of {T} positions")
    intact = token_nll(model, windows, batch_size)                                # [n, T]
    edges = offset_bins(T - position)
    results: dict[str, Any] = {"position": position, "far": far, "windows": int(windows.shape[0])}
    for name, (ablate, unsupported) in ABLATIONS.items():
        reason = unsupported(model)
        if reason is not None:
            results[name] = {"skipped": reason}
            continue
        with ablate(model, position):
            ablated = token_nll(model, windows, batch_size)
        delta = (ablated - intact)[:, position:]                                   # [n, T - position]
        by_offset = []
        for low, high in zip(edges[:-1], edges[1:]):
            by_offset.append({"min_offset": low, "max_offset": high,
                              "delta_nll": float(delta[:, low:high].mean())})
        far_start = min(position + far, T)
        results[name] = {
            "max_abs_change_before": float((ablated - intact)[:, :position].abs().max()),
            "ppl_intact_after": perplexity(intact[:, position:]),
            "ppl_ablated_after": perplexity(ablated[:, position:]),
            "ppl_intact_far": perplexity(intact[:, far_start:]),
            "ppl_ablated_far": perplexity(ablated[:, far_start:]),
            "far_tokens": int(intact[:, far_start:].numel()),
            "delta_nll_by_offset": by_offset,
        }
    return results


# ---------------------------------------------------------------------------------------------
# 2. Copy-dependent tokens
# ---------------------------------------------------------------------------------------------

def repeat_distances(window: np.ndarray, match: int) -> np.ndarray:
    """For each token i of window [T]: tokens back to the previous occurrence of the sequence
    window[i - match + 1 .. i] (its end to i), 0 where it has none or i < match - 1."""
    distances = np.zeros(len(window), dtype=np.int64)
    last_end: dict[tuple, int] = {}
    for i in range(match - 1, len(window)):
        gram = tuple(window[i - match + 1:i + 1].tolist())
        previous = last_end.get(gram)
        if previous is not None:
            distances[i] = i - previous
        last_end[gram] = i
    return distances


def copy_masks(windows: np.ndarray, distance: int, match: int) -> tuple[np.ndarray, np.ndarray]:
    """Masks [n, T - 1] over the targets windows[:, 1:]: (far, near).

    far: the target completes a repeat of `match` tokens, and the closest previous occurrence
    ended more than `distance` tokens earlier. near: that occurrence ended at most `distance`
    tokens earlier.
    """
    d = np.stack([repeat_distances(w, match) for w in windows])[:, 1:]           # [n, T - 1]
    return d > distance, (d > 0) & (d <= distance)


def copy_dependent(model: nn.Module, windows: torch.Tensor, distance: int, match: int,
                   batch_size: int) -> dict[str, Any]:
    """Perplexity on all tokens, on copy-dependent tokens beyond `distance`, and on near repeats."""
    nll = token_nll(model, windows, batch_size)
    far, near = (torch.from_numpy(m) for m in copy_masks(windows.numpy(), distance, match))
    return {"distance": distance, "match_tokens": match, "tokens": int(nll.numel()),
            "far_tokens": int(far.sum()), "near_tokens": int(near.sum()),
            "ppl_all": perplexity(nll), "ppl_copy_far": perplexity(nll[far]), "ppl_copy_near": perplexity(nll[near])}


# ---------------------------------------------------------------------------------------------
# 3. Entity tracking
# ---------------------------------------------------------------------------------------------

def build_entity_examples(tokenizer, haystack: np.ndarray, count: int, distractor: int, n_examples: int,
                          rng: np.random.Generator, foils: int = 4) -> list[dict[str, Any]]:
    """Prompts "X has a Y.\\n" * count + real text + "\\nX has a", all of one length.

    The real text fills each prompt up to a common length, so it is at least `distractor`
    tokens long. Each example records the answer " Y", the other entities' attributes, up to
    `foils` of them drawn as forced-choice foils, and the distance in tokens from the end of
    the asked fact to the end of the prompt.
    """
    drafts = []
    for _ in range(n_examples):
        names = rng.choice(len(NAMES), size=count, replace=False)
        objects = rng.choice(len(OBJECTS), size=count, replace=False)
        fact_ids, fact_ends = [], []
        for n, o in zip(names, objects):
            fact_ids.append(encode_exact(tokenizer, f"{NAMES[n]} has a {OBJECTS[o]}.\n", "fact"))
            fact_ends.append(sum(len(f) for f in fact_ids))
        asked = int(rng.integers(count))
        question = encode_exact(tokenizer, f"\n{NAMES[names[asked]]} has a", "question")
        answers = [encode_exact(tokenizer, f" {OBJECTS[o]}", "answer") for o in objects]
        drafts.append({"facts": np.concatenate(fact_ids), "fact_end": fact_ends[asked], "question": question,
                       "answer": answers[asked], "others": [a for i, a in enumerate(answers) if i != asked],
                       "objects": objects})

    length = max(len(d["facts"]) + len(d["question"]) for d in drafts) + distractor
    examples = []
    for d in drafts:
        filler = length - len(d["facts"]) - len(d["question"])
        if filler > len(haystack):
            raise EvalError(f"the text has {len(haystack)} tokens, fewer than the {filler} distractor tokens asked for; "
                            "use a longer text or fewer distractor_tokens")
        start = int(rng.integers(0, len(haystack) - filler + 1))
        prompt = np.concatenate([d["facts"], haystack[start:start + filler], d["question"]])
        examples.append({"prompt": prompt, "answer": d["answer"], "others": d["others"],
                         "distance": int(length - d["fact_end"])})
    # Foils are drawn after the prompts so that the prompts do not depend on `foils`.
    for d, example in zip(drafts, examples):
        if d["others"]:
            picked = rng.choice(len(d["others"]), size=min(foils, len(d["others"])), replace=False)
            example["foils"] = [d["others"][i] for i in picked]
        else:
            unused = [o for o in range(len(OBJECTS)) if o not in set(d["objects"].tolist())]
            picked = rng.choice(unused, size=min(foils, len(unused)), replace=False)
            example["foils"] = [encode_exact(tokenizer, f" {OBJECTS[o]}", "answer") for o in picked]
    return examples


def entity_tracking(model: nn.Module, tokenizer, haystack: np.ndarray, counts: Sequence[int],
                    distractors: Sequence[int], n_examples: int, batch_size: int, seed: int,
                    foils: int = 4) -> dict[str, Any]:
    """Greedy-answer accuracy, confusion rate and forced-choice accuracy by entity count and
    distractor length."""
    cells = []
    for count in counts:
        for distractor in distractors:
            rng = np.random.default_rng([seed, count, distractor])
            examples = build_entity_examples(tokenizer, haystack, count, distractor, n_examples, rng, foils)
            prompts = torch.from_numpy(np.stack([e["prompt"] for e in examples]))
            longest = max(max(len(e["answer"]), *(len(o) for o in e["others"])) if e["others"] else len(e["answer"])
                          for e in examples)
            generated = greedy_continuations(model, prompts, longest, batch_size).tolist()
            correct = [starts_with(g, e["answer"]) for g, e in zip(generated, examples)]
            confused = [not c and any(starts_with(g, o) for o in e["others"])
                        for g, c, e in zip(generated, correct, examples)]
            cells.append({"entities": count, "distractor_tokens": distractor, "examples": len(examples),
                          "prompt_tokens": int(prompts.shape[1]),
                          "accuracy": float(np.mean(correct)), "confusion_rate": float(np.mean(confused)),
                          **forced_choice(choice_log_likelihoods(
                              model, prompts, [[e["answer"], *e["foils"]] for e in examples], batch_size)),
                          "distances": [e["distance"] for e in examples], "correct": correct,
                          "confused": confused})
    return {"cells": cells, "by_distance": entity_accuracy_by_distance(cells)}


def entity_accuracy_by_distance(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Accuracy and confusion rate per entity count over distance bins [0, 64), [64, 128), [128, 256), ..."""
    rows = []
    for count in sorted({c["entities"] for c in cells}):
        distances = np.concatenate([c["distances"] for c in cells if c["entities"] == count])
        correct = np.concatenate([c["correct"] for c in cells if c["entities"] == count])
        confused = np.concatenate([c["confused"] for c in cells if c["entities"] == count])
        low, high = 0, 64
        while low <= distances.max():
            inside = (distances >= low) & (distances < high)
            if inside.any():
                rows.append({"entities": count, "min_distance": low, "max_distance": high,
                             "questions": int(inside.sum()), "accuracy": float(correct[inside].mean()),
                             "confusion_rate": float(confused[inside].mean())})
            low, high = high, high * 2
    return rows


# ---------------------------------------------------------------------------------------------
# 4. Zero-shot associative recall
# ---------------------------------------------------------------------------------------------

def alphabetic_tokens(tokenizer) -> np.ndarray:
    """Ids whose text, without surrounding spaces, is alphabetic (letters for a char tokenizer)."""
    ids = [i for i in range(tokenizer.vocab_size) if tokenizer.decode([i]).strip().isalpha()]
    return np.asarray(ids, dtype=np.int64)


def zero_shot_recall(model: nn.Module, tokenizer, pairs: Sequence[int], seq_len: int, n_examples: int,
                     batch_size: int, seed: int) -> dict[str, Any]:
    """MQAR accuracy over alphabetic tokens: the task ids are mapped onto the tokenizer's ids."""
    table = torch.from_numpy(alphabetic_tokens(tokenizer))
    cells, skipped = [], []
    for n in pairs:
        task = MQARTask(vocab_size=len(table), seq_len=seq_len, num_pairs=n)
        try:
            task.validate()
        except EvalError as err:
            skipped.append({"num_pairs": n, "reason": str(err)})
            continue
        batch = generate_mqar(task, n_examples, seed=[seed, n])
        batch.inputs = table[batch.inputs]
        batch.labels = torch.where(batch.labels >= 0, table[batch.labels.clamp(min=0)], batch.labels)
        correct = query_correct(model, batch, batch_size)
        cells.append({"num_pairs": n, "seq_len": seq_len, "accuracy": float(correct.float().mean()),
                      "chance": task.chance, "queries": int(correct.numel())})
    return {"alphabetic_tokens": int(len(table)), "cells": cells, "skipped": skipped}


# ---------------------------------------------------------------------------------------------
# Suite
# ---------------------------------------------------------------------------------------------

def run(model: nn.Module, tokenizer, options: HonestOptions, out_dir: Path, seed: int,
        corpus: str | None = None) -> dict[str, Any]:
    """Run the chosen parts; print their tables, write results.json and one plot per part."""
    if tokenizer is None:
        raise EvalError("the honest suite needs the model's tokenizer; load the model with load_checkpoint")
    start = time.perf_counter()
    pattern = model.config.layer_pattern
    out_dir = Path(out_dir)
    text = corpus if corpus is not None else load_text(options.text, options.split, options.val_fraction)
    ids = encode(tokenizer, text)
    windows = torch.from_numpy(token_windows(ids, options.seq_len + 1, options.max_windows))
    distance = options.copy_distance or model.config.window_size
    results: dict[str, Any] = {"suite": "honest", "seed": seed, "options": asdict(options),
                               "model": describe_model(model)}

    if "state_ablation" in options.parts:
        position = max(1, min(options.seq_len - 1, round(options.ablation_position * options.seq_len)))
        part = state_ablation(model, windows, position, distance, options.batch_size)
        results["state_ablation"] = part
        print_ablation(pattern, part)
        plot_ablation(part, pattern, out_dir / "honest_state_ablation.png")

    if "copy" in options.parts:
        part = copy_dependent(model, windows, distance, options.match_tokens, options.batch_size)
        results["copy"] = part
        print(f"\ncopy-dependent tokens ({pattern}): repeats of {options.match_tokens} tokens, W = {distance}")
        print(format_table(["tokens", "far", "near", "ppl all", "ppl copy far", "ppl copy near"],
                           [[part["tokens"], part["far_tokens"], part["near_tokens"], part["ppl_all"],
                             part["ppl_copy_far"], part["ppl_copy_near"]]]))

    if "entities" in options.parts:
        part = entity_tracking(model, tokenizer, ids, options.entity_counts, options.distractor_tokens,
                               options.entity_examples, options.batch_size, seed, options.entity_foils)
        results["entities"] = part
        print(f"\nentity tracking ({pattern}), {options.entity_examples} questions per cell; forced choice "
              f"against up to {options.entity_foils} other entities' attributes")
        print(format_table(["entities", "distractor", "prompt tokens", "accuracy", "confusion", "choice",
                            "chance", "margin"],
                           [[c["entities"], c["distractor_tokens"], c["prompt_tokens"], c["accuracy"],
                             c["confusion_rate"], c["choice_accuracy"], c["choice_chance"], c["margin_nats"]]
                            for c in part["cells"]]))
        print("by distance from the fact to the question (tokens)")
        print(format_table(["entities", "distance", "questions", "accuracy", "confusion"],
                           [[r["entities"], f"[{r['min_distance']}, {r['max_distance']})", r["questions"],
                             r["accuracy"], r["confusion_rate"]] for r in part["by_distance"]]))
        plot_entities(part, pattern, out_dir / "honest_entities.png")

    if "zero_shot_ar" in options.parts:
        part = zero_shot_recall(model, tokenizer, options.ar_pairs, options.ar_seq_len, options.ar_examples,
                                options.batch_size, seed)
        results["zero_shot_ar"] = part
        print(f"\nzero-shot associative recall ({pattern}) over {part['alphabetic_tokens']} alphabetic tokens")
        print(format_table(["pairs", "T", "accuracy", "chance"],
                           [[c["num_pairs"], c["seq_len"], c["accuracy"], c["chance"]] for c in part["cells"]]))
        for item in part["skipped"]:
            print(f"skipped {item['num_pairs']} pairs: {item['reason']}")

    results["seconds"] = time.perf_counter() - start
    write_results(out_dir, results)
    return results


def print_ablation(pattern: str, part: dict[str, Any]) -> None:
    print(f"state ablation ({pattern}) at position {part['position']}, far = {part['far']}+ tokens after it")
    rows, skipped = [], []
    for name in ABLATIONS:
        item = part[name]
        if "skipped" in item:
            skipped.append(f"{name} skipped: {item['skipped']}")
            continue
        rows.append([name, item["ppl_intact_after"], item["ppl_ablated_after"], item["ppl_intact_far"],
                     item["ppl_ablated_far"], f"{item['max_abs_change_before']:.1e}"])
    if rows:
        print(format_table(["ablation", "ppl after", "ablated", "ppl far", "ablated", "change before p"], rows))
    for line in skipped:
        print(line)


def plot_ablation(part: dict[str, Any], pattern: str, path: Path) -> Path | None:
    """Mean loss increase against the offset from the ablated position, one line per ablation."""
    lines = {name: part[name] for name in ABLATIONS if "skipped" not in part[name]}
    if not lines:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, item in lines.items():
        bins = item["delta_nll_by_offset"]
        ax.plot([max(b["min_offset"], 0.5) for b in bins], [b["delta_nll"] for b in bins], marker="o", label=name)
    ax.axhline(0.0, color="gray", linestyle="--")
    ax.axvline(part["far"], color="gray", linestyle=":", label="far (W)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens after the ablated position")
    ax.set_ylabel("loss increase (nats)")
    ax.set_title(f"state ablation, {pattern}")
    ax.legend()
    return save_figure(fig, path)


def plot_entities(part: dict[str, Any], pattern: str, path: Path) -> Path:
    """Accuracy, confusion rate and forced-choice accuracy against the entity count, one line per
    distractor length."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for distractor in sorted({c["distractor_tokens"] for c in part["cells"]}):
        row = [c for c in part["cells"] if c["distractor_tokens"] == distractor]
        ax.plot([c["entities"] for c in row], [c["accuracy"] for c in row], marker="o",
                label=f"accuracy, {distractor}+ distractor tokens")
        ax.plot([c["entities"] for c in row], [c["confusion_rate"] for c in row], marker="x", linestyle="--",
                label=f"confusion, {distractor}+ distractor tokens")
        ax.plot([c["entities"] for c in row], [c["choice_accuracy"] for c in row], marker="s", linestyle=":",
                label=f"forced choice, {distractor}+ distractor tokens")
    counts = sorted({c["entities"] for c in part["cells"]})
    chance = [next(c["choice_chance"] for c in part["cells"] if c["entities"] == n) for n in counts]
    ax.plot(counts, chance, color="gray", linestyle="--", label="forced-choice chance")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("entities")
    ax.set_ylabel("rate")
    ax.set_title(f"entity tracking, {pattern}")
    ax.legend(fontsize=7)
    return save_figure(fig, path)
