"""Scaling planner: parameters, recurrent memory, training memory and decoding cache of a config.

Everything here is computed from the config alone, without building the model:

- parameters by component, equal to `GroundThinkLM.parameter_counts()`;
- the recurrent memory per sequence (the GDN state `[H, K, V]` per layer, in floats and bytes),
  the SWA window cache and the global-pathway snapshots;
- the memory of one training step (weights, gradients, AdamW state, activations with and
  without activation checkpointing) against a device budget;
- the decoding cache at a given context length, next to a Transformer (`A` layers) of the same
  width and depth.

Activations are counted from the tensors that autograd saves for the backward pass, layer by
layer, as the PyTorch code in `groundthink.layers` and `groundthink.ops` saves them.
`measure_saved_tensor_bytes` measures the same quantity on a real model, and the tests compare
the two. Shapes use `B` batch, `T` tokens, `D` d_model, `H` heads, `K` head_dim, `V` value dim,
`d = D / H`, `F` SwiGLU hidden size, `C` chunk size, `N = ceil(T / C)` chunks, `Tp = N * C`,
`W` window, `M` memory block.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from groundthink.config import ConfigError, GroundThinkConfig

# Bytes per element of the dtypes the planner accepts, by the names the CLI takes.
DTYPES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2}
FLOAT32 = 4
INT64 = 8
DECODE_CONTEXTS = (1024, 32768, 131072)
# Device memory a CUDA process uses outside PyTorch tensors (context, kernels, allocator slack).
# This is an assumed round figure, not a measurement, and `--reserve` overrides it.
DEFAULT_CUDA_RESERVE = 512 * 2**20
# A Transformer counts as parameter-matched when its total is within this fraction of the model's.
MATCH_TOLERANCE = 0.05

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str | int | float, allow_zero: bool = False) -> int:
    """Parse a memory size such as '6GiB', '512 MiB', '8GB' or '1e9' into bytes."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text < 0 or (text == 0 and not allow_zero):
            raise ConfigError(f"invalid memory size {text!r}: must be positive, e.g. 6GiB")
        return int(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ConfigError(f"invalid memory size {text!r}: use a number with an optional unit "
                          f"(B, KB, MB, GB, KiB, MiB, GiB), e.g. 6GiB")
    value = float(match.group(1)) * _UNITS[unit]
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"invalid memory size {text!r}: must be positive, e.g. 6GiB")
    return int(value)


def format_bytes(n: float) -> str:
    """Render a byte count with a binary unit, e.g. '1.50 GiB'."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _itemsize(dtype: str) -> int:
    if dtype not in DTYPES:
        raise ConfigError(f"invalid dtype {dtype!r}: use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


# ---------------------------------------------------------------------------- layer structure
def layer_roles(config: GroundThinkConfig) -> list[dict[str, Any]]:
    """List each layer's type, whether an SWA layer above reads its block states (GDN), and whether
    a GDN layer below gives it a global pathway (SWA), by the model's own rules."""
    types = config.layer_types
    roles = []
    for i, layer_type in enumerate(types):
        roles.append({"type": layer_type,
                      "feeds_memory": layer_type == "gdn" and "swa" in types[i + 1:],
                      "has_memory": layer_type == "swa" and "gdn" in types[:i]})
    return roles


# ---------------------------------------------------------------------------- parameters
def gdn_parameters(config: GroundThinkConfig) -> int:
    """Parameters of one GDN mixer: q/k/v/gate/out projections, b and a projections, A_log,
    dt_bias, the short convolutions and the output norm."""
    D, H, K, V = config.d_model, config.n_heads, config.head_dim, config.value_dim
    count = D * H * K * 2 + D * H * V                  # q_proj, k_proj, v_proj
    count += D * H + H + D * H                         # b_proj (with bias), a_proj
    count += 2 * H                                     # A_log, dt_bias
    if config.use_short_conv:
        count += config.conv_size * H * (2 * K + V)    # depthwise kernels on q, k, v
    if config.use_output_gate:
        count += D * H * V                             # g_proj
    count += V                                         # o_norm weight (shared by heads)
    count += H * V * D                                 # o_proj
    return count


def swa_parameters(config: GroundThinkConfig, has_memory: bool) -> int:
    """Parameters of one SWA mixer; the global pathway adds slot key/value maps and the gate."""
    D, H, V = config.d_model, config.n_heads, config.value_dim
    count = 4 * D * D
    if has_memory:
        count += 2 * V * config.attn_head_dim + D * H + H
        if config.slot_norm:
            count += V                                 # slot_norm weight
    return count


def parameter_counts(config: GroundThinkConfig) -> dict[str, int]:
    """Parameters by component, with the keys and conventions of GroundThinkLM.parameter_counts()."""
    D = config.d_model
    roles = layer_roles(config)
    counts = {"embedding": config.vocab_size * D, "gdn": 0, "swa": 0, "attention": 0, "ffn": 0,
              "norms": D, "lm_head": 0}
    for role in roles:
        if role["type"] == "gdn":
            counts["gdn"] += gdn_parameters(config)
        elif role["type"] == "swa":
            counts["swa"] += swa_parameters(config, role["has_memory"])
        else:
            counts["attention"] += 4 * D * D
        counts["ffn"] += 3 * D * config.ffn_hidden
        counts["norms"] += 2 * D
    if config.state_accumulation == "weighted":
        feeding = sum(role["feeds_memory"] for role in roles)
        counts["gdn"] += max(feeding - 1, 0)          # memory_mix_logits
    if not config.tie_embeddings:
        counts["lm_head"] = config.vocab_size * D
    counts["total"] = sum(counts.values())
    return counts


