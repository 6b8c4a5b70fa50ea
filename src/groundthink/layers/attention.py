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

    def rotated_qkv(self, x: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Project x [B, T, D] of tokens start .. start + T - 1 and rotate q and k at those positions.

        Returns q, k, v [B, H, T, d].
        """
        B, T, D = x.shape
        H, d = self.n_heads, self.head_dim
        q = self.q_proj(x).view(B, T, H, d)
        k = self.k_proj(x).view(B, T, H, d)
        v = self.v_proj(x).view(B, T, H, d)
        cos, sin = rope_angles(torch.arange(start, start + T, device=x.device), d, self.rope_theta)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def prefill(self, x: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
        """Mix tokens start .. start + T - 1, x [B, T, D], attending also to the cached tokens;
        append their rotated keys and values to the cache."""
        B, T, D = x.shape
        q, k, v = self.rotated_qkv(x, start)
        cache.append(k, v)

        # Query i (position start + i) attends to keys 0 .. start + i.
        if start == 0:
            y = F.scaled_dot_product_attention(q, cache.keys, cache.values, is_causal=True)
        else:
            mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(start)
            y = F.scaled_dot_product_attention(q, cache.keys, cache.values, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, D))                     # y: [B, H, T, d]

    def step(self, x: torch.Tensor, cache: KVCache, position: int) -> torch.Tensor:
        """Mix one token per sequence at absolute `position`, x [B, 1, D]; append its key and value."""
        B, _, D = x.shape
        q, k, v = self.rotated_qkv(x, position)
        cache.append(k, v)
        y = F.scaled_dot_product_attention(q, cache.keys, cache.values)           # [B, H, 1, d]
        return self.o_proj(y.transpose(1, 2).reshape(B, 1, D))
