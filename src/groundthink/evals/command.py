"""Command-line glue: `groundthink eval CHECKPOINT --suite NAME` and `groundthink train --task mqar`.

The eval command loads the checkpoint and calls `suite_runner(name)`; the suite prints its own
tables and writes results.json and plots into --out. Text suites read the --split part of
--data, or of the run's training text when --data is not given, split as the trainer splits it.

`train --task mqar` trains on generated MQAR batches with `train_mqar` (no data files), using
the [model] and [train] sections of the run config. It writes a run folder like a text run
(config.json, metrics.jsonl, checkpoints/, but no samples.txt) that `eval` loads and
`train --resume` continues. MQAR ids have no text, so its checkpoints' tokenizer contains only
the unknown id.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

from groundthink.atomic import atomic_write_text
from groundthink.config import ConfigError

from .common import EvalError

log = logging.getLogger(__name__)

TEXT_SUITES = ("niah", "honest", "ppl")


# ---------------------------------------------------------------------------- eval
def add_eval_suite_arguments(parser) -> None:
    """Options of `groundthink eval` used by the suites of groundthink.evals."""
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for results.json and PNG plots of the mqar, niah and honest suites "
                             "(default: RUN_FOLDER/eval-SUITE)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated examples (default 0)")
    parser.add_argument("--option", dest="suite_options", action="append", default=[], metavar="KEY=VALUE",
                        help="suite option, comma-separated for lists, e.g. --option num_pairs=8,16,32 "
                             "--option context_lengths=256,512 (repeatable; see groundthink.evals)")


def _run_text(args, extra: dict[str, Any]) -> tuple[str, str]:
    """(source name, text of the chosen split) from --data or from the run's training data source."""
    from groundthink.data import DataConfig, load_splits, read_text_source

    data = extra["run_config"].get("data")
    data_config = DataConfig(**data) if data else DataConfig()
    if args.data is not None:
        splits = read_text_source(args.data, data_config.val_fraction)
        source = str(args.data)
    elif data:
        splits = load_splits(data_config)
        source = data_config.path or "default corpus"
    else:
        raise ConfigError(f"{extra['path']} was not trained on text; pass --data PATH (a UTF-8 text file)")
    return source, {"val": splits.val, "train": splits.train, "all": splits.train + splits.val}[args.split]


def suite_runner(name: str) -> Callable[..., dict[str, Any]]:
    """Return the eval command's runner `(args, model, tokenizer, extra) -> summary` of suite `name`."""

    def run(args, model, tokenizer, extra: dict[str, Any]) -> dict[str, Any]:
        from . import run_suite

        folder = Path(extra["path"])
        run_dir = folder.parent.parent if folder.parent.name == "checkpoints" else folder
        out = args.out or run_dir / f"eval-{name}"
        options: dict[str, Any] = {}
        corpus = None
        if name in TEXT_SUITES:
            source, corpus = _run_text(args, extra)
            options.update(text=source, split=args.split)
        if name == "mqar" and "mqar" in extra["run_config"] and not any(
                o.startswith(("seq_lens=", "num_pairs=")) for o in args.suite_options):
            trained = extra["run_config"]["mqar"]["task"]
            options.update(seq_lens=(trained["seq_len"],), num_pairs=(trained["num_pairs"],))
        try:
            results = run_suite(name, model, tokenizer, out, seed=args.seed, overrides=args.suite_options,
                                corpus=corpus, **options)
        except EvalError as err:
            raise ConfigError(str(err)) from None
        return {"out": str(out), "seconds": results.get("seconds", 0.0)}

    return run


# ---------------------------------------------------------------------------- train --task mqar
def add_mqar_train_arguments(parser) -> None:
    """Options of `groundthink train` for training on generated MQAR data."""
    parser.add_argument("--task", choices=("text", "mqar"), default=None,
                        help="text (default; with --resume, the run's own task): train on --data; mqar: train "
                             "on generated multi-query associative recall (no data files; [model] and [train] "
                             "of the config apply, [data] is ignored; the run folder gets no samples.txt)")
    parser.add_argument("--mqar", dest="mqar_options", action="append", default=[], metavar="KEY=VALUE",
                        help="MQAR setting for --task mqar: vocab_size, seq_len, num_pairs, power_a, "
                             "random_non_queries, or mixture=T:N:WEIGHT[:START],... where START is the fraction "
                             "of updates before that task enters; 'curriculum' (default) for (T/8, N/8) and "
                             "(T/4, N/4) first, then (T/2, N/2) and (T, N); 'zoology' for Zoology's training set; "
                             "'none' for the target task only. Example: --mqar num_pairs=32 (repeatable)")


