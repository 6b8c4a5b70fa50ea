"""SWA-to-memory attention: how sharply SWA layers read the memory slots, and how much they use them.

For slot weights w_t [K] (a softmax over the K memory slots of one head):
  slot entropy   H_t = -sum_i w_ti ln w_ti            (0 for one-hot, ln K for uniform)
  focus ratio    1 - H_t / ln K                       (1 for one-hot, 0 for uniform)
The gate g_t in [0, 1] is the weight of the global path: out = g global + (1 - g) local.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .stats import entropy
from .trace import ProbeNotApplicable

DIFFUSE_FOCUS = 0.15
"""Below this mean focus ratio a head reads the slots almost uniformly (a diffuse reader)."""


def require_memory_readers(layer_pattern: str) -> None:
    """Raise ProbeNotApplicable unless some S layer lies above a G layer in the pattern."""
    if "S" not in layer_pattern:
        raise ProbeNotApplicable(f"layer_pattern {layer_pattern!r} has no S layer, so no layer reads the GDN memory")
    first_gdn = layer_pattern.find("G")
    if first_gdn < 0 or "S" not in layer_pattern[first_gdn + 1:]:
        raise ProbeNotApplicable(f"no S layer lies above a G layer in layer_pattern {layer_pattern!r}, "
                                 "so no SWA layer has a global pathway")


def slot_entropy(weights: np.ndarray) -> np.ndarray:
    """Entropy in nats of slot weights [..., K] (each row sums to 1)."""
    return entropy(weights)


def focus_ratio(weights: np.ndarray) -> np.ndarray:
    """1 - H / ln K for slot weights [..., K]; K = 1 gives 1 (one slot is always one-hot)."""
    weights = np.asarray(weights, dtype=np.float64)
    K = weights.shape[-1]
    if K == 1:
        return np.ones(weights.shape[:-1])
    return 1.0 - slot_entropy(weights) / math.log(K)


def per_block_mean(x: np.ndarray, memory_block: int) -> np.ndarray:
    """Mean of x [B, T, H] over the batch and the positions of each block: [N, H]."""
    B, T, H = x.shape
    N = -(-T // memory_block)
    padded = np.full((B, N * memory_block, H), np.nan)
    padded[:, :T] = x
    return np.nanmean(padded.reshape(B, N, memory_block, H), axis=(0, 2))


def memory_readers(
    slot_weights: Sequence[np.ndarray],
    gates: Sequence[np.ndarray],
    layers: Sequence[int],
    memory_block: int,
    diffuse_focus: float = DIFFUSE_FOCUS,
) -> dict:
    """Slot-attention focus and gate per SWA layer and head, overall and per memory block.

    Args:
        slot_weights: one [B, T, H, K] array per SWA layer with a global pathway.
        gates: one [B, T, H] array per such layer.
        layers: model layer index of each entry.
        memory_block: M; block n covers positions n * M .. (n + 1) * M - 1 and reads the
            memory built from tokens before n * M.
        diffuse_focus: heads whose mean focus ratio is below this are flagged diffuse.

    Block 0 reads a memory built from no tokens, an all-zero matrix whose slots all get
    the same score, so its focus is 0 by construction. The head means (focus, entropy,
    gate) therefore average blocks 1 .. N - 1 only; the per-block series keep block 0.

    Returns a dict with, per layer, focus, entropy and gate ([H] means over blocks >= 1)
    and focus_per_block, gate_per_block ([N, H]), the positions of the block starts, and flags.
    """
    if len(slot_weights) == 0:
        raise ProbeNotApplicable("no SWA layer with a global pathway")
    result = {"layers": list(layers), "diffuse_focus": diffuse_focus, "per_layer": [], "flags": []}
    for layer, weights, gate in zip(layers, slot_weights, gates):
        weights = np.asarray(weights, dtype=np.float64)
        B, T, H, K = weights.shape
        if T <= memory_block:
            raise ProbeNotApplicable(f"the sequence has {T} tokens, no more than one memory block (M = {memory_block}); "
                                     "every position reads the empty memory of block 0")
        focus = focus_ratio(weights)                                               # [B, T, H]
        ent = slot_entropy(weights)
        gate = np.asarray(gate, dtype=np.float64)
        after_first = slice(memory_block, T)
        record = {
            "layer": layer,
            "focus": focus[:, after_first].mean(axis=(0, 1)),
            "entropy": ent[:, after_first].mean(axis=(0, 1)),
            "gate": gate[:, after_first].mean(axis=(0, 1)),
            "focus_per_block": per_block_mean(focus, memory_block),
            "gate_per_block": per_block_mean(gate, memory_block),
        }
        result["per_layer"].append(record)
        for h in range(H):
            if record["focus"][h] < diffuse_focus:
                result["flags"].append(
                    f"layer {layer} head {h}: diffuse memory reader, mean focus ratio {record['focus'][h]:.3f} "
                    f"< {diffuse_focus} (gate {record['gate'][h]:.2f}); it reads an average of all slots")
    N = result["per_layer"][0]["focus_per_block"].shape[0]
    result["positions"] = np.arange(N) * memory_block
    return result
