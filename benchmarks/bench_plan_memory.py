"""Planner estimate of training-step memory against measurements on CPU.

For each config, in a fresh subprocess:
  - peak: torch.profiler's allocation events (profile_memory=True) over one training step
    (forward, backward, gradient clipping, AdamW step) after a warm-up step, plus the weights
    and AdamW state held at the step's start; with and without activation checkpointing;
  - saved: bytes of the tensors autograd keeps for backward after the forward pass
    (saved_tensors_hooks, one count per storage), in float32 and under bf16 autocast;
and the planner's estimates of the same quantities, computed from the config alone.

    python benchmarks/bench_plan_memory.py [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys

import torch

from groundthink import GroundThinkConfig, GroundThinkLM
from groundthink.plan import (Budget, format_bytes, measure_saved_tensor_bytes, measure_training_step_peak,
                              training_memory)

CASES = [
    {"name": "GSGS d128 K32 V64, B4 T512", "batch": 4, "seq_len": 512, "config": {}},
    {"name": "GGSS d256 K64 V64 vocab4096, B2 T256", "batch": 2, "seq_len": 256,
     "config": {"d_model": 256, "n_heads": 4, "head_dim": 64, "expand_v": 1.0, "layer_pattern": "GGSS",
                "vocab_size": 4096}},
    {"name": "AAAA d256 vocab4096, B4 T256", "batch": 4, "seq_len": 256,
     "config": {"d_model": 256, "n_heads": 4, "layer_pattern": "AAAA", "vocab_size": 4096}},
]


def measure_case(case: dict) -> dict:
    """Measure one case in this process and return the estimates next to the measurements."""
    config = GroundThinkConfig(**case["config"])
    B, T = case["batch"], case["seq_len"]
    estimate = training_memory(config, Budget(batch=B, seq_len=T, dtype="fp32", device="cpu"))

    torch.manual_seed(0)
    model = GroundThinkLM(config)
    ids = torch.randint(0, config.vocab_size, (B, T + 1))
    saved = measure_saved_tensor_bytes(model, ids[:, :-1], ids[:, 1:])["total"]
    saved_autocast = measure_saved_tensor_bytes(model, ids[:, :-1], ids[:, 1:], autocast_dtype=torch.bfloat16)["total"]
    del model

    peak = measure_training_step_peak(config, B, T)["peak"]
    peak_checkpointed = measure_training_step_peak(config, B, T, activation_checkpointing=True)["peak"]
    return {"name": case["name"], "parameters": estimate["weights"] // 4,
            "saved": saved, "saved_estimate": estimate["activations"], "saved_bf16_autocast": saved_autocast,
            "peak": peak, "peak_estimate": estimate["peak"],
            "peak_checkpointed": peak_checkpointed, "peak_checkpointed_estimate": estimate["peak_checkpointed"]}


def markdown(results: list[dict]) -> str:
    def error(estimate: int, measured: int) -> str:
        return f"{100 * (estimate / measured - 1):+.1f}%"

    lines = ["| config | params | saved (measured / estimate / error) | bf16 autocast saved | "
             "step peak (measured / estimate / error) | with checkpointing (measured / estimate / error) |",
             "| --- | ---: | --- | ---: | --- | --- |"]
    for r in results:
        lines.append(
            f"| {r['name']} | {r['parameters'] / 1e6:.2f}M "
            f"| {format_bytes(r['saved'])} / {format_bytes(r['saved_estimate'])} / "
            f"{error(r['saved_estimate'], r['saved'])} "
            f"| {format_bytes(r['saved_bf16_autocast'])} ({r['saved_bf16_autocast'] / r['saved']:.2f}x) "
            f"| {format_bytes(r['peak'])} / {format_bytes(r['peak_estimate'])} / "
            f"{error(r['peak_estimate'], r['peak'])} "
            f"| {format_bytes(r['peak_checkpointed'])} / {format_bytes(r['peak_checkpointed_estimate'])} / "
            f"{error(r['peak_checkpointed_estimate'], r['peak_checkpointed'])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per case (default 1)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--case", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.case is not None:
        print(json.dumps(measure_case(CASES[args.case])))
        return

    # One subprocess per case, so no case inherits another's allocator state.
    results = []
    for index, case in enumerate(CASES):
        print(f"measuring {case['name']} ...", file=sys.stderr, flush=True)
        out = subprocess.run([sys.executable, __file__, "--case", str(index), "--threads", str(args.threads)],
                             check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} thread(s)")
    print(markdown(results))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
