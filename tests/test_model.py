"""Model invariants: causality, exact window, block-start memory reads, baselines, config."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from groundthink import ConfigError, GroundThinkConfig, GroundThinkLM
from groundthink.layers import sliding_window_attention
from groundthink.layers.rope import apply_rope, rope_angles
from groundthink.ops import recurrent_gated_delta_rule

from conftest import assert_close

VOCAB = 37


def tiny_config(pattern: str, **overrides) -> GroundThinkConfig:
    values = dict(vocab_size=VOCAB, d_model=32, n_heads=2, head_dim=8, expand_v=2.0, layer_pattern=pattern,
                  window_size=8, memory_block=8, chunk_size=4, conv_size=4)
    values.update(overrides)
    return GroundThinkConfig(**values)


def tiny_model(pattern: str, dtype=torch.float64, **overrides) -> GroundThinkLM:
    torch.manual_seed(1)
    model = GroundThinkLM(tiny_config(pattern, **overrides)).to(dtype)
    # Larger gate weights than the init, so the memory and the gate actually vary with the input.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("a_proj.weight", "b_proj.weight", "gate_proj.weight", "state_k_proj.weight")):
                p.normal_(0, 0.3)
    return model.eval()


def max_prefix_change(model: GroundThinkLM, T: int, t: int) -> float:
    """Max |change| of logits at positions < t when tokens at positions >= t are replaced."""
    ids = torch.randint(0, VOCAB, (2, T))
    changed = ids.clone()
    changed[:, t:] = torch.randint(0, VOCAB, (2, T - t))
    with torch.no_grad():
        a = model(ids).logits
        b = model(changed).logits
    assert (a[:, t:] - b[:, t:]).abs().max() > 0, "changing the suffix changed nothing: the test is vacuous"
    return (a[:, :t] - b[:, :t]).abs().max().item()


PATTERNS = ["G", "S", "A", "GS", "SG", "GSGS", "GGSS", "GGGG", "AAAA"]


def test_causality_with_slot_norm():
    """Normalising the slots keeps the block-start read causal."""
    model = tiny_model("GGSS", slot_norm=True)
    for t in (1, 7, 8, 9, 17):
        assert max_prefix_change(model, 24, t) == 0.0, t


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("mode", ["replace", "mean", "weighted"])
def test_causality(pattern, mode):
    """Changing tokens at positions >= t leaves logits at positions < t exactly unchanged."""
    model = tiny_model(pattern, state_accumulation=mode)
    T = 37  # crosses four memory blocks and several windows, and ends mid-chunk
    for t in (1, 7, 8, 9, 16, 30, 36):
        assert max_prefix_change(model, T, t) == 0.0, f"position < {t} saw a later token"


def test_causality_test_catches_final_state_read(monkeypatch):
    """A model whose SWA reads the final state of the whole sequence (a future leak) fails the check."""
    model = tiny_model("GS")
    gdn = model.blocks[0].mixer
    original = gdn.block_kernel

    def leaky_block_kernel(q, k, v, g, beta, memory_block):
        o, S, block_states = original(q, k, v, g, beta, memory_block)
        return o, S, S[:, None].expand_as(block_states)

    monkeypatch.setattr(gdn, "block_kernel", leaky_block_kernel)
    assert max_prefix_change(model, 37, 30) > 1e-6


def test_causality_test_catches_state_chaining(monkeypatch):
    """A GDN layer started from the previous GDN layer's final state leaks the future; the check sees it."""
    model = tiny_model("GGS")
    first, second = model.blocks[0].mixer, model.blocks[1].mixer
    final = {}
    original_first, original_second = first.block_kernel, second.block_kernel

    def record_final(q, k, v, g, beta, memory_block):
        o, S, states = original_first(q, k, v, g, beta, memory_block)
        final["S"] = S
        return o, S, states

    def chained(q, k, v, g, beta, memory_block):
        o, S, states = original_second(q, k, v, g, beta, memory_block)
        return o, S, states + final["S"][:, None]

    monkeypatch.setattr(first, "block_kernel", record_final)
    monkeypatch.setattr(second, "block_kernel", chained)
    assert max_prefix_change(model, 37, 30) > 1e-6


