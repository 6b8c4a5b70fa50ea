"""Gated delta rule kernels: the recurrent reference and the chunked algorithm."""

from .chunk import chunk_gated_delta_rule
from .recurrent import recurrent_gated_delta_rule

__all__ = ["chunk_gated_delta_rule", "recurrent_gated_delta_rule"]
