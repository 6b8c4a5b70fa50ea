"""Transition spectrum: how much of the memory survives each token and each span.

The state update S_t = A_t S_{t-1} + beta_t k_t v_t^T has the transition
A_t = alpha_t (I - beta_t k_t k_t^T), a [K, K] matrix. Its eigenvalues are alpha_t
(multiplicity K - 1, directions orthogonal to k_t) and alpha_t (1 - beta_t |k_t|^2)
(direction k_t), so ln|det A_t| = K g_t + ln|1 - beta_t |k_t|^2| (see docs/probes.md).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

ONE_MINUS_BETA_FLOOR = 2.0 ** -24
"""Floor of |1 - beta |k|^2| inside the logarithm. beta = sigmoid(z) in float32 rounds
to exactly 1 for z above about 17, where the true 1 - beta is below 2^-24."""

N_BINS = 50
CHECK_TOLERANCE = 1e-6


def transition_eigenvalues(g, beta, key_sq_norm=1.0) -> tuple[np.ndarray, np.ndarray]:
    """Return the eigenvalues of A_t: alpha_t (multiplicity K - 1) and alpha_t (1 - beta_t |k_t|^2) (once)."""
    alpha = np.exp(np.asarray(g, dtype=np.float64))
    along_key = alpha * (1.0 - np.asarray(beta, dtype=np.float64) * key_sq_norm)
    return alpha, along_key


def log_abs_det(g, beta, K: int, key_sq_norm=1.0) -> np.ndarray:
    """ln|det A_t| = K g_t + ln|1 - beta_t |k_t|^2|, with the second term floored at ln 2^-24."""
    g = np.asarray(g, dtype=np.float64)
    along = np.abs(1.0 - np.asarray(beta, dtype=np.float64) * key_sq_norm)
    return K * g + np.log(np.maximum(along, ONE_MINUS_BETA_FLOOR))


def transition_matrix(g_t: float, beta_t: float, k_t: np.ndarray) -> np.ndarray:
    """A_t = exp(g_t) (I - beta_t k_t k_t^T) as an explicit [K, K] float64 matrix."""
    k_t = np.asarray(k_t, dtype=np.float64)
    return math.exp(g_t) * (np.eye(len(k_t)) - beta_t * np.outer(k_t, k_t))


def span_product(g: np.ndarray, beta: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Multiply out P = A_{n-1} ... A_1 A_0 for g, beta [n] and keys k [n, K] with explicit matrices."""
    P = np.eye(k.shape[1])
    for t in range(len(g)):
        P = transition_matrix(float(g[t]), float(beta[t]), k[t]) @ P
    return P


def span_check(g: np.ndarray, beta: np.ndarray, k: np.ndarray) -> dict:
    """Compare the closed-form ln|det| of a span's product with the explicit matrices.

    g, beta: [n]; k: [n, K]. Returns log_det_closed (sum of ln|det A_t|), log_det_explicit
    (slogdet of P), spectral_norm ||P||_2 (the largest factor by which any stored
    direction survives the span) and decay_bound prod alpha_t, which bounds ||P||_2
    whenever 0 <= beta |k|^2 <= 2, because each I - beta k k^T then has norm 1.
    """
    g, beta, k = (np.asarray(x, dtype=np.float64) for x in (g, beta, k))
    K = k.shape[1]
    P = span_product(g, beta, k)
    _, log_det_explicit = np.linalg.slogdet(P)
    closed = float(log_abs_det(g, beta, K, (k * k).sum(-1)).sum())
    return {
        "length": len(g),
        "log_det_closed": closed,
        "log_det_explicit": float(log_det_explicit),
        "abs_error": abs(closed - float(log_det_explicit)),
        "spectral_norm": float(np.linalg.norm(P, 2)),
        "decay_bound": float(math.exp(g.sum())),
    }


def window_sums(x: np.ndarray, length: int) -> np.ndarray:
    """Sums of `length` consecutive values along axis 1 of x [B, T, ...]: [B, T - length + 1, ...]."""
    c = np.concatenate([np.zeros_like(x[:, :1]), np.cumsum(x, axis=1)], axis=1)
    return c[:, length:] - c[:, :-length]


