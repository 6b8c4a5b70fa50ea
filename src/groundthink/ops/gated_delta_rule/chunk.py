"""Chunked gated delta rule (WY representation) in plain PyTorch.

The sequence is cut into chunks of C tokens. Inside a chunk the delta-rule
corrections are solved in closed form with the inverse of one unit lower-triangular
[C, C] matrix;
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


def _unit_lower_inverse(A: torch.Tensor) -> torch.Tensor:
    """Return (I + strictly_lower(A))^-1 for A [..., C, C]; the diagonal and upper part are ignored.

    Block forward substitution with batched matmuls: the inverses of the s x s diagonal blocks
    give those of the 2s x 2s blocks through X21 = -X22 A21 X11, for s = 1, 2, 4, ...
    It replaces torch.linalg.solve_triangular, whose batched CPU path solves the matrices one by
    one and costs more than the rest of the kernel.
    """
    *batch, C = A.shape[:-1]
    size = 1 << max(C - 1, 0).bit_length()                                         # next power of two
    if size != C:
        A = F.pad(A, (0, size - C, 0, size - C))
    blocks = A.new_ones(*batch, size, 1, 1)                                        # inverses of 1 x 1 blocks
    s = 1
    while s < size:
        n_pairs = size // (2 * s)
        diagonal = torch.diagonal(A.reshape(*batch, n_pairs, 2 * s, n_pairs, 2 * s), dim1=-4, dim2=-2)
        lower_left = diagonal.movedim(-1, -3)[..., s:, :s]                          # [..., n_pairs, s, s]
        upper_inv, lower_inv = blocks[..., 0::2, :, :], blocks[..., 1::2, :, :]
        below = -(lower_inv @ lower_left @ upper_inv)
        top = torch.cat([upper_inv, torch.zeros_like(upper_inv)], dim=-1)
        bottom = torch.cat([below, lower_inv], dim=-1)
        blocks = torch.cat([top, bottom], dim=-2)                                  # [..., n_pairs, 2s, 2s]
        s *= 2
    return blocks.reshape(*batch, size, size)[..., :C, :C]


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
        (o, final_state), or (o, final_state, chunk_states) with output_chunk_states.
        o is [B, T, H, V] in the dtype of v, and final_state is [B, H, K, V] or None.
        chunk_states is [B, ceil(T / C), H, K, V]: chunk_states[:, n] is the state
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

    # Chunk-major layout [N, B*H, C, *]: batched products fold the leading dims without
    # copies, and the scan reads contiguous [B*H, ...] slices. T is padded up to N * C with
    # k = v = beta = g = 0, so padded tokens neither write to nor decay the state.
    N = -(-T // C)
    pad = N * C - T
    BH = B * H

    def to_chunks(x: torch.Tensor) -> torch.Tensor:
        if pad:
            x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))                        # pad T (dim 1)
        x = x.view(B, N, C, H, *x.shape[3:]).transpose(2, 3).transpose(0, 1)       # [N, B, H, C, ...]
        return x.reshape(N, BH, C, *x.shape[4:])

    q, k, v = to_chunks(q), to_chunks(k), to_chunks(v)                             # [N, BH, C, K|V]
    g, beta = to_chunks(g), to_chunks(beta)                                        # [N, BH, C]

    # 1. Decays inside each chunk: to each token from the chunk start (inclusive),
    #    from each token to the chunk end (exclusive), and between token pairs.
    decay_from_start = g.cumsum(-1).exp()                                          # [N, BH, C]
    g_after = F.pad(g[..., 1:], (0, 1))
    decay_to_end = g_after.flip(-1).cumsum(-1).flip(-1).exp()                      # [N, BH, C]
    decay_pairs = _segment_sums(g).exp()                                           # [N, BH, C, C], 0 above
    decay_chunk = decay_from_start[..., -1]                                        # [N, BH]

    # 2. WY representation: with A[i, j] = beta_i (k_i . k_j) decay(j -> i) for j < i, the
    #    writes of chunk n are U - W S_n, where U = (I + A)^-1 beta v and
    #    W = (I + A)^-1 beta decay_from_start k. The inverse reads only the strictly lower
    #    part of A, so its diagonal need not be cleared. Row and column scalings act on the
    #    [C, C] matrices rather than on k and v.
    A = (k @ k.transpose(-1, -2)) * (beta[..., None] * decay_pairs)               # [N, BH, C, C]
    inverse = _unit_lower_inverse(A)                                               # [N, BH, C, C]
    U = (inverse * beta[..., None, :]) @ v                                         # [N, BH, C, V]
    W = (inverse * (beta * decay_from_start)[..., None, :]) @ k                    # [N, BH, C, K]

    # 3. Output terms that do not depend on the chunk-start state S_n:
    #    o = P U + (q decay_from_start - P W) S_n, with P the causal decayed q.k scores.
    P = (q @ k.transpose(-1, -2)) * decay_pairs                                    # [N, BH, C, C]
    o_intra = P @ U                                                                # [N, BH, C, V]
    q_state = q * decay_from_start[..., None] - P @ W                              # [N, BH, C, K]

    # 4. Chunk-to-chunk recurrence S_{n+1} = transition_n S_n + writes_n.
    k_to_end = (k * decay_to_end[..., None]).transpose(-1, -2)                     # [N, BH, K, C]
    eye_k = torch.eye(K, dtype=acc, device=q.device)
    transition = decay_chunk[..., None, None] * eye_k - k_to_end @ W               # [N, BH, K, K]
    writes = k_to_end @ U                                                          # [N, BH, K, V]

    # 5. Sequential scan over chunks: one [K, K] @ [K, V] product each. unbind, not indexing:
    #    the backward of each index op would zero-fill and add a full [N, ...] buffer.
    S = q.new_zeros(BH, K, V) if initial_state is None else initial_state.to(acc).reshape(BH, K, V)
    states = []
    for transition_n, writes_n in zip(transition.unbind(0), writes.unbind(0)):
        states.append(S)
        S = torch.baddbmm(writes_n, transition_n, S)
    chunk_states = torch.stack(states)                                             # [N, BH, K, V]

    # 6. Add the contribution of the chunk-start state, then restore [B, T, H, V].
    o = o_intra + q_state @ chunk_states                                           # [N, BH, C, V]
    o = o.view(N, B, H, C, V).permute(1, 0, 3, 2, 4).reshape(B, N * C, H, V)[:, :T].to(out_dtype)

    final_state = S.view(B, H, K, V) if output_final_state else None
    if output_chunk_states:
        return o, final_state, chunk_states.view(N, B, H, K, V).transpose(0, 1)    # [B, N, H, K, V]
    return o, final_state
