"""Decoding caches and token sampling for incremental generation.

A `DecodingCache` contains one cache per layer. Its size does not grow with the
context for G and S layers:

- `GDNCache`: the last `conv_size - 1` inputs of each short convolution and the
  recurrent state `S [B, H, K, V]` (float32, or float64 for a float64 model).
- `SWACache`: a ring buffer of the last `W` rotated keys and values, token `p` in
  slot `p % W`, plus the combined GDN memory that the current memory block reads.
- `KVCache`: the rotated keys and values of every token so far (`A` layers), in buffers
  that double their capacity when full.

`GroundThinkLM.prefill`, `GroundThinkLM.step` and `GroundThinkLM.generate` fill and read
these caches; this module imports nothing from the model so the layers can use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .ops.gated_delta_rule.checks import accumulation_dtype


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    """Total bytes of the given tensors; None counts zero."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass
class GDNCache:
    """Decoding state of one GDN layer."""

    S: torch.Tensor
    """Recurrent state [B, H, K, V] after every token so far, in the accumulation dtype."""
    q_tail: torch.Tensor | None
    """Last conv_size - 1 inputs of the q short convolution [B, conv_size - 1, H * K], zeros
    before the first token; None without short convolutions."""
    k_tail: torch.Tensor | None
    """Same for k: [B, conv_size - 1, H * K]."""
    v_tail: torch.Tensor | None
    """Same for v: [B, conv_size - 1, H * V]."""

    def nbytes(self) -> int:
        return tensor_bytes(self.S, self.q_tail, self.k_tail, self.v_tail)


@dataclass
class SWACache:
    """Decoding state of one sliding-window attention layer."""

    keys: torch.Tensor
    """Ring buffer of rotated keys [B, W, H, d]; the key of token p sits in slot p % W."""
    values: torch.Tensor
    """Ring buffer of values [B, W, H, d], same slots as keys."""
    memory: torch.Tensor | None
    """Combined GDN memory [B, H, K, V] read by the current memory block (the state of the GDN
    layers below after all tokens before the block start); None without a global pathway."""

    def nbytes(self) -> int:
        return tensor_bytes(self.keys, self.values, self.memory)


