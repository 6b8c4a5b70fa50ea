"""The GroundThink language model: a stack of G / S / A blocks from a pattern string."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import GroundThinkConfig
from .generation import DecodingCache, check_sampling, empty_cache, sample_next_token
from .layers import CausalSelfAttention, GatedDeltaNet, RMSNorm, SlidingWindowAttention, SwiGLU


@dataclass
class LMOutput:
    """Output of GroundThinkLM.forward."""

    logits: torch.Tensor
    """[B, T, vocab_size]."""
    loss: torch.Tensor | None = None
    """Mean cross-entropy of logits[:, t] against labels[:, t] over labels != -100."""
    internals: list[dict] | None = None
    """One dict per layer when return_internals=True (see GroundThinkLM.forward)."""


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(RMSNorm(x)), then x + SwiGLU(RMSNorm(x))."""

    def __init__(self, config: GroundThinkConfig, layer_type: str, has_memory: bool):
        super().__init__()
        self.layer_type = layer_type
        self.mixer_norm = RMSNorm(config.d_model, eps=config.norm_eps)
        if layer_type == "gdn":
            self.mixer = GatedDeltaNet(config)
        elif layer_type == "swa":
            self.mixer = SlidingWindowAttention(config, has_memory=has_memory)
        else:
            self.mixer = CausalSelfAttention(config)
        self.ffn_norm = RMSNorm(config.d_model, eps=config.norm_eps)
        self.ffn = SwiGLU(config.d_model, config.ffn_hidden)

    def forward(self, x: torch.Tensor, **mixer_kwargs) -> tuple[torch.Tensor, dict]:
        y, info = self.mixer(self.mixer_norm(x), **mixer_kwargs)
        x = x + y
        x = x + self.ffn(self.ffn_norm(x))
        return x, info


