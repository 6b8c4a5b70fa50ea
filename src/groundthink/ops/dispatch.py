"""The one place that chooses a gated delta rule kernel."""

from __future__ import annotations

import importlib
import logging

import torch

from .gated_delta_rule import chunk_gated_delta_rule

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "fla")
_logged_choices: set[tuple[str, str]] = set()


def fla_chunk_kernel():
    """Import flash-linear-attention's Triton chunk kernel, or return None when unavailable."""
    try:
        module = importlib.import_module("fla.ops.gated_delta_rule")
    except ImportError:
        return None
    return getattr(module, "chunk_gated_delta_rule", None)


def resolve_backend(backend: str, device: torch.device | str) -> tuple[str, str]:
    """Return (backend, reason) for a requested backend on a device.

    "auto" picks "fla" on CUDA when flash-linear-attention imports, "torch" otherwise.
    "fla" without the library or off CUDA raises ValueError with the fix.
    """
    if backend not in BACKENDS:
        raise ValueError(f"invalid backend {backend!r}; use one of {BACKENDS}")
    device = torch.device(device)
    if backend == "torch":
        return "torch", "requested"
    has_fla = fla_chunk_kernel() is not None
    if backend == "fla":
        if not has_fla:
            raise ValueError("backend='fla' requested but flash-linear-attention is not importable; "
                             "install it with `pip install -e \".[gpu]\"` or use backend='torch'")
        if device.type != "cuda":
            raise ValueError(f"backend='fla' runs Triton kernels on CUDA only, got tensors on {device}; "
                             "use backend='torch' on this device")
        return "fla", "requested"
    if device.type != "cuda":
        return "torch", f"auto: tensors on {device.type}, the Triton kernels need CUDA"
    if not has_fla:
        return "torch", "auto: flash-linear-attention is not installed"
    return "fla", "auto: CUDA and flash-linear-attention available"


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    use_qk_l2norm_in_kernel: bool = False,
    backend: str = "auto",
):
    """Chunked gated delta rule on the chosen backend; returns (o, final_state).

    Same recurrence, layouts and dtypes as chunk_gated_delta_rule. The fla kernel
    fixes its own chunk size (64), so chunk_size applies to the torch backend only.
    """
    name, reason = resolve_backend(backend, q.device)
    if (name, reason) not in _logged_choices:
        _logged_choices.add((name, reason))
        logger.info("gated delta rule backend: %s (%s)", name, reason)
    if name == "fla":
        kernel = fla_chunk_kernel()
        return kernel(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                      output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)
    return chunk_gated_delta_rule(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                  output_final_state=output_final_state, chunk_size=chunk_size,
                                  use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)
