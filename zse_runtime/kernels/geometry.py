"""Launch geometry shared by the kernel sources and the GPU backend (which must not import
numba). Part of the prebuilt digest: changing a value rebuilds the binaries."""

WARP = 32

# int4_gemm (tensor cores): a block computes GEMM_TILE_T tokens x GEMM_TILE_N rows with 4 warps
# of 32 x 32; split_activations runs one thread per (token, quantization group).
GEMM_TILE_T = 64
GEMM_TILE_N = 64
GEMM_THREADS = 128
# int4_gemm_t32, for decode batches of up to 32 tokens: the same 4 warps side by side over rows,
# so none computes padding tokens
GEMM_DECODE_TILE_T = 32
GEMM_DECODE_TILE_N = 128

# int4_gemv_t*_r*: a block per GEMV_ROWS rows (its warps split K), one kernel per token tile size;
# at batch 1, matrices of >= GEMV_TALL_MIN_ROWS rows take GEMV_TALL_ROWS rows per block. Threads
# per block by shape (the same for every token tile, so batched results equal solo ones bit for
# bit): GEMV_THREADS, or GEMV_MANY_ROWS_THREADS for matrices with more rows than inputs. H200,
# the best of 64/128/256/512 at the 7B shapes for 1 and 8 tokens (docs/kernel-notes.md, "dp4a";
# qkv, 4608 x 3584, moved to 64 threads on 2026-11-30: 7.1 -> 5.8 us at batch 1).
GEMV_ROWS = 4
GEMV_TALL_ROWS = 8
GEMV_TALL_MIN_ROWS = 16384
GEMV_THREADS = 128
GEMV_MANY_ROWS_THREADS = 64
GEMV_TOKEN_TILES = (1, 4, 8)
# Registers a thread of the batch-1 GEMVs may use (`.maxnreg`, kernels/build.py). Left to itself
# ptxas gives the 8-row kernel 72 and interleaves an iteration's weight loads with the dot
# products; with up to 96 it issues 24 of the 30 loads before the first dp4a. H200, cubins linked
# as prebuilt/ is, one call, outputs identical (docs/kernel-notes.md, "Batch-1 GEMV: register
# caps"), us: gate_up 25.1 (previous kernel) / 29.8 (no cap) / 22.5 (96) / 22.7 (128); INT4
# lm_head 88.5 / 93.3 / 78.8 / 77.4. The 4-row kernel (qkv and o_proj at 64 and 128 threads,
# down_proj at 128) gains nothing from its loads coming first (80: qkv 5.4 but down_proj 14.3);
# 72 keeps it level with the previous kernel (qkv 5.78 / 5.71, o_proj 4.77 / 4.79, down_proj
# 11.65 / 11.65), 64 or no cap lose 0.6-0.8 us on down_proj.
GEMV_T1_MAX_REGISTERS = 72
GEMV_TALL_MAX_REGISTERS = 96
FP16_GEMV_THREADS = 256

# Decode batches (up to GEMV_MAX_TOKENS, every decode bucket) can take the GEMV token tiles,
# whose per-token arithmetic does not depend on the batch (zse-run --batch-invariant takes them
# throughout). Otherwise the INT4 matrices take the tensor-core GEMM from INT4_GEMM_MIN_TOKENS
# (the 8-token GEMV tile makes one pass over the weights per 8 tokens), and the fp16 lm_head
# takes fp16_gemm from FP16_GEMM_MIN_TOKENS (H200, 2026-11-30, same run: 550 / 555 / 567 us at
# 8 / 16 / 32 tokens against 718 / 1428 / 2855 through the 8-token tile, 485 through the 4-token
# tile). A GEMM grid smaller than GEMM_SPLIT_BLOCKS_PER_SM blocks per SM splits K over
# quantization groups (sum_splits adds the runs).
GEMV_MAX_TOKENS = 32
INT4_GEMM_MIN_TOKENS = 9
FP16_GEMM_MIN_TOKENS = 5
GEMM_SPLIT_BLOCKS_PER_SM = 2

