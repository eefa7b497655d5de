"""Grouped-query attention over the KV cache, split along the keys (flash-decoding).

A block (token x head, partition) runs an online softmax over one partition of the token's keys
(causal, optionally a sliding window) and writes the partition's (max, sum, unnormalised output)
to a workspace. Each warp takes 32 keys at a time, a key per lane: a lane reads its key's row
with 16-byte loads and computes the score against q (in shared memory), the batch's softmax
weights go through shared memory, then every lane accumulates its slice of the head dimension
over the 32 value rows. A lane issues a round of key loads (or 8 value rows)
before it uses any, so a warp waits for memory a few times per 32 keys, not once per key.
Splitting keeps all SMs busy for long contexts, where one block per head would use 28 of 132.

attention_decode (decode steps): the last of a token-head's partition blocks to finish (a ticket
per token-head, taken after a memory fence) merges the partitions into the output and its GEMV
digits, in the same launch; a token whose keys fit in one partition has nothing to merge, and
its block writes the output itself (no workspace, fence or ticket).
attention_partial_prefill + attention_combine (prompt chunks that attention_tiled does not
take): the merge is a second launch. The two partition passes differ in the words of a key row
loaded per round (`_make_partial`).

attention_decode_grouped (decode batches): a block per (token x KV head, partition) scores each
key against all the query heads that share the KV head, so a key or value row is read once per
group instead of once per head, and merges with a warp per head. Per block it does the group's
work with the same 4 warps, so it only pays where blocks are plenty (geometry.py).
"""

import math

from numba import cuda, float32, int32, uint32

from .common import (WARP, block_max, block_sum, first_key, warp_broadcast, warp_max,
                     warp_sum)
from .geometry import (ATTENTION_DECODE_KEY_WORDS, ATTENTION_GROUPED_KEY_WORDS,
                       ATTENTION_PREFILL_KEY_WORDS)
from .geometry import ATTENTION_MAX_GROUP as MAX_GROUP
from .geometry import ATTENTION_MAX_HEAD_DIM as MAX_DIM
from .geometry import ATTENTION_THREADS as THREADS
from .grid_dependency import enter_as_dependent, launch_dependents
from .memory import halves_as_floats, load, load_l2_f32, load_u32x4
from .quantize_activations import quantize_lane

WARPS = THREADS // WARP
MAX_WORDS = MAX_DIM // 2  # a key row as pairs of halves (head_dim <= 128, a multiple of 8)
MAX_WORDS_PER_LANE = MAX_WORDS // WARP  # a lane's value words
MAX_DIMS_PER_LANE = 2 * MAX_WORDS_PER_LANE
# value rows a lane loads before it uses any (H200, 2026-11-30: all 32 of a warp's rows saved
# 0.3-2 us per layer up to 1024 keys but cost 12 us at 4096, at 176 registers instead of 128)
VALUE_ROWS = 8
MERGE_LOADS = 4  # partitions' values a thread of the merge loads before it adds any
# the grouped merge's lanes hold 4 dims each: 2 partitions' values in flight (H200, 2026-11-30:
# 4 cost the grouped kernel 2-55 us more from 1 to 32 sequences)
GROUP_MERGE_LOADS = 2


@cuda.jit(device=True, inline="always")
def _partition_keys(position, window, partition, part):
    """Keys [lo, hi) of partition `part` of a token at `position`: empty (lo >= hi) past the
    token's keys, as a decode graph launches partitions for the longest context."""
    start = first_key(position, window)
    lo = start + part * partition
    return lo, min(position + 1, lo + partition)


@cuda.jit(device=True, inline="always")
def _load_key_words(keys, k_words, row, done, count, words):
    """keys[0:count] = words done .. done + count - 1 of key row `row` (those below `words`),
    16 bytes per load, all in flight before any is used."""
    for w in range(0, count, 4):
        if done + w < words:
            keys[w], keys[w + 1], keys[w + 2], keys[w + 3] = load_u32x4(k_words, row, done + w)


