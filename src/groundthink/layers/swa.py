"""Sliding-window attention with a global pathway that reads the GDN memory."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import GroundThinkConfig
from ..generation import SWACache
from .norm import RMSNorm
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
            self.slot_norm = RMSNorm(V, config.norm_eps) if config.slot_norm else None
            self.state_k_proj = nn.Linear(V, self.head_dim, bias=False)
            self.state_v_proj = nn.Linear(V, self.head_dim, bias=False)
            self.gate_proj = nn.Linear(D, H, bias=True)

    def slots(self, memory: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Return the K slots [..., K, V] of memory as the slot maps read them, in dtype."""
        memory = memory.to(dtype)
        # The block-start memory is a strided view of the chunk states, and the norm keeps that
        # layout. One contiguous copy here spares each slot map a copy of its own.
        return memory if self.slot_norm is None else self.slot_norm(memory).contiguous()

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

        memory = self.slots(memory, q.dtype)
        slot_keys = self.state_k_proj(memory)                                      # [B, N, H, K, d]
        slot_values = self.state_v_proj(memory)                                    # [B, N, H, K, d]
        q_blocks = F.pad(q, (0, 0, 0, 0, 0, N * M - T)).view(B, N, M, H, d)
        scores = torch.einsum("bnmhd,bnhkd->bnmhk", q_blocks, slot_keys) * d ** -0.5
        # Softmax in at least float32: bf16 logits over K slots round the weights visibly.
        weights = scores.to(torch.promote_types(scores.dtype, torch.float32)).softmax(dim=-1).to(q.dtype)
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

    def mix(self, x: torch.Tensor, local: torch.Tensor, global_out: torch.Tensor | None) -> torch.Tensor:
        """Mix local and global outputs [B, T, H, d] by the gate of x [B, T, D]; project out.

        Without a global pathway (global_out None) the local output is projected alone.
        """
        B, T, H, d = local.shape
        if global_out is None:
            return self.o_proj(local.reshape(B, T, H * d))
        gate = torch.sigmoid(self.gate_proj(x))                                    # [B, T, H]
        y = gate[..., None] * global_out + (1 - gate[..., None]) * local
        return self.o_proj(y.reshape(B, T, H * d))

    def prefill(
        self,
        x: torch.Tensor,
        cache: SWACache,
        start: int,
        block_memory: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mix tokens start .. start + T - 1, x [B, T, D], continuing from the cache; update the cache.

        block_memory [B, n, H, K, V] contains the combined memories at the absolute block starts
        n * M in [start, start + T). A block that began before `start` reads cache.memory.
        """
        B, T, D = x.shape
        H, d, W, M = self.n_heads, self.head_dim, self.window, self.memory_block

        # Project, split heads and rotate at the absolute positions.
        q = self.q_proj(x).view(B, T, H, d)
        k = self.k_proj(x).view(B, T, H, d)
        v = self.v_proj(x).view(B, T, H, d)
        cos, sin = rope_angles(torch.arange(start, start + T, device=x.device), d, self.config.rope_theta)
        q_rot, k_rot = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        # Local path: the last min(start, W) cached keys go in front, with zero queries whose
        # outputs are dropped, so that each query attends to its full window.
        n_past = min(start, W)
        past = torch.arange(start - n_past, start, device=x.device) % W             # ring slots, oldest first
        k_all = torch.cat([cache.keys[:, past], k_rot], dim=1)                     # [B, n_past + T, H, d]
        v_all = torch.cat([cache.values[:, past], v], dim=1)
        q_all = torch.cat([q_rot.new_zeros(B, n_past, H, d), q_rot], dim=1)
        local = sliding_window_attention(q_all.transpose(1, 2), k_all.transpose(1, 2), v_all.transpose(1, 2), W)
        local = local.transpose(1, 2)[:, n_past:]                                  # [B, T, H, d]

        # Store the last min(T, W) rotated keys and values in their ring slots.
        n_new = min(T, W)
        slots = torch.arange(start + T - n_new, start + T, device=x.device) % W
        cache.keys[:, slots] = k_rot[:, T - n_new:]
        cache.values[:, slots] = v[:, T - n_new:]

        if not self.has_memory:
            return self.mix(x, local, None)

        # Global path: the memories of every block the piece touches. The first one comes from the
        # cache when the piece starts inside a block, and the queries shift to align with the blocks.
        offset = start % M
        n_blocks = (offset + T + M - 1) // M
        memory = block_memory if offset == 0 else torch.cat([cache.memory[:, None], block_memory], dim=1)
        if memory.shape[:3] != (B, n_blocks, H):
            raise ValueError(f"block_memory for tokens {start} .. {start + T - 1} must have shape "
                             f"[{B}, {n_blocks - (offset > 0)}, {H}, K, V], got {tuple(block_memory.shape)}")
        cache.memory = memory[:, -1].to(cache.memory.dtype)
        q_aligned = F.pad(q, (0, 0, 0, 0, offset, 0))                              # [B, offset + T, H, d]
        global_out, _ = self.read_memory(q_aligned, memory)
        return self.mix(x, local, global_out[:, offset:])

    def step(self, x: torch.Tensor, cache: SWACache, position: int) -> torch.Tensor:
        """Mix one token per sequence at absolute `position`, x [B, 1, D]; update the ring buffer.

        The global path reads cache.memory, which the model refreshes at every block start.
        """
        B, _, D = x.shape
        H, d, W = self.n_heads, self.head_dim, self.window

        # Project, split heads and rotate.
        q = self.q_proj(x).view(B, 1, H, d)
        k = self.k_proj(x).view(B, 1, H, d)
        v = self.v_proj(x).view(B, 1, H, d)
        cos, sin = rope_angles(torch.tensor([position], device=x.device), d, self.config.rope_theta)
        q_rot, k_rot = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        # Write the token into its slot, then attend over the filled slots (their order does not
        # matter to softmax attention): slots 0 .. position before the ring wraps, all W after.
        slot = position % W
        cache.keys[:, slot] = k_rot[:, 0]
        cache.values[:, slot] = v[:, 0]
        n_filled = min(position + 1, W)
        keys, values = cache.keys[:, :n_filled], cache.values[:, :n_filled]
        local = F.scaled_dot_product_attention(q_rot.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2))
        local = local.transpose(1, 2)                                              # [B, 1, H, d]

        if not self.has_memory:
            return self.mix(x, local, None)
        return self.mix(x, local, self.read_snapshot(q, cache.memory))

    def read_snapshot(self, q: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """Slot attention of q [B, T, H, d] over one memory [B, H, K, V]; returns [B, T, H, d].

        Same result as read_memory with the projections moved off the K slots:
        scores = (W_k^T q) . m_i and out = W_v (sum_i w_i m_i), so a token costs O(K V + V d)
        per head instead of O(K V d) for projecting every slot.
        """
        d = q.shape[-1]
        memory = self.slots(memory, q.dtype)
        q_slots = q @ self.state_k_proj.weight                                     # [B, T, H, V]
        scores = torch.einsum("bthv,bhkv->bthk", q_slots, memory) * d ** -0.5
        weights = scores.to(torch.promote_types(scores.dtype, torch.float32)).softmax(dim=-1).to(q.dtype)
        mixed = torch.einsum("bthk,bhkv->bthv", weights, memory)                   # [B, T, H, V]
        return self.state_v_proj(mixed)
