"""Cached decoding: prefill and step reproduce the parallel forward; the cache stays constant-size."""

from __future__ import annotations

import pytest
import torch

from groundthink import GroundThinkConfig, GroundThinkLM
from groundthink.generation import GDNCache, SWACache, sample_next_token

VOCAB = 50
W, M, C = 8, 8, 4
N_STEPS = 12


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Run on one thread: these models are so small that a second thread only adds synchronisation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model(pattern: str, accumulation: str = "weighted", dtype=torch.float64, window: int = W,
               seed: int = 0, **overrides) -> GroundThinkLM:
    """A tiny model whose weights are large enough that every path visibly moves the logits."""
    torch.manual_seed(seed)
    config = GroundThinkConfig(vocab_size=VOCAB, d_model=16, n_heads=2, head_dim=8, expand_v=1.0,
                               layer_pattern=pattern, window_size=window, memory_block=M, chunk_size=C,
                               state_accumulation=accumulation, init_std=0.3, conv_size=4, **overrides)
    return GroundThinkLM(config).to(dtype).eval()


def reference_logits(model: GroundThinkLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, what: str) -> None:
    err = (actual - expected).abs().max().item()
    rel = err / max(expected.abs().max().item(), 1e-30)
    assert err <= atol, f"{what}: max abs error {err:.3e} (relative {rel:.3e}) exceeds {atol:.0e}"


def decode_pieces(model: GroundThinkLM, ids: torch.Tensor, pieces: list[int]) -> torch.Tensor:
    """Logits [B, T, vocab] from prefill pieces of the given lengths, then one step per remaining token."""
    cache, outputs, position = None, [], 0
    for length in pieces:
        logits, cache = model.prefill(ids[:, position:position + length], cache)
        outputs.append(logits)
        position += length
    while position < ids.shape[1]:
        outputs.append(model.step(ids[:, position], cache)[:, None])
        position += 1
    assert cache.position == ids.shape[1]
    return torch.cat(outputs, dim=1)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("prompt_length", [1, M - 1, M, M + 1, 3 * W + 5])
@pytest.mark.parametrize("pattern", ["GSGS", "GGSS", "SG", "AAAA", "GGGG"])
def test_prefill_then_steps_match_forward(pattern, prompt_length, batch):
    """Guards against any mismatch between cached decoding and the parallel forward: a stale
    memory snapshot, a ring buffer read in the wrong slots, RoPE at relative positions."""
    model = make_model(pattern)
    ids = torch.randint(0, VOCAB, (batch, prompt_length + N_STEPS))
    decoded = decode_pieces(model, ids, [prompt_length])
    assert_close(decoded, reference_logits(model, ids), 1e-9, f"{pattern} prompt {prompt_length} batch {batch}")


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("pattern", ["GSGS", "GGSS", "SG", "AAAA", "GGGG"])
def test_prefill_pieces_match_forward(pattern, batch):
    """Guards against pieces that start or end inside a chunk or a memory block losing the
    GDN state, the short-convolution tail or the cached keys of the window."""
    model = make_model(pattern)
    pieces = [5, 1, M, 2]
    ids = torch.randint(0, VOCAB, (batch, sum(pieces) + N_STEPS))
    decoded = decode_pieces(model, ids, pieces)
    assert_close(decoded, reference_logits(model, ids), 1e-9, f"{pattern} pieces {pieces} batch {batch}")


@pytest.mark.parametrize("pieces", [[5, 1, M, 2], [3, 13, 1, 2 * W + 3], [M, M, 1, 1, 1], [4 * W + 1]])
@pytest.mark.parametrize("accumulation", ["replace", "mean", "weighted"])
def test_pieces_every_accumulation_mode(accumulation, pieces):
    """Guards against block memories combined across GDN layers differently in prefill, step and
    forward, for every accumulation mode, across block boundaries and window wrap-around."""
    model = make_model("GSGS", accumulation)
    ids = torch.randint(0, VOCAB, (2, sum(pieces) + N_STEPS))
    decoded = decode_pieces(model, ids, pieces)
    assert_close(decoded, reference_logits(model, ids), 1e-9, f"{accumulation} pieces {pieces}")


