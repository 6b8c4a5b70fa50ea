"""MQAR recall of GroundThink against a Transformer, a pure GDN and an SWA-only model.

Every pattern gets the same width, depth, heads, training mixture, optimizer, seed and time
budget, and runs one after another in this process (one thread by default, so other jobs on
a shared CPU keep a core). After training, each model is tested on fresh examples of the
target task, by query distance, over a sweep of pair counts, and with its memory ablated:

- zero_memory at the first query slot (position 2N) must drop a model that recalls through
  its GDN memory to chance;
- cut_global from position 0 shows whether a GS model's recall goes through the SWA layer's
  global pathway or through the GDN layer's own output.

    python benchmarks/bench_recall.py --patterns GS,SS,AA,GG --budget-min 12 --out runs/recall

Results go to OUT/results.json (rewritten atomically after every model), OUT/log.txt and
OUT/recall_*.png; OUT/<pattern>/model.safetensors and config.json hold the trained weights.

With --text-runs, the script instead runs the niah and honest suites on checkpoints trained on
text (for example by benchmarks/train_tinyshakespeare.sh with the four patterns) and writes
one summary table over them:

    python benchmarks/bench_recall.py --text-runs GSGS=runs/ts-GSGS,SSSS=runs/ts-SSSS \
        --text ../shared/data/tinyshakespeare.txt --out runs/recall-text
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import sys
import time
import tomllib
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from groundthink import GroundThinkConfig, GroundThinkLM
from groundthink.config import ConfigError
from groundthink.evals.ablation import ABLATIONS
from groundthink.evals.common import format_table, pyplot, save_figure, write_results
from groundthink.evals.mqar import (MQARTask, accuracy_by_distance, distance_edges, evaluate_mqar, generate_mqar,
                                    query_correct)
from groundthink.evals import command
from groundthink.evals.training import ZOOLOGY_MIXTURE, TaskTraining, train_mqar

log = logging.getLogger("bench_recall")

TEST_STREAM = 7
CURRICULUM = "32:4:3,64:8:2,128:16:1:0.25,256:32:2:0.25"
"""Default training mixture T:N:weight[:start]: short tasks from the first update, the 128- and
256-token tasks after a quarter of the updates."""


def parse_mixture(text: str, target: MQARTask) -> list[tuple[MQARTask, float, float]]:
    try:
        return command.parse_mixture(text, target)
    except ConfigError as err:
        raise SystemExit(f"invalid --mixture: {err}") from None


def build_model(pattern: str, args: argparse.Namespace) -> GroundThinkLM:
    torch.manual_seed(args.seed)
    config = GroundThinkConfig(vocab_size=args.vocab, d_model=args.d_model, n_heads=args.n_heads,
                               head_dim=args.head_dim, expand_v=args.expand_v, layer_pattern=pattern,
                               window_size=args.window, memory_block=args.memory_block, chunk_size=args.chunk,
                               dt_min=args.dt_min, dt_max=args.dt_max, decay_a_min=args.decay_a_min,
                               decay_a_max=args.decay_a_max, **args.model_options)
    return GroundThinkLM(config)


def parse_model_options(items: list[str]) -> dict:
    """KEY=VALUE items with TOML values (true, 2.5, "replace") into GroundThinkConfig keyword arguments."""
    fields = {f.name for f in dataclasses.fields(GroundThinkConfig)}
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise SystemExit(f"invalid --model-option {item!r}: use KEY=VALUE with KEY a GroundThinkConfig field")
        try:
            options[key] = tomllib.loads(f"value = {value}")["value"]
        except tomllib.TOMLDecodeError:
            raise SystemExit(f"invalid --model-option {item!r}: the value must be TOML, e.g. true, 2.5 or '\"replace\"'")
    return options


def ablated_accuracy(model: GroundThinkLM, task: MQARTask, examples: int, seed: int) -> dict:
    """Target-task accuracy under each ablation that the model supports."""
    batch = generate_mqar(task, examples, seed=[seed, TEST_STREAM, 1])
    positions = {"zero_memory": 2 * task.num_pairs, "cut_global": 0, "cut_gdn_output": 0}
    out = {}
    for name, (ablate, unsupported) in ABLATIONS.items():
        reason = unsupported(model)
        if reason is not None:
            out[name] = {"skipped": reason}
            continue
        with ablate(model, positions[name]):
            correct = query_correct(model, batch, batch_size=32)
        out[name] = {"position": positions[name], "accuracy": float(correct.float().mean())}
    out["intact"] = {"accuracy": float(query_correct(model, batch, batch_size=32).float().mean())}
    return out


def run_pattern(spec: str, args: argparse.Namespace, task: MQARTask, mixture, out_dir: Path,
                previous: dict | None = None) -> dict:
    """Train and test one model, or with `previous` (its earlier result) reload and retest it.

    `spec` is a layer pattern, optionally followed by +ABLATION terms (e.g. GS+cut_gdn_output)
    that stay active from position 0 on during training and testing.
    """
    pattern, *always = spec.split("+")
    unknown = sorted(set(always) - set(ABLATIONS))
    if unknown:
        raise SystemExit(f"invalid pattern {spec!r}: unknown ablation(s) {unknown}; use {sorted(ABLATIONS)}")
    model = build_model(pattern, args)
    if previous is not None:
        load_file_into(model, out_dir / spec / "model.safetensors")
    with ExitStack() as stack:
        for name in always:
            stack.enter_context(ABLATIONS[name][0](model, 0))
        if previous is None:
            result = train(model, spec, args, task, mixture, out_dir)
        else:
            result = {k: v for k, v in previous.items() if k in TRAINING_KEYS}
        result.update(test(model, args, task))
    return result


TRAINING_KEYS = ("pattern", "parameters", "parameter_counts", "train_seconds", "train_cpu_seconds", "updates",
                 "history", "machine")


def load_file_into(model: GroundThinkLM, path: Path) -> None:
    state = load_file(str(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not (k == "lm_head.weight" and model.config.tie_embeddings)]:
        raise SystemExit(f"{path} does not match the model: missing {missing}, unexpected {unexpected}")


def train(model: GroundThinkLM, spec: str, args: argparse.Namespace, task: MQARTask, mixture, out_dir: Path) -> dict:
    """Train on MQAR under the budget and save the weights; returns the training record."""
    counts = model.parameter_counts()
    log.info("=== %s: %d parameters (%s)", spec, counts["total"],
             ", ".join(f"{k} {v}" for k, v in counts.items() if v and k != "total"))
    settings = TaskTraining(max_steps=args.max_steps, batch_size=args.batch, lr=args.lr, min_lr=args.lr / 10,
                            warmup_steps=args.warmup, time_budget_s=args.budget_min * 60, budget_clock=args.budget_clock,
                            eval_every=args.eval_every, eval_examples=256, target_accuracy=args.target, seed=args.seed)
    start, cpu_start = time.perf_counter(), time.process_time()
    history = train_mqar(model, task, settings, mixture=mixture)
    train_seconds, train_cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    log.info("%s: %s after %d updates, %.1f min wall, %.1f CPU min", spec, history.stop_reason,
             history.steps[-1], train_seconds / 60, train_cpu_seconds / 60)

    pattern_dir = out_dir / spec
    pattern_dir.mkdir(parents=True, exist_ok=True)
    model.config.save(pattern_dir / "config.json")
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight" or
             not model.config.tie_embeddings}
    save_file(state, str(pattern_dir / "model.safetensors.tmp"))
    (pattern_dir / "model.safetensors.tmp").replace(pattern_dir / "model.safetensors")
    return {"pattern": spec, "parameters": counts["total"], "parameter_counts": counts,
            "train_seconds": train_seconds, "train_cpu_seconds": train_cpu_seconds, "updates": history.steps[-1],
            "history": history.to_dict()}


def test(model: GroundThinkLM, args: argparse.Namespace, task: MQARTask) -> dict:
    """Accuracy on fresh target-task examples, by distance, over a sweep of pair counts, and ablated."""
    batch = generate_mqar(task, args.test_examples, seed=[args.seed, TEST_STREAM])
    correct = query_correct(model, batch, batch_size=32)
    by_distance = accuracy_by_distance(correct, batch.distances, distance_edges(task.seq_len, args.window))
    # The receptive field of L window-only layers ends L * (W - 1) tokens back.
    reach = model.config.n_layers * (args.window - 1) + 1
    beyond = batch.distances >= reach
    sweep = []
    for n in args.sweep_pairs:
        cell = MQARTask(vocab_size=args.vocab, seq_len=task.seq_len, num_pairs=n)
        sweep.append({"num_pairs": n, "accuracy": evaluate_mqar(model, cell, args.test_examples // 2,
                                                                seed=[args.seed, TEST_STREAM, n])["accuracy"]})
    return {"accuracy": float(correct.float().mean()), "chance": task.chance, "by_distance": by_distance,
            "window_only_reach": reach, "queries_beyond_reach": int(beyond.sum()),
            "accuracy_beyond_reach": float(correct[beyond].float().mean()) if beyond.any() else float("nan"),
            "sweep": sweep, "ablations": ablated_accuracy(model, task, args.test_examples // 2, args.seed)}


def plot(results: list[dict], task: MQARTask, out_dir: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for r in results:
        bins = [b for b in r["by_distance"] if b["queries"]]
        ax.plot([(b["min_distance"] + b["max_distance"]) / 2 for b in bins], [b["accuracy"] for b in bins],
                marker="o", label=r["pattern"])
    ax.axhline(task.chance, color="gray", linestyle="--", label="chance")
    ax.set_xlabel("tokens from the value to its query")
    ax.set_ylabel("query accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"MQAR T={task.seq_len}, {task.num_pairs} pairs, V={task.vocab_size}")
    ax.legend()
    save_figure(fig, out_dir / "recall_by_distance.png")

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for r in results:
        ax.plot([s["num_pairs"] for s in r["sweep"]], [s["accuracy"] for s in r["sweep"]], marker="o",
                label=r["pattern"])
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"key-value pairs (T={task.seq_len})")
    ax.set_ylabel("query accuracy")
    ax.set_ylim(0, 1.02)
    ax.legend()
    save_figure(fig, out_dir / "recall_by_pairs.png")

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for r in results:
        h = r["history"]
        ax.plot([s / 60 for s in h["seconds"]], h["eval_accuracy"], label=r["pattern"])
    ax.set_xlabel("training minutes")
    ax.set_ylabel("eval accuracy (target task)")
    ax.set_ylim(0, 1.02)
    ax.legend()
    save_figure(fig, out_dir / "recall_training.png")


def summary_table(results: list[dict]) -> str:
    rows = []
    for r in results:
        ab = r["ablations"]
        def show(name):
            return "skip" if "skipped" in ab[name] else f"{ab[name]['accuracy']:.3f}"
        rows.append([r["pattern"], r["parameters"], r["updates"], f"{r['train_cpu_seconds'] / 60:.1f}", r["accuracy"],
                     r["accuracy_beyond_reach"], r["chance"], show("zero_memory"), show("cut_global"),
                     show("cut_gdn_output") if "cut_gdn_output" in ab else "n/a"])
    return format_table(["model", "params", "updates", "CPU min", "accuracy", "beyond window reach", "chance",
                         "zero_memory", "cut_global", "cut_gdn_output"], rows)


def run_text_comparison(args: argparse.Namespace) -> None:
    """Run niah and honest on each text-trained checkpoint of --text-runs, then log one summary table."""
    from groundthink.checkpoint import load_checkpoint
    from groundthink.evals import run_suite

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        handlers=[logging.StreamHandler(sys.stdout), logging.FileHandler(out_dir / "log.txt")])
    torch.set_num_threads(args.threads)
    machine = f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}"
    log.info("command: %s", " ".join(sys.argv))
    rows, summary = [], {}
    for item in args.text_runs.split(","):
        name, _, run = item.partition("=")
        model, tokenizer, _, extra = load_checkpoint(run)
        log.info("=== %s: %s, step %d", name, extra["path"], extra["step"])
        niah = run_suite("niah", model, tokenizer, out_dir / name / "niah", seed=args.seed, text=args.text,
                         overrides=args.niah_option)
        honest = run_suite("honest", model, tokenizer, out_dir / name / "honest", seed=args.seed, text=args.text,
                           overrides=args.honest_option)
        summary[name] = {"checkpoint": str(extra["path"]), "step": extra["step"], "niah": niah, "honest": honest}
        rows.append(text_row(name, niah, honest))
        write_results(out_dir, {"command": " ".join(sys.argv), "machine": machine, "models": summary})
    table = format_table(["model", "niah single", "niah multi", "niah distractor", "ppl after p", "zero_memory",
                          "cut_global", "ppl all", "ppl copy far", "entities", "zero-shot AR"], rows)
    log.info("\n%s\nniah cells: exact-match accuracy / forced-choice accuracy (chance 1 / (foils + 1)); "
             "entities: count: exact match / forced choice, longest distractor", table)


def text_row(name: str, niah: dict, honest: dict) -> list:
    """Build one summary row: mean NIAH exact-match and forced-choice accuracy per variant, then the
    honest suite's headline numbers."""
    def niah_mean(variant: str) -> str:
        cells = [c for c in niah["cells"] if c["variant"] == variant]
        if not cells:
            return "-"
        exact = sum(c["accuracy"] for c in cells) / len(cells)
        choice = sum(c["choice_accuracy"] for c in cells) / len(cells)
        return f"{exact:.2f} / {choice:.2f}"

    ablation = honest.get("state_ablation", {})

    def ablated(kind: str):
        item = ablation.get(kind, {})
        return "skip" if "skipped" in item or not item else f"{item['ppl_ablated_after']:.3f}"

    intact = next((ablation[k]["ppl_intact_after"] for k in ("zero_memory", "cut_global")
                   if k in ablation and "skipped" not in ablation[k]), float("nan"))
    entities = " ".join(f"{c['entities']}: {c['accuracy']:.2f}/{c['choice_accuracy']:.2f}"
                        for c in honest.get("entities", {}).get("cells", [])
                        if c["distractor_tokens"] == max(x["distractor_tokens"] for x in honest["entities"]["cells"]))
    recall = " ".join(f"{c['num_pairs']}:{c['accuracy']:.2f}" for c in honest.get("zero_shot_ar", {}).get("cells", []))
    copy = honest.get("copy", {})
    return [name, niah_mean("single"), niah_mean("multi"), niah_mean("distractor"), intact, ablated("zero_memory"),
            ablated("cut_global"), copy.get("ppl_all", float("nan")), copy.get("ppl_copy_far", float("nan")),
            entities, recall]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text-runs", default=None, metavar="NAME=RUN,...",
                        help="instead of MQAR training, run niah and honest on these text-trained run folders")
    parser.add_argument("--text", default=None, help="UTF-8 text file of the niah and honest suites (--text-runs)")
    parser.add_argument("--niah-option", action="append", default=[], metavar="KEY=VALUE",
                        help="niah suite option for --text-runs (repeatable)")
    parser.add_argument("--honest-option", action="append", default=[], metavar="KEY=VALUE",
                        help="honest suite option for --text-runs (repeatable)")
    parser.add_argument("--patterns", default="GS,SS,AA,GG",
                        help="comma-separated layer patterns; PATTERN+ABLATION keeps that ablation on from position 0 "
                             "during training and testing, e.g. GS+cut_gdn_output (the memory is read only by the S layer)")
    parser.add_argument("--out", default="runs/recall", help="output folder")
    parser.add_argument("--seq-len", type=int, default=256, help="T of the target task, tokens")
    parser.add_argument("--pairs", type=int, default=32, help="key-value pairs N of the target task")
    parser.add_argument("--vocab", type=int, default=256, help="vocabulary size V (Zoology uses 8192)")
    parser.add_argument("--mixture", default=CURRICULUM,
                        help=f"training tasks T:N:weight[:start],... where start is the fraction of updates before "
                             f"the task enters; zoology ({ZOOLOGY_MIXTURE}) or none (target task only); "
                             f"default {CURRICULUM}")
    parser.add_argument("--model-option", action="append", default=[], metavar="KEY=VALUE",
                        help="any other GroundThinkConfig field, with a TOML value (repeatable), e.g. slot_norm=true")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--n-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64, help="GDN key dim K (memory slots per head)")
    parser.add_argument("--expand-v", type=float, default=1.0, help="GDN value dim as a multiple of K")
    parser.add_argument("--dt-min", type=float, default=0.001, help="GDN decay init: lower end of softplus(dt_bias)")
    parser.add_argument("--dt-max", type=float, default=0.01, help="GDN decay init: upper end of softplus(dt_bias)")
    parser.add_argument("--decay-a-min", type=float, default=1.0, help="GDN decay init: lower end of A")
    parser.add_argument("--decay-a-max", type=float, default=4.0,
                        help="GDN decay init: upper end of A; with the dt range, initial half-lives of "
                             "ln 2 / (A dt) = 17 to 693 tokens")
    parser.add_argument("--window", type=int, default=32, help="SWA window W, tokens")
    parser.add_argument("--memory-block", type=int, default=32, help="memory block M, tokens")
    parser.add_argument("--chunk", type=int, default=32, help="kernel chunk C, tokens")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (cosine to lr/10)")
    parser.add_argument("--warmup", type=int, default=50, help="warm-up updates")
    parser.add_argument("--batch", type=int, default=32, help="examples per update")
    parser.add_argument("--max-steps", type=int, default=20000, help="upper bound on updates")
    parser.add_argument("--budget-min", type=float, default=12.0, help="training time budget per model, minutes")
    parser.add_argument("--budget-clock", choices=("cpu", "wall"), default="cpu",
                        help="clock of the budget: cpu (CPU time of this process; fair on a shared machine) or wall")
    parser.add_argument("--eval-every", type=int, default=100, help="updates between evaluations")
    parser.add_argument("--target", type=float, default=0.99, help="stop training at this eval accuracy")
    parser.add_argument("--test-examples", type=int, default=1000, help="test examples of the target task")
    parser.add_argument("--sweep-pairs", default="4,8,16,32,64", help="pair counts of the test sweep at T")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--retest", action="store_true",
                        help="reload the saved weights of patterns already in OUT/results.json and test them again")
    args = parser.parse_args()
    if args.text_runs:
        if not args.text:
            raise SystemExit("--text-runs needs --text PATH, the text of the niah and honest suites")
        run_text_comparison(args)
        return
    args.sweep_pairs = [int(n) for n in args.sweep_pairs.split(",")]
    args.model_options = parse_model_options(args.model_option)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        handlers=[logging.StreamHandler(sys.stdout), logging.FileHandler(out_dir / "log.txt")])
    torch.set_num_threads(args.threads)
    task = MQARTask(vocab_size=args.vocab, seq_len=args.seq_len, num_pairs=args.pairs)
    mixture = parse_mixture(args.mixture, task)
    machine = f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}"
    log.info("command: %s", " ".join(sys.argv))
    log.info("machine: %s", machine)

    # Models already in OUT/results.json with the same settings are kept, so an interrupted
    # comparison continues and patterns can be added later.
    settings = {k: v for k, v in vars(args).items() if k not in (
        "patterns", "out", "threads", "retest", "text_runs", "text", "niah_option", "honest_option", "model_option")}
    if not settings["model_options"]:
        del settings["model_options"]     # keeps results written before the option existed comparable
    results, commands = load_previous(out_dir / "results.json", settings)
    commands.append(" ".join(sys.argv))
    for pattern in args.patterns.split(","):
        previous = next((r for r in results if r["pattern"] == pattern), None)
        if previous is not None and not args.retest:
            log.info("%s: already in %s, skipped (pass --retest to test it again)", pattern, out_dir / "results.json")
            continue
        result = run_pattern(pattern, args, task, mixture, out_dir, previous)
        result.setdefault("machine", machine)
        results = [r for r in results if r["pattern"] != pattern] + [result]
        write_results(out_dir, {"commands": commands, "settings": settings, "task": asdict(task),
                                "models": results})
        log.info("\n%s", summary_table(results))
    plot(results, task, out_dir)
    print(summary_table(results))
    print(json.dumps({r["pattern"]: r["accuracy"] for r in results}))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_previous(path: Path, settings: dict) -> tuple[list[dict], list[str]]:
    """Models and commands of an earlier run into the same folder; exit if its settings differ."""
    if not path.exists():
        return [], []
    saved = json.loads(path.read_text(encoding="utf-8"))
    differ = sorted(k for k in set(settings) | set(saved.get("settings", {}))
                    if settings.get(k) != saved.get("settings", {}).get(k))
    if differ:
        raise SystemExit(f"{path} holds a comparison with other settings ({', '.join(differ)}); "
                         "pass another --out or the same settings")
    return saved["models"], saved.get("commands", [])


if __name__ == "__main__":
    main()