# ---------------------------------------------------------------------------- activations
class Tally:
    """Named byte counts, in insertion order."""

    def __init__(self) -> None:
        self.items: OrderedDict[str, int] = OrderedDict()

    def add(self, name: str, elements: int, itemsize: int) -> None:
        self.items[name] = self.items.get(name, 0) + int(elements) * itemsize

    @property
    def total(self) -> int:
        return sum(self.items.values())


@dataclass(frozen=True)
class _Sizes:
    """The shape symbols of one training micro-batch."""

    B: int
    T: int
    D: int
    H: int
    K: int
    V: int
    d: int
    F: int
    C: int
    N: int
    Tp: int
    W: int
    Tw: int
    M: int
    Nm: int
    Tm: int
    vocab: int
    conv: int

    @classmethod
    def of(cls, config: GroundThinkConfig, batch: int, seq_len: int) -> "_Sizes":
        C, W, M = config.chunk_size, config.window_size, config.memory_block
        N = -(-seq_len // C)
        Nm = -(-seq_len // M)
        # The windowed attention pads T up to whole windows when T > W.
        Tw = -(-seq_len // W) * W if seq_len > W else seq_len
        return cls(B=batch, T=seq_len, D=config.d_model, H=config.n_heads, K=config.head_dim,
                   V=config.value_dim, d=config.attn_head_dim, F=config.ffn_hidden, C=C, N=N, Tp=N * C,
                   W=W, Tw=Tw, M=M, Nm=Nm, Tm=Nm * M, vocab=config.vocab_size, conv=config.conv_size)


def _rmsnorm_saved(t: Tally, name: str, rows: int, dim: int, input_storage: int | None = None) -> None:
    """RMSNorm in float32 saves its input, 1 / rms per row and the normalised rows (before the
    weight). `input_storage` is the element count of the input's storage when it is a view."""
    t.add(f"{name} input", rows * dim if input_storage is None else input_storage, FLOAT32)
    t.add(f"{name} 1/rms", rows, FLOAT32)
    t.add(f"{name} normalised", rows * dim, FLOAT32)


def _block_saved(t: Tally, s: _Sizes) -> None:
    """Saved tensors every block has: the two pre-norms and the SwiGLU."""
    BT = s.B * s.T
    _rmsnorm_saved(t, "mixer norm", BT, s.D)
    t.add("mixer input (norm output)", BT * s.D, FLOAT32)
    _rmsnorm_saved(t, "ffn norm", BT, s.D)
    t.add("ffn input (norm output)", BT * s.D, FLOAT32)
    t.add("ffn gate, SiLU(gate), up, product", 4 * BT * s.F, FLOAT32)


def _gdn_kernel_saved(t: Tally, s: _Sizes, short_conv: bool) -> None:
    """Tensors saved by chunk_gated_delta_rule (PyTorch, float32 accumulation).

    The kernel works chunk-major on [N, B * H, C, *]; rows = B * H * N * C counts the padded
    tokens. Only tensors that the loss reaches are counted: the step that produces the final
    state S_N, and any branch that feeds only it, is freed after the forward pass.
    """
    BH = s.B * s.H
    rows = BH * s.Tp
    state = BH * s.K * s.V
    t.add("kernel [C, C] per chunk (decays, k.k, beta*decays, A, inverse, beta-scaled inverses, q.k, P)",
          8 * rows * s.C, FLOAT32)
    t.add("kernel v, U", 2 * rows * s.V, FLOAT32)
    t.add("kernel masks", 2 * s.C * s.C, 1)

    # The unit-lower-triangular inverse doubles its diagonal blocks from 1 x 1 to C x C (C padded
    # to a power of two, `size`). Level s keeps its s x s block inverses (s floats per row) and
    # a copy of A's off-diagonal blocks with their product (s / 2 each). The last level reads A
    # itself (size per row) instead of a copy, and level 1 keeps its all-ones start.
    size = 1 << max(s.C - 1, 0).bit_length()
    padded_rows = BH * s.N * size
    if size == 2:
        t.add("kernel block inverse levels", padded_rows, FLOAT32)
    elif size >= 4:
        t.add("kernel block inverse levels", padded_rows * (11 * size // 4 - 3), FLOAT32)

    if s.N == 1:
        # One chunk from a zero state: the chunk state carries no gradient, so the state
        # branch (decay to end, writes, transitions, q_state) is not kept.
        t.add("kernel decay from start, beta, beta * decay", 3 * rows, FLOAT32)
        t.add("kernel q, k, W", 3 * rows * s.K, FLOAT32)
        t.add("kernel chunk states", state, FLOAT32)
        return

    t.add("kernel decays (from start, to end), beta, beta * decay", 4 * rows, FLOAT32)
    t.add("kernel q, k, W, q_state, k * decay_to_end", 5 * rows * s.K, FLOAT32)
    if short_conv:
        # The convolution leaves q and k in a transposed (channels-last) layout that the
        # chunking keeps. Every matmul on them therefore saves a contiguous copy: one of q, two
        # of k and two of k^T, and two of k * decay_to_end in place of the tensor itself.
        t.add("kernel matmul copies of q, k and k * decay_to_end", 6 * rows * s.K, FLOAT32)
    if s.N <= 16:
        # Sequential scan: S_0 .. S_{N-2} and the transitions feed states the loss reaches
        # (the transitions only from N = 3 on, since transition 0 multiplies the zero S_0).
        t.add("kernel scan states and stacked chunk states", (2 * s.N - 1) * state, FLOAT32)
        if s.N >= 3:
            t.add("kernel transitions [K, K] and identity", s.N * BH * s.K * s.K * FLOAT32 + s.K * s.K * FLOAT32, 1)
        return

    # Grouped scan over about sqrt(N) groups of G chunks: regrouped transitions, running
    # products (listed and stacked), states from a zero start inside groups, group-start states
    # (listed and stacked) and the chunk states.
    G = math.isqrt(s.N - 1) + 1
    n_groups = -(-s.N // G)
    t.add("kernel grouped-scan transitions and products", 3 * G * n_groups * BH * s.K * s.K, FLOAT32)
    t.add("kernel grouped-scan states", (G * n_groups + 2 * n_groups + s.N) * state, FLOAT32)


def gdn_saved(config: GroundThinkConfig, s: _Sizes) -> Tally:
    """Bytes autograd saves for one GDN block (float32, no autocast)."""
    t = Tally()
    BT, HK, HV = s.B * s.T, s.H * s.K, s.H * s.V
    _block_saved(t, s)

    # Short convolutions: the left-padded input and the SiLU input, for q, k and v.
    if config.use_short_conv:
        for name, channels in (("q", HK), ("k", HK), ("v", HV)):
            t.add(f"short conv {name}", s.B * channels * (s.T + s.conv - 1) + BT * channels, FLOAT32)

    # L2 norm of q and k: input, norm and clamped norm.
    t.add("q, k L2 norm", 2 * (BT * HK + 2 * BT * s.H), FLOAT32)

    # Gates: sigmoid(beta logit), softplus input and output.
    t.add("gates beta, softplus", 3 * BT * s.H + 2 * s.H, FLOAT32)

    _gdn_kernel_saved(t, s, config.use_short_conv)

    # Output: RMSNorm over V per head reads the kernel output through a view of its padded storage.
    _rmsnorm_saved(t, "output norm", BT * s.H, s.V, input_storage=s.B * s.H * s.Tp * s.V)
    if config.use_output_gate:
        t.add("output gate (norm*w, gate logit, SiLU, product)", 4 * BT * HV, FLOAT32)
    else:
        t.add("output (norm*w)", BT * HV, FLOAT32)
    return t


def _rope_saved(t: Tally, s: _Sizes) -> None:
    # cos and sin tables [T, d / 2], cast once for q and once for k.
    t.add("RoPE tables", 4 * s.T * (s.d // 2), FLOAT32)


def swa_saved(config: GroundThinkConfig, s: _Sizes, has_memory: bool, memory_copies: int = 2) -> Tally:
    """Bytes autograd saves for one SWA block (float32, no autocast).

    For T <= W the local path is causal scaled_dot_product_attention (a fused kernel saving q,
    k, v, the output and the log-sum-exp); for T > W it is blockwise attention with a mask, which
    PyTorch's math path on CPU runs with explicit [W, 2W] score matrices. `memory_copies` is
    the number of [B, N_M, H, K, V] memory storages this layer alone keeps for its slot maps
    (see `_memory_copies`).
    """
    t = Tally()
    BT = s.B * s.T
    _block_saved(t, s)
    _rope_saved(t, s)

    # Local path.
    fused = s.T <= s.W
    if fused:
        t.add("local q, k, v, output", 4 * BT * s.D, FLOAT32)
        t.add("local log-sum-exp", BT * s.H, FLOAT32)
    else:
        rows = s.B * s.Tw
        t.add("local q, keys and values of two windows", 5 * rows * s.D, FLOAT32)
        t.add("local attention probabilities [W, 2W]", rows * s.H * 2 * s.W, FLOAT32)

    if not has_memory:
        if not fused:
            t.add("output projection input", BT * s.D, FLOAT32)
        return t

    # Global path: slot attention over the block-start memory, then the gate.
    memory = s.B * s.Nm * s.H * s.K * s.V
    if config.slot_norm:
        # The norm keeps its input (counted in memory_copies), 1/rms and the normalised slots;
        # a contiguous copy of its output feeds both maps.
        t.add("memory kept by the slot norm", memory_copies * memory, FLOAT32)
        t.add("slot norm 1/rms", s.B * s.Nm * s.H * s.K, FLOAT32)
        t.add("slot norm normalised, contiguous output", 2 * memory, FLOAT32)
    else:
        t.add("memory copies for slot key/value maps", memory_copies * memory, FLOAT32)
    t.add("slot keys and values", 2 * s.B * s.Nm * s.H * s.K * s.d, FLOAT32)
    t.add("slot query (blocked copy)", s.B * s.Tm * s.D, FLOAT32)
    t.add("slot weights (softmax, blocked copy)", 2 * s.B * s.Tm * s.H * s.K, FLOAT32)
    t.add("global output", s.B * s.Tm * s.D, FLOAT32)
    t.add("gate, 1 - gate", 2 * BT * s.H, FLOAT32)
    if not fused:
        t.add("local output", s.B * s.Tw * s.D, FLOAT32)
    t.add("output projection input", BT * s.D, FLOAT32)
    return t


def attention_saved(config: GroundThinkConfig, s: _Sizes) -> Tally:
    """Bytes autograd saves for one full-attention block (fused causal attention)."""
    t = Tally()
    BT = s.B * s.T
    _block_saved(t, s)
    _rope_saved(t, s)
    t.add("q, k, v, output", 4 * BT * s.D, FLOAT32)
    t.add("log-sum-exp", BT * s.H, FLOAT32)
    return t


def head_saved(config: GroundThinkConfig, s: _Sizes) -> Tally:
    """Bytes saved by the embedding, the final norm, the LM head and the loss."""
    t = Tally()
    BT = s.B * s.T
    t.add("token ids, targets", 2 * BT, INT64)
    _rmsnorm_saved(t, "final norm", BT, s.D)
    t.add("LM head input", BT * s.D, FLOAT32)
    t.add("log-softmax", BT * s.vocab, FLOAT32)
    return t


def _memory_copies(config: GroundThinkConfig, s: _Sizes) -> tuple[list[int], list[int]]:
    """Memory storages [B, N_M, H, K, V] kept for backward: per SWA layer (the inputs of its slot
    key/value maps) and per GDN layer (weighted mixing saves the running memory it scales).

    The block states are a strided view of the chunk states [B, H, N, K, V]. With slot_norm the
    norm reads that memory as it is and writes a contiguous copy for the maps. Otherwise the slot maps take
    the memory as a [B * N_M * H * K, V] matrix, which is a view only when N = 1 or (H = 1 and
    M = C); otherwise each map makes its own copy. A mixed memory (mean or weighted over
    several GDN layers) is a new tensor, contiguous when M > C, and SWA layers that read the same
    flat tensor share it.
    """
    roles = layer_roles(config)
    step = config.memory_block // config.chunk_size
    view_is_flat = s.N == 1 or (s.H == 1 and step == 1)
    mixed_is_flat = view_is_flat or step > 1
    per_layer = [0] * len(roles)
    gdn_extra = [0] * len(roles)
    feeding, counted_mixed = 0, False
    for i, role in enumerate(roles):
        if role["type"] == "gdn" and role["feeds_memory"]:
            feeding += 1
            if config.state_accumulation == "weighted" and feeding >= 3:
                # (1 - w) * memory saves the previous mixed memory, unless a slot norm kept it already.
                gdn_extra[i] = 0 if config.slot_norm and counted_mixed else 1
            counted_mixed = False
        elif role["type"] == "swa" and role["has_memory"]:
            mixed = config.state_accumulation != "replace" and feeding >= 2
            if config.slot_norm:
                # The norm reads the memory in any layout: a view of chunk states costs nothing,
                # a mixed memory is kept once by the first SWA layer that reads it.
                per_layer[i] = 1 if mixed and not counted_mixed else 0
                counted_mixed = counted_mixed or mixed
            elif mixed and mixed_is_flat:
                per_layer[i] = 0 if counted_mixed else 1
                counted_mixed = True
            elif not mixed and view_is_flat:
                per_layer[i] = 0            # a view of chunk states the GDN layer already keeps
            else:
                per_layer[i] = 2
    return per_layer, gdn_extra


def activation_bytes(config: GroundThinkConfig, batch: int, seq_len: int) -> dict[str, Any]:
    """Saved-tensor bytes of one forward pass, per layer and in total (float32, no autocast)."""
    s = _Sizes.of(config, batch, seq_len)
    swa_copies, gdn_extra = _memory_copies(config, s)
    memory = s.B * s.Nm * s.H * s.K * s.V
    layers = []
    for i, role in enumerate(layer_roles(config)):
        if role["type"] == "gdn":
            tally = gdn_saved(config, s)
            if gdn_extra[i]:
                tally.add("mixed memory (weighted accumulation)", gdn_extra[i] * memory, FLOAT32)
        elif role["type"] == "swa":
            tally = swa_saved(config, s, role["has_memory"], swa_copies[i])
        else:
            tally = attention_saved(config, s)
        layers.append({"type": role["type"], "bytes": tally.total, "items": dict(tally.items)})
    head = head_saved(config, s)
    return {"layers": layers, "head": head.total, "head_items": dict(head.items),
            "total": sum(layer["bytes"] for layer in layers) + head.total}


# ---------------------------------------------------------------------------- memory of a sequence
def recurrent_memory(config: GroundThinkConfig, dtype: str = "fp32") -> dict[str, Any]:
    """Memory one sequence carries: GDN states [H, K, V] (float32), short-conv tails, the SWA
    window cache [W, 2D] and global-pathway snapshots [H, K, V] (float32)."""
    item = _itemsize(dtype)
    H, K, V, D = config.n_heads, config.head_dim, config.value_dim, config.d_model
    roles = layer_roles(config)
    n_gdn = sum(role["type"] == "gdn" for role in roles)
    n_swa = sum(role["type"] == "swa" for role in roles)
    n_snapshots = sum(role["has_memory"] for role in roles)
    state_floats = H * K * V
    conv_tail = (config.conv_size - 1) * H * (2 * K + V) * item if config.use_short_conv else 0
    return {
        "gdn_layers": n_gdn,
        "state_shape": [H, K, V],
        "state_floats_per_layer": state_floats,
        "state_bytes_per_layer": state_floats * FLOAT32,
        "state_floats": n_gdn * state_floats,
        "state_bytes": n_gdn * state_floats * FLOAT32,
        "conv_tail_bytes_per_layer": conv_tail,
        "swa_layers": n_swa,
        "window_cache_bytes_per_layer": config.window_size * 2 * D * item,
        "snapshot_layers": n_snapshots,
        "snapshot_bytes_per_layer": state_floats * FLOAT32,
    }


def decode_cache_bytes(config: GroundThinkConfig, context: int, batch: int = 1, dtype: str = "fp32") -> dict[str, int]:
    """Compute the bytes of a decoding cache after `context` tokens, by component, as
    GroundThinkLM.state_bytes does: GDN state and conv tails, SWA window and snapshots, and for
    `A` layers the keys and values of every token."""
    item = _itemsize(dtype)
    memory = recurrent_memory(config, dtype)
    gdn = memory["gdn_layers"] * (memory["state_bytes_per_layer"] + memory["conv_tail_bytes_per_layer"])
    swa = (memory["swa_layers"] * memory["window_cache_bytes_per_layer"]
           + memory["snapshot_layers"] * memory["snapshot_bytes_per_layer"])
    n_attention = config.layer_pattern.count("A")
    out = {"gdn": batch * gdn, "swa": batch * swa,
           "attention": batch * n_attention * context * 2 * config.d_model * item}
    out["total"] = sum(out.values())
    return out


def transformer_baseline(config: GroundThinkConfig) -> GroundThinkConfig:
    """Return the Transformer of the same width and depth: every layer full attention (`A`)."""
    return dataclasses.replace(config, layer_pattern="A" * config.n_layers)


# ---------------------------------------------------------------------------- training memory
def checkpointed_activation_bytes(config: GroundThinkConfig, batch: int, seq_len: int) -> dict[str, int]:
    """Saved bytes with each block recomputed in backward (torch.utils.checkpoint per block).

    Kept through the forward pass: each block's input [B, T, D], the block states of GDN layers
    that SWA layers read ([B, H, N, K, V] float32), and the head's saved tensors. The backward
    pass recomputes one block at a time, adding that block's own saved tensors; by then the
    head's tensors are freed. "total" is the larger of the two moments.
    """
    s = _Sizes.of(config, batch, seq_len)
    full = activation_bytes(config, batch, seq_len)
    inputs = config.n_layers * s.B * s.T * s.D * FLOAT32
    memory = sum(role["feeds_memory"] for role in layer_roles(config)) * s.B * s.H * s.N * s.K * s.V * FLOAT32
    largest = max(layer["bytes"] for layer in full["layers"])
    return {"blocks": inputs + memory, "head": full["head"], "recomputed_block": largest,
            "total": inputs + memory + max(full["head"], largest)}


@dataclass(frozen=True)
class Budget:
    """Shape, precision and device memory of one training step."""

    batch: int = 8
    """Sequences per micro-batch."""
    seq_len: int = 512
    """Tokens per sequence."""
    dtype: str = "bf16"
    """fp32, or bf16 autocast (weights, gradients and AdamW state stay float32, as in train.py)."""
    device: str = "cuda"
    """cuda or cpu: which AdamW implementation runs (foreach on CUDA keeps one float32 temporary
    per parameter, the per-tensor loop on CPU one tensor at a time)."""
    memory: int | None = None
    """Device memory in bytes, or None to skip the fit check."""
    reserve: int = 0
    """Bytes the device keeps outside PyTorch's tensors (CUDA context, allocator slack)."""

    def validate(self) -> None:
        for name in ("batch", "seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"invalid {name}={value!r}: must be a positive integer")
        _itemsize(self.dtype)
        if self.device not in ("cuda", "cpu"):
            raise ConfigError(f"invalid device={self.device!r}: use cuda or cpu")
        if self.memory is not None and self.memory <= 0:
            raise ConfigError(f"invalid memory={self.memory!r}: must be a positive number of bytes")
        if self.reserve < 0:
            raise ConfigError(f"invalid reserve={self.reserve!r}: must be 0 or more bytes")


def _step_peaks(config: GroundThinkConfig, budget: Budget, batch: int) -> dict[str, int]:
    """Estimate the peak bytes of one training step with and without activation checkpointing.

    Two moments bound the step, as profiled on CPU by benchmarks/bench_plan_memory.py. The
    start of backward keeps weights, AdamW state, every saved activation and two float32
    [B, T, vocab] gradients of the loss. The end of backward and the optimizer step keep
    weights, gradients and AdamW state plus temporaries.
    """
    P = parameter_counts(config)["total"]
    weights, grads, adamw = P * FLOAT32, P * FLOAT32, 2 * P * FLOAT32
    logits_grads = 2 * batch * budget.seq_len * config.vocab_size * FLOAT32
    embedding = config.vocab_size * config.d_model * FLOAT32
    # The embedding's dense gradient, and with tied embeddings its sum with the LM head's.
    embedding_temporaries = (2 if config.tie_embeddings else 1) * embedding
    if budget.device == "cuda":
        optimizer_temporaries = P * FLOAT32        # foreach AdamW: sqrt of every exp_avg_sq at once
    else:
        optimizer_temporaries = _largest_parameter(config) * FLOAT32
    after_backward = weights + grads + adamw + max(embedding_temporaries, optimizer_temporaries)
    activations = activation_bytes(config, batch, budget.seq_len)["total"]
    checkpointed = checkpointed_activation_bytes(config, batch, budget.seq_len)
    # With checkpointing, the start of backward keeps the block inputs, the head and the loss
    # gradients. Later, a recomputed block adds its own tensors while gradients accumulate,
    # counted as all P gradients (an upper bound).
    start = checkpointed["blocks"] + checkpointed["head"] + logits_grads
    recompute = checkpointed["blocks"] + checkpointed["recomputed_block"] + grads
    return {"peak": max(weights + adamw + activations + logits_grads, after_backward),
            "peak_checkpointed": max(weights + adamw + max(start, recompute), after_backward)}


def _largest_parameter(config: GroundThinkConfig) -> int:
    D, H, K, V = config.d_model, config.n_heads, config.head_dim, config.value_dim
    sizes = [config.vocab_size * D, D * config.ffn_hidden]
    if "G" in config.layer_pattern:
        sizes.append(D * H * V)
    if "S" in config.layer_pattern or "A" in config.layer_pattern:
        sizes.append(D * D)
    return max(sizes)


def _max_batch(config: GroundThinkConfig, budget: Budget, key: str) -> int:
    """Largest batch whose step peak fits in memory - reserve (0 when none fits)."""
    available = budget.memory - budget.reserve
    if _step_peaks(config, budget, 1)[key] > available:
        return 0
    low, high = 1, 2
    while _step_peaks(config, budget, high)[key] <= available and high < 2**24:
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        if _step_peaks(config, budget, middle)[key] <= available:
            low = middle
        else:
            high = middle
    return low


def training_memory(config: GroundThinkConfig, budget: Budget) -> dict[str, Any]:
    """Estimated memory of one training step (forward, backward, AdamW) and whether it fits."""
    budget.validate()
    B, T = budget.batch, budget.seq_len
    P = parameter_counts(config)["total"]
    activations = activation_bytes(config, B, T)
    checkpointed = checkpointed_activation_bytes(config, B, T)
    by_type: dict[str, int] = {}
    for layer in activations["layers"]:
        by_type[layer["type"]] = by_type.get(layer["type"], 0) + layer["bytes"]
    by_type["head"] = activations["head"]
    peaks = _step_peaks(config, budget, B)
    out = {
        "batch": B, "seq_len": T, "dtype": budget.dtype, "device": budget.device,
        "weights": P * FLOAT32, "gradients": P * FLOAT32, "adamw": 2 * P * FLOAT32,
        "activations": activations["total"], "activations_by_layer_type": by_type,
        "activations_checkpointed": checkpointed["total"],
        "peak": peaks["peak"], "peak_checkpointed": peaks["peak_checkpointed"],
        "reserve": budget.reserve, "memory": budget.memory,
    }
    if budget.memory is not None:
        available = budget.memory - budget.reserve
        out["fits"] = peaks["peak"] <= available
        out["fits_checkpointed"] = peaks["peak_checkpointed"] <= available
        out["max_batch"] = _max_batch(config, budget, "peak")
        out["max_batch_checkpointed"] = _max_batch(config, budget, "peak_checkpointed")
    return out


# ---------------------------------------------------------------------------- the report
def plan(config: GroundThinkConfig, budget: Budget, label: str = "") -> dict[str, Any]:
    """Everything `groundthink plan` prints for one config, as a JSON-serialisable dict."""
    config.validate()
    budget.validate()
    counts = parameter_counts(config)
    baseline = transformer_baseline(config)
    baseline_counts = parameter_counts(baseline)
    ratio = baseline_counts["total"] / counts["total"]
    decoding = {}
    for context in DECODE_CONTEXTS:
        decoding[str(context)] = {"model": decode_cache_bytes(config, context, 1, budget.dtype)["total"],
                                  "transformer": decode_cache_bytes(baseline, context, 1, budget.dtype)["total"]}
    return {
        "label": label,
        "config": config.to_dict(),
        "parameters": counts,
        "recurrent_memory": recurrent_memory(config, budget.dtype),
        "training": training_memory(config, budget),
        "decoding": {"batch": 1, "dtype": budget.dtype, "contexts": decoding},
        "transformer": {"layer_pattern": baseline.layer_pattern, "parameters": baseline_counts["total"],
                        "parameter_ratio": ratio,
                        "parameter_matched": abs(ratio - 1.0) <= MATCH_TOLERANCE},
    }


# ---------------------------------------------------------------------------- measurement
def measure_saved_tensor_bytes(model, input_ids, labels, autocast_dtype=None) -> dict[str, Any]:
    """Run one forward pass of `model` and return the bytes of the tensors autograd keeps for
    backward, by layer: {"layers": [bytes per block], "head": bytes, "total": bytes}.

    Counted once per storage (views share it), parameters excluded, and only storages still
    held when the forward pass ends: a graph branch that the loss does not reach (such as the
    final GDN state) is freed with its saved tensors. Storage is attributed to the block that
    saved it first; "head" holds the embedding, final norm, LM head and loss.
    """
    import contextlib

    import torch

    class _Token:
        """Lives as long as autograd keeps one saved reference to a storage."""

        def __init__(self, key: int, live: dict[int, int]):
            self.key, self.live = key, live
            live[key] = live.get(key, 0) + 1

        def __del__(self):
            self.live[self.key] -= 1

    owner: dict[int, Any] = {}
    size: dict[int, int] = {}
    live: dict[int, int] = {}
    current: list[Any] = ["head"]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in params or storage.nbytes() == 0:
            return tensor
        owner.setdefault(key, current[0])
        size[key] = max(size.get(key, 0), storage.nbytes())
        return tensor, _Token(key, live)

    def unpack(packed):
        return packed[0] if isinstance(packed, tuple) else packed

    handles = [block.register_forward_pre_hook(lambda module, args, i=i: current.__setitem__(0, i))
               for i, block in enumerate(model.blocks)]
    handles.append(model.final_norm.register_forward_pre_hook(lambda module, args: current.__setitem__(0, "head")))
    autocast = (torch.autocast(input_ids.device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack), autocast:
            loss = model(input_ids, labels=labels).loss
    finally:
        for handle in handles:
            handle.remove()

    layers = [0] * len(model.blocks)
    head = 0
    for key, count in live.items():
        if count <= 0:
            continue
        if owner[key] == "head":
            head += size[key]
        else:
            layers[owner[key]] += size[key]
    del loss
    return {"layers": layers, "head": head, "total": sum(layers) + head}


def measure_training_step_peak(config: GroundThinkConfig, batch: int, seq_len: int,
                               activation_checkpointing: bool = False, seed: int = 0) -> dict[str, int]:
    """Measure the peak memory of one CPU training step as train.py runs it (forward, backward,
    gradient clipping, AdamW step), float32.

    A first step creates the AdamW state. The second runs under torch.profiler with
    profile_memory=True, whose allocation and free events give the bytes allocated at every
    moment: the peak is the tensors held at the step's start (weights and AdamW state) plus the
    highest running sum of the events. Returns {"peak", "at_start", "parameters"} in bytes.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    from groundthink.model import GroundThinkLM
    from groundthink.train import enable_activation_checkpointing, parameter_groups

    torch.manual_seed(seed)
    model = GroundThinkLM(config)
    if activation_checkpointing:
        enable_activation_checkpointing(model)
    groups = [{k: v for k, v in group.items() if k != "names"} for group in parameter_groups(model, 0.1)]
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    ids = torch.randint(0, config.vocab_size, (batch, seq_len + 1))
    x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()

    def step() -> None:
        loss = model(x, labels=y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    at_start = sum(p.numel() * p.element_size() for p in model.parameters())
    at_start += sum(v.numel() * v.element_size() for state in optimizer.state.values()
                    for v in state.values() if isinstance(v, torch.Tensor))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    running = highest = 0
    for _, nbytes in events:
        running += nbytes
        highest = max(highest, running)
    return {"peak": at_start + highest, "at_start": at_start, "parameters": model.num_parameters()}


# ---------------------------------------------------------------------------- text output
def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if abs(n) >= 1e5 else f"{n:,}"


def format_plan(report: dict[str, Any]) -> str:
    """Render one plan report as text lines."""
    c = report["config"]
    p = report["parameters"]
    m = report["recurrent_memory"]
    t = report["training"]
    lines = []
    title = f"plan {report['label']}" if report["label"] else "plan"
    lines.append(f"{title}: layer_pattern={c['layer_pattern']} d_model={c['d_model']} n_heads={c['n_heads']} "
                 f"head_dim={c['head_dim']} expand_v={c['expand_v']} vocab_size={c['vocab_size']}")

    lines.append("")
    lines.append(f"parameters: {p['total']:,} ({_count(p['total'])})")
    for key in ("embedding", "gdn", "swa", "attention", "ffn", "norms", "lm_head"):
        if p[key]:
            lines.append(f"  {key:<10} {p[key]:>14,}  {100 * p[key] / p['total']:5.1f}%")

    lines.append("")
    H, K, V = m["state_shape"]
    lines.append(f"recurrent memory per sequence: {m['gdn_layers']} GDN layers x [H={H}, K={K}, V={V}] = "
                 f"{m['state_floats']:,} floats ({format_bytes(m['state_bytes'])} in float32)")
    lines.append(f"  per GDN layer: {m['state_floats_per_layer']:,} floats, {format_bytes(m['state_bytes_per_layer'])}"
                 f"; short-conv tail {format_bytes(m['conv_tail_bytes_per_layer'])}")
    lines.append(f"  SWA window cache: {m['swa_layers']} layers x {format_bytes(m['window_cache_bytes_per_layer'])}"
                 f" (W={c['window_size']}, keys and values in {report['decoding']['dtype']})")
    lines.append(f"  global snapshots: {m['snapshot_layers']} SWA layers x {format_bytes(m['snapshot_bytes_per_layer'])}")

    lines.append("")
    lines.append(f"training step: batch {t['batch']} x {t['seq_len']} tokens, {t['dtype']}"
                 f"{' autocast' if t['dtype'] != 'fp32' else ''}, AdamW on {t['device']} (estimate)")
    lines.append(f"  weights {format_bytes(t['weights'])}, gradients {format_bytes(t['gradients'])}, "
                 f"AdamW state {format_bytes(t['adamw'])}")
    by_type = ", ".join(f"{k} {format_bytes(v)}" for k, v in t["activations_by_layer_type"].items())
    lines.append(f"  activations {format_bytes(t['activations'])} ({by_type})")
    if t["dtype"] != "fp32" or t["device"] == "cuda":
        lines.append("  (activations counted as the float32 PyTorch code paths save them: an upper bound under "
                     "bf16 autocast and with fused CUDA kernels)")
    lines.append(f"  activations with checkpointing {format_bytes(t['activations_checkpointed'])}")
    lines.append(f"  peak {format_bytes(t['peak'])}; with activation checkpointing {format_bytes(t['peak_checkpointed'])}")
    if t["memory"] is not None:
        available = t["memory"] - t["reserve"]
        reserve = f" after a {format_bytes(t['reserve'])} reserve" if t["reserve"] else ""
        lines.append(f"  budget {format_bytes(t['memory'])} ({format_bytes(available)} for tensors{reserve}): "
                     f"{'fits' if t['fits'] else 'does not fit'}; with checkpointing "
                     f"{'fits' if t['fits_checkpointed'] else 'does not fit'}")
        lines.append(f"  largest batch that fits: {t['max_batch']}, with checkpointing {t['max_batch_checkpointed']}")

    lines.append("")
    tr = report["transformer"]
    matched = "parameter-matched" if tr["parameter_matched"] else "not parameter-matched"
    lines.append(f"decoding cache, batch 1, {report['decoding']['dtype']}: this model vs Transformer "
                 f"{tr['layer_pattern']} at d_model={c['d_model']} ({_count(tr['parameters'])} parameters, "
                 f"{tr['parameter_ratio']:.2f}x; {matched})")
    for context, row in report["decoding"]["contexts"].items():
        lines.append(f"  {int(context) // 1024:>4}k tokens: {format_bytes(row['model']):>11} vs "
                     f"{format_bytes(row['transformer']):>11}")
    return "\n".join(lines)


def comparison(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Compute what each report adds over the first: parameters, state floats, peak memory."""
    base = reports[0]
    rows = []
    for report in reports:
        params = report["parameters"]["total"]
        floats = report["recurrent_memory"]["state_floats"]
        d_params = params - base["parameters"]["total"]
        d_floats = floats - base["recurrent_memory"]["state_floats"]
        rows.append({
            "label": report["label"],
            "parameters": params,
            "added_parameters": d_params,
            "state_floats": floats,
            "added_state_floats": d_floats,
            "added_state_floats_per_added_parameter": d_floats / d_params if d_params else None,
            "peak": report["training"]["peak"],
            "fits": report["training"].get("fits"),
            "decode_bytes_32k": report["decoding"]["contexts"]["32768"]["model"],
        })
    return rows


def format_comparison(reports: list[dict[str, Any]]) -> str:
    """Render reports side by side as a text table, one column per config."""
    rows = comparison(reports)
    changed = [k for k in reports[0]["config"]
               if any(r["config"][k] != reports[0]["config"][k] for r in reports)]
    table: list[tuple[str, list[str]]] = [("", [r["label"] for r in rows])]
    for key in changed:
        table.append((key, [str(r["config"][key]) for r in reports]))
    table.append(("parameters", [_count(r["parameters"]) for r in rows]))
    table.append(("  added", [f"{r['added_parameters']:+,}" for r in rows]))
    table.append(("state floats / sequence", [f"{r['state_floats']:,}" for r in rows]))
    table.append(("  added", [f"{r['added_state_floats']:+,}" for r in rows]))
    table.append(("  added per added param", ["-" if r["added_state_floats_per_added_parameter"] is None
                                              else f"{r['added_state_floats_per_added_parameter']:.3f}" for r in rows]))
    table.append(("training peak", [format_bytes(r["peak"]) for r in rows]))
    if rows[0]["fits"] is not None:
        table.append(("fits", ["yes" if r["fits"] else "no" for r in rows]))
    table.append(("decode cache at 32k", [format_bytes(r["decode_bytes_32k"]) for r in rows]))
    width0 = max(len(name) for name, _ in table)
    widths = [max(len(cells[i]) for _, cells in table) for i in range(len(rows))]
    lines = []
    for name, cells in table:
        lines.append(f"{name:<{width0}}  " + "  ".join(f"{cell:>{w}}" for cell, w in zip(cells, widths)))
    return "\n".join(lines)


# ---------------------------------------------------------------------------- configs from the command line
def _model_field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(GroundThinkConfig)]


def resolve_changes(spec: str, model: GroundThinkConfig) -> tuple[list[str], str]:
    """Turn a change spec such as 'expand_v=4,head_dim=64' or 'd_model*1.4' into `model.KEY=VALUE`
    overrides for train.apply_overrides, and a label.

    `KEY*FACTOR` scales the current value. Integer fields round to the nearest integer, and
    d_model rounds to the nearest multiple of 2 * n_heads so that attention heads have an even
    size, which RoPE needs.
    """
    overrides, labels = [], []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        key = item.split("*", 1)[0].split("=", 1)[0].strip().removeprefix("model.")
        if key not in _model_field_names():
            raise ConfigError(f"invalid change {item!r} in {spec!r}: unknown model field {key!r}; valid fields "
                              f"are {_model_field_names()}")
        if "=" in item:
            overrides.append(f"model.{key}={item.split('=', 1)[1].strip()}")
            labels.append(item)
            continue
        if "*" not in item:
            raise ConfigError(f"invalid change {item!r} in {spec!r}: use KEY=VALUE or KEY*FACTOR, "
                              "e.g. expand_v=4 or d_model*1.4")
        try:
            factor = float(item.split("*", 1)[1])
        except ValueError:
            raise ConfigError(f"invalid change {item!r}: the factor after '*' must be a number, "
                              "e.g. d_model*1.4") from None
        current = getattr(model, key)
        if isinstance(current, bool) or not isinstance(current, (int, float)):
            raise ConfigError(f"invalid change {item!r}: {key}={current!r} is not a number to scale")
        value: float | int = current * factor
        if key == "d_model":
            step = 2 * model.n_heads
            value = max(step, step * round(value / step))
        elif isinstance(current, int):
            value = max(1, round(value))
        overrides.append(f"model.{key}={value}")
        labels.append(f"{item} (={value})")
    if not overrides:
        raise ConfigError(f"invalid change spec {spec!r}: give KEY=VALUE or KEY*FACTOR items separated by commas")
    return overrides, ",".join(labels)


def add_plan_arguments(parser) -> None:
    """Arguments of `groundthink plan`."""
    parser.add_argument("--config", default=None,
                        help="TOML run config with [model], [data] and [train] sections, as for `groundthink train` "
                             "(default: built-in defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value, parsed as TOML, e.g. --set model.expand_v=4 (repeatable)")
    parser.add_argument("--memory", default=None,
                        help="device memory to fit the training step in, e.g. 6GiB, 24GB (default: no fit check)")
    parser.add_argument("--reserve", default=None,
                        help="memory the device keeps outside PyTorch tensors (CUDA context, allocator slack); "
                             "default 512MiB on cuda (an assumed figure), 0 on cpu")
    parser.add_argument("--batch", type=int, default=None, help="sequences per micro-batch (default: train.batch_size)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: data.seq_len)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default=None,
                        help="fp32, or bf16 autocast with float32 weights and optimizer state as in `train` "
                             "(default: bf16 on cuda, fp32 on cpu, like train.dtype=auto); also the dtype of the "
                             "decoding caches")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="device the step runs on; selects the AdamW implementation (default cuda)")
    parser.add_argument("--compare", nargs="+", default=None, metavar="SPEC",
                        help="configs to set side by side with the base one: comma-separated KEY=VALUE or "
                             "KEY*FACTOR changes of model fields (e.g. expand_v=4 'd_model*1.4'), or a TOML file")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def run_plan_command(args) -> int:
    """Run `groundthink plan`: print one report, or a comparison with --compare."""
    import json
    from pathlib import Path

    from groundthink.train import apply_overrides, load_run_config

    run = load_run_config(args.config, args.overrides)
    dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    if args.reserve is not None:
        reserve = parse_bytes(args.reserve, allow_zero=True)
    else:
        reserve = DEFAULT_CUDA_RESERVE if args.device == "cuda" else 0
    budget = Budget(batch=args.batch or run.train.batch_size, seq_len=args.seq_len or run.data.seq_len,
                    dtype=dtype, device=args.device,
                    memory=parse_bytes(args.memory) if args.memory is not None else None, reserve=reserve)
    reports = [plan(run.model, budget, label="base")]
    for spec in args.compare or []:
        if spec.endswith(".toml") or Path(spec).is_file():
            other = load_run_config(spec, args.overrides).model
            label = spec
        else:
            overrides, label = resolve_changes(spec, run.model)
            other = apply_overrides(run.to_dict(), overrides, origin=f"--compare {spec}").model
        reports.append(plan(other, budget, label=label))

    if args.json:
        out: Any = reports[0] if len(reports) == 1 else {"reports": reports, "comparison": comparison(reports)}
        print(json.dumps(out, indent=2))
    elif len(reports) == 1:
        print(format_plan(reports[0]))
    else:
        print(format_plan(reports[0]))
        print()
        print(format_comparison(reports))
    return 0