def test_window_larger_than_block():
    """Guards against a ring buffer that assumes W == M: with W = 2M blocks refresh twice per wrap."""
    model = make_model("GSGS", window=2 * M)
    ids = torch.randint(0, VOCAB, (2, 5 * M + 3))
    decoded = decode_pieces(model, ids, [3, 2 * M + 1, M - 1])
    assert_close(decoded, reference_logits(model, ids), 1e-9, "W = 2M")


def test_without_short_conv_or_output_gate():
    """Guards against decoding paths that assume the optional short convolution and output gate."""
    model = make_model("GSGS", use_short_conv=False, use_output_gate=False)
    ids = torch.randint(0, VOCAB, (2, 3 * M + 5))
    decoded = decode_pieces(model, ids, [M + 3, 2])
    assert_close(decoded, reference_logits(model, ids), 1e-9, "no short conv, no output gate")


def test_slot_norm_steps_match_forward():
    """Guards against the decoding read (read_snapshot) skipping the slot norm of the parallel read."""
    model = make_model("GGSS", slot_norm=True)
    with torch.no_grad():
        for block in model.blocks:
            if getattr(block.mixer, "slot_norm", None) is not None:
                block.mixer.slot_norm.weight.uniform_(0.5, 2.0)
    ids = torch.randint(0, VOCAB, (2, 3 * M + 5))
    decoded = decode_pieces(model, ids, [M + 3, 2])
    assert_close(decoded, reference_logits(model, ids), 1e-9, "slot_norm")


def test_float32_steps_match_forward():
    """Guards against float32 decoding drifting from the parallel forward beyond rounding."""
    model = make_model("GSGS", dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (2, 3 * W + 5 + N_STEPS))
    decoded = decode_pieces(model, ids, [5, 1, M, 2])
    assert_close(decoded, reference_logits(model, ids), 1e-4, "float32")


@pytest.mark.parametrize("prompt_length", [1, 2, 3])
@pytest.mark.parametrize("pattern", ["GSGS", "GGGG"])
def test_prompt_shorter_than_conv(pattern, prompt_length):
    """Guards against short-convolution tails that break for prompts shorter than conv_size - 1:
    greedy generate must match greedy decoding by repeated full forward passes."""
    model = make_model(pattern)
    prompt = torch.randint(0, VOCAB, (2, prompt_length))
    logits, _ = model.prefill(prompt)
    assert_close(logits, reference_logits(model, prompt), 1e-9, f"prefill of {prompt_length} tokens")

    generated = model.generate(prompt, max_new_tokens=2 * M, temperature=0)
    ids = prompt
    for _ in range(2 * M):
        next_id = reference_logits(model, ids)[:, -1].argmax(dim=-1)
        ids = torch.cat([ids, next_id[:, None]], dim=1)
    assert torch.equal(generated, ids[:, prompt_length:])


@pytest.mark.parametrize("n_tokens", [10, 1000, pytest.param(10000, marks=pytest.mark.slow)])
@pytest.mark.parametrize("pattern", ["GSGS", "GGGG"])
def test_cache_size_constant(pattern, n_tokens):
    """Guards against a cache that grows with the context in a model without A layers."""
    model = make_model(pattern, dtype=torch.float32)
    prompt = torch.randint(0, VOCAB, (1, 3))
    _, cache = model.prefill(prompt)
    size_after_prompt = cache.nbytes()
    token = prompt[:, -1]
    for _ in range(n_tokens):
        token = model.step(token, cache).argmax(dim=-1)
    assert cache.position == 3 + n_tokens
    assert cache.nbytes() == size_after_prompt
    assert cache.nbytes_by_component() == model.state_bytes(1, torch.float32, context=cache.position)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("pattern", ["GSGS", "GGSS", "SG", "AAAA", "GGGG", "GAS"])
def test_cache_bytes_match_state_bytes(pattern, dtype):
    """Guards against state_bytes describing a cache layout other than the real one."""
    model = make_model(pattern, dtype=dtype)
    ids = torch.randint(0, VOCAB, (3, 2 * W + 1))
    _, cache = model.prefill(ids[:, :-1])
    model.step(ids[:, -1], cache)
    assert cache.nbytes_by_component() == model.state_bytes(3, dtype, context=ids.shape[1])
    assert cache.nbytes() == model.state_bytes(3, dtype, context=ids.shape[1])["total"]


