"""Small statistics shared by the probes: ranks, Spearman correlation, quantiles, entropies."""

from __future__ import annotations

import math

import numpy as np

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 0 .. n-1 of a 1-D array, ties given the mean of their ranks."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    return np.bincount(inverse, weights=ranks)[inverse] / counts[inverse]


def spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman rank correlation of two 1-D arrays; None when either is constant or n < 3."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 3:
        return None
    rx, ry = rankdata(x), rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    if denominator == 0.0:
        return None
    return float((rx * ry).sum() / denominator)


def quantiles(x: np.ndarray) -> dict[str, float]:
    """Return the 10th, 25th, 50th, 75th and 90th percentiles of x as p10 .. p90.

    Each is an element of x (the lower order statistic, no interpolation), so infinite
    half-lives pass through without turning into NaN.
    """
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    values = np.quantile(x, QUANTILES, method="lower") if len(x) else [float("nan")] * len(QUANTILES)
    return {f"p{round(q * 100)}": float(v) for q, v in zip(QUANTILES, values)}


def entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy -sum p ln p in nats along `axis`, with 0 ln 0 = 0."""
    p = np.asarray(p, dtype=np.float64)
    terms = np.where(p > 0, -p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return terms.sum(axis=axis)


def mean_abs_cos_random(dim: int) -> float:
    """E|cos| between two independent uniform random unit vectors in `dim` dimensions.

    E|u_1| for u uniform on the unit sphere is Gamma(d / 2) / (sqrt(pi) Gamma((d + 1) / 2)),
    about sqrt(2 / (pi d)) for large d.
    """
    return math.exp(math.lgamma(dim / 2) - math.lgamma((dim + 1) / 2)) / math.sqrt(math.pi)