class GroundThinkLM(nn.Module):
    """Hybrid GDN / SWA / attention language model with a causal global memory pathway.

    SWA layers read the block-start memories of the GDN layers below them, combined by
    config.state_accumulation; every GDN layer starts from a zero state, so no position
    sees memory written at or after the start of its own memory block.
    """

    def __init__(self, config: GroundThinkConfig):
        super().__init__()
        config.validate()
        self.config = config
        types = config.layer_types

        # An SWA layer has a global pathway only when some GDN layer lies below it, and a GDN
        # layer's block states are needed only when some SWA layer lies above it.
        self.blocks = nn.ModuleList()
        for i, layer_type in enumerate(types):
            has_memory = layer_type == "swa" and "gdn" in types[:i]
            self.blocks.append(Block(config, layer_type, has_memory))
        self.feeds_memory = [t == "gdn" and "swa" in types[i + 1:] for i, t in enumerate(types)]

        # Learned mixing weights of the weighted accumulation, one per GDN layer after the first
        # that feeds the memory: w = sigmoid(logit), initialised to state_weight_new.
        self.memory_mix_logits = nn.ParameterDict()
        if config.state_accumulation == "weighted":
            feeding = [i for i, feeds in enumerate(self.feeds_memory) if feeds]
            for i in feeding[1:]:
                self.memory_mix_logits[str(i)] = nn.Parameter(torch.zeros(()))

        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.final_norm = RMSNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter: normal(0, init_std) for matrices, output projections
        scaled by 1 / sqrt(2 * n_layers) (GPT-2), norms to one, gates from the config."""
        c = self.config
        out_std = c.init_std / math.sqrt(2 * c.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                std = out_std if name.endswith(("o_proj", "down_proj")) else c.init_std
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Conv1d):
                # Depthwise kernels of width conv_size: uniform(+-1/sqrt(conv_size)) as PyTorch's default.
                bound = 1.0 / math.sqrt(module.kernel_size[0])
                nn.init.uniform_(module.weight, -bound, bound)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        for block in self.blocks:
            if hasattr(block.mixer, "reset_gates"):
                block.mixer.reset_gates()
        logit = math.log(c.state_weight_new / (1 - c.state_weight_new))
        for parameter in self.memory_mix_logits.values():
            parameter.fill_(logit)

    def check_input_ids(self, input_ids: torch.Tensor) -> None:
        """Raise ValueError for input ids that are not a [B, T] integer tensor inside the vocabulary."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a [B, T] tensor of token ids, got {shape}")
        if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}")
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids is empty (T = 0); pass at least one token")
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= self.config.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size}); "
                             "tokenize with the model's tokenizer or raise vocab_size")

    def combine_memory(self, memory: torch.Tensor | None, new: torch.Tensor, layer: int, n_seen: int) -> torch.Tensor:
        """Fold the block states `new` of GDN layer `layer` (the n_seen-th feeding one) into memory."""
        mode = self.config.state_accumulation
        if memory is None or mode == "replace":
            return new
        if mode == "mean":
            return memory + (new - memory) / n_seen
        w = torch.sigmoid(self.memory_mix_logits[str(layer)])
        return (1 - w) * memory + w * new

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        return_internals: bool = False,
    ) -> LMOutput:
        """Run the model on input_ids [B, T].

        labels [B, T] are the targets of each position (already shifted by the caller), -100 to
        ignore. With return_internals, `internals[i]` describes layer i:
          every layer: 'type' ('gdn' | 'swa' | 'attention'), 'hidden' [B, T, D] after the block;
          gdn: 'beta' [B, T, H], 'g' [B, T, H] (log decay), 'q', 'k' [B, T, H, K] (unit norm),
               'v' [B, T, H, V], 'final_state' [B, H, K, V], and 'block_states'
               [B, ceil(T / M), H, K, V] (state before tokens n * M) when an SWA layer reads it;
          swa: 'memory' [B, ceil(T / M), H, K, V] (combined memory read per block),
               'slot_weights' [B, T, H, K], 'gate' [B, T, H] (weight of the global path),
               all None when no GDN layer lies below.
        """
        self.check_input_ids(input_ids)
        x = self.embed(input_ids)                                                  # [B, T, D]

        internals: list[dict] = []
        memory, n_feeding = None, 0
        for i, block in enumerate(self.blocks):
            if block.layer_type == "gdn":
                block_size = self.config.memory_block if self.feeds_memory[i] else None
                x, info = block(x, memory_block=block_size, return_internals=return_internals)
                if self.feeds_memory[i]:
                    n_feeding += 1
                    memory = self.combine_memory(memory, info["block_states"], i, n_feeding)
            elif block.layer_type == "swa":
                x, info = block(x, memory=memory, return_internals=return_internals)
            else:
                x, info = block(x)
            if return_internals:
                info["hidden"] = x
                internals.append(info)

        logits = self.lm_head(self.final_norm(x))                                  # [B, T, vocab]
        loss = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, "
                                 f"got {tuple(labels.shape)}")
            wide = torch.promote_types(logits.dtype, torch.float32)
            loss = F.cross_entropy(logits.to(wide).flatten(0, 1), labels.flatten(), ignore_index=-100)
        return LMOutput(logits=logits, loss=loss, internals=internals if return_internals else None)

    # ------------------------------------------------------------------ decoding
    def new_cache(self, batch: int) -> DecodingCache:
        """Build an empty decoding cache for `batch` sequences, on the model's device and dtype."""
        weight = self.embed.weight
        has_memory = [block.layer_type == "swa" and block.mixer.has_memory for block in self.blocks]
        return empty_cache(self.config, self.config.layer_types, has_memory, batch, weight.device, weight.dtype)

    def check_cache(self, cache: DecodingCache, batch: int) -> None:
        """Raise ValueError when a cache does not belong to this model or this batch size."""
        if not isinstance(cache, DecodingCache) or len(cache.layers) != len(self.blocks):
            raise ValueError("cache must be a DecodingCache from this model's new_cache or prefill, "
                             f"got {type(cache).__name__}")
        if cache.batch_size != batch:
            raise ValueError(f"cache holds {cache.batch_size} sequences but {batch} were passed; "
                             "start a new cache with model.new_cache(batch) for a different batch size")

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, cache: DecodingCache | None = None) -> tuple[torch.Tensor, DecodingCache]:
        """Run input_ids [B, T] in parallel, continuing from `cache` (None starts a new one).

        Returns (logits [B, T, vocab], cache); the cache is updated in place and holds the
        state after all tokens so far. Any split of a sequence into prefill pieces and steps
        gives the logits of one forward pass over it. No gradients are recorded.
        """
        self.check_input_ids(input_ids)
        B, T = input_ids.shape
        cache = self.new_cache(B) if cache is None else cache
        self.check_cache(cache, B)
        start = cache.position
        x = self.embed(input_ids)                                                  # [B, T, D]

        # block_memory [B, n, H, K, V]: the combined memory at each block start in start .. start + T - 1.
        block_memory, n_feeding = None, 0
        for i, (block, layer_cache) in enumerate(zip(self.blocks, cache.layers)):
            h = block.mixer_norm(x)
            if block.layer_type == "gdn":
                block_size = self.config.memory_block if self.feeds_memory[i] else None
                y, block_states = block.mixer.prefill(h, layer_cache, start, block_size)
                if self.feeds_memory[i]:
                    n_feeding += 1
                    block_memory = self.combine_memory(block_memory, block_states, i, n_feeding)
            elif block.layer_type == "swa":
                y = block.mixer.prefill(h, layer_cache, start, block_memory)
            else:
                y = block.mixer.prefill(h, layer_cache, start)
            x = x + y
            x = x + block.ffn(block.ffn_norm(x))

        cache.position = start + T
        return self.lm_head(self.final_norm(x)), cache                             # [B, T, vocab]

    @torch.no_grad()
    def step(self, token_ids: torch.Tensor, cache: DecodingCache) -> torch.Tensor:
        """Feed one token per sequence, token_ids [B] (or [B, 1]); return logits [B, vocab].

        The cache is updated in place. At a block start (position % M == 0) every SWA layer's
        memory snapshot is refreshed from the GDN states before this token. No gradients.
        """
        if isinstance(token_ids, torch.Tensor) and token_ids.dim() == 1:
            token_ids = token_ids[:, None]
        self.check_input_ids(token_ids)
        if token_ids.shape[1] != 1:
            raise ValueError(f"step takes one token per sequence, got token_ids of shape {tuple(token_ids.shape)}; "
                             "use prefill for several tokens")
        B = token_ids.shape[0]
        self.check_cache(cache, B)
        position = cache.position
        new_block = position % self.config.memory_block == 0
        x = self.embed(token_ids)                                                  # [B, 1, D]

        memory, n_feeding = None, 0
        for i, (block, layer_cache) in enumerate(zip(self.blocks, cache.layers)):
            h = block.mixer_norm(x)
            if block.layer_type == "gdn":
                if self.feeds_memory[i] and new_block:
                    n_feeding += 1
                    memory = self.combine_memory(memory, layer_cache.S, i, n_feeding)
                y = block.mixer.step(h, layer_cache)
            elif block.layer_type == "swa":
                if block.mixer.has_memory and new_block:
                    layer_cache.memory = memory.to(layer_cache.memory.dtype)
                y = block.mixer.step(h, layer_cache, position)
            else:
                y = block.mixer.step(h, layer_cache, position)
            x = x + y
            x = x + block.ffn(block.ffn_norm(x))

        cache.position = position + 1
        return self.lm_head(self.final_norm(x))[:, 0]                              # [B, vocab]

    def generate_stream(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
    ) -> Iterator[torch.Tensor]:
        """Return an iterator over max_new_tokens new token ids, one LongTensor [B] at a time,
        that follow the prompt input_ids [B, T].

        The prompt runs through prefill, every new token through step. Sampling as in
        generation.sample_next_token (temperature 0 is greedy); `seed` fixes the draws.
        Invalid arguments raise ValueError here, before the first token is computed.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"invalid max_new_tokens={max_new_tokens!r}: must be an integer >= 0")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"invalid seed={seed!r}: must be an integer, or None for unseeded draws")
        check_sampling(temperature, top_k, top_p)
        self.check_input_ids(input_ids)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=input_ids.device)
            generator.manual_seed(seed)
        return self._sample_tokens(input_ids, max_new_tokens, temperature, top_k, top_p, generator)

    @torch.no_grad()
    def _sample_tokens(self, input_ids, max_new_tokens, temperature, top_k, top_p, generator) -> Iterator[torch.Tensor]:
        if max_new_tokens == 0:
            return
        logits, cache = self.prefill(input_ids)
        token = sample_next_token(logits[:, -1], temperature, top_k, top_p, generator)
        yield token
        for _ in range(max_new_tokens - 1):
            logits = self.step(token, cache)
            token = sample_next_token(logits, temperature, top_k, top_p, generator)
            yield token

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
    ) -> torch.Tensor:
        """Generate max_new_tokens tokens after the prompt input_ids [B, T]; returns only the new
        ids, LongTensor [B, max_new_tokens]. Arguments as in generate_stream."""
        tokens = list(self.generate_stream(input_ids, max_new_tokens, temperature, top_k, top_p, seed))
        if not tokens:
            return input_ids.new_zeros(input_ids.shape[0], 0, dtype=torch.long)
        return torch.stack(tokens, dim=1)

    # ------------------------------------------------------------------ accounting
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def parameter_counts(self) -> dict[str, int]:
        """Parameters by component: embedding, gdn, swa, attention, ffn, norms, lm_head, total.

        Norms inside a mixer count with the mixer; 'norms' are the block and final RMSNorms.
        memory_mix_logits count with gdn. A tied LM head counts 0.
        """
        counts = {"embedding": self.embed.weight.numel(), "gdn": 0, "swa": 0, "attention": 0,
                  "ffn": 0, "norms": self.final_norm.weight.numel(), "lm_head": 0}
        for block in self.blocks:
            counts[block.layer_type] += sum(p.numel() for p in block.mixer.parameters())
            counts["ffn"] += sum(p.numel() for p in block.ffn.parameters())
            counts["norms"] += block.mixer_norm.weight.numel() + block.ffn_norm.weight.numel()
        counts["gdn"] += sum(p.numel() for p in self.memory_mix_logits.values())
        if not self.config.tie_embeddings:
            counts["lm_head"] = self.lm_head.weight.numel()
        counts["total"] = sum(counts.values())
        return counts

    def state_bytes(self, batch: int = 1, dtype: torch.dtype = torch.float32, context: int = 0) -> dict[str, int]:
        """Bytes a decoding run holds per component after `context` tokens.

        gdn: recurrent state [B, H, K, V] in float32 (float64 when dtype is float64) plus the
        short-conv tails [B, conv_size - 1, H * (2K + V)] in dtype; swa: ring buffer of the last W
        rotated keys and values [B, W, 2D] in dtype plus, for layers with a global pathway, the
        memory snapshot [B, H, K, V] in the state's dtype; attention: keys and values of all
        `context` tokens [B, context, 2D]. Equals `prefill(...)[1].nbytes_by_component()` after
        `context` tokens (generation.DecodingCache).
        """
        c = self.config
        item = torch.empty((), dtype=dtype).element_size()
        state_item = 8 if dtype == torch.float64 else 4
        H, K, V, D = c.n_heads, c.head_dim, c.value_dim, c.d_model
        out = {"gdn": 0, "swa": 0, "attention": 0}
        for block in self.blocks:
            if block.layer_type == "gdn":
                out["gdn"] += batch * H * K * V * state_item
                if c.use_short_conv:
                    out["gdn"] += batch * (c.conv_size - 1) * H * (2 * K + V) * item
            elif block.layer_type == "swa":
                out["swa"] += batch * c.window_size * 2 * D * item
                if block.mixer.has_memory:
                    out["swa"] += batch * H * K * V * state_item
            else:
                out["attention"] += batch * context * 2 * D * item
        out["total"] = sum(out.values())
        return out