def test_attention_cache_grows():
    """Guards against an A-layer cache that drops keys instead of keeping the whole context."""
    model = make_model("AAAA", dtype=torch.float32)
    _, cache = model.prefill(torch.randint(0, VOCAB, (1, 5)))
    size = cache.nbytes()
    model.step(torch.tensor([1]), cache)
    assert cache.nbytes() == size * 6 // 5


def test_bfloat16_keeps_float32_state():
    """Guards against the recurrent state and memory snapshot being rounded to bf16 between steps."""
    model = make_model("GSGS", dtype=torch.bfloat16)
    ids = torch.randint(0, VOCAB, (2, 2 * M + 3))
    _, cache = model.prefill(ids[:, :M + 1])
    for t in range(M + 1, ids.shape[1]):
        logits = model.step(ids[:, t], cache)
    assert logits.dtype == torch.bfloat16
    for layer in cache.layers:
        if isinstance(layer, GDNCache):
            assert layer.S.dtype == torch.float32
            assert layer.k_tail.dtype == torch.bfloat16
        if isinstance(layer, SWACache):
            assert layer.keys.dtype == torch.bfloat16
            if layer.memory is not None:
                assert layer.memory.dtype == torch.float32

    # The bf16 decode stays near the float32 forward of the same weights.
    reference = make_model("GSGS", dtype=torch.float32)
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    assert_close(logits.float(), reference_logits(reference, ids)[:, -1], 0.15, "bf16 step vs float32 forward")


def test_generate_stream_matches_generate():
    """Guards against the streaming variant drawing different tokens from generate with one seed."""
    model = make_model("GSGS")
    prompt = torch.randint(0, VOCAB, (2, 4))
    generated = model.generate(prompt, 20, temperature=0.8, top_k=10, top_p=0.9, seed=3)
    streamed = torch.stack(list(model.generate_stream(prompt, 20, temperature=0.8, top_k=10, top_p=0.9, seed=3)), 1)
    assert generated.shape == (2, 20)
    assert generated.dtype == torch.long
    assert torch.equal(generated, streamed)
    assert torch.equal(generated, model.generate(prompt, 20, temperature=0.8, top_k=10, top_p=0.9, seed=3))
    assert not torch.equal(generated, model.generate(prompt, 20, temperature=0.8, seed=4))
    assert model.generate(prompt, 0).shape == (2, 0)


