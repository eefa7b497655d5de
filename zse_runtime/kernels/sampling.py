"""Token sampling on the GPU, each sequence's vocabulary spread over many blocks; only the
chosen ids leave the device.

Implements zse_runtime/sampling.py's semantics without sorting the vocabulary:
  - the logits become unnormalised probabilities e = exp((x - max) / T) in [0, 1], in place;
  - every probability carries an integer mass floor(e * 2^40): sums of integers are exact, so
    they do not depend on the order threads and blocks add them in, and a seeded draw is the
    same at any launch geometry;
  - the top-k and top-p cut-offs are a threshold on e, found by radix selection over e's bit
    pattern (for non-negative floats, bit order is value order): a histogram of count and mass
    per 11-bit digit, the digit holding the k-th token (or the top_p-th unit of mass) chosen by
    a scan, then the next 10 bits within it, then the last 10;
  - the draw is an inverse-CDF walk in vocabulary order: each block sums the kept mass of its
    slice, one block per row scans those sums, and walks the slice holding the drawn unit.

A row's vocabulary is cut into `blocks` slices (the width of the [rows, blocks] workspace
arrays), one block each, so a batch-1 step uses ~40 SMs instead of one (geometry.py). Blocks of
a row meet only between launches, through global memory, so the work is a fixed sequence of
kernels (geometry.sampling_launches), every one taking the same arguments:
  sample_max       per slice: arg max; clears the row's histograms.
  sample_exp       the row's max from the slices'; greedy rows write their id and stop. Others
                   turn logits into e in place and add their slice into histogram 0 (first digit).
  sample_refine s  (s = 1..4) every block makes the same selection from histogram s-1 (a
                   deterministic scan of 2048 bins in L2), block 0 records the search state
                   s, and all add their slice's next-digit histogram (keys matching the digits
                   chosen so far) into histogram s. With both cut-offs: top-k levels 1, 2, then
                   top-p (its first digit from histogram 0), levels 1, 2. A search that is done
                   passes its state on.
  sample_sums      the last selection; each block's kept mass (keys >= the threshold).
  sample_pick      a block per row: the slice, then the token, that holds u * kept mass.
Shared-memory histograms hold a bin's mass as two uint32 words (64-bit shared atomics are CAS
loops on sm_75-sm_90; 32-bit adds are native); global ones take native 64-bit atomic adds.
"""

import math

from numba import cuda, float32, float64, int32, int64, uint32, uint64

from .geometry import SAMPLING_BINS as BINS
from .geometry import SAMPLING_HISTOGRAMS as HISTOGRAMS
from .geometry import SAMPLING_STATE_FIELDS as STATE_FIELDS
from .geometry import SAMPLING_THREADS as THREADS
from .memory import float_bits

MASS_SCALE = float32(2.0 ** 40)  # e <= 1: a vocabulary's total mass stays far below 2^64
# A key is e's 31 value bits (the sign is 0): digits of 11, 10 and 10 bits, most significant first.
DIGIT_BITS = (11, 10, 10)
DIGIT_SHIFTS = (20, 10, 0)
PREFIX_SHIFTS = (31, 20, 10)  # key >> PREFIX_SHIFTS[level]: the digits chosen before `level`
LAST_LEVEL = 2
# Passes over a slice read UNROLL values per iteration (_four_values).
UNROLL = 4
# The search state a refine step leaves for the next one: state[row, step, field], uint64.
SEARCH, LEVEL, PREFIX, TARGET, ABOVE, FLOOR, BEST = range(STATE_FIELDS)
TOP_K, TOP_P, DONE = 0, 1, 2


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
def _value(probs, b, i, end):
    return probs[b, i] if i < end else float32(0.0)


@cuda.jit(device=True, inline="always")
def _four_values(probs, b, i, step, end):
    """Values i, i + step, i + 2 step, i + 3 step of row b (0 past end): loads in flight
    together."""
    return (_value(probs, b, i, end), _value(probs, b, i + step, end),
            _value(probs, b, i + 2 * step, end), _value(probs, b, i + 3 * step, end))


