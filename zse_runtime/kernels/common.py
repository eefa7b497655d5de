"""Device helpers shared by kernels. All are inline="always" so kernels compile to PTX on a
machine without a GPU, and each has a simulator-compatible form (the CUDA simulator has no warp
shuffles): the test suite runs every kernel under NUMBA_ENABLE_CUDASIM=1."""

from __future__ import annotations

from numba import config, cuda, float32, float64, int32, uint32

from .geometry import WARP  # noqa: E402

FULL_MASK = 0xFFFFFFFF


if config.ENABLE_CUDASIM:
    # The simulator runs a block's threads in lockstep at barriers: lanes exchange values through
    # shared memory instead of shuffles. Callers reach these uniformly (every thread of the block),
    # as they would a shuffle (every lane of the warp).

    @cuda.jit(device=True, inline="always")
    def _warp_values(value):
        scratch = cuda.shared.array(1024, float64)  # float64 holds a float32 or a uint32 exactly
        scratch[cuda.threadIdx.x] = value
        cuda.syncthreads()
        base = cuda.threadIdx.x - cuda.threadIdx.x % WARP
        values = [scratch[base + lane] for lane in range(WARP)]
        cuda.syncthreads()
        return values

    @cuda.jit(device=True, inline="always")
    def warp_sum(value):
        total = float32(0.0)
        for other in _warp_values(value):
            total += float32(other)
        return total

    @cuda.jit(device=True, inline="always")
    def warp_max(value):
        return float32(max(_warp_values(value)))

    @cuda.jit(device=True, inline="always")
    def or_over_byte_lanes(value):
        lane = cuda.threadIdx.x % WARP
        values = _warp_values(value)
        total = uint32(0)
        for flip in (0, 2, 4, 6):
            total |= uint32(values[lane ^ flip])
        return total

    @cuda.jit(device=True, inline="always")
    def quad_sum(value):
        values = _warp_values(value)
        base = cuda.threadIdx.x % WARP // 4 * 4
        return float32(values[base]) + float32(values[base + 1]) + float32(values[base + 2]) \
            + float32(values[base + 3])

    @cuda.jit(device=True, inline="always")
    def warp_broadcast(value, source):
        return float32(_warp_values(value)[source])

    @cuda.jit(device=True, inline="always")
    def quad_max(value):
        values = _warp_values(value)
        base = cuda.threadIdx.x % WARP // 4 * 4
        return float32(max(values[base], values[base + 1], values[base + 2], values[base + 3]))

else:

    @cuda.jit(device=True, inline="always")
    def warp_sum(value):
        """Sum over the warp's 32 lanes; every lane gets it."""
        offset = 16
        while offset > 0:
            value += cuda.shfl_xor_sync(FULL_MASK, value, offset)
            offset //= 2
        return value

    @cuda.jit(device=True, inline="always")
    def warp_max(value):
        """Maximum over the warp's 32 lanes (float32); every lane gets it."""
        offset = 16
        while offset > 0:
            value = max(value, cuda.shfl_xor_sync(FULL_MASK, value, offset))
            offset //= 2
        return value

    @cuda.jit(device=True, inline="always")
    def or_over_byte_lanes(value):
        """OR of `value` (uint32) over the 4 lanes that differ from this one in lane bits 1 and 2:
        lanes 8w + p + {0, 2, 4, 6}, which hold the 4 bytes of one packed activation word
        (kernels/quantize_activations.py)."""
        value |= uint32(cuda.shfl_xor_sync(FULL_MASK, int32(value), 2))
        value |= uint32(cuda.shfl_xor_sync(FULL_MASK, int32(value), 4))
        return value

    @cuda.jit(device=True, inline="always")
    def quad_sum(value):
        """Sum over the 4 lanes of this lane's quad (lanes 4i .. 4i + 3, which share a row of an
        mma accumulator fragment); every lane of the quad gets it."""
        value += cuda.shfl_xor_sync(FULL_MASK, value, 1)
        return value + cuda.shfl_xor_sync(FULL_MASK, value, 2)

    @cuda.jit(device=True, inline="always")
    def warp_broadcast(value, source):
        """Lane `source`'s value (float32), to every lane of the warp."""
        return cuda.shfl_sync(FULL_MASK, value, source)

    @cuda.jit(device=True, inline="always")
    def quad_max(value):
        """Maximum over this lane's quad (float32), as quad_sum."""
        value = max(value, cuda.shfl_xor_sync(FULL_MASK, value, 1))
        return max(value, cuda.shfl_xor_sync(FULL_MASK, value, 2))


@cuda.jit(device=True, inline="always")
def first_key(position, window):
    """The first key a token at `position` attends to: 0, or with a sliding window of `window`
    keys (window > 0) the first of the last `window`."""
    return max(0, position - window + 1) if window > 0 else 0


@cuda.jit(device=True, inline="always")
def _block_reduce(value, scratch, take_max):
    """Sum (or maximum, with take_max: a constant at every call site) over the block, through
    the warps' partial results in scratch; every thread gets it."""
    value = warp_max(value) if take_max else warp_sum(value)
    warp = cuda.threadIdx.x // WARP
    warps = (cuda.blockDim.x + WARP - 1) // WARP
    cuda.syncthreads()
    if cuda.threadIdx.x % WARP == 0:
        scratch[warp] = value
    cuda.syncthreads()
    result = scratch[0]
    for w in range(1, warps):
        result = max(result, scratch[w]) if take_max else result + scratch[w]
    cuda.syncthreads()
    return result


@cuda.jit(device=True, inline="always")
def block_sum(value, scratch):
    """Sum over the block; scratch is a float32 shared array of >= blockDim.x / 32 entries.
    Every thread gets the total."""
    return _block_reduce(value, scratch, False)


@cuda.jit(device=True, inline="always")
def block_max(value, scratch):
    """Maximum over the block (float32), as block_sum."""
    return _block_reduce(value, scratch, True)


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
