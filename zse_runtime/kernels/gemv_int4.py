"""INT4 GEMV for single-token decode: out[0, n] = x[0] . dequant(row n) (+ bias[n]).

Each warp owns rows (grid-stride); its lanes read consecutive 32-bit words of the row, so every
warp-wide load is one coalesced 128-byte transaction of weights, and each weight byte is read
once. Partial dots are summed with warp shuffles.
"""

from numba import cuda, float32

from .common import WARP, int4_value, warp_sum


def int4_gemv(x, qweight, scales, zeros, group_size, bias, has_bias, out):
    """x [1, K] f32; qweight [N, K/8] u32; scales, zeros [N, K/group] f16; bias [N] f32 (read only
    when has_bias); out [1, N] f32."""
    lane = cuda.threadIdx.x % WARP
    warps_per_block = cuda.blockDim.x // WARP
    warp = cuda.blockIdx.x * warps_per_block + cuda.threadIdx.x // WARP
    total_warps = cuda.gridDim.x * warps_per_block
    rows = qweight.shape[0]
    words = qweight.shape[1]
    words_per_group = group_size // 8
    # Every warp runs the same number of iterations (n may pass the end): warp_sum is then
    # reached uniformly, which the simulator's barrier-based warp_sum requires.
    for first in range(0, rows, total_warps):
        n = first + warp
        acc = float32(0.0)
        for w in range(lane, words if n < rows else 0, WARP):
            word = qweight[n, w]
            g = w // words_per_group
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


KERNELS = {
    "int4_gemv": (int4_gemv, "void(float32[:, ::1], uint32[:, ::1], float16[:, ::1], "
                             "float16[:, ::1], int32, float32[::1], int32, float32[:, ::1])"),
}