def parse_mixture(text: str, target):
    """[(task, weight, start)] from "T:N:WEIGHT[:START],...", "curriculum" (see curriculum_mixture),
    "zoology" (Zoology's training set) or "none" (the target task only).

    START is the fraction of the planned updates after which the task enters (default 0).
    """
    from .mqar import MQARTask
    from .training import ZOOLOGY_MIXTURE, curriculum_mixture

    if text == "none":
        return []
    if text == "curriculum":
        return curriculum_mixture(target)
    mixture = []
    for item in (ZOOLOGY_MIXTURE if text == "zoology" else text).split(","):
        parts = item.split(":")
        try:
            if len(parts) not in (3, 4):
                raise ValueError
            seq_len, num_pairs, weight = int(parts[0]), int(parts[1]), float(parts[2])
            start = float(parts[3]) if len(parts) == 4 else 0.0
        except ValueError:
            raise ConfigError(f"invalid mixture item {item!r}: use T:N:WEIGHT or T:N:WEIGHT:START, "
                              "e.g. 64:4:5 or 256:32:1:0.3") from None
        mixture.append((MQARTask(vocab_size=target.vocab_size, seq_len=seq_len, num_pairs=num_pairs), weight, start))
    return mixture


def mqar_task_from_options(items: list[str]):
    """(target task, training mixture) from `--mqar KEY=VALUE` items."""
    from .common import parse_options
    from .mqar import MQARTask

    values = dict(item.partition("=")[::2] for item in items)
    mixture_text = values.pop("mixture", "curriculum")
    try:
        task = parse_options(MQARTask, [f"{k}={v}" for k, v in values.items()])
        mixture = parse_mixture(mixture_text, task)
        for t, *_ in mixture:
            t.validate()
    except EvalError as err:
        raise ConfigError(str(err)) from None
    return task, mixture


