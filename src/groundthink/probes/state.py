"""State content: size, effective rank and entropy of the memory, and interference between keys.

For a state S [K, V] with singular values sigma_i (see docs/probes.md):
  norm            ||S||_F
  effective rank  exp(-sum p_i ln p_i),   p_i = sigma_i / sum_j sigma_j   (Roy and Vetterli, 2007)
  state entropy   -sum q_i ln q_i,        q_i = sigma_i^2 / ||S||_F^2     (von Neumann entropy of S S^T / tr)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .stats import entropy, mean_abs_cos_random

INTERFERENCE_BETA = 0.5
"""Keys written with beta above this count as stored for the interference measure."""
MAX_KEYS = 1024
"""At most this many stored keys per head enter the pairwise cosines (evenly spaced in time)."""


def singular_values(S: np.ndarray) -> np.ndarray:
    """Singular values of S [..., K, V] in float64, largest first: [..., min(K, V)]."""
    return np.linalg.svd(np.asarray(S, dtype=np.float64), compute_uv=False)


def effective_rank(S: np.ndarray) -> np.ndarray:
    """exp of the entropy of the normalised singular values of S [..., K, V]; 0 for S = 0."""
    sigma = singular_values(S)
    total = sigma.sum(-1, keepdims=True)
    p = np.divide(sigma, total, out=np.zeros_like(sigma), where=total > 0)
    return np.where(total[..., 0] > 0, np.exp(entropy(p)), 0.0)


def state_entropy(S: np.ndarray) -> np.ndarray:
    """Von Neumann entropy of S S^T / tr(S S^T) in nats (at most ln min(K, V)); 0 for S = 0."""
    sigma = singular_values(S)
    energy = sigma * sigma
    total = energy.sum(-1, keepdims=True)
    q = np.divide(energy, total, out=np.zeros_like(energy), where=total > 0)
    return entropy(q)


def state_norm(S: np.ndarray) -> np.ndarray:
    """Frobenius norm of S [..., K, V]."""
    S = np.asarray(S, dtype=np.float64)
    return np.sqrt((S * S).sum(axis=(-2, -1)))


def key_interference(k: np.ndarray, beta: np.ndarray, threshold: float = INTERFERENCE_BETA,
                     max_keys: int = MAX_KEYS) -> dict:
    """Mean |cos| between the keys written with beta > threshold (one head).

    k: [n, K] keys, beta: [n]. Keys that overlap interfere: reading one returns part of
    the other's value. The baseline is E|cos| of independent random unit vectors in K
    dimensions; the ratio to it is 1 for unrelated keys and 0 for orthogonal ones.
    Returns n_keys and mean_abs_cos, or mean_abs_cos None when fewer than two keys qualify.
    """
    k = np.asarray(k, dtype=np.float64)
    stored = k[np.asarray(beta) > threshold]
    baseline = mean_abs_cos_random(k.shape[1])
    out = {"n_keys": int(len(stored)), "mean_abs_cos": None, "random_baseline": baseline, "ratio": None}
    if len(stored) < 2:
        return out
    if len(stored) > max_keys:
        stored = stored[np.linspace(0, len(stored) - 1, max_keys).astype(int)]
    unit = stored / np.maximum(np.linalg.norm(stored, axis=1, keepdims=True), 1e-12)
    cos = unit @ unit.T
    upper = np.triu_indices(len(unit), k=1)
    mean_abs = float(np.abs(cos[upper]).mean())
    out.update(mean_abs_cos=mean_abs, ratio=mean_abs / baseline)
    return out


def describe_states(states: np.ndarray) -> dict:
    """norm, effective_rank and entropy of states [B, N, H, K, V], averaged over B: [N, H] each."""
    return {"norm": state_norm(states).mean(0), "effective_rank": effective_rank(states).mean(0),
            "entropy": state_entropy(states).mean(0)}


def state_content(
    block_states: Sequence[np.ndarray],
    final_states: Sequence[np.ndarray],
    keys: Sequence[np.ndarray],
    betas: Sequence[np.ndarray],
    layers: Sequence[int],
    memory_block: int,
    read_memories: Sequence[np.ndarray] = (),
    read_layers: Sequence[int] = (),
    beta_threshold: float = INTERFERENCE_BETA,
) -> dict:
    """Memory size, effective rank and entropy over time, and key interference per head.

    Args:
        block_states: one [B, N, H, K, V] array per GDN layer (state before token n * M).
        final_states: one [B, H, K, V] array per GDN layer.
        keys, betas: one [B, T, H, K] and one [B, T, H] array per GDN layer.
        layers: model layer index of each GDN entry.
        memory_block: M, so that block n starts at token n * M.
        read_memories, read_layers: the combined memory [B, N, H, K, V] each SWA layer reads,
            and those layers' indices; described like the GDN states.

    Returns a dict with positions ([N] token index of each block start), max_rank
    (min(K, V)), flags, and two lists. Each 'gdn' entry has 'over_time' (norm,
    effective_rank, entropy: [N, H]), 'final' ([H] each) and 'interference' (one
    key_interference record per head). Each 'read_memory' entry describes an SWA layer's
    combined memory like 'over_time'.
    """
    if len(block_states) == 0:
        raise ValueError("state_content needs at least one GDN layer")
    N = block_states[0].shape[1]
    K, V = block_states[0].shape[-2:]
    result = {"positions": np.arange(N) * memory_block, "max_rank": int(min(K, V)),
              "max_entropy": float(np.log(min(K, V))), "beta_threshold": beta_threshold,
              "gdn": [], "read_memory": [], "flags": []}
    for layer, states, final, k, beta in zip(layers, block_states, final_states, keys, betas):
        B, T, H, _ = k.shape
        interference = [key_interference(k[:, :, h].reshape(B * T, K), beta[:, :, h].reshape(-1), beta_threshold)
                        for h in range(H)]
        final_info = describe_states(np.asarray(final)[:, None])
        result["gdn"].append({"layer": layer, "over_time": describe_states(states),
                              "final": {name: value[0] for name, value in final_info.items()},
                              "interference": interference})
        for h, record in enumerate(interference):
            if record["ratio"] is not None and record["ratio"] > 1.5:
                result["flags"].append(
                    f"layer {layer} head {h}: stored keys overlap, mean |cos| {record['mean_abs_cos']:.3f} is "
                    f"{record['ratio']:.1f}x that of random keys; writes overwrite each other")
        rank = final_info["effective_rank"][0]
        for h in range(H):
            if rank[h] < 1.5 and final_info["norm"][0][h] > 0:
                result["flags"].append(f"layer {layer} head {h}: final memory has effective rank {rank[h]:.2f} "
                                       f"of at most {min(K, V)}; it stores about one direction")
    for layer, memory in zip(read_layers, read_memories):
        result["read_memory"].append({"layer": layer, "over_time": describe_states(memory)})
    return result
