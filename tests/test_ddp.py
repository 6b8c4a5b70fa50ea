"""DistributedDataParallel on CPU (gloo): gradients equal the single-process average; rank 0 alone writes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from groundthink import GroundThinkConfig, GroundThinkLM
from groundthink.data import sample_batch
from groundthink.train import Runtime, TrainConfig, forward_backward, load_run_config, setup_runtime, train

from conftest import REPO, SHARED_DATA

WORLD = 2
TIMEOUT_S = 300
MODEL = dict(vocab_size=50, d_model=32, n_heads=2, head_dim=8, expand_v=1.0, layer_pattern="GS",
             window_size=8, memory_block=8, chunk_size=8)
TOKENS = np.random.default_rng(0).integers(0, 50, size=5_000).astype(np.uint16)


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports, all held open until every one is chosen."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def rank_batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two micro-batches (gradient accumulation) drawn for `rank`."""
    return [sample_batch(TOKENS, 3, 16, seed=0, stream=0, rank=rank, index=i) for i in range(2)]


def _worker(rank: int, port: int, train_port: int, out_dir: str, text_file: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)

    # 1. One accumulated step under DDP; rank 0 saves the all-reduced gradients.
    runtime = setup_runtime(TrainConfig(device="cpu"))
    torch.manual_seed(0)
    model = DistributedDataParallel(GroundThinkLM(GroundThinkConfig(**MODEL)))
    forward_backward(model, rank_batches(rank), runtime)
    if rank == 0:
        torch.save({n: p.grad for n, p in model.module.named_parameters()}, Path(out_dir) / "ddp_grads.pt")
    # Without this barrier a fast rank could re-join through rank 0's old store before it closes.
    dist.barrier()
    dist.destroy_process_group()

    # 2. The full training loop on two ranks, through a fresh store on another port: re-joining
    #    the first port races with rank 0's old store shutting down and can hang.
    os.environ["MASTER_PORT"] = str(train_port)
    run = load_run_config(REPO / "configs" / "tiny.toml", [
        f"data.path={json.dumps(text_file)}", f"data.cache_dir={json.dumps(str(Path(out_dir) / 'cache'))}",
        "train.max_steps=3", "train.log_interval=1", "train.eval_interval=3", "train.progress_bar=false",
        "train.num_threads=1"])
    train(run, Path(out_dir) / "run")


@pytest.fixture(scope="module")
def ddp_result(tmp_path_factory) -> Path:
    source = SHARED_DATA / "tinyshakespeare.txt"
    if not source.exists():
        pytest.skip(f"{source} is not present")
    out_dir = tmp_path_factory.mktemp("ddp")
    text_file = out_dir / "slice.txt"
    text_file.write_text(source.read_text(encoding="utf-8")[:30_000], encoding="utf-8")
    ports = free_ports(2)
    context = mp.spawn(_worker, args=(*ports, str(out_dir), str(text_file)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=2):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD} DDP workers did not finish within {TIMEOUT_S} s (a collective deadlocked?)")
    return out_dir


def test_ddp_gradients_match_single_process_average(ddp_result):
    torch.manual_seed(0)
    model = GroundThinkLM(GroundThinkConfig(**MODEL))
    single = Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), autocast_dtype=None,
                     distributed=False)
    batches = rank_batches(0) + rank_batches(1)
    assert not torch.equal(batches[0][0], batches[2][0]), "ranks must draw different batches"
    # Each rank's loss is a mean over its two micro-batches; DDP averages the ranks.
    forward_backward(model, batches, single)
    ddp_grads = torch.load(ddp_result / "ddp_grads.pt")
    for name, param in model.named_parameters():
        torch.testing.assert_close(ddp_grads[name], param.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_ddp_training_writes_once(ddp_result):
    run_dir = ddp_result / "run"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3], "one record per step, from rank 0 only"
    assert records[-1]["tokens"] == 3 * 8 * 32 * WORLD
    assert records[-1]["val_loss"] is not None
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-00000003"


@pytest.mark.slow
def test_torchrun_cli(tmp_path):
    """The command line under torchrun with two CPU ranks."""
    source = SHARED_DATA / "tinyshakespeare.txt"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={free_port()}", "-m", "groundthink", "train",
                          "--config", str(REPO / "configs" / "tiny.toml"), "--data", str(source),
                          "--out", str(tmp_path / "run"), "--set", "train.max_steps=4",
                          "--set", f"data.cache_dir={json.dumps(str(tmp_path / 'cache'))}"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ranks 2" in out.stderr
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step-00000004"
