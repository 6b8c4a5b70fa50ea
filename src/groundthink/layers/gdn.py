"""Gated DeltaNet layer: projections, short convolution, gates, kernel, gated norm."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import GroundThinkConfig
from ..generation import GDNCache
from ..ops import gated_delta_rule, resolve_backend
from ..ops.gated_delta_rule import chunk_gated_delta_rule, recurrent_gated_delta_rule
from ..ops.gated_delta_rule.checks import accumulation_dtype, l2norm
from .norm import GatedRMSNorm, RMSNorm


class ShortConv(nn.Module):
    """Causal depthwise convolution of width `conv_size` over time, then SiLU."""

    def __init__(self, channels: int, conv_size: int):
        super().__init__()
        self.conv_size = conv_size
        self.conv = nn.Conv1d(channels, channels, conv_size, groups=channels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, T, channels]; left padding makes output t depend on inputs t-conv_size+1 .. t.
        y = self.conv(F.pad(x.transpose(1, 2), (self.conv_size - 1, 0)))
        return F.silu(y.transpose(1, 2))

    def forward_with_tail(self, x: torch.Tensor, tail: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Convolve x [B, T, channels] that follows the inputs `tail` [B, conv_size - 1, channels].

        Returns (output [B, T, channels], the new tail: the last conv_size - 1 inputs). A zero
        tail gives the same output as forward, whose left padding is zeros.
        """
        window = torch.cat([tail, x], dim=1)                                        # [B, conv_size - 1 + T, channels]
        y = self.conv(window.transpose(1, 2))
        return F.silu(y.transpose(1, 2)), window[:, window.shape[1] - tail.shape[1]:]

    def step(self, x: torch.Tensor, tail: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Convolve one token x [B, 1, channels] after `tail`; returns (output [B, 1, channels], new tail).

        A weighted sum over the conv_size inputs, because conv1d on one output position costs
        about ten times as much on CPU.
        """
        window = torch.cat([tail, x], dim=1)                                        # [B, conv_size, channels]
        y = (window * self.conv.weight[:, 0].t()).sum(dim=1, keepdim=True)
        return F.silu(y), window[:, 1:]


class GatedDeltaNet(nn.Module):
    """GDN mixer writing a [H, K, V] memory per sequence with the gated delta rule.

    beta = sigmoid(W_b x + beta_bias), g = -exp(A_log) * softplus(W_a x + dt_bias),
    q and k L2-normalised per head, output W_o(RMSNorm(o) * SiLU(W_gate x)).
    """

    def __init__(self, config: GroundThinkConfig):
        super().__init__()
        self.config = config
        D, H, K, V = config.d_model, config.n_heads, config.head_dim, config.value_dim
        self.n_heads, self.head_dim, self.value_dim = H, K, V

        self.q_proj = nn.Linear(D, H * K, bias=False)
        self.k_proj = nn.Linear(D, H * K, bias=False)
        self.v_proj = nn.Linear(D, H * V, bias=False)
        self.b_proj = nn.Linear(D, H, bias=True)
        self.a_proj = nn.Linear(D, H, bias=False)
        self.A_log = nn.Parameter(torch.zeros(H))
        self.dt_bias = nn.Parameter(torch.zeros(H))
        if config.use_short_conv:
            self.q_conv = ShortConv(H * K, config.conv_size)
            self.k_conv = ShortConv(H * K, config.conv_size)
            self.v_conv = ShortConv(H * V, config.conv_size)
        if config.use_output_gate:
            self.g_proj = nn.Linear(D, H * V, bias=False)
            self.o_norm = GatedRMSNorm(V, eps=config.norm_eps)
        else:
            self.o_norm = RMSNorm(V, eps=config.norm_eps)
        self.o_proj = nn.Linear(H * V, D, bias=False)

    @torch.no_grad()
    def reset_gates(self) -> None:
        """Initialise beta bias, A_log and dt_bias from the config's ranges."""
        c = self.config
        H = self.n_heads
        self.b_proj.bias.fill_(c.beta_bias)
        self.A_log.copy_(torch.empty(H).uniform_(c.decay_a_min, c.decay_a_max).log())
        # dt = softplus(dt_bias) is log-uniform in [dt_min, dt_max]; inverse softplus: dt + log(1 - exp(-dt)).
        dt = torch.exp(torch.empty(H).uniform_(math.log(c.dt_min), math.log(c.dt_max)))
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return beta [B, T, H] and the log decay g [B, T, H], both in at least float32."""
        # At least float32 because softplus and exp of bf16 logits put g off by whole percents.
        wide = torch.promote_types(x.dtype, torch.float32)
        beta = torch.sigmoid(self.b_proj(x).to(wide))
        g = -self.A_log.to(wide).exp() * F.softplus(self.a_proj(x).to(wide) + self.dt_bias.to(wide))
        return beta, g

    def forward(
        self,
        x: torch.Tensor,
        memory_block: int | None = None,
        return_internals: bool = False,
    ) -> tuple[torch.Tensor, dict]:
        """Mix x [B, T, D]; with memory_block M also return the state at every multiple of M.

        Returns (y [B, T, D], info) where info has 'block_states' [B, ceil(T / M), H, K, V]
        (float32) when memory_block is given, plus beta, g, q, k, v and the final state
        when return_internals is set.
        """
        B, T, _ = x.shape
        H, K, V = self.n_heads, self.head_dim, self.value_dim

        # Project, short conv, split heads.
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.config.use_short_conv:
            q, k, v = self.q_conv(q), self.k_conv(k), self.v_conv(v)
        q = l2norm(q.view(B, T, H, K))
        k = l2norm(k.view(B, T, H, K))
        v = v.view(B, T, H, V)

        # Write strength and decay.
        beta, g = self.gates(x)

        # Gated delta rule over the sequence from a zero state.
        info: dict = {"type": "gdn"}
        if memory_block is None:
            o, S = gated_delta_rule(q, k, v, g, beta, output_final_state=return_internals,
                                    chunk_size=self.config.chunk_size, backend=self.config.backend)
        else:
            o, S, block_states = self.block_kernel(q, k, v, g, beta, memory_block)
            info["block_states"] = block_states

        # Gated RMSNorm per head, merge heads, project out.
        y = self.output(o, x)

        if return_internals:
            info.update(beta=beta, g=g, q=q, k=k, v=v, final_state=S)
        return y, info

    def output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Gated RMSNorm of o [B, T, H, V] per head, merge heads, project out to [B, T, D]."""
        B, T, H, V = o.shape
        if self.config.use_output_gate:
            o = self.o_norm(o, self.g_proj(x).view(B, T, H, V))
        else:
            o = self.o_norm(o)
        return self.o_proj(o.reshape(B, T, H * V))

    def block_kernel(self, q, k, v, g, beta, memory_block: int, initial_state=None, start: int = 0):
        """Run the kernel on tokens start .. start + T - 1 from initial_state (None for zeros).

        Returns (o, final_state, block_states [B, n, H, K, V]): the states before every absolute
        position n * M in [start, start + T), i.e. ceil(T / M) of them when start = 0.
        """
        B, T, H, K = q.shape
        M = memory_block
        backend, _ = resolve_backend(self.config.backend, q.device)
        if backend == "torch":
            # The chunk kernel returns states at multiples of C from its first token. So the tokens
            # up to the next absolute multiple of C run first as a head, which contains no block start.
            C = self.config.chunk_size
            head = min(T, (-start) % C)
            S, outputs = initial_state, []
            if head:
                o, S = chunk_gated_delta_rule(q[:, :head], k[:, :head], v[:, :head], g[:, :head], beta[:, :head],
                                              initial_state=S, output_final_state=True, chunk_size=C)
                outputs.append(o)
            if head == T:
                no_states = q.new_zeros(B, 0, H, K, v.shape[-1], dtype=accumulation_dtype(v.dtype))
                return outputs[0], S, no_states
            rest = slice(head, T)
            o, S, chunk_states = chunk_gated_delta_rule(q[:, rest], k[:, rest], v[:, rest], g[:, rest], beta[:, rest],
                                                        initial_state=S, output_final_state=True,
                                                        chunk_size=C, output_chunk_states=True)
            outputs.append(o)
            first_block = ((-(start + head)) % M) // C                             # first chunk that starts a block
            o = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
            return o, S, chunk_states[:, first_block:: M // C]

        # NOTE: the fla kernel returns no chunk states, so the sequence goes through it one memory
        # block at a time, chaining final states. This path has not been run on a GPU in the tests.
        S = initial_state
        if S is None:
            S = q.new_zeros(B, H, K, v.shape[-1], dtype=torch.float32)
        outputs, states = [], []
        position = start
        while position < start + T:
            end = min(start + T, (position // M + 1) * M)
            block = slice(position - start, end - start)
            if position % M == 0:
                states.append(S)
            o, S = gated_delta_rule(q[:, block], k[:, block], v[:, block], g[:, block], beta[:, block],
                                    initial_state=S, output_final_state=True, backend=backend)
            outputs.append(o)
            position = end
        if not states:
            return torch.cat(outputs, dim=1), S, S.new_zeros(B, 0, *S.shape[1:])
        return torch.cat(outputs, dim=1), S, torch.stack(states, dim=1)

    def project(self, x: torch.Tensor, cache: GDNCache, one_token: bool):
        """Project x [B, T, D] and run the short convolutions from the cached tails (with
        ShortConv.step when one_token, T = 1).

        Returns q, k [B, T, H, K] (unit norm), v [B, T, H, V], beta, g [B, T, H]; updates the tails.
        """
        B, T, _ = x.shape
        H, K, V = self.n_heads, self.head_dim, self.value_dim
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.config.use_short_conv:
            convolve = ShortConv.step if one_token else ShortConv.forward_with_tail
            q, cache.q_tail = convolve(self.q_conv, q, cache.q_tail)
            k, cache.k_tail = convolve(self.k_conv, k, cache.k_tail)
            v, cache.v_tail = convolve(self.v_conv, v, cache.v_tail)
        q = l2norm(q.view(B, T, H, K))
        k = l2norm(k.view(B, T, H, K))
        v = v.view(B, T, H, V)
        beta, g = self.gates(x)
        return q, k, v, beta, g

    def prefill(
        self,
        x: torch.Tensor,
        cache: GDNCache,
        start: int,
        memory_block: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mix tokens start .. start + T - 1, x [B, T, D], continuing from the cache; update the cache.

        Returns (y [B, T, D], block_states). With memory_block M, block_states [B, n, H, K, V]
        are the states before every absolute position n * M in [start, start + T), otherwise None.
        """
        q, k, v, beta, g = self.project(x, cache, one_token=False)

        if memory_block is None:
            o, S = gated_delta_rule(q, k, v, g, beta, initial_state=cache.S, output_final_state=True,
                                    chunk_size=self.config.chunk_size, backend=self.config.backend)
            block_states = None
        else:
            o, S, block_states = self.block_kernel(q, k, v, g, beta, memory_block, cache.S, start)
        cache.S = S.to(cache.S.dtype)

        return self.output(o, x), block_states

    def step(self, x: torch.Tensor, cache: GDNCache) -> torch.Tensor:
        """Mix one token per sequence, x [B, 1, D], with the recurrent kernel; update the cache.

        The state stays in the cache's dtype (float32 for a bf16 model) between steps.
        """
        q, k, v, beta, g = self.project(x, cache, one_token=True)
        o, S = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=cache.S, output_final_state=True)
        cache.S = S.to(cache.S.dtype)
        return self.output(o, x)
