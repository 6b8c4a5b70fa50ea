"""Sweeps: train every point of a grid of model configs with one budget and seed, evaluate it,
and plot recall against state size and loss against parameters.

A sweep lives in one output folder:

- `sweep.json`: the definition (grid, seeds, task, budget), which a rerun must match.
- `points/point-007.json`: one result file per finished point, written atomically.
- `points/point-007/`: the training run of a text-task point (checkpoints, metrics).
- `results.json`, `results.md`: the table of every finished point.
- `recall_vs_state.png`: MQAR accuracy against recurrent state floats per sequence.
- `loss_vs_params.png`: validation loss against parameters.

A point is done when its file exists, so an interrupted sweep resumes where it stopped and
points can be spread over machines (`--shard i/n` or `--only INDEX`): copy the point files into
one folder and run with `--report` to merge them.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import time
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from groundthink.atomic import atomic_write_text
from groundthink.config import ConfigError, GroundThinkConfig
from groundthink.plan import parameter_counts, recurrent_memory

log = logging.getLogger(__name__)

TASKS = ("mqar", "text")
SPEC_FILE = "sweep.json"
POINTS_DIR = "points"


# ---------------------------------------------------------------------------- the grid
def _model_fields() -> dict[str, Any]:
    return typing.get_type_hints(GroundThinkConfig)


def _parse_value(key: str, raw: str, expected: Any) -> Any:
    """Parse one grid value as a TOML literal (a bare word is a string) and check its type."""
    raw = raw.strip()
    if not raw:
        raise ConfigError(f"invalid grid value for {key}: empty value; separate values by single commas, "
                          f"e.g. {key}=1,2")
    try:
        value = tomllib.loads(f"value = {raw}")["value"]
    except tomllib.TOMLDecodeError:
        value = raw
    if expected is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif expected is bool:
        ok = isinstance(value, bool)
    else:
        ok = isinstance(value, expected)
    if not ok:
        raise ConfigError(f"invalid grid value {raw!r} for {key}: expected {expected.__name__}")
    return value


def parse_grid(items: list[str]) -> list[tuple[str, list[Any]]]:
    """Parse `KEY=V1,V2,...` items over model config fields into [(key, [values])], in order.

    Raises ConfigError for a missing '=', an unknown or repeated field, an empty, mistyped or
    repeated value.
    """
    fields = _model_fields()
    grid: list[tuple[str, list[Any]]] = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"invalid grid item {item!r}: use KEY=V1,V2,..., e.g. expand_v=1,2,4")
        key, raw_values = item.split("=", 1)
        key = key.strip().removeprefix("model.")
        if key not in fields:
            raise ConfigError(f"invalid grid item {item!r}: unknown model field {key!r}; valid fields are "
                              f"{sorted(fields)}")
        if any(key == seen for seen, _ in grid):
            raise ConfigError(f"invalid grid item {item!r}: {key} appears twice; list all its values in one item")
        values = [_parse_value(key, raw, fields[key]) for raw in raw_values.split(",")]
        if len(set(map(repr, values))) != len(values):
            raise ConfigError(f"invalid grid item {item!r}: repeated value")
        grid.append((key, values))
    if not grid:
        raise ConfigError("empty grid: pass at least one KEY=V1,V2 item, e.g. --grid expand_v=1,2,4")
    return grid


def parse_seeds(text: str) -> list[int]:
    """Parse comma-separated non-negative seeds, e.g. '0,1,2'."""
    try:
        seeds = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"invalid seeds {text!r}: use comma-separated integers, e.g. 0,1,2") from None
    if not seeds or any(seed < 0 for seed in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"invalid seeds {text!r}: give distinct non-negative integers, e.g. 0,1,2")
    return seeds


@dataclass
class Point:
    """One model config of the grid, trained with one seed."""

    index: int
    changes: dict[str, Any]
    seed: int
    config: dict[str, Any]

    @property
    def label(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.changes.items())

    @property
    def name(self) -> str:
        return f"point-{self.index:03d}"


def expand_grid(base: GroundThinkConfig, grid: list[tuple[str, list[Any]]], seeds: list[int]) -> list[Point]:
    """Build one validated point per combination of grid values (first key slowest) and seed."""
    keys = [key for key, _ in grid]
    points = []
    for index, (values, seed) in enumerate(itertools.product(itertools.product(*[v for _, v in grid]), seeds)):
        changes = dict(zip(keys, values))
        try:
            config = GroundThinkConfig.from_dict({**base.to_dict(), **changes})
        except ConfigError as err:
            raise ConfigError(f"grid point {index} ({', '.join(f'{k}={v}' for k, v in changes.items())}): {err}") \
                from None
        points.append(Point(index=index, changes=changes, seed=seed, config=config.to_dict()))
    return points


def select_points(points: list[Point], only: list[int] | None = None, shard: str | None = None) -> list[Point]:
    """Pick the points this process runs: the given indices, or every n-th from i for shard 'i/n'."""
    if only is not None and shard is not None:
        raise ConfigError("pass either --only or --shard, not both")
    if only is not None:
        known = {p.index for p in points}
        missing = sorted(set(only) - known)
        if missing:
            raise ConfigError(f"invalid --only {missing}: the grid has points 0 .. {len(points) - 1}")
        return [p for p in points if p.index in set(only)]
    if shard is not None:
        try:
            i, n = (int(part) for part in shard.split("/"))
        except ValueError:
            raise ConfigError(f"invalid --shard {shard!r}: use I/N with 0 <= I < N, e.g. 0/4") from None
        if not 0 <= i < n:
            raise ConfigError(f"invalid --shard {shard!r}: need 0 <= I < N")
        return [p for p in points if p.index % n == i]
    return points


# ---------------------------------------------------------------------------- the sweep
@dataclass
class SweepSpec:
    """Definition of a sweep (task, grid, seeds, budget), saved as sweep.json so that a rerun
    can check that it continues the same sweep."""

    task: str
    grid: list[tuple[str, list[Any]]]
    seeds: list[int]
    base_model: dict[str, Any]
    mqar: dict[str, Any] = field(default_factory=dict)
    """MQARTask fields (task mqar)."""
    training: dict[str, Any] = field(default_factory=dict)
    """TaskTraining fields (task mqar) or the [data] and [train] sections of the run (task text)."""
    probe_examples: int = 16
    """Sequences traced for the memory probes."""
    niah: list[str] | None = None
    """NIAH suite options (task text), or None to skip NIAH."""

    def validate(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"invalid task {self.task!r}: use one of {TASKS}")
        if self.task == "mqar" and any(key == "vocab_size" for key, _ in self.grid):
            raise ConfigError("invalid grid: vocab_size is set by the MQAR task; change it with --mqar vocab_size=N")
        if self.probe_examples < 1:
            raise ConfigError(f"invalid probe_examples={self.probe_examples!r}: must be at least 1")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["grid"] = [[key, list(values)] for key, values in self.grid]
        return data

    def points(self) -> list[Point]:
        return expand_grid(GroundThinkConfig.from_dict(self.base_model), self.grid, self.seeds)


def _json(value: Any) -> Any:
    """Make numpy scalars and arrays and non-finite floats JSON-safe (inf and NaN become None)."""
    if isinstance(value, dict):
        return {str(k): _json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json(v) for v in value]
    if hasattr(value, "tolist"):
        return _json(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(_json(data), indent=2) + "\n")


def check_out_dir(out_dir: Path, spec: SweepSpec) -> bool:
    """Return whether out_dir has a sweep.json; raise ConfigError if it describes a different sweep."""
    path = out_dir / SPEC_FILE
    if not path.exists():
        return False
    saved = json.loads(path.read_text(encoding="utf-8"))
    expected = _json(spec.to_dict())
    if saved != expected:
        differing = sorted(k for k in set(saved) | set(expected) if saved.get(k) != expected.get(k))
        raise ConfigError(f"{out_dir} contains a different sweep (differs in {differing}); rerun with the "
                          "same arguments to resume it, or choose another --out")
    return True


def prepare_out_dir(out_dir: Path, spec: SweepSpec) -> None:
    """Create the folder and sweep.json, or check that an existing sweep.json describes this sweep."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / POINTS_DIR).mkdir(exist_ok=True)
    if not check_out_dir(out_dir, spec):
        write_json(out_dir / SPEC_FILE, _json(spec.to_dict()))


