"""One forward pass with internals, converted to numpy for the probes.

The probes read plain arrays, so that each can be tested on hand-built inputs.
`trace_model` runs the model once and keeps, per GDN layer, the gates, keys,
values and memory states, and per SWA layer the slot attention and the gate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..ops.gated_delta_rule import chunk_gated_delta_rule


class ProbeNotApplicable(Exception):
    """A probe that does not apply to this model or input; the message states why."""


class ProbeInputError(ValueError):
    """Invalid probe input; the message names the value and the fix."""


@dataclass
class GDNTrace:
    """Internals of one GDN layer for ids [B, T]; arrays in float32 unless noted."""

    layer: int
    beta: np.ndarray
    """[B, T, H] write strength."""
    g: np.ndarray
    """[B, T, H] log decay (<= 0); alpha = exp(g)."""
    k: np.ndarray
    """[B, T, H, K] unit-norm keys."""
    v: np.ndarray
    """[B, T, H, V] values."""
    block_states: np.ndarray
    """[B, N, H, K, V] state before tokens n * M (N = ceil(T / M))."""
    final_state: np.ndarray
    """[B, H, K, V] state after the last token."""


@dataclass
class SWATrace:
    """Internals of one SWA layer that reads the GDN memory."""

    layer: int
    slot_weights: np.ndarray
    """[B, T, H, K] softmax over the K memory slots."""
    gate: np.ndarray
    """[B, T, H] weight of the global path."""
    memory: np.ndarray
    """[B, N, H, K, V] combined memory read by each block."""


@dataclass
class ModelTrace:
    """Internals of one forward pass over ids [B, T], as the probes read them."""

    ids: np.ndarray
    """[B, T] int64 token ids."""
    memory_block: int
    window: int
    layer_pattern: str
    gdn: list[GDNTrace] = field(default_factory=list)
    swa: list[SWATrace] = field(default_factory=list)
    surprisal: np.ndarray | None = None
    """[B, T] -ln p(ids[t] | ids[< t]) in nats; NaN at t = 0, which has no context."""


def as_batch(ids) -> torch.Tensor:
    """Return ids as a LongTensor [B, T]; a 1-D sequence becomes one row."""
    ids = torch.as_tensor(np.asarray(ids), dtype=torch.long)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2:
        raise ProbeInputError(f"ids must be [T] or [B, T] token ids, got shape {tuple(ids.shape)}")
    return ids


def check_length(n_tokens: int, memory_block: int) -> None:
    """Raise ProbeInputError unless a row is longer than one memory block.

    Positions in block 0 read a memory built from no tokens, so a row of at most
    M tokens shows nothing about the memory.
    """
    if n_tokens <= memory_block:
        raise ProbeInputError(
            f"the text has {n_tokens} tokens per row, but the probes need more than one memory block "
            f"(memory_block M = {memory_block} tokens) so that some position reads a non-empty memory; "
            f"pass a text of at least {memory_block + 1} tokens")


def _numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().to(torch.float32).cpu().numpy()


def recompute_block_states(info: dict, memory_block: int, chunk_size: int) -> torch.Tensor:
    """Block-start states [B, N, H, K, V] of a GDN layer whose states the model did not keep.

    Uses the chunked kernel on the layer's own q, k, v, g, beta, exactly as the
    layer does when an SWA layer above it reads its memory.
    """
    # The config guarantees that chunk_size divides memory_block.
    C = chunk_size
    _, _, chunk_states = chunk_gated_delta_rule(info["q"].float(), info["k"].float(), info["v"].float(),
                                                info["g"].float(), info["beta"].float(),
                                                output_final_state=True, chunk_size=C, output_chunk_states=True)
    return chunk_states[:, :: memory_block // C]


@torch.no_grad()
def trace_model(model, ids) -> ModelTrace:
    """Run `model` on ids ([T] or [B, T]) with internals and return them as numpy arrays."""
    config = model.config
    batch = as_batch(ids).to(next(model.parameters()).device)
    check_length(batch.shape[1], config.memory_block)

    out = model(batch, return_internals=True)
    trace = ModelTrace(ids=batch.cpu().numpy(), memory_block=config.memory_block,
                       window=config.window_size, layer_pattern=config.layer_pattern)

    # Surprisal of token t given tokens < t: -log_softmax(logits[t - 1])[ids[t]].
    log_probs = torch.log_softmax(out.logits.float(), dim=-1)                      # [B, T, vocab]
    target_log_probs = log_probs[:, :-1].gather(-1, batch[:, 1:, None])[..., 0]   # [B, T - 1]
    surprisal = torch.full(batch.shape, float("nan"))
    surprisal[:, 1:] = -target_log_probs.cpu()
    trace.surprisal = surprisal.numpy()

    for layer, info in enumerate(out.internals):
        if info["type"] == "gdn":
            states = info.get("block_states")
            if states is None:
                states = recompute_block_states(info, config.memory_block, config.chunk_size)
            trace.gdn.append(GDNTrace(layer=layer, beta=_numpy(info["beta"]), g=_numpy(info["g"]),
                                      k=_numpy(info["k"]), v=_numpy(info["v"]),
                                      block_states=_numpy(states), final_state=_numpy(info["final_state"])))
        elif info["type"] == "swa" and info["slot_weights"] is not None:
            trace.swa.append(SWATrace(layer=layer, slot_weights=_numpy(info["slot_weights"]),
                                      gate=_numpy(info["gate"]), memory=_numpy(info["memory"])))
    return trace


def require_gdn(trace: ModelTrace) -> None:
    """Raise ProbeNotApplicable when the model has no GDN layer."""
    if not trace.gdn:
        raise ProbeNotApplicable(f"layer_pattern {trace.layer_pattern!r} has no G layer, so there is no "
                                 "recurrent memory to measure")
