"""Forward+backward throughput and peak memory of GSGS against AAAA at matched parameters.

Each (pattern, T) point runs in a fresh subprocess so that its peak resident set size
(ru_maxrss, or torch.cuda.max_memory_allocated on CUDA) belongs to that point alone;
the reported peak is the growth of the peak RSS over the RSS after building the model.

On a machine shared with other jobs, `--threads 1 --cpu-time` times each step with the
process CPU clock, which descheduling does not inflate.

    python benchmarks/bench_model.py [--lengths 256 1024 4096] [--batch 1] [--threads N] [--cpu-time]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch

from groundthink import GroundThinkConfig, GroundThinkLM

BASE = dict(vocab_size=256, d_model=128, n_heads=4, head_dim=32, expand_v=2.0,
            window_size=64, memory_block=64, chunk_size=64)


def matched_attention_config() -> dict:
    """AAAA config whose parameter count is closest to GSGS's, by searching d_model."""
    target = GroundThinkLM(GroundThinkConfig(**BASE, layer_pattern="GSGS")).num_parameters()
    best = None
    for d_model in range(64, 512, 8):
        config = dict(BASE, d_model=d_model, layer_pattern="AAAA")
        count = GroundThinkLM(GroundThinkConfig(**config)).num_parameters()
        if best is None or abs(count - target) < abs(best[1] - target):
            best = (config, count)
    return best[0]


def run_point(config: dict, T: int, batch: int, repeats: int, cpu_time: bool = False) -> dict:
    """Measure one point in this process: tokens/s of forward+backward and peak memory growth."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = GroundThinkLM(GroundThinkConfig(**config)).to(device)
    ids = torch.randint(0, config["vocab_size"], (batch, T + 1), device=device)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    clock = time.process_time if cpu_time else time.perf_counter
    times = []
    for step in range(repeats + 1):
        start = clock()
        model(ids[:, :-1], labels=ids[:, 1:]).loss.backward()
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step > 0:
            times.append(clock() - start)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    seconds = sorted(times)[len(times) // 2]
    return dict(pattern=config["layer_pattern"], T=T, batch=batch, parameters=model.num_parameters(),
                seconds=seconds, tokens_per_s=batch * T / seconds, peak_bytes=peak, device=device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cpu-time", action="store_true",
                        help="time with the process CPU clock instead of the wall clock (use with --threads 1)")
    parser.add_argument("--point", default=None, help=argparse.SUPPRESS)  # JSON: run one point, print JSON
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.point:
        point = json.loads(args.point)
        print(json.dumps(run_point(point["config"], point["T"], args.batch, args.repeats, args.cpu_time)))
        return

    configs = [dict(BASE, layer_pattern="GSGS"), matched_attention_config()]
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    print(f"{'pattern':<8} {'d_model':>7} {'params':>9} {'T':>6} {'fwd+bwd ms':>11} {'tok/s':>9} {'peak MiB':>9}")
    results = []
    for T in args.lengths:
        for config in configs:
            command = [sys.executable, __file__, "--point", json.dumps({"config": config, "T": T}),
                       "--batch", str(args.batch), "--repeats", str(args.repeats)]
            if args.threads:
                command += ["--threads", str(args.threads)]
            if args.cpu_time:
                command.append("--cpu-time")
            row = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
            results.append(row)
            print(f"{row['pattern']:<8} {config['d_model']:>7} {row['parameters']:>9} {T:>6} "
                  f"{1e3 * row['seconds']:>11.1f} {row['tokens_per_s']:>9.0f} {row['peak_bytes'] / 2**20:>9.1f}")

    by = {(r["pattern"], r["T"]): r for r in results}
    lo, hi = min(args.lengths), max(args.lengths)
    for pattern in ("GSGS", "AAAA"):
        ratio = by[pattern, hi]["seconds"] / by[pattern, lo]["seconds"]
        print(f"{pattern}: time at T={hi} / T={lo} = {ratio:.1f} (linear: {hi / lo:.0f})")
    speedup = by["AAAA", hi]["seconds"] / by["GSGS", hi]["seconds"]
    print(f"GSGS speed-up over AAAA at T={hi}: {speedup:.2f}x")


if __name__ == "__main__":
    main()
