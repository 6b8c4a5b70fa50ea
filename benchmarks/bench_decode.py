"""Per-token decoding latency and cache size against context length: GSGS versus AAAA on CPU.

For each context length the script prefills a random prompt of that many tokens. It then
times `--steps` single-token `model.step` calls (after `--warmup` untimed ones), one step of
every run in turn, and reports the wall-clock median and 90th percentile and the CPU-time
median per token, and the bytes of the decoding cache. Both
models have the same heads and depth, and the AAAA model's d_model is the one that brings its
parameter count closest to the GSGS model's. The recurrent hybrid's latency and cache should
stay flat in the context length, while full attention's grow linearly.

    python benchmarks/bench_decode.py [--contexts 256 2048 16384] [--steps 50] [--threads 1] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from groundthink import GroundThinkConfig, GroundThinkLM

VOCAB = 256
HYBRID = dict(vocab_size=VOCAB, d_model=256, n_heads=4, head_dim=64, expand_v=2.0, layer_pattern="GSGS",
              window_size=64, memory_block=64, chunk_size=64)


def matched_attention_config() -> GroundThinkConfig:
    """Return the AAAA config whose parameter count is the closest to the GSGS one (d_model a multiple of 8)."""
    target = GroundThinkLM(GroundThinkConfig(**HYBRID)).num_parameters()
    best = None
    for d_model in range(64, 1025, 8):
        config = GroundThinkConfig(**{**HYBRID, "layer_pattern": "AAAA", "d_model": d_model})
        gap = abs(GroundThinkLM(config).num_parameters() - target)
        if best is None or gap < best[0]:
            best = (gap, config)
    return best[1]


def prefill(model: GroundThinkLM, context: int):
    """Prefill `context` random tokens; returns (cache, seconds)."""
    generator = torch.Generator().manual_seed(context)
    prompt = torch.randint(0, VOCAB, (1, context), generator=generator)
    start = time.perf_counter()
    _, cache = model.prefill(prompt)
    return cache, time.perf_counter() - start


def time_steps(runs: list[dict], steps: int, warmup: int) -> None:
    """Time single-token steps of every run in turn, so that load spikes from other jobs hit all
    runs alike; stores wall-clock and CPU milliseconds per step in each run's "wall_ms" and "cpu_ms".

    Each round starts at the next run, because the first step of a round finds its model's
    weights evicted from the CPU caches by the previous model.
    """
    token = torch.tensor([1])
    for run in runs:
        run["wall_ms"], run["cpu_ms"] = [], []
    for round_index in range(warmup + steps):
        first = round_index % len(runs)
        for run in runs[first:] + runs[:first]:
            wall, cpu = time.perf_counter(), time.thread_time()
            run["model"].step(token, run["cache"])
            if round_index >= warmup:
                run["wall_ms"].append(1e3 * (time.perf_counter() - wall))
                run["cpu_ms"].append(1e3 * (time.thread_time() - cpu))


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[round(fraction * (len(ordered) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 2048, 16384],
                        help="prompt lengths in tokens to prefill before timing the steps")
    parser.add_argument("--steps", type=int, default=50, help="timed single-token steps per context")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before the timed ones")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1, to reduce interference from other jobs)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    configs = {"GSGS": GroundThinkConfig(**HYBRID), "AAAA": matched_attention_config()}
    print(f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs visible, "
          f"{torch.get_num_threads()} thread(s), float32, batch 1", flush=True)

    # 1. Prefill every (pattern, context) run.
    runs = []
    for name, config in configs.items():
        torch.manual_seed(0)
        model = GroundThinkLM(config).eval()
        print(f"{name}: d_model={config.d_model}, {model.num_parameters():,} parameters", flush=True)
        for context in args.contexts:
            cache, seconds = prefill(model, context)
            runs.append({"pattern": name, "model": model, "cache": cache, "context": context, "prefill_s": seconds})

    # 2. Time the steps of all runs interleaved.
    time_steps(runs, args.steps, args.warmup)

    # 3. Report.
    results = []
    for run in runs:
        model, cache = run["model"], run["cache"]
        results.append({"pattern": run["pattern"], "d_model": model.config.d_model,
                        "parameters": model.num_parameters(), "context": run["context"],
                        "prefill_s": run["prefill_s"],
                        "step_wall_ms_median": statistics.median(run["wall_ms"]),
                        "step_wall_ms_p90": percentile(run["wall_ms"], 0.9),
                        "step_cpu_ms_median": statistics.median(run["cpu_ms"]),
                        "cache_bytes": cache.nbytes(),
                        "state_bytes": model.state_bytes(1, torch.float32, context=cache.position)["total"]})
    for row in results:
        if row["cache_bytes"] != row["state_bytes"]:
            raise RuntimeError(f"{row['pattern']} at context {row['context']}: cache holds {row['cache_bytes']} bytes "
                               f"but state_bytes predicts {row['state_bytes']}")
    print("\n| pattern | params | context | step wall median (ms) | step wall p90 (ms) | step CPU median (ms) "
          "| cache (MiB) | prefill (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in results:
        print(f"| {row['pattern']} | {row['parameters']:,} | {row['context']:,} | {row['step_wall_ms_median']:.2f} | "
              f"{row['step_wall_ms_p90']:.2f} | {row['step_cpu_ms_median']:.2f} | {row['cache_bytes'] / 2**20:.3f} | "
              f"{row['prefill_s']:.2f} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"threads": args.threads, "steps": args.steps, "warmup": args.warmup, "results": results},
                      f, indent=2)


if __name__ == "__main__":
    main()