def run_mqar_train_command(args, run) -> int:
    """Train the run config's model on MQAR in the run folder args.out, or continue it with args.resume.

    The folder contains config.json ([model], [train] and [mqar]: the target task and the mixture),
    metrics.jsonl (one record per evaluation: step, loss over the query positions since the
    previous record, eval_accuracy, elapsed_s) and checkpoints/ (every train.save_interval
    updates and at the end). There is no samples.txt: MQAR ids have no text.
    """
    import torch

    from groundthink.checkpoint import (WEIGHTS, CheckpointError, load_model_weights, load_trainer_state,
                                        read_run_config, resolve_checkpoint, save_checkpoint, verify_checkpoint)
    from groundthink.model import GroundThinkLM
    from groundthink.tokenizer import CharTokenizer
    from groundthink.train import RUN_CONFIG, truncate_metrics, write_metrics

    from .mqar import MQARTask, evaluate_mqar
    from .training import EVAL_STREAM, TaskTraining, train_mqar

    out = Path(args.out)
    checkpoint_dir = None
    if args.resume:
        if args.mqar_options:
            raise ConfigError(f"--resume continues with the MQAR settings in {out / RUN_CONFIG}; drop --mqar")
        saved = json.loads((out / RUN_CONFIG).read_text(encoding="utf-8"))["mqar"]
        task = MQARTask(**saved["task"])
        mixture = [(MQARTask(**t), float(w), float(s)) for t, w, s in saved["mixture"]]
        checkpoint_dir = resolve_checkpoint(out)
        verify_checkpoint(checkpoint_dir)
    else:
        task, mixture = mqar_task_from_options(args.mqar_options)
    cfg = run.train
    if cfg.grad_accum != 1:
        raise ConfigError(f"invalid train.grad_accum={cfg.grad_accum}: --task mqar updates on one batch at a time; "
                          "raise train.batch_size instead")
    settings = TaskTraining(max_steps=cfg.max_steps, batch_size=cfg.batch_size, lr=cfg.lr, min_lr=cfg.min_lr,
                            warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay, beta1=cfg.beta1,
                            beta2=cfg.beta2, grad_clip=cfg.grad_clip, time_budget_s=cfg.max_minutes * 60,
                            eval_every=cfg.eval_interval, seed=cfg.seed)
    try:
        settings.validate()
    except EvalError as err:
        raise ConfigError(str(err)) from None
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)

    config = dataclasses.replace(run.model, vocab_size=task.vocab_size)
    run_config = {"model": config.to_dict(), "train": dataclasses.asdict(cfg),
                  "mqar": {"task": dataclasses.asdict(task),
                           "mixture": [[dataclasses.asdict(t), w, s] for t, w, s in mixture]}}
    torch.manual_seed(cfg.seed)
    model = GroundThinkLM(config).to(device)
    resume_state = None
    if checkpoint_dir is not None:
        previous = read_run_config(checkpoint_dir)
        for section in ("model", "mqar"):
            if previous.get(section) != run_config[section]:
                raise CheckpointError(f"cannot resume from {checkpoint_dir}: its [{section}] config differs from "
                                      f"{out / RUN_CONFIG}; resume with the run's own config or start a new run "
                                      "with another --out")
        state = load_trainer_state(checkpoint_dir)
        if "mqar" not in state:
            raise CheckpointError(f"cannot resume from {checkpoint_dir}: it contains no MQAR training state (no "
                                  "optimizer or history); start a new run with another --out")
        load_model_weights(model, checkpoint_dir / WEIGHTS)
        resume_state = state["mqar"]
        log.info("resumed from %s at step %d", checkpoint_dir, resume_state["step"])
        if resume_state["step"] >= cfg.max_steps:
            log.warning("the checkpoint is at step %d, not below train.max_steps=%d: nothing to train; raise "
                        "it with --set train.max_steps=N", resume_state["step"], cfg.max_steps)
    log.info("MQAR task %s, mixture (T, N, weight, start) %s", dataclasses.asdict(task),
             [(t.seq_len, t.num_pairs, w, s) for t, w, s in mixture] or "none")
    log.info("model %s: %s parameters on %s", config.layer_pattern, f"{model.num_parameters():,}", device)

    # The folder is created only now, after the task, settings and checkpoint passed their checks.
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / RUN_CONFIG, json.dumps(run_config, indent=2) + "\n")
    if resume_state is not None:
        truncate_metrics(out, resume_state["step"])
    start = time.perf_counter()
    offset = float(resume_state["seconds"]) if resume_state else 0.0

    def on_eval(step: int, train_loss: float, accuracy: float) -> None:
        write_metrics(out, {"step": step, "loss": train_loss, "eval_accuracy": accuracy,
                            "elapsed_s": offset + time.perf_counter() - start})

    def on_checkpoint(state: dict[str, Any]) -> None:
        # MQAR ids have no text; the checkpoint format needs a tokenizer, so it stores one with only <unk>.
        trainer_state = {"mqar": state, "tokens": state["tokens_done"] * cfg.batch_size}
        folder = save_checkpoint(out, model=model, tokenizer=CharTokenizer([]), run_config=run_config,
                                 step=state["step"], trainer_state=trainer_state, keep=cfg.keep_checkpoints)
        log.info("checkpoint: %s", folder)

    history = train_mqar(model, task, settings, on_eval=on_eval, mixture=mixture, resume=resume_state,
                         on_checkpoint=on_checkpoint, checkpoint_every=cfg.save_interval)
    result = evaluate_mqar(model, task, settings.eval_examples, seed=[settings.seed, EVAL_STREAM],
                           window=config.window_size if "S" in config.layer_pattern else None)
    steps = history.steps[-1] if history.steps else 0
    print(f"done: {history.stop_reason}; MQAR accuracy {result['accuracy']:.4f} (chance {result['chance']:.4f}) "
          f"after {steps} updates, {(time.perf_counter() - start) / 60:.1f} min; run folder {out}")
    print(json.dumps({"accuracy": result["accuracy"], "by_distance": result["by_distance"]}))
    return 0
