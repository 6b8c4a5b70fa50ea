"""Needle probes: store a fact in real text, then trace whether the memory still retains it.

The sequence is  text[:p] + needle + text[p:] + query + answer,  with needle = query + answer
(for example query "The secret word is", answer " plum.") and p chosen so that `distance`
text tokens separate the needle from the query. A control run drops the needle.

Read signal-to-noise (per GDN layer and head, at the start of the query):
  signal = ||S^T k_n||  for the unit key k_n the needle wrote,
  noise  = sqrt(E_u ||S^T u||^2) = ||S||_F / sqrt(K)  over unit keys u uniform on the sphere,
  SNR    = signal / noise  (about 1 when S stores nothing special along k_n).
Hidden-state trace (per layer): cos(h[query end], h[needle token at the same offset]) against
the cosines of the query end with other positions of the same token, and the needle's effect
||h[query end] - h_control[query end]|| / ||h_control[query end]|| (see docs/probes.md).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from ..ops.gated_delta_rule import chunk_gated_delta_rule
from .trace import ProbeInputError, ProbeNotApplicable

N_RANDOM_KEYS = 256
RETAINED_SNR = 2.0
RETAINED_GAIN = 1.5
"""A head retains the needle when its read SNR is at least RETAINED_SNR and at least
RETAINED_GAIN times the SNR of the same key in the control run. The control matters because
a key along the memory's dominant directions reads above noise even without the needle."""


def read_snr(S: np.ndarray, key: np.ndarray, n_random: int = N_RANDOM_KEYS, seed: int = 0) -> dict:
    """Signal-to-noise of reading `key` [K] from one memory head S [K, V].

    Returns signal ||S^T k|| (k = key / |key|), noise_rms ||S||_F / sqrt(K) (exact RMS of
    ||S^T u|| over uniform random unit u), snr = signal / noise_rms (None for S = 0), and
    from n_random sampled unit keys their mean reading and the fraction below the signal.
    """
    S = np.asarray(S, dtype=np.float64)
    key = np.asarray(key, dtype=np.float64)
    K = S.shape[0]
    unit = key / max(np.linalg.norm(key), 1e-12)
    signal = float(np.linalg.norm(S.T @ unit))
    noise_rms = float(np.linalg.norm(S) / math.sqrt(K))

    rng = np.random.default_rng(seed)
    u = rng.standard_normal((n_random, K))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    readings = np.linalg.norm(u @ S, axis=1)                                       # [n_random]
    return {
        "signal": signal,
        "noise_rms": noise_rms,
        "snr": signal / noise_rms if noise_rms > 0 else None,
        "random_mean": float(readings.mean()),
        "random_fraction_below": float((readings < signal).mean()),
    }


