"""Grouped-query attention over the KV cache, split along the keys (flash-decoding).

attention_partial: block (token x head, partition) runs an online softmax over one partition of
the token's keys (causal, optionally a sliding window); each of its warps takes every
WARPS-th key, lanes split the head dimension, and the warps merge through shared memory. The
partition's (max, sum, unnormalised output) goes to a workspace.
attention_combine: merges a token-head's partitions into the output.
Splitting keeps all SMs busy for long contexts, where one block per head would use 28 of 132.
"""

import math

from numba import cuda, float32

from .common import WARP, warp_sum

from .geometry import ATTENTION_MAX_HEAD_DIM as MAX_DIM
from .geometry import ATTENTION_THREADS as THREADS

WARPS = THREADS // WARP
MAX_DIMS_PER_LANE = MAX_DIM // WARP  # head_dim <= 128, a multiple of 32


def attention_partial(q, k_cache, v_cache, positions, slots, window, partition, part_max,
                      part_sum, part_acc):
    """q [T, H * D] f32 (rotated); k_cache, v_cache [S, KVH, L, D] f16; positions, slots [T] i32;
    window: 0, or attend to keys > position - window; partition: keys per partition;
    part_max, part_sum [T * H, P] f32;
    part_acc [T * H, P, D] f32. Grid (T * H, P), block THREADS."""
    item = cuda.blockIdx.x
    part = cuda.blockIdx.y
    heads = part_max.shape[0] // q.shape[0]
    dim = k_cache.shape[3]
    t = item // heads
    h = item % heads
    kv = h // (heads // k_cache.shape[1])
    position = positions[t]
    slot = slots[t]
    start = max(0, position - window + 1) if window > 0 else 0
    lo = start + part * partition
    hi = min(position + 1, lo + partition)
    lane = cuda.threadIdx.x % WARP
    warp = cuda.threadIdx.x // WARP
    scale = float32(1.0) / math.sqrt(float32(dim))
    dims = dim // WARP
    q_reg = cuda.local.array(MAX_DIMS_PER_LANE, float32)
    acc = cuda.local.array(MAX_DIMS_PER_LANE, float32)
    for i in range(MAX_DIMS_PER_LANE):
        q_reg[i] = q[t, h * dim + lane + WARP * i] * scale if i < dims else float32(0.0)
        acc[i] = 0.0
    best = float32(-math.inf)
    total = float32(0.0)
    for j0 in range(lo, hi, WARPS):  # same trip count in every warp: warp_sum stays uniform
        j = j0 + warp
        dot = float32(0.0)
        if j < hi:
            for i in range(MAX_DIMS_PER_LANE):  # constant trip count: q_reg and acc stay in registers
                if i < dims:
                    dot += q_reg[i] * float32(k_cache[slot, kv, j, lane + WARP * i])
        score = warp_sum(dot)
        if j < hi:
            new_best = max(best, score)
            correction = math.exp(best - new_best)
            weight = math.exp(score - new_best)
            total = total * correction + weight
            for i in range(MAX_DIMS_PER_LANE):
                if i < dims:
                    acc[i] = acc[i] * correction + weight * float32(
                        v_cache[slot, kv, j, lane + WARP * i])
            best = new_best
    # merge the warps
    warp_best = cuda.shared.array(WARPS, float32)
    warp_total = cuda.shared.array(WARPS, float32)
    warp_acc = cuda.shared.array((WARPS, MAX_DIM), float32)
    if lane == 0:
        warp_best[warp] = best
        warp_total[warp] = total
    for i in range(MAX_DIMS_PER_LANE):
        if i < dims:
            warp_acc[warp, lane + WARP * i] = acc[i]
    cuda.syncthreads()
    merged = float32(-math.inf)
    for w in range(WARPS):
        merged = max(merged, warp_best[w])
    if cuda.threadIdx.x == 0:
        merged_total = float32(0.0)
        for w in range(WARPS):
            if warp_best[w] > -math.inf:
                merged_total += warp_total[w] * math.exp(warp_best[w] - merged)
        part_max[item, part] = merged
        part_sum[item, part] = merged_total
    for d in range(cuda.threadIdx.x, dim, THREADS):
        value = float32(0.0)
        for w in range(WARPS):
            if warp_best[w] > -math.inf:
                value += warp_acc[w, d] * math.exp(warp_best[w] - merged)
        part_acc[item, part, d] = value


def attention_combine(part_max, part_sum, part_acc, out):
    """Merge partitions: out [T, H * D] f32. Grid T * H, block THREADS."""
    item = cuda.blockIdx.x
    parts = part_max.shape[1]
    dim = part_acc.shape[2]
    heads = part_max.shape[0] // out.shape[0]
    t = item // heads
    h = item % heads
    best = float32(-math.inf)
    for p in range(parts):
        best = max(best, part_max[item, p])
    total = float32(0.0)
    for p in range(parts):
        if part_max[item, p] > -math.inf:
            total += part_sum[item, p] * math.exp(part_max[item, p] - best)
    for d in range(cuda.threadIdx.x, dim, cuda.blockDim.x):
        value = float32(0.0)
        for p in range(parts):
            if part_max[item, p] > -math.inf:
                value += part_acc[item, p, d] * math.exp(part_max[item, p] - best)
        out[t, h * dim + d] = value / total


KERNELS = {
    "attention_partial": (attention_partial,
                          "void(float32[:, ::1], float16[:, :, :, ::1], float16[:, :, :, ::1], "
                          "int32[::1], int32[::1], int32, int32, float32[:, ::1], float32[:, ::1], "
                          "float32[:, :, ::1])"),
    "attention_combine": (attention_combine, "void(float32[:, ::1], float32[:, ::1], "
                                             "float32[:, :, ::1], float32[:, ::1])"),
}
