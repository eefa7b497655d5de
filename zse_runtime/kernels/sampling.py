"""Token sampling on the GPU, one block per sequence; only the chosen ids leave the device.

Implements zse_runtime/sampling.py's semantics without sorting the vocabulary:
  - the logits become unnormalised probabilities e = exp((x - max) / T) in [0, 1], in place;
  - every probability carries an integer mass floor(e * 2^40): sums of integers are exact, so
    they do not depend on the order threads add them in and a seeded draw is reproducible.
    Histogram bins hold a mass as two uint32 words (shared-memory 64-bit atomics are CAS loops
    on sm_75-sm_90; 32-bit adds are native), the carry of the low word added to the high one;
  - the top-k and top-p cut-offs are a threshold on e, found by radix selection over e's bit
    pattern (for non-negative floats, bit order is value order): a histogram of count and mass
    per 11-bit digit, the digit holding the k-th token (or the top_p-th unit of mass) chosen by
    a scan, then the next 10 bits within it, then the last 10. Three passes over the vocabulary
    find the exact threshold; bisection needed one pass per bit of precision;
  - the draw is an inverse-CDF walk in vocabulary order: each warp sums a contiguous chunk
    (coalesced), a block scan finds the warp chunk holding the drawn unit of mass, and the block
    splits that chunk into per-thread runs, scans them and walks the one run that holds it.
"""

import math

from numba import cuda, float32, float64, int32, uint32, uint64

from .geometry import SAMPLING_THREADS as THREADS
from .memory import float_bits

MASS_SCALE = float32(2.0 ** 40)  # e <= 1: a vocabulary's total mass stays far below 2^64
BINS = 2048  # the widest digit: 11 bits
# A key is e's 31 value bits (the sign is 0): digits of 11, 10 and 10 bits, most significant first.
DIGIT_BITS = (11, 10, 10)
DIGIT_SHIFTS = (20, 10, 0)
PREFIX_SHIFTS = (31, 20, 10)  # key >> PREFIX_SHIFTS[level]: the digits chosen before `level`
# Passes over the vocabulary read 4 values per iteration, independent loads in flight together.
UNROLL = 4


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
def _value(probs, b, i):
    return probs[b, i] if i < probs.shape[1] else float32(0.0)


@cuda.jit(device=True, inline="always")
def _mass(e):
    return uint64(e * MASS_SCALE)


@cuda.jit(device=True, inline="always")
def _add_mass(mass_low, mass_high, digit, mass):
    """Bins' masses are uint64 split into uint32 halves: add `mass` to bin `digit`, exactly."""
    low = uint32(mass & uint64(0xFFFFFFFF))
    high = uint32(mass >> uint64(32))
    old = cuda.atomic.add(mass_low, digit, low)
    if uint32(old + low) < old:  # the low word wrapped around
        high += uint32(1)
    if high != 0:
        cuda.atomic.add(mass_high, digit, high)


@cuda.jit(device=True, inline="always")
def _bin_mass(mass_low, mass_high, digit):
    return (uint64(mass_high[digit]) << uint64(32)) + uint64(mass_low[digit])


@cuda.jit(device=True, inline="always")
def _exclusive_scan(value, scan):
    """(sum of `value` over the threads before this one, sum over all threads); `scan` is a
    uint64 shared array of blockDim.x entries. Hillis-Steele in shared memory: the simulator,
    which runs every kernel in the tests, has no warp shuffles."""
    tid = cuda.threadIdx.x
    scan[tid] = value
    cuda.syncthreads()
    offset = 1
    while offset < cuda.blockDim.x:
        add = scan[tid - offset] if tid >= offset else uint64(0)
        cuda.syncthreads()
        scan[tid] += add
        cuda.syncthreads()
        offset *= 2
    inclusive = scan[tid]
    total = scan[cuda.blockDim.x - 1]
    cuda.syncthreads()
    return inclusive - value, total


@cuda.jit(device=True, inline="always")
def _clear(counts, mass_low, mass_high):
    for j in range(cuda.threadIdx.x, BINS, cuda.blockDim.x):
        counts[j] = 0
        mass_low[j] = 0
        mass_high[j] = 0
    cuda.syncthreads()


@cuda.jit(device=True, inline="always")
def _histogram(probs, b, level, prefix, counts, mass_low, mass_high):
    """Count and mass per digit `level` of the keys whose earlier digits are `prefix`."""
    _clear(counts, mass_low, mass_high)
    step = cuda.blockDim.x
    prefix_shift = PREFIX_SHIFTS[level]
    digit_shift = DIGIT_SHIFTS[level]
    digit_mask = (1 << DIGIT_BITS[level]) - 1
    for i in range(cuda.threadIdx.x, probs.shape[1], step * UNROLL):
        values = (_value(probs, b, i), _value(probs, b, i + step),
                  _value(probs, b, i + 2 * step), _value(probs, b, i + 3 * step))
        for u in range(UNROLL):
            key = float_bits(values[u])
            if i + u * step < probs.shape[1] and (key >> prefix_shift) == prefix:
                digit = (key >> digit_shift) & digit_mask
                cuda.atomic.add(counts, digit, 1)
                _add_mass(mass_low, mass_high, digit, _mass(values[u]))
    cuda.syncthreads()