def transition_spectrum(
    gs: Sequence[np.ndarray],
    betas: Sequence[np.ndarray],
    keys: Sequence[np.ndarray],
    layers: Sequence[int],
    spans: Sequence[int],
    check_span: int = 16,
    n_checks: int = 4,
) -> dict:
    """Compute per-token ln|det A_t|, eigenvalue histograms, and survival over spans of tokens.

    Args:
        gs, betas: one [B, T, H] array per GDN layer; keys: one [B, T, H, K] array per layer.
        layers: model layer index of each entry.
        spans: span lengths s in tokens; for each, ln|det| of the product over s consecutive
            tokens (averaged over all start positions) and its per-direction survival
            exp(ln|det| / K), the geometric mean of |eigenvalues| of the product.
        check_span, n_checks: length and number of spans per head (evenly spaced over the
            first row) on which explicit [K, K] matrices check the closed form.

    Returns a dict with log_det per token ([L, H, B * T], text order), log_det_mean [L, H],
    eigenvalue histogram (edges, counts [L, H, bins], weights K - 1 and 1), spans (per
    length: log_det and sum_g, [L, H] each, and survival), checks and flags.
    """
    if len(gs) == 0:
        raise ValueError("transition_spectrum needs at least one GDN layer")
    g = np.stack([np.asarray(x, dtype=np.float64) for x in gs])                    # [L, B, T, H]
    beta = np.stack([np.asarray(x, dtype=np.float64) for x in betas])
    k = np.stack([np.asarray(x, dtype=np.float64) for x in keys])                  # [L, B, T, H, K]
    L, B, T, H = g.shape
    K = k.shape[-1]
    key_sq = (k * k).sum(-1)                                                       # [L, B, T, H]

    log_det = log_abs_det(g, beta, K, key_sq)                                      # [L, B, T, H]
    alpha, along_key = transition_eigenvalues(g, beta, key_sq)

    # Histogram of all K eigenvalues per token: alpha with weight K - 1, alpha (1 - beta |k|^2) with weight 1.
    low = min(0.0, float(along_key.min()))
    edges = np.linspace(low, 1.0, N_BINS + 1)
    counts = np.zeros((L, H, N_BINS))
    for i in range(L):
        for h in range(H):
            counts[i, h] = (np.histogram(alpha[i, :, :, h], bins=edges)[0] * (K - 1)
                            + np.histogram(along_key[i, :, :, h], bins=edges)[0])

    span_table = {}
    for s in sorted({int(s) for s in spans if 1 <= int(s) <= T}):
        summed = np.stack([window_sums(log_det[i], s).mean(axis=(0, 1)) for i in range(L)])   # [L, H]
        decay = np.stack([window_sums(g[i], s).mean(axis=(0, 1)) for i in range(L)])
        span_table[str(s)] = {"log_det": summed, "sum_g": decay, "survival": np.exp(summed / K)}

    checks, flags = [], []
    n = min(check_span, T)
    starts = np.linspace(0, T - n, max(1, n_checks)).astype(int)
    for i, layer in enumerate(layers):
        for h in range(H):
            for start in sorted(set(starts.tolist())):
                window = slice(start, start + n)
                check = span_check(g[i, 0, window, h], beta[i, 0, window, h], k[i, 0, window, h])
                checks.append({"layer": layer, "head": h, "start": start, **check})
    worst = max(checks, key=lambda c: c["abs_error"] / max(1.0, abs(c["log_det_closed"])))
    max_error = worst["abs_error"] / max(1.0, abs(worst["log_det_closed"]))
    if max_error > CHECK_TOLERANCE:
        flags.append(f"layer {worst['layer']} head {worst['head']}: closed-form ln|det| over {n} tokens from "
                     f"{worst['start']} is {worst['log_det_closed']:.6g}, explicit matrices give "
                     f"{worst['log_det_explicit']:.6g}; beta is so close to 1 that the floor of 1 - beta at 2^-24 "
                     "applies, or the explicit product lost precision")
    for c in checks:
        if c["spectral_norm"] > c["decay_bound"] * (1 + 1e-9):
            flags.append(f"layer {c['layer']} head {c['head']}: ||product of A_t|| = {c['spectral_norm']:.4g} exceeds "
                         f"prod alpha_t = {c['decay_bound']:.4g} over {n} tokens from {c['start']}; "
                         "beta |k|^2 left [0, 2] and the memory can grow")
            break
    return {
        "layers": list(layers),
        "K": K,
        "log_det": log_det.reshape(L, B * T, H).transpose(0, 2, 1),
        "log_det_mean": log_det.mean(axis=(1, 2)),
        "eigenvalues": {"edges": edges, "counts": counts},
        "spans": span_table,
        "checks": checks,
        "max_check_error": max_error,
        "flags": flags,
    }
