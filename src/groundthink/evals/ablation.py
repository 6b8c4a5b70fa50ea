"""Ablations of the recurrent memory through forward hooks; the model code stays unchanged.

Three ablations, each a context manager active for the forward passes run inside it:

- `zero_memory_at(model, p)`: a forward hook on `a_proj` of every GDN layer replaces its output
  at position p so that the log decay there is g_p = -decay (default 1000), hence
  alpha_p = exp(g_p) = 0 in float32 and float64. The recurrence
  S_p = alpha_p (I - beta_p k_p k_p^T) S_{p-1} + beta_p k_p v_p^T then keeps only the write of
  token p. So no GDN layer retains any token before p, neither in its own output nor in the
  block states that SWA layers read. Outputs before p are unchanged (the model is causal).
  The short convolution still mixes the conv_size - 1 tokens before p into q, k and v at
  p .. p + conv_size - 2, so tokens right before p are not entirely forgotten.
- `cut_global_pathway_from(model, p)`: a forward hook on `gate_proj` of every SWA layer with
  a global pathway sets its output to -inf from position p on, so gate_t = sigmoid(-inf) = 0
  and the layer's output is its local window attention alone at every t >= p.
- `cut_gdn_output_from(model, p)`: a forward hook on `o_proj` of every GDN layer sets its
  output to 0 from position p on. The GDN layers still write their memory, so from p on the
  memory reaches the residual stream only through the global pathway of SWA layers.

How the decay hook reaches alpha = 0: g = -A * softplus(a + dt_bias) with A = exp(A_log) per
head, so the hook sets a = max(decay / A, 30) - dt_bias, where softplus(x) = x (torch returns x
itself above 20), giving g = -max(decay, 30 A) <= -decay.

NOTE: the hooks index positions of the sequence passed to one forward call. They are meant
for full-sequence forward passes; a cached one-token decoding step sees T = 1 and would be
ablated at the wrong place.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn as nn

DEFAULT_DECAY = 1000.0
"""-g at the ablated position: exp(-1000) underflows to exactly 0 in float32 and float64."""


def gdn_layers(model: nn.Module) -> list[nn.Module]:
    """Return the GDN mixers of a GroundThinkLM, bottom to top."""
    blocks = getattr(model, "blocks", [])
    return [block.mixer for block in blocks if getattr(block, "layer_type", None) == "gdn"]


def global_pathway_layers(model: nn.Module) -> list[nn.Module]:
    """Return the SWA mixers that read the GDN memory (an S layer with a G layer below it)."""
    blocks = getattr(model, "blocks", [])
    return [block.mixer for block in blocks
            if getattr(block, "layer_type", None) == "swa" and getattr(block.mixer, "has_memory", False)]


def zero_memory_unsupported(model: nn.Module) -> str | None:
    """Why zero_memory_at cannot run on this model, or None when it can."""
    if not gdn_layers(model):
        return f"layer pattern {getattr(model.config, 'layer_pattern', '?')!r} has no G (GDN) layer, so no memory to zero"
    return None


def cut_global_unsupported(model: nn.Module) -> str | None:
    """Why cut_global_pathway_from cannot run on this model, or None when it can."""
    if not global_pathway_layers(model):
        return (f"layer pattern {getattr(model.config, 'layer_pattern', '?')!r} has no S layer above a G layer, "
                "so no global pathway to cut")
    return None


@contextmanager
def _forward_hooks(hooks: list[tuple[nn.Module, Callable]]) -> Iterator[None]:
    """Register each (module, hook) pair as a forward hook, and remove them all on exit."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _check_position(position: int) -> None:
    if isinstance(position, bool) or not isinstance(position, int) or position < 0:
        raise ValueError(f"invalid ablation position {position!r}: must be a non-negative token index")


@contextmanager
def zero_memory_at(model: nn.Module, position: int, decay: float = DEFAULT_DECAY) -> Iterator[None]:
    """Make every GDN layer forget all tokens before `position` (alpha = 0 there)."""
    _check_position(position)
    reason = zero_memory_unsupported(model)
    if reason is not None:
        raise ValueError(f"cannot zero the memory: {reason}")
    if not decay >= 104.0:
        raise ValueError(f"invalid decay={decay!r}: exp(-decay) must underflow to 0 in float32, use >= 104")

    def make_hook(layer: nn.Module):
        def hook(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
            # output: a_proj(x) [B, T, H]
            if output.shape[1] <= position:
                return output
            A = layer.A_log.detach().float().exp()                                 # [H]
            logit = torch.clamp(decay / A, min=30.0) - layer.dt_bias.detach().float()
            ablated = output.clone()
            ablated[:, position] = logit.to(output.dtype)
            return ablated
        return hook

    with _forward_hooks([(layer.a_proj, make_hook(layer)) for layer in gdn_layers(model)]):
        yield


@contextmanager
def cut_global_pathway_from(model: nn.Module, position: int) -> Iterator[None]:
    """Close the global-pathway gate of every SWA layer at positions >= `position`."""
    _check_position(position)
    reason = cut_global_unsupported(model)
    if reason is not None:
        raise ValueError(f"cannot cut the global pathway: {reason}")

    def hook(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        # output: gate logits [B, T, H]
        ablated = output.clone()
        ablated[:, position:] = float("-inf")
        return ablated

    with _forward_hooks([(layer.gate_proj, hook) for layer in global_pathway_layers(model)]):
        yield


def cut_gdn_output_unsupported(model: nn.Module) -> str | None:
    """Why cut_gdn_output_from cannot run on this model, or None when it can."""
    return zero_memory_unsupported(model)


@contextmanager
def cut_gdn_output_from(model: nn.Module, position: int) -> Iterator[None]:
    """Zero the output of every GDN layer at positions >= `position`; its memory is still written."""
    _check_position(position)
    reason = cut_gdn_output_unsupported(model)
    if reason is not None:
        raise ValueError(f"cannot cut the GDN output: {reason}")

    def hook(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        # output: o_proj(o) [B, T, D]
        ablated = output.clone()
        ablated[:, position:] = 0.0
        return ablated

    with _forward_hooks([(layer.o_proj, hook) for layer in gdn_layers(model)]):
        yield


ABLATIONS = {
    "zero_memory": (zero_memory_at, zero_memory_unsupported),
    "cut_global": (cut_global_pathway_from, cut_global_unsupported),
    "cut_gdn_output": (cut_gdn_output_from, cut_gdn_output_unsupported),
}
"""Name -> (context manager, function returning why the model cannot be ablated or None)."""