@dataclass
class KVCache:
    """Decoding state of one full attention layer: grows by one key and value per token.

    The buffers double their capacity when full, so appending a token copies the cache only
    O(log T) times over T tokens instead of at every step.
    """

    key_buffer: torch.Tensor
    """Rotated keys [B, H, capacity, d]; the first `length` positions are filled."""
    value_buffer: torch.Tensor
    """Values [B, H, capacity, d], same positions as key_buffer."""
    length: int = 0
    """Number of tokens stored."""

    @property
    def keys(self) -> torch.Tensor:
        """Rotated keys of every token so far [B, H, T, d] (a view of the buffer)."""
        return self.key_buffer[:, :, :self.length]

    @property
    def values(self) -> torch.Tensor:
        """Values of every token so far [B, H, T, d] (a view of the buffer)."""
        return self.value_buffer[:, :, :self.length]

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store the rotated keys and values [B, H, T, d] of the next T tokens."""
        end = self.length + keys.shape[2]
        capacity = self.key_buffer.shape[2]
        if end > capacity:
            capacity = max(end, 2 * capacity)
            self.key_buffer = self.grow(self.key_buffer, capacity)
            self.value_buffer = self.grow(self.value_buffer, capacity)
        self.key_buffer[:, :, self.length:end] = keys
        self.value_buffer[:, :, self.length:end] = values
        self.length = end

    def grow(self, buffer: torch.Tensor, capacity: int) -> torch.Tensor:
        """Copy the filled part of a buffer into a new one with room for `capacity` tokens."""
        B, H, _, d = buffer.shape
        grown = buffer.new_empty(B, H, capacity, d)
        grown[:, :, :self.length] = buffer[:, :, :self.length]
        return grown

    def nbytes(self) -> int:
        """Bytes of the stored keys and values.

        NOTE: the buffers reserve up to twice this (their capacity doubles when full), and
        that reserve is not counted here nor in GroundThinkLM.state_bytes.
        """
        return tensor_bytes(self.keys, self.values)


LayerCache = GDNCache | SWACache | KVCache
COMPONENTS = {GDNCache: "gdn", SWACache: "swa", KVCache: "attention"}


@dataclass
class DecodingCache:
    """Per-layer decoding state of a batch of sequences that all stand at the same position."""

    layers: list[LayerCache]
    """One cache per layer, in layer order."""
    position: int
    """Number of tokens consumed so far; the next token has this absolute position."""

    @property
    def batch_size(self) -> int:
        first = self.layers[0]
        return (first.S if isinstance(first, GDNCache) else first.keys).shape[0]

    def nbytes(self) -> int:
        """Bytes held by all layer caches."""
        return sum(layer.nbytes() for layer in self.layers)

    def nbytes_by_component(self) -> dict[str, int]:
        """Bytes per layer kind, keyed like GroundThinkLM.state_bytes: gdn, swa, attention, total."""
        out = {"gdn": 0, "swa": 0, "attention": 0}
        for layer in self.layers:
            out[COMPONENTS[type(layer)]] += layer.nbytes()
        out["total"] = sum(out.values())
        return out


def empty_cache(config, layer_types: list[str], has_memory: list[bool], batch: int,
                device: torch.device, dtype: torch.dtype) -> DecodingCache:
    """Build the cache of a model before its first token.

    Ring buffers and convolution tails start as zeros of their final size, so the cache of a
    model without `A` layers has the same size at every position. The recurrent state and the
    memory snapshot use the accumulation dtype of `dtype` (float32, or float64 for float64).
    """
    H, K, V = config.n_heads, config.head_dim, config.value_dim
    d, W = config.attn_head_dim, config.window_size
    state_dtype = accumulation_dtype(dtype)
    layers: list[LayerCache] = []
    for layer_type, memory in zip(layer_types, has_memory):
        if layer_type == "gdn":
            tails = [None, None, None]
            if config.use_short_conv:
                width = config.conv_size - 1
                tails = [torch.zeros(batch, width, H * dim, device=device, dtype=dtype) for dim in (K, K, V)]
            S = torch.zeros(batch, H, K, V, device=device, dtype=state_dtype)
            layers.append(GDNCache(S, *tails))
        elif layer_type == "swa":
            keys = torch.zeros(batch, W, H, d, device=device, dtype=dtype)
            snapshot = torch.zeros(batch, H, K, V, device=device, dtype=state_dtype) if memory else None
            layers.append(SWACache(keys, torch.zeros_like(keys), snapshot))
        else:
            keys = torch.zeros(batch, H, 0, d, device=device, dtype=dtype)
            layers.append(KVCache(keys, torch.zeros_like(keys)))
    return DecodingCache(layers, position=0)


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ValueError for a sampling setting outside its range, naming the value and the fix."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"invalid temperature={temperature!r}: must be a number >= 0 (0 picks the most likely token)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"invalid top_k={top_k!r}: must be an integer >= 1; leave it unset to keep every token")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"invalid top_p={top_p!r}: must lie in (0, 1]; leave it unset to keep every token")


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw one token id per row of logits [B, vocab]; returns LongTensor [B].

    temperature 0 takes the argmax. Otherwise the logits are divided by the temperature and
    top_k keeps the k largest. top_p keeps the smallest set of most likely tokens whose
    probabilities sum to at least top_p (always at least one). The token is drawn from the
    renormalised softmax, computed in float32.
    """
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature

    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = logits.topk(top_k, dim=-1).values[..., -1:]                 # [B, 1]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))

    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p.
        mass_before = probs.cumsum(dim=-1) - probs
        drop_sorted = mass_before >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))

    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]