@cuda.jit(device=True, inline="always")
def _mass(e):
    return uint64(e * MASS_SCALE)


@cuda.jit(device=True, inline="always")
def _slice(vocab, blocks, j):
    """[begin, end) of slice j of a row cut into `blocks` equal slices."""
    length = (vocab + blocks - 1) // blocks
    begin = min(vocab, j * length)
    return begin, min(vocab, begin + length)


@cuda.jit(device=True, inline="always")
def _cut_offs(top_k, top_p, b, vocab):
    k = top_k[b]
    return k > 0 and k < vocab, top_p[b] < float32(1.0)


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
def _shared_histogram():
    counts = cuda.shared.array(BINS, uint32)
    mass_low = cuda.shared.array(BINS, uint32)
    mass_high = cuda.shared.array(BINS, uint32)
    for j in range(cuda.threadIdx.x, BINS, cuda.blockDim.x):
        counts[j] = 0
        mass_low[j] = 0
        mass_high[j] = 0
    cuda.syncthreads()
    return counts, mass_low, mass_high


@cuda.jit(device=True, inline="always")
def _flush_histogram(counts, mass_low, mass_high, hist_count, hist_mass, b, h):
    """Adds a block's shared histogram into the row's global histogram h (non-empty bins)."""
    cuda.syncthreads()
    for j in range(cuda.threadIdx.x, BINS, cuda.blockDim.x):
        if counts[j] != 0:
            cuda.atomic.add(hist_count, (b, h, j), counts[j])
            cuda.atomic.add(hist_mass, (b, h, j),
                            (uint64(mass_high[j]) << uint64(32)) + uint64(mass_low[j]))


@cuda.jit(device=True, inline="always")
def _slice_histogram(probs, b, begin, end, level, prefix, hist_count, hist_mass, h):
    """Adds count and mass per digit `level` of this slice's keys whose earlier digits are
    `prefix` into histogram h."""
    counts, mass_low, mass_high = _shared_histogram()
    step = cuda.blockDim.x
    prefix_shift = PREFIX_SHIFTS[level]
    digit_shift = DIGIT_SHIFTS[level]
    digit_mask = (1 << DIGIT_BITS[level]) - 1
    for i in range(begin + cuda.threadIdx.x, end, step * UNROLL):
        values = _four_values(probs, b, i, step, end)
        for u in range(UNROLL):
            key = float_bits(values[u])
            if i + u * step < end and (key >> prefix_shift) == prefix:
                digit = (key >> digit_shift) & digit_mask
                cuda.atomic.add(counts, digit, 1)
                _add_mass(mass_low, mass_high, digit, _mass(values[u]))
    _flush_histogram(counts, mass_low, mass_high, hist_count, hist_mass, b, h)


@cuda.jit(device=True, inline="always")
def _select_digit(hist_count, hist_mass, b, h, by_count, target, fraction, scan, result):
    """The largest digit d of histogram h with (amount in digits > d) < target <= (amount in
    digits >= d), the amount being the count or the mass; a nonzero `fraction` replaces the
    target by max(1, ceil(fraction * total mass)). Every block of a row computes the same.
    Returns (d, count above d, mass above d, mass of d, the target used)."""
    tid = cuda.threadIdx.x
    per_thread = BINS // cuda.blockDim.x
    first = BINS - 1 - tid * per_thread  # each thread owns a run of digits, highest first
    count = uint64(0)
    mass = uint64(0)
    for q in range(per_thread):
        count += uint64(hist_count[b, h, first - q])
        mass += hist_mass[b, h, first - q]
    count_above, _ = _exclusive_scan(count, scan)
    mass_above, total_mass = _exclusive_scan(mass, scan)
    if fraction > float32(0.0):
        target = max(uint64(math.ceil(float64(fraction) * float64(total_mass))), uint64(1))
    if tid == 0:
        result[0] = 0
        result[1] = 0
        result[2] = 0
        result[3] = 0
    cuda.syncthreads()
    for q in range(per_thread):
        digit = first - q
        digit_count = uint64(hist_count[b, h, digit])
        digit_mass = hist_mass[b, h, digit]
        above = count_above if by_count else mass_above
        amount = digit_count if by_count else digit_mass
        if above < target and target <= above + amount:
            result[0] = digit
            result[1] = count_above
            result[2] = mass_above
            result[3] = digit_mass
        count_above += digit_count
        mass_above += digit_mass
    cuda.syncthreads()
    chosen = result[0], result[1], result[2], result[3], target
    cuda.syncthreads()
    return chosen


