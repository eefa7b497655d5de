"""INT4 GEMM for prefill and batched decode: out[T, N] = x[T, K] @ dequant(W[N, K]).T (+ bias).

A block computes a TILE_T x TILE_N tile of the output. Per K step it stages TILE_T x TILE_K
activations and TILE_N x TILE_K *dequantized* weights in shared memory (each weight word is
read from global memory once per block), then each thread accumulates a 4 x 2 micro-tile.
TILE_K = 32 never crosses a quantization group (group sizes are multiples of 32).
"""

from numba import cuda, float32

from .common import int4_value

from .geometry import GEMM_THREADS as THREADS
from .geometry import GEMM_TILE_K as TILE_K
from .geometry import GEMM_TILE_N as TILE_N
from .geometry import GEMM_TILE_T as TILE_T

MICRO_T = 4  # tokens per thread: (THREADS // 32) * MICRO_T == TILE_T
MICRO_N = 2  # rows per thread: 32 * MICRO_N == TILE_N
TILE_K_PADDED = TILE_K + 1  # one spare column: column reads then hit distinct banks


def int4_gemm(x, qweight, scales, zeros, group_size, bias, has_bias, out):
    """x [T, K] f32; qweight [N, K/8] u32; scales, zeros [N, K/group] f16; bias [N] f32;
    out [T, N] f32. Grid (ceil(N / TILE_N), ceil(T / TILE_T)), block THREADS."""
    xs = cuda.shared.array((TILE_T, TILE_K_PADDED), float32)
    ws = cuda.shared.array((TILE_N, TILE_K_PADDED), float32)
    tid = cuda.threadIdx.x
    tokens = x.shape[0]
    cols = x.shape[1]
    rows = qweight.shape[0]
    row0 = cuda.blockIdx.x * TILE_N
    tok0 = cuda.blockIdx.y * TILE_T
    ty = (tid // 32) * MICRO_T  # first token of this thread's micro-tile
    tx = (tid % 32) * MICRO_N  # first row of this thread's micro-tile
    acc = cuda.local.array((MICRO_T, MICRO_N), float32)
    for i in range(MICRO_T):
        for j in range(MICRO_N):
            acc[i, j] = 0.0
    for k0 in range(0, cols, TILE_K):
        # activations: TILE_T * TILE_K = 1024 values, 4 per thread
        for e in range(tid, TILE_T * TILE_K, THREADS):
            t = e // TILE_K
            k = e % TILE_K
            xs[t, k] = x[tok0 + t, k0 + k] if tok0 + t < tokens else float32(0.0)
        # weights: TILE_N rows x TILE_K / 8 words = 256 words, one per thread
        r = tid // (TILE_K // 8)
        w = tid % (TILE_K // 8)
        n = row0 + r
        if n < rows:
            word = qweight[n, k0 // 8 + w]
            g = k0 // group_size
            scale = float32(scales[n, g])
            zero = float32(zeros[n, g])
            for j in range(8):
                ws[r, w * 8 + j] = int4_value(word, j, scale, zero)
        else:
            for j in range(8):
                ws[r, w * 8 + j] = 0.0
        cuda.syncthreads()
        for k in range(TILE_K):
            for i in range(MICRO_T):
                a = xs[ty + i, k]
                for j in range(MICRO_N):
                    acc[i, j] += a * ws[tx + j, k]
        cuda.syncthreads()
    for i in range(MICRO_T):
        t = tok0 + ty + i
        if t < tokens:
            for j in range(MICRO_N):
                n = row0 + tx + j
                if n < rows:
                    value = acc[i, j]
                    if has_bias:
                        value += bias[n]
                    out[t, n] = value


KERNELS = {
    "int4_gemm": (int4_gemm, "void(float32[:, ::1], uint32[:, ::1], float16[:, ::1], "
                             "float16[:, ::1], int32, float32[::1], int32, float32[:, ::1])"),
}
