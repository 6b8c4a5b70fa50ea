"""Evaluation suites: synthetic recall, needle in a haystack, tests a model cannot pass by
pattern matching, and perplexity.

Each suite is a module with an options dataclass and `run(model, tokenizer, options, out_dir,
seed)`, which prints a table, writes `out_dir/results.json` atomically and PNG plots, and
returns the results. The same seed gives the same examples and, on the same machine, the
same numbers.

    from groundthink.evals import run_suite
    run_suite("mqar", model, tokenizer=None, out_dir="out/mqar", seed=0, overrides=["num_pairs=8,16"])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch.nn as nn

from . import honest, mqar, niah, ppl
from .common import EvalError, parse_options

SUITES = {
    "mqar": (mqar.MQAROptions, mqar.run),
    "niah": (niah.NIAHOptions, niah.run),
    "honest": (honest.HonestOptions, honest.run),
    "ppl": (ppl.PPLOptions, ppl.run),
}
"""Suite name -> (options dataclass, run function)."""


TEXT_SUITES = ("niah", "honest", "ppl")


def run_suite(name: str, model: nn.Module, tokenizer, out_dir: str | Path, seed: int = 0,
              overrides: Sequence[str] = (), corpus: str | None = None, **options: Any) -> dict[str, Any]:
    """Run suite `name` on a model in eval mode; options come as keywords and `key=value` strings.

    `corpus` gives a text suite its text, already split. Without it, the suite reads the `split`
    part of the file named by the `text` option.
    """
    if name not in SUITES:
        raise EvalError(f"unknown suite {name!r}; choose one of {sorted(SUITES)}")
    if corpus is not None and name not in TEXT_SUITES:
        raise EvalError(f"suite {name!r} generates its own data and takes no corpus")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise EvalError(f"invalid seed={seed!r}: must be a non-negative integer")
    options_cls, run = SUITES[name]
    parsed = parse_options(options_cls, overrides, **options)
    was_training = model.training
    model.eval()
    try:
        if name in TEXT_SUITES:
            return run(model, tokenizer, parsed, Path(out_dir), seed, corpus=corpus)
        return run(model, tokenizer, parsed, Path(out_dir), seed)
    finally:
        model.train(was_training)


__all__ = ["EvalError", "SUITES", "run_suite"]
