"""Model layers: GDN, SWA with the global pathway, full attention, SwiGLU, norms."""

from .attention import CausalSelfAttention
from .ffn import SwiGLU
from .gdn import GatedDeltaNet, ShortConv
from .norm import GatedRMSNorm, RMSNorm
from .swa import SlidingWindowAttention, sliding_window_attention, window_mask

__all__ = [
    "CausalSelfAttention", "GatedDeltaNet", "GatedRMSNorm", "RMSNorm", "ShortConv",
    "SlidingWindowAttention", "SwiGLU", "sliding_window_attention", "window_mask",
]
