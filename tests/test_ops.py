"""Gated delta rule kernels: chunked == recurrent, hand-computed steps, gradients, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from groundthink.ops import chunk_gated_delta_rule, gated_delta_rule, recurrent_gated_delta_rule, resolve_backend
from groundthink.ops import dispatch

from conftest import assert_close

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def make_inputs(B=2, T=65, H=3, K=8, V=12, dtype=torch.float64, g_scale=0.5, requires_grad=False, initial=True):
    """Random unit keys and random gates (constant gates hide padding bugs in the short last chunk)."""
    q = torch.randn(B, T, H, K, dtype=dtype)
    k = F.normalize(torch.randn(B, T, H, K, dtype=dtype), dim=-1)
    v = torch.randn(B, T, H, V, dtype=dtype)
    g = -g_scale * torch.rand(B, T, H, dtype=dtype)
    beta = torch.rand(B, T, H, dtype=dtype)
    S0 = torch.randn(B, H, K, V, dtype=dtype) if initial else None
    tensors = [q, k, v, g, beta] + ([S0] if initial else [])
    if requires_grad:
        for x in tensors:
            x.requires_grad_(True)
    return q, k, v, g, beta, S0


def grads(fn, inputs, loss_weights):
    """Gradients of a loss that depends on both the outputs and the final state."""
    o, S = fn(*inputs)
    loss = (o * loss_weights[0]).sum() + (S * loss_weights[1]).sum()
    leaves = [x for x in inputs if x is not None]
    return torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("chunk_size", [16, 64])
@pytest.mark.parametrize("T", [1, 7, 63, 64, 65, 200, 300])
@pytest.mark.parametrize("initial", [False, True])
def test_chunk_matches_recurrent(dtype, chunk_size, T, initial):
    """Guards the WY solve, the padding of the last chunk and the chunk-state scan."""
    B, H, K, V = 2, 3, 8, 12
    q, k, v, g, beta, S0 = make_inputs(B, T, H, K, V, dtype=dtype, requires_grad=True, initial=initial)
    inputs = (q, k, v, g, beta, S0)

    def run_chunk(*x):
        o, S, states = chunk_gated_delta_rule(*x[:5], initial_state=x[5], output_final_state=True,
                                              chunk_size=chunk_size, output_chunk_states=True)
        run_chunk.states = states
        return o, S

    def run_recurrent(*x):
        return recurrent_gated_delta_rule(*x[:5], initial_state=x[5], output_final_state=True)

    o_ref, S_ref = run_recurrent(*inputs)
    o, S = run_chunk(*inputs)
    tol = TOL[dtype]
    assert o.dtype == dtype
    assert_close(o, o_ref, tol, "output")
    assert_close(S, S_ref, tol, "final state")

    # Chunk-start states against the recurrent kernel run up to each chunk start.
    N = -(-T // chunk_size)
    assert run_chunk.states.shape == (B, N, H, K, V)
    for n in range(N):
        start = n * chunk_size
        if start == 0:
            expected = S0 if S0 is not None else torch.zeros(B, H, K, V, dtype=dtype)
        else:
            _, expected = recurrent_gated_delta_rule(q[:, :start], k[:, :start], v[:, :start], g[:, :start],
                                                     beta[:, :start], initial_state=S0, output_final_state=True)
        assert_close(run_chunk.states[:, n], expected, tol, f"chunk state {n}")

    weights = (torch.randn_like(o_ref), torch.randn_like(S_ref))
    names = ["q", "k", "v", "g", "beta", "initial_state"]
    for name, got, want in zip(names, grads(run_chunk, inputs, weights), grads(run_recurrent, inputs, weights)):
        assert_close(got, want, tol, f"grad {name}")


@pytest.mark.parametrize("case", ["no_decay", "half_no_decay", "strong_20", "strong_100", "strong_1e4"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gate_edge_cases(case, dtype):
    """Guards exp overflow / NaN in the decay matrices when g is 0 or huge."""
    B, T, H, K, V = 2, 70, 2, 8, 6
    q, k, v, g, beta, S0 = make_inputs(B, T, H, K, V, dtype=dtype, requires_grad=False)
    if case == "no_decay":
        g = torch.zeros_like(g)
    elif case == "half_no_decay":
        g = torch.where(torch.rand_like(g) < 0.5, torch.zeros_like(g), g)
    else:
        g = torch.full_like(g, -float(case.split("_")[1]))
    inputs = [x.clone().requires_grad_(True) for x in (q, k, v, g, beta, S0)]
    o, S = chunk_gated_delta_rule(*inputs[:5], initial_state=inputs[5], output_final_state=True, chunk_size=16)
    o_ref, S_ref = recurrent_gated_delta_rule(*inputs[:5], initial_state=inputs[5], output_final_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    assert_close(o, o_ref, TOL[dtype], "output")
    assert_close(S, S_ref, TOL[dtype], "final state")
    (gr,) = torch.autograd.grad((o ** 2).sum() + S.sum(), [inputs[3]])
    assert torch.isfinite(gr).all(), "gradient of g is not finite"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_zero_alpha_forgets_the_past(dtype):
    """After a token with alpha = 0, tokens before it no longer influence later outputs."""
    B, T, H, K, V = 1, 40, 2, 8, 4
    reset = 21
    q, k, v, g, beta, S0 = make_inputs(B, T, H, K, V, dtype=dtype)
    g[:, reset] = -float("inf")
    o1, _ = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=S0, chunk_size=16)
    v2 = v.clone()
    v2[:, :reset] = torch.randn_like(v2[:, :reset])
    k2 = k.clone()
    k2[:, :reset] = F.normalize(torch.randn_like(k2[:, :reset]), dim=-1)
    o2, _ = chunk_gated_delta_rule(q, k2, v2, g, beta, initial_state=torch.randn_like(S0), chunk_size=16)
    assert torch.isfinite(o1).all()
    assert torch.equal(o1[:, reset:], o2[:, reset:]) or (o1[:, reset:] - o2[:, reset:]).abs().max() < 1e-12
    assert (o1[:, :reset] - o2[:, :reset]).abs().max() > 1e-3


def test_recurrence_by_hand():
    """Pins the order of decay and delta correction: S_t = alpha (I - beta k k^T) S_{t-1} + beta k v^T."""
    torch.manual_seed(3)
    K, V, T = 3, 2, 4
    S = torch.randn(K, V, dtype=torch.float64)
    S0 = S.clone()
    q = torch.randn(T, K, dtype=torch.float64)
    k = F.normalize(torch.randn(T, K, dtype=torch.float64), dim=-1)
    v = torch.randn(T, V, dtype=torch.float64)
    alpha = torch.tensor([0.9, 0.5, 1.0, 0.2], dtype=torch.float64)
    beta = torch.tensor([0.3, 1.0, 0.7, 0.1], dtype=torch.float64)
    expected = []
    for t in range(T):
        kt = k[t][:, None]
        S = alpha[t] * (torch.eye(K, dtype=torch.float64) - beta[t] * kt @ kt.T) @ S + beta[t] * kt @ v[t][None, :]
        expected.append(S.T @ (q[t] * K ** -0.5))
    expected = torch.stack(expected)

    args = (q[None, :, None], k[None, :, None], v[None, :, None], alpha.log()[None, :, None], beta[None, :, None])
    for kernel in (recurrent_gated_delta_rule, lambda *a, **kw: chunk_gated_delta_rule(*a, chunk_size=3, **kw)):
        o, S_final = kernel(*args, initial_state=S0[None, None], output_final_state=True)
        assert_close(o[0, :, 0], expected, 1e-12, "output")
        assert_close(S_final[0, 0], S, 1e-12, "final state")


def test_chunk_gradcheck():
    """torch.autograd.gradcheck of the chunked kernel on tiny float64 inputs."""
    q, k, v, g, beta, S0 = make_inputs(1, 5, 1, 3, 2, requires_grad=True)

    def fn(q, k, v, g, beta, S0):
        o, S = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=S0, output_final_state=True, chunk_size=2)
        return o, S

    assert torch.autograd.gradcheck(fn, (q, k, v, g, beta, S0), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("kernel", ["chunk", "recurrent"])
def test_continuation_from_final_state(kernel):
    """Running T tokens, then 7 more from the returned state, equals one run over T + 7 tokens."""
    T = 50
    q, k, v, g, beta, S0 = make_inputs(2, T + 7, 2, 8, 5)

    def run(sl, initial):
        if kernel == "chunk":
            return chunk_gated_delta_rule(q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl], initial_state=initial,
                                          output_final_state=True, chunk_size=16)
        return recurrent_gated_delta_rule(q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl], initial_state=initial,
                                          output_final_state=True)

    o_full, S_full = run(slice(0, T + 7), S0)
    o1, S1 = run(slice(0, T), S0)
    o2, S2 = run(slice(T, T + 7), S1)
    assert_close(torch.cat([o1, o2], dim=1), o_full, 1e-12, "output")
    assert_close(S2, S_full, 1e-12, "final state")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_accumulate_in_float32(dtype):
    """Half-precision inputs: fp32 state, outputs in the input dtype, close to the fp32 result."""
    q, k, v, g, beta, _ = make_inputs(1, 40, 2, 8, 4, dtype=torch.float32, initial=False)
    o32, S32 = chunk_gated_delta_rule(q, k, v, g, beta, output_final_state=True, chunk_size=16)
    o, S = chunk_gated_delta_rule(*(x.to(dtype) for x in (q, k, v, g, beta)), output_final_state=True, chunk_size=16)
    assert o.dtype == dtype
    assert S.dtype == torch.float32
    assert_close(o.float(), o32, 3e-2, "output")


def test_l2norm_in_kernel():
    """use_qk_l2norm_in_kernel equals normalising q and k before the call."""
    q, k, v, g, beta, S0 = make_inputs(1, 20, 2, 8, 4)
    k_raw = k * (1 + 3 * torch.rand(*k.shape[:-1], 1, dtype=k.dtype))
    o1, _ = chunk_gated_delta_rule(q, k_raw, v, g, beta, chunk_size=8, use_qk_l2norm_in_kernel=True)
    o2, _ = chunk_gated_delta_rule(F.normalize(q, dim=-1), k, v, g, beta, chunk_size=8)
    assert_close(o1, o2, 1e-12, "output")


def test_default_scale_is_inverse_sqrt_k():
    q, k, v, g, beta, _ = make_inputs(1, 9, 1, 16, 4, initial=False)
    o_default, _ = recurrent_gated_delta_rule(q, k, v, g, beta)
    o_explicit, _ = recurrent_gated_delta_rule(q, k, v, g, beta, scale=0.25)
    assert_close(o_default, o_explicit, 1e-14, "output")


def check_long_sequence_stability(T: int) -> None:
    """No decay and beta = 1 in float32: finite and equal to the recurrent kernel."""
    B, H, K, V = 1, 2, 16, 16
    q, k, v, _, _, _ = make_inputs(B, T, H, K, V, dtype=torch.float32, initial=False)
    g = torch.zeros(B, T, H)
    beta = torch.ones(B, T, H)
    o, S = chunk_gated_delta_rule(q, k, v, g, beta, output_final_state=True)
    o_ref, S_ref = recurrent_gated_delta_rule(q, k, v, g, beta, output_final_state=True)
    assert torch.isfinite(o).all()
    assert torch.isfinite(S).all()
    assert_close(o, o_ref, 1e-4, "output")
    assert_close(S, S_ref, 1e-4, "final state")


@pytest.mark.slow
def test_long_sequence_stability():
    """T = 8192: 128 chunks."""
    check_long_sequence_stability(8192)


def test_long_sequence_stability_short():
    """The default-suite version of the long check, T = 2048."""
    check_long_sequence_stability(2048)


# ---------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kernel", [chunk_gated_delta_rule, recurrent_gated_delta_rule])
def test_shape_errors_name_the_argument(kernel):
    q, k, v, g, beta, S0 = make_inputs(2, 10, 3, 4, 5)
    with pytest.raises(ValueError, match=r"k must have the shape of q.*\(2, 10, 3, 4\).*\(2, 10, 3, 5\)"):
        kernel(q, torch.randn(2, 10, 3, 5, dtype=q.dtype), v, g, beta)
    with pytest.raises(ValueError, match=r"q must have shape \[B, T, H, K\].*rank 3"):
        kernel(q[0], k, v, g, beta)
    with pytest.raises(ValueError, match=r"v must have shape \[B, T, H, V\]"):
        kernel(q, k, v[:, :9], g, beta)
    with pytest.raises(ValueError, match=r"beta must have shape \[B, T, H\] = \(2, 10, 3\), got \(2, 10\)"):
        kernel(q, k, v, g, beta[..., 0])
    with pytest.raises(ValueError, match=r"g must be a floating-point tensor"):
        kernel(q, k, v, torch.zeros(2, 10, 3, dtype=torch.long), beta)
    with pytest.raises(ValueError, match=r"initial_state must have shape \[B, H, K, V\] = \(2, 3, 4, 5\), got \(2, 3, 5, 4\)"):
        kernel(q, k, v, g, beta, initial_state=S0.transpose(-1, -2))


@pytest.mark.parametrize("chunk_size", [0, -3, 2.5])
def test_chunk_size_error(chunk_size):
    q, k, v, g, beta, _ = make_inputs(1, 4, 1, 4, 4)
    with pytest.raises(ValueError, match=r"chunk_size must be an integer >= 1"):
        chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=chunk_size)


# ---------------------------------------------------------------------------------------- dispatch
def test_dispatch_auto_on_cpu_picks_torch():
    name, reason = resolve_backend("auto", "cpu")
    assert name == "torch"
    assert "cpu" in reason
    q, k, v, g, beta, S0 = make_inputs(1, 20, 2, 4, 4)
    o, S = gated_delta_rule(q, k, v, g, beta, initial_state=S0, output_final_state=True, chunk_size=8)
    o_ref, S_ref = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=S0, output_final_state=True, chunk_size=8)
    assert torch.equal(o, o_ref) and torch.equal(S, S_ref)


def test_dispatch_fla_without_library_raises(monkeypatch):
    monkeypatch.setattr(dispatch, "fla_chunk_kernel", lambda: None)
    with pytest.raises(ValueError, match=r"flash-linear-attention is not importable.*\[gpu\]"):
        resolve_backend("fla", "cpu")
    assert resolve_backend("auto", "cuda")[0] == "torch"


def test_dispatch_auto_on_cuda_with_library_picks_fla(monkeypatch):
    """With the library importable, auto picks fla on CUDA and torch on CPU; fla on CPU is rejected."""
    monkeypatch.setattr(dispatch, "fla_chunk_kernel", lambda: object())
    assert resolve_backend("auto", "cuda")[0] == "fla"
    assert resolve_backend("auto", "cpu")[0] == "torch"
    with pytest.raises(ValueError, match=r"CUDA only"):
        resolve_backend("fla", "cpu")
    with pytest.raises(ValueError, match=r"invalid backend 'triton'"):
        resolve_backend("triton", "cpu")
