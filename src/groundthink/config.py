"""Model configuration: one typed dataclass, validated in one place."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LAYER_TYPES = {"G": "gdn", "S": "swa", "A": "attention"}
ACCUMULATION_MODES = ("replace", "mean", "weighted")
BACKENDS = ("auto", "torch", "fla")


class ConfigError(ValueError):
    """An invalid configuration value; the message names the field, the value and the fix."""


@dataclass
class GroundThinkConfig:
    """Hyper-parameters of a GroundThink language model.

    Shapes use `D = d_model`, `H = n_heads`, `K = head_dim`, `V = expand_v * K`,
    `W = window_size`, `M = memory_block`, `C = chunk_size`.
    """

    vocab_size: int = 256
    """Number of token ids the embedding accepts."""
    d_model: int = 128
    """Residual stream width D."""
    n_heads: int = 4
    """Heads H of every mixer. GDN memory heads and SWA heads are paired one to one."""
    head_dim: int = 32
    """GDN key/query head dim K: the number of memory slots per head."""
    expand_v: float = 2.0
    """GDN value head dim as a multiple of K: V = expand_v * K must be an integer."""
    layer_pattern: str = "GSGS"
    """One letter per layer: G (Gated DeltaNet), S (sliding-window attention reading the
    GDN memory) or A (full causal attention)."""
    window_size: int = 64
    """Local attention window W in tokens: position t sees t-W+1 .. t."""
    memory_block: int = 64
    """Memory block M in tokens: position t reads the GDN memory as it stood at
    floor(t / M) * M. Must satisfy M <= W and be a multiple of chunk_size."""
    state_accumulation: str = "weighted"
    """Rule that combines the memories of the GDN layers below an SWA layer:
    replace (latest GDN layer), mean, or weighted (learned running mix)."""
    state_weight_new: float = 0.5
    """Initial weight w of a new GDN layer's memory in the weighted mix, in (0, 1)."""
    global_gate_bias: float = 1.0
    """Initial bias of the SWA gate (logit); positive favours the global pathway."""
    slot_norm: bool = False
    """RMSNorm (learned weight over V) on each memory slot before state_k_proj and
    state_v_proj, so that slot scores do not shrink with the memory's magnitude."""
    beta_bias: float = 0.0
    """Initial bias of the GDN write-strength logit: beta = sigmoid(W_b x + beta_bias)."""
    decay_a_min: float = 1.0
    """Lower end of the uniform initialisation range of A = exp(A_log) (per head)."""
    decay_a_max: float = 16.0
    """Upper end of the initialisation range of A = exp(A_log) (per head)."""
    dt_min: float = 0.001
    """Lower end of the log-uniform initialisation range of softplus(dt_bias)."""
    dt_max: float = 0.1
    """Upper end of the log-uniform initialisation range of softplus(dt_bias)."""
    use_short_conv: bool = True
    """Causal depthwise convolution (then SiLU) on q, k and v of GDN layers."""
    conv_size: int = 4
    """Kernel width of the short convolution in tokens."""
    use_output_gate: bool = True
    """GDN output o -> W_o (RMSNorm(o) * SiLU(W_gate x)); without it W_o RMSNorm(o)."""
    chunk_size: int = 64
    """Chunk C of the chunked gated delta rule kernel, in tokens."""
    ffn_mult: float = 8.0 / 3.0
    """SwiGLU hidden size as a multiple of D, rounded up to a multiple of 64."""
    rope_theta: float = 10000.0
    """RoPE base of the local and full attention."""
    tie_embeddings: bool = True
    """Share the token embedding with the LM head."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation of linear and embedding weights."""
    norm_eps: float = 1e-6
    """Epsilon of every RMSNorm."""
    backend: str = "auto"
    """Gated delta rule kernel: auto (fla on CUDA when installed, else torch), torch or fla."""

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def value_dim(self) -> int:
        """V, the GDN value head dim."""
        return int(round(self.expand_v * self.head_dim))

    @property
    def attn_head_dim(self) -> int:
        """Head dim of SWA and full attention: D / H."""
        return self.d_model // self.n_heads

    @property
    def n_layers(self) -> int:
        return len(self.layer_pattern)

    @property
    def layer_types(self) -> list[str]:
        """The pattern expanded to one layer type per layer ("gdn", "swa", "attention")."""
        return [LAYER_TYPES[c] for c in self.layer_pattern]

    @property
    def ffn_hidden(self) -> int:
        hidden = int(math.ceil(self.ffn_mult * self.d_model))
        return 64 * int(math.ceil(hidden / 64))

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ConfigError naming the first invalid field, its value and the fix."""

        def fail(name: str, fix: str) -> None:
            raise ConfigError(f"invalid {name}={getattr(self, name)!r}: {fix}")

        for name in ("vocab_size", "d_model", "n_heads", "head_dim", "window_size",
                     "memory_block", "chunk_size", "conv_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                fail(name, "must be an integer")
            if value < 1:
                fail(name, "must be at least 1")
        if not isinstance(self.layer_pattern, str) or not self.layer_pattern:
            fail("layer_pattern", "must be a non-empty string over G, S and A, for example 'GSGS'")
        unknown = sorted(set(self.layer_pattern) - set(LAYER_TYPES))
        if unknown:
            fail("layer_pattern", f"unknown layer letter(s) {unknown}; use G (GDN), S (SWA) or A (full attention)")
        if self.d_model % self.n_heads != 0 and ("S" in self.layer_pattern or "A" in self.layer_pattern):
            fail("d_model", f"must be divisible by n_heads={self.n_heads} for S and A layers (head dim D / H)")
        if not isinstance(self.expand_v, (int, float)) or self.expand_v <= 0:
            fail("expand_v", "must be a positive number")
        if abs(self.expand_v * self.head_dim - round(self.expand_v * self.head_dim)) > 1e-9:
            fail("expand_v", f"expand_v * head_dim = {self.expand_v * self.head_dim} must be an integer; "
                             f"pick expand_v so that V = expand_v * {self.head_dim} is whole")
        if self.memory_block > self.window_size:
            fail("memory_block", f"must be <= window_size={self.window_size}, otherwise tokens between the block "
                                 "start and the window edge are seen by neither the local nor the global path")
        if self.memory_block % self.chunk_size != 0:
            fail("memory_block", f"must be a multiple of chunk_size={self.chunk_size}; "
                                 f"set chunk_size to a divisor of {self.memory_block}")
        if self.state_accumulation not in ACCUMULATION_MODES:
            fail("state_accumulation", f"must be one of {ACCUMULATION_MODES}")
        if not 0.0 < self.state_weight_new < 1.0:
            fail("state_weight_new", "must lie strictly between 0 and 1")
        if not 0.0 < self.decay_a_min <= self.decay_a_max:
            fail("decay_a_min", f"need 0 < decay_a_min <= decay_a_max={self.decay_a_max}")
        if not 0.0 < self.dt_min <= self.dt_max:
            fail("dt_min", f"need 0 < dt_min <= dt_max={self.dt_max}")
        if self.ffn_mult <= 0:
            fail("ffn_mult", "must be positive")
        if self.rope_theta <= 0:
            fail("rope_theta", "must be positive")
        if self.init_std <= 0:
            fail("init_std", "must be positive")
        if self.norm_eps <= 0:
            fail("norm_eps", "must be positive")
        if self.backend not in BACKENDS:
            fail("backend", f"must be one of {BACKENDS}")

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GroundThinkConfig":
        """Build a config from a dict, rejecting unknown keys by name."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}; valid fields are {sorted(known)}")
        return cls(**data)

    def save(self, path: str | os.PathLike) -> None:
        """Write the config as JSON atomically (temporary file, fsync, rename)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "GroundThinkConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"config file {path} is not valid JSON ({err}); re-save it with GroundThinkConfig.save") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must contain a JSON object, got {type(data).__name__}")
        return cls.from_dict(data)
