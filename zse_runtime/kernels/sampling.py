"""Token sampling on the GPU, one block per sequence; only the chosen ids leave the device.

Implements zse_runtime/sampling.py's semantics without sorting the vocabulary: the logits are
turned into unnormalised probabilities in place (one exp per token), the top-k and top-p
cut-offs are thresholds on them found by bisection (each step one block-wide compare-and-add
pass), and the draw is an inverse-CDF walk in vocabulary order with a counter-based random
number.
"""

import math

from numba import cuda, float32, int32, uint64

from .geometry import SAMPLING_THREADS as THREADS

BISECTION_STEPS = 40  # halves the logit range 2^40 times: far below float32 spacing


@cuda.jit(device=True, inline="always")
def splitmix64(value):
    value = value + uint64(0x9E3779B97F4A7C15)
    value = (value ^ (value >> uint64(30))) * uint64(0xBF58476D1CE4E5B9)
    value = (value ^ (value >> uint64(27))) * uint64(0x94D049BB133111EB)
    return value ^ (value >> uint64(31))


@cuda.jit(device=True, inline="always")
def uniform(seed, step):
    """Same bits as sampling.uniform: 24 random bits scaled to [0, 1)."""
    bits = splitmix64(seed ^ splitmix64(step))
    return float32(bits >> uint64(40)) / float32(16777216.0)


@cuda.jit(device=True, inline="always")
def _block_reduce_sum(value, scratch):
    tid = cuda.threadIdx.x
    scratch[tid] = value
    cuda.syncthreads()
    stride = cuda.blockDim.x // 2
    while stride > 0:
        if tid < stride:
            scratch[tid] += scratch[tid + stride]
        cuda.syncthreads()
        stride //= 2
    total = scratch[0]
    cuda.syncthreads()
    return total


# Passes over the vocabulary read 4 values per iteration, independent loads in flight together:
# one block walks 152064 values ~80 times per sampled token, and one load at a time left each
# pass waiting on memory latency (H200: 2.4 ms for 4 rows).
UNROLL = 4


@cuda.jit(device=True, inline="always")
def _value(probs, b, i):
    return probs[b, i] if i < probs.shape[1] else float32(0.0)


@cuda.jit(device=True, inline="always")
def _mass_above(probs, b, threshold, scratch):
    """Sum of the unnormalised probabilities >= threshold (all > 0, so padding 0s never count)."""
    partial = float32(0.0)
    step = cuda.blockDim.x
    for i in range(cuda.threadIdx.x, probs.shape[1], step * UNROLL):
        e0 = _value(probs, b, i)
        e1 = _value(probs, b, i + step)
        e2 = _value(probs, b, i + 2 * step)
        e3 = _value(probs, b, i + 3 * step)
        partial += ((e0 if e0 >= threshold else float32(0.0))
                    + (e1 if e1 >= threshold else float32(0.0))
                    + (e2 if e2 >= threshold else float32(0.0))
                    + (e3 if e3 >= threshold else float32(0.0)))
    return _block_reduce_sum(partial, scratch)


@cuda.jit(device=True, inline="always")
def _count_above(probs, b, threshold, scratch):
    """How many unnormalised probabilities are >= threshold (> 0, so padding never counts)."""
    partial = float32(0.0)
    step = cuda.blockDim.x
    for i in range(cuda.threadIdx.x, probs.shape[1], step * UNROLL):
        e0 = _value(probs, b, i)
        e1 = _value(probs, b, i + step)
        e2 = _value(probs, b, i + 2 * step)
        e3 = _value(probs, b, i + 3 * step)
        partial += ((float32(1.0) if e0 >= threshold else float32(0.0))
                    + (float32(1.0) if e1 >= threshold else float32(0.0))
                    + (float32(1.0) if e2 >= threshold else float32(0.0))
                    + (float32(1.0) if e3 >= threshold else float32(0.0)))
    return _block_reduce_sum(partial, scratch)


