"""One decoder for llama, mistral and qwen2, written once over a backend's ops.

A forward pass takes a flat batch of tokens, each tagged with its KV-cache slot and position, so
one mechanism covers prefill (many tokens of one slot), batched decode (one token of many
slots) and a mix of both. Each token attends to its own slot's cache up to its own position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .config import ModelConfig
from .zsefile import EMBED, FINAL_NORM, LM_HEAD, layer_tensor_name


@dataclass
class Batch:
    tokens: np.ndarray  # [T] int32 token ids
    positions: np.ndarray  # [T] int32 position of each token in its sequence
    slots: np.ndarray  # [T] int32 KV-cache slot of each token's sequence
    logit_rows: np.ndarray  # [B] int32 which of the T tokens need logits (usually each last one)

    @classmethod
    def of(cls, tokens, positions, slots, logit_rows) -> "Batch":
        as32 = lambda a: np.ascontiguousarray(a, dtype=np.int32)
        return cls(as32(tokens), as32(positions), as32(slots), as32(logit_rows))


class Ops(Protocol):
    """What a backend provides. Activations are [T, features]; names are canonical tensors."""

    def bind_thread(self) -> None: ...  # let the calling thread drive the device
    def prepare(self, batch: Batch) -> None: ...  # stage the batch's metadata (GPU: upload)
    def embed(self, tokens: np.ndarray): ...
    def add_rmsnorm(self, delta, residual, norm: str) -> tuple: ...  # (normed, new residual)
    def linear(self, x, weight: str, bias: str | None = None): ...
    def rope_and_cache(self, qkv, batch: Batch, layer: int): ...  # -> rotated q; stores k and v
    def attention(self, q, batch: Batch, layer: int): ...
    def silu_mul(self, gate_up): ...
    def logits(self, x, rows: np.ndarray): ...


class Decoder:
    def __init__(self, config: ModelConfig, ops: Ops):
        self.config = config
        self.ops = ops

    def forward(self, batch: Batch):
        """Logits [len(batch.logit_rows), vocab] for the requested tokens; the KV cache is updated."""
        self.ops.prepare(batch)
        return self.forward_prepared(batch)

    def forward_prepared(self, batch: Batch):
        ops, config = self.ops, self.config
        hidden = ops.embed(batch.tokens)
        residual = None
        for layer in range(config.num_hidden_layers):
            name = lambda part: layer_tensor_name(layer, part)
            x, residual = ops.add_rmsnorm(hidden, residual, name("attn_norm"))
            qkv = ops.linear(x, name("qkv"), name("qkv_bias") if config.qkv_bias else None)
            q = ops.rope_and_cache(qkv, batch, layer)
            attended = ops.attention(q, batch, layer)
            hidden = ops.linear(attended, name("o_proj"), name("o_bias") if config.o_bias else None)
            x, residual = ops.add_rmsnorm(hidden, residual, name("mlp_norm"))
            hidden = ops.linear(ops.silu_mul(ops.linear(x, name("gate_up"))), name("down_proj"))
        x, _ = ops.add_rmsnorm(hidden, residual, FINAL_NORM)
        return ops.logits(x, batch.logit_rows)


__all__ = ["Batch", "Decoder", "Ops", "EMBED", "LM_HEAD"]
