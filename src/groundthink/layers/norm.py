"""RMSNorm and the gated RMSNorm of the GDN output."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last dim, computed in at least float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # At least float32 because the mean of squares of bf16 activations loses too many bits.
        x_wide = x.to(torch.promote_types(x.dtype, torch.float32))
        y = x_wide * torch.rsqrt(x_wide.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.to(x_wide.dtype)).to(x.dtype)


class GatedRMSNorm(RMSNorm):
    """RMSNorm(x) * SiLU(gate), the GDN output gate."""

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * F.silu(gate)
