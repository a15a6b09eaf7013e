"""What a LLaMA-family model is: its shape and numerical constants."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from halollm.errors import ModelLoadError


@dataclass(frozen=True)
class RopeScaling:
    """llama3-style RoPE frequency scaling (Llama 3.1+); absent for plain RoPE."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position: int


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a LLaMA-family decoder. Every loader produces one of these."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    max_position: int = 4096
    tie_embeddings: bool = False
    attn_bias: bool = False  # Qwen2-style q/k/v biases
    rope_scaling: RopeScaling | None = None
    # llama.cpp's form of the same thing: per-frequency divisors (GGUF tensor rope_freqs)
    rope_freq_factors: tuple[float, ...] | None = None
    architecture: str = "llama"
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = []
        for key in ("vocab_size", "hidden_size", "intermediate_size", "n_layers", "n_heads",
                    "n_kv_heads", "head_dim"):
            if getattr(self, key) <= 0:
                problems.append(f"{key} must be positive (got {getattr(self, key)})")
        if self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads ({self.n_heads}) is not a multiple of n_kv_heads "
                            f"({self.n_kv_heads})")
        if self.head_dim % 2:
            problems.append(f"head_dim ({self.head_dim}) must be even for RoPE")
        if problems:
            raise ModelLoadError("invalid model config: " + "; ".join(problems))

    @property
    def q_per_kv(self) -> int:
        """Query heads sharing one KV head (grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    def n_params(self) -> int:
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * hd * (self.n_heads * 2 + self.n_kv_heads * 2)
        per_layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.n_layers * per_layer + d + head

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
