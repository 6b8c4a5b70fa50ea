"""Real-text helpers of the text suites: corpus splits, token windows, per-token loss, greedy
decoding and forced-choice scoring."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import EvalError, model_logits

SPLITS = ("val", "train", "all")

NAMES = (
    "Alice", "Bruno", "Clara", "Dmitri", "Elena", "Felix", "Greta", "Hugo", "Irene", "Jonas",
    "Karin", "Lucas", "Marta", "Nikos", "Olga", "Pablo", "Quinn", "Rosa", "Stefan", "Tamara",
    "Ulrich", "Vera", "Walter", "Xenia", "Yusuf", "Zora", "Anton", "Bianca", "Cyril", "Dora",
    "Emil", "Fiona", "Gregor", "Hanna", "Igor", "Julia", "Kasper", "Lena", "Milan", "Nora",
    "Oskar", "Petra", "Rafael", "Sonja", "Tobias", "Ursula", "Viktor", "Wanda", "Yvonne", "Zeno",
    "Arthur", "Beatrix", "Conrad", "Delia", "Edgar", "Flora", "Gideon", "Helga", "Isidor", "Jasmin",
)
"""Entity names of the entity-tracking and needle tests (letters only, distinct)."""

OBJECTS = (
    "apple", "basket", "candle", "drum", "feather", "glove", "hammer", "jacket", "kettle", "ladder",
    "mirror", "needle", "orange", "pillow", "ribbon", "saddle", "teapot", "umbrella", "violin", "wagon",
    "anchor", "bottle", "compass", "dagger", "engine", "flute", "guitar", "helmet", "island", "jewel",
    "kite", "lantern", "marble", "notebook", "oyster", "pencil", "quilt", "rocket", "shovel", "ticket",
    "unicorn", "vase", "whistle", "yacht", "zipper", "barrel", "cactus", "donkey", "falcon", "goblet",
    "harp", "iceberg", "jug", "kayak", "lemon", "magnet", "napkin", "parrot", "radish", "sponge",
)
"""Attributes of the entity-tracking test (letters only, distinct)."""


def load_text(path: str | Path | None, split: str = "val", val_fraction: float = 0.1) -> str:
    """Read a UTF-8 corpus and return one split of its characters.

    "val" is the last `val_fraction` of the characters (the text trainer's held-out split for
    a file source), "train" the rest, "all" everything.
    """
    if not path:
        raise EvalError("this suite needs real text: pass --text PATH (a UTF-8 file such as tinyshakespeare.txt)")
    path = Path(path)
    if split not in SPLITS:
        raise EvalError(f"invalid split={split!r}: use one of {SPLITS}")
    if not 0.0 < val_fraction < 1.0:
        raise EvalError(f"invalid val_fraction={val_fraction!r}: must lie strictly between 0 and 1")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EvalError(f"text file not found: {path}") from None
    except UnicodeDecodeError as err:
        raise EvalError(f"text file {path} is not valid UTF-8 ({err}); convert it to UTF-8") from None
    cut = int(len(text) * (1.0 - val_fraction))
    part = {"val": text[cut:], "train": text[:cut], "all": text}[split]
    if not part.strip():
        raise EvalError(f"the {split} split of {path} is empty; use a longer file or another split")
    return part


def encode(tokenizer, text: str) -> np.ndarray:
    """Token ids (int64) of text."""
    return np.asarray(tokenizer.encode(text), dtype=np.int64)


def encode_exact(tokenizer, text: str, what: str) -> np.ndarray:
    """Encode text; raise EvalError when the ids do not decode back to the same text.

    That happens for characters the tokenizer does not know, such as digits for a char
    vocabulary built from text without digits.
    """
    ids = encode(tokenizer, text)
    back = tokenizer.decode(ids)
    if back != text:
        raise EvalError(f"the tokenizer cannot represent the {what} {text!r} (it decodes back as {back!r}); "
                        "choose a value kind made of characters the tokenizer knows, e.g. value_kind=word")
    return ids


def words_of(text: str, min_length: int = 3, max_count: int | None = None) -> list[str]:
    """Distinct lowercase alphabetic words of text, in order of first appearance."""
    seen: dict[str, None] = {}
    for word in re.findall(r"[A-Za-z]+", text):
        word = word.lower()
        if len(word) >= min_length and word not in seen:
            seen[word] = None
            if max_count is not None and len(seen) >= max_count:
                break
    return list(seen)


def token_windows(ids: np.ndarray, length: int, max_windows: int) -> np.ndarray:
    """Up to max_windows non-overlapping windows [n, length] taken in order from ids."""
    n = min(len(ids) // length, max_windows)
    if n == 0:
        raise EvalError(f"the text has {len(ids)} tokens, fewer than one window of {length}; "
                        "use a shorter seq_len or a longer text")
    return ids[: n * length].reshape(n, length)


@torch.no_grad()
def token_nll(model: nn.Module, windows: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Negative log-likelihood (nats) of windows[:, 1:] given the tokens before, [n, T - 1]."""
    parts = []
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start:start + batch_size]
        logits = model_logits(model, ids[:, :-1]).float()
        targets = ids[:, 1:].to(logits.device)
        nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        parts.append(nll.view(targets.shape).cpu())
    return torch.cat(parts, dim=0)