@cuda.jit(device=True, inline="always")
def _advance(hist_count, hist_mass, top_p, b, h, state, s, scan, result):
    """One selection of the search in state[b, s - 1] from histogram h; returns the new state
    (search, level, prefix, target, above, floor), the level being the digit the next
    histogram must count (or the search DONE). All uint64 but the level (int64), so that
    numba gives every return the same types."""
    search = state[b, s - 1, SEARCH]
    level = int64(state[b, s - 1, LEVEL])
    prefix = state[b, s - 1, PREFIX]
    target = state[b, s - 1, TARGET]
    above = state[b, s - 1, ABOVE]
    floor = state[b, s - 1, FLOOR]
    if search == DONE:
        return search, level, prefix, target, above, floor
    by_count = search == TOP_K
    # a top-p search on its own starts from the total mass (histogram 0's)
    fraction = top_p[b] if search == TOP_P and level == 0 else float32(0.0)
    digit, count_above, mass_above, digit_mass, target = _select_digit(
        hist_count, hist_mass, b, h, by_count, target, fraction, scan, result)
    target -= count_above if by_count else mass_above
    above += mass_above
    prefix = (prefix << uint64(DIGIT_BITS[level])) | digit
    if level < LAST_LEVEL:
        return search, level + int64(1), prefix, target, above, floor
    floor = prefix
    if search == TOP_K and top_p[b] < float32(1.0):
        # top-p over the top-k survivors, whose mass is that above the threshold plus the
        # threshold key's (its digit holds one key). Its first digit comes from histogram 0, all
        # keys: its target is at most the mass above the top-k threshold, so the key it finds is
        # at or above that threshold and no key below it can change the choice.
        kept = above + digit_mass
        target = max(uint64(math.ceil(float64(top_p[b]) * float64(kept))), uint64(1))
        digit, count_above, mass_above, digit_mass, target = _select_digit(
            hist_count, hist_mass, b, 0, False, target, float32(0.0), scan, result)
        return uint64(TOP_P), int64(1), digit, target - mass_above, mass_above, floor
    return uint64(DONE), level, prefix, target, above, floor


@cuda.jit(device=True, inline="always")
def _store_state(state, b, s, search, level, prefix, target, above, floor, best):
    if cuda.blockIdx.y == 0 and cuda.threadIdx.x == 0:
        state[b, s, SEARCH] = search
        state[b, s, LEVEL] = uint64(level)
        state[b, s, PREFIX] = prefix
        state[b, s, TARGET] = target
        state[b, s, ABOVE] = above
        state[b, s, FLOOR] = floor
        state[b, s, BEST] = best


@cuda.jit(device=True, inline="always")
def _block_arg_max(best, best_index):
    """The block's largest (value, index), the lowest index on ties."""
    tid = cuda.threadIdx.x
    best_values = cuda.shared.array(THREADS, float32)
    best_indices = cuda.shared.array(THREADS, int32)
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
    return best, best_index


