"""Gradient health: gradient norms per model component on one batch.

Components follow GroundThinkLM.parameter_counts(): embedding, gdn, swa, attention, ffn,
norms, lm_head. With tied embeddings the LM head's gradient lands on the embedding.
"""

from __future__ import annotations

import math

import numpy as np
import torch

COMPONENTS = ("embedding", "gdn", "swa", "attention", "ffn", "norms", "lm_head")


def parameter_components(model) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    """Group the model's parameters by component, as parameter_counts() counts them.

    Raises RuntimeError naming any parameter that falls in no component, so that a new
    parameter cannot silently drop out of the gradient report.
    """
    groups: dict[str, list[tuple[str, torch.nn.Parameter]]] = {name: [] for name in COMPONENTS}
    groups["embedding"].append(("embed.weight", model.embed.weight))
    groups["norms"].append(("final_norm.weight", model.final_norm.weight))
    for i, block in enumerate(model.blocks):
        groups[block.layer_type] += [(f"blocks.{i}.mixer.{n}", p) for n, p in block.mixer.named_parameters()]
        groups["ffn"] += [(f"blocks.{i}.ffn.{n}", p) for n, p in block.ffn.named_parameters()]
        groups["norms"] += [(f"blocks.{i}.mixer_norm.weight", block.mixer_norm.weight),
                            (f"blocks.{i}.ffn_norm.weight", block.ffn_norm.weight)]
    groups["gdn"] += [(f"memory_mix_logits.{n}", p) for n, p in model.memory_mix_logits.items()]
    if not model.config.tie_embeddings:
        groups["lm_head"].append(("lm_head.weight", model.lm_head.weight))

    grouped = {id(p) for members in groups.values() for _, p in members}
    missing = [name for name, p in model.named_parameters() if id(p) not in grouped]
    if missing:
        raise RuntimeError(f"parameters {missing} belong to no gradient component; add them to "
                           "parameter_components in groundthink/probes/gradients.py")
    return groups


def norm(tensors: list[torch.Tensor]) -> float:
    """L2 norm of all entries of `tensors` together, in float64."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


def gradient_health(model, ids) -> dict:
    """Gradient norms per component and per layer for next-token loss on ids [B, T + 1].

    Gradients come from torch.autograd.grad, so the parameters' .grad fields are left
    untouched. Returns loss, per component n_params, grad_norm, param_norm, ratio
    (grad_norm / param_norm), max_abs, n_nonfinite and n_zero (entries with gradient 0),
    per layer the mixer and FFN gradient norms, and flags.
    """
    ids = torch.as_tensor(np.asarray(ids), dtype=torch.long, device=next(model.parameters()).device)
    if ids.dim() != 2 or ids.shape[1] < 2:
        raise ValueError(f"gradient_health needs ids [B, T + 1] with T >= 1, got shape {tuple(ids.shape)}")
    groups = parameter_components(model)
    params = [p for members in groups.values() for _, p in members]

    with torch.enable_grad():
        loss = model(ids[:, :-1], labels=ids[:, 1:]).loss
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    grad_of = {id(p): (torch.zeros_like(p) if g is None else g.detach()) for p, g in zip(params, grads)}

    result = {"loss": float(loss.detach()), "n_tokens": int(ids.shape[0] * (ids.shape[1] - 1)),
              "components": {}, "layers": [], "flags": []}
    if not math.isfinite(result["loss"]):
        result["flags"].append(f"loss is {result['loss']} on the gradient batch")
    for name, members in groups.items():
        if not members:
            continue
        g = [grad_of[id(p)] for _, p in members]
        n_nonfinite = sum(int((~torch.isfinite(x)).sum()) for x in g)
        record = {
            "n_params": sum(p.numel() for _, p in members),
            "grad_norm": norm(g),
            "param_norm": norm([p.detach() for _, p in members]),
            "max_abs": max(float(x.abs().max()) for x in g),
            "n_nonfinite": n_nonfinite,
            "n_zero": sum(int((x == 0).sum()) for x in g),
        }
        record["ratio"] = record["grad_norm"] / record["param_norm"] if record["param_norm"] > 0 else None
        result["components"][name] = record
        if n_nonfinite:
            result["flags"].append(f"{name}: {n_nonfinite} non-finite gradient entries")
        elif record["grad_norm"] == 0.0:
            result["flags"].append(f"{name}: gradient is exactly zero on {record['n_params']} parameters; "
                                   "the component does not affect the loss")

    for i, block in enumerate(model.blocks):
        result["layers"].append({
            "layer": i,
            "type": block.layer_type,
            "mixer_grad_norm": norm([grad_of[id(p)] for p in block.mixer.parameters()]),
            "ffn_grad_norm": norm([grad_of[id(p)] for p in block.ffn.parameters()]),
        })
    return result