@pytest.mark.parametrize("T", [1, 5, 8, 9, 31, 64])
@pytest.mark.parametrize("W", [1, 3, 8])
def test_window_is_exact(T, W):
    """sliding_window_attention equals brute-force softmax where each position sees exactly W keys."""
    B, H, d = 2, 3, 4
    q, k, v = (torch.randn(B, H, T, d, dtype=torch.float64) for _ in range(3))
    got = sliding_window_attention(q, k, v, W)

    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    pos = torch.arange(T)
    visible = (pos[:, None] - pos[None, :] >= 0) & (pos[:, None] - pos[None, :] < W)
    assert (visible.sum(-1) == torch.clamp(pos + 1, max=W)).all()
    expected = scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v
    assert_close(got, expected, 1e-12, "window attention")


def test_swa_layer_without_memory_is_windowed_rope_attention():
    """An SWA layer with no GDN below is local attention only: RoPE, window W, output projection."""
    model = tiny_model("S", window_size=5, memory_block=4)
    layer = model.blocks[0].mixer
    x = torch.randn(2, 19, 32, dtype=torch.float64)
    y, info = layer(x)
    assert info["memory"] is None

    B, T, D = x.shape
    H, d = layer.n_heads, layer.head_dim
    q, k, v = (proj(x).view(B, T, H, d) for proj in (layer.q_proj, layer.k_proj, layer.v_proj))
    cos, sin = rope_angles(torch.arange(T), d, layer.config.rope_theta)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(d)
    pos = torch.arange(T)
    visible = (pos[:, None] >= pos[None, :]) & (pos[:, None] - pos[None, :] < 5)
    attn = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    expected = layer.o_proj(torch.einsum("bhts,bshd->bthd", attn, v).reshape(B, T, D))
    assert_close(y, expected, 1e-12, "SWA output")


@pytest.mark.parametrize("mode", ["replace", "mean", "weighted"])
def test_global_pathway_reads_block_start_state(mode):
    """In a GS model the memory read at t is the GDN state at floor(t/M)*M from the recurrent kernel."""
    model = tiny_model("GS", state_accumulation=mode)
    M = model.config.memory_block
    T = 29
    ids = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        out = model(ids, return_internals=True)
    gdn, swa = out.internals
    assert swa["memory"].shape == (2, math.ceil(T / M), 2, 8, 16)
    for n in range(math.ceil(T / M)):
        start = n * M
        if start == 0:
            expected = torch.zeros(2, 2, 8, 16, dtype=torch.float64)
        else:
            _, expected = recurrent_gated_delta_rule(
                gdn["q"][:, :start], gdn["k"][:, :start], gdn["v"][:, :start], gdn["g"][:, :start],
                gdn["beta"][:, :start], output_final_state=True)
        assert_close(swa["memory"][:, n], expected, 1e-12, f"memory of block {n}")

    # The slot weights are a softmax over the K slots of each head.
    assert swa["slot_weights"].shape == (2, T, 2, 8)
    assert_close(swa["slot_weights"].sum(-1), torch.ones(2, T, 2, dtype=torch.float64), 1e-12, "slot weights sum")
    assert swa["gate"].shape == (2, T, 2)


