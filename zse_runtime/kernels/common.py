"""Device helpers shared by kernels. All are inline="always" so kernels compile to PTX on a
machine without a GPU, and each has a simulator-compatible form (the CUDA simulator has no warp
shuffles): the test suite runs every kernel under NUMBA_ENABLE_CUDASIM=1."""

from __future__ import annotations

from numba import config, cuda, float32, int32

from .geometry import WARP  # noqa: E402

FULL_MASK = 0xFFFFFFFF


if config.ENABLE_CUDASIM:

    @cuda.jit(device=True, inline="always")
    def warp_sum(value):
        # The simulator runs a block's threads in lockstep at barriers: exchange through shared
        # memory instead of shuffles. Callers reach this uniformly, as they would a shuffle.
        scratch = cuda.shared.array(1024, float32)
        scratch[cuda.threadIdx.x] = value
        cuda.syncthreads()
        base = cuda.threadIdx.x - cuda.threadIdx.x % WARP
        total = float32(0.0)
        for lane in range(WARP):
            total += scratch[base + lane]
        cuda.syncthreads()
        return total

else:

    @cuda.jit(device=True, inline="always")
    def warp_sum(value):
        offset = 16
        while offset > 0:
            value += cuda.shfl_xor_sync(FULL_MASK, value, offset)
            offset //= 2
        return value


@cuda.jit(device=True, inline="always")
def block_sum(value, scratch):
    """Sum over the block; scratch is a float32 shared array of >= blockDim.x / 32 entries.
    Every thread gets the total."""
    value = warp_sum(value)
    warp = cuda.threadIdx.x // WARP
    warps = (cuda.blockDim.x + WARP - 1) // WARP
    cuda.syncthreads()
    if cuda.threadIdx.x % WARP == 0:
        scratch[warp] = value
    cuda.syncthreads()
    total = float32(0.0)
    for w in range(warps):
        total += scratch[w]
    cuda.syncthreads()
    return total


@cuda.jit(device=True, inline="always")
def int4_value(word, j, scale, zero):
    """Dequantize nibble j of a packed word: (q - zero) * scale, in float32."""
    return (float32((word >> int32(4 * j)) & 15) - zero) * scale



@cuda.jit(device=True, inline="always")
def store_gemv_tile(acc, partial, n0, t0, rows, last_token, bias, has_bias, out):
    """End of a GEMV block: acc [tokens, block_rows] per thread holds each lane's partial dots;
    sum them over the warp, then over the block's warps (partial: shared [tokens, block_rows,
    WARP]), and write out[t0 + t, n0 + r] (+ bias) inside the matrix. Every thread calls this."""
    tokens = acc.shape[0]
    block_rows = acc.shape[1]
    lane = cuda.threadIdx.x % WARP
    warp = cuda.threadIdx.x // WARP
    for t in range(tokens):
        for r in range(block_rows):
            total = warp_sum(acc[t, r])
            if lane == 0:
                partial[t, r, warp] = total
    cuda.syncthreads()
    i = cuda.threadIdx.x
    if i < tokens * block_rows:
        t = i // block_rows
        r = i % block_rows
        if n0 + r < rows and t0 + t <= last_token:
            total = float32(0.0)
            for w in range(cuda.blockDim.x // WARP):
                total += partial[t, r, w]
            if has_bias:
                total += bias[n0 + r]
            out[t0 + t, n0 + r] = total
