"""Launch geometry shared by the kernel sources and the GPU backend (which must not import
numba). Part of the prebuilt digest: changing a value rebuilds the binaries."""

WARP = 32

# int4_gemm: a block computes TILE_T tokens x TILE_N rows, stepping TILE_K along K.
GEMM_TILE_T = 32
GEMM_TILE_N = 64
GEMM_TILE_K = 32
GEMM_THREADS = 256

# int4_gemv: a warp per GEMV_ROWS_PER_WARP rows; fp16_matmul and int4_gemv_rows1: a warp per row.
GEMV_THREADS = 128
GEMV_ROWS_PER_WARP = 4
# Below this many rows, a warp per row keeps more warps in flight and wins (H200, 2026-11-29:
# down_proj 3584 rows 85 us vs 172 us; gate_up 37888 rows 144 us vs 116 us).
GEMV_MULTI_ROW_MIN_ROWS = 16384
# Up to this many tokens, one GEMV per token beats the tiled GEMM (whose 32-token tiles are mostly
# empty for small decode batches): H200, qkv at T=4, GEMM 270 us vs 4 x 23 us.
GEMV_MAX_TOKENS = 8

# attention_partial: a block per (token x head, partition of PARTITION keys).
ATTENTION_THREADS = 128
ATTENTION_PARTITION = 256
ATTENTION_MAX_HEAD_DIM = 128

# sample_tokens: a block per sequence; a power of two.
SAMPLING_THREADS = 512

# row-parallel kernels (embedding, norm, rope, gather, combine)
ROW_THREADS = 256
ELEMENTWISE_THREADS = 256