def sample_tokens(logits, temperature, top_k, top_p, seeds, steps, out):
    """logits [B, V] f32; temperature, top_p [B] f32; top_k [B] i32; seeds, steps [B] u64;
    out [B] i32. Grid B, block THREADS (a power of two)."""
    b = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    vocab = logits.shape[1]
    scratch = cuda.shared.array(THREADS, float32)
    index_scratch = cuda.shared.array(THREADS, int32)
    # arg max, lowest index on ties
    best = float32(-math.inf)
    best_index = vocab
    step = cuda.blockDim.x
    for i in range(tid, vocab, step * UNROLL):
        values = (_value(logits, b, i), _value(logits, b, i + step),
                  _value(logits, b, i + 2 * step), _value(logits, b, i + 3 * step))
        for u in range(UNROLL):  # increasing indices: the first of equal values stays
            if values[u] > best and i + u * step < vocab:
                best = values[u]
                best_index = i + u * step
    scratch[tid] = best
    index_scratch[tid] = best_index
    cuda.syncthreads()
    stride = cuda.blockDim.x // 2
    while stride > 0:
        if tid < stride:
            other = scratch[tid + stride]
            other_index = index_scratch[tid + stride]
            if other > scratch[tid] or (other == scratch[tid] and other_index < index_scratch[tid]):
                scratch[tid] = other
                index_scratch[tid] = other_index
        cuda.syncthreads()
        stride //= 2
    best = scratch[0]
    best_index = index_scratch[0]
    cuda.syncthreads()
    if temperature[b] == 0.0:
        if tid == 0:
            out[b] = best_index
        return
    inv_temperature = float32(1.0) / temperature[b]
    # Replace each logit by its unnormalised probability e = exp((x - max) / T), in place (the
    # logits are consumed here): every later pass is then a compare and an add, not an exp.
    # The map is monotone, so thresholds on e select the same tokens as thresholds on x; the
    # largest e is exactly 1.
    for i in range(tid, vocab, step * UNROLL):
        values = (_value(logits, b, i), _value(logits, b, i + step),
                  _value(logits, b, i + 2 * step), _value(logits, b, i + 3 * step))
        for u in range(UNROLL):
            if i + u * step < vocab:
                logits[b, i + u * step] = math.exp((values[u] - best) * inv_temperature)
    cuda.syncthreads()
    # top-k: the largest threshold that still keeps k tokens
    floor = float32(0.0)
    k = top_k[b]
    if k > 0 and k < vocab:
        lo = float32(0.0)
        hi = float32(1.0)
        for _ in range(BISECTION_STEPS):
            mid = lo + (hi - lo) * float32(0.5)
            if _count_above(logits, b, mid, scratch) >= float32(k):
                lo = mid
            else:
                hi = mid
        floor = lo
    # top-p: the largest threshold whose kept mass still reaches top_p of the total
    total = _mass_above(logits, b, floor, scratch)
    if top_p[b] < float32(1.0):
        lo = floor
        hi = float32(1.0)
        target_mass = top_p[b] * total
        for _ in range(BISECTION_STEPS):
            mid = lo + (hi - lo) * float32(0.5)
            if _mass_above(logits, b, mid, scratch) >= target_mass:
                lo = mid
            else:
                hi = mid
        floor = lo
        total = _mass_above(logits, b, floor, scratch)
    target = uniform(seeds[b], steps[b]) * total
    # inverse CDF in vocabulary order: contiguous chunks, a scan of chunk masses, one walk
    chunk = (vocab + cuda.blockDim.x - 1) // cuda.blockDim.x
    begin = tid * chunk
    end = min(vocab, begin + chunk)
    mass = float32(0.0)
    for i in range(begin, end, UNROLL):  # loads in flight together, sums in index order as
        values = (_value(logits, b, i), _value(logits, b, i + 1),  # the walk below adds them
                  _value(logits, b, i + 2), _value(logits, b, i + 3))
        for u in range(UNROLL):
            if i + u < end and values[u] >= floor:
                mass += values[u]
    scratch[tid] = mass
    index_scratch[tid] = -1
    cuda.syncthreads()
    if tid == 0:
        running = float32(0.0)
        for i in range(cuda.blockDim.x):
            here = scratch[i]
            scratch[i] = running  # exclusive prefix
            running += here
    cuda.syncthreads()
    running = scratch[tid]
    if running <= target and running + mass > target:
        for i in range(begin, end):
            e = logits[b, i]
            if e >= floor:
                running += e
                if running > target:
                    index_scratch[0] = i
                    break
    cuda.syncthreads()
    if tid == 0:
        chosen = index_scratch[0]
        out[b] = chosen if chosen >= 0 else best_index  # rounding left target past the end


KERNELS = {
    "sample_tokens": (sample_tokens, "void(float32[:, ::1], float32[::1], int32[::1], "
                                     "float32[::1], uint64[::1], uint64[::1], int32[::1])"),
}
