"""INT4 GEMV for decode: out[t, n] = x[t] . dequant(row n) (+ bias[n]) for a few tokens t.

The activations arrive as integer digits (quantize_activations.py: x ~= step * (254 hi + lo)
per block of 32 inputs), so the inner product of a weight word's eight 4-bit codes with the
inputs is four dp4a instructions (even and odd nibbles, times the hi and lo digits) instead of
eight nibble-to-float conversions and eight FMAs. Per block of 32 inputs and row:
    sum_k (q_k - z) s x_k = s * (step * (254 * hi_dot + lo_dot) - z * xsum).
A block owns a few rows; a lane takes a block of 32 inputs at a time (16 bytes of each row, one
vector load), the block's warps interleave along K, and the partial dots meet in shared memory.
The history (float unpacking with the exponent trick, a warp per row, ...) is in
docs/kernel-notes.md.
"""

from numba import cuda, float32, int32, uint32

from .common import WARP, store_gemv_tile
from .geometry import GEMV_ROWS, GEMV_TALL_ROWS, GEMV_TOKEN_TILES
from .memory import dot4_u8s8, load, load_u32x4, load_u32x4_streaming

NIBBLES = uint32(0x0F0F0F0F)
LO_RADIX = int32(254)  # quantize_activations.LO_RADIX


@cuda.jit(device=True, inline="always")
def _group_shift(group_size):
    """log2(blocks of 32 per group) for group sizes 32, 64, 128."""
    return int32(0) if group_size == 32 else (int32(1) if group_size == 64 else int32(2))


def _make_int4_gemv(tokens, block_rows=GEMV_ROWS):
    def int4_gemv(xq, xstep, xsum, qweight, scales, zeros, group_size, bias, has_bias, out):
        """out[t, n] = x[t] . dequant(row n) (+ bias[n]) for the token tile of blockIdx.y.

        xq [T, K/2] u32, xstep, xsum [T, K/32] f32 (quantize_activations.py); qweight [N, K/8]
        u32; scales, zeros [N, K/group] f16; bias [N] f32 (read only when has_bias); out [T, N]
        f32. Grid (ceil(N / block_rows), ceil(T / tokens)), block a multiple of 32 (<= 32
        warps). Each weight word is unpacked once and used for every token of the tile; per token
        the arithmetic does not depend on the tile size, so a batched decode equals solo decodes
        bit for bit.
        """
        lane = cuda.threadIdx.x % WARP
        warp = cuda.threadIdx.x // WARP
        warps = cuda.blockDim.x // WARP
        rows = qweight.shape[0]
        blocks = qweight.shape[1] // 4
        last_token = xq.shape[0] - 1
        n0 = cuda.blockIdx.x * block_rows
        t0 = cuda.blockIdx.y * tokens
        group_shift = _group_shift(group_size)
        acc = cuda.local.array((tokens, block_rows), float32)
        even = cuda.local.array((block_rows, 4), uint32)  # nibbles 0, 2, 4, 6 of each word
        odd = cuda.local.array((block_rows, 4), uint32)  # nibbles 1, 3, 5, 7
        scale = cuda.local.array(block_rows, float32)
        zero = cuda.local.array(block_rows, float32)
        hi_dot = cuda.local.array(block_rows, int32)
        lo_dot = cuda.local.array(block_rows, int32)
        for t in range(tokens):
            for r in range(block_rows):
                acc[t, r] = float32(0.0)
        for b in range(warp * WARP + lane, blocks, warps * WARP):
            g = b >> group_shift
            for r in range(block_rows):
                n = min(n0 + r, rows - 1)  # past the last row: compute, never store
                w0, w1, w2, w3 = load_u32x4_streaming(qweight, n, 4 * b)
                even[r, 0] = w0 & NIBBLES
                even[r, 1] = w1 & NIBBLES
                even[r, 2] = w2 & NIBBLES
                even[r, 3] = w3 & NIBBLES
                odd[r, 0] = (w0 >> uint32(4)) & NIBBLES
                odd[r, 1] = (w1 >> uint32(4)) & NIBBLES
                odd[r, 2] = (w2 >> uint32(4)) & NIBBLES
                odd[r, 3] = (w3 >> uint32(4)) & NIBBLES
                scale[r] = float32(load(scales, n, g))
                zero[r] = float32(load(zeros, n, g))
            for t in range(tokens):
                row = min(t0 + t, last_token)
                for r in range(block_rows):
                    hi_dot[r] = int32(0)
                    lo_dot[r] = int32(0)
                for word in range(4):
                    hi_even, hi_odd, lo_even, lo_odd = load_u32x4(xq, row, 16 * b + 4 * word)
                    for r in range(block_rows):
                        hi_dot[r] = dot4_u8s8(odd[r, word], hi_odd,
                                              dot4_u8s8(even[r, word], hi_even, hi_dot[r]))
                        lo_dot[r] = dot4_u8s8(odd[r, word], lo_odd,
                                              dot4_u8s8(even[r, word], lo_even, lo_dot[r]))
                step = load(xstep, row, b)
                block_sum = load(xsum, row, b)
                for r in range(block_rows):
                    digits = float32(hi_dot[r] * LO_RADIX + lo_dot[r])
                    acc[t, r] += scale[r] * (step * digits - zero[r] * block_sum)
        partial = cuda.shared.array((tokens, block_rows, WARP), float32)
        store_gemv_tile(acc, partial, n0, t0, rows, last_token, bias, has_bias, out)

    return int4_gemv


_SIGNATURE = ("void(uint32[:, ::1], float32[:, ::1], float32[:, ::1], uint32[:, ::1], "
              "float16[:, ::1], float16[:, ::1], int32, float32[::1], int32, float32[:, ::1])")
KERNELS = {}
for _tokens in GEMV_TOKEN_TILES:
    KERNELS[f"int4_gemv_t{_tokens}_r{GEMV_ROWS}"] = (_make_int4_gemv(_tokens), _SIGNATURE)
# tall matrices (gate_up, an INT4 lm_head) at batch 1: 8 rows per block, half the blocks
KERNELS[f"int4_gemv_t1_r{GEMV_TALL_ROWS}"] = (_make_int4_gemv(1, GEMV_TALL_ROWS), _SIGNATURE)
