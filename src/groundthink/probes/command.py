"""`groundthink probe CHECKPOINT --text FILE --out DIR`: run every probe and write the report."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from .suite import Needle, ProbeSettings, format_summary, run_probes
from .trace import ProbeInputError

DEFAULT_QUERY = "The secret word is"
DEFAULT_ANSWER = " plum."


def add_probe_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the probe command's arguments on `parser`."""
    parser.add_argument("checkpoint", type=Path,
                        help="run folder (its latest checkpoint is used) or a checkpoints/step-N folder")
    parser.add_argument("--text", type=Path, required=True,
                        help="UTF-8 text file to run the probes on; it must be longer than one memory block")
    parser.add_argument("--out", type=Path, required=True,
                        help="folder for report.html, probes.json and the PNG figures (created if missing)")
    parser.add_argument("--max-tokens", type=int, default=4000,
                        help="use the first N tokens of the text (0 = all; default 4000)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="cut the text into rows of this many tokens (default: the whole text as one row)")
    parser.add_argument("--train-context", type=int, default=None,
                        help="training sequence length in tokens, for the saturated-head check "
                             "(default: the checkpoint's data.seq_len)")
    parser.add_argument("--needle-query", default=DEFAULT_QUERY,
                        help=f"needle query text; the needle is query + answer (default {DEFAULT_QUERY!r})")
    parser.add_argument("--needle-answer", default=DEFAULT_ANSWER,
                        help=f"needle answer text (default {DEFAULT_ANSWER!r})")
    parser.add_argument("--needle-distance", type=int, default=None,
                        help="text tokens between the needle and the query (default: 4 x window_size)")
    parser.add_argument("--no-needle", action="store_true", help="skip the needle probe")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--num-threads", type=int, default=1,
                        help="CPU threads of PyTorch (default 1; 0 keeps PyTorch's default). On a CPU shared with "
                             "other jobs, more threads than free cores make the probes many times slower")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random keys of the needle probe")


def encode_needle_part(tokenizer, text: str, name: str) -> np.ndarray:
    """Encode a needle part, rejecting empty text and characters a char tokenizer does not know."""
    ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
    if len(ids) == 0:
        raise ProbeInputError(f"--needle-{name} is empty; pass some text or use --no-needle")
    if getattr(tokenizer, "kind", None) == "char" and np.any(ids == tokenizer.unk_id):
        unknown = sorted({ch for ch, i in zip(text, ids) if i == tokenizer.unk_id})
        raise ProbeInputError(f"--needle-{name} {text!r} contains characters the tokenizer never saw: {unknown}; "
                              "use characters of the training text")
    return ids


def run_probe_command(args: argparse.Namespace) -> int:
    """Load the checkpoint, run the probes on the text, write the report and print the summary."""
    import torch

    if not args.text.is_file():
        raise ProbeInputError(f"text file not found: {args.text}; pass --text a UTF-8 text file")
    if args.max_tokens < 0:
        raise ProbeInputError(f"invalid --max-tokens {args.max_tokens}: pass 0 (all tokens) or a positive count")
    if args.train_context is not None and args.train_context < 1:
        raise ProbeInputError(f"invalid --train-context {args.train_context}: pass the training sequence length "
                              "in tokens (at least 1)")
    if args.num_threads < 0:
        raise ProbeInputError(f"invalid --num-threads {args.num_threads}: pass 0 (PyTorch's default) or a "
                              "positive count")

    # The thread count is process-wide, so it goes back to its old value for callers in the same process.
    previous_threads = torch.get_num_threads()
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    try:
        return probe_and_report(args)
    finally:
        torch.set_num_threads(previous_threads)


def probe_and_report(args: argparse.Namespace) -> int:
    import torch

    from ..checkpoint import load_checkpoint
    from ..data import read_text_file
    from .report import write_report

    start = time.perf_counter()
    model, tokenizer, config, extra = load_checkpoint(args.checkpoint, device=torch.device(args.device))
    ids = np.asarray(tokenizer.encode(read_text_file(args.text)), dtype=np.int64)
    if args.max_tokens > 0:
        ids = ids[: args.max_tokens]
    train_context = args.train_context or extra["run_config"].get("data", {}).get("seq_len")
    needle = None
    if not args.no_needle:
        needle = Needle(encode_needle_part(tokenizer, args.needle_query, "query"),
                        encode_needle_part(tokenizer, args.needle_answer, "answer"),
                        args.needle_query, args.needle_answer)
    settings = ProbeSettings(needle_distance=args.needle_distance, seed=args.seed)

    results = run_probes(model, ids, seq_len=args.seq_len, train_context=train_context, needle=needle,
                         settings=settings, decode=tokenizer.decode)
    results["meta"]["checkpoint"] = str(extra["path"])
    results["meta"]["step"] = extra["step"]
    results["meta"]["text"] = str(args.text)
    results["meta"]["num_threads"] = torch.get_num_threads()
    probe_seconds = time.perf_counter() - start
    paths = write_report(results, args.out)
    total = time.perf_counter() - start

    print(f"checkpoint {extra['path']} (step {extra['step']}), text {args.text}")
    print(format_summary(results))
    print(f"wrote {paths['html']}, {paths['json'].name} and {len(paths) - 2} figures in {total:.1f} s "
          f"(load and probes {probe_seconds:.1f} s, report {total - probe_seconds:.1f} s)")
    return 0
