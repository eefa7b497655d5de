"""INT4 GEMV for decode: out[t, n] = x[t] . dequant(row n) (+ bias[n]) for a few tokens t.

A block owns a few rows; its warps take interleaved 32-word slices of K, so the block reads
consecutive 128-byte lines of each row, and the partial dots meet in shared memory. A lane loads
one weight word per row, its 8 activations with two 16-byte loads (shared by the block's rows),
and folds the zero point per word: sum_j (q_j - z) s x_j = s (sum_j q_j x_j - z sum_j x_j).
Nibbles become floats by the exponent trick below, not by integer-to-float conversions.
The history (a warp per row, a warp per 4 rows, measured side by side) is in
docs/kernel-notes.md.
"""

from numba import cuda, float32, int32, uint32

from .common import WARP, store_gemv_tile
from .geometry import GEMV_ROWS, GEMV_TALL_ROWS, GEMV_TOKEN_TILES
from .memory import bits_as_float, load, load_f32x4, load_u32_streaming


@cuda.jit(device=True, inline="always")
def _group_shift(group_size):
    """log2(words per group) for group sizes 32, 64, 128: a shift instead of a 64-bit division
    per word."""
    return int32(2) if group_size == 32 else (int32(3) if group_size == 64 else int32(4))


# Nibble j of a word sits at bit 4j. OR-ing it into the mantissa of 2**(23 - 4j) makes the float
# 2**(23 - 4j) + q exactly, so one LOP3 and one FADD replace a shift, a mask and a (slow, 16 per
# clock per SM) integer-to-float conversion. Nibbles 4-7 use the same constants on word >> 16.
_MAGIC_BITS = (0x4B000000, 0x49000000, 0x47000000, 0x45000000)  # 2**23, 2**19, 2**15, 2**11
_MAGIC = (8388608.0, 524288.0, 32768.0, 2048.0)


@cuda.jit(device=True, inline="always")
def _codes_as_floats(word, codes, r):
    """codes[r, j] = nibble j of word, as float32."""
    high = word >> 16
    for j in range(4):
        mask = uint32(0xF << (4 * j))
        codes[r, j] = bits_as_float((word & mask) | uint32(_MAGIC_BITS[j])) - float32(_MAGIC[j])
        codes[r, j + 4] = bits_as_float((high & mask) | uint32(_MAGIC_BITS[j])) - float32(_MAGIC[j])


def _make_int4_gemv(tokens, block_rows=GEMV_ROWS):
    def int4_gemv(x, qweight, scales, zeros, group_size, bias, has_bias, out):
        """out[t, n] = x[t] . dequant(row n) (+ bias[n]) for the token tile of blockIdx.y.

        x [T, K] f32; qweight [N, K/8] u32; scales, zeros [N, K/group] f16; bias [N] f32 (read
        only when has_bias); out [T, N] f32. Grid (ceil(N / block_rows), ceil(T / tokens)), block
        a multiple of 32 (<= 32 warps). A block owns block_rows rows; its warps take interleaved
        32-word slices of K, so a block reads consecutive 128-byte lines of each row; each weight
        word is unpacked once and used for every token of the tile; per token the arithmetic
        does not depend on the tile size, so a batched decode equals solo decodes bit for bit.
        """
        lane = cuda.threadIdx.x % WARP
        warp = cuda.threadIdx.x // WARP
        warps = cuda.blockDim.x // WARP
        rows = qweight.shape[0]
        words = qweight.shape[1]
        last_token = x.shape[0] - 1
        n0 = cuda.blockIdx.x * block_rows
        t0 = cuda.blockIdx.y * tokens
        group_shift = _group_shift(group_size)
        acc = cuda.local.array((tokens, block_rows), float32)
        codes = cuda.local.array((block_rows, 8), float32)
        scale = cuda.local.array(block_rows, float32)
        zero = cuda.local.array(block_rows, float32)
        for t in range(tokens):
            for r in range(block_rows):
                acc[t, r] = float32(0.0)
        for w in range(warp * WARP + lane, words, warps * WARP):
            g = w >> group_shift
            for r in range(block_rows):
                n = min(n0 + r, rows - 1)  # past the last row: compute, never store
                _codes_as_floats(load_u32_streaming(qweight, n, w), codes, r)
                scale[r] = float32(load(scales, n, g))
                zero[r] = float32(load(zeros, n, g))
            for t in range(tokens):
                row = min(t0 + t, last_token)
                x0, x1, x2, x3 = load_f32x4(x, row, w * 8)
                x4, x5, x6, x7 = load_f32x4(x, row, w * 8 + 4)
                x_sum = ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))
                for r in range(block_rows):
                    dot = (((codes[r, 0] * x0 + codes[r, 1] * x1) + (codes[r, 2] * x2 + codes[r, 3] * x3))
                           + ((codes[r, 4] * x4 + codes[r, 5] * x5) + (codes[r, 6] * x6 + codes[r, 7] * x7)))
                    acc[t, r] += scale[r] * (dot - zero[r] * x_sum)
        partial = cuda.shared.array((tokens, block_rows, WARP), float32)
        store_gemv_tile(acc, partial, n0, t0, rows, last_token, bias, has_bias, out)

    return int4_gemv


_SIGNATURE = ("void(float32[:, ::1], uint32[:, ::1], float16[:, ::1], float16[:, ::1], int32, "
              "float32[::1], int32, float32[:, ::1])")
KERNELS = {}
for _tokens in GEMV_TOKEN_TILES:
    KERNELS[f"int4_gemv_t{_tokens}_r{GEMV_ROWS}"] = (_make_int4_gemv(_tokens), _SIGNATURE)
# tall matrices (gate_up, an INT4 lm_head) at batch 1: 8 rows per block, half the blocks
KERNELS[f"int4_gemv_t1_r{GEMV_TALL_ROWS}"] = (_make_int4_gemv(1, GEMV_TALL_ROWS), _SIGNATURE)
