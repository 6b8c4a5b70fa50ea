"""Run every probe on one text and collect the results, the flags and the skip reasons."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from .gradients import gradient_health
from .horizon import SATURATED_BETA, forget_horizon
from .needle import N_RANDOM_KEYS, needle_probe
from .readers import DIFFUSE_FOCUS, memory_readers, require_memory_readers
from .spectrum import transition_spectrum
from .state import INTERFERENCE_BETA, state_content
from .trace import ProbeInputError, ProbeNotApplicable, check_length, require_gdn, trace_model
from .write import write_strength

PROBES = ("write_strength", "forget_horizon", "transition_spectrum", "state_content",
          "memory_readers", "needle", "gradients")


@dataclass
class ProbeSettings:
    """Thresholds and sizes of the probe suite."""

    top_k: int = 10
    """Token types listed at each end of the write-strength ranking."""
    min_count: int = 3
    """Token types seen fewer times in the text are left out of the ranking."""
    saturated_beta: float = SATURATED_BETA
    """Mean beta below which a head with a half-life beyond the training context is saturated."""
    interference_beta: float = INTERFERENCE_BETA
    """Keys written with beta above this enter the interference measure."""
    diffuse_focus: float = DIFFUSE_FOCUS
    """Mean focus ratio below which an SWA head is a diffuse memory reader."""
    check_span: int = 16
    """Tokens per span on which explicit [K, K] products check the closed-form determinant."""
    n_random_keys: int = N_RANDOM_KEYS
    """Random unit keys sampled for the needle's noise distribution."""
    needle_distance: int | None = None
    """Text tokens between the needle and the query; None for 4 W (at most the text length)."""
    needle_prefix: int = 1024
    """Text tokens kept before the needle; the needle runs use only the end of the text, which
    keeps their two forward passes short."""
    grad_rows: int = 4
    """Rows of the gradient batch."""
    grad_seq_len: int = 128
    """Predicted tokens per row of the gradient batch (capped by the probe rows' length)."""
    seed: int = 0
    """Seed of the random keys."""


@dataclass
class Needle:
    """A needle: query token ids and answer token ids (needle = query + answer), with their text."""

    query_ids: Sequence[int]
    answer_ids: Sequence[int]
    query_text: str = ""
    answer_text: str = ""