def build_needle_sequences(text_ids: Sequence[int], query_ids: Sequence[int], answer_ids: Sequence[int],
                           distance: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Return (ids with the needle, control ids without it, positions in the needle sequence).

    The needle goes `distance` text tokens before the end of the text, so exactly that many
    tokens separate it from the query. positions: needle (start, end) token span,
    needle_match (needle token aligned with the last query token), query (start, end),
    answer (start, end), distance, and shift (needle length: how far the query moves
    right compared with the control).
    """
    text, query, answer = (np.asarray(x, dtype=np.int64).reshape(-1) for x in (text_ids, query_ids, answer_ids))
    if len(query) == 0 or len(answer) == 0:
        raise ProbeInputError(f"the needle needs a non-empty query and answer, got {len(query)} query and "
                              f"{len(answer)} answer tokens")
    if isinstance(distance, bool) or not isinstance(distance, (int, np.integer)) or not 0 <= distance <= len(text):
        raise ProbeInputError(f"needle distance must be an integer in [0, {len(text)}] (text tokens between the "
                              f"needle and the query), got {distance!r}")
    p = len(text) - int(distance)
    needle = np.concatenate([query, answer])
    with_needle = np.concatenate([text[:p], needle, text[p:], query, answer])
    control = np.concatenate([text, query, answer])
    query_start = len(text) + len(needle)
    positions = {
        "needle": (p, p + len(needle)),
        "needle_match": p + len(query) - 1,
        "query": (query_start, query_start + len(query)),
        "answer": (query_start + len(query), query_start + len(needle)),
        "distance": int(distance),
        "shift": len(needle),
    }
    return with_needle, control, positions


def answer_log_prob(logits: torch.Tensor, ids: torch.Tensor, start: int, end: int) -> float:
    """Sum of ln p(ids[i] | ids[< i]) over answer positions start .. end - 1 (row 0)."""
    log_probs = torch.log_softmax(logits[0, start - 1:end - 1].double(), dim=-1)
    return float(log_probs.gather(-1, ids[0, start:end, None]).sum())


def state_before(info: dict, position: int, chunk_size: int) -> np.ndarray:
    """State [H, K, V] of a GDN layer after tokens 0 .. position - 1 (row 0), from its internals."""
    span = slice(0, position)
    _, S = chunk_gated_delta_rule(*(info[name][:1, span].float() for name in ("q", "k", "v", "g", "beta")),
                                  output_final_state=True, chunk_size=chunk_size)
    return S[0].double().cpu().numpy()


def cosine_rows(matrix: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """cos(matrix[i], vector) for every row i."""
    norms = np.linalg.norm(matrix, axis=1) * np.linalg.norm(vector)
    return (matrix @ vector) / np.maximum(norms, 1e-12)


def key_snr(info: dict, info_control: dict, pos: dict, chunk_size: int, n_random: int, seed: int) -> dict:
    """Read SNR of every needle key per head in one GDN layer, with the needle and in the control."""
    needle_span = slice(*pos["needle"])
    S = state_before(info, pos["query"][0], chunk_size)                           # [H, K, V]
    S_control = state_before(info_control, pos["query"][0] - pos["shift"], chunk_size)
    keys = info["k"][0, needle_span].double().cpu().numpy()                        # [n_needle, H, K]
    beta = info["beta"][0, needle_span].double().cpu().numpy()                     # [n_needle, H]
    n, H = beta.shape
    snr = np.full((n, H), np.nan)
    snr_control = np.full((n, H), np.nan)
    for i in range(n):
        for h in range(H):
            reading = read_snr(S[h], keys[i, h], n_random, seed)["snr"]
            reading_control = read_snr(S_control[h], keys[i, h], n_random, seed)["snr"]
            snr[i, h] = np.nan if reading is None else reading
            snr_control[i, h] = np.nan if reading_control is None else reading_control
    strongest = beta.argmax(axis=0)                                                # [H]
    return {"snr": snr, "snr_control": snr_control, "beta": beta, "strongest_token": strongest,
            "snr_strongest": snr[strongest, np.arange(H)],
            "snr_strongest_control": snr_control[strongest, np.arange(H)]}


def hidden_trace(hidden: np.ndarray, hidden_control: np.ndarray, ids: np.ndarray, pos: dict) -> dict:
    """Similarity of the query end's hidden state to the needle's, and the needle's effect on it.

    hidden [T, D] with the needle, hidden_control [T - shift, D] without. Returns
    cos_needle = cos(h[query end], h[needle_match]); the mean and std of cos(h[query end], h[t])
    over other text positions t with the same token id as the query end (all other text
    positions when there are none), z against them and the fraction below; and effect =
    ||h[query end] - h_control[query end]|| / ||h_control[query end]||. The effect is 0 up to
    float rounding (about 1e-7: RoPE angles at positions shifted by the needle's length round
    differently) when nothing of the needle reaches the query.
    """
    query_end = pos["query"][1] - 1
    h = hidden[query_end]
    cos_all = cosine_rows(hidden[: pos["query"][0]], h)
    others = np.ones(pos["query"][0], dtype=bool)
    others[slice(*pos["needle"])] = False
    same_token = others & (ids[: pos["query"][0]] == ids[query_end])
    baseline = cos_all[same_token] if same_token.sum() >= 2 else cos_all[others]
    cos_needle = float(cos_all[pos["needle_match"]])
    mean, std = float(baseline.mean()), float(baseline.std())
    h_control = hidden_control[query_end - pos["shift"]]
    return {
        "cos_needle": cos_needle,
        "baseline": "same token" if same_token.sum() >= 2 else "all tokens",
        "baseline_mean": mean,
        "baseline_std": std,
        "z": (cos_needle - mean) / std if std > 0 else None,
        "fraction_below": float((baseline < cos_needle).mean()),
        "effect": float(np.linalg.norm(h - h_control) / max(np.linalg.norm(h_control), 1e-12)),
    }


@torch.no_grad()
def needle_probe(model, text_ids: Sequence[int], query_ids: Sequence[int], answer_ids: Sequence[int],
                 distance: int, n_random: int = N_RANDOM_KEYS, seed: int = 0) -> dict:
    """Insert a needle `distance` tokens before the query, run the model with and without it, trace it.

    Returns a dict with positions, the answer's log-probability with and without the needle,
    notes and flags. Its 'gdn' list gives, per GDN layer, the read SNR of every needle key
    per head ([n_needle, H], with the needle and in the control) and of the needle token
    written with the largest beta. Its 'hidden' list gives the hidden-state trace of every
    layer (see hidden_trace).
    """
    config = model.config
    device = next(model.parameters()).device
    with_needle, control, pos = build_needle_sequences(text_ids, query_ids, answer_ids, distance)
    if pos["distance"] <= config.memory_block:
        raise ProbeNotApplicable(f"only {pos['distance']} text tokens lie between the needle and the query; the "
                                 f"probe needs more than one memory block (M = {config.memory_block}); pass a "
                                 "longer text or a larger needle distance")

    ids = torch.as_tensor(with_needle, device=device)[None]
    ids_control = torch.as_tensor(control, device=device)[None]
    out = model(ids, return_internals=True)
    out_control = model(ids_control, return_internals=True)
    answer_control = tuple(i - pos["shift"] for i in pos["answer"])
    result = {
        "positions": pos,
        "window": config.window_size,
        "answer_log_prob": answer_log_prob(out.logits, ids, *pos["answer"]),
        "answer_log_prob_control": answer_log_prob(out_control.logits, ids_control, *answer_control),
        "gdn": [],
        "hidden": [],
        "flags": [],
        "notes": [],
    }
    receptive = sum(config.window_size - 1 for c in config.layer_pattern if c == "S")
    if "S" in config.layer_pattern and pos["distance"] < receptive:
        result["notes"].append(f"the needle lies {pos['distance']} tokens before the query, within the "
                               f"{receptive} tokens that the stacked SWA windows reach, so the local paths alone "
                               "can carry it to the query")

    for layer, (info, info_control) in enumerate(zip(out.internals, out_control.internals)):
        if info["type"] == "gdn":
            result["gdn"].append({"layer": layer, **key_snr(info, info_control, pos, config.chunk_size,
                                                            n_random, seed)})
        trace = hidden_trace(info["hidden"][0].double().cpu().numpy(),
                             info_control["hidden"][0].double().cpu().numpy(), with_needle, pos)
        result["hidden"].append({"layer": layer, "type": info["type"], **trace})

    if not result["gdn"]:
        result["notes"].append(f"layer_pattern {config.layer_pattern!r} has no G layer, so there is no memory "
                               "state to read the needle from; only the hidden-state trace applies")
    else:
        snr = np.concatenate([r["snr_strongest"] for r in result["gdn"]])
        gain = snr / np.concatenate([r["snr_strongest_control"] for r in result["gdn"]])
        retained = (snr >= RETAINED_SNR) & (gain >= RETAINED_GAIN)
        result["best_snr"] = float(np.nanmax(snr))
        result["best_gain"] = float(np.nanmax(gain))
        result["heads_retaining"] = int(retained.sum())
        if not retained.any():
            result["flags"].append(
                f"no GDN head retains the needle {pos['distance']} tokens after it was written: best read SNR "
                f"{result['best_snr']:.2f}, best SNR relative to the control {result['best_gain']:.2f} "
                f"(a head retains it at SNR >= {RETAINED_SNR} and >= {RETAINED_GAIN} x the control)")
    return result
