"""Speed of the gated delta rule kernels on CPU against a public pure-PyTorch peer.

Prints, for B=1, H=4, K=64, V=128, chunk 64 and T in {512, 2048, 8192}, float32:
forward and forward+backward time of the recurrent and chunked kernels, tokens/s,
achieved GFLOP/s and the fraction of this machine's float32 matmul peak measured in
the same run. With `transformers` installed (the `bench` extra), it also times the
pure-PyTorch `torch_chunk_gated_delta_rule` of its Qwen3-Next model on the same inputs.
Timings interleave the kernels and report medians, because shared machines are noisy.
On a machine shared with other jobs, `--threads 1 --cpu-time` measures the process CPU
time of each call instead of wall time, which descheduling does not inflate.

    python benchmarks/bench_gated_delta.py [--threads N] [--cpu-time] [--repeats R] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from groundthink.ops import chunk_gated_delta_rule, recurrent_gated_delta_rule

B, H, K, V, C = 1, 4, 64, 128, 64


def chunk_flops_forward(T: int) -> float:
    """FLOPs of the chunked forward: per chunk and head 6C^2K + 4C^2V + C^3/3 + 6CKV."""
    n_chunks = -(-T // C)
    return n_chunks * H * (6 * C * C * K + 4 * C * C * V + C ** 3 / 3 + 6 * C * K * V)


def matmul_peak_gflops(clock, n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(repeats):
        start = clock()
        a @ b
        times.append(clock() - start)
    return 2 * n ** 3 / min(times) / 1e9


def make_inputs(T: int, requires_grad: bool):
    torch.manual_seed(0)
    q = torch.randn(B, T, H, K)
    k = F.normalize(torch.randn(B, T, H, K), dim=-1)
    v = torch.randn(B, T, H, V)
    g = -0.1 * torch.rand(B, T, H)
    beta = torch.rand(B, T, H)
    tensors = [q, k, v, g, beta]
    return [x.requires_grad_(requires_grad) for x in tensors]


def load_peer():
    """The pure-PyTorch chunked kernel of transformers' Qwen3-Next, or None when not installed."""
    try:
        from transformers.models.qwen3_next import modeling_qwen3_next
    except ImportError:
        return None
    kernel = getattr(modeling_qwen3_next, "torch_chunk_gated_delta_rule", None)
    if kernel is None:
        return None
    return lambda q, k, v, g, beta: kernel(q, k, v, g, beta, chunk_size=C)[0]


def time_interleaved(kernels: dict, T: int, backward: bool, repeats: int, clock) -> dict[str, float]:
    """Median seconds per call of each kernel, calling them in turn so load spikes hit all alike."""
    inputs = make_inputs(T, requires_grad=backward)
    samples: dict[str, list[float]] = {name: [] for name in kernels}
    for round_index in range(repeats + 1):
        for name, kernel in kernels.items():
            start = clock()
            if backward:
                out = kernel(*inputs)
                out.sum().backward()
                for x in inputs:
                    x.grad = None
            else:
                with torch.no_grad():
                    kernel(*inputs)
            if round_index > 0:  # the first round warms up allocators and caches
                samples[name].append(clock() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per kernel and length")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--recurrent-max-t", type=int, default=2048,
                        help="skip the recurrent kernel above this T (it loops over tokens in Python)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time with the process CPU clock instead of the wall clock (use with --threads 1)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.cpu_time else time.perf_counter

    peak = matmul_peak_gflops(clock)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{'process CPU' if args.cpu_time else 'wall'} clock")
    print(f"float32 matmul peak (2048^3, best of 5): {peak:.1f} GFLOP/s")

    chunk = lambda q, k, v, g, beta: chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=C)[0]
    recurrent = lambda q, k, v, g, beta: recurrent_gated_delta_rule(q, k, v, g, beta)[0]
    peer = load_peer()
    if peer is None:
        print("transformers not installed: no peer timings (pip install -e '.[bench]')")

    rows = []
    header = f"{'T':>6} {'kernel':<10} {'fwd ms':>9} {'fwd+bwd ms':>11} {'fwd tok/s':>11} {'fwd GFLOP/s':>12} {'% peak':>7}"
    print(header)
    for T in args.lengths:
        kernels = {"chunk": chunk}
        if peer is not None:
            kernels["peer"] = peer
        if T <= args.recurrent_max_t:
            kernels["recurrent"] = recurrent
        forward = time_interleaved(kernels, T, backward=False, repeats=args.repeats, clock=clock)
        both = time_interleaved(kernels, T, backward=True, repeats=args.repeats, clock=clock)
        flops = chunk_flops_forward(T)
        for name in kernels:
            gflops = flops / forward[name] / 1e9
            row = dict(T=T, kernel=name, forward_s=forward[name], forward_backward_s=both[name],
                       tokens_per_s=B * T / forward[name], gflops=gflops, peak_fraction=gflops / peak)
            rows.append(row)
            print(f"{T:>6} {name:<10} {1e3 * forward[name]:>9.2f} {1e3 * both[name]:>11.2f} "
                  f"{row['tokens_per_s']:>11.0f} {gflops:>12.1f} {100 * row['peak_fraction']:>6.1f}%")

    by = {(r["T"], r["kernel"]): r for r in rows}
    if peer is not None:
        print("\nspeed-up of chunk over peer (peer time / chunk time):")
        for T in args.lengths:
            fwd = by[T, "peer"]["forward_s"] / by[T, "chunk"]["forward_s"]
            bwd = by[T, "peer"]["forward_backward_s"] / by[T, "chunk"]["forward_backward_s"]
            print(f"  T={T}: forward {fwd:.2f}x, forward+backward {bwd:.2f}x")
    if 2048 in args.lengths and 8192 in args.lengths:
        growth = by[8192, "chunk"]["forward_backward_s"] / by[2048, "chunk"]["forward_backward_s"]
        print(f"chunk forward+backward time at T=8192 / T=2048: {growth:.2f} (linear: 4.0)")

    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"matmul_peak_gflops": peak, "threads": torch.get_num_threads(), "cpu_time": args.cpu_time,
                       "rows": rows}, f, indent=2)
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