@cuda.jit(device=True, inline="always")
def _select_digit(counts, mass_low, mass_high, by_count, target, scan, result):
    """The largest digit d with (amount in digits > d) < target <= (amount in digits >= d), the
    amount being the count or the mass. Returns (d, count above d, mass above d, total mass)."""
    tid = cuda.threadIdx.x
    per_thread = BINS // cuda.blockDim.x
    first = BINS - 1 - tid * per_thread  # each thread owns a run of digits, highest first
    count = uint64(0)
    mass = uint64(0)
    for q in range(per_thread):
        count += uint64(counts[first - q])
        mass += _bin_mass(mass_low, mass_high, first - q)
    count_above, _ = _exclusive_scan(count, scan)
    mass_above, total_mass = _exclusive_scan(mass, scan)
    if tid == 0:
        result[0] = 0
        result[1] = 0
        result[2] = 0
    cuda.syncthreads()
    for q in range(per_thread):
        digit = first - q
        digit_mass = _bin_mass(mass_low, mass_high, digit)
        above = count_above if by_count else mass_above
        amount = uint64(counts[digit]) if by_count else digit_mass
        if above < target and target <= above + amount:
            result[0] = digit
            result[1] = count_above
            result[2] = mass_above
        count_above += uint64(counts[digit])
        mass_above += digit_mass
    cuda.syncthreads()
    chosen = result[0], result[1], result[2], total_mass
    cuda.syncthreads()
    return chosen


@cuda.jit(device=True, inline="always")
def _radix_select(probs, b, by_count, target, histogram_ready, counts, mass_low, mass_high, scan,
                  result):
    """The largest key K whose keys >= K reach `target` (a count or a mass), and the mass of
    the keys >= K. The first digit's histogram is built unless ready. A top-p search after a
    top-k cut needs no floor: its target is at most the mass above the top-k threshold, so the
    key it finds is at or above that threshold."""
    prefix = uint32(0)
    mass_above = uint64(0)
    digit_mass = uint64(0)
    for level in range(3):
        if level > 0 or not histogram_ready:
            _histogram(probs, b, level, prefix, counts, mass_low, mass_high)
        digit, count_above, level_mass_above, _ = _select_digit(
            counts, mass_low, mass_high, by_count, target, scan, result)
        target -= count_above if by_count else level_mass_above
        mass_above += level_mass_above
        digit_mass = _bin_mass(mass_low, mass_high, digit)
        prefix = (prefix << uint32(DIGIT_BITS[level])) | uint32(digit)
        cuda.syncthreads()
    return prefix, mass_above + digit_mass  # the last digit holds one key: all of it is kept