@cuda.jit(device=True, inline="always")
def _load_value_rows(values, v_words, cache_row, batch, rows, last, lane, words):
    """values[k] = this lane's words of value row cache_row + batch + min(rows + k, last),
    VALUE_ROWS rows' loads in flight together (rows past `last` repeat it, at weight 0)."""
    for k in range(VALUE_ROWS):
        row = cache_row + batch + min(rows + k, last)
        for i in range(MAX_WORDS_PER_LANE):
            values[k, i] = uint32(0)
            if lane + WARP * i < words:
                values[k, i] = load(v_words, row, lane + WARP * i)


@cuda.jit(device=True, inline="always")
def _write_partition(item, dim, warp_best, warp_total, warp_acc, part_max, part_sum, part_acc):
    """The partition's (max, sum, unnormalised output) of token-head `item` from its warps'
    (warp_best [WARPS], warp_total [WARPS], warp_acc [WARPS, D]), rescaled to the largest
    maximum. Every thread of the block calls this."""
    part = cuda.blockIdx.y
    merged = float32(-math.inf)
    for w in range(WARPS):
        merged = max(merged, warp_best[w])
    if cuda.threadIdx.x == 0:
        merged_total = float32(0.0)
        for w in range(WARPS):
            if warp_best[w] > -math.inf:
                merged_total += warp_total[w] * math.exp(warp_best[w] - merged)
        part_max[item, part] = merged
        part_sum[item, part] = merged_total
    for d in range(cuda.threadIdx.x, dim, THREADS):
        value = float32(0.0)
        for w in range(WARPS):
            if warp_best[w] > -math.inf:
                value += warp_acc[w, d] * math.exp(warp_best[w] - merged)
        part_acc[item, part, d] = value