def test_slot_norm_makes_the_read_scale_free():
    """With slot_norm the slot attention reads a memory and 0.01 times it alike, because each slot
    is RMS-normalised. Without it the smaller memory gives visibly flatter slot weights."""
    torch.manual_seed(0)
    B, T, H, M = 2, 16, 2, 8
    q = torch.randn(B, T, H, 16, dtype=torch.float64)
    memory = torch.randn(B, T // M, H, 8, 16, dtype=torch.float64)
    for slot_norm in (True, False):
        # A tiny norm_eps, so that eps does not set a scale of its own at 0.01 times the memory.
        model = tiny_model("GS", slot_norm=slot_norm, norm_eps=1e-15)
        swa = model.blocks[1].mixer
        with torch.no_grad():
            swa.state_k_proj.weight.normal_(0, 1.0)
            full, weights = swa.read_memory(q, memory)
            small, small_weights = swa.read_memory(q, 0.01 * memory)
            snapshot = swa.read_snapshot(q[:, :M], 0.01 * memory[:, 0])
        assert_close(snapshot, small[:, :M], 1e-12, "read_snapshot against read_memory")
        if slot_norm:
            assert_close(small, full, 1e-9, "read of the scaled memory")
        else:
            assert (small_weights.max(-1).values < weights.max(-1).values).float().mean() > 0.9


def test_accumulation_modes_combine_gdn_layers():
    """replace reads the last GDN layer, mean the average, weighted the learned running mix."""
    ids = torch.randint(0, VOCAB, (1, 20))
    for mode in ("replace", "mean", "weighted"):
        model = tiny_model("GGS", state_accumulation=mode)
        with torch.no_grad():
            out = model(ids, return_internals=True)
        s1, s2 = out.internals[0]["block_states"], out.internals[1]["block_states"]
        if mode == "replace":
            expected = s2
        elif mode == "mean":
            expected = (s1 + s2) / 2
        else:
            w = torch.sigmoid(model.memory_mix_logits["1"])
            assert abs(w.item() - model.config.state_weight_new) < 1e-12
            expected = (1 - w) * s1 + w * s2
        assert_close(out.internals[2]["memory"], expected, 1e-12, f"{mode} memory")


def reference_transformer(model: GroundThinkLM, ids: torch.Tensor) -> torch.Tensor:
    """A plain pre-norm causal Transformer written from scratch with the model's weights."""

    def rms(x, weight, eps):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    c = model.config
    x = model.embed.weight[ids]
    B, T, D = x.shape
    H, d = c.n_heads, D // c.n_heads
    inv_freq = 1.0 / c.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]

    def rotate(t):
        t1, t2 = t[..., : d // 2], t[..., d // 2:]
        return torch.cat([t1 * cos - t2 * sin, t2 * cos + t1 * sin], -1)

    for block in model.blocks:
        attn = block.mixer
        h = rms(x, block.mixer_norm.weight, c.norm_eps)
        q = rotate((h @ attn.q_proj.weight.T).view(B, T, H, d)).transpose(1, 2)
        k = rotate((h @ attn.k_proj.weight.T).view(B, T, H, d)).transpose(1, 2)
        v = (h @ attn.v_proj.weight.T).view(B, T, H, d).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, D)
        x = x + y @ attn.o_proj.weight.T
        h = rms(x, block.ffn_norm.weight, c.norm_eps)
        ffn = block.ffn
        x = x + (F.silu(h @ ffn.gate_proj.weight.T) * (h @ ffn.up_proj.weight.T)) @ ffn.down_proj.weight.T
    x = rms(x, model.final_norm.weight, c.norm_eps)
    return x @ model.embed.weight.T


def test_attention_baseline_is_plain_transformer():
    """AAAA has no global pathway and equals a from-scratch pre-norm causal Transformer."""
    model = tiny_model("AAAA")
    ids = torch.randint(0, VOCAB, (2, 23))
    with torch.no_grad():
        assert_close(model(ids).logits, reference_transformer(model, ids), 1e-12, "logits")
    assert model.parameter_counts()["gdn"] == 0
    assert model.parameter_counts()["swa"] == 0


def test_every_parameter_gets_gradient():
    """GSGS: every parameter receives a non-zero gradient on a random batch."""
    model = tiny_model("GSGS", dtype=torch.float32)
    model.train()
    ids = torch.randint(0, VOCAB, (2, 33))
    model(ids[:, :-1], labels=ids[:, 1:]).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert p.grad.abs().sum() > 0, f"{name} got a zero gradient"


def test_loss_ignores_minus_100():
    model = tiny_model("GS")
    ids = torch.randint(0, VOCAB, (2, 12))
    labels = ids.clone()
    labels[:, :6] = -100
    out = model(ids, labels=labels)
    expected = F.cross_entropy(out.logits[:, 6:].reshape(-1, VOCAB), ids[:, 6:].reshape(-1))
    assert_close(out.loss, expected, 1e-12, "loss")


