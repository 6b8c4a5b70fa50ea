"""Forget horizon: how many tokens a GDN head keeps what it stored.

alpha_t = exp(g_t) scales the whole memory at every token, so a memory left alone
for n tokens keeps alpha^n of itself; it halves after ln 0.5 / ln alpha = -ln 2 / g
tokens, the half-life (see docs/probes.md).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .stats import quantiles

N_BINS = 40
SATURATED_BETA = 0.1
"""A head that forgets nothing within the training context and writes with mean beta
below this barely changes its memory at all."""


def half_life(g: np.ndarray) -> np.ndarray:
    """Memory half-life in tokens, -ln 2 / g, for log decays g <= 0 (infinite where g = 0)."""
    g = np.asarray(g, dtype=np.float64)
    if np.any(g > 0):
        raise ValueError(f"log decay g must be <= 0, got a maximum of {float(g.max())}")
    out = np.full(g.shape, np.inf)
    np.divide(-math.log(2.0), g, out=out, where=g < 0)
    return out


def log_spaced_edges(values: np.ndarray, n_bins: int = N_BINS) -> np.ndarray:
    """Histogram edges evenly spaced in log10 covering the finite positive values (whole decades)."""
    finite = values[np.isfinite(values) & (values > 0)]
    if finite.size == 0:
        return np.logspace(0, 1, n_bins + 1)
    low = math.floor(math.log10(finite.min()))
    high = max(math.ceil(math.log10(finite.max())), low + 1)
    return np.logspace(low, high, n_bins + 1)


def forget_horizon(
    gs: Sequence[np.ndarray],
    betas: Sequence[np.ndarray],
    layers: Sequence[int],
    window: int | None,
    train_context: int | None,
    saturated_beta: float = SATURATED_BETA,
) -> dict:
    """Half-life statistics per GDN layer and head, with goldfish and saturated flags.

    Args:
        gs, betas: one [B, T, H] array of log decays and of write strengths per GDN layer.
        layers: model layer index of each entry.
        window: the SWA window W in tokens, or None when the model has no SWA layer
            (then no head is a goldfish, because nothing else covers recent tokens).
        train_context: the training sequence length in tokens, or None when unknown
            (then the saturated check is skipped).
        saturated_beta: mean-beta threshold of the saturated flag.

    A head is a goldfish when its median half-life is below W (the window already
    sees everything it remembers) and saturated when its median half-life exceeds
    the training context while its mean beta is below saturated_beta.

    Returns a dict with alpha_mean [L, H], quantiles per head (p10 .. p90 of the
    half-life, [L, H] each), beta_mean [L, H], a histogram of the half-life per head
    (log-spaced edges; infinite values counted in the last bin), heads (one record
    per head with its flag) and flags (text).
    """
    if len(gs) == 0:
        raise ValueError("forget_horizon needs at least one GDN layer's log decay")
    g = np.stack([np.asarray(x, dtype=np.float64) for x in gs])                    # [L, B, T, H]
    beta = np.stack([np.asarray(x, dtype=np.float64) for x in betas])
    L, B, T, H = g.shape
    life = half_life(g).reshape(L, B * T, H)                                       # [L, B*T, H]

    edges = log_spaced_edges(life)
    counts = np.zeros((L, H, len(edges) - 1), dtype=np.int64)
    table = {name: np.zeros((L, H)) for name in ("p10", "p25", "p50", "p75", "p90")}
    heads, flags = [], []
    for i, layer in enumerate(layers):
        for h in range(H):
            values = life[i, :, h]
            clipped = np.clip(values, edges[0], edges[-1])
            counts[i, h] = np.histogram(clipped, bins=edges)[0]
            stats = quantiles(values)
            for name, value in stats.items():
                table[name][i, h] = value
            beta_mean = float(beta[i, :, :, h].mean())

            flag = None
            if window is not None and stats["p50"] < window:
                flag = "goldfish"
                flags.append(f"layer {layer} head {h}: goldfish, median half-life {stats['p50']:.1f} tokens "
                             f"< window W = {window}; the window already covers what it remembers")
            elif train_context is not None and stats["p50"] > train_context and beta_mean < saturated_beta:
                flag = "saturated"
                flags.append(f"layer {layer} head {h}: saturated, median half-life {stats['p50']:.0f} tokens "
                             f"> training context {train_context} and mean beta {beta_mean:.3f} "
                             f"< {saturated_beta}; the memory barely changes")
            heads.append({"layer": layer, "head": h, "median_half_life": stats["p50"],
                          "mean_beta": beta_mean, "flag": flag})

    notes = []
    if window is None:
        notes.append("no SWA layer, so the goldfish check (median half-life < W) does not apply")
    if train_context is None:
        notes.append("training context unknown, so the saturated check was skipped; pass it to enable the check")
    return {
        "layers": list(layers),
        "window": window,
        "train_context": train_context,
        "saturated_beta": saturated_beta,
        "alpha_mean": np.exp(g).mean(axis=(1, 2)),
        "beta_mean": beta.mean(axis=(1, 2)),
        "half_life": table,
        "histogram": {"edges": edges, "counts": counts},
        "heads": heads,
        "notes": notes,
        "flags": flags,
    }
