"""INT4 GEMV for single-token decode: out[0, n] = x[0] . dequant(row n) (+ bias[n]).

Versions (scripts/gpu_check.py times both side by side; docs/kernel-notes.md has the numbers):
  int4_gemv_rows1  a warp per row: lanes read consecutive 32-bit words, so every warp-wide load
                   is one coalesced 128-byte transaction; partial dots summed by shuffles.
  int4_gemv        a warp per 4 rows: each lane loads its 8 activations once and uses them for 4
                   rows (4 independent weight loads in flight per lane), and folds the zero point
                   per word: sum_j (q_j - z) s x_j = s (sum_j q_j x_j - z sum_j x_j).
"""

from numba import cuda, float32, int32

from .common import WARP, int4_value, warp_sum
from .geometry import GEMV_ROWS_PER_WARP


@cuda.jit(device=True, inline="always")
def _group_shift(group_size):
    """log2(words per group) for group sizes 32, 64, 128: a shift instead of a 64-bit division
    per word."""
    return int32(2) if group_size == 32 else (int32(3) if group_size == 64 else int32(4))


def int4_gemv_rows1(x, qweight, scales, zeros, group_size, bias, has_bias, out):
    """x [1, K] f32; qweight [N, K/8] u32; scales, zeros [N, K/group] f16; bias [N] f32 (read only
    when has_bias); out [1, N] f32. Any grid; block a multiple of 32."""
    lane = cuda.threadIdx.x % WARP
    warps_per_block = cuda.blockDim.x // WARP
    warp = cuda.blockIdx.x * warps_per_block + cuda.threadIdx.x // WARP
    total_warps = cuda.gridDim.x * warps_per_block
    rows = qweight.shape[0]
    words = qweight.shape[1]
    group_shift = _group_shift(group_size)
    # Every warp runs the same number of iterations (n may pass the end): warp_sum is then
    # reached uniformly, which the simulator's barrier-based warp_sum requires.
    for first in range(0, rows, total_warps):
        n = first + warp
        acc = float32(0.0)
        for w in range(lane, words if n < rows else 0, WARP):
            word = qweight[n, w]
            g = w >> group_shift
            scale = float32(scales[n, g])
            zero = float32(zeros[n, g])
            base = w * 8
            for j in range(8):
                acc += int4_value(word, j, scale, zero) * x[0, base + j]
        acc = warp_sum(acc)
        if lane == 0 and n < rows:
            if has_bias:
                acc += bias[n]
            out[0, n] = acc


@cuda.jit(device=True, inline="always")
def _codes_dot(word, x0, x1, x2, x3, x4, x5, x6, x7):
    """sum_j q_j * x_j over the 8 nibbles of a word."""
    return (float32(word & 15) * x0 + float32((word >> 4) & 15) * x1
            + float32((word >> 8) & 15) * x2 + float32((word >> 12) & 15) * x3
            + float32((word >> 16) & 15) * x4 + float32((word >> 20) & 15) * x5
            + float32((word >> 24) & 15) * x6 + float32((word >> 28) & 15) * x7)


@cuda.jit(device=True, inline="always")
def _row_term(qweight, scales, zeros, n, rows, w, g, x0, x1, x2, x3, x4, x5, x6, x7, x_sum):
    if n >= rows:
        return float32(0.0)
    word = qweight[n, w]
    scale = float32(scales[n, g])
    return scale * (_codes_dot(word, x0, x1, x2, x3, x4, x5, x6, x7) - float32(zeros[n, g]) * x_sum)


@cuda.jit(device=True, inline="always")
def _finish_row(acc, n, rows, lane, bias, has_bias, out):
    total = warp_sum(acc)
    if lane == 0 and n < rows:
        if has_bias:
            total += bias[n]
        out[0, n] = total


def int4_gemv(x, qweight, scales, zeros, group_size, bias, has_bias, out):
    """As int4_gemv_rows1, GEMV_ROWS_PER_WARP (4) rows per warp. Grid
    ceil(N / (4 * warps per block)), block a multiple of 32."""
    lane = cuda.threadIdx.x % WARP
    warp = cuda.blockIdx.x * (cuda.blockDim.x // WARP) + cuda.threadIdx.x // WARP
    rows = qweight.shape[0]
    words = qweight.shape[1]
    group_shift = _group_shift(group_size)
    n0 = warp * GEMV_ROWS_PER_WARP
    acc0 = float32(0.0)
    acc1 = float32(0.0)
    acc2 = float32(0.0)
    acc3 = float32(0.0)
    for w in range(lane, words if n0 < rows else 0, WARP):
        base = w * 8
        x0 = x[0, base]
        x1 = x[0, base + 1]
        x2 = x[0, base + 2]
        x3 = x[0, base + 3]
        x4 = x[0, base + 4]
        x5 = x[0, base + 5]
        x6 = x[0, base + 6]
        x7 = x[0, base + 7]
        x_sum = ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))
        g = w >> group_shift
        acc0 += _row_term(qweight, scales, zeros, n0, rows, w, g, x0, x1, x2, x3, x4, x5, x6, x7, x_sum)
        acc1 += _row_term(qweight, scales, zeros, n0 + 1, rows, w, g, x0, x1, x2, x3, x4, x5, x6, x7, x_sum)
        acc2 += _row_term(qweight, scales, zeros, n0 + 2, rows, w, g, x0, x1, x2, x3, x4, x5, x6, x7, x_sum)
        acc3 += _row_term(qweight, scales, zeros, n0 + 3, rows, w, g, x0, x1, x2, x3, x4, x5, x6, x7, x_sum)
    _finish_row(acc0, n0, rows, lane, bias, has_bias, out)
    _finish_row(acc1, n0 + 1, rows, lane, bias, has_bias, out)
    _finish_row(acc2, n0 + 2, rows, lane, bias, has_bias, out)
    _finish_row(acc3, n0 + 3, rows, lane, bias, has_bias, out)


_SIGNATURE = ("void(float32[:, ::1], uint32[:, ::1], float16[:, ::1], float16[:, ::1], int32, "
              "float32[::1], int32, float32[:, ::1])")
KERNELS = {
    "int4_gemv": (int4_gemv, _SIGNATURE),
    "int4_gemv_rows1": (int4_gemv_rows1, _SIGNATURE),
}