# attention_partial: a block per (token x head, partition of keys); each of its warps scores 32
# keys at once, so a decode partition is one batch per warp (H200, 2026-11-30: 64-key partitions
# left half the warps idle). Prefill has thousands of token x head blocks anyway and uses long
# partitions, which keeps the workspace small.
ATTENTION_THREADS = 128
ATTENTION_DECODE_PARTITION = 128
ATTENTION_PREFILL_PARTITION = 1024
ATTENTION_MAX_HEAD_DIM = 128
# words of a key row a lane loads per round (kernels/attention.py): the whole row for decode
# (latency), 16 for prefill (56 registers instead of 127 on sm_90: 9 blocks per SM, not 4)
ATTENTION_DECODE_KEY_WORDS = 64
ATTENTION_PREFILL_KEY_WORDS = 16
# attention_decode_grouped: the query heads sharing a KV head in one block (at most this many;
# models with larger groups keep a block per head), for decode batches of at least
# ATTENTION_GROUPED_MIN_TOKENS sequences. H200, 7B shapes (7 heads per KV head), 2026-11-30, us
# per layer per-head -> grouped: 32 sequences 69 -> 36 at 128 keys, 152 -> 75 at 640, 378 -> 206
# at 2048; 16: 35 -> 33, 75 -> 42, 189 -> 113; 8: 18 -> 33, 38 -> 38, 96 -> 73. A grouped block
# does 7 heads' arithmetic with one block's 4 warps (~26 us at one sequence, ncu: 1 warp per
# scheduler, 0.12 eligible), so below 16 sequences short contexts lose more than long ones gain.
# Key words per round: 16 keeps its 8 heads' accumulators in registers (64: a stack frame).
ATTENTION_MAX_GROUP = 8
ATTENTION_GROUPED_KEY_WORDS = 16
ATTENTION_GROUPED_MIN_TOKENS = 16
# attention_tiled (prefill chunks of one sequence on tensor cores): a block per (64 tokens, head),
# a warp per 16 of the tokens; key and value tiles of 64 keys staged in shared memory
ATTENTION_TILE_TOKENS = 64
ATTENTION_TILE_KEYS = 64
ATTENTION_TILED_THREADS = 128

# Sampling (kernels/sampling.py): a row's vocabulary is cut into slices of at most
# SAMPLING_SLICE values, a block of SAMPLING_THREADS (a power of two) each, so one row spreads
# over ~40 SMs (152064 values) instead of one; the pick kernel scans one block mass per thread,
# hence at most SAMPLING_THREADS slices. Radix selection builds up to SAMPLING_HISTOGRAMS
# histograms per row per step (top-k's three digits, then top-p's last two).
SAMPLING_THREADS = 256
SAMPLING_SLICE = 4096
SAMPLING_HISTOGRAMS = 5
SAMPLING_BINS = 2048  # the widest digit: 11 bits
SAMPLING_STATE_FIELDS = 7


def gemv_group_reciprocal(group_size: int) -> int:
    """The INT4 GEMV's group argument: ceil(2^32 / words per group) (8 codes a word). A weight
    word's group is the high half of its index times this, exact for every index below 2^29
    (tests/test_kernels_sim.py): one mul.hi serves groups of 96 (12 words) as of 32, 64, 128,
    and, passed as a kernel parameter, it needs no register (kernels/gemv_int4.py)."""
    return -(-(1 << 32) // (group_size // 8))


def sampling_blocks(vocab: int) -> int:
    """Slices (blocks) per row of a sampling launch."""
    blocks = -(-vocab // SAMPLING_SLICE)
    if blocks > SAMPLING_THREADS:
        raise ValueError(f"a vocabulary of {vocab} needs {blocks} sampling slices; at most "
                         f"{SAMPLING_THREADS} are supported")
    return blocks


def sampling_launches(rows: int, blocks: int) -> list[tuple[str, tuple, int]]:
    """(kernel, grid, step) of one sampling pass over `rows` rows, in launch order; every
    kernel takes the same arguments (kernels/sampling.py)."""
    grid = (rows, blocks)
    return ([("sample_max", grid, 0), ("sample_exp", grid, 0)]
            + [("sample_refine", grid, step) for step in range(1, SAMPLING_HISTOGRAMS)]
            + [("sample_sums", grid, SAMPLING_HISTOGRAMS),
               ("sample_pick", (rows,), SAMPLING_HISTOGRAMS)])


# add_rmsnorm: blocks of NORM_THREADS over (token row, slice of the row); a decode step's rows
# are cut into slices of NORM_DECODE_SLICE values (one per thread), a prefill chunk's are whole
# (kernels/rmsnorm.py)
NORM_THREADS = 256
NORM_DECODE_SLICE = 256

# No kernel is launched with more than MAX_THREADS threads per block: with 256 even 255
# registers a thread fit the SM's 64K, so the kernels are compiled without launch bounds.
# (A 1024-thread add_rmsnorm took 88 registers and its launch failed with
# CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES on the H200.)
MAX_THREADS = 256

# kernels with a thread per value of a row over a (rows, ceil(width / ROW_THREADS)) grid
# (embedding, rope, gather, silu_mul)
ROW_THREADS = 256
ELEMENTWISE_THREADS = 256