def run_sweep(spec: SweepSpec, out_dir: str | Path, only: list[int] | None = None,
              shard: str | None = None) -> list[dict[str, Any]]:
    """Train and evaluate the selected points that have no result file yet, in order.

    Returns the records of the selected points (read back for points done earlier).
    """
    spec.validate()
    out_dir = Path(out_dir)
    points = spec.points()
    selected = select_points(points, only, shard)
    prepare_out_dir(out_dir, spec)
    records = []
    for n, point in enumerate(selected, 1):
        path = out_dir / POINTS_DIR / f"{point.name}.json"
        if path.exists():
            log.info("point %d (%s, seed %d): done earlier, skipped", point.index, point.label, point.seed)
            records.append(json.loads(path.read_text(encoding="utf-8")))
            continue
        log.info("point %d (%s, seed %d): training, %d of %d in this run", point.index, point.label, point.seed,
                 n, len(selected))
        start = time.perf_counter()
        if spec.task == "mqar":
            record = run_mqar_point(point, spec)
        else:
            record = run_text_point(point, spec, out_dir / POINTS_DIR / point.name)
        record["seconds"] = time.perf_counter() - start
        write_json(path, record)
        records.append(json.loads(path.read_text(encoding="utf-8")))
        log.info("point %d: %s", point.index, _summary(record))
    return records