def perplexity(nll: torch.Tensor) -> float:
    """exp of the mean NLL, nan for no tokens."""
    return math.exp(float(nll.mean())) if nll.numel() else float("nan")


@torch.no_grad()
def greedy_continuations(model: nn.Module, prompts: torch.Tensor, n_tokens: int, batch_size: int) -> torch.Tensor:
    """Greedy continuation [n, n_tokens] of prompts [n, P] of equal length.

    Each new token costs one full forward pass over the prompt and the tokens so far, so the
    result is the argmax decoding of the parallel forward pass, without a decoding cache.
    """
    outputs = []
    for start in range(0, prompts.shape[0], batch_size):
        ids = prompts[start:start + batch_size]
        for _ in range(n_tokens):
            next_token = model_logits(model, ids)[:, -1].argmax(dim=-1).cpu()
            ids = torch.cat([ids, next_token[:, None]], dim=1)
        outputs.append(ids[:, prompts.shape[1]:])
    return torch.cat(outputs, dim=0)


def starts_with(generated: Sequence[int], expected: Sequence[int]) -> bool:
    """Return whether the generated ids begin with the expected ids."""
    return len(generated) >= len(expected) and list(generated[: len(expected)]) == list(expected)


@torch.no_grad()
def choice_log_likelihoods(model: nn.Module, prompts: torch.Tensor, choices: Sequence[Sequence[np.ndarray]],
                           batch_size: int) -> list[np.ndarray]:
    """Log-likelihood (nats, summed over tokens) of each candidate continuation of each prompt.

    prompts is [n, P]; choices[i] contains the candidate id arrays of prompt i. Every (prompt,
    candidate) pair is one row of prompt + candidate, right-padded to the longest candidate;
    the model is causal, so the padding does not change the scored positions. Returns one
    float64 array per prompt, in the order of its candidates.
    """
    if len(choices) != prompts.shape[0]:
        raise EvalError(f"{len(choices)} candidate lists for {prompts.shape[0]} prompts; pass one list per prompt")
    owners = [(i, j) for i, cands in enumerate(choices) for j in range(len(cands))]
    longest = max(len(c) for cands in choices for c in cands)
    n_prompt = prompts.shape[1]
    rows = torch.zeros(len(owners), n_prompt + longest, dtype=torch.long)
    mask = torch.zeros(len(owners), longest, dtype=torch.bool)
    for r, (i, j) in enumerate(owners):
        candidate = torch.as_tensor(np.asarray(choices[i][j], dtype=np.int64))
        rows[r, :n_prompt] = prompts[i]
        rows[r, n_prompt:n_prompt + len(candidate)] = candidate
        mask[r, :len(candidate)] = True
    scores = []
    for start in range(0, len(owners), batch_size):
        ids = rows[start:start + batch_size]
        # Logits at positions P - 1 ... P + longest - 2 predict the candidate tokens.
        logits = model_logits(model, ids[:, :-1])[:, n_prompt - 1:]
        # Half-precision logits are scored in float32; float32 and float64 keep their precision.
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        log_probs = torch.log_softmax(logits, dim=-1).cpu()
        picked = log_probs.gather(-1, ids[:, n_prompt:, None]).squeeze(-1)
        scores.append((picked.double() * mask[start:start + batch_size]).sum(dim=1))
    flat = torch.cat(scores).numpy()
    out, cursor = [], 0
    for cands in choices:
        out.append(flat[cursor:cursor + len(cands)])
        cursor += len(cands)
    return out


def forced_choice(scores: Sequence[np.ndarray]) -> dict[str, Any]:
    """Summaries of candidate log-likelihoods whose first entry is the right answer.

    choice_accuracy averages, over prompts, 1 / (candidates tied at the top) when the answer is
    among them and 0 otherwise, so a model that scores every candidate alike gets exactly the
    chance level 1 / candidates. margin_nats is the mean of log p(answer) - max log p(other).
    """
    credit, margins = [], []
    for s in scores:
        best = s.max()
        credit.append(1.0 / int((s == best).sum()) if s[0] == best else 0.0)
        if len(s) > 1:
            margins.append(float(s[0] - s[1:].max()))
    return {"choice_accuracy": float(np.mean(credit)),
            "choice_chance": float(np.mean([1.0 / len(s) for s in scores])),
            "margin_nats": float(np.mean(margins)) if margins else float("nan")}
