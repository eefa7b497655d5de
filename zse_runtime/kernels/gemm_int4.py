"""INT4 GEMM for prefill on tensor cores: out[T, N] = x[T, K] @ dequant(W[N, K]).T (+ bias).

The products go through `mma.sync.m16n8k8` (fp16 inputs, fp32 accumulators; sm_75+):
  - weights enter as their 4-bit codes q, which float16 holds exactly; the scale and zero point
    are applied per quantization group in float32: sum_k (q - z) s x = s (sum_k q x - z sum_k x);
  - activations enter as float16, x * 2^e rounded (11 significant bits, as fp16 inference
    engines compute; llama.cpp's integer GEMMs use 8), with 2^e chosen per token and group so
    that the group's largest value lands in [2^14, 2^15): nothing overflows, and values down to
    2^-24 of it keep all their bits (split_activations below). sum_k x is summed over the
    rounded values too, so the result is exactly dequant(W) x' for the rounded x' and each
    rounding error weighs by q - z (|q - z| <= 8), not by q (up to 15): on a random 4-layer
    qwen2, summing x itself gave 2.7x the logit error (CPU emulation, docs/kernel-notes.md).
    The decode GEMVs keep ~15 bits (quantize_activations.py). Two float16 terms per value
    (hi + lo) kept float32 accuracy, at 15-24% more time (H200, docs/kernel-notes.md).

Layout. K runs in chunks of 8 (one weight word). Within a chunk the products pair k = j with
k = j + 4 (j < 4): a weight word's nibbles j and j + 4 then form one fp16x2 register with two
bit operations, and split_activations writes x's pairs in the same order. A lane's pairs for 4
consecutive chunks are adjacent (pair j of chunk c at 16 (c // 4) + 4 j + c % 4), so a lane
reads 4 chunks of activations, like 4 weight words, with one 16-byte load. A warp computes 32
rows x 32 tokens as 2 x 4 tiles of 16 x 8, reading its fragments straight from global memory
(through L1); a block of 4 warps covers 64 rows x 64 tokens.
"""

from numba import cuda, float32, uint32

from .common import warp_max, warp_sum
from .geometry import GEMM_DECODE_TILE_N, GEMM_DECODE_TILE_T, GEMM_TILE_N, GEMM_TILE_T, WARP
from .memory import (bits_as_float, codes_as_halves, float_bits, floats_as_halves,
                     halves_as_floats, load, load_u32x4, mma_m16n8k8)
from .mma_tile import A_REGISTERS, M_TILES, N_TILES, make_warp_tile, store_tile

SCALE_BITS = 141  # x 2^(141 - exponent of max|x|): max|x| lands in [2^14, 2^15), below fp16's 2^16