def _summary(record: dict[str, Any]) -> str:
    parts = [f"{record['parameters']:,} parameters", f"{record['state_floats']:,} state floats"]
    if record.get("mqar_accuracy") is not None:
        parts.append(f"MQAR accuracy {record['mqar_accuracy']:.4f}")
    if record.get("val_loss") is not None:
        parts.append(f"val loss {record['val_loss']:.4f}")
    parts.append(f"{record['seconds']:.0f} s")
    return ", ".join(parts)


def _point_record(point: Point, config: GroundThinkConfig, counts: dict[str, int]) -> dict[str, Any]:
    memory = recurrent_memory(config)
    return {"index": point.index, "changes": point.changes, "label": point.label, "seed": point.seed,
            "config": config.to_dict(), "parameters": counts["total"],
            "non_embedding_parameters": counts["total"] - counts["embedding"] - counts["lm_head"],
            "state_floats": memory["state_floats"], "state_floats_per_layer": memory["state_floats_per_layer"]}


# ---------------------------------------------------------------------------- one point
def run_mqar_point(point: Point, spec: SweepSpec) -> dict[str, Any]:
    """Train the point's model on MQAR with the sweep's budget and evaluate it."""
    import torch

    from groundthink.evals.common import EvalError
    from groundthink.evals.mqar import MQARTask, evaluate_mqar, generate_mqar
    from groundthink.evals.training import EVAL_STREAM, TaskTraining, train_mqar
    from groundthink.model import GroundThinkLM

    task = MQARTask(**spec.mqar)
    settings = TaskTraining(**{**spec.training, "seed": point.seed})
    try:
        task.validate()
        settings.validate()
    except EvalError as err:
        raise ConfigError(str(err)) from None
    config = GroundThinkConfig.from_dict({**point.config, "vocab_size": task.vocab_size})
    torch.manual_seed(point.seed)
    model = GroundThinkLM(config)
    history = train_mqar(model, task, settings)

    # Accuracy and loss on the fixed evaluation set (query positions only).
    window = config.window_size if "S" in config.layer_pattern else None
    result = evaluate_mqar(model, task, settings.eval_examples, seed=[point.seed, EVAL_STREAM],
                           batch_size=settings.batch_size, window=window)
    batch = generate_mqar(task, settings.eval_examples, seed=[point.seed, EVAL_STREAM])
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, batch.inputs.shape[0], settings.batch_size):
            rows = slice(start, start + settings.batch_size)
            labels = batch.labels[rows]
            n = int((labels != -100).sum())
            total += float(model(batch.inputs[rows], labels=labels).loss) * n
            count += n

    record = _point_record(point, config, model.parameter_counts())
    record.update({"task": "mqar", "mqar_accuracy": result["accuracy"], "mqar_chance": result["chance"],
                   "mqar_by_distance": result["by_distance"], "val_loss": total / count,
                   "steps": history.steps[-1] if history.steps else 0, "stop_reason": history.stop_reason,
                   "history": history.to_dict()})
    record["probes"] = probe_memory(model, batch.inputs[:spec.probe_examples], train_context=task.seq_len)
    record["niah"] = {"skipped": "NIAH needs a model trained on text with a tokenizer; this point trained on MQAR"}
    return record