def _make_partial(key_words):
    """The partition pass with `key_words` words of a key row loaded per round: all 64 (one
    wait for memory per batch of keys) for decode, where a step has few blocks and latency
    is all; 16 for prefill, where 56 registers instead of 127 (sm_90) let 9 blocks share an SM
    instead of 4 (thousands of token x head blocks, each mostly waiting on memory)."""

    @cuda.jit(device=True, inline="always")
    def partial(q, k_words, v_words, kv_heads, length, positions, slots, window, partition,
                part_max, warp_best, warp_total, warp_acc):
        """q [T, H * D] f32 (rotated); k_words, v_words [S * KVH * L, D / 2] u32: the f16 caches
        [S, KVH, L, D] as pairs of halves, with kv_heads = KVH and length = L; positions, slots [T]
        i32; window: 0, or attend to keys > position - window; partition: keys per partition;
        part_max [T * H, P] f32 (its shape gives H and P). Grid (T * H, P), block THREADS.
        Leaves each warp's (max, sum, unnormalised output) in the shared warp_best, warp_total
        [WARPS] and warp_acc [WARPS, MAX_DIM] (declared by the kernel) for `_write_partition`
        or `_write_output`. Returns whether the block's partition holds keys (block-uniform)."""
        item = cuda.blockIdx.x
        part = cuda.blockIdx.y
        heads = part_max.shape[0] // q.shape[0]
        words = k_words.shape[1]
        dim = 2 * words
        t = item // heads
        h = item % heads
        kv = h // (heads // kv_heads)
        lo, hi = _partition_keys(positions[t], window, partition, part)
        if lo >= hi:  # nothing to write: the merge reads only used partitions
            return False
        lane = cuda.threadIdx.x % WARP
        warp = cuda.threadIdx.x // WARP
        cache_row = (slots[t] * kv_heads + kv) * length  # key j is row cache_row + j
        q_scaled = cuda.shared.array(MAX_DIM, float32)
        weights = cuda.shared.array((WARPS, WARP), float32)
        scale = float32(1.0) / math.sqrt(float32(dim))
        for d in range(cuda.threadIdx.x, dim, THREADS):
            q_scaled[d] = q[t, h * dim + d] * scale
        cuda.syncthreads()
        acc = cuda.local.array(MAX_DIMS_PER_LANE, float32)  # dims 2 (lane + 32 i) + {0, 1}
        for i in range(MAX_DIMS_PER_LANE):
            acc[i] = float32(0.0)
        best = float32(-math.inf)
        total = float32(0.0)
        keys = cuda.local.array(key_words, uint32)
        values = cuda.local.array((VALUE_ROWS, MAX_WORDS_PER_LANE), uint32)
        for first in range(lo, hi, WARPS * WARP):  # same trip count in every warp: barriers stay uniform
            batch = first + warp * WARP
            score = float32(-math.inf)
            if batch + lane < hi:
                # key_words of the key row in flight, then their part of the dot product
                dot = float32(0.0)
                for done in range(0, MAX_WORDS, key_words):
                    _load_key_words(keys, k_words, cache_row + batch + lane, done, key_words, words)
                    for w in range(key_words):
                        if done + w < words:
                            a, b = halves_as_floats(keys[w])
                            dot += a * q_scaled[2 * (done + w)] + b * q_scaled[2 * (done + w) + 1]
                score = dot
            new_best = max(best, warp_max(score))
            weight = math.exp(score - new_best) if score > -math.inf else float32(0.0)
            weights[warp, lane] = weight
            cuda.syncthreads()
            if batch < hi and new_best > -math.inf:  # this warp has keys (uniform over the warp)
                correction = math.exp(best - new_best) if best > -math.inf else float32(0.0)
                total *= correction
                for i in range(MAX_DIMS_PER_LANE):
                    acc[i] *= correction
                last = hi - 1 - batch  # keys past the last are read clamped to it, at weight 0
                for group in range(0, WARP, VALUE_ROWS):
                    _load_value_rows(values, v_words, cache_row, batch, group, last, lane, words)
                    for k in range(VALUE_ROWS):
                        weight = weights[warp, group + k]
                        total += weight
                        for i in range(MAX_WORDS_PER_LANE):
                            a, b = halves_as_floats(values[k, i])
                            acc[2 * i] += weight * a
                            acc[2 * i + 1] += weight * b
            best = new_best
            cuda.syncthreads()
        # the warps' results, for the caller to merge
        if lane == 0:
            warp_best[warp] = best
            warp_total[warp] = total
        for i in range(MAX_WORDS_PER_LANE):
            if lane + WARP * i < words:
                warp_acc[warp, 2 * (lane + WARP * i)] = acc[2 * i]
                warp_acc[warp, 2 * (lane + WARP * i) + 1] = acc[2 * i + 1]
        cuda.syncthreads()
        return True

    return partial


