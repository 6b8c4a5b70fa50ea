"""Full causal self-attention with RoPE: the `A` layer of Transformer baselines."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import GroundThinkConfig
from ..generation import KVCache
from .rope import apply_rope, rope_angles


class CausalSelfAttention(nn.Module):
    """Multi-head causal softmax attention over all previous positions."""

    def __init__(self, config: GroundThinkConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.head_dim = config.attn_head_dim
        self.rope_theta = config.rope_theta
        D = config.d_model
        self.q_proj = nn.Linear(D, D, bias=False)
        self.k_proj = nn.Linear(D, D, bias=False)
        self.v_proj = nn.Linear(D, D, bias=False)
        self.o_proj = nn.Linear(D, D, bias=False)

    def forward(self, x: torch.Tensor, start_pos: int = 0) -> tuple[torch.Tensor, dict]:
        B, T, D = x.shape
        H, d = self.n_heads, self.head_dim

        # Project, split heads and rotate.
        q = self.q_proj(x).view(B, T, H, d)
        k = self.k_proj(x).view(B, T, H, d)
        v = self.v_proj(x).view(B, T, H, d)
        cos, sin = rope_angles(torch.arange(start_pos, start_pos + T, device=x.device), d, self.rope_theta)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        # Causal attention over every earlier position.
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        y = y.transpose(1, 2).reshape(B, T, D)
        return self.o_proj(y), {"type": "attention"}

    def prefill(self, x: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
        """Mix tokens start .. start + T - 1, x [B, T, D], attending also to the cached tokens;
        append their rotated keys and values to the cache."""
        B, T, D = x.shape
        H, d = self.n_heads, self.head_dim

        # Project, split heads and rotate at the absolute positions.
        q = self.q_proj(x).view(B, T, H, d)
        k = self.k_proj(x).view(B, T, H, d)
        v = self.v_proj(x).view(B, T, H, d)
        cos, sin = rope_angles(torch.arange(start, start + T, device=x.device), d, self.rope_theta)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cache.keys = torch.cat([cache.keys, k], dim=1)                             # [B, start + T, H, d]
        cache.values = torch.cat([cache.values, v], dim=1)

        # Query i (position start + i) sees keys 0 .. start + i.
        keys, values = cache.keys.transpose(1, 2), cache.values.transpose(1, 2)
        if start == 0:
            y = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, is_causal=True)
        else:
            mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(start)
            y = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, D))

    def step(self, x: torch.Tensor, cache: KVCache, position: int) -> torch.Tensor:
        """Mix one token per sequence at absolute `position`, x [B, 1, D]; append its key and value."""
        return self.prefill(x, cache, position)