def run_text_point(point: Point, spec: SweepSpec, run_dir: Path) -> dict[str, Any]:
    """Train the point's model on text with `groundthink.train`, resuming its own run folder."""
    import numpy as np
    import torch

    from groundthink.checkpoint import load_checkpoint
    from groundthink.data import prepare_data
    from groundthink.train import RunConfig, train

    data = {"model": {**point.config}, **json.loads(json.dumps(spec.training))}
    data["train"] = {**data.get("train", {}), "seed": point.seed}
    run = RunConfig.from_dict(data, origin=f"sweep point {point.index}")
    resume = (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir())
    result = train(run, run_dir, resume=resume)
    model, tokenizer, config, _ = load_checkpoint(run_dir, device=torch.device("cpu"))

    record = _point_record(point, config, model.parameter_counts())
    record.update({"task": "text", "mqar_accuracy": None, "val_loss": result.val_loss,
                   "train_loss": result.train_loss, "steps": result.step, "tokens": result.tokens})
    prepared = prepare_data(run.data)
    T = run.data.seq_len
    n_windows = min(spec.probe_examples, max(len(prepared.val) // T, 1))
    windows = np.stack([np.asarray(prepared.val[i * T:(i + 1) * T], dtype=np.int64) for i in range(n_windows)])
    record["probes"] = probe_memory(model, windows, train_context=T)
    record["niah"] = run_niah(model, tokenizer, spec, run, run_dir / "niah", point.seed)
    return record


def probe_memory(model, ids, train_context: int) -> dict[str, Any]:
    """Measure, with groundthink.probes on `ids`, the mean slot-attention focus ratio of the SWA
    memory readers and the median memory half-life of the GDN heads.

    A probe that does not apply to the model or input returns a 'skipped' reason instead.
    """
    try:
        from groundthink.probes import (ProbeInputError, ProbeNotApplicable, forget_horizon, memory_readers,
                                        trace_model)
    except ImportError as err:
        return {"skipped": f"groundthink.probes is not importable ({err})"}
    import numpy as np

    try:
        trace = trace_model(model, ids)
    except (ProbeInputError, ProbeNotApplicable) as err:
        return {"skipped": str(err)}
    out: dict[str, Any] = {}
    try:
        readers = memory_readers([s.slot_weights for s in trace.swa], [s.gate for s in trace.swa],
                                 [s.layer for s in trace.swa], trace.memory_block)
        focus = np.concatenate([np.asarray(r["focus"]) for r in readers["per_layer"]])
        gate = np.concatenate([np.asarray(r["gate"]) for r in readers["per_layer"]])
        out.update(focus_ratio=float(focus.mean()), focus_ratio_min=float(focus.min()),
                   focus_ratio_per_head=focus, global_gate=float(gate.mean()))
    except ProbeNotApplicable as err:
        out["focus_ratio_skipped"] = str(err)
    if trace.gdn:
        window = trace.window if "S" in trace.layer_pattern else None
        horizon = forget_horizon([g.g for g in trace.gdn], [g.beta for g in trace.gdn],
                                 [g.layer for g in trace.gdn], window, train_context)
        medians = np.asarray(horizon["half_life"]["p50"]).ravel()
        out.update(half_life_median=float(np.median(medians)), half_life_per_head=medians,
                   horizon_flags=horizon["flags"])
    else:
        out["half_life_skipped"] = f"layer_pattern {trace.layer_pattern!r} has no G layer"
    return out


def run_niah(model, tokenizer, spec: SweepSpec, run, out_dir: Path, seed: int) -> dict[str, Any]:
    """Run the needle-in-a-haystack suite on a text-trained point when the sweep requests it."""
    if spec.niah is None:
        return {"skipped": "not requested (pass --niah to run it)"}
    try:
        from groundthink.evals import run_suite
    except ImportError as err:
        return {"skipped": f"groundthink.evals is not importable ({err})"}
    text = run.data.path
    if not text:
        return {"skipped": "NIAH needs a text file; the run trained on the default corpus without a path"}
    results = run_suite("niah", model, tokenizer, out_dir, seed=seed, overrides=[f"text={text}", *spec.niah])
    cells = results.get("cells", [])
    accuracies = [c["accuracy"] for c in cells if c.get("accuracy") is not None]
    return {"accuracy": sum(accuracies) / len(accuracies) if accuracies else None, "cells": cells}


# ---------------------------------------------------------------------------- the report
def collect_results(out_dir: str | Path) -> list[dict[str, Any]]:
    """Read every point file of a sweep folder, ordered by point index."""
    folder = Path(out_dir) / POINTS_DIR
    if not folder.is_dir():
        raise ConfigError(f"{out_dir} is not a sweep folder: {folder} not found; run `groundthink sweep --out "
                          f"{out_dir} --grid ...` first")
    records = [json.loads(path.read_text(encoding="utf-8")) for path in sorted(folder.glob("point-*.json"))]
    return sorted(records, key=lambda r: r["index"])


def _cell(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        text = f"{value:.{digits}f}"
        return f"{0.0:.{digits}f}" if float(text) == 0 else text
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def results_table(records: list[dict[str, Any]], keys: list[str] | None = None) -> str:
    """Markdown table of the finished points, one column per grid key (in `keys` order)."""
    if keys is None:
        keys = list(records[0]["changes"]) if records else []
    with_niah = any(r.get("niah", {}).get("accuracy") is not None for r in records)
    headers = ["point", *keys, "seed", "params", "state floats", "MQAR acc", "val loss",
               *(["NIAH acc"] if with_niah else []), "focus", "half-life", "steps", "seconds"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in records:
        probes = r.get("probes", {})
        niah = [r.get("niah", {}).get("accuracy")] if with_niah else []
        row = [r["index"], *[r["changes"].get(k) for k in keys], r["seed"], r["parameters"], r["state_floats"],
               r.get("mqar_accuracy"), r.get("val_loss"), *niah, probes.get("focus_ratio"),
               probes.get("half_life_median"), r.get("steps"), round(r.get("seconds", 0.0))]
        cells = [_cell(v, 1) if k == "half-life" else _cell(v) for k, v in zip(headers, row)]
        cells[1:1 + len(keys)] = [str(r["changes"].get(k)) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _series(records: list[dict[str, Any]], x_key: str, y_key: str) -> dict[str, list[tuple[float, float, str]]]:
    """Points grouped by layer_pattern (one line each) when it varies, else one group."""
    groups: dict[str, list[tuple[float, float, str]]] = {}
    for r in records:
        y = r.get(y_key)
        if y is None:
            continue
        pattern = r["config"]["layer_pattern"]
        label = ",".join(f"{k}={v}" for k, v in r["changes"].items() if k != "layer_pattern")
        groups.setdefault(pattern, []).append((float(r[x_key]), float(y), label))
    return groups


def plot_results(records: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Draw recall against state floats and loss against parameters; returns the PNGs written."""
    from groundthink.evals.common import pyplot, save_figure

    plt = pyplot()
    written = []
    for x_key, y_key, x_label, y_label, name in (
            ("state_floats", "mqar_accuracy", "recurrent state per sequence (floats, all GDN layers)",
             "MQAR accuracy", "recall_vs_state.png"),
            ("parameters", "val_loss", "parameters", "validation loss", "loss_vs_params.png")):
        groups = _series(records, x_key, y_key)
        if not groups:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for pattern, rows in sorted(groups.items()):
            rows.sort()
            ax.plot([x for x, _, _ in rows], [y for _, y, _ in rows], marker="o", linestyle="none", label=pattern)
            for x, y, label in rows:
                ax.annotate(label, (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6)
        ax.set_xscale("log", base=2)
        if y_key == "mqar_accuracy":
            ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.grid(True, alpha=0.3)
        ax.legend(title="layer_pattern", fontsize=8)
        written.append(save_figure(fig, out_dir / name))
    return written


def write_report(out_dir: str | Path) -> list[dict[str, Any]]:
    """Write results.json, results.md and the plots from every point file in the folder."""
    out_dir = Path(out_dir)
    records = collect_results(out_dir)
    spec_path = out_dir / SPEC_FILE
    spec = json.loads(spec_path.read_text(encoding="utf-8")) if spec_path.exists() else None
    expected = None
    if spec is not None:
        expected = math.prod(len(values) for _, values in spec["grid"]) * len(spec["seeds"])
    write_json(out_dir / "results.json", {"sweep": spec, "points": records})
    done = f"{len(records)} of {expected} points done" if expected else f"{len(records)} points"
    keys = [key for key, _ in spec["grid"]] if spec is not None else None
    atomic_write_text(out_dir / "results.md", f"# Sweep results\n\n{done}.\n\n{results_table(records, keys)}\n")
    if records:
        plot_results(records, out_dir)
    return records


# ---------------------------------------------------------------------------- command line
def add_sweep_arguments(parser) -> None:
    """Arguments of `groundthink sweep`."""
    parser.add_argument("--grid", nargs="+", default=None, metavar="KEY=V1,V2",
                        help="model config fields and their values, e.g. head_dim=32,64 expand_v=1,2,4 "
                             "layer_pattern=GSGS,GGSS; every combination is one point")

    parser.add_argument("--out", type=Path, required=True,
                        help="sweep folder: sweep.json, points/point-NNN.json, results.md, plots")
    parser.add_argument("--task", choices=TASKS, default="mqar",
                        help="mqar: train on generated multi-query associative recall; text: train on the "
                             "[data] source of --config with `groundthink train` (default mqar)")
    parser.add_argument("--config", default=None,
                        help="TOML run config: its [model] section is the base of the grid; for --task text "
                             "also its [data] and [train] sections")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one value of the run config, e.g. --set model.d_model=64 (repeatable)")

    parser.add_argument("--mqar", action="append", default=[], metavar="KEY=VALUE",
                        help="MQAR task field (vocab_size, seq_len, num_pairs, power_a, random_non_queries), "
                             "e.g. --mqar num_pairs=16 (repeatable)")
    parser.add_argument("--train", dest="task_training", action="append", default=[], metavar="KEY=VALUE",
                        help="MQAR training field (max_steps, batch_size, lr, min_lr, warmup_steps, time_budget_s, "
                             "eval_every, eval_examples, ...), e.g. --train max_steps=300 (repeatable); for "
                             "--task text use --set train.KEY=VALUE")

    parser.add_argument("--seeds", default="0", help="comma-separated seeds; every config trains once per seed "
                                                     "(default 0)")
    parser.add_argument("--probe-examples", type=int, default=16,
                        help="sequences traced for the focus-ratio and half-life probes (default 16)")
    parser.add_argument("--niah", nargs="*", default=None, metavar="KEY=VALUE",
                        help="run the needle-in-a-haystack suite on text points, with optional suite options "
                             "such as context_lengths=256,512")

    parser.add_argument("--only", default=None,
                        help="run only these point indices, comma-separated (see --list)")
    parser.add_argument("--shard", default=None, metavar="I/N",
                        help="run only points whose index is I modulo N, to spread a sweep over N machines")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (default 0 keeps torch's default); 1 avoids contention on a "
                             "machine shared with other jobs")
    parser.add_argument("--list", action="store_true", help="print the points and whether each is done, then exit")
    parser.add_argument("--report", action="store_true",
                        help="train nothing: merge the point files in --out into the table and plots")


def _spec_from_args(args) -> SweepSpec:
    from groundthink.evals.common import EvalError, parse_options
    from groundthink.evals.mqar import MQARTask
    from groundthink.evals.training import TaskTraining
    from groundthink.train import load_run_config

    if not args.grid:
        raise ConfigError("missing --grid: give KEY=V1,V2 items, e.g. --grid expand_v=1,2,4")
    run = load_run_config(args.config, args.overrides)
    mqar, training = {}, {}
    try:
        if args.task == "mqar":
            mqar = dataclasses.asdict(parse_options(MQARTask, args.mqar))
            training = dataclasses.asdict(parse_options(TaskTraining, args.task_training))
            training.pop("seed")
        elif args.mqar or args.task_training:
            raise ConfigError("--mqar and --train apply to --task mqar; for --task text set "
                              "[train] values with --set train.KEY=VALUE")
    except EvalError as err:
        raise ConfigError(str(err)) from None
    if args.task == "text":
        sections = run.to_dict()
        training = {"data": sections["data"], "train": {k: v for k, v in sections["train"].items() if k != "seed"}}
    if args.niah is not None and args.task != "text":
        raise ConfigError("--niah needs --task text: NIAH prompts are text, and MQAR models have no tokenizer")
    return SweepSpec(task=args.task, grid=parse_grid(args.grid), seeds=parse_seeds(args.seeds),
                     base_model=run.model.to_dict(), mqar=mqar, training=training,
                     probe_examples=args.probe_examples, niah=args.niah)


def run_sweep_command(args) -> int:
    """Run `groundthink sweep`."""
    if args.threads < 0:
        raise ConfigError(f"invalid --threads {args.threads}: use 0 (torch's default) or a positive count")
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    if args.report:
        write_report(args.out)
        print((args.out / "results.md").read_text(encoding="utf-8"))
        return 0
    spec = _spec_from_args(args)
    only = None
    if args.only is not None:
        try:
            only = [int(part) for part in args.only.split(",") if part.strip()]
        except ValueError:
            raise ConfigError(f"invalid --only {args.only!r}: use comma-separated point indices, e.g. 0,3") from None
    if args.list:
        # Point files of a different sweep belong to other configs, so they cannot mark this sweep's points done.
        spec.validate()
        check_out_dir(args.out, spec)
        for point in select_points(spec.points(), only, args.shard):
            done = (args.out / POINTS_DIR / f"{point.name}.json").exists()
            print(f"{point.index:4d}  {'done' if done else 'todo'}  seed {point.seed}  {point.label}")
        return 0
    run_sweep(spec, args.out, only=only, shard=args.shard)
    write_report(args.out)
    print((args.out / "results.md").read_text(encoding="utf-8"))
    print(f"\nresults: {args.out / 'results.md'}, plots: recall_vs_state.png, loss_vs_params.png in {args.out}")
    return 0
