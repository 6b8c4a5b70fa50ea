"""Recurrent gated delta rule: the reference, and the one-token decoding step."""

from __future__ import annotations

import torch

from .checks import accumulation_dtype, check_inputs, l2norm


def recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule, one token at a time.

    S_t = exp(g_t) * (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = S_t^T (scale * q_t)

    Args:
        q, k: [B, T, H, K]. Keys are expected unit-norm: with non-unit keys the
            factor (I - beta k k^T) is no longer a projection-like contraction and
            the state can grow without bound once beta * |k|^2 > 2. Pass
            use_qk_l2norm_in_kernel=True to normalise q and k here.
        v: [B, T, H, V].
        g: [B, T, H], log decay (<= 0); alpha_t = exp(g_t).
        beta: [B, T, H], write strength in [0, 1].
        scale: query scale, default K ** -0.5.
        initial_state: [B, H, K, V] state S_0, or None for zeros.
        output_final_state: also return S_T.

    Returns:
        o: [B, T, H, V] in the dtype of v; final_state: [B, H, K, V] in the
        accumulation dtype (float32, or float64 for float64 inputs), or None.
    """
    check_inputs(q, k, v, g, beta, initial_state)
    B, T, H, K = q.shape
    V = v.shape[-1]
    out_dtype = v.dtype
    acc = accumulation_dtype(v.dtype)
    if scale is None:
        scale = K ** -0.5

    q, k, v, g, beta = (x.to(acc) for x in (q, k, v, g, beta))
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    q = q * scale

    if initial_state is None:
        S = q.new_zeros(B, H, K, V)
    else:
        S = initial_state.to(acc)

    outputs = []
    for t in range(T):
        k_t, v_t, q_t = k[:, t], v[:, t], q[:, t]          # [B, H, K], [B, H, V], [B, H, K]
        alpha_t = g[:, t].exp()[..., None, None]            # [B, H, 1, 1]
        beta_t = beta[:, t][..., None]                      # [B, H, 1]

        # Decay, then replace the memory's prediction for k_t by v_t in proportion to beta_t.
        S = alpha_t * S
        prediction = torch.einsum("bhk,bhkv->bhv", k_t, S)
        S = S + torch.einsum("bhk,bhv->bhkv", k_t, beta_t * (v_t - prediction))

        outputs.append(torch.einsum("bhk,bhkv->bhv", q_t, S))

    o = torch.stack(outputs, dim=1).to(out_dtype)          # [B, T, H, V]
    return o, (S if output_final_state else None)
