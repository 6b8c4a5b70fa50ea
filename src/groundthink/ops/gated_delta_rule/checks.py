"""Input validation and dtype handling shared by the gated delta rule kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def check_inputs(q, k, v, g, beta, initial_state, chunk_size: int | None = None) -> None:
    """Raise ValueError naming the argument, the shape received and the shape expected."""
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if q.dim() != 4:
        raise ValueError(f"q must have shape [B, T, H, K], got {tuple(q.shape)} (rank {q.dim()})")
    B, T, H, K = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q, [B, T, H, K] = {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:3] != (B, T, H):
        raise ValueError(f"v must have shape [B, T, H, V] = [{B}, {T}, {H}, V], got {tuple(v.shape)}")
    V = v.shape[-1]
    for name, x in (("g", g), ("beta", beta)):
        if x.shape != (B, T, H):
            raise ValueError(f"{name} must have shape [B, T, H] = {(B, T, H)}, got {tuple(x.shape)}")
    if T < 1:
        raise ValueError(f"sequence length T must be at least 1, got q of shape {tuple(q.shape)}")
    if initial_state is not None:
        if not isinstance(initial_state, torch.Tensor) or not initial_state.is_floating_point():
            raise ValueError("initial_state must be a floating-point torch.Tensor of shape [B, H, K, V]")
        if initial_state.shape != (B, H, K, V):
            raise ValueError(f"initial_state must have shape [B, H, K, V] = {(B, H, K, V)}, "
                             f"got {tuple(initial_state.shape)}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The state dtype: float64 stays float64, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Normalise the last dim to unit L2 norm (eps guards all-zero vectors)."""
    return F.normalize(x, p=2.0, dim=-1, eps=eps)
