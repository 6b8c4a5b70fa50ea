"""Tests of the scaling planner: analytic counts against the real model, and the plan command."""

from __future__ import annotations

import dataclasses
import itertools
import json

import pytest
import torch

from groundthink import GroundThinkConfig, GroundThinkLM
from groundthink.cli import main
from groundthink.config import ConfigError
from groundthink.plan import (Budget, activation_bytes, decode_cache_bytes, format_comparison, format_plan,
                              measure_saved_tensor_bytes, measure_training_step_peak, parameter_counts, parse_bytes,
                              plan, recurrent_memory, resolve_changes, training_memory)

TINY = dict(vocab_size=50, d_model=32, n_heads=2, head_dim=8, window_size=16, memory_block=16, chunk_size=16,
            conv_size=3)


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: the CI machine has 2 cores shared with other jobs, and two threads
    contending there run these tiny models tens of times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**changes) -> GroundThinkConfig:
    return GroundThinkConfig(**{**TINY, **changes})


def test_parameter_counts_equal_model_grid():
    """Guards against the analytic count drifting from the layers (a new projection, bias or norm)."""
    grid = itertools.product(["GSGS", "GGSS", "SGAS", "AAAA", "GGGG", "G"], [1.0, 1.5, 2.0], [True, False],
                             [True, False], [True, False], ["replace", "mean", "weighted"])
    for i, (pattern, expand_v, short_conv, output_gate, tie, accumulation) in enumerate(grid):
        config = tiny(layer_pattern=pattern, expand_v=expand_v, use_short_conv=short_conv,
                      use_output_gate=output_gate, tie_embeddings=tie, state_accumulation=accumulation,
                      slot_norm=i % 2 == 0)
        expected = GroundThinkLM(config).parameter_counts()
        assert parameter_counts(config) == expected, config


def test_parameter_counts_wider_heads():
    config = tiny(d_model=96, n_heads=3, head_dim=16, expand_v=3.0, layer_pattern="GSAGS", ffn_mult=3.0)
    assert parameter_counts(config) == GroundThinkLM(config).parameter_counts()


def test_decode_cache_equals_state_bytes():
    """Guards against the planner's decoding cache disagreeing with GroundThinkLM.state_bytes."""
    for pattern in ("GSGS", "GGSS", "SGAS", "AAAA", "GGGG"):
        for short_conv in (True, False):
            config = tiny(layer_pattern=pattern, use_short_conv=short_conv)
            model = GroundThinkLM(config)
            for context in (0, 1024, 32768):
                for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
                    expected = model.state_bytes(batch=3, dtype=dtype, context=context)
                    assert decode_cache_bytes(config, context, batch=3, dtype=name) == expected, (pattern, context)


def test_recurrent_memory_counts_state_floats():
    config = tiny(layer_pattern="GGSGS", head_dim=16, expand_v=2.0)
    memory = recurrent_memory(config)
    assert memory["state_floats_per_layer"] == 2 * 16 * 32
    assert memory["state_floats"] == 3 * 2 * 16 * 32
    assert memory["state_bytes"] == 4 * memory["state_floats"]
    assert memory["snapshot_layers"] == 2


ACTIVATION_CASES = [
    # (changes, batch, seq_len): T > W and T < W, T a multiple of C and not, one chunk, one head.
    (dict(), 2, 40),
    (dict(), 2, 48),
    (dict(), 1, 16),
    (dict(window_size=64), 2, 40),
    (dict(layer_pattern="SGAS"), 2, 40),
    (dict(layer_pattern="GGSS", state_accumulation="mean"), 2, 33),
    (dict(layer_pattern="GGSGS", state_accumulation="replace"), 2, 40),
    (dict(use_short_conv=False, use_output_gate=False), 2, 48),
    (dict(layer_pattern="AAAA"), 3, 24),
    (dict(n_heads=1, d_model=16), 2, 40),
    (dict(slot_norm=True), 2, 40),
    (dict(layer_pattern="GGSGS", slot_norm=True), 2, 40),
    (dict(layer_pattern="GGSS", state_accumulation="mean", slot_norm=True), 2, 33),
]


@pytest.mark.parametrize("changes,batch,seq_len", ACTIVATION_CASES)
def test_activation_count_matches_saved_tensors(changes, batch, seq_len):
    """Guards against the per-layer table of saved tensors drifting from what autograd keeps.

    When a layer or kernel changes what it saves, update the matching function in plan.py.
    """
    torch.manual_seed(0)
    config = tiny(**changes)
    model = GroundThinkLM(config)
    ids = torch.randint(0, config.vocab_size, (batch, seq_len + 1))
    measured = measure_saved_tensor_bytes(model, ids[:, :-1], ids[:, 1:])
    estimate = activation_bytes(config, batch, seq_len)
    error = estimate["total"] / measured["total"] - 1
    per_layer = [(layer["type"], layer["bytes"], got) for layer, got in zip(estimate["layers"], measured["layers"])]
    assert abs(error) < 0.05, f"estimate {estimate['total']} vs saved {measured['total']} ({error:+.1%}); {per_layer}"


