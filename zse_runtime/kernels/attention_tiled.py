"""Causal attention for a prompt chunk of one sequence on tensor cores (flash-attention style).

attention_partial (attention.py) gives every (token, head) its own block, which reads all of the
token's keys and values: a 2048-token prompt reads each key row ~1000 times per head. Here a block
takes 64 consecutive tokens of one head and walks their keys in tiles of 64: the block stages a
key tile and a value tile in shared memory, and each of its 4 warps computes its 16 tokens'
scores S = Q K^T and output O += P V with `mma.sync.m16n8k8` (fp16 inputs, fp32 accumulators),
keeping an online softmax per row, as flash-attention 2 does:
  - Q (scaled by 1/sqrt(D)) and P are rounded to float16, K and V come from the float16 cache;
    every sum is in float32;
  - S's accumulator fragment (row g: keys 2p, 2p + 1; row g + 8: the same) is, once rounded, the
    A fragment of P V for those 8 keys, so P never leaves registers;
  - the value tile is stored transposed as pairs of keys, so a lane's B fragment of P V
    (keys 2p, 2p + 1 of one dimension) is one 32-bit word in shared memory. Row strides of 68
    and 36 words put the 32 lanes' fragment reads on 32 different banks.
All tokens of a launch share one KV-cache slot (the backend sends only such chunks here).
Positions are read per token: any order, a causal mask and an optional sliding window per row.
"""

import math

from numba import cuda, float32, uint32

from .common import WARP, first_key, quad_max, quad_sum, warp_max
from .geometry import ATTENTION_MAX_HEAD_DIM as MAX_DIM
from .geometry import ATTENTION_TILE_KEYS as TILE_KEYS
from .geometry import ATTENTION_TILE_TOKENS as TILE_TOKENS
from .geometry import ATTENTION_TILED_THREADS as THREADS
from .memory import floats_as_halves, load, load_u32x4, mma_m16n8k8

