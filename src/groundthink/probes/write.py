"""Write strength: which tokens the GDN layers write into memory, and how hard.

beta_{l,t,h} = sigmoid(W_b x_t + b) is the fraction of the memory's prediction for
key k_t that token t replaces by its value v_t (see docs/probes.md).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .stats import spearman

FLAT_BETA_STD = 0.02
"""A head whose beta varies less than this (std over tokens) ignores its input."""


def write_strength(
    betas: Sequence[np.ndarray],
    ids: np.ndarray,
    layers: Sequence[int],
    surprisal: np.ndarray | None = None,
    top_k: int = 10,
    min_count: int = 3,
) -> dict:
    """Summarise beta per layer, head and token, and per token type.

    Args:
        betas: one [B, T, H] array per GDN layer.
        ids: [B, T] token ids; rows are consecutive pieces of one text.
        layers: model layer index of each entry of `betas`.
        surprisal: [B, T] -ln p(token t | tokens < t), NaN where undefined, or None.
        top_k: how many token types to list at each end of the ranking.
        min_count: token types seen fewer times are left out of the ranking and the
            frequency correlation, because their mean beta rests on too few samples.

    Returns a dict with
        mean, std: [L, H] over all tokens;
        per_token: [L, H, B * T] beta in text order; token_mean: [B * T] mean over layers and heads;
        types: ids, counts and mean_beta ([n_types], mean over occurrences, layers and heads);
        highest, lowest: the top_k types by mean beta among those seen >= min_count times;
        frequency_spearman: Spearman correlation of ln(count) and mean beta over those types;
        surprisal_spearman: Spearman correlation of surprisal and token_mean over positions,
            overall and per layer ([L]);
        flags: heads whose beta barely varies.
    """
    if len(betas) == 0:
        raise ValueError("write_strength needs at least one GDN layer's beta")
    ids = np.asarray(ids)
    beta = np.stack([np.asarray(b, dtype=np.float64) for b in betas])             # [L, B, T, H]
    L, B, T, H = beta.shape
    if ids.shape != (B, T):
        raise ValueError(f"ids must have shape [B, T] = {(B, T)} to match beta, got {ids.shape}")

    per_token = beta.reshape(L, B * T, H).transpose(0, 2, 1)                       # [L, H, B*T]
    token_mean = per_token.mean(axis=(0, 1))                                       # [B*T]
    flat_ids = ids.reshape(-1)

    # Mean beta per token type: sum over occurrences / count.
    types, inverse, counts = np.unique(flat_ids, return_inverse=True, return_counts=True)
    type_mean = np.bincount(inverse, weights=token_mean) / counts
    ranked = np.flatnonzero(counts >= min_count)
    order = ranked[np.argsort(-type_mean[ranked], kind="mergesort")]

    def listing(indices: np.ndarray) -> list[dict]:
        return [{"id": int(types[i]), "count": int(counts[i]), "mean_beta": float(type_mean[i])} for i in indices]

    result = {
        "layers": list(layers),
        "mean": beta.mean(axis=(1, 2)),
        "std": beta.std(axis=(1, 2)),
        "per_token": per_token,
        "token_mean": token_mean,
        "types": {"ids": types, "counts": counts, "mean_beta": type_mean},
        "min_count": min_count,
        "n_types_ranked": int(len(ranked)),
        "highest": listing(order[:top_k]),
        "lowest": listing(order[::-1][:top_k]),
        "frequency_spearman": spearman(np.log(counts[ranked]), type_mean[ranked]),
        "surprisal_spearman": None,
        "surprisal_spearman_per_layer": None,
        "flags": [],
    }
    if surprisal is not None:
        s = np.asarray(surprisal, dtype=np.float64).reshape(-1)
        result["surprisal_spearman"] = spearman(s, token_mean)
        result["surprisal_spearman_per_layer"] = [spearman(s, per_token[i].mean(axis=0)) for i in range(L)]

    for i, layer in enumerate(layers):
        for h in range(H):
            if result["std"][i, h] < FLAT_BETA_STD:
                result["flags"].append(
                    f"layer {layer} head {h}: beta is nearly constant (mean {result['mean'][i, h]:.3f}, "
                    f"std {result['std'][i, h]:.4f} < {FLAT_BETA_STD}); the write gate ignores the token")
    return result
