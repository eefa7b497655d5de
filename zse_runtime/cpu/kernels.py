"""numba CPU kernels. Shapes are noted as [dims]; all activations are float32.

numba's CPU target has no float16, so fp16 data (the KV cache) is kept as raw uint16 bits and
widened through a 65536-entry lookup table (256 KiB, L2-resident).
"""

from __future__ import annotations

import math

import numba
import numpy as np

FP16_BITS_TO_FP32 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(
    np.float32)
ROWS_PER_TASK = 16  # rows one parallel task dequantizes into its private buffer


@numba.njit(parallel=True, fastmath=True, cache=True)
def int4_matmul(x, qweight, scales, zeros, group_size, out):
    """out[T, N] = x[T, K] @ dequant(qweight[N, K/8], scales[N, G], zeros[N, G]).T

    Each task dequantizes a few rows once and reuses them for every token: the decode path
    (T = 1..batch) reads each weight byte exactly once.
    """
    tokens, cols = x.shape
    rows = qweight.shape[0]
    groups = cols // group_size
    words_per_group = group_size // 8
    tasks = (rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in numba.prange(tasks):
        row_values = np.empty(cols, np.float32)
        for n in range(task * ROWS_PER_TASK, min(rows, (task + 1) * ROWS_PER_TASK)):
            for g in range(groups):
                scale = scales[n, g]
                zero = zeros[n, g]
                for w in range(words_per_group):
                    word = qweight[n, g * words_per_group + w]
                    base = g * group_size + w * 8
                    for j in range(8):
                        row_values[base + j] = (np.float32((word >> (4 * j)) & 15) - zero) * scale
            for t in range(tokens):
                acc = np.float32(0.0)
                for k in range(cols):
                    acc += x[t, k] * row_values[k]
                out[t, n] = acc


@numba.njit(parallel=True, fastmath=True, cache=True)
def int4_dequantize_rows(qweight, scales, zeros, group_size, out):
    """out[R, K] = dequant(qweight[R, K/8], ...): feeds BLAS for many-token (prefill) matmuls."""
    rows = qweight.shape[0]
    cols = out.shape[1]
    for n in numba.prange(rows):
        for k8 in range(cols // 8):
            word = qweight[n, k8]
            g = (k8 * 8) // group_size
            scale = scales[n, g]
            zero = zeros[n, g]
            for j in range(8):
                out[n, k8 * 8 + j] = (np.float32((word >> (4 * j)) & 15) - zero) * scale


@numba.njit(parallel=True, fastmath=True, cache=True)
def attention(q, k_cache, v_cache, positions, slots, window, fp16_lut, out):
    """Grouped-query attention of each query token over its own slot's cache, causal.

    q [T, H, D] float32 (rotated); k_cache, v_cache [S, KVH, L, D] uint16 fp16 bits, already
    holding this step's keys and values; positions, slots [T] int; window: 0 for full attention,
    else keys at positions > p - window only (Mistral's sliding window). out [T, H, D].
    """
    tokens, heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    ratio = heads // kv_heads
    scale = np.float32(1.0 / math.sqrt(dim))
    for item in numba.prange(tokens * heads):
        t = item // heads
        h = item % heads
        kv = h // ratio
        slot = slots[t]
        position = positions[t]
        start = max(0, position - window + 1) if window > 0 else 0
        count = position - start + 1
        scores = np.empty(count, np.float32)
        best = -np.inf
        for j in range(count):
            dot = np.float32(0.0)
            for d in range(dim):
                dot += q[t, h, d] * fp16_lut[k_cache[slot, kv, start + j, d]]
            scores[j] = dot * scale
            best = max(best, scores[j])
        total = np.float32(0.0)
        for j in range(count):
            scores[j] = math.exp(scores[j] - best)
            total += scores[j]
        for d in range(dim):
            out[t, h, d] = 0.0
        for j in range(count):
            weight = scores[j] / total
            for d in range(dim):
                out[t, h, d] += weight * fp16_lut[v_cache[slot, kv, start + j, d]]
