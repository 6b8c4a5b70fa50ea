"""Evaluation suites: task generators, scoring only where it counts, memory ablations, suite outputs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from groundthink import GroundThinkConfig, GroundThinkLM
from groundthink.evals import SUITES, run_suite
from groundthink.evals.ablation import (cut_gdn_output_from, cut_global_pathway_from, cut_global_unsupported,
                                        zero_memory_at, zero_memory_unsupported)
from groundthink.evals.common import EvalError, parse_options
from groundthink.evals.honest import (build_entity_examples, copy_masks, entity_tracking, repeat_distances,
                                      state_ablation)
from groundthink.evals.mqar import (IGNORE_INDEX, MQAROptions, MQARTask, accuracy_from_logits, evaluate_mqar,
                                    generate_mqar, query_correct)
from groundthink.evals.niah import NIAHOptions, build_prompt, evaluate_cell
from groundthink.evals.text import NAMES, OBJECTS, choice_log_likelihoods, forced_choice, token_nll
from groundthink.evals.training import Mixture, TaskTraining, curriculum_mixture, train_mqar
from groundthink.ops import recurrent_gated_delta_rule
from groundthink.tokenizer import CharTokenizer

from conftest import REPO, SHARED_DATA

SHAKESPEARE = SHARED_DATA / "tinyshakespeare.txt"


def tiny_model(pattern: str, vocab: int = 64, dtype=torch.float64) -> GroundThinkLM:
    torch.manual_seed(3)
    config = GroundThinkConfig(vocab_size=vocab, d_model=32, n_heads=2, head_dim=8, expand_v=2.0,
                               layer_pattern=pattern, window_size=8, memory_block=8, chunk_size=4)
    model = GroundThinkLM(config).to(dtype)
    # Larger gate weights than the init, so the memory and the gate vary with the input.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("a_proj.weight", "b_proj.weight", "gate_proj.weight", "state_k_proj.weight")):
                p.normal_(0, 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def char_tokenizer() -> CharTokenizer:
    return CharTokenizer.train(SHAKESPEARE.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------
# MQAR generator
# ---------------------------------------------------------------------------------------------

class OracleModel(nn.Module):
    """Predicts each query's value by looking its key up in the pairs at the start of the input."""

    def __init__(self, task: MQARTask):
        super().__init__()
        self.task = task
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        B, T = input_ids.shape
        N, V = self.task.num_pairs, self.task.vocab_size
        logits = torch.zeros(B, T, V)
        for b in range(B):
            pairs = dict(zip(input_ids[b, 0:2 * N:2].tolist(), input_ids[b, 1:2 * N:2].tolist()))
            for t in range(2 * N, T):
                key = int(input_ids[b, t])
                if key in pairs:
                    logits[b, t, pairs[key]] = 1.0
        return logits


class RandomModel(nn.Module):
    """Random logits: argmax uniform over the allowed token ids."""

    def __init__(self, vocab: int, allowed: torch.Tensor | None = None):
        super().__init__()
        self.vocab = vocab
        self.allowed = allowed
        self.dummy = nn.Parameter(torch.zeros(()))
        self.generator = torch.Generator().manual_seed(0)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits = torch.rand(*input_ids.shape, self.vocab, generator=self.generator)
        if self.allowed is not None:
            logits[..., ~self.allowed] = -math.inf
        return logits


class SuffixCopyModel(nn.Module):
    """Text oracle: at each of the last `tail` positions, predicts the token that followed the
    longest earlier occurrence of the current suffix (an idealised induction head)."""

    def __init__(self, vocab: int, tail: int = 12):
        super().__init__()
        self.vocab = vocab
        self.tail = tail
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        B, T = input_ids.shape
        logits = torch.zeros(B, T, self.vocab)
        for b in range(B):
            ids = input_ids[b].tolist()
            for t in range(max(0, T - self.tail), T):
                best, follow = 0, None
                for j in range(t):
                    n = 0
                    while n <= j and ids[j - n] == ids[t - n]:
                        n += 1
                    if n > best:
                        best, follow = n, ids[j + 1]
                if follow is not None:
                    logits[b, t, follow] = 30.0
        return logits