def test_sampling_filters():
    """Guards against top_k / top_p keeping the wrong tokens, or temperature 0 not being greedy."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]))
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next_token(logits, temperature=0), torch.tensor([0, 3]))
    draws = torch.stack([sample_next_token(logits, top_k=2, generator=generator) for _ in range(300)])
    assert set(draws[:, 0].tolist()) == {0, 1}
    assert set(draws[:, 1].tolist()) == {2, 3}
    # top_p = 0.75: the first two tokens (0.5 + 0.3) reach it, the third is dropped.
    draws = torch.stack([sample_next_token(logits, top_p=0.75, generator=generator) for _ in range(300)])
    assert set(draws[:, 0].tolist()) == {0, 1}
    assert set(draws[:, 1].tolist()) == {2, 3}
    draws = torch.stack([sample_next_token(logits, top_p=0.1, generator=generator) for _ in range(50)])
    assert set(draws[:, 0].tolist()) == {0}
    draws = torch.stack([sample_next_token(logits, generator=generator) for _ in range(2000)])
    assert set(draws[:, 0].tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -1.0}, "temperature=-1.0"),
    ({"top_k": 0}, "top_k=0"),
    ({"top_p": 0.0}, "top_p=0.0"),
    ({"top_p": 1.5}, "top_p=1.5"),
    ({"max_new_tokens": -1}, "max_new_tokens=-1"),
    ({"seed": "a"}, "seed='a'"),
])
def test_generate_rejects_bad_settings(kwargs, message):
    """Guards against invalid settings silently producing output instead of a clear error."""
    model = make_model("GSGS")
    arguments = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        model.generate_stream(torch.tensor([[1, 2]]), **arguments)


def test_generate_rejects_bad_prompts():
    """Guards against empty prompts or ids outside the vocabulary reaching the embedding."""
    model = make_model("GSGS")
    with pytest.raises(ValueError, match="empty"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), 4)
    with pytest.raises(ValueError, match=f"token id {VOCAB} is outside the vocabulary"):
        model.generate(torch.tensor([[1, VOCAB]]), 4)
    with pytest.raises(ValueError, match="token id -1"):
        model.generate(torch.tensor([[-1, 2]]), 4)


def test_step_rejects_mismatched_cache():
    """Guards against stepping a cache of another batch size or several tokens at once."""
    model = make_model("GSGS")
    _, cache = model.prefill(torch.randint(0, VOCAB, (2, 5)))
    with pytest.raises(ValueError, match="cache holds 2 sequences but 1"):
        model.step(torch.tensor([1]), cache)
    with pytest.raises(ValueError, match="one token per sequence"):
        model.step(torch.tensor([[1, 2], [3, 4]]), cache)
    with pytest.raises(ValueError, match=f"token id {VOCAB}"):
        model.step(torch.tensor([VOCAB, 1]), cache)
    with pytest.raises(ValueError, match="DecodingCache"):
        model.step(torch.tensor([1, 1]), make_model("GG").new_cache(2))


# ---------------------------------------------------------------------------- command line
TEXT = "to be, or not to be: that is the question.\n"


@pytest.fixture
def char_checkpoint(tmp_path):
    """A run folder with one checkpoint of an untrained GSGS model and a char tokenizer."""
    from groundthink.checkpoint import save_checkpoint
    from groundthink.tokenizer import CharTokenizer

    tokenizer = CharTokenizer.train(TEXT)
    config = GroundThinkConfig(vocab_size=tokenizer.vocab_size, d_model=16, n_heads=2, head_dim=8, expand_v=1.0,
                               layer_pattern="GSGS", window_size=W, memory_block=M, chunk_size=C, init_std=0.3)
    model = GroundThinkLM(config).eval()
    run_config = {"model": config.to_dict(), "data": {"path": "", "seq_len": 16}, "train": {}}
    save_checkpoint(tmp_path, model=model, tokenizer=tokenizer, run_config=run_config, step=1)
    return tmp_path, model, tokenizer


def test_cli_generate_streams_greedy_text(char_checkpoint, capsys):
    """Guards against the command printing text other than the prompt plus the model's greedy tokens."""
    from groundthink.cli import main

    run_dir, model, tokenizer = char_checkpoint
    prompt = "to be"
    assert main(["generate", str(run_dir), "--prompt", prompt, "--max-new-tokens", "30", "--temperature", "0"]) == 0
    ids = torch.as_tensor(tokenizer.encode(prompt))[None]
    expected = prompt + tokenizer.decode(model.generate(ids, 30, temperature=0)[0].numpy()) + "\n"
    assert capsys.readouterr().out == expected


def test_cli_generate_seed_repeats(char_checkpoint, capsys):
    """Guards against --seed not fixing the sampled text."""
    from groundthink.cli import main

    run_dir, _, _ = char_checkpoint
    argv = ["generate", str(run_dir), "--prompt", "not", "--max-new-tokens", "25", "--top-k", "5", "--top-p", "0.9"]
    outputs = []
    for seed in ("1", "1", "2"):
        assert main([*argv, "--seed", seed]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]
    assert outputs[0] != outputs[2]


@pytest.mark.parametrize("extra, message", [
    (["--prompt", ""], "--prompt is empty"),
    (["--prompt", "to", "--max-new-tokens", "-2"], "max_new_tokens=-2"),
    (["--prompt", "to", "--top-p", "2"], "top_p=2.0"),
    (["--prompt", "to", "--temperature", "-1"], "temperature=-1.0"),
])
def test_cli_generate_bad_input(char_checkpoint, capsys, extra, message):
    """Guards against bad generate options ending in a traceback instead of one error line."""
    from groundthink.cli import main

    run_dir, _, _ = char_checkpoint
    assert main(["generate", str(run_dir), *extra]) == 1
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_stream_text_holds_partial_utf8():
    """Guards against printing U+FFFD for a character whose UTF-8 bytes span several BPE tokens."""
    from groundthink.cli import _stream_text
    from groundthink.tokenizer import BPETokenizer

    tokenizer = BPETokenizer.train("plain ascii text only\n" * 20, vocab_size=260)
    text = "tea in 東京 ∑ ok"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text), "multi-byte characters must span several tokens for this check"
    pieces = list(_stream_text(tokenizer, (torch.tensor([i]) for i in ids)))
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)