def cut_rows(ids: np.ndarray, seq_len: int | None) -> np.ndarray:
    """Cut 1-D token ids into rows [B, seq_len] of consecutive tokens, dropping the remainder.

    With seq_len None the whole text is one row.
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if seq_len is None or seq_len >= len(ids):
        return ids[None]
    if seq_len < 1:
        raise ProbeInputError(f"seq_len must be at least 1, got {seq_len}")
    n_rows = len(ids) // seq_len
    return ids[: n_rows * seq_len].reshape(n_rows, seq_len)


def run_probes(
    model,
    ids: Sequence[int],
    *,
    seq_len: int | None = None,
    train_context: int | None = None,
    needle: Needle | None = None,
    settings: ProbeSettings | None = None,
    decode: Callable[[list[int]], str] | None = None,
) -> dict:
    """Run all probes on the token ids of one text and return every number.

    Args:
        model: a GroundThinkLM, put in eval mode for the duration.
        ids: 1-D token ids of the text.
        seq_len: tokens per row; the text is cut into rows of this length (None: one row).
        train_context: training sequence length, for the saturated-head check (None: skipped).
        needle: the needle to insert, or None to skip the needle probe.
        settings: thresholds and sizes (ProbeSettings() when None).
        decode: maps a list of ids to text; used to label tokens in the report.

    Returns {"meta", "probes" (name -> result), "skipped" (name -> reason), "flags"
    (text, prefixed by the probe name), "tokens" (decoded text of every token, when decode is given)}.
    Raises ProbeInputError for input no probe can use (a text of at most one memory block).
    """
    settings = settings or ProbeSettings()
    config = model.config
    flat = np.asarray(ids, dtype=np.int64).reshape(-1)
    rows = cut_rows(flat, seq_len)
    check_length(rows.shape[1], config.memory_block)

    results: dict = {
        "meta": {
            "config": config.to_dict(),
            "parameter_counts": model.parameter_counts(),
            "n_tokens": int(rows.size),
            "rows": int(rows.shape[0]),
            "seq_len": int(rows.shape[1]),
            "train_context": train_context,
            "settings": asdict(settings),
            "seconds": {},
        },
        "probes": {},
        "skipped": {},
        "flags": [],
    }
    if decode is not None:
        results["tokens"] = [decode([int(i)]) for i in rows.reshape(-1)]

    was_training = model.training
    model.eval()
    try:
        start = time.perf_counter()
        trace = trace_model(model, rows)
        results["meta"]["seconds"]["trace"] = time.perf_counter() - start

        probes = probe_calls(model, trace, flat, rows.shape[1], train_context, needle, settings)
        for name, probe in probes.items():
            start = time.perf_counter()
            try:
                result = probe()
            except ProbeNotApplicable as reason:
                results["skipped"][name] = str(reason)
                continue
            finally:
                results["meta"]["seconds"][name] = time.perf_counter() - start
            results["probes"][name] = result
            results["flags"] += [f"{name}: {flag}" for flag in result.get("flags", [])]
    finally:
        model.train(was_training)

    if decode is not None and "write_strength" in results["probes"]:
        for entry in results["probes"]["write_strength"]["highest"] + results["probes"]["write_strength"]["lowest"]:
            entry["text"] = decode([entry["id"]])
    return results


def probe_calls(model, trace, flat: np.ndarray, row_len: int, train_context: int | None,
                needle: Needle | None, settings: ProbeSettings) -> dict[str, Callable[[], dict]]:
    """Build one argument-free call per probe, in report order. Each raises ProbeNotApplicable to skip."""
    config = model.config
    gdn_layers = [t.layer for t in trace.gdn]
    betas, gs, keys = [t.beta for t in trace.gdn], [t.g for t in trace.gdn], [t.k for t in trace.gdn]

    def write() -> dict:
        require_gdn(trace)
        return write_strength(betas, trace.ids, gdn_layers, trace.surprisal, settings.top_k, settings.min_count)

    def horizon() -> dict:
        require_gdn(trace)
        window = config.window_size if "S" in config.layer_pattern else None
        return forget_horizon(gs, betas, gdn_layers, window, train_context, settings.saturated_beta)

    def spectrum() -> dict:
        require_gdn(trace)
        spans = [config.memory_block, config.window_size] + ([train_context] if train_context else [])
        return transition_spectrum(gs, betas, keys, gdn_layers, spans, settings.check_span)

    def state() -> dict:
        require_gdn(trace)
        return state_content([t.block_states for t in trace.gdn], [t.final_state for t in trace.gdn], keys, betas,
                             gdn_layers, config.memory_block, [t.memory for t in trace.swa],
                             [t.layer for t in trace.swa], settings.interference_beta)

    def readers() -> dict:
        require_memory_readers(config.layer_pattern)
        return memory_readers([t.slot_weights for t in trace.swa], [t.gate for t in trace.swa],
                              [t.layer for t in trace.swa], config.memory_block, settings.diffuse_focus)

    def gradients() -> dict:
        return gradient_health(model, gradient_batch(flat, row_len, settings))

    return {"write_strength": write, "forget_horizon": horizon, "transition_spectrum": spectrum,
            "state_content": state, "memory_readers": readers,
            "needle": lambda: run_needle(model, flat, needle, settings), "gradients": gradients}


def run_needle(model, flat: np.ndarray, needle: Needle | None, settings: ProbeSettings) -> dict:
    if needle is None:
        raise ProbeNotApplicable("no needle was given")
    distance = settings.needle_distance
    if distance is None:
        distance = min(4 * model.config.window_size, len(flat))
    text = flat[-(distance + settings.needle_prefix):]
    result = needle_probe(model, text, needle.query_ids, needle.answer_ids, distance,
                          settings.n_random_keys, settings.seed)
    result["query_text"], result["answer_text"] = needle.query_text, needle.answer_text
    return result


def gradient_batch(flat: np.ndarray, row_len: int, settings: ProbeSettings) -> torch.Tensor:
    """Up to grad_rows rows of min(grad_seq_len + 1, row_len) consecutive tokens from the text."""
    length = min(settings.grad_seq_len + 1, row_len)
    n_rows = min(settings.grad_rows, len(flat) // length)
    if n_rows < 1:
        raise ProbeNotApplicable(f"the text has {len(flat)} tokens, fewer than one gradient row of {length}")
    return torch.as_tensor(flat[: n_rows * length].reshape(n_rows, length))


def _number(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _numbers(values, fmt: str = "{:.3g}") -> str:
    return "[" + ", ".join(fmt.format(float(v)) for v in np.asarray(values).reshape(-1)) + "]"


def format_summary(results: dict) -> str:
    """Format the results as short plain text: one or two lines per probe, then skips and flags."""
    meta, probes = results["meta"], results["probes"]
    c = meta["config"]
    lines = [f"layer_pattern {c['layer_pattern']}, D={c['d_model']} H={c['n_heads']} K={c['head_dim']} "
             f"W={c['window_size']} M={c['memory_block']}, {meta['parameter_counts']['total']:,} parameters; "
             f"{meta['n_tokens']} tokens ({meta['rows']} x {meta['seq_len']})"]

    if "write_strength" in probes:
        r = probes["write_strength"]
        top = ", ".join(repr(e.get("text", e["id"])) for e in r["highest"][:5])
        bottom = ", ".join(repr(e.get("text", e["id"])) for e in r["lowest"][:5])
        lines.append(f"write strength: mean beta per GDN layer {_numbers(r['mean'].mean(1))}; highest {top}; "
                     f"lowest {bottom}; Spearman(ln count, beta) {_number(r['frequency_spearman'])}, "
                     f"Spearman(surprisal, beta) {_number(r['surprisal_spearman'])}")
    if "forget_horizon" in probes:
        r = probes["forget_horizon"]
        kinds = [h["flag"] for h in r["heads"]]
        lines.append(f"forget horizon: median half-life (tokens) per layer and head "
                     f"{_numbers(r['half_life']['p50'])}; {kinds.count('goldfish')} goldfish, "
                     f"{kinds.count('saturated')} saturated of {len(kinds)} heads")
    if "transition_spectrum" in probes:
        r = probes["transition_spectrum"]
        survival = "; ".join(f"over {s} tokens {_numbers(v['survival'].mean(1))}" for s, v in r["spans"].items())
        lines.append(f"transition spectrum: mean ln|det A_t| per layer {_numbers(r['log_det_mean'].mean(1))}; "
                     f"per-direction survival {survival}; explicit-product check max relative error "
                     f"{r['max_check_error']:.2g}")
    if "state_content" in probes:
        r = probes["state_content"]
        ranks = [g["final"]["effective_rank"].mean() for g in r["gdn"]]
        ratios = [np.mean([x["ratio"] for x in g["interference"] if x["ratio"] is not None] or [np.nan])
                  for g in r["gdn"]]
        lines.append(f"state content: final effective rank per GDN layer {_numbers(ranks)} of {r['max_rank']}; "
                     f"key interference (|cos| / random) {_numbers(ratios)}")
    if "memory_readers" in probes:
        r = probes["memory_readers"]
        for layer in r["per_layer"]:
            lines.append(f"memory readers: layer {layer['layer']} focus ratio per head {_numbers(layer['focus'])}, "
                         f"gate {_numbers(layer['gate'])}")
    if "needle" in probes:
        r = probes["needle"]
        line = (f"needle: answer ln p {r['answer_log_prob']:.2f} with the needle, {r['answer_log_prob_control']:.2f} "
                f"without; {r['positions']['distance']} tokens from needle to query")
        if r["gdn"]:
            line += (f"; best read SNR {r['best_snr']:.2f}, best SNR / control {r['best_gain']:.2f}, "
                     f"{r['heads_retaining']} heads retain it")
        line += f"; needle effect on the last layer's hidden state {r['hidden'][-1]['effect']:.3g}"
        lines.append(line)
    if "gradients" in probes:
        r = probes["gradients"]
        norms = ", ".join(f"{name} {v['grad_norm']:.3g}" for name, v in r["components"].items())
        lines.append(f"gradients: loss {r['loss']:.3f}; grad norm {norms}")
    for name, reason in results["skipped"].items():
        lines.append(f"skipped {name}: {reason}")
    lines.append(f"flags ({len(results['flags'])}):")
    lines += [f"  - {flag}" for flag in results["flags"]] or ["  none"]
    return "\n".join(lines)
