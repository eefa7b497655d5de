"""The canonical model config with the sizes every backend derives from it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    sliding_window: int | None
    source_dtype: str = "unknown"
    q_size: int = field(init=False)  # heads * head_dim
    kv_size: int = field(init=False)  # kv_heads * head_dim
    group_ratio: int = field(init=False)  # query heads per key/value head

    def __post_init__(self):
        object.__setattr__(self, "q_size", self.num_attention_heads * self.head_dim)
        object.__setattr__(self, "kv_size", self.num_key_value_heads * self.head_dim)
        object.__setattr__(self, "group_ratio",
                           self.num_attention_heads // self.num_key_value_heads)

    @classmethod
    def from_manifest(cls, model: dict[str, Any]) -> "ModelConfig":
        return cls(**model)

    def kv_cache_bytes(self, slots: int, max_len: int) -> int:
        """fp16 keys and values for every layer, slot and position."""
        return 2 * self.num_hidden_layers * slots * max_len * self.kv_size * 2


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies [head_dim / 2], float32, with linear or llama3 scaling applied.

    Computed as transformers does (float32 powers), so positions map to the same angles.
    """
    dim = config.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (1.0 / (np.float32(config.rope_theta) ** exponents)).astype(np.float32)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return (inv_freq / np.float32(scaling["factor"])).astype(np.float32)
    # llama3: long wavelengths are slowed by `factor`, short ones kept, a smooth ramp between.
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = original / low, original / high
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(config: ModelConfig, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [max_len, head_dim / 2] float32 for positions 0..max_len-1."""
    positions = np.arange(max_len, dtype=np.float32)
    angles = np.outer(positions, rope_inv_freq(config)).astype(np.float32)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
