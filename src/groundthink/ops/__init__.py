"""Kernels: the gated delta rule (recurrent reference, chunked PyTorch, fla dispatch)."""

from .dispatch import gated_delta_rule, resolve_backend
from .gated_delta_rule import chunk_gated_delta_rule, recurrent_gated_delta_rule

__all__ = ["chunk_gated_delta_rule", "gated_delta_rule", "recurrent_gated_delta_rule", "resolve_backend"]