def test_training_step_peak_within_15_percent():
    """Guards against the peak model (activations, loss gradients, optimizer) losing touch with a
    measured CPU step, with and without activation checkpointing."""
    config = tiny(layer_pattern="GSGS", vocab_size=64)
    budget = Budget(batch=2, seq_len=48, dtype="fp32", device="cpu")
    estimate = training_memory(config, budget)
    for checkpointing, key in ((False, "peak"), (True, "peak_checkpointed")):
        measured = measure_training_step_peak(config, budget.batch, budget.seq_len, checkpointing)
        error = estimate[key] / measured["peak"] - 1
        assert abs(error) < 0.15, f"{key}: estimate {estimate[key]} vs measured {measured['peak']} ({error:+.1%})"


def test_max_batch_is_largest_fitting():
    config = tiny()
    budget = Budget(batch=4, seq_len=64, dtype="fp32", device="cpu", memory=64 * 2**20)
    result = training_memory(config, budget)
    largest = result["max_batch"]
    assert largest >= 1
    fits = training_memory(config, dataclasses.replace(budget, batch=largest))
    too_big = training_memory(config, dataclasses.replace(budget, batch=largest + 1))
    assert fits["fits"]
    assert not too_big["fits"]
    assert result["max_batch_checkpointed"] >= largest


def test_checkpointing_lowers_activations():
    result = training_memory(tiny(layer_pattern="GSGSGSGS"), Budget(batch=4, seq_len=64, dtype="fp32"))
    assert result["activations_checkpointed"] < result["activations"]
    assert result["peak_checkpointed"] < result["peak"]


def test_plan_reports_transformer_match():
    report = plan(tiny(layer_pattern="GSGS", head_dim=16, expand_v=4.0), Budget(batch=1, seq_len=32))
    assert report["transformer"]["layer_pattern"] == "AAAA"
    assert report["transformer"]["parameters"] == GroundThinkLM(tiny(layer_pattern="AAAA")).num_parameters()
    assert report["transformer"]["parameter_matched"] is False
    matched = plan(tiny(layer_pattern="AAAA"), Budget(batch=1, seq_len=32))
    assert matched["transformer"]["parameter_matched"] is True
    contexts = report["decoding"]["contexts"]
    assert contexts["131072"]["model"] == contexts["1024"]["model"]
    assert contexts["131072"]["transformer"] == 128 * contexts["1024"]["transformer"]


def test_format_plan_and_comparison():
    budget = Budget(batch=2, seq_len=32, memory=2**30)
    base = plan(tiny(), budget, "base")
    wider = plan(tiny(expand_v=4.0), budget, "expand_v=4")
    text = format_plan(base)
    assert "recurrent memory per sequence" in text
    assert "fits" in text
    table = format_comparison([base, wider])
    assert "expand_v" in table
    assert "+512" in table      # 2 GDN layers x H=2 x K=8 x (32 - 16) more value dims


def test_parse_bytes_units():
    assert parse_bytes("6GiB") == 6 * 2**30
    assert parse_bytes("512 MiB") == 512 * 2**20
    assert parse_bytes("8GB") == 8 * 10**9
    assert parse_bytes("1e9") == 10**9
    assert parse_bytes("0", allow_zero=True) == 0


@pytest.mark.parametrize("text", ["6XB", "GiB", "-1GiB", "0"])
def test_parse_bytes_rejects(text):
    with pytest.raises(ConfigError, match="invalid memory size"):
        parse_bytes(text)


def test_resolve_changes_scales_d_model():
    config = tiny(d_model=128, n_heads=4)
    overrides, label = resolve_changes("d_model*1.4, expand_v=4", config)
    assert overrides == ["model.d_model=176", "model.expand_v=4"]
    assert "=176" in label


@pytest.mark.parametrize("spec,message", [
    ("foo=3", "unknown model field 'foo'"),
    ("d_model*x", "must be a number"),
    ("layer_pattern*2", "not a number to scale"),
    ("expand_v", "use KEY=VALUE or KEY"),
    (",", "give KEY=VALUE"),
])
def test_resolve_changes_rejects(spec, message):
    with pytest.raises(ConfigError, match=message):
        resolve_changes(spec, tiny())


def test_plan_command_json(capsys):
    assert main(["plan", "--set", "model.d_model=64", "--batch", "2", "--seq-len", "64", "--memory", "6GiB",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["parameters"] == GroundThinkLM(GroundThinkConfig(d_model=64)).parameter_counts()
    assert report["training"]["fits"] is True
    assert report["training"]["dtype"] == "bf16"


def test_plan_command_compare(capsys):
    assert main(["plan", "--device", "cpu", "--batch", "1", "--seq-len", "32",
                 "--compare", "expand_v=4", "d_model*1.5", "layer_pattern=GGSS"]) == 0
    out = capsys.readouterr().out
    assert "d_model*1.5 (=192)" in out
    assert "state floats / sequence" in out


def test_plan_command_rejects_unknown_field(capsys):
    assert main(["plan", "--compare", "heads=4"]) == 1
    assert "unknown model field 'heads'" in capsys.readouterr().err
