"""CPU ops for the decoder: numba kernels for INT4 matmuls and attention, numpy for the rest.

Weights stay in the memory-mapped file (zero-copy), except the small fp16 scales and zeros,
which are widened to float32 once at load because numba's CPU target has no float16.
"""

from __future__ import annotations

import numpy as np

from ..config import ModelConfig, rope_tables
from ..model import Batch
from ..sampling import SamplingParams, sample
from ..zsefile import EMBED, LM_HEAD, Int4Weight, ZseFile
from . import kernels

# With this many tokens or more, dequantize row blocks and let BLAS multiply (prefill); below it
# the fused kernel reads each weight once. Above the largest decode batch, so a sequence's
# decode arithmetic is the same alone or batched with others.
BLAS_MIN_TOKENS = 64
BLAS_BLOCK_ROWS = 2048


class CpuInt4:
    __slots__ = ("qweight", "scales", "zeros", "group_size", "rows", "cols")

    def __init__(self, weight: Int4Weight):
        self.qweight = weight.qweight
        self.scales = weight.scales.astype(np.float32)
        self.zeros = weight.zeros.astype(np.float32)
        self.group_size = weight.group_size
        self.rows, self.cols = weight.shape


class CpuOps:
    """Implements model.Ops over a ZseFile with a KV cache of `slots` x `max_len` positions."""

    def __init__(self, zse: ZseFile, config: ModelConfig, slots: int, max_len: int):
        self.config = config
        self.weights: dict[str, object] = {}
        for name in zse.tensors:
            value = zse.weight(name)
            self.weights[name] = CpuInt4(value) if isinstance(value, Int4Weight) else value
        shape = (slots, config.num_key_value_heads, max_len, config.head_dim)
        # fp16 bit patterns; [layer] -> [slot, kv_head, position, head_dim]
        self.k_cache = [np.zeros(shape, np.uint16) for _ in range(config.num_hidden_layers)]
        self.v_cache = [np.zeros(shape, np.uint16) for _ in range(config.num_hidden_layers)]
        self.cos, self.sin = rope_tables(config, max_len)
        self.window = config.sliding_window or 0
        self._widened: dict[int, np.ndarray] = {}

    def _dense_f32(self, w: np.ndarray) -> np.ndarray:
        """float32 copy of an fp16 matrix (an fp16 lm_head), made once: BLAS wants float32."""
        key = id(w)
        if key not in self._widened:
            self._widened[key] = w.astype(np.float32)
        return self._widened[key]

    @property
    def kv_cache_bytes(self) -> int:
        return sum(c.nbytes for c in self.k_cache + self.v_cache)

    # -- ops --------------------------------------------------------------------------------

    def bind_thread(self) -> None:
        pass  # numba's CPU kernels run on any thread

    def prepare(self, batch: Batch) -> None:
        pass  # the batch's numpy arrays are used directly

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        table = self.weights[EMBED]
        if isinstance(table, CpuInt4):
            out = np.empty((tokens.size, table.cols), np.float32)
            kernels.int4_dequantize_rows(table.qweight[tokens], table.scales[tokens],
                                         table.zeros[tokens], table.group_size, out)
            return out
        return table[tokens].astype(np.float32)

    def add_rmsnorm(self, delta, residual, norm: str):
        residual = delta if residual is None else residual + delta
        variance = np.mean(residual * residual, axis=-1, keepdims=True, dtype=np.float32)
        normed = residual * (1.0 / np.sqrt(variance + np.float32(self.config.rms_norm_eps)))
        return (normed * self.weights[norm]).astype(np.float32), residual

    def linear(self, x: np.ndarray, weight: str, bias: str | None = None) -> np.ndarray:
        out = self._matmul(np.ascontiguousarray(x, np.float32), self.weights[weight])
        if bias is not None:
            out += self.weights[bias]
        return out

    def _matmul(self, x: np.ndarray, w) -> np.ndarray:
        if not isinstance(w, CpuInt4):
            return x @ self._dense_f32(w).T
        out = np.empty((x.shape[0], w.rows), np.float32)
        if x.shape[0] < BLAS_MIN_TOKENS:
            kernels.int4_matmul(x, w.qweight, w.scales, w.zeros, w.group_size, out)
            return out
        block = np.empty((min(BLAS_BLOCK_ROWS, w.rows), w.cols), np.float32)
        for start in range(0, w.rows, BLAS_BLOCK_ROWS):
            stop = min(w.rows, start + BLAS_BLOCK_ROWS)
            rows = block[:stop - start]
            kernels.int4_dequantize_rows(w.qweight[start:stop], w.scales[start:stop],
                                         w.zeros[start:stop], w.group_size, rows)
            np.matmul(x, rows.T, out=out[:, start:stop])
        return out

    def _rotate(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Rotate-half RoPE (transformers' convention) on x [T, heads, head_dim]."""
        half = x.shape[-1] // 2
        cos = self.cos[positions][:, None, :]
        sin = self.sin[positions][:, None, :]
        first, second = x[..., :half], x[..., half:]
        return np.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)

    def rope_and_cache(self, qkv: np.ndarray, batch: Batch, layer: int) -> np.ndarray:
        c = self.config
        tokens = qkv.shape[0]
        q = qkv[:, :c.q_size].reshape(tokens, c.num_attention_heads, c.head_dim)
        k = qkv[:, c.q_size:c.q_size + c.kv_size].reshape(tokens, c.num_key_value_heads, c.head_dim)
        v = qkv[:, c.q_size + c.kv_size:].reshape(tokens, c.num_key_value_heads, c.head_dim)
        heads = np.arange(c.num_key_value_heads)[None, :]
        where = (batch.slots[:, None], heads, batch.positions[:, None])
        self.k_cache[layer][where] = self._rotate(k, batch.positions).astype(np.float16).view(
            np.uint16)
        self.v_cache[layer][where] = v.astype(np.float16).view(np.uint16)
        return np.ascontiguousarray(self._rotate(q, batch.positions), np.float32)

    def attention(self, q: np.ndarray, batch: Batch, layer: int) -> np.ndarray:
        out = np.empty_like(q)
        kernels.attention(q, self.k_cache[layer], self.v_cache[layer], batch.positions,
                          batch.slots, self.window, kernels.FP16_BITS_TO_FP32, out)
        return out.reshape(q.shape[0], -1)

    def silu_mul(self, gate_up: np.ndarray) -> np.ndarray:
        gate, up = np.split(gate_up, 2, axis=-1)
        return (gate / (1.0 + np.exp(-gate)) * up).astype(np.float32)

    def logits(self, x: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return self._matmul(np.ascontiguousarray(x[rows]), self.weights[LM_HEAD])

    def sample(self, logits: np.ndarray, params: list[SamplingParams], steps) -> np.ndarray:
        return np.array([sample(row, p, s) for row, p, s in zip(logits, params, steps)], np.int32)

    def to_host(self, array: np.ndarray) -> np.ndarray:
        return array
