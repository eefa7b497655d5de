"""Dense fp16 matrix times a batch of activation rows on tensor cores (an fp16 lm_head for decode
batches wider than one GEMV token tile).

fp16_matmul_t8 (gemv_fp16.py) reads the weights once per 8 tokens and does its products on the
CUDA cores: at 32 tokens the 7B lm_head took 2.9 ms (4 passes over 1.09 GB). Here the products
go through `mma.sync.m16n8k8` (fp16 inputs, fp32 accumulators), so one pass serves 64 tokens.

Layout. A lane loads 16 bytes of a weight row, the words 16 q + 4 p .. + 3 (k = 32 q + 8 p ..
+ 7, p = lane % 4), and uses word i as its A fragment of k step i of quad q: the mma sums over k
in any order as long as B agrees, so the lane's B fragment of step i is x[token][32 q + 8 p + 2 i]
and the next one, read as 8 floats and rounded to float16. x is an RMS-normalized hidden state
(|x| is at most sqrt(K) times the norm's largest weight), far inside float16's range. A warp
computes 32 rows x 32 tokens as 2 x 4 tiles of 16 x 8; a block of 4 warps 64 rows x 64 tokens.
"""

from numba import cuda, float32, uint32

from .geometry import GEMM_TILE_N, GEMM_TILE_T
from .memory import floats_as_halves, load_f32x4, load_u32x4_streaming, mma_m16n8k8
from .mma_tile import A_REGISTERS, M_TILES, N_TILES, make_warp_tile, store_tile

warp_tile = make_warp_tile(GEMM_TILE_N, GEMM_TILE_T)


def fp16_gemm(x, weight, out):
    """x [T, K] f32; weight [N, K/2] u32 (the fp16 matrix, two halves per word; K a multiple of
    32); out [T, N] f32. Grid (ceil(N / GEMM_TILE_N), ceil(T / GEMM_TILE_T)), block
    mma_tile.THREADS."""
    pair = cuda.threadIdx.x % 4
    rows = weight.shape[0]
    tokens = x.shape[0]
    a_rows = cuda.local.array(A_REGISTERS, uint32)
    b_tokens = cuda.local.array(N_TILES, uint32)
    row0, tok0 = warp_tile(rows, tokens, a_rows, b_tokens)
    acc = cuda.local.array((M_TILES, N_TILES, 4), float32)
    a_words = cuda.local.array((A_REGISTERS, 4), uint32)
    b_words = cuda.local.array((N_TILES, 4), uint32)
    for i in range(M_TILES):
        for j in range(N_TILES):
            for e in range(4):
                acc[i, j, e] = float32(0.0)
    for quad in range(weight.shape[1] // 16):
        for i in range(A_REGISTERS):
            (a_words[i, 0], a_words[i, 1], a_words[i, 2],
             a_words[i, 3]) = load_u32x4_streaming(weight, a_rows[i], 16 * quad + 4 * pair)
        for j in range(N_TILES):
            x0, x1, x2, x3 = load_f32x4(x, b_tokens[j], 32 * quad + 8 * pair)
            x4, x5, x6, x7 = load_f32x4(x, b_tokens[j], 32 * quad + 8 * pair + 4)
            b_words[j, 0] = floats_as_halves(x0, x1)
            b_words[j, 1] = floats_as_halves(x2, x3)
            b_words[j, 2] = floats_as_halves(x4, x5)
            b_words[j, 3] = floats_as_halves(x6, x7)
        for step in range(4):
            for i in range(M_TILES):
                for j in range(N_TILES):
                    (acc[i, j, 0], acc[i, j, 1], acc[i, j, 2],
                     acc[i, j, 3]) = mma_m16n8k8(a_words[2 * i, step], a_words[2 * i + 1, step],
                                                 b_words[j, step], acc[i, j, 0], acc[i, j, 1],
                                                 acc[i, j, 2], acc[i, j, 3])
    store_tile(acc, row0, tok0, rows, tokens, out[0], 0, out, 0)  # no bias


KERNELS = {
    "fp16_gemm": (fp16_gemm, "void(float32[:, ::1], uint32[:, ::1], float32[:, ::1])"),
}