def split_activations(x, group_size, halves, xsum, unscale):
    """x [T, K] f32 -> halves [T, K/2] u32 (fp16 pairs in the GEMM's order), xsum [T, K/group]
    f32 (sum of the group's x as rounded), unscale [T, K/group] f32 (2^-e, the inverse of the group's
    factor). A warp per (token, group): a lane per pair of the group's values (group_size / 64
    pairs per lane), the group's max and sum by shuffles. 1-D grid of warps over T * K/group;
    a multiple of 32 threads per block."""
    groups = xsum.shape[1]
    lane = cuda.threadIdx.x % WARP
    item = (cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x) // WARP
    active = item < x.shape[0] * groups  # whole warps; inactive ones still join the shuffles
    t = item // groups if active else 0
    group = item % groups
    pairs = group_size // 2  # pair p of a group: chunk p // 4, values j = p % 4 and j + 4
    largest = float32(0.0)
    for p in range(lane, pairs, WARP):
        if active:
            k = group * group_size + 8 * (p // 4) + p % 4
            largest = max(largest, max(abs(x[t, k]), abs(x[t, k + 4])))
    largest = warp_max(largest)
    factor = float32(1.0)
    inverse = float32(1.0)
    if largest > float32(0.0):  # 2^(SCALE_BITS - exponent) and its inverse, from bit patterns
        biased = min(max(SCALE_BITS + 127 - int(float_bits(largest) >> uint32(23)), 1), 253)
        factor = bits_as_float(uint32(biased) << uint32(23))
        inverse = bits_as_float(uint32(254 - biased) << uint32(23))
    total = float32(0.0)  # of the scaled, rounded values: exact products of 2^e
    for p in range(lane, pairs, WARP):
        if active:
            chunk = group * group_size // 8 + p // 4
            j = p % 4
            pair = floats_as_halves(x[t, 8 * chunk + j] * factor, x[t, 8 * chunk + j + 4] * factor)
            halves[t, 16 * (chunk // 4) + 4 * j + chunk % 4] = pair
            a, b = halves_as_floats(pair)
            total += a + b
    total = warp_sum(total)
    if active and lane == 0:
        xsum[t, group] = total * inverse
        unscale[t, group] = inverse


def _make_int4_gemm(tile_rows, tile_tokens):
    """int4_gemm for blocks of tile_rows x tile_tokens."""
    warp_tile = make_warp_tile(tile_rows, tile_tokens)

    def int4_gemm(halves, xsum, unscale, qweight, scales, zeros, group_size, bias, has_bias, out):
        """out [S * T, N] f32 from split_activations' halves, xsum, unscale [T, ...] and qweight
        [N, K/8] u32, scales, zeros [N, K/group] f16, bias [N] f32 (read only when has_bias).
        Grid (ceil(N / tile_rows), ceil(T / tile_tokens), S), block mma_tile.THREADS. With S = 1,
        out is the product; with S > 1 (split-K, for grids too small to fill the GPU), block z
        sums the z-th run of quantization groups into rows z T .. z T + T - 1 (the bias in run
        0), and sum_splits adds the runs."""
        pair = cuda.threadIdx.x % 4  # which k pair of the chunk; D's token columns 2 pair, + 1
        rows = qweight.shape[0]
        tokens = halves.shape[0]
        a_rows = cuda.local.array(A_REGISTERS, uint32)
        b_tokens = cuda.local.array(N_TILES, uint32)
        row0, tok0 = warp_tile(rows, tokens, a_rows, b_tokens)
        words_per_group = group_size // 8
        groups = qweight.shape[1] // words_per_group
        per_split = (groups + cuda.gridDim.z - 1) // cuda.gridDim.z
        first_group = cuda.blockIdx.z * per_split
        partial = cuda.local.array((M_TILES, N_TILES, 4), float32)  # this group's sum q x 2^e
        acc = cuda.local.array((M_TILES, N_TILES, 4), float32)
        a_words = cuda.local.array((A_REGISTERS, 4), uint32)  # 4 chunks of each fragment row
        x_words = cuda.local.array((N_TILES, 4), uint32)
        a = cuda.local.array(A_REGISTERS, uint32)
        for i in range(M_TILES):
            for j in range(N_TILES):
                for e in range(4):
                    partial[i, j, e] = float32(0.0)
                    acc[i, j, e] = float32(0.0)
        for g in range(first_group, min(groups, first_group + per_split)):
            for quad in range(g * words_per_group // 4, (g + 1) * words_per_group // 4):
                for i in range(A_REGISTERS):
                    (a_words[i, 0], a_words[i, 1], a_words[i, 2],
                     a_words[i, 3]) = load_u32x4(qweight, a_rows[i], 4 * quad)
                for j in range(N_TILES):
                    (x_words[j, 0], x_words[j, 1], x_words[j, 2],
                     x_words[j, 3]) = load_u32x4(halves, b_tokens[j], 16 * quad + 4 * pair)
                for chunk in range(4):
                    for i in range(A_REGISTERS):
                        a[i] = codes_as_halves(a_words[i, chunk], pair)
                    for i in range(M_TILES):
                        for j in range(N_TILES):
                            (partial[i, j, 0], partial[i, j, 1], partial[i, j, 2],
                             partial[i, j, 3]) = mma_m16n8k8(a[2 * i], a[2 * i + 1], x_words[j, chunk],
                                                             partial[i, j, 0], partial[i, j, 1],
                                                             partial[i, j, 2], partial[i, j, 3])
            # the group ends: apply its scales and zero points in float32
            for i in range(M_TILES):
                for half in range(2):
                    n = a_rows[2 * i + half]
                    s = float32(load(scales, n, g))
                    z = float32(load(zeros, n, g))
                    for j in range(N_TILES):
                        for c in range(2):
                            t = min(tok0 + 8 * j + 2 * pair + c, tokens - 1)
                            e = 2 * half + c
                            acc[i, j, e] += s * (partial[i, j, e] * load(unscale, t, g)
                                                 - z * load(xsum, t, g))
                            partial[i, j, e] = float32(0.0)
        store_tile(acc, row0, tok0, rows, tokens, bias, has_bias != 0 and cuda.blockIdx.z == 0, out,
                   cuda.blockIdx.z * tokens)

    return int4_gemm


def sum_splits(partials, splits, out):
    """out [T, N] f32 = the sum over z < splits of partials [splits * T, N] rows z T + t, in order
    of z (deterministic). Grid (T, ceil(N / block)), a thread per value."""
    t = cuda.blockIdx.x
    n = cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x
    tokens = out.shape[0]
    if n < out.shape[1]:
        total = partials[t, n]
        for z in range(1, splits):
            total += partials[z * tokens + t, n]
        out[t, n] = total


_GEMM_SIGNATURE = ("void(uint32[:, ::1], float32[:, ::1], float32[:, ::1], uint32[:, ::1], "
                   "float16[:, ::1], float16[:, ::1], int32, float32[::1], int32, float32[:, ::1])")

KERNELS = {
    "split_activations": (split_activations, "void(float32[:, ::1], int32, uint32[:, ::1], "
                                             "float32[:, ::1], float32[:, ::1])"),
    "int4_gemm": (_make_int4_gemm(GEMM_TILE_N, GEMM_TILE_T), _GEMM_SIGNATURE),
    "int4_gemm_t32": (_make_int4_gemm(GEMM_DECODE_TILE_N, GEMM_DECODE_TILE_T), _GEMM_SIGNATURE),
    "sum_splits": (sum_splits, "void(float32[:, ::1], int32, float32[:, ::1])"),
}