def test_parameter_counts_cover_all_parameters():
    for pattern in ("GSGS", "GGSS", "AAAA", "GGGG", "SSSS", "SG"):
        for tie in (True, False):
            model = GroundThinkLM(tiny_config(pattern, tie_embeddings=tie))
            counts = model.parameter_counts()
            assert counts["total"] == model.num_parameters(), pattern
            assert counts["total"] == sum(v for key, v in counts.items() if key != "total")


def test_state_bytes_is_constant_in_context_without_attention():
    model = GroundThinkLM(tiny_config("GSGS"))
    small, large = model.state_bytes(2, torch.float32, 10), model.state_bytes(2, torch.float32, 10_000)
    assert small == large
    assert small["gdn"] == 2 * (2 * 2 * 8 * 16 * 4 + 2 * 3 * 2 * (2 * 8 + 16) * 4)
    attention = GroundThinkLM(tiny_config("AAAA"))
    assert attention.state_bytes(1, torch.bfloat16, 1000)["attention"] == 4 * 1000 * 2 * 32 * 2


# ---------------------------------------------------------------------------------------- input errors
def test_bad_input_ids():
    model = tiny_model("GS")
    with pytest.raises(ValueError, match=rf"token id {VOCAB} is outside the vocabulary \[0, {VOCAB}\)"):
        model(torch.tensor([[1, VOCAB]]))
    with pytest.raises(ValueError, match=r"token id -1 is outside"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match=r"integer tensor"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"\[B, T\] tensor"):
        model(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"empty"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must have the shape"):
        model(torch.zeros(1, 3, dtype=torch.long), labels=torch.zeros(1, 2, dtype=torch.long))


# ---------------------------------------------------------------------------------------- config
def test_config_round_trip(tmp_path):
    config = tiny_config("GGSS", expand_v=1.5, state_accumulation="mean", global_gate_bias=2.5)
    path = tmp_path / "config.json"
    config.save(path)
    assert GroundThinkConfig.load(path) == config
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("overrides, match", [
    (dict(layer_pattern="GXS"), r"layer_pattern='GXS'.*unknown layer letter\(s\) \['X'\]"),
    (dict(layer_pattern=""), r"layer_pattern=''.*non-empty"),
    (dict(d_model=30, n_heads=4), r"d_model=30.*divisible by n_heads=4"),
    (dict(expand_v=1.3), r"expand_v=1.3.*must be an integer"),
    (dict(window_size=0), r"window_size=0.*at least 1"),
    (dict(memory_block=16, window_size=8), r"memory_block=16.*<= window_size=8"),
    (dict(memory_block=6, chunk_size=4), r"memory_block=6.*multiple of chunk_size=4"),
    (dict(state_accumulation="sum"), r"state_accumulation='sum'.*replace"),
    (dict(state_weight_new=1.0), r"state_weight_new=1.0.*between 0 and 1"),
    (dict(head_dim=8.0), r"head_dim=8.0.*integer"),
    (dict(decay_a_min=5.0, decay_a_max=2.0), r"decay_a_min=5.0"),
    (dict(backend="cuda"), r"backend='cuda'.*auto"),
])
def test_config_validation_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        tiny_config("GS", **overrides)


def test_config_pure_gdn_allows_any_d_model():
    """d_model need not divide by n_heads when no S or A layer uses D / H."""
    assert GroundThinkConfig(d_model=30, n_heads=4, layer_pattern="GG").d_model == 30


def test_config_load_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"not found"):
        GroundThinkConfig.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=r"not valid JSON"):
        GroundThinkConfig.load(bad)
    unknown = tmp_path / "unknown.json"
    unknown.write_text('{"d_modle": 64}')
    with pytest.raises(ConfigError, match=r"unknown config field\(s\) \['d_modle'\]"):
        GroundThinkConfig.load(unknown)