@cuda.jit(device=True, inline="always")
def _used_partitions(position, window, partition, launched):
    """Partitions holding a token's keys (the first ones; a decode graph launches more)."""
    return min(launched, (position - first_key(position, window) + partition) // partition)


@cuda.jit(device=True, inline="always")
def _merge(item, t, h, parts, part_max, part_sum, part_acc, out, quantize, xq, xstep, xsum):
    """out[t, h * D:(h + 1) * D] from the token-head's first `parts` partitions; if quantize,
    also as the o_proj GEMV's digits xq, xstep, xsum (quantize_activations.py; D a multiple of
    32). The partitions are read from L2: other blocks of the same launch may have written them."""
    dim = part_acc.shape[2]
    scratch = cuda.shared.array(WARPS, float32)
    scales = cuda.shared.array(THREADS, float32)  # one chunk of partitions' weights
    # one round of loads for the maxima and the sums (a thread's partitions, at most one each
    # unless there are more than THREADS): a running sum rescaled to the running max
    own_best = float32(-math.inf)
    own_total = float32(0.0)
    first_best = float32(-math.inf)  # partition threadIdx.x's, for the weights below
    for p in range(cuda.threadIdx.x, parts, THREADS):
        part_best = load_l2_f32(part_max, (item, p))
        part_total = load_l2_f32(part_sum, (item, p))
        if p < THREADS:
            first_best = part_best
        if part_best > own_best:
            own_total = own_total * math.exp(own_best - part_best) if own_best > -math.inf \
                else float32(0.0)
            own_best = part_best
        if part_best > -math.inf:
            own_total += part_total * math.exp(part_best - own_best)
    best = block_max(own_best, scratch)
    own_total = own_total * math.exp(own_best - best) if own_best > -math.inf else float32(0.0)
    total = block_sum(own_total, scratch)
    for start in range(0, dim, THREADS):  # block-uniform trip count, for quantize_lane
        d = start + cuda.threadIdx.x
        value = float32(0.0)
        for first in range(0, parts, THREADS):
            p = first + cuda.threadIdx.x
            cuda.syncthreads()
            scales[cuda.threadIdx.x] = float32(0.0)
            if p < parts:
                part_best = first_best if first == 0 else load_l2_f32(part_max, (item, p))
                if part_best > -math.inf:
                    scales[cuda.threadIdx.x] = math.exp(part_best - best) / total
            cuda.syncthreads()
            chunk = min(THREADS, parts - first)
            for k in range(0, chunk, MERGE_LOADS):
                # MERGE_LOADS partitions' values in flight, then added in partition order
                loaded = cuda.local.array(MERGE_LOADS, float32)
                for u in range(MERGE_LOADS):
                    loaded[u] = float32(0.0)
                    if k + u < chunk and d < dim:
                        loaded[u] = load_l2_f32(part_acc, (item, first + k + u, d))
                for u in range(MERGE_LOADS):
                    if k + u < chunk:
                        weight = scales[k + u]
                        if weight != float32(0.0) and d < dim:
                            value += loaded[u] * weight
        if d < dim:
            out[t, h * dim + d] = value
        if quantize:
            quantize_lane(value, h * dim + d, d < dim, xq, xstep, xsum, t)


_partial_decode = _make_partial(ATTENTION_DECODE_KEY_WORDS)
_partial_prefill = _make_partial(ATTENTION_PREFILL_KEY_WORDS)


def attention_partial_prefill(q, k_words, v_words, kv_heads, length, positions, slots, window,
                              partition, part_max, part_sum, part_acc):
    """The partition pass of a prompt chunk (`_make_partial` has the arguments; part_sum [T * H,
    P] f32, part_acc [T * H, P, D] f32 receive each partition's sum and output); grid (T * H, P)."""
    warp_best = cuda.shared.array(WARPS, float32)
    warp_total = cuda.shared.array(WARPS, float32)
    warp_acc = cuda.shared.array((WARPS, MAX_DIM), float32)
    if _partial_prefill(q, k_words, v_words, kv_heads, length, positions, slots, window, partition,
                        part_max, warp_best, warp_total, warp_acc):
        _write_partition(cuda.blockIdx.x, 2 * k_words.shape[1], warp_best, warp_total, warp_acc,
                         part_max, part_sum, part_acc)


def attention_combine(part_max, part_sum, part_acc, positions, window, partition, out, quantize,
                      xq, xstep, xsum):
    """Merge partitions after attention_partial_prefill: out [T, H * D] f32, digits as
    `_merge`'s. positions, window and partition as the partition pass's. Grid T * H, block
    THREADS."""
    launch_dependents()  # the GEMV that reads the output may start (grid_dependency.py)
    item = cuda.blockIdx.x
    heads = part_max.shape[0] // out.shape[0]
    t = item // heads
    parts = _used_partitions(positions[t], window, partition, part_max.shape[1])
    _merge(item, t, item % heads, parts, part_max, part_sum, part_acc, out, quantize, xq, xstep,
           xsum)


def attention_decode(q, k_words, v_words, kv_heads, length, positions, slots, window, partition,
                     part_max, part_sum, part_acc, tickets, out, quantize, xq, xstep, xsum):
    """A decode step's attention in one launch: the partition pass (`_make_partial` has its
    arguments), then the output (`_merge`'s outputs): written by the block itself when the
    token's keys fit in one partition, else merged from the partitions by the token-head's last
    block to finish. tickets [T * H] i32, zero between launches (the merging block resets its
    entry). Grid (T * H, P), block THREADS."""
    enter_as_dependent()  # the GEMV that reads the output may start (grid_dependency.py)
    warp_best = cuda.shared.array(WARPS, float32)
    warp_total = cuda.shared.array(WARPS, float32)
    warp_acc = cuda.shared.array((WARPS, MAX_DIM), float32)
    if not _partial_decode(q, k_words, v_words, kv_heads, length, positions, slots, window,
                           partition, part_max, warp_best, warp_total, warp_acc):
        return
    item = cuda.blockIdx.x
    heads = part_max.shape[0] // q.shape[0]
    t = item // heads
    dim = 2 * k_words.shape[1]
    parts = _used_partitions(positions[t], window, partition, part_max.shape[1])
    if parts == 1:  # no other block holds keys of this token-head: nothing to merge
        _write_output(t, item % heads, dim, warp_best, warp_total, warp_acc, out, quantize, xq,
                      xstep, xsum)
        return
    _write_partition(item, dim, warp_best, warp_total, warp_acc, part_max, part_sum, part_acc)
    if _last_to_finish(parts, tickets):
        _merge(item, t, item % heads, parts, part_max, part_sum, part_acc, out, quantize, xq,
               xstep, xsum)


@cuda.jit(device=True, inline="always")
def _write_output(t, h, dim, warp_best, warp_total, warp_acc, out, quantize, xq, xstep, xsum):
    """out[t, h * D:(h + 1) * D] (and its digits, as `_merge`'s) of a token-head whose keys all
    lie in this block's partition, from its warps' results: `_write_partition`'s rescaling, then
    `_merge`'s normalisation of a single partition (weight exp(0) / sum), so the output equals
    the one a write and a merge would give, bit for bit. Every thread of the block calls this."""
    merged = float32(-math.inf)
    for w in range(WARPS):
        merged = max(merged, warp_best[w])
    total = float32(0.0)
    for w in range(WARPS):
        if warp_best[w] > -math.inf:
            total += warp_total[w] * math.exp(warp_best[w] - merged)
    weight = float32(1.0) / total
    for start in range(0, dim, THREADS):  # block-uniform trip count, for quantize_lane
        d = start + cuda.threadIdx.x
        value = float32(0.0)
        if d < dim:
            for w in range(WARPS):
                if warp_best[w] > -math.inf:
                    value += warp_acc[w, d] * math.exp(warp_best[w] - merged)
            value *= weight
            out[t, h * dim + d] = value
        if quantize:
            quantize_lane(value, h * dim + d, d < dim, xq, xstep, xsum, t)


@cuda.jit(device=True, inline="always")
def _last_to_finish(parts, tickets):
    """Whether this block is the last of the `parts` partition blocks of its grid row
    (blockIdx.x) to finish; that one resets the row's ticket for the next launch. Every thread
    of the block calls this, after writing its partition."""
    merges = cuda.shared.array(1, int32)
    cuda.threadfence()  # this block's partition is visible device-wide before its ticket
    cuda.syncthreads()
    if cuda.threadIdx.x == 0:
        merges[0] = int32(cuda.atomic.add(tickets, cuda.blockIdx.x, 1) == parts - 1)
    cuda.syncthreads()
    if merges[0] == 0:
        return False
    if cuda.threadIdx.x == 0:
        tickets[cuda.blockIdx.x] = 0
    return True


@cuda.jit(device=True, inline="always")
def _grouped_partial(q, k_words, v_words, kv_heads, length, positions, slots, window, partition,
                     part_max, part_sum, part_acc, out, quantize, xq, xstep, xsum):
    """The partition pass (`_make_partial`'s) for the H / KVH <= MAX_GROUP query heads that
    share a KV head: each key and value row is read once for all of them (instead of once per
    head) and scored against each. Arguments as attention_decode's; grid (T * KVH, P), block
    THREADS. Writes the heads' partitions, or their outputs (`_write_output`) when the token's
    keys fit in one partition. Returns whether partitions were written, for the merge
    (block-uniform)."""
    part = cuda.blockIdx.y
    heads = part_max.shape[0] // q.shape[0]
    words = k_words.shape[1]
    dim = 2 * words
    members = heads // kv_heads  # query heads of this block: first_head + g
    t = cuda.blockIdx.x // kv_heads
    kv = cuda.blockIdx.x % kv_heads
    first_head = kv * members
    lo, hi = _partition_keys(positions[t], window, partition, part)
    if lo >= hi:  # nothing to write: the merge reads only used partitions
        return False
    lane = cuda.threadIdx.x % WARP
    warp = cuda.threadIdx.x // WARP
    cache_row = (slots[t] * kv_heads + kv) * length  # key j is row cache_row + j
    q_scaled = cuda.shared.array((MAX_GROUP, MAX_DIM), float32)
    weights = cuda.shared.array((WARPS, MAX_GROUP, WARP), float32)
    scale = float32(1.0) / math.sqrt(float32(dim))
    for g in range(MAX_GROUP):
        if g < members:
            for d in range(cuda.threadIdx.x, dim, THREADS):
                q_scaled[g, d] = q[t, (first_head + g) * dim + d] * scale
    cuda.syncthreads()
    # head g's dims 2 (lane + 32 i) + {0, 1} at acc[g, 2 i], acc[g, 2 i + 1]
    acc = cuda.local.array((MAX_GROUP, MAX_DIMS_PER_LANE), float32)
    best = cuda.local.array(MAX_GROUP, float32)
    total = cuda.local.array(MAX_GROUP, float32)
    dots = cuda.local.array(MAX_GROUP, float32)
    fresh = cuda.local.array(MAX_GROUP, float32)  # the running maxima with this batch of keys
    for g in range(MAX_GROUP):
        best[g] = float32(-math.inf)
        total[g] = float32(0.0)
        for i in range(MAX_DIMS_PER_LANE):
            acc[g, i] = float32(0.0)
    keys = cuda.local.array(ATTENTION_GROUPED_KEY_WORDS, uint32)
    values = cuda.local.array((VALUE_ROWS, MAX_WORDS_PER_LANE), uint32)
    for first in range(lo, hi, WARPS * WARP):  # same trip count in every warp: barriers stay uniform
        batch = first + warp * WARP
        has_key = batch + lane < hi
        for g in range(MAX_GROUP):
            dots[g] = float32(0.0)
        if has_key:
            # a round of the key row's words in flight, then their part of each head's dot
            for done in range(0, MAX_WORDS, ATTENTION_GROUPED_KEY_WORDS):
                _load_key_words(keys, k_words, cache_row + batch + lane, done,
                                ATTENTION_GROUPED_KEY_WORDS, words)
                for w in range(ATTENTION_GROUPED_KEY_WORDS):
                    if done + w < words:
                        a, b = halves_as_floats(keys[w])
                        for g in range(MAX_GROUP):
                            if g < members:
                                dots[g] += (a * q_scaled[g, 2 * (done + w)]
                                            + b * q_scaled[g, 2 * (done + w) + 1])
        for g in range(MAX_GROUP):
            score = dots[g] if has_key else float32(-math.inf)
            fresh[g] = max(best[g], warp_max(score))
            weights[warp, g, lane] = math.exp(score - fresh[g]) if has_key else float32(0.0)
        cuda.syncthreads()
        # every head of the warp has the same keys: its batch is empty for all or for none
        if batch < hi:
            for g in range(MAX_GROUP):
                correction = math.exp(best[g] - fresh[g]) if best[g] > -math.inf \
                    else float32(0.0)
                total[g] *= correction
                for i in range(MAX_DIMS_PER_LANE):
                    acc[g, i] *= correction
            last = hi - 1 - batch  # keys past the last are read clamped to it, at weight 0
            for rows in range(0, WARP, VALUE_ROWS):
                _load_value_rows(values, v_words, cache_row, batch, rows, last, lane, words)
                for k in range(VALUE_ROWS):
                    for i in range(MAX_WORDS_PER_LANE):
                        a, b = halves_as_floats(values[k, i])
                        for g in range(MAX_GROUP):
                            if g < members:
                                weight = weights[warp, g, rows + k]
                                if i == 0:
                                    total[g] += weight
                                acc[g, 2 * i] += weight * a
                                acc[g, 2 * i + 1] += weight * b
        for g in range(MAX_GROUP):
            best[g] = fresh[g]
        cuda.syncthreads()
    # merge the warps, a head at a time
    warp_best = cuda.shared.array((WARPS, MAX_GROUP), float32)
    warp_total = cuda.shared.array((WARPS, MAX_GROUP), float32)
    warp_acc = cuda.shared.array((WARPS, MAX_GROUP, MAX_DIM), float32)
    for g in range(MAX_GROUP):
        if lane == 0:
            warp_best[warp, g] = best[g]
            warp_total[warp, g] = total[g]
        for i in range(MAX_WORDS_PER_LANE):
            if lane + WARP * i < words:
                warp_acc[warp, g, 2 * (lane + WARP * i)] = acc[g, 2 * i]
                warp_acc[warp, g, 2 * (lane + WARP * i) + 1] = acc[g, 2 * i + 1]
    cuda.syncthreads()
    if _used_partitions(positions[t], window, partition, part_max.shape[1]) == 1:
        for g in range(members):  # no other block holds keys of these heads: nothing to merge
            _write_output(t, first_head + g, dim, warp_best[:, g], warp_total[:, g],
                          warp_acc[:, g], out, quantize, xq, xstep, xsum)
        return False
    for g in range(members):
        _write_partition(t * heads + first_head + g, dim, warp_best[:, g], warp_total[:, g],
                         warp_acc[:, g], part_max, part_sum, part_acc)
    return True


@cuda.jit(device=True, inline="always")
def _merge_group(t, first_head, members, parts, part_max, part_sum, part_acc, out, quantize, xq,
                 xstep, xsum):
    """`_merge` for the `members` heads first_head + g of a grouped block: a warp per head (warp
    w takes heads w, w + WARPS, ...), so the block merges WARPS heads at once with no barrier;
    lane i holds dims i + 32 j. Every thread of the block calls this (warp shuffles)."""
    heads = part_max.shape[0] // out.shape[0]
    dim = part_acc.shape[2]
    lane = cuda.threadIdx.x % WARP
    for round_start in range(0, members, WARPS):  # the same trip count in every warp
        g = round_start + cuda.threadIdx.x // WARP
        active = g < members
        item = t * heads + first_head + g
        # maxima and sums in one round of loads (a lane's partitions, one each unless there are
        # more than 32): a running sum rescaled to the running maximum
        own_best = float32(-math.inf)
        own_total = float32(0.0)
        first_best = float32(-math.inf)  # partition `lane`'s, for the weights below
        if active:
            for p in range(lane, parts, WARP):
                part_best = load_l2_f32(part_max, (item, p))
                part_total = load_l2_f32(part_sum, (item, p))
                if p < WARP:
                    first_best = part_best
                if part_best > own_best:
                    own_total = own_total * math.exp(own_best - part_best) \
                        if own_best > -math.inf else float32(0.0)
                    own_best = part_best
                if part_best > -math.inf:
                    own_total += part_total * math.exp(part_best - own_best)
        best = warp_max(own_best)
        own_total = own_total * math.exp(own_best - best) if own_best > -math.inf \
            else float32(0.0)
        total = warp_sum(own_total)
        values = cuda.local.array(MAX_DIMS_PER_LANE, float32)
        for j in range(MAX_DIMS_PER_LANE):
            values[j] = float32(0.0)
        for first in range(0, parts, WARP):
            p = first + lane
            scale = float32(0.0)  # partition p's weight: its max against the best, over the sum
            if active and p < parts:
                part_best = first_best if first == 0 else load_l2_f32(part_max, (item, p))
                if part_best > -math.inf:
                    scale = math.exp(part_best - best) / total
            chunk = min(WARP, parts - first)
            for k in range(0, chunk, GROUP_MERGE_LOADS):
                # GROUP_MERGE_LOADS partitions' values in flight, then added in partition order
                loaded = cuda.local.array((GROUP_MERGE_LOADS, MAX_DIMS_PER_LANE), float32)
                for u in range(GROUP_MERGE_LOADS):
                    for j in range(MAX_DIMS_PER_LANE):
                        loaded[u, j] = float32(0.0)
                        if active and k + u < chunk and lane + WARP * j < dim:
                            loaded[u, j] = load_l2_f32(part_acc, (item, first + k + u,
                                                                  lane + WARP * j))
                for u in range(GROUP_MERGE_LOADS):
                    weight = warp_broadcast(scale, (k + u) % WARP)
                    if k + u < chunk and weight != float32(0.0):
                        for j in range(MAX_DIMS_PER_LANE):
                            values[j] += loaded[u, j] * weight
        for j in range(MAX_DIMS_PER_LANE):
            d = lane + WARP * j
            if active and d < dim:
                out[t, (first_head + g) * dim + d] = values[j]
            if quantize:  # dim is a multiple of 32 here: whole warps are in or out
                quantize_lane(values[j], (first_head + g) * dim + d, active and d < dim, xq,
                              xstep, xsum, t)


def attention_decode_grouped(q, k_words, v_words, kv_heads, length, positions, slots, window,
                             partition, part_max, part_sum, part_acc, tickets, out, quantize, xq,
                             xstep, xsum):
    """attention_decode with a block per token x KV head, for the H / KVH <= MAX_GROUP query
    heads that share it (`_grouped_partial`); the last of its partition blocks merges all of
    them (with one partition, the block has written their outputs). tickets [T * KVH] i32. Grid
    (T * KVH, P), block THREADS."""
    enter_as_dependent()  # the GEMV that reads the output may start (grid_dependency.py)
    if not _grouped_partial(q, k_words, v_words, kv_heads, length, positions, slots, window,
                            partition, part_max, part_sum, part_acc, out, quantize, xq, xstep,
                            xsum):
        return
    t = cuda.blockIdx.x // kv_heads
    members = part_max.shape[0] // q.shape[0] // kv_heads
    parts = _used_partitions(positions[t], window, partition, part_max.shape[1])
    if _last_to_finish(parts, tickets):
        _merge_group(t, cuda.blockIdx.x % kv_heads * members, members, parts, part_max,
                     part_sum, part_acc, out, quantize, xq, xstep, xsum)


_PARTIAL_ARGS = ("float32[:, ::1], uint32[:, ::1], uint32[:, ::1], int32, int32, int32[::1], "
                 "int32[::1], int32, int32, float32[:, ::1], float32[:, ::1], float32[:, :, ::1]")
_MERGE_OUTPUTS = "float32[:, ::1], int32, uint32[:, ::1], float32[:, ::1], float32[:, ::1]"
_DECODE_SIGNATURE = f"void({_PARTIAL_ARGS}, int32[::1], {_MERGE_OUTPUTS})"

KERNELS = {
    "attention_decode": (attention_decode, _DECODE_SIGNATURE),
    "attention_decode_grouped": (attention_decode_grouped, _DECODE_SIGNATURE),
    "attention_partial_prefill": (attention_partial_prefill, f"void({_PARTIAL_ARGS})"),
    "attention_combine": (attention_combine, "void(float32[:, ::1], float32[:, ::1], "
                                             f"float32[:, :, ::1], int32[::1], int32, int32, "
                                             f"{_MERGE_OUTPUTS})"),
}