# Every kernel takes the same arguments (geometry.sampling_launches):
#   logits [B, V] f32 (consumed); temperature, top_p [B] f32; top_k [B] i32; seeds, steps [B]
#   u64; out [B] i32; part_best [B, blocks] f32, part_index [B, blocks] i32; hist_count
#   [B, HISTOGRAMS, BINS] u32, hist_mass [B, HISTOGRAMS, BINS] u64; state [B, HISTOGRAMS + 1,
#   STATE_FIELDS] u64; block_mass [B, blocks] u64; s, the step. Grid (B, blocks), except
#   sample_pick: grid B. Blocks of a power of two threads, at most BINS.


def sample_max(logits, temperature, top_k, top_p, seeds, steps, out, part_best, part_index,
               hist_count, hist_mass, state, block_mass, s):
    b = cuda.blockIdx.x
    j = cuda.blockIdx.y
    tid = cuda.threadIdx.x
    step = cuda.blockDim.x
    blocks = part_best.shape[1]
    # this step's histograms start empty (nothing reads them before sample_exp)
    for i in range(j * step + tid, HISTOGRAMS * BINS, blocks * step):
        hist_count[b, i // BINS, i % BINS] = 0
        hist_mass[b, i // BINS, i % BINS] = 0
    begin, end = _slice(logits.shape[1], blocks, j)
    # arg max, lowest index on ties (NaN never compares greater, so it is never chosen)
    best = float32(-math.inf)
    best_index = begin  # as numpy's argmax when no value exceeds -inf (block 0 holds index 0)
    for i in range(begin + tid, end, step * UNROLL):
        values = _four_values(logits, b, i, step, end)
        for u in range(UNROLL):  # increasing indices: the first of equal values stays
            if values[u] > best and i + u * step < end:
                best = values[u]
                best_index = i + u * step
    best, best_index = _block_arg_max(best, best_index)
    if tid == 0:
        part_best[b, j] = best
        part_index[b, j] = best_index


def sample_exp(logits, temperature, top_k, top_p, seeds, steps, out, part_best, part_index,
               hist_count, hist_mass, state, block_mass, s):
    b = cuda.blockIdx.x
    j = cuda.blockIdx.y
    tid = cuda.threadIdx.x
    step = cuda.blockDim.x
    vocab = logits.shape[1]
    blocks = part_best.shape[1]
    best = float32(-math.inf)
    best_index = vocab
    for i in range(tid, blocks, step):  # slices in order: the first of equal maxima stays
        if part_best[b, i] > best:
            best = part_best[b, i]
            best_index = part_index[b, i]
    best, best_index = _block_arg_max(best, best_index)
    if best_index == vocab:  # no value exceeds -inf
        best_index = part_index[b, 0]
    if temperature[b] == 0.0:
        if j == 0 and tid == 0:
            out[b] = best_index
        return
    inv_temperature = float32(1.0) / temperature[b]
    # Logits become e = exp((x - max) / T) in place (they are consumed here), so later passes
    # compare and add; the map is monotone, so thresholds on e select the same tokens as
    # thresholds on x. NaN becomes 0. The first digit's histogram comes with this pass.
    begin, end = _slice(vocab, blocks, j)
    counts, mass_low, mass_high = _shared_histogram()
    for i in range(begin + tid, end, step * UNROLL):
        values = _four_values(logits, b, i, step, end)
        for u in range(UNROLL):
            if i + u * step < end:
                e = math.exp((values[u] - best) * inv_temperature)
                e = e if e >= float32(0.0) else float32(0.0)
                logits[b, i + u * step] = e
                digit = float_bits(e) >> DIGIT_SHIFTS[0]  # e <= 1: below 2^11
                cuda.atomic.add(counts, digit, 1)
                _add_mass(mass_low, mass_high, digit, _mass(e))
    _flush_histogram(counts, mass_low, mass_high, hist_count, hist_mass, b, 0)
    has_k, has_p = _cut_offs(top_k, top_p, b, vocab)
    search = uint64(TOP_K if has_k else (TOP_P if has_p else DONE))
    target = uint64(top_k[b]) if has_k else uint64(0)
    _store_state(state, b, 0, search, int64(0), uint64(0), target, uint64(0), uint64(0),
                 uint64(best_index))


def sample_refine(logits, temperature, top_k, top_p, seeds, steps, out, part_best, part_index,
                  hist_count, hist_mass, state, block_mass, s):
    if temperature[cuda.blockIdx.x] == 0.0:
        return
    b = cuda.blockIdx.x
    scan = cuda.shared.array(THREADS, uint64)
    result = cuda.shared.array(4, uint64)
    search, level, prefix, target, above, floor = _advance(
        hist_count, hist_mass, top_p, b, s - 1, state, s, scan, result)
    _store_state(state, b, s, search, level, prefix, target, above, floor, state[b, s - 1, BEST])
    if search != DONE:
        begin, end = _slice(logits.shape[1], part_best.shape[1], cuda.blockIdx.y)
        _slice_histogram(logits, b, begin, end, level, prefix, hist_count, hist_mass, s)


def sample_sums(logits, temperature, top_k, top_p, seeds, steps, out, part_best, part_index,
                hist_count, hist_mass, state, block_mass, s):
    if temperature[cuda.blockIdx.x] == 0.0:
        return
    b = cuda.blockIdx.x
    j = cuda.blockIdx.y
    tid = cuda.threadIdx.x
    step = cuda.blockDim.x
    scan = cuda.shared.array(THREADS, uint64)
    result = cuda.shared.array(4, uint64)
    search, level, prefix, target, above, floor = _advance(
        hist_count, hist_mass, top_p, b, s - 1, state, s, scan, result)
    # the last refine step leaves every search at its last level: this selection ends it
    _store_state(state, b, s, search, level, prefix, target, above, floor, state[b, s - 1, BEST])
    begin, end = _slice(logits.shape[1], part_best.shape[1], j)
    mass = uint64(0)
    for i in range(begin + tid, end, step * UNROLL):
        values = _four_values(logits, b, i, step, end)
        for u in range(UNROLL):
            if i + u * step < end and float_bits(values[u]) >= floor:
                mass += _mass(values[u])
    _, total = _exclusive_scan(mass, scan)
    if tid == 0:
        block_mass[b, j] = total


def sample_pick(logits, temperature, top_k, top_p, seeds, steps, out, part_best, part_index,
                hist_count, hist_mass, state, block_mass, s):
    """The first index whose running kept mass exceeds u * kept mass."""
    if temperature[cuda.blockIdx.x] == 0.0:
        return
    b = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    blocks = block_mass.shape[1]
    scan = cuda.shared.array(THREADS, uint64)
    result = cuda.shared.array(4, uint64)
    floor = state[b, s, FLOOR]
    mass = block_mass[b, tid] if tid < blocks else uint64(0)
    mass_before, kept_mass = _exclusive_scan(mass, scan)
    if tid == 0:
        result[0] = 0
        result[1] = 0
        result[2] = state[b, s, BEST]  # every probability underflowed, or rounding overshot
    cuda.syncthreads()
    target = uint64(float64(uniform(seeds[b], steps[b])) * float64(kept_mass))
    if tid < blocks and mass_before <= target and target < mass_before + mass:
        result[0] = uint64(tid)
        result[1] = mass_before
    cuda.syncthreads()
    if kept_mass != 0:
        # the slice holding the target, split into per-thread runs in vocabulary order
        begin, end = _slice(logits.shape[1], blocks, int32(result[0]))
        run = (end - begin + cuda.blockDim.x - 1) // cuda.blockDim.x
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


_SIGNATURE = ("void(float32[:, ::1], float32[::1], int32[::1], float32[::1], uint64[::1], "
              "uint64[::1], int32[::1], float32[:, ::1], int32[:, ::1], uint32[:, :, ::1], "
              "uint64[:, :, ::1], uint64[:, :, ::1], uint64[:, ::1], int32)")
KERNELS = {kernel.__name__: (kernel, _SIGNATURE)
           for kernel in (sample_max, sample_exp, sample_refine, sample_sums, sample_pick)}
