"""Dense fp16 matrix times a few activation rows (an fp16 lm_head): warp per output row."""

from numba import cuda, float32

from .common import WARP, warp_sum


def fp16_matmul(x, weight, out):
    """x [T, K] f32; weight [N, K] f16; out [T, N] f32. A warp keeps its row in L1 across the
    T (<= a few dozen) tokens."""
    lane = cuda.threadIdx.x % WARP
    warps_per_block = cuda.blockDim.x // WARP
    warp = cuda.blockIdx.x * warps_per_block + cuda.threadIdx.x // WARP
    total_warps = cuda.gridDim.x * warps_per_block
    rows = weight.shape[0]
    for first in range(0, rows, total_warps):  # uniform trip count: see int4_gemv
        n = first + warp
        for t in range(x.shape[0]):
            acc = float32(0.0)
            for k in range(lane, weight.shape[1] if n < rows else 0, WARP):
                acc += float32(weight[n, k]) * x[t, k]
            acc = warp_sum(acc)
            if lane == 0 and n < rows:
                out[t, n] = acc


KERNELS = {"fp16_matmul": (fp16_matmul, "void(float32[:, ::1], float16[:, ::1], float32[:, ::1])")}
