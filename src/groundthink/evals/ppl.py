"""Perplexity and bits per character on a held-out split of real text.

The text is cut into non-overlapping windows of seq_len tokens; each window is scored on its
tokens 1 .. seq_len - 1 given the tokens before them inside the window. Bits per character
divide the total loss in bits by the characters those target tokens decode to.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .common import EvalError, check_positive, describe_model, format_table, pyplot, save_figure, write_results
from .text import SPLITS, encode, load_text, perplexity, token_nll, token_windows


@dataclass
class PPLOptions:
    """Options of the `ppl` suite."""

    text: str = ""
    """UTF-8 corpus to score (required)."""
    split: str = "val"
    """Part of the corpus: val (its last val_fraction), train or all."""
    val_fraction: float = 0.1
    """Fraction of the corpus, from its end, that forms the val split."""
    seq_len: int = 256
    """Tokens per scored window."""
    max_windows: int = 200
    """Windows scored at most (from the start of the split)."""
    batch_size: int = 16
    """Windows per forward pass."""

    def validate(self) -> None:
        if self.split not in SPLITS:
            raise EvalError(f"invalid split={self.split!r}: use one of {SPLITS}")
        check_positive("max_windows", self.max_windows)
        check_positive("batch_size", self.batch_size)
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise EvalError(f"invalid seq_len={self.seq_len!r}: need at least 2 tokens (one context, one target)")


@dataclass
class CommandPPLOptions:
    """--option keys of `groundthink eval --suite ppl`, which scores every token of a split.

    --seq-len, --batch-size and --max-tokens set the fields of the same names.
    """

    seq_len: int = 0
    """Tokens per scored window; 0 takes the run's data.seq_len."""
    batch_size: int = 16
    """Windows per forward pass."""
    max_tokens: int = 0
    """Score only the first max_tokens tokens of the split; 0 scores all of them."""
    max_windows: int = 0
    """Score only the first max_windows windows of seq_len tokens; 0 scores all of them."""

    def validate(self) -> None:
        check_positive("batch_size", self.batch_size)
        zero_means = {"seq_len": "the run's data.seq_len", "max_tokens": "no limit", "max_windows": "no limit"}
        for name, meaning in zero_means.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise EvalError(f"invalid {name}={value!r}: must be a positive integer, or 0 for {meaning}")

    def token_limit(self, seq_len: int) -> int:
        """Return the number of tokens to score from the split's start, or 0 for all of them.

        max_windows windows of seq_len targets need one more token, the first window's context.
        """
        limits = [n for n in (self.max_tokens, self.max_windows * seq_len + 1 if self.max_windows else 0) if n]
        return min(limits, default=0)


def evaluate_perplexity(model: nn.Module, tokenizer, text: str, seq_len: int, max_windows: int,
                        batch_size: int) -> dict[str, Any]:
    """Loss, perplexity, bits per token and bits per character of the model on text."""
    windows = token_windows(encode(tokenizer, text), seq_len, max_windows)
    nll = token_nll(model, torch.from_numpy(windows), batch_size)                 # [n, seq_len - 1]
    characters = sum(len(tokenizer.decode(window[1:])) for window in windows)
    total_bits = float(nll.sum()) / math.log(2)
    return {"windows": int(windows.shape[0]), "tokens": int(nll.numel()), "characters": characters,
            "loss": float(nll.mean()), "perplexity": perplexity(nll),
            "bits_per_token": total_bits / nll.numel(), "bits_per_char": total_bits / characters,
            "loss_by_position": nll.mean(dim=0).tolist()}


def run(model: nn.Module, tokenizer, options: PPLOptions, out_dir: Path, seed: int,
        corpus: str | None = None) -> dict[str, Any]:
    """Score the held-out text; print a table, write results.json and the loss-by-position plot."""
    if tokenizer is None:
        raise EvalError("the ppl suite needs the model's tokenizer; load the model with load_checkpoint")
    start = time.perf_counter()
    text = corpus if corpus is not None else load_text(options.text, options.split, options.val_fraction)
    result = evaluate_perplexity(model, tokenizer, text, options.seq_len, options.max_windows, options.batch_size)

    print(f"perplexity of {model.config.layer_pattern} on {options.text} ({options.split} split)")
    print(format_table(["windows", "tokens", "loss", "ppl", "bits/token", "bits/char"],
                       [[result["windows"], result["tokens"], result["loss"], result["perplexity"],
                         result["bits_per_token"], result["bits_per_char"]]]))

    results = {"suite": "ppl", "seed": seed, "options": asdict(options), "model": describe_model(model),
               **result, "seconds": time.perf_counter() - start}
    out_dir = Path(out_dir)
    write_results(out_dir, results)

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(range(1, options.seq_len), result["loss_by_position"])
    ax.set_xlabel("position in window (tokens of context)")
    ax.set_ylabel("mean loss (nats)")
    ax.set_title(f"loss by position, {model.config.layer_pattern}")
    save_figure(fig, out_dir / "ppl_loss_by_position.png")
    return results
