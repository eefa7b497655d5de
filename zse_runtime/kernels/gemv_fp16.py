"""Dense fp16 matrix times a few activation rows (an fp16 lm_head).

fp16_matmul_t*: the layout of int4_gemv_t* (gemv_int4.py) for fp16 rows: a block owns
GEMV_ROWS rows, its warps take interleaved slices of K, each lane loads 8 halves (16 bytes) of a
row at once, and each loaded weight is used for every token of the tile.
"""

from numba import cuda, float32

from .common import WARP, store_gemv_tile
from .geometry import GEMV_ROWS, GEMV_TOKEN_TILES
from .memory import halves_as_floats, load_f32x4, load_u32x4_streaming


def _make_fp16_matmul(tokens):
    def fp16_matmul(x, weight, out):
        """x [T, K] f32; weight [N, K/2] u32 (the fp16 matrix, two halves per word, K a multiple
        of 8); out [T, N] f32. Grid (ceil(N / GEMV_ROWS), ceil(T / tokens)), block a multiple
        of 32 (<= 32 warps)."""
        lane = cuda.threadIdx.x % WARP
        warp = cuda.threadIdx.x // WARP
        warps = cuda.blockDim.x // WARP
        rows = weight.shape[0]
        units = weight.shape[1] // 4  # 16-byte units of 8 halves
        last_token = x.shape[0] - 1
        n0 = cuda.blockIdx.x * GEMV_ROWS
        t0 = cuda.blockIdx.y * tokens
        acc = cuda.local.array((tokens, GEMV_ROWS), float32)
        w = cuda.local.array((GEMV_ROWS, 8), float32)
        for t in range(tokens):
            for r in range(GEMV_ROWS):
                acc[t, r] = float32(0.0)
        for u in range(warp * WARP + lane, units, warps * WARP):
            for r in range(GEMV_ROWS):
                n = min(n0 + r, rows - 1)  # past the last row: compute, never store
                a, b, c, d = load_u32x4_streaming(weight, n, u * 4)
                w[r, 0], w[r, 1] = halves_as_floats(a)
                w[r, 2], w[r, 3] = halves_as_floats(b)
                w[r, 4], w[r, 5] = halves_as_floats(c)
                w[r, 6], w[r, 7] = halves_as_floats(d)
            for t in range(tokens):
                row = min(t0 + t, last_token)
                x0, x1, x2, x3 = load_f32x4(x, row, u * 8)
                x4, x5, x6, x7 = load_f32x4(x, row, u * 8 + 4)
                for r in range(GEMV_ROWS):
                    acc[t, r] += (((w[r, 0] * x0 + w[r, 1] * x1) + (w[r, 2] * x2 + w[r, 3] * x3))
                                  + ((w[r, 4] * x4 + w[r, 5] * x5) + (w[r, 6] * x6 + w[r, 7] * x7)))
        partial = cuda.shared.array((tokens, GEMV_ROWS, WARP), float32)
        store_gemv_tile(acc, partial, n0, t0, rows, last_token, out[0], 0, out)  # no bias

    return fp16_matmul


KERNELS = {}
for _tokens in GEMV_TOKEN_TILES:
    KERNELS[f"fp16_matmul_t{_tokens}"] = (_make_fp16_matmul(_tokens),
                                          "void(float32[:, ::1], uint32[:, ::1], float32[:, ::1])")
