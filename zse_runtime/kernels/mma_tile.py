"""The warp tiling shared by the tensor-core GEMMs (gemm_int4.py, gemm_fp16.py).

A block of THREADS computes GEMM_TILE_N rows x GEMM_TILE_T tokens (prompt chunks) or
GEMM_DECODE_TILE_N x GEMM_DECODE_TILE_T (decode batches: no warp on padding tokens); each warp 32
rows x 32 tokens as M_TILES x N_TILES tiles of `mma.m16n8k8` (16 rows x 8 tokens). A lane's fragments cover rows
group and group + 8 of each row tile and token group of each token tile (group = lane / 4); its
accumulators hold rows group and group + 8 for tokens 2 pair and 2 pair + 1 (pair = lane % 4),
as the PTX ISA lays out m16n8k8.
"""

from numba import cuda

from .geometry import GEMM_THREADS, GEMM_TILE_N, GEMM_TILE_T, WARP

WARP_ROWS = 32  # 2 tiles of 16 rows
WARP_TOKENS = 32  # 4 tiles of 8 tokens
M_TILES = WARP_ROWS // 16
N_TILES = WARP_TOKENS // 8
A_REGISTERS = 2 * M_TILES  # rows group and group + 8 of each row tile
THREADS = (GEMM_TILE_N // WARP_ROWS) * (GEMM_TILE_T // WARP_TOKENS) * WARP  # 4 warps
assert THREADS == GEMM_THREADS, "the backend launches these blocks with geometry.GEMM_THREADS"


def make_warp_tile(tile_rows, tile_tokens):
    """warp_tile for blocks of tile_rows x tile_tokens (4 warps of WARP_ROWS x WARP_TOKENS)."""
    assert (tile_rows // WARP_ROWS) * (tile_tokens // WARP_TOKENS) * WARP == THREADS
    token_warps = tile_tokens // WARP_TOKENS

    @cuda.jit(device=True, inline="always")
    def warp_tile(rows, tokens, a_rows, b_tokens):
        """(first row, first token) of this warp's tile; fills a_rows [A_REGISTERS] and
        b_tokens [N_TILES] with the rows and tokens this lane's fragments read, clamped into
        the matrix (past the edge a lane computes on the last row or token and never stores
        it)."""
        warp = cuda.threadIdx.x // WARP
        group = cuda.threadIdx.x % WARP // 4
        row0 = cuda.blockIdx.x * tile_rows + (warp // token_warps) * WARP_ROWS
        tok0 = cuda.blockIdx.y * tile_tokens + (warp % token_warps) * WARP_TOKENS
        for i in range(A_REGISTERS):
            a_rows[i] = min(row0 + 16 * (i // 2) + 8 * (i % 2) + group, rows - 1)
        for j in range(N_TILES):
            b_tokens[j] = min(tok0 + 8 * j + group, tokens - 1)
        return row0, tok0

    return warp_tile


@cuda.jit(device=True, inline="always")
def store_tile(acc, row0, tok0, rows, tokens, bias, has_bias, out, first_out_row):
    """Write this lane's accumulators acc [M_TILES, N_TILES, 4] to out[first_out_row + t, n]
    (+ bias[n] when has_bias), inside the rows x tokens matrix."""
    group = cuda.threadIdx.x % WARP // 4
    pair = cuda.threadIdx.x % 4
    for i in range(M_TILES):
        for half in range(2):
            n = row0 + 16 * i + 8 * half + group
            if n < rows:
                for j in range(N_TILES):
                    for c in range(2):
                        t = tok0 + 8 * j + 2 * pair + c
                        if t < tokens:
                            value = acc[i, j, 2 * half + c]
                            if has_bias:
                                value += bias[n]
                            out[first_out_row + t, n] = value
