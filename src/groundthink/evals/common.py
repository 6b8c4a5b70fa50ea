"""Helpers every evaluation suite shares: options, model calls, tables, results and plots."""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from groundthink.atomic import atomic_write, atomic_write_text


class EvalError(ValueError):
    """An invalid evaluation option or input; the message names the value and the fix."""


# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------

def _convert(name: str, text: str, annotation: Any) -> Any:
    """Convert the command-line text of option `name` to its annotated type."""
    origin = typing.get_origin(annotation)
    if origin in (list, tuple):
        (item_type,) = set(typing.get_args(annotation)) - {Ellipsis}
        items = [part.strip() for part in text.split(",") if part.strip()]
        return tuple(_convert(name, item, item_type) for item in items)
    if annotation is bool:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise EvalError(f"invalid {name}={text!r}: expected true or false")
    if annotation in (int, float):
        try:
            return annotation(text)
        except ValueError:
            raise EvalError(f"invalid {name}={text!r}: expected {annotation.__name__}") from None
    return text


def parse_options(options_cls: type, overrides: Sequence[str] = (), **values: Any):
    """Build an options dataclass from keyword values and `key=value` strings.

    List-valued fields take comma-separated values (`num_pairs=8,16,32`). Unknown keys raise
    EvalError listing the valid ones.
    """
    fields = {f.name: f for f in dataclasses.fields(options_cls)}
    hints = typing.get_type_hints(options_cls)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep:
            raise EvalError(f"invalid suite option {item!r}: use key=value, e.g. num_pairs=8,16")
        if key not in fields:
            raise EvalError(f"unknown option {key!r} for {options_cls.__name__}; valid options are {sorted(fields)}")
        values[key] = _convert(key, text, hints[key])
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise EvalError(f"unknown option(s) {unknown} for {options_cls.__name__}; valid options are {sorted(fields)}")
    options = options_cls(**values)
    options.validate()
    return options


def merge_flag_options(options_cls: type, suite: str, flags: dict[str, tuple[str, Any]],
                       items: Sequence[str]) -> list[str]:
    """Return `key=value` items for the command-line flags that were given, followed by `items`.

    `flags` maps an option name to (flag, value), with value None for a flag not given. A given
    flag whose option `options_cls` lacks, or whose option `items` also sets, raises EvalError.
    """
    fields = sorted(f.name for f in dataclasses.fields(options_cls))
    keys_in_items = {item.partition("=")[0].strip() for item in items}
    merged = []
    for key, (flag, value) in flags.items():
        if value is None:
            continue
        if key not in fields:
            raise EvalError(f"{flag} does not apply to the {suite} suite, which has no {key} option; drop it "
                            f"or pass one of the suite's options with --option KEY=VALUE: {fields}")
        if key in keys_in_items:
            raise EvalError(f"{flag} {value} and --option {key}=... both set {key}; give only one of them")
        merged.append(f"{key}={value}")
    return merged + list(items)


def check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise EvalError(f"invalid {name}={value!r}: must be a positive integer")


def check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise EvalError(f"invalid {name}={value!r}: must lie in [0, 1] (0 = start of the context, 1 = end)")


def check_nonempty(name: str, values: Sequence) -> None:
    if len(values) == 0:
        raise EvalError(f"invalid {name}=(): give at least one value")


# ---------------------------------------------------------------------------------------------
# Model calls
# ---------------------------------------------------------------------------------------------

def model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def model_logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits [B, T, vocab] of a GroundThinkLM (its LMOutput) or of any module returning logits."""
    out = model(input_ids.to(model_device(model)))
    return out.logits if hasattr(out, "logits") else out


@torch.no_grad()
def batched_logits(model: nn.Module, input_ids: torch.Tensor, batch_size: int,
                   reduce: Callable[[torch.Tensor, slice], torch.Tensor]) -> torch.Tensor:
    """Run the model over input_ids [E, T] in batches; `reduce(logits, rows)` maps each batch's
    logits [b, T, vocab] to a smaller tensor so the logits of all E rows never coexist."""
    parts = []
    for start in range(0, input_ids.shape[0], batch_size):
        rows = slice(start, start + batch_size)
        parts.append(reduce(model_logits(model, input_ids[rows]).float(), rows).cpu())
    return torch.cat(parts, dim=0)


def layer_pattern(model: nn.Module) -> str:
    """The model's layer pattern, or '?' for a module without a GroundThink config."""
    config = getattr(model, "config", None)
    return getattr(config, "layer_pattern", "?")


def describe_model(model: nn.Module) -> dict[str, Any]:
    """The facts about a model that every results.json records."""
    config = getattr(model, "config", None)
    info: dict[str, Any] = {"layer_pattern": layer_pattern(model),
                            "parameters": sum(p.numel() for p in model.parameters())}
    if config is not None and hasattr(config, "to_dict"):
        info["config"] = config.to_dict()
    return info


# ---------------------------------------------------------------------------------------------
# Tables, results and plots
# ---------------------------------------------------------------------------------------------

def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A fixed-width text table; floats print with 3 decimals."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "nan" if math.isnan(value) else f"{value:.3f}"
        return str(value)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to results.json")


def write_results(out_dir: Path, results: dict[str, Any]) -> Path:
    """Write results as `out_dir/results.json` atomically; returns the path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.json"
    atomic_write_text(path, json.dumps(results, indent=2, sort_keys=True, default=_json_default) + "\n")
    return path


def save_figure(fig, path: Path) -> Path:
    """Save a matplotlib figure as PNG atomically, then close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)
    return path


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def heatmap(values: np.ndarray, row_labels: Sequence[Any], col_labels: Sequence[Any], title: str,
            xlabel: str, ylabel: str, path: Path, vmin: float = 0.0, vmax: float = 1.0) -> Path:
    """Draw values [rows, cols] as an annotated heat map and save it as PNG."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(col_labels), 1.0 + 0.6 * len(row_labels)))
    image = ax.imshow(values, vmin=vmin, vmax=vmax, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(col_labels)), [str(c) for c in col_labels])
    ax.set_yticks(range(len(row_labels)), [str(r) for r in row_labels])
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            if not math.isnan(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.colorbar(image, ax=ax)
    return save_figure(fig, path)
