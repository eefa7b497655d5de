"""INT4 GEMV for decode: out[t, n] = x[t] . dequant(row n) (+ bias[n]) for a few tokens t.

The activations arrive as integer digits (quantize_activations.py: x ~= step * (254 hi + lo)
per block of 32 inputs), so the inner product of a weight word's eight 4-bit codes with the
inputs is four dp4a instructions (even and odd nibbles, times the hi and lo digits) instead of
eight nibble-to-float conversions and eight FMAs. Per block of 32 inputs and row:
    sum_k (q_k - z) s x_k = s * (step * (254 * hi_dot + lo_dot) - z * xsum).
A block owns a few rows; a lane takes a block of 32 inputs at a time (16 bytes of each row, one
vector load), the block's warps interleave along K, and the partial dots meet in shared memory.
Launched as a dependent on sm_90 (grid_dependency.py), a one-token tile loads a lane's first
block of weights before it waits for the kernel that writes x, and every next block's at the end
of the current one; every tile lets the next kernel launch once its K loop is done.
The history (float unpacking with the exponent trick, a warp per row, ...) is in
docs/kernel-notes.md.
"""

from numba import cuda, float32, int32, uint32

from .common import WARP, store_gemv_tile
from .geometry import (
    GEMV_ROWS,
    GEMV_T1_MAX_REGISTERS,
    GEMV_TALL_MAX_REGISTERS,
    GEMV_TALL_ROWS,
    GEMV_TOKEN_TILES,
)
from .grid_dependency import launch_dependents, wait_for_prerequisite_grids
from .memory import dot4_u8s8, load_at, load_u32x4_at, load_u32x4_streaming_at, mulhi_u32

NIBBLES = uint32(0x0F0F0F0F)
LO_RADIX = int32(254)  # quantize_activations.LO_RADIX


@cuda.jit(device=True, inline="always")
def _load_block_weights(qweight, scales, zeros, row_word, row_group, b, group_reciprocal,
                        words, scale, zero):
    """Every row's 32 codes of input block b (16 bytes), scale and zero, into the lane's
    registers. All rows' loads come before any use: ptxas keeps most of them in flight
    together when MAX_REGISTERS allows it the registers (the kernel is latency-bound)."""
    word0 = uint32(uint32(b) * uint32(4))
    g = mulhi_u32(word0, group_reciprocal)  # word0 // words per group (gemv_group_reciprocal)
    for r in range(words.shape[0]):
        words[r, 0], words[r, 1], words[r, 2], words[r, 3] = load_u32x4_streaming_at(
            qweight, row_word[r], word0)
        scale[r] = float32(load_at(scales, row_group[r], g))
        zero[r] = float32(load_at(zeros, row_group[r], g))


@cuda.jit(device=True, inline="always")
def _accumulate_block(xq, xstep, xsum, b, t0, last_token, words, scale, zero, hi_dot, lo_dot,
                      acc):
    """acc[t, r] += the products of input block b (words, scale, zero: its weights, rows r) with
    token t0 + t's digits, for every token t of acc."""
    word0 = uint32(uint32(b) * uint32(4))
    for t in range(acc.shape[0]):
        row = uint32(min(t0 + t, last_token))
        for r in range(words.shape[0]):
            hi_dot[r] = int32(0)
            lo_dot[r] = int32(0)
        x_row = uint32(row * uint32(xq.shape[1]))
        for word in range(4):
            hi_even, hi_odd, lo_even, lo_odd = load_u32x4_at(
                xq, x_row, uint32(word0 * uint32(4) + uint32(4 * word)))
            for r in range(words.shape[0]):
                even = words[r, word] & NIBBLES  # nibbles 0, 2, 4, 6
                odd = (words[r, word] >> uint32(4)) & NIBBLES  # nibbles 1, 3, 5, 7
                hi_dot[r] = dot4_u8s8(odd, hi_odd, dot4_u8s8(even, hi_even, hi_dot[r]))
                lo_dot[r] = dot4_u8s8(odd, lo_odd, dot4_u8s8(even, lo_even, lo_dot[r]))
        x_blocks = uint32(row * uint32(xstep.shape[1]))
        step = load_at(xstep, x_blocks, b)
        block_sum = load_at(xsum, x_blocks, b)
        for r in range(words.shape[0]):
            digits = float32(int32(hi_dot[r] * LO_RADIX + lo_dot[r]))  # exact in 32 bits
            acc[t, r] += scale[r] * (step * digits - zero[r] * block_sum)