class UniformModel(nn.Module):
    """Equal logits for every token."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*input_ids.shape, self.vocab)


def test_mqar_generator_deterministic():
    """The same seed gives the same batch and another seed a different one."""
    task = MQARTask(vocab_size=256, seq_len=128, num_pairs=16)
    a, b, c = generate_mqar(task, 8, seed=5), generate_mqar(task, 8, seed=5), generate_mqar(task, 8, seed=6)
    assert torch.equal(a.inputs, b.inputs)
    assert torch.equal(a.labels, b.labels)
    assert not torch.equal(a.inputs, c.inputs)


@pytest.mark.parametrize("random_non_queries", [True, False])
def test_mqar_structure(random_non_queries):
    """Pairs k v k v ... first, every key queried once later, labels only at queries and equal to the key's value."""
    V, T, N = 128, 96, 12
    task = MQARTask(vocab_size=V, seq_len=T, num_pairs=N, random_non_queries=random_non_queries)
    batch = generate_mqar(task, 20, seed=0)
    assert batch.inputs.shape == (20, T)
    assert batch.labels.shape == (20, T)
    for e in range(20):
        ids, labels = batch.inputs[e].tolist(), batch.labels[e].tolist()
        keys, values = ids[0:2 * N:2], ids[1:2 * N:2]
        assert all(1 <= k < V // 2 for k in keys), keys
        assert all(V // 2 <= v < V for v in values), values
        assert len(set(keys)) == N
        assert len(set(values)) == N
        value_of = dict(zip(keys, values))

        query_positions = [t for t in range(T) if labels[t] != IGNORE_INDEX]
        assert sorted(batch.query_positions[e].tolist()) == query_positions
        assert len(query_positions) == N
        assert all(t >= 2 * N and (t - 2 * N) % 2 == 0 for t in query_positions)
        assert sorted(ids[t] for t in query_positions) == sorted(keys)
        for t in query_positions:
            assert labels[t] == value_of[ids[t]]
        for j, t in enumerate(batch.query_positions[e].tolist()):
            assert ids[batch.pair_positions[e, j]] == ids[t]
        assert all(labels[t] == IGNORE_INDEX for t in range(2 * N))

        filler = [ids[t] for t in range(2 * N, T) if t not in query_positions]
        if random_non_queries:
            assert len(set(filler)) > 1
        else:
            assert set(filler) == {0}


def test_mqar_power_law_places_queries_early():
    """power_a = 0.01 puts queries nearer the pairs than the uniform placement (power_a = 1)."""
    skewed = generate_mqar(MQARTask(vocab_size=512, seq_len=256, num_pairs=8, power_a=0.01), 200, seed=0)
    uniform = generate_mqar(MQARTask(vocab_size=512, seq_len=256, num_pairs=8, power_a=1.0), 200, seed=0)
    assert skewed.query_positions.float().mean() < uniform.query_positions.float().mean() - 20


@pytest.mark.parametrize("kwargs, message", [
    (dict(vocab_size=256, seq_len=64, num_pairs=17), "num_pairs=17"),
    (dict(vocab_size=20, seq_len=64, num_pairs=12), "vocab_size=20"),
    (dict(vocab_size=256, seq_len=64, num_pairs=0), "num_pairs=0"),
    (dict(vocab_size=256, seq_len=64, num_pairs=4, power_a=0.0), "power_a"),
])
def test_mqar_rejects_bad_task(kwargs, message):
    """More pairs than fit, too few key ids, zero pairs or a non-positive exponent raise a named error."""
    with pytest.raises(EvalError, match=message):
        generate_mqar(MQARTask(**kwargs), 4, seed=0)


def test_mqar_oracle_scores_one():
    """A model that looks keys up in the pairs gets every query right."""
    task = MQARTask(vocab_size=128, seq_len=96, num_pairs=12)
    result = evaluate_mqar(OracleModel(task), task, 16, seed=0, batch_size=8)
    assert result["accuracy"] == 1.0
    assert result["queries"] == 16 * 12


def test_mqar_random_model_scores_chance():
    """Random predictions among the value ids score 1 / (number of values), within 4 standard deviations."""
    task = MQARTask(vocab_size=128, seq_len=256, num_pairs=32)
    allowed = torch.arange(128) >= 64
    result = evaluate_mqar(RandomModel(128, allowed), task, 200, seed=0, batch_size=50)
    n, p = result["queries"], task.chance
    assert abs(result["accuracy"] - p) < 4 * math.sqrt(p * (1 - p) / n), (result["accuracy"], p)


def test_mqar_accuracy_counts_query_positions_only():
    """Right everywhere except at the queries scores 0; right only at the queries scores 1."""
    task = MQARTask(vocab_size=64, seq_len=64, num_pairs=8)
    batch = generate_mqar(task, 4, seed=1)
    queries = batch.labels != IGNORE_INDEX
    next_tokens = torch.cat([batch.inputs[:, 1:], batch.inputs[:, :1]], dim=1)

    wrong_at_queries = torch.where(queries, (batch.labels + 1) % 64, next_tokens)
    logits = nn.functional.one_hot(wrong_at_queries, 64).float()
    assert accuracy_from_logits(logits, batch.labels) == (0, 32)

    right_at_queries = torch.where(queries, batch.labels, (next_tokens + 1) % 64)
    logits = nn.functional.one_hot(right_at_queries, 64).float()
    assert accuracy_from_logits(logits, batch.labels) == (32, 32)

    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.dummy = nn.Parameter(torch.zeros(()))

        def forward(self, input_ids):
            return logits

    assert bool(query_correct(Fixed(), batch, batch_size=4).all())


def test_mqar_training_loop_learns_and_repeats():
    """A few updates lower the query loss, and the same seed repeats the run exactly."""
    task = MQARTask(vocab_size=32, seq_len=32, num_pairs=4)
    settings = TaskTraining(max_steps=12, batch_size=8, lr=3e-3, warmup_steps=2, eval_every=6, eval_examples=16)
    histories = []
    for _ in range(2):
        model = tiny_model("GS", vocab=32, dtype=torch.float32)
        histories.append(train_mqar(model, task, settings))
    assert histories[0].train_loss == histories[1].train_loss
    assert histories[0].eval_accuracy == histories[1].eval_accuracy
    assert histories[0].train_loss[-1] < math.log(32)


def test_mixture_curriculum_and_budget():
    """A task with start f is never drawn before f; the budgeted schedule is the longest that fits."""
    def task(T, N):
        return MQARTask(vocab_size=128, seq_len=T, num_pairs=N)

    mixture = Mixture([(task(32, 4), 3.0), (task(64, 8), 1.0, 0.0), (task(128, 16), 2.0, 0.5)], task(128, 16))
    assert mixture.probabilities(0.49).tolist() == [0.75, 0.25, 0.0]
    assert mixture.probabilities(0.5).tolist() == [0.5, 1 / 6, 1 / 3]
    n = mixture.steps_within(50_000, max_steps=100_000)

    def cost(steps):
        return sum(mixture.expected_tokens(i / steps) for i in range(steps))

    assert cost(n) <= 50_000 < cost(n + 1)
    curriculum = curriculum_mixture(task(256, 32))
    assert [(t.seq_len, t.num_pairs, w, f) for t, w, f in curriculum] == [
        (32, 4, 3.0, 0.0), (64, 8, 2.0, 0.0), (128, 16, 1.0, 0.25), (256, 32, 2.0, 0.25)]
    with pytest.raises(EvalError, match="start at 0"):
        Mixture([(task(32, 4), 1.0, 0.5)], task(32, 4))
    with pytest.raises(EvalError, match="vocab_size"):
        Mixture([(MQARTask(vocab_size=64, seq_len=32, num_pairs=4), 1.0)], task(32, 4))


# ---------------------------------------------------------------------------------------------
# Ablations
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern", ["GS", "GG", "GSGS"])
def test_zero_memory_changes_after_not_before(pattern):
    """Zeroing the memory at p leaves logits before p bit-identical and changes them from p on."""
    model = tiny_model(pattern)
    ids = torch.randint(0, 64, (2, 29))
    p = 13
    with torch.no_grad():
        intact = model(ids).logits
        with zero_memory_at(model, p):
            ablated = model(ids).logits
    assert torch.equal(ablated[:, :p], intact[:, :p])
    assert (ablated[:, p:] - intact[:, p:]).abs().max() > 1e-6
    with torch.no_grad():
        assert torch.equal(model(ids).logits, intact), "the hook outlived its context"


def test_zero_memory_forgets_tokens_before_p():
    """With the hook, each GDN layer's final state equals a recurrence started from zero at p."""
    model = tiny_model("GS")
    ids = torch.randint(0, 64, (2, 29))
    p = 11
    with torch.no_grad(), zero_memory_at(model, p):
        internals = model(ids, return_internals=True).internals
    gdn = internals[0]
    assert bool((gdn["g"][:, p] <= -999.0).all())
    assert float(torch.exp(gdn["g"][:, p]).abs().max()) == 0.0
    _, restarted = recurrent_gated_delta_rule(gdn["q"][:, p:], gdn["k"][:, p:], gdn["v"][:, p:], gdn["g"][:, p:],
                                              gdn["beta"][:, p:], output_final_state=True)
    diff = (gdn["final_state"] - restarted).abs().max().item()
    assert diff < 1e-10, f"final state differs from a restart at p by {diff:.3e}"
    _, full = recurrent_gated_delta_rule(gdn["q"], gdn["k"], gdn["v"], gdn["g"].clamp(min=-5), gdn["beta"],
                                         output_final_state=True)
    assert (full - restarted).abs().max() > 1e-6, "the test is vacuous: the old tokens did not matter"


def test_cut_global_pathway_closes_gate_from_p():
    """Cutting the global pathway zeroes the gate from p on and leaves everything before p unchanged."""
    model = tiny_model("GSGS")
    ids = torch.randint(0, 64, (2, 29))
    p = 9
    with torch.no_grad():
        intact = model(ids, return_internals=True)
        with cut_global_pathway_from(model, p):
            ablated = model(ids, return_internals=True)
    for layer in (1, 3):
        gate = ablated.internals[layer]["gate"]
        assert bool((gate[:, p:] == 0).all())
        assert torch.equal(gate[:, :p], intact.internals[layer]["gate"][:, :p])
    assert torch.equal(ablated.logits[:, :p], intact.logits[:, :p])
    assert (ablated.logits[:, p:] - intact.logits[:, p:]).abs().max() > 1e-6


def test_cut_gdn_output_keeps_memory():
    """Cutting the GDN output changes logits from p on but leaves the memory the S layer reads unchanged."""
    model = tiny_model("GSGS")
    ids = torch.randint(0, 64, (2, 29))
    p = 10
    with torch.no_grad():
        intact = model(ids, return_internals=True)
        with cut_gdn_output_from(model, p):
            ablated = model(ids, return_internals=True)
    assert torch.equal(ablated.logits[:, :p], intact.logits[:, :p])
    assert (ablated.logits[:, p:] - intact.logits[:, p:]).abs().max() > 1e-6
    # Layer 0's memory depends only on the embeddings, so the S layer above it reads the same memory.
    assert torch.equal(ablated.internals[1]["memory"], intact.internals[1]["memory"])


@pytest.mark.parametrize("pattern, memory_ok, global_ok", [
    ("GS", True, True), ("GG", True, False), ("SS", False, False), ("AA", False, False), ("SG", True, False),
])
def test_ablation_support_by_pattern(pattern, memory_ok, global_ok):
    """Models without G layers, or without an S layer above a G layer, get a reason instead of a hook."""
    model = tiny_model(pattern)
    assert (zero_memory_unsupported(model) is None) == memory_ok
    assert (cut_global_unsupported(model) is None) == global_ok
    if not memory_ok:
        assert "no G" in zero_memory_unsupported(model)
        with pytest.raises(ValueError, match="cannot zero the memory"):
            with zero_memory_at(model, 3):
                pass
    if not global_ok:
        assert "global pathway" in cut_global_unsupported(model)


def test_state_ablation_skips_with_reason():
    """The state-ablation test reports, per ablation, either numbers or why it was skipped."""
    windows = torch.randint(0, 64, (2, 33))
    result = state_ablation(tiny_model("SS"), windows, position=16, far=8, batch_size=2)
    assert "no G" in result["zero_memory"]["skipped"]
    assert "global pathway" in result["cut_global"]["skipped"]

    result = state_ablation(tiny_model("GS"), windows, position=16, far=8, batch_size=2)
    for name in ("zero_memory", "cut_global"):
        assert result[name]["max_abs_change_before"] == 0.0
        assert result[name]["ppl_ablated_after"] != result[name]["ppl_intact_after"]


# ---------------------------------------------------------------------------------------------
# Text tasks
# ---------------------------------------------------------------------------------------------

def test_repeat_distances_and_copy_masks():
    """A token completing a repeat of `match` tokens is far only when the previous copy ended more than W back."""
    window = np.array([1, 2, 3, 9, 9, 9, 9, 9, 9, 1, 2, 3, 1, 2, 3])
    assert repeat_distances(window, 3).tolist()[11] == 9
    assert repeat_distances(window, 3).tolist()[14] == 3
    far, near = copy_masks(window[None], distance=5, match=3)
    # Targets are window[1:], so token i sits in column i - 1.
    assert bool(far[0, 10])
    assert not bool(near[0, 10])
    assert bool(near[0, 13])
    assert not bool(far[0, 13])
    assert int(far.sum()) == 1


def test_niah_prompt_structure(char_tokenizer):
    """A prompt has the exact length, the needle at the asked depth, and ends with the question."""
    corpus = np.asarray(char_tokenizer.encode(SHAKESPEARE.read_text(encoding="utf-8")[:20000]))
    for depth in (0.0, 0.5, 1.0):
        rng = np.random.default_rng(0)
        example = build_prompt(char_tokenizer, corpus, 400, depth, "single", 3, "word", rng)
        text = char_tokenizer.decode(example["prompt"])
        answer = char_tokenizer.decode(example["answer"])
        assert len(example["prompt"]) == 400
        name = text.rsplit("The passkey of ", 1)[1].removesuffix(" is")
        needle = f"The passkey of {name} is{answer}.\n"
        assert text.endswith(f"\nThe passkey of {name} is")
        assert text.count(needle) == 1
        at = text.index(needle) / (400 - len(needle) - len(f"\nThe passkey of {name} is"))
        assert abs(at - depth) < 0.25, (depth, at)


def test_niah_distractors_differ_by_one_letter(char_tokenizer):
    """Distractor needles carry names one letter away from the queried name."""
    corpus = np.asarray(char_tokenizer.encode(SHAKESPEARE.read_text(encoding="utf-8")[:20000]))
    example = build_prompt(char_tokenizer, corpus, 600, 0.5, "distractor", 3, "word", np.random.default_rng(1))
    text = char_tokenizer.decode(example["prompt"])
    name = text.rsplit("The passkey of ", 1)[1].removesuffix(" is")
    keys = [line.split(" is ")[0].removeprefix("The passkey of ") for line in text.split("\n")
            if line.startswith("The passkey of ") and " is " in line]
    similar = [k for k in keys if k != name]
    assert len(similar) == 3
    for key in similar:
        assert len(key) == len(name)
        assert sum(a != b for a, b in zip(key, name)) == 1, (key, name)


def test_niah_rejects_bad_options(char_tokenizer):
    """A depth outside [0, 1], an unknown variant or a value kind the tokenizer lacks raise named errors."""
    with pytest.raises(EvalError, match="depth"):
        parse_options(NIAHOptions, ["depths=0.5,1.5"])
    with pytest.raises(EvalError, match="variants"):
        parse_options(NIAHOptions, ["variants=single,triple"])
    corpus = np.asarray(char_tokenizer.encode("x" * 2000))
    with pytest.raises(EvalError, match="cannot represent"):
        build_prompt(char_tokenizer, corpus, 300, 0.5, "single", 0, "number", np.random.default_rng(0))


def test_entity_examples_structure(char_tokenizer):
    """Entity prompts share one length, state every fact once and ask about one entity."""
    haystack = np.asarray(char_tokenizer.encode(SHAKESPEARE.read_text(encoding="utf-8")[:5000]))
    examples = build_entity_examples(char_tokenizer, haystack, 10, 50, 6, np.random.default_rng(0))
    assert len({len(e["prompt"]) for e in examples}) == 1
    for e in examples:
        text = char_tokenizer.decode(e["prompt"])
        facts = [line for line in text.split("\n") if " has a " in line and line.endswith(".")]
        assert len(facts) >= 10
        queried = text.rsplit("\n", 1)[1].removesuffix(" has a")
        assert queried in NAMES
        thing = char_tokenizer.decode(e["answer"]).strip()
        assert thing in OBJECTS
        assert f"{queried} has a {thing}.\n" in text
        assert len(e["others"]) == 9
        assert e["answer"].tolist() not in [o.tolist() for o in e["others"]]


def test_choice_log_likelihoods_match_token_nll():
    """Candidate scores equal minus the summed per-token NLL of prompt + candidate, for candidates
    of different lengths scored in one padded batch."""
    model = tiny_model("GSA", vocab=32)
    rng = np.random.default_rng(0)
    prompts = torch.from_numpy(rng.integers(0, 32, size=(3, 20)))
    choices = [[rng.integers(0, 32, size=n) for n in lengths] for lengths in ([1, 4], [3, 3, 2], [5])]
    scores = choice_log_likelihoods(model, prompts, choices, batch_size=2)
    for i, cands in enumerate(choices):
        for j, cand in enumerate(cands):
            row = torch.cat([prompts[i], torch.from_numpy(cand)])
            with torch.no_grad():
                log_probs = torch.log_softmax(model(row[None]).logits[0], dim=-1)
            expected = sum(float(log_probs[t - 1, row[t]]) for t in range(len(prompts[i]), len(row)))
            assert scores[i][j] == pytest.approx(expected, rel=1e-12, abs=1e-12)
            assert float(token_nll(model, row[None], 1)[0, -len(cand):].sum()) == pytest.approx(-expected, rel=1e-6)


def test_forced_choice_credit_ties_and_margin():
    """The right value scoring highest earns 1, a tie of k earns 1/k and a loss 0. The margin is the
    right value's score minus the best other score."""
    result = forced_choice([np.array([-1.0, -2.0, -3.0]), np.array([-1.0, -1.0]), np.array([-5.0, -1.0, -1.0, -1.0])])
    assert result["choice_accuracy"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    assert result["choice_chance"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 4) / 3)
    assert result["margin_nats"] == pytest.approx((1.0 + 0.0 - 4.0) / 3)


@pytest.mark.parametrize("variant", ["single", "multi", "distractor"])
def test_niah_forced_choice_oracle_and_uniform(char_tokenizer, variant):
    """An induction-head oracle wins every forced choice and exact match; equal logits score
    exactly chance. The foils are the other needles' values when the variant has them."""
    corpus = np.asarray(char_tokenizer.encode(SHAKESPEARE.read_text(encoding="utf-8")[:20000]))
    example = build_prompt(char_tokenizer, corpus, 300, 0.3, variant, 3, "word", np.random.default_rng(4), foils=3)
    values = [char_tokenizer.decode(f) for f in example["foils"]]
    assert len(values) == 3
    assert char_tokenizer.decode(example["answer"]) not in values
    text = char_tokenizer.decode(example["prompt"])
    if variant == "single":
        assert not any(v.strip() in text for v in values)
    else:
        assert [char_tokenizer.decode(o) for o in example["others"]] == values

    options = NIAHOptions(examples=2, foils=3, extra_needles=3)
    oracle = evaluate_cell(SuffixCopyModel(char_tokenizer.vocab_size), char_tokenizer, corpus, 200, 0.5, variant,
                           options, seed=[0])
    assert oracle["accuracy"] == 1.0
    assert oracle["choice_accuracy"] == 1.0
    assert oracle["margin_nats"] > 10
    uniform = evaluate_cell(UniformModel(char_tokenizer.vocab_size), char_tokenizer, corpus, 200, 0.5, variant,
                            options, seed=[0])
    assert uniform["choice_accuracy"] == pytest.approx(0.25)
    assert uniform["choice_chance"] == pytest.approx(0.25)


def test_entity_forced_choice_uses_other_entities(char_tokenizer):
    """Entity foils are other entities' attributes from the prompt; the oracle wins every choice."""
    haystack = np.asarray(char_tokenizer.encode(SHAKESPEARE.read_text(encoding="utf-8")[:5000]))
    examples = build_entity_examples(char_tokenizer, haystack, 6, 20, 4, np.random.default_rng(2), foils=4)
    for e in examples:
        others = [o.tolist() for o in e["others"]]
        assert len(e["foils"]) == 4
        assert all(f.tolist() in others for f in e["foils"])
    single = build_entity_examples(char_tokenizer, haystack, 1, 20, 2, np.random.default_rng(2), foils=4)
    for e in single:
        text = char_tokenizer.decode(e["prompt"])
        assert len(e["foils"]) == 4
        assert not any(f" {char_tokenizer.decode(f).strip()}." in text for f in e["foils"])
    result = entity_tracking(SuffixCopyModel(char_tokenizer.vocab_size), char_tokenizer, haystack, [5], [16], 2,
                             batch_size=4, seed=0, foils=4)
    cell = result["cells"][0]
    assert cell["accuracy"] == 1.0
    assert cell["choice_accuracy"] == 1.0
    assert cell["choice_chance"] == pytest.approx(0.2)


def test_parse_options_types_and_errors():
    """Comma lists become tuples of the field's type; unknown keys name the valid ones."""
    options = parse_options(MQAROptions, ["num_pairs=4,8", "power_a=1", "examples=3"])
    assert options.num_pairs == (4, 8)
    assert options.power_a == 1.0
    assert options.examples == 3
    with pytest.raises(EvalError, match="valid options"):
        parse_options(MQAROptions, ["pairs=4"])
    with pytest.raises(EvalError, match="expected int"):
        parse_options(MQAROptions, ["examples=many"])


# ---------------------------------------------------------------------------------------------
# Suites end to end
# ---------------------------------------------------------------------------------------------

def _without_timing(results: dict) -> dict:
    return {k: v for k, v in results.items() if k != "seconds"}


def test_mqar_suite_writes_results_and_repeats(tmp_path):
    """The mqar suite writes results.json and a PNG, and the same seed repeats the numbers."""
    model = tiny_model("GS", vocab=64, dtype=torch.float32)
    options = ["seq_lens=32", "num_pairs=4,16", "examples=8"]
    first = run_suite("mqar", model, None, tmp_path / "a", seed=1, overrides=options)
    second = run_suite("mqar", model, None, tmp_path / "b", seed=1, overrides=options)
    assert _without_timing(first) == _without_timing(second)
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    assert saved["suite"] == "mqar"
    assert len(saved["cells"]) == 1
    assert saved["skipped"][0]["num_pairs"] == 16
    assert (tmp_path / "a" / "mqar_accuracy.png").stat().st_size > 0


@pytest.mark.parametrize("pattern", ["GS", "SS"])
def test_text_suites_run_on_real_text(tmp_path, char_tokenizer, pattern):
    """honest, niah and ppl run on TinyShakespeare and write results; SS skips the ablations by name."""
    model = tiny_model(pattern, vocab=char_tokenizer.vocab_size, dtype=torch.float32)
    honest = run_suite("honest", model, char_tokenizer, tmp_path / "honest", text=str(SHAKESPEARE),
                       overrides=["seq_len=64", "max_windows=2", "entity_counts=5", "distractor_tokens=16",
                                  "entity_examples=2", "ar_pairs=4", "ar_seq_len=32", "ar_examples=4"])
    skipped = "skipped" in honest["state_ablation"]["zero_memory"]
    assert skipped == (pattern == "SS")
    assert (tmp_path / "honest" / "results.json").exists()
    niah = run_suite("niah", model, char_tokenizer, tmp_path / "niah", text=str(SHAKESPEARE),
                     overrides=["context_lengths=160", "depths=0,1", "examples=1", "variants=single"])
    assert len(niah["cells"]) == 2
    assert (tmp_path / "niah" / "niah_single.png").exists()
    ppl = run_suite("ppl", model, char_tokenizer, tmp_path / "ppl", text=str(SHAKESPEARE),
                    overrides=["seq_len=32", "max_windows=2"])
    assert ppl["bits_per_char"] == pytest.approx(ppl["loss"] / math.log(2))


@pytest.mark.parametrize("lengths, bad", [("100", 100), ("400,100", 100), ("200,20000000", 20000000)])
def test_niah_checks_lengths_before_model(tmp_path, char_tokenizer, capsys, lengths, bad):
    """A context length too short for the multi-variant needles, or longer than the text, raises
    before the model runs, a table is printed or a plot is written, even when the single variant fits."""
    model = tiny_model("GS", vocab=char_tokenizer.vocab_size, dtype=torch.float32)
    calls = []
    model.register_forward_pre_hook(lambda module, inputs: calls.append(1))
    out = tmp_path / "niah"
    with pytest.raises(EvalError, match=f"context length {bad}"):
        run_suite("niah", model, char_tokenizer, out, text=str(SHAKESPEARE),
                  overrides=[f"context_lengths={lengths}", "depths=0.5", "examples=1", "variants=single,multi"])
    assert calls == []
    assert capsys.readouterr().out == ""
    assert not out.exists()


def test_suite_registry_and_text_requirement(char_tokenizer):
    """Every suite is registered; text suites without --text raise an error that names the option."""
    assert set(SUITES) == {"mqar", "niah", "honest", "ppl"}
    model = tiny_model("GS", vocab=char_tokenizer.vocab_size, dtype=torch.float32)
    with pytest.raises(EvalError, match="--text"):
        run_suite("ppl", model, char_tokenizer, "unused")
    with pytest.raises(EvalError, match="unknown suite"):
        run_suite("recall", model, char_tokenizer, "unused")


def test_cli_train_mqar_then_eval(tmp_path, capsys):
    """`train --task mqar` writes a checkpoint that `eval --suite mqar` scores on the trained task."""
    from groundthink.cli import main

    run = tmp_path / "run"
    code = main(["train", "--task", "mqar", "--config", str(REPO / "configs" / "tiny.toml"),
                 "--mqar", "vocab_size=32", "--mqar", "seq_len=32", "--mqar", "num_pairs=4", "--mqar", "mixture=none",
                 "--set", "train.max_steps=4", "--set", "train.eval_interval=2", "--out", str(run)])
    assert code == 0
    assert "MQAR accuracy" in capsys.readouterr().out
    out = tmp_path / "eval"
    code = main(["eval", str(run), "--suite", "mqar", "--out", str(out), "--option", "examples=4"])
    assert code == 0
    saved = json.loads((out / "results.json").read_text())
    assert [(c["task"]["seq_len"], c["task"]["num_pairs"]) for c in saved["cells"]] == [(32, 4)]
    assert main(["train", "--task", "mqar", "--mqar", "num_pairs=999", "--out", str(tmp_path / "bad")]) == 1
    assert "num_pairs=999" in capsys.readouterr().err