WARPS = THREADS // WARP
assert TILE_TOKENS == 16 * WARPS and TILE_TOKENS <= 2 * WARP and TILE_KEYS == 64
MAX_STEPS = MAX_DIM // 8  # k steps of Q K^T, and 8-dimension tiles of P V
KEY_TILES = TILE_KEYS // 8  # 8-key tiles of S, and k steps of P V
K_STRIDE = MAX_DIM // 2 + 4  # words per staged key row (68: rows 4 banks apart)
V_STRIDE = TILE_KEYS // 2 + 4  # words per staged value dimension (36: the same)
K_UNITS = TILE_KEYS * (MAX_DIM // 8) // THREADS  # 16-byte loads per thread per key tile
V_UNITS = (TILE_KEYS // 2) * (MAX_DIM // 8) // THREADS  # pairs of 16-byte value loads
NEG_INF = float32(-math.inf)


def attention_tiled(q, k_words, v_words, kv_heads, length, positions, slot, window, out):
    """q [T, H * D] f32 (rotated); k_words, v_words [S * KVH * L, D / 2] u32 (the float16 caches,
    as attention_partial reads them), kv_heads = KVH, length = L; positions [T] i32; slot: the
    chunk's KV-cache slot; window: 0, or attend to keys > position - window; out [T, H * D] f32.
    D a multiple of 8, at most MAX_DIM. Grid (ceil(T / TILE_TOKENS), H), block THREADS."""
    tokens = q.shape[0]
    words = k_words.shape[1]
    dim = 2 * words
    steps = dim // 8
    heads = q.shape[1] // dim
    h = cuda.blockIdx.y
    kv = h // (heads // kv_heads)
    tok0 = cuda.blockIdx.x * TILE_TOKENS
    lane = cuda.threadIdx.x % WARP
    warp = cuda.threadIdx.x // WARP
    g = lane // 4  # a fragment's row (tokens g and g + 8 of the warp's 16) or column
    p = lane % 4  # which pair of columns
    cache_row = (slot * kv_heads + kv) * length

    # The block's keys: from the earliest first key to the last position of its tokens. Every
    # warp reduces the same 64 tokens, so no barrier is needed.
    earliest = float32(math.inf)
    last_key = float32(-math.inf)
    for i in range(2):
        t = tok0 + lane + WARP * i
        if t < tokens and t < tok0 + TILE_TOKENS:
            position = positions[t]
            earliest = min(earliest, float32(first_key(position, window)))
            last_key = max(last_key, float32(position))
    lo = int(-warp_max(-earliest))
    hi = int(warp_max(last_key)) + 1

    # this lane's two rows
    row_a = tok0 + 16 * warp + g
    row_b = row_a + 8
    t_a = min(row_a, tokens - 1)
    t_b = min(row_b, tokens - 1)
    pos_a = positions[t_a]
    pos_b = positions[t_b]
    start_a = first_key(pos_a, window)
    start_b = first_key(pos_b, window)

    # Q's A fragments for every k step: rows g and g + 8, dimensions 8 s + 2 p and + 1
    scale = float32(1.0) / math.sqrt(float32(dim))
    q_frag = cuda.local.array((MAX_STEPS, 2), uint32)
    for s in range(MAX_STEPS):
        if s < steps:
            c = h * dim + 8 * s + 2 * p
            q_frag[s, 0] = floats_as_halves(q[t_a, c] * scale, q[t_a, c + 1] * scale)
            q_frag[s, 1] = floats_as_halves(q[t_b, c] * scale, q[t_b, c + 1] * scale)

    k_tile = cuda.shared.array((TILE_KEYS, K_STRIDE), uint32)
    v_tile = cuda.shared.array((MAX_DIM, V_STRIDE), uint32)  # [dimension, pair of keys]
    score = cuda.local.array((KEY_TILES, 4), float32)
    acc = cuda.local.array((MAX_STEPS, 4), float32)
    for d in range(MAX_STEPS):
        for e in range(4):
            acc[d, e] = float32(0.0)
    best_a = NEG_INF
    best_b = NEG_INF
    total_a = float32(0.0)  # this lane's share of the row sums; the quad adds them at the end
    total_b = float32(0.0)

    for tile in range(lo, hi, TILE_KEYS):
        cuda.syncthreads()  # the previous tile's fragments have been read
        # keys past hi - 1 are read clamped to it (in the cache) and masked below
        for r in range(K_UNITS):
            unit = cuda.threadIdx.x + THREADS * r
            key = unit // (MAX_DIM // 8)
            chunk = unit % (MAX_DIM // 8)
            if 4 * chunk < words:
                w0, w1, w2, w3 = load_u32x4(k_words, cache_row + min(tile + key, hi - 1), 4 * chunk)
                k_tile[key, 4 * chunk] = w0
                k_tile[key, 4 * chunk + 1] = w1
                k_tile[key, 4 * chunk + 2] = w2
                k_tile[key, 4 * chunk + 3] = w3
        for r in range(V_UNITS):
            unit = cuda.threadIdx.x + THREADS * r
            pair = unit % (TILE_KEYS // 2)  # keys 2 pair and 2 pair + 1
            chunk = unit // (TILE_KEYS // 2)  # dimensions 8 chunk .. 8 chunk + 7
            if 4 * chunk < words:
                a0, a1, a2, a3 = load_u32x4(v_words, cache_row + min(tile + 2 * pair, hi - 1),
                                            4 * chunk)
                b0, b1, b2, b3 = load_u32x4(v_words, cache_row + min(tile + 2 * pair + 1, hi - 1),
                                            4 * chunk)
                d = 8 * chunk
                v_tile[d, pair] = (a0 & uint32(0xFFFF)) | (b0 << uint32(16))
                v_tile[d + 1, pair] = (a0 >> uint32(16)) | (b0 & uint32(0xFFFF0000))
                v_tile[d + 2, pair] = (a1 & uint32(0xFFFF)) | (b1 << uint32(16))
                v_tile[d + 3, pair] = (a1 >> uint32(16)) | (b1 & uint32(0xFFFF0000))
                v_tile[d + 4, pair] = (a2 & uint32(0xFFFF)) | (b2 << uint32(16))
                v_tile[d + 5, pair] = (a2 >> uint32(16)) | (b2 & uint32(0xFFFF0000))
                v_tile[d + 6, pair] = (a3 & uint32(0xFFFF)) | (b3 << uint32(16))
                v_tile[d + 7, pair] = (a3 >> uint32(16)) | (b3 & uint32(0xFFFF0000))
        cuda.syncthreads()

        # S = Q K^T for 8 tiles of 8 keys (k steps outside: 8 fragments in flight, not 128)
        for j in range(KEY_TILES):
            for e in range(4):
                score[j, e] = float32(0.0)
        for s in range(MAX_STEPS):
            if s < steps:
                for j in range(KEY_TILES):
                    score[j, 0], score[j, 1], score[j, 2], score[j, 3] = mma_m16n8k8(
                        q_frag[s, 0], q_frag[s, 1], load(k_tile, 8 * j + g, 4 * s + p),
                        score[j, 0], score[j, 1], score[j, 2], score[j, 3])
        # the causal mask (and window), row by row
        new_a = best_a
        new_b = best_b
        for j in range(KEY_TILES):
            key = tile + 8 * j + 2 * p
            if not start_a <= key <= pos_a:
                score[j, 0] = NEG_INF
            if not start_a <= key + 1 <= pos_a:
                score[j, 1] = NEG_INF
            if not start_b <= key <= pos_b:
                score[j, 2] = NEG_INF
            if not start_b <= key + 1 <= pos_b:
                score[j, 3] = NEG_INF
            new_a = max(new_a, max(score[j, 0], score[j, 1]))
            new_b = max(new_b, max(score[j, 2], score[j, 3]))
        new_a = quad_max(new_a)
        new_b = quad_max(new_b)

        # the online softmax: rescale what was summed so far, then P = exp(S - max)
        fix_a = math.exp(best_a - new_a) if best_a > NEG_INF else float32(0.0)
        fix_b = math.exp(best_b - new_b) if best_b > NEG_INF else float32(0.0)
        total_a *= fix_a
        total_b *= fix_b
        for d in range(MAX_STEPS):
            acc[d, 0] *= fix_a
            acc[d, 1] *= fix_a
            acc[d, 2] *= fix_b
            acc[d, 3] *= fix_b
        best_a = new_a
        best_b = new_b
        for j in range(KEY_TILES):
            for e in range(4):
                best = best_a if e < 2 else best_b
                weight = math.exp(score[j, e] - best) if score[j, e] > NEG_INF else float32(0.0)
                score[j, e] = weight
            total_a += score[j, 0] + score[j, 1]
            total_b += score[j, 2] + score[j, 3]

        # O += P V: S's fragment for keys 8 j .. 8 j + 7 is P's A fragment for that k step
        for j in range(KEY_TILES):
            p_a = floats_as_halves(score[j, 0], score[j, 1])
            p_b = floats_as_halves(score[j, 2], score[j, 3])
            for d in range(MAX_STEPS):
                if d < steps:
                    acc[d, 0], acc[d, 1], acc[d, 2], acc[d, 3] = mma_m16n8k8(
                        p_a, p_b, load(v_tile, 8 * d + g, 4 * j + p),
                        acc[d, 0], acc[d, 1], acc[d, 2], acc[d, 3])

    total_a = quad_sum(total_a)
    total_b = quad_sum(total_b)
    for d in range(MAX_STEPS):
        if d < steps:
            c = h * dim + 8 * d + 2 * p
            if row_a < tokens:
                out[row_a, c] = acc[d, 0] / total_a
                out[row_a, c + 1] = acc[d, 1] / total_a
            if row_b < tokens:
                out[row_b, c] = acc[d, 2] / total_b
                out[row_b, c + 1] = acc[d, 3] / total_b


KERNELS = {
    "attention_tiled": (attention_tiled, "void(float32[:, ::1], uint32[:, ::1], uint32[:, ::1], "
                                         "int32, int32, int32[::1], int32, int32, "
                                         "float32[:, ::1])"),
}