def _make_int4_gemv(tokens, block_rows=GEMV_ROWS):
    # The one-token tiles load a block's weights one iteration ahead, the first before the wait.
    # The batch tiles load them at the top of each iteration, after the wait: ahead, the 8-token
    # tile took 137 registers instead of 128 on sm_90 (three 128-thread blocks per SM instead of
    # four: down_proj at 8 tokens 55.8 -> 70.4 us, H200) and spilled on sm_75 if capped at 128.
    weights_ahead = tokens == 1

    def int4_gemv(xq, xstep, xsum, qweight, scales, zeros, group_reciprocal, bias, has_bias,
                  out):
        """out[t, n] = x[t] . dequant(row n) (+ bias[n]) for the token tile of blockIdx.y.

        xq [T, K/2] u32, xstep, xsum [T, K/32] f32 (quantize_activations.py); qweight [N, K/8]
        u32 (fewer than 2**32 words: offsets are 32-bit); scales, zeros [N, K/group] f16;
        group_reciprocal: geometry.gemv_group_reciprocal(group), for groups of 32, 64, 96 or
        128 (a kernel parameter, it takes no register: computed in the kernel from the group
        size, or held from one, it cost up to 46 registers or a spill, docs/kernel-notes.md);
        bias [N] f32 (read only when has_bias); out [T, N] f32. Grid
        (ceil(N / block_rows), ceil(T / tokens)), block a multiple of 32 (<= 32 warps). Each
        weight word is loaded once for every token of the tile; per token the arithmetic does
        not depend on the tile size, so a batched decode equals solo decodes bit for bit.
        """
        lane = cuda.threadIdx.x % WARP
        warp = cuda.threadIdx.x // WARP
        warps = cuda.blockDim.x // WARP
        rows = qweight.shape[0]
        blocks = qweight.shape[1] // 4
        last_token = xq.shape[0] - 1
        n0 = cuda.blockIdx.x * block_rows
        t0 = cuda.blockIdx.y * tokens
        acc = cuda.local.array((tokens, block_rows), float32)
        words = cuda.local.array((block_rows, 4), uint32)  # 32 codes of each row
        scale = cuda.local.array(block_rows, float32)
        zero = cuda.local.array(block_rows, float32)
        hi_dot = cuda.local.array(block_rows, int32)
        lo_dot = cuda.local.array(block_rows, int32)
        # flat offsets of each row's first weight word and first group (32-bit arithmetic: the
        # loads widen them once; numba's 2-D indexing multiplied 64-bit indices by strides for
        # every load)
        row_word = cuda.local.array(block_rows, uint32)
        row_group = cuda.local.array(block_rows, uint32)
        for r in range(block_rows):
            n = uint32(min(n0 + r, rows - 1))  # past the last row: compute, never store
            row_word[r] = uint32(n * uint32(qweight.shape[1]))
            row_group[r] = uint32(n * uint32(scales.shape[1]))
        for t in range(tokens):
            for r in range(block_rows):
                acc[t, r] = float32(0.0)
        first = warp * WARP + lane
        stride = warps * WARP
        if weights_ahead:
            if first < blocks:
                _load_block_weights(qweight, scales, zeros, row_word, row_group, first,
                                    group_reciprocal, words, scale, zero)
            # Launched as a dependent (grid_dependency.py), the block may run before the kernel
            # that writes x ends: the first weights are in flight; x is read only after this.
            wait_for_prerequisite_grids()
            b = first
            while b < blocks:
                _accumulate_block(xq, xstep, xsum, b, t0, last_token, words, scale, zero,
                                  hi_dot, lo_dot, acc)
                b += stride
                if b < blocks:
                    _load_block_weights(qweight, scales, zeros, row_word, row_group, b,
                                        group_reciprocal, words, scale, zero)
        else:
            wait_for_prerequisite_grids()
            for b in range(first, blocks, stride):
                _load_block_weights(qweight, scales, zeros, row_word, row_group, b,
                                    group_reciprocal, words, scale, zero)
                _accumulate_block(xq, xstep, xsum, b, t0, last_token, words, scale, zero,
                                  hi_dot, lo_dot, acc)
        # The next kernel (launched as a dependent, waiting for this grid to end) may become
        # resident during the blocks' reductions: its launch no longer follows the last store.
        launch_dependents()
        partial = cuda.shared.array((tokens, block_rows, WARP), float32)
        store_gemv_tile(acc, partial, n0, t0, rows, last_token, bias, has_bias, out)

    return int4_gemv


_SIGNATURE = ("void(uint32[:, ::1], float32[:, ::1], float32[:, ::1], uint32[:, ::1], "
              "float16[:, ::1], float16[:, ::1], uint32, float32[::1], int32, float32[:, ::1])")
KERNELS = {}
for _tokens in GEMV_TOKEN_TILES:
    KERNELS[f"int4_gemv_t{_tokens}_r{GEMV_ROWS}"] = (_make_int4_gemv(_tokens), _SIGNATURE)
# tall matrices (gate_up, an INT4 lm_head) at batch 1: 8 rows per block, half the blocks
KERNELS[f"int4_gemv_t1_r{GEMV_TALL_ROWS}"] = (_make_int4_gemv(1, GEMV_TALL_ROWS), _SIGNATURE)
# the most registers ptxas may give a thread of these kernels (build.py writes `.maxnreg`)
MAX_REGISTERS = {f"int4_gemv_t1_r{GEMV_ROWS}": GEMV_T1_MAX_REGISTERS,
                 f"int4_gemv_t1_r{GEMV_TALL_ROWS}": GEMV_TALL_MAX_REGISTERS}
