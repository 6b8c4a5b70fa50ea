"""Sliding-window attention with a global pathway that reads the GDN memory."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import GroundThinkConfig
from .rope import apply_rope, rope_angles


def window_mask(n_queries: int, n_keys: int, window: int, query_offset: int, device) -> torch.Tensor:
    """Boolean mask [n_queries, n_keys]: query i (at position query_offset + i) sees key j
    (at position j) when 0 <= (query_offset + i) - j < window."""
    query_pos = torch.arange(n_queries, device=device)[:, None] + query_offset
    key_pos = torch.arange(n_keys, device=device)[None, :]
    distance = query_pos - key_pos
    return (distance >= 0) & (distance < window)


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """Causal attention where position t sees keys t-W+1 .. t; memory grows with T * W.

    q, k, v: [B, H, T, d]. Queries are cut into blocks of W; each block attends to its own
    block and the one before, so every score matrix is [W, 2W] instead of [T, T].
    """
    B, H, T, d = q.shape
    W = window
    if T <= W:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    # 1. Pad T to NB * W and cut queries into blocks.
    NB = -(-T // W)
    pad = NB * W - T
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    q_blocks = q.view(B, H, NB, W, d)

    # 2. Keys and values of the previous block and the current one: [B, H, NB, 2W, d].
    k_prev = F.pad(k, (0, 0, W, 0))[:, :, : NB * W].view(B, H, NB, W, d)
    v_prev = F.pad(v, (0, 0, W, 0))[:, :, : NB * W].view(B, H, NB, W, d)
    k_pair = torch.cat([k_prev, k.view(B, H, NB, W, d)], dim=3)
    v_pair = torch.cat([v_prev, v.view(B, H, NB, W, d)], dim=3)

    # 3. The same window mask in every block except the first, whose previous block is padding.
    mask = window_mask(W, 2 * W, W, W, q.device).expand(NB, W, 2 * W).clone()
    mask[0, :, :W] = False
    y = F.scaled_dot_product_attention(q_blocks, k_pair, v_pair, attn_mask=mask)
    return y.reshape(B, H, NB * W, d)[:, :, :T]


class SlidingWindowAttention(nn.Module):
    """SWA mixer: local RoPE attention over W tokens, mixed by a learned per-head gate with
    slot attention over the GDN memory as it stood at the start of the token's memory block.

    Slot attention for head h: the K rows of memory head h (each a V-vector) become keys
    state_k_proj(row) and values state_v_proj(row); the un-rotated query attends over them.
    out_t = gate_t * global_t + (1 - gate_t) * local_t, gate_t = sigmoid(W_gate x_t + b_gate).
    """

    def __init__(self, config: GroundThinkConfig, has_memory: bool):
        super().__init__()
        self.config = config
        self.has_memory = has_memory
        D, H = config.d_model, config.n_heads
        self.n_heads, self.head_dim = H, config.attn_head_dim
        self.window = config.window_size
        self.memory_block = config.memory_block
        self.q_proj = nn.Linear(D, D, bias=False)
        self.k_proj = nn.Linear(D, D, bias=False)
        self.v_proj = nn.Linear(D, D, bias=False)
        self.o_proj = nn.Linear(D, D, bias=False)
        if has_memory:
            V = config.value_dim
            self.state_k_proj = nn.Linear(V, self.head_dim, bias=False)
            self.state_v_proj = nn.Linear(V, self.head_dim, bias=False)
            self.gate_proj = nn.Linear(D, H, bias=True)

    @torch.no_grad()
    def reset_gates(self) -> None:
        if self.has_memory:
            self.gate_proj.bias.fill_(self.config.global_gate_bias)

    def read_memory(self, q: torch.Tensor, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Slot attention of q [B, T, H, d] over memory [B, N, H, K, V], position t reading block t // M.

        Returns (global_out [B, T, H, d], slot_weights [B, T, H, K]).
        """
        B, T, H, d = q.shape
        N, M = memory.shape[1], self.memory_block

        slot_keys = self.state_k_proj(memory.to(q.dtype))                         # [B, N, H, K, d]
        slot_values = self.state_v_proj(memory.to(q.dtype))                       # [B, N, H, K, d]
        q_blocks = F.pad(q, (0, 0, 0, 0, 0, N * M - T)).view(B, N, M, H, d)
        scores = torch.einsum("bnmhd,bnhkd->bnmhk", q_blocks, slot_keys) * d ** -0.5
        weights = scores.float().softmax(dim=-1).to(q.dtype)                       # [B, N, M, H, K]
        out = torch.einsum("bnmhk,bnhkd->bnmhd", weights, slot_values)
        return out.reshape(B, N * M, H, d)[:, :T], weights.reshape(B, N * M, H, -1)[:, :T]

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor | None = None,
        return_internals: bool = False,
    ) -> tuple[torch.Tensor, dict]:
        """Mix x [B, T, D]; memory [B, ceil(T / M), H, K, V] holds the block-start memories."""
        B, T, D = x.shape
        H, d = self.n_heads, self.head_dim

        # Project and split heads.
        q = self.q_proj(x).view(B, T, H, d)
        k = self.k_proj(x).view(B, T, H, d)
        v = self.v_proj(x).view(B, T, H, d)

        # Local path: RoPE attention over the last W positions.
        cos, sin = rope_angles(torch.arange(T, device=x.device), d, self.config.rope_theta)
        q_rot, k_rot = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        local = sliding_window_attention(q_rot.transpose(1, 2), k_rot.transpose(1, 2), v.transpose(1, 2), self.window)
        local = local.transpose(1, 2)                                              # [B, T, H, d]

        info: dict = {"type": "swa", "memory": None, "slot_weights": None, "gate": None}
        if not self.has_memory:
            return self.o_proj(local.reshape(B, T, D)), info
        if memory is None or memory.shape[:3] != (B, -(-T // self.memory_block), H):
            raise ValueError(f"SWA layer with a global pathway needs memory [B, ceil(T/M), H, K, V] = "
                             f"[{B}, {-(-T // self.memory_block)}, {H}, K, V], got "
                             f"{None if memory is None else tuple(memory.shape)}")

        # Global path: slot attention over the block-start memory, mixed in by the gate.
        global_out, slot_weights = self.read_memory(q, memory)
        gate = torch.sigmoid(self.gate_proj(x))                                    # [B, T, H]
        y = gate[..., None] * global_out + (1 - gate[..., None]) * local
        if return_internals:
            info.update(memory=memory, slot_weights=slot_weights, gate=gate)
        return self.o_proj(y.reshape(B, T, D)), info
