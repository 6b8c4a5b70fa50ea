"""Chunked gated delta rule (WY representation) in plain PyTorch.

The sequence is cut into chunks of C tokens. Inside a chunk the delta-rule
corrections are solved in closed form with one unit-lower-triangular solve;
between chunks the state follows a linear recurrence
S_{n+1} = P_n S_n + R_n with a [K, K] transition P_n, so the only sequential
loop is one [K, K] @ [K, V] product per chunk. Derivation: docs/chunked-gated-delta.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import accumulation_dtype, check_inputs, l2norm


def _segment_sums(g: torch.Tensor) -> torch.Tensor:
    """Map g [..., C] to L [..., C, C] with L[i, j] = sum_{j < l <= i} g_l for i >= j, -inf above.

    Summing the segment directly (instead of G_i - G_j of cumulative sums) keeps
    the decay between two tokens exact when a huge decay sits earlier in the chunk.
    """
    C = g.shape[-1]
    strictly_lower = torch.ones(C, C, dtype=torch.bool, device=g.device).tril(-1)
    terms = g[..., :, None].expand(*g.shape, C).masked_fill(~strictly_lower, 0.0)   # [..., C(l), C(j)]
    sums = terms.cumsum(dim=-2)                                                     # [..., C(i), C(j)]
    lower = torch.ones(C, C, dtype=torch.bool, device=g.device).tril()
    return sums.masked_fill(~lower, float("-inf"))


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    output_chunk_states: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
):
    """Gated delta rule over chunks of `chunk_size` tokens; same results as the recurrent kernel.

    S_t = exp(g_t) * (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = S_t^T (scale * q_t)

    Args:
        q, k: [B, T, H, K]; keys are expected unit-norm (see recurrent_gated_delta_rule),
            or pass use_qk_l2norm_in_kernel=True.
        v: [B, T, H, V].
        g: [B, T, H], log decay (<= 0).
        beta: [B, T, H], write strength in [0, 1].
        scale: query scale, default K ** -0.5.
        initial_state: [B, H, K, V] or None for zeros; gradients flow into it.
        output_final_state: also return S_T.
        chunk_size: C, any integer >= 1; T need not be a multiple of it.
        output_chunk_states: also return the state at the start of every chunk.

    Returns:
        (o, final_state) or, with output_chunk_states, (o, final_state, chunk_states):
        o [B, T, H, V] in the dtype of v; final_state [B, H, K, V] or None;
        chunk_states [B, ceil(T / C), H, K, V] where chunk_states[:, n] is the state
        before token n * C. States are in the accumulation dtype (float32, or
        float64 for float64 inputs).
    """
    check_inputs(q, k, v, g, beta, initial_state, chunk_size)
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    out_dtype = v.dtype
    acc = accumulation_dtype(v.dtype)
    if scale is None:
        scale = K ** -0.5

    q, k, v, g, beta = (x.to(acc) for x in (q, k, v, g, beta))
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    q = q * scale

    # Heads first, then pad T up to N * C. Padded tokens have k = v = beta = g = 0,
    # so they neither write to nor decay the state.
    N = -(-T // C)
    pad = N * C - T
    q, k, v = (F.pad(x.transpose(1, 2), (0, 0, 0, pad)) for x in (q, k, v))      # [B, H, N*C, *]
    g, beta = (F.pad(x.transpose(1, 2), (0, pad)) for x in (g, beta))             # [B, H, N*C]
    q, k = (x.reshape(B, H, N, C, K) for x in (q, k))
    v = v.reshape(B, H, N, C, V)
    g, beta = (x.reshape(B, H, N, C) for x in (g, beta))

    # 1. Decays inside each chunk: to each token from the chunk start (inclusive),
    #    from each token to the chunk end (exclusive), and between token pairs.
    decay_from_start = g.cumsum(-1).exp()                                          # [B, H, N, C]
    g_after = F.pad(g[..., 1:], (0, 1))
    decay_to_end = g_after.flip(-1).cumsum(-1).flip(-1).exp()                      # [B, H, N, C]
    decay_pairs = _segment_sums(g).exp()                                           # [B, H, N, C, C]
    decay_chunk = decay_from_start[..., -1]                                        # [B, H, N]

    # 2. WY representation: with A[i, j] = beta_i (k_i . k_j) decay(j -> i) for j < i,
    #    the per-token corrections are (I + A)^-1 applied to beta v (giving U) and to
    #    beta decay_from_start k (giving W); the writes of chunk n are U - W S_n.
    k_beta = k * beta[..., None]
    eye = torch.eye(C, dtype=acc, device=q.device)
    A = (k_beta @ k.transpose(-1, -2) * decay_pairs).tril(-1)                     # [B, H, N, C, C]
    rhs = torch.cat([v * beta[..., None], k_beta * decay_from_start[..., None]], dim=-1)
    solved = torch.linalg.solve_triangular(A + eye, rhs, upper=False, unitriangular=True)
    U, W = solved.split([V, K], dim=-1)                                            # [B, H, N, C, V], [.., K]

    # 3. Output terms that do not depend on the chunk-start state S_n:
    #    o = P U + (q decay_from_start - P W) S_n, with P the causal decayed q.k scores.
    P = q @ k.transpose(-1, -2) * decay_pairs                                      # [B, H, N, C, C]
    o_intra = P @ U                                                                # [B, H, N, C, V]
    q_state = q * decay_from_start[..., None] - P @ W                              # [B, H, N, C, K]

    # 4. Chunk-to-chunk recurrence S_{n+1} = transition_n S_n + writes_n.
    k_to_end = (k * decay_to_end[..., None]).transpose(-1, -2)                     # [B, H, N, K, C]
    transition = decay_chunk[..., None, None] * torch.eye(K, dtype=acc, device=q.device) - k_to_end @ W
    writes = k_to_end @ U                                                          # [B, H, N, K, V]

    # 5. Sequential scan over chunks: one [K, K] @ [K, V] product each.
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(acc)
    states = []
    for n in range(N):
        states.append(S)
        S = transition[:, :, n] @ S + writes[:, :, n]
    chunk_states = torch.stack(states, dim=2)                                      # [B, H, N, K, V]

    # 6. Add the contribution of the chunk-start state and undo the padding.
    o = o_intra + q_state @ chunk_states                                           # [B, H, N, C, V]
    o = o.reshape(B, H, N * C, V)[:, :, :T].transpose(1, 2).to(out_dtype)          # [B, T, H, V]

    final_state = S if output_final_state else None
    if output_chunk_states:
        return o, final_state, chunk_states.transpose(1, 2)                        # [B, N, H, K, V]
    return o, final_state