def sample_tokens(logits, temperature, top_k, top_p, seeds, steps, out):
    """logits [B, V] f32; temperature, top_p [B] f32; top_k [B] i32; seeds, steps [B] u64;
    out [B] i32. Grid B, block THREADS (a power of two, at most BINS)."""
    b = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    vocab = logits.shape[1]
    best_values = cuda.shared.array(THREADS, float32)
    best_indices = cuda.shared.array(THREADS, int32)
    counts = cuda.shared.array(BINS, uint32)
    mass_low = cuda.shared.array(BINS, uint32)
    mass_high = cuda.shared.array(BINS, uint32)
    scan = cuda.shared.array(THREADS, uint64)
    result = cuda.shared.array(3, uint64)
    # arg max, lowest index on ties (NaN never compares greater, so it is never chosen)
    best = float32(-math.inf)
    best_index = 0  # as numpy's argmax when no value exceeds -inf
    step = cuda.blockDim.x
    for i in range(tid, vocab, step * UNROLL):
        values = (_value(logits, b, i), _value(logits, b, i + step),
                  _value(logits, b, i + 2 * step), _value(logits, b, i + 3 * step))
        for u in range(UNROLL):  # increasing indices: the first of equal values stays
            if values[u] > best and i + u * step < vocab:
                best = values[u]
                best_index = i + u * step
    best_values[tid] = best
    best_indices[tid] = best_index
    cuda.syncthreads()
    stride = cuda.blockDim.x // 2
    while stride > 0:
        if tid < stride:
            other = best_values[tid + stride]
            other_index = best_indices[tid + stride]
            if other > best_values[tid] or (other == best_values[tid]
                                            and other_index < best_indices[tid]):
                best_values[tid] = other
                best_indices[tid] = other_index
        cuda.syncthreads()
        stride //= 2
    best = best_values[0]
    best_index = best_indices[0]
    cuda.syncthreads()
    if temperature[b] == 0.0:
        if tid == 0:
            out[b] = best_index
        return
    inv_temperature = float32(1.0) / temperature[b]
    # Logits become e = exp((x - max) / T) in place (they are consumed here), so later passes
    # compare and add; the map is monotone, so thresholds on e select the same tokens as
    # thresholds on x. NaN becomes 0. The first digit's histogram comes with this pass.
    _clear(counts, mass_low, mass_high)
    for i in range(tid, vocab, step * UNROLL):
        values = (_value(logits, b, i), _value(logits, b, i + step),
                  _value(logits, b, i + 2 * step), _value(logits, b, i + 3 * step))
        for u in range(UNROLL):
            if i + u * step < vocab:
                e = math.exp((values[u] - best) * inv_temperature)
                e = e if e >= float32(0.0) else float32(0.0)
                logits[b, i + u * step] = e
                digit = float_bits(e) >> DIGIT_SHIFTS[0]  # e <= 1: below 2^11
                cuda.atomic.add(counts, digit, 1)
                _add_mass(mass_low, mass_high, digit, _mass(e))
    cuda.syncthreads()
    floor = uint32(0)
    k = top_k[b]
    if k > 0 and k < vocab:
        floor, kept_mass = _radix_select(logits, b, True, uint64(k), True, counts, mass_low,
                                         mass_high, scan, result)
        histogram_ready = False
    else:
        _, _, _, kept_mass = _select_digit(counts, mass_low, mass_high, False, uint64(0), scan,
                                           result)
        histogram_ready = True
    if top_p[b] < float32(1.0):
        target = uint64(math.ceil(float64(top_p[b]) * float64(kept_mass)))
        floor, kept_mass = _radix_select(logits, b, False, max(target, uint64(1)),
                                         histogram_ready, counts, mass_low, mass_high, scan,
                                         result)
    if kept_mass == 0:  # every probability underflowed: nothing to draw from
        if tid == 0:
            out[b] = best_index
        return
    # the first index whose running kept mass exceeds u * kept mass
    target = uint64(float64(uniform(seeds[b], steps[b])) * float64(kept_mass))
    lane = tid % 32
    warp = tid // 32
    warps = cuda.blockDim.x // 32
    chunk = (vocab + warps - 1) // warps  # each warp sums a contiguous chunk, coalesced
    begin = warp * chunk
    end = min(vocab, begin + chunk)
    mass = uint64(0)
    for i in range(begin + lane, end, 32 * UNROLL):
        values = (_value(logits, b, i), _value(logits, b, i + 32),
                  _value(logits, b, i + 64), _value(logits, b, i + 96))
        for u in range(UNROLL):
            if i + 32 * u < end and float_bits(values[u]) >= floor:
                mass += _mass(values[u])
    mass_before, _ = _exclusive_scan(mass, scan)
    if lane == 0:  # the mass before each warp's chunk: lanes scan in thread order
        scan[warp] = mass_before
    if tid == 0:
        result[0] = 0
        result[1] = 0
        result[2] = uint64(best_index)  # only if rounding left the target past the end
    cuda.syncthreads()
    if tid < warps:
        after = scan[tid + 1] if tid + 1 < warps else kept_mass
        if scan[tid] <= target and target < after:
            result[0] = uint64(tid)
            result[1] = scan[tid]
    cuda.syncthreads()
    begin = int32(result[0]) * chunk  # the warp chunk holding the target, split into runs
    end = min(vocab, begin + chunk)
    run = (chunk + cuda.blockDim.x - 1) // cuda.blockDim.x
    run_begin = min(end, begin + tid * run)
    run_end = min(end, run_begin + run)
    mass = uint64(0)
    for i in range(run_begin, run_end):
        e = logits[b, i]
        if float_bits(e) >= floor:
            mass += _mass(e)
    before, _ = _exclusive_scan(mass, scan)
    running = result[1] + before
    if running <= target and target < running + mass:
        for i in range(run_begin, run_end):
            e = logits[b, i]
            if float_bits(e) >= floor:
                running += _mass(e)
                if running > target:
                    result[2] = uint64(i)
                    break
    cuda.syncthreads()
    if tid == 0:
        out[b] = int32(result[2])


KERNELS = {
    "sample_tokens": (sample_tokens, "void(float32[:, ::1], float32[::1], int32[::1], "
                                     "float32[::1], uint64[::1], uint64[::1], int32[::1])"),
}
