"""Memory probes: hand-built cases with known answers, skips with reasons, report files and the command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from groundthink import GroundThinkConfig, GroundThinkLM
from groundthink.checkpoint import save_checkpoint
from groundthink.cli import main
from groundthink.ops import recurrent_gated_delta_rule
from groundthink.probes import (Needle, ProbeInputError, ProbeNotApplicable, effective_rank, focus_ratio,
                                forget_horizon, gradient_health, half_life, key_interference, log_abs_det,
                                memory_readers, needle_probe, parameter_components, read_snr,
                                require_memory_readers, run_probes, span_check, state_entropy, trace_model,
                                transition_eigenvalues, transition_spectrum, write_strength)
from groundthink.probes.report import write_report
from groundthink.probes.stats import mean_abs_cos_random, spearman
from groundthink.probes.trace import recompute_block_states
from groundthink.tokenizer import CharTokenizer

from conftest import SHARED_DATA

VOCAB = 40


def tiny_model(pattern: str = "GSGS", **overrides) -> GroundThinkLM:
    settings = dict(vocab_size=VOCAB, d_model=32, n_heads=2, head_dim=8, expand_v=2.0, layer_pattern=pattern,
                    window_size=16, memory_block=16, chunk_size=16)
    settings.update(overrides)
    return GroundThinkLM(GroundThinkConfig(**settings)).eval()


def random_ids(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, n)


def fix_gates(model: GroundThinkLM, A: list[float], dt: list[float], beta_logit: list[float]) -> None:
    """Make g = -A * dt and beta = sigmoid(beta_logit) per head, independent of the input, in every GDN layer."""
    with torch.no_grad():
        for block in model.blocks:
            if block.layer_type != "gdn":
                continue
            gdn = block.mixer
            gdn.a_proj.weight.zero_()
            gdn.b_proj.weight.zero_()
            gdn.A_log.copy_(torch.tensor(A).log())
            dt_t = torch.tensor(dt)
            gdn.dt_bias.copy_(dt_t + torch.log(-torch.expm1(-dt_t)))               # inverse softplus
            gdn.b_proj.bias.copy_(torch.tensor(beta_logit))


def unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


# ---------------------------------------------------------------------------- forget horizon and spectrum
def test_fixed_gates_half_life_and_eigenvalues():
    """Guards the half-life and eigenvalue formulas against a GDN layer whose g and beta are set by hand."""
    model = tiny_model("GSGS")
    A, dt, logits = [0.5, 0.01], [0.7, 0.05], [2.0, -2.5]
    fix_gates(model, A, dt, logits)
    trace = trace_model(model, random_ids(80))
    K = model.config.head_dim

    expected_g = np.array([-A[h] * dt[h] for h in range(2)])                       # [H]
    expected_beta = 1 / (1 + np.exp(-np.array(logits)))
    expected_life = math.log(2) / -expected_g                                      # [2 / 1.98, 138.6 / 0.0005]
    for layer in trace.gdn:
        np.testing.assert_allclose(layer.g, np.broadcast_to(expected_g, layer.g.shape), rtol=1e-5)
        np.testing.assert_allclose(half_life(layer.g)[0, 5], expected_life, rtol=1e-5)

    horizon = forget_horizon([t.g for t in trace.gdn], [t.beta for t in trace.gdn], [0, 2], window=16,
                             train_context=64)
    np.testing.assert_allclose(horizon["half_life"]["p50"], np.tile(expected_life, (2, 1)), rtol=1e-5)
    flags = [h["flag"] for h in horizon["heads"]]
    assert flags == ["goldfish", "saturated", "goldfish", "saturated"], flags

    alpha, along_key = transition_eigenvalues(trace.gdn[0].g, trace.gdn[0].beta)
    np.testing.assert_allclose(alpha[0, 0], np.exp(expected_g), rtol=1e-6)
    np.testing.assert_allclose(along_key[0, 0], np.exp(expected_g) * (1 - expected_beta), rtol=1e-5)
    np.testing.assert_allclose(log_abs_det(trace.gdn[0].g, trace.gdn[0].beta, K)[0, 0],
                               K * expected_g + np.log(1 - expected_beta), rtol=1e-5)

    spectrum = transition_spectrum([t.g for t in trace.gdn], [t.beta for t in trace.gdn],
                                   [t.k for t in trace.gdn], [0, 2], spans=[16])
    per_span = 16 * (K * expected_g + np.log(1 - expected_beta))
    np.testing.assert_allclose(spectrum["spans"]["16"]["log_det"][0], per_span, rtol=1e-4)
    counts = spectrum["eigenvalues"]["counts"][0]                                  # [H, bins]
    edges = spectrum["eigenvalues"]["edges"]
    for h in range(2):
        bin_alpha = np.searchsorted(edges, np.exp(expected_g[h]), side="right") - 1
        bin_along = np.searchsorted(edges, np.exp(expected_g[h]) * (1 - expected_beta[h]), side="right") - 1
        assert bin_along != bin_alpha
        assert counts[h, bin_alpha] == 80 * (K - 1), f"head {h}: {counts[h, bin_alpha]} eigenvalues at alpha"
        assert counts[h, bin_along] == 80, f"head {h}: {counts[h, bin_along]} eigenvalues at alpha (1 - beta)"
        assert counts[h].sum() == 80 * K
    assert spectrum["max_check_error"] < 1e-9
    assert spectrum["flags"] == []


def test_span_check_closed_form_and_bound():
    """Guards the closed-form ln|det| of a span against explicit [K, K] products, and the norm bound."""
    rng = np.random.default_rng(0)
    n, K = 12, 6
    g = -rng.uniform(0.01, 0.5, n)
    beta = rng.uniform(0, 1, n)
    k = rng.standard_normal((n, K))
    k /= np.linalg.norm(k, axis=1, keepdims=True)
    check = span_check(g, beta, k)
    assert check["abs_error"] < 1e-10, check
    assert check["spectral_norm"] <= check["decay_bound"] * (1 + 1e-12)
    assert check["spectral_norm"] > 0


def test_spectrum_flags_keys_outside_unit_ball():
    """Guards the growth flag: with |k|^2 = 3 and beta = 1 the eigenvalue along k is -2 alpha."""
    T, H, K = 20, 1, 4
    g = np.full((1, T, H), -0.01)
    beta = np.ones((1, T, H))
    k = np.zeros((1, T, H, K))
    k[..., 0] = math.sqrt(3.0)
    spectrum = transition_spectrum([g], [beta], [k], [0], spans=[4], check_span=8)
    assert spectrum["checks"][0]["spectral_norm"] > spectrum["checks"][0]["decay_bound"]
    assert any("exceeds" in flag for flag in spectrum["flags"]), spectrum["flags"]


# ---------------------------------------------------------------------------- state content
def test_orthonormal_keys_give_full_effective_rank():
    """Guards the effective rank: K orthonormal keys with orthonormal values written by the kernel give rank K."""
    K, V = 8, 16
    keys = torch.linalg.qr(torch.randn(K, K, dtype=torch.float64))[0].T              # rows orthonormal
    values = torch.linalg.qr(torch.randn(V, K, dtype=torch.float64))[0].T            # [K, V], rows orthonormal
    q = keys[None, :, None]                                                        # [1, K, 1, K]
    zeros = torch.zeros(1, K, 1, dtype=torch.float64)
    _, S = recurrent_gated_delta_rule(q, q, values[None, :, None], zeros, zeros + 1, output_final_state=True)
    S = S[0, 0].numpy()
    assert effective_rank(S) == pytest.approx(K, rel=1e-9)
    assert state_entropy(S) == pytest.approx(math.log(K), rel=1e-9)

    one_direction = np.outer(keys[0].numpy(), values[0].numpy())
    assert effective_rank(one_direction) == pytest.approx(1.0, rel=1e-9)
    assert state_entropy(one_direction) == pytest.approx(0.0, abs=1e-9)
    assert effective_rank(np.zeros((K, V))) == 0.0

    # Singular values 3 and 1: p = (0.75, 0.25) for the rank, q = (0.9, 0.1) for the entropy.
    two_directions = 3 * np.outer(keys[0].numpy(), values[0].numpy()) + np.outer(keys[1].numpy(), values[1].numpy())
    assert effective_rank(two_directions) == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))
    assert state_entropy(two_directions) == pytest.approx(-(0.9 * math.log(0.9) + 0.1 * math.log(0.1)))


def test_key_interference_known_cases():
    """Guards the interference measure: orthogonal keys 0, identical keys 1, random keys near the baseline."""
    assert mean_abs_cos_random(2) == pytest.approx(2 / math.pi, rel=1e-12)
    orthogonal = key_interference(np.eye(6), np.ones(6))
    assert orthogonal["mean_abs_cos"] == pytest.approx(0.0, abs=1e-12)
    identical = key_interference(np.ones((5, 6)), np.ones(5))
    assert identical["mean_abs_cos"] == pytest.approx(1.0, rel=1e-12)
    random_keys = np.random.default_rng(0).standard_normal((400, 16))
    assert key_interference(random_keys, np.ones(400))["ratio"] == pytest.approx(1.0, abs=0.05)
    skipped = key_interference(np.eye(6), np.zeros(6))
    assert skipped["n_keys"] == 0
    assert skipped["mean_abs_cos"] is None


def test_recomputed_block_states_match_model():
    """Guards the block states the probes recompute for GDN layers that no SWA layer reads."""
    model = tiny_model("GSGS")
    ids = torch.as_tensor(random_ids(70))[None]
    with torch.no_grad():
        info = model(ids, return_internals=True).internals[0]
    recomputed = recompute_block_states(info, model.config.memory_block, model.config.chunk_size)
    diff = (recomputed - info["block_states"]).abs().max().item()
    assert diff < 1e-5, f"max abs err {diff:.3e}"


# ---------------------------------------------------------------------------- write strength
def test_write_strength_ranks_tokens():
    """Guards the token ranking and the frequency correlation on hand-set beta."""
    rng = np.random.default_rng(0)
    ids = rng.choice([1, 2, 3, 4], size=(1, 400), p=[0.55, 0.3, 0.1, 0.05])
    beta_of = {1: 0.1, 2: 0.3, 3: 0.6, 4: 0.9}                                     # rarer tokens write harder
    beta = np.vectorize(beta_of.get)(ids)[..., None].repeat(2, axis=-1).astype(np.float64)
    result = write_strength([beta], ids, [0], top_k=2, min_count=3)
    assert [e["id"] for e in result["highest"]] == [4, 3]
    assert [e["id"] for e in result["lowest"]] == [1, 2]
    assert result["highest"][0]["mean_beta"] == pytest.approx(0.9)
    assert result["frequency_spearman"] == pytest.approx(-1.0)
    assert result["per_token"].shape == (1, 2, 400)


def test_spearman_known_values():
    """Guards the rank correlation: monotone 1, reversed -1, constant input undefined."""
    x = np.arange(10.0)
    assert spearman(x, x ** 3) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert spearman(x, np.ones(10)) is None
    # Ties share their mean rank: x ranks [0, 1.5, 1.5, 3] against y ranks [0, 1, 2, 3].
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5.0))


# ---------------------------------------------------------------------------- SWA readers
def test_focus_ratio_uniform_and_one_hot():
    """Guards the focus ratio: uniform slot weights give 0, one-hot give 1."""
    K = 8
    assert focus_ratio(np.full(K, 1 / K)) == pytest.approx(0.0, abs=1e-12)
    assert focus_ratio(np.eye(K)[3]) == pytest.approx(1.0)
    assert 0.0 < focus_ratio(np.array([0.5, 0.5] + [0.0] * (K - 2))) < 1.0


def test_memory_readers_per_block():
    """Guards the per-block series and that block 0 (empty memory) is left out of the head means."""
    B, M, H, K = 1, 4, 2, 8
    weights = np.full((B, 3 * M, H, K), 1 / K)
    weights[:, M:] = np.eye(K)[0]
    gate = np.full((B, 3 * M, H), 0.25)
    result = memory_readers([weights], [gate], [1], memory_block=M)
    np.testing.assert_allclose(result["per_layer"][0]["focus_per_block"][:, 0], [0.0, 1.0, 1.0], atol=1e-12)
    np.testing.assert_allclose(result["per_layer"][0]["focus"], [1.0, 1.0])
    assert result["flags"] == []
    diffuse = memory_readers([np.full((B, 3 * M, H, K), 1 / K)], [gate], [1], memory_block=M)
    assert len(diffuse["flags"]) == H
    assert "diffuse" in diffuse["flags"][0]


def test_memory_readers_need_s_above_g():
    """Guards the skip reason when no SWA layer reads the memory."""
    with pytest.raises(ProbeNotApplicable, match="has no S layer"):
        require_memory_readers("GGGG")
    with pytest.raises(ProbeNotApplicable, match="no S layer lies above a G layer"):
        require_memory_readers("SSGG")
    require_memory_readers("GSGS")


# ---------------------------------------------------------------------------- needle
def test_needle_snr_stored_and_absent():
    """Guards the read SNR: high for a key the memory stores, about 1 on average for keys it does not."""
    K = V = 64
    n = 8
    keys = unit(torch.randn(1, n, 1, K, dtype=torch.float64))
    values = unit(torch.randn(1, n, 1, V, dtype=torch.float64))
    zeros = torch.zeros(1, n, 1, dtype=torch.float64)
    _, S = recurrent_gated_delta_rule(keys, keys, values, zeros, zeros + 1, output_final_state=True)
    S = S[0, 0].numpy()

    stored = read_snr(S, keys[0, 3, 0].numpy())
    assert stored["snr"] > 2.0, stored
    assert stored["random_fraction_below"] > 0.95

    rng = np.random.default_rng(1)
    absent = [read_snr(S, rng.standard_normal(K))["snr"] for _ in range(400)]
    assert np.mean(np.square(absent)) == pytest.approx(1.0, abs=0.15)

    u = rng.standard_normal((4000, K))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    sampled_rms = math.sqrt(np.mean(np.sum((u @ S) ** 2, axis=1)))
    assert stored["noise_rms"] == pytest.approx(sampled_rms, rel=0.05)


def test_needle_effect_zero_beyond_window():
    """Guards the hidden-state trace: a pure SWA model cannot carry a needle past its stacked windows."""
    query, answer = [1, 2, 3], [4, 5]
    text = random_ids(200)
    local = needle_probe(tiny_model("SS"), text, query, answer, distance=60)
    # Not exactly 0: RoPE angles at positions shifted by the needle's length round differently.
    assert all(r["effect"] < 1e-6 for r in local["hidden"]), [r["effect"] for r in local["hidden"]]
    assert local["gdn"] == []
    assert "no G layer" in local["notes"][0]

    recurrent = needle_probe(tiny_model("GS"), text, query, answer, distance=60)
    assert recurrent["hidden"][-1]["effect"] > 1e-4, recurrent["hidden"][-1]["effect"]
    assert recurrent["gdn"][0]["snr"].shape == (len(query) + len(answer), 2)
    assert recurrent["positions"]["distance"] == 60


def test_needle_too_close_is_skipped():
    """Guards the skip when the needle sits within one memory block of the query."""
    with pytest.raises(ProbeNotApplicable, match="memory block"):
        needle_probe(tiny_model("GS"), random_ids(100), [1, 2], [3], distance=10)


# ---------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("pattern,tie", [("GSGS", True), ("GGSA", False)])
def test_gradient_components_match_parameter_counts(pattern, tie):
    """Guards the component grouping against parameter_counts(), and that .grad stays untouched."""
    model = tiny_model(pattern, tie_embeddings=tie)
    groups = parameter_components(model)
    counts = model.parameter_counts()
    for name, members in groups.items():
        assert sum(p.numel() for _, p in members) == counts[name], name
    result = gradient_health(model, random_ids(66).reshape(2, 33))
    assert all(p.grad is None for p in model.parameters())
    for name, record in result["components"].items():
        assert math.isfinite(record["grad_norm"]), name
        assert record["grad_norm"] > 0, name
    assert result["flags"] == []


def test_gradient_components_reject_unknown_parameter():
    """Guards against a new parameter silently missing from the gradient report."""
    model = tiny_model("GS")
    model.extra_scale = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(RuntimeError, match="extra_scale"):
        parameter_components(model)


# ---------------------------------------------------------------------------- suite and report
def test_short_text_rejected():
    """Guards the clear error for a text no longer than one memory block."""
    model = tiny_model("GSGS")
    with pytest.raises(ProbeInputError, match="more than one memory block"):
        run_probes(model, random_ids(16))


def test_rows_keep_text_order():
    """Guards --seq-len: rows are consecutive pieces of the text and per-token arrays follow text order."""
    model = tiny_model("GSGS")
    ids = random_ids(230)
    results = run_probes(model, ids, seq_len=50)
    assert results["meta"]["rows"] == 4
    assert results["meta"]["n_tokens"] == 200
    per_token = results["probes"]["write_strength"]["per_token"]                   # [L, H, 200]
    second_row = trace_model(model, ids[50:100])
    np.testing.assert_allclose(per_token[0, :, 50:100], second_row.gdn[0].beta[0].T, rtol=1e-6)


def test_pure_gdn_skips_readers_with_reason(tmp_path):
    """Guards that a probe that does not apply is skipped with its reason in the results and the report."""
    results = run_probes(tiny_model("GG"), random_ids(120))
    assert "has no S layer" in results["skipped"]["memory_readers"]
    assert "no needle was given" in results["skipped"]["needle"]
    assert "write_strength" in results["probes"]
    assert "gradients" in results["probes"]
    html = write_report(results, tmp_path)["html"].read_text(encoding="utf-8")
    assert "Skipped: layer_pattern &#x27;GG&#x27; has no S layer" in html


def test_report_files(tmp_path):
    """Guards the report: strict JSON, one embedded PNG per figure, and the PNG files beside it."""
    model = tiny_model("GSGS")
    results = run_probes(model, random_ids(200), train_context=64, needle=Needle([1, 2, 3], [4, 5]),
                         decode=lambda ids: "".join(chr(65 + i % 26) for i in ids))
    assert results["skipped"] == {}
    paths = write_report(results, tmp_path / "report")
    figures = [p for name, p in paths.items() if name not in ("json", "html")]
    assert len(figures) == 8
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in figures)

    def reject(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    data = json.loads(paths["json"].read_text(encoding="utf-8"), parse_constant=reject)
    assert data["meta"]["n_tokens"] == 200
    assert len(data["probes"]["write_strength"]["token_mean"]) == 200
    assert data["probes"]["forget_horizon"]["train_context"] == 64
    html = paths["html"].read_text(encoding="utf-8")
    assert html.count("src='data:image/png;base64,") == 8
    assert not list((tmp_path / "report").glob("*.tmp"))


# ---------------------------------------------------------------------------- command
@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory) -> Path:
    source = SHARED_DATA / "tinyshakespeare.txt"
    if not source.exists():
        pytest.skip(f"{source} is not present")
    tokenizer = CharTokenizer.train(source.read_text(encoding="utf-8"))
    config = GroundThinkConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_heads=2, head_dim=8,
                               layer_pattern="GSGS", window_size=16, memory_block=16, chunk_size=16)
    run_dir = tmp_path_factory.mktemp("run")
    save_checkpoint(run_dir, model=GroundThinkLM(config), tokenizer=tokenizer,
                    run_config={"model": config.to_dict(), "data": {"seq_len": 64}, "train": {}}, step=1)
    return run_dir


def test_probe_command_writes_report(checkpoint_dir, tmp_path, capsys):
    """Guards the command end to end: report files, summary on stdout, training context from the checkpoint."""
    text = tmp_path / "text.txt"
    text.write_text((SHARED_DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")[:3000], encoding="utf-8")
    out = tmp_path / "out"
    threads = torch.get_num_threads()
    assert main(["-q", "probe", str(checkpoint_dir), "--text", str(text), "--out", str(out),
                 "--max-tokens", "600", "--num-threads", "1"]) == 0
    assert torch.get_num_threads() == threads, "--num-threads must not leak into the calling process"
    stdout = capsys.readouterr().out
    assert "flags (" in stdout
    assert "wrote" in stdout
    data = json.loads((out / "probes.json").read_text(encoding="utf-8"))
    assert data["meta"]["n_tokens"] == 600
    assert data["meta"]["train_context"] == 64, "the training context comes from the checkpoint's data.seq_len"
    assert (out / "report.html").exists()
    assert (out / "beta_heatmap.png").exists()


@pytest.mark.parametrize("case,message", [
    ("missing checkpoint", "checkpoint path not found"),
    ("short text", "more than one memory block"),
    ("unknown needle characters", "never saw"),
    ("invalid training context", "invalid --train-context"),
])
def test_probe_command_bad_input(checkpoint_dir, tmp_path, capsys, case, message):
    """Guards one clear error line (exit 1) for each kind of bad input."""
    text = tmp_path / "text.txt"
    text.write_text("To be" if case == "short text" else "To be, or not to be. " * 20,
                    encoding="utf-8")
    checkpoint = tmp_path / "missing" if case == "missing checkpoint" else checkpoint_dir
    extra = {"unknown needle characters": ["--needle-query", "東京"],
             "invalid training context": ["--train-context", "-5"]}.get(case, [])
    code = main(["-q", "probe", str(checkpoint), "--text", str(text), "--out", str(tmp_path / "out"), *extra])
    assert code == 1
    assert message in capsys.readouterr().err
