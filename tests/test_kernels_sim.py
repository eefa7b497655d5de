"""Every CUDA kernel against a numpy reference, on toy shapes, in numba's CUDA simulator.

conftest.py enables the simulator (NUMBA_ENABLE_CUDASIM=1) before numba loads. The real-GPU
counterpart at 7B shapes is scripts/gpu_check.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from numba import config, cuda

from zse_convert.quantize import quantize_int4
from zse_runtime.kernels.geometry import (GEMM_DECODE_TILE_N, GEMM_DECODE_TILE_T, GEMM_TILE_N,
                                          GEMM_TILE_T, GEMV_ROWS, SAMPLING_BINS,
                                          SAMPLING_HISTOGRAMS, SAMPLING_STATE_FIELDS,
                                          gemv_group_reciprocal, sampling_launches)
from zse_runtime.kernels import (activation, attention, attention_tiled, embedding, gemm_fp16,
                                 gemm_int4, gemv_fp16, gemv_int4, mma_tile, quantize_activations,
                                 rmsnorm, rope_cache, sampling)
from zse_runtime.sampling import SamplingParams, sample, uniform
from zse_runtime.zsefile import INT4_GROUP_SIZES, dequantize_int4

pytestmark = pytest.mark.skipif(not config.ENABLE_CUDASIM, reason="needs NUMBA_ENABLE_CUDASIM=1")
rng = np.random.default_rng(0)


def jit(module, name):
    return cuda.jit(module.KERNELS[name][0])


def _int4(rows, cols, group):
    w = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    weight, _ = quantize_int4(w, group)
    return weight, dequantize_int4(weight)


def test_embed_fp16_and_int4_with_fed_rows():
    """A row whose token id is FED (-1) reads the id its row chose in the step before."""
    table = rng.standard_normal((40, 64)).astype(np.float16)
    tokens = np.array([3, -1, 39, -1], np.int32)
    previous = np.array([11, 0, 7, 39], np.int32)
    used = np.array([3, 0, 39, 39])
    out = np.zeros((4, 64), np.float32)
    jit(embedding, "embed_fp16")[(4, 2), 32](tokens, previous, table, out)
    np.testing.assert_array_equal(out, table[used].astype(np.float32))
    weight, dense = _int4(40, 64, 32)
    out[:] = np.nan
    jit(embedding, "embed_int4")[(4, 1), 32](tokens, previous, weight.qweight, weight.scales,
                                            weight.zeros, 32, out)
    np.testing.assert_allclose(out, dense[used], rtol=1e-6, atol=1e-7)


def _no_digits():
    return (np.zeros((1, 16), np.uint32), np.zeros((1, 1), np.float32), np.zeros((1, 1), np.float32))


def _empty_digits(tokens, cols):
    return (np.zeros((tokens, cols // 2), np.uint32), np.full((tokens, cols // 32), np.nan, np.float32),
            np.full((tokens, cols // 32), np.nan, np.float32))


def _assert_digits_equal(digits, x):
    """A producer's fused digits equal the standalone quantizer's on its output, bit for bit."""
    expected, _, _, _ = _quantize_activations(x)
    for got, want in zip(digits, expected):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("accumulate,hidden,threads,width", [
    (0, 96, 64, 96), (1, 96, 64, 64), (1, 320, 32, 128)])
def test_add_rmsnorm(accumulate, hidden, threads, width):
    """A whole row per block, and rows cut into slices (a ragged last one) whose blocks each
    reduce the whole row; first passes of one and of several chunks of 4 values per thread. The
    new residual goes to its own buffer; no digits are written."""
    delta = rng.standard_normal((3, hidden)).astype(np.float32)
    residual = rng.standard_normal((3, hidden)).astype(np.float32)
    weight = rng.uniform(0.5, 1.5, hidden).astype(np.float32)
    expected_residual = delta + residual if accumulate else delta.copy()
    rms = np.sqrt(np.mean(expected_residual ** 2, axis=1, keepdims=True) + 1e-5)
    out, residual_out = np.full((3, hidden), np.nan, np.float32), np.full((3, hidden), np.nan, np.float32)
    untouched = _no_digits()
    jit(rmsnorm, "add_rmsnorm")[(3, -(-hidden // width)), threads](
        delta, residual, weight, np.float32(1e-5), accumulate, width, residual_out, out, 0,
        *untouched, np.zeros((1, 1), np.float32))
    np.testing.assert_allclose(residual_out, expected_residual, rtol=1e-6)
    np.testing.assert_allclose(out, expected_residual / rms * weight, rtol=1e-5, atol=1e-6)
    assert not untouched[0].any()


def _deferred_norm(r):
    """The sums of squares of r's blocks of 32 that a deferred RMSNorm of rows r writes
    (kernels/rmsnorm.py), and rms(r)^-1 per row, float64."""
    r64 = r.astype(np.float64)
    sumsq = (r64 ** 2).reshape(r.shape[0], -1, 32).sum(-1).astype(np.float32)
    return sumsq, 1 / np.sqrt((r64 ** 2).mean(1, keepdims=True) + 1e-5)


def test_add_rmsnorm_deferred():
    """A decode step's norm: the new residual, the digits of r * gamma bit for bit, each block
    of 32's sum of squares, no normed floats; slices of 64 over 2 blocks, each writing only its
    own."""
    hidden = 128
    delta = rng.standard_normal((3, hidden)).astype(np.float32)
    residual = rng.standard_normal((3, hidden)).astype(np.float32)
    weight = rng.uniform(0.5, 1.5, hidden).astype(np.float32)
    r = delta + residual
    out, residual_out = np.full((3, hidden), np.nan, np.float32), np.full((3, hidden), np.nan, np.float32)
    digits, sumsq = _empty_digits(3, hidden), np.full((3, hidden // 32), np.nan, np.float32)
    jit(rmsnorm, "add_rmsnorm")[(3, 2), 64](delta, residual, weight, np.float32(1e-5), 1, 64,
                                             residual_out, out, 1, *digits, sumsq)
    np.testing.assert_array_equal(residual_out, r)
    assert np.isnan(out).all()
    _assert_digits_equal(digits, (r * weight).astype(np.float32))
    np.testing.assert_allclose(sumsq, _deferred_norm(r)[0], rtol=1e-6)


def _quantize_activations(x):
    """The device's integer form of x (quantize_activations kernel) and the values it stands for."""
    tokens, cols = x.shape
    xq = np.zeros((tokens, cols // 2), np.uint32)
    xstep = np.full((tokens, cols // 32), np.nan, np.float32)
    xsum = np.full_like(xstep, np.nan)
    values = tokens * cols
    jit(quantize_activations, "quantize_activations")[-(-values // 64), 64](x, xq, xstep, xsum)
    digits = xq.reshape(tokens, cols // 8, 4).view(np.int8).reshape(tokens, cols // 8, 4, 4)
    # [t, word, (hi even, hi odd, lo even, lo odd), byte]: input 8w + 2 * byte + parity
    hi = np.stack([digits[:, :, 0], digits[:, :, 1]], -1).reshape(tokens, cols).astype(np.int64)
    lo = np.stack([digits[:, :, 2], digits[:, :, 3]], -1).reshape(tokens, cols).astype(np.int64)
    step = np.repeat(xstep, 32, axis=1).astype(np.float64)
    return (xq, xstep, xsum), step * (254 * hi + lo), hi, lo


def test_quantize_activations_error_bound_and_layout():
    """Two int8 digits per value: the reconstruction error is at most step / 2 = max|x| / 64516
    per block of 32, at any magnitude (outliers of 1e4 beside values of 1e-3), and xsum is the
    sum of the reconstructed block."""
    x = rng.standard_normal((3, 256)).astype(np.float32)
    x[0, 5] = 1e4
    x[1, 32:64] *= 1e-3
    x[2, 64:96] = 0.0  # an all-zero block
    (_, xstep, xsum), restored, hi, lo = _quantize_activations(x)
    assert np.abs(hi).max() <= 127 and np.abs(lo).max() <= 127
    blocks = np.abs(x.reshape(3, 8, 32)).max(-1)
    np.testing.assert_allclose(xstep, blocks / 127 / 254, rtol=1e-6)
    error = np.abs(restored - x).reshape(3, 8, 32).max(-1)
    # step / 2, plus float32 rounding of x - hi d (|x| <= 32258 steps: 32258 * 2^-23 < 0.004 step)
    assert np.all(error <= xstep * 0.504 + 1e-30)
    assert np.all(restored[2, 64:96] == 0) and np.all(xsum[2, 2] == 0)
    np.testing.assert_allclose(xsum, restored.reshape(3, 8, 32).sum(-1), rtol=1e-6, atol=1e-6)


def _int4_gemv_launch(kernel, block_rows, threads, activations, weight, group, bias, has_bias,
                      tokens, rows):
    out = np.full((tokens, rows), np.nan, np.float32)
    tile = int(kernel.split("_t")[1].split("_")[0])
    grid = (-(-rows // block_rows), -(-tokens // tile))
    jit(gemv_int4, kernel)[grid, threads](*activations, weight.qweight, weight.scales,
                                          weight.zeros, np.uint32(gemv_group_reciprocal(group)),
                                          bias, has_bias, out)
    return out


@pytest.mark.parametrize("kernel,block_rows,tokens,group,has_bias", [
    ("int4_gemv_t1_r4", 4, 1, 32, 1), ("int4_gemv_t1_r8", 8, 1, 128, 0),
    ("int4_gemv_t4_r4", 4, 5, 64, 1), ("int4_gemv_t8_r4", 4, 3, 128, 0),
    ("int4_gemv_t1_r4", 4, 1, 96, 0), ("int4_gemv_t4_r4", 4, 5, 96, 1)])
def test_int4_gemv(kernel, block_rows, tokens, group, has_bias):
    """Partial row blocks (13 rows), partial token tiles, and K = 2304 (72 blocks of 32) over 2
    warps: one full and one partial slice of K. Group 96 (3 blocks) checks the group index for
    a group that is no power of two of blocks. Exact against the integer inputs it was given;
    within 1e-4 of the float32 product (the inputs' rounding: at most max|x| / 64516 a value)."""
    weight, dense = _int4(13, 2304, group)
    x = rng.standard_normal((tokens, 2304)).astype(np.float32)
    bias = rng.standard_normal(13).astype(np.float32)
    activations, restored, _, _ = _quantize_activations(x)
    out = _int4_gemv_launch(kernel, block_rows, 64, activations, weight, group, bias, has_bias,
                            tokens, 13)
    expected = restored @ dense.astype(np.float64).T + (bias if has_bias else 0)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    exact = x.astype(np.float64) @ dense.astype(np.float64).T + (bias if has_bias else 0)
    assert np.abs(out - exact).max() <= 1e-4 * np.abs(exact).max()


def test_group_of_word_multiply_high_is_exact():
    """The GEMV finds a weight word's group as the high half of word x ceil(2^32 / words per
    group): floor division for every word index a row can have (up to 2^29)."""
    words = np.concatenate([np.arange(1 << 16), np.arange(1 << 16, 1 << 29, 4099),
                            (1 << 29) - np.arange(1, 64)]).astype(np.uint64)
    for group in INT4_GROUP_SIZES:
        reciprocal = np.uint64(gemv_group_reciprocal(group))
        assert reciprocal < 2**32
        np.testing.assert_array_equal((words * reciprocal) >> np.uint64(32),
                                      words // np.uint64(group // 8))


def test_int4_gemv_tiles_agree_bit_for_bit():
    """A token's result does not depend on the tile or block rows it was computed with (a batched
    decode must equal solo decodes)."""
    weight, _ = _int4(8, 256, 32)
    activations, _, _, _ = _quantize_activations(rng.standard_normal((8, 256)).astype(np.float32))
    results = []
    for kernel in gemv_int4.KERNELS:
        block_rows = int(kernel.split("_r")[-1])
        results.append(_int4_gemv_launch(kernel, block_rows, 64, activations, weight, 32,
                                         np.zeros(8, np.float32), 0, 8, 8))
    for other in results[1:]:
        np.testing.assert_array_equal(other, results[0])


def _split_activations(x, group):
    tokens, cols = x.shape
    halves = np.zeros((tokens, cols // 2), np.uint32)
    xsum = np.full((tokens, cols // group), np.nan, np.float32)
    unscale = np.full_like(xsum, np.nan)
    warps = tokens * cols // group  # a warp per (token, group); 3 per block leaves idle ones
    jit(gemm_int4, "split_activations")[-(-warps // 3), 96](x, group, halves, xsum, unscale)
    return halves, xsum, unscale


def _restore(halves, unscale, group):
    """split_activations' float16 pairs, in the GEMM's order (k = j with k = j + 4 in each chunk
    of 8; 4 chunks' pairs adjacent), back to [T, K] float64 values of x."""
    tokens, cols = halves.shape[0], 2 * halves.shape[1]
    # [t, quad, j, chunk % 4, (k = j, k = j + 4)] -> [t, quad, chunk % 4, (k = j, k = j + 4), j]
    pairs = halves.view(np.float16).astype(np.float64).reshape(tokens, cols // 32, 4, 4, 2)
    return pairs.transpose(0, 1, 3, 4, 2).reshape(tokens, cols) * np.repeat(unscale, group, axis=1)


def test_split_activations_rounds_to_float16_in_every_group():
    """Each value comes back as x rounded to float16's 11 bits, whatever its group's magnitude
    (1e6 would overflow float16 unscaled; 1e-6 would lose its bits in subnormals)."""
    x = rng.standard_normal((2, 128)).astype(np.float32)
    x[0, :64] *= 1e6
    x[1, 64:] *= 1e-6
    x[1, :64] = 0.0
    halves, xsum, unscale = _split_activations(x, 64)
    restored = _restore(halves, unscale, 64)
    np.testing.assert_allclose(restored, x, rtol=2**-11, atol=0)
    # the group sums are of the rounded values: the GEMM's zero points then see x as rounded
    np.testing.assert_allclose(xsum, restored.reshape(2, 2, 64).sum(-1), rtol=1e-6)
    assert unscale[1, 0] == 1.0  # an all-zero group is left as it is


@pytest.mark.parametrize("kernel,tile_rows,tile_tokens,splits,group", [
    ("int4_gemm", GEMM_TILE_N, GEMM_TILE_T, 1, 32), ("int4_gemm", GEMM_TILE_N, GEMM_TILE_T, 3, 32),
    ("int4_gemm_t32", GEMM_DECODE_TILE_N, GEMM_DECODE_TILE_T, 3, 32),
    ("int4_gemm", GEMM_TILE_N, GEMM_TILE_T, 3, 96)])
def test_int4_gemm_ragged_tiles(kernel, tile_rows, tile_tokens, splits, group):
    """Tensor-core GEMM (its mma emulated), in both block shapes: partial tiles in both
    directions, four groups (of 32, or of 96: three 32-value quads each), bias, whole or split
    over K (3 runs of 2, 2 and 0 groups, added by sum_splits). Its arithmetic is
    exact but for float16's rounding of x (float32 sums): against the float64 product of the
    dequantized weights and x so rounded to 1e-5, and against the float64 product of x to
    float16's accuracy."""
    tokens, rows, cols = 40, 70, 4 * group
    weight, dense = _int4(rows, cols, group)
    x = rng.standard_normal((tokens, cols)).astype(np.float32)
    x[3] *= 1e4  # one token with large activations
    bias = rng.standard_normal(rows).astype(np.float32)
    partials = np.full((splits * tokens, rows), np.nan, np.float32)
    grid = (-(-rows // tile_rows), -(-tokens // tile_tokens), splits)
    halves, xsum, unscale = _split_activations(x, group)
    jit(gemm_int4, kernel)[grid, mma_tile.THREADS](
        halves, xsum, unscale, weight.qweight, weight.scales, weight.zeros, group, bias, 1,
        partials)
    out = partials
    if splits > 1:
        out = np.full((tokens, rows), np.nan, np.float32)
        jit(gemm_int4, "sum_splits")[(tokens, -(-rows // 64)), 64](partials, splits, out)
        assert not partials[2 * tokens:].any()  # the empty run wrote zeros, no bias
    model = _restore(halves, unscale, group) @ dense.astype(np.float64).T + bias
    expected = x.astype(np.float64) @ dense.astype(np.float64).T + bias
    largest = np.abs(expected).max(1, keepdims=True)  # per token: its own scale
    assert (np.abs(out - model) / largest).max() < 1e-5
    assert (np.abs(out - expected) / largest).max() < 2e-3


def test_fp16_gemm_ragged_tiles():
    """The fp16 lm_head on tensor cores (mma emulated): partial tiles of rows and tokens, K in
    two runs of 32; exact but for float16's rounding of x (float32 sums)."""
    tokens, rows, cols = 20, 70, 64
    weight = (rng.standard_normal((rows, cols)) * 0.1).astype(np.float16)
    x = rng.standard_normal((tokens, cols)).astype(np.float32)
    out = np.full((tokens, rows), np.nan, np.float32)
    grid = (-(-rows // GEMM_TILE_N), -(-tokens // GEMM_TILE_T))
    jit(gemm_fp16, "fp16_gemm")[grid, mma_tile.THREADS](x, weight.view(np.uint32), out)
    dense = weight.astype(np.float64).T
    largest = np.abs(x @ dense).max(1, keepdims=True)
    assert (np.abs(out - x.astype(np.float16).astype(np.float64) @ dense) / largest).max() < 1e-5
    assert (np.abs(out - x.astype(np.float64) @ dense) / largest).max() < 2e-3


@pytest.mark.parametrize("tile,tokens", [(1, 1), (4, 5), (8, 3)])
def test_fp16_matmul(tile, tokens):
    weight = rng.standard_normal((19, 136)).astype(np.float16)  # 17 units of 8 halves
    x = rng.standard_normal((tokens, 136)).astype(np.float32)
    out = np.full((tokens, 19), np.nan, np.float32)
    grid = (-(-19 // GEMV_ROWS), -(-tokens // tile))
    jit(gemv_fp16, f"fp16_matmul_t{tile}")[grid, 64](x, weight.view(np.uint32), out)
    np.testing.assert_allclose(out, x @ weight.astype(np.float32).T, rtol=1e-5, atol=1e-5)


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


@pytest.mark.parametrize("deferred", [0, 1])
def test_rope_and_cache(deferred):
    """Rotated q into q_out, rotated k and v into the cache. Deferred: qkv is W (r * gamma)
    without its bias; the kernel scales it by rms(r)^-1 from the sums of squares, then adds the
    bias (r's three rows differ in scale by 10^4)."""
    heads, kv_heads, dim, slots, length = 4, 2, 32, 3, 16
    tokens = 3
    qkv = rng.standard_normal((tokens, (heads + 2 * kv_heads) * dim)).astype(np.float32)
    bias = rng.standard_normal(qkv.shape[1]).astype(np.float32)
    r = rng.standard_normal((tokens, 96)).astype(np.float32) * np.array([[1], [100], [0.01]], np.float32)
    sumsq, inverse = _deferred_norm(r)
    finished = (qkv * inverse + bias).astype(np.float32) if deferred else qkv
    positions = np.array([0, 5, 15], np.int32)
    slot_ids = np.array([2, 0, 2], np.int32)
    angles = np.outer(np.arange(length), rng.uniform(0, 1, dim // 2)).astype(np.float32)
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    k_cache = np.zeros((slots, kv_heads, length, dim), np.float16)
    v_cache = np.zeros_like(k_cache)
    q_out = np.full((tokens, heads * dim), np.nan, np.float32)
    work = (heads + kv_heads) * dim // 2 + kv_heads * dim
    jit(rope_cache, "rope_and_cache")[(tokens, -(-work // 64)), 64](
        qkv, positions, slot_ids, cos, sin, k_cache, v_cache, q_out, heads, deferred, sumsq,
        np.float32(1e-5), bias, deferred)
    for t in range(tokens):
        c, s = cos[positions[t]], sin[positions[t]]
        q = finished[t, :heads * dim].reshape(heads, dim)
        k = finished[t, heads * dim:(heads + kv_heads) * dim].reshape(kv_heads, dim)
        v = finished[t, (heads + kv_heads) * dim:].reshape(kv_heads, dim)
        np.testing.assert_allclose(q_out[t].reshape(heads, dim), _rotate(q, c, s), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(k_cache[slot_ids[t], :, positions[t]],
                                   _rotate(k, c, s).astype(np.float16), rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(v_cache[slot_ids[t], :, positions[t]], v.astype(np.float16),
                                   rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("kind,window,partition,length,heads,kv_heads", [
    ("decode", 0, 8, 40, 4, 2), ("decode", 7, 8, 40, 4, 2), ("prefill", 0, 150, 300, 4, 2),
    ("prefill", 100, 150, 300, 4, 2), ("grouped", 0, 8, 40, 4, 2), ("grouped", 7, 8, 40, 6, 2),
    ("grouped", 0, 150, 300, 7, 1), ("grouped", 0, 8, 40, 8, 1), ("grouped", 0, 8, 40, 3, 3)])
def test_attention_split_over_partitions(kind, window, partition, length, heads, kv_heads):
    """Short partitions (a batch of keys smaller than a warp) and long ones (several warps, two
    batches of 128 keys, a ragged last one), with and without a sliding window. The grouped
    decode kernel takes all the query heads of a KV head in one block (2, 3, 7 and 8 of them,
    and 1 when every head has its own KV head)."""
    dim, slots = 64, 2
    k_cache = rng.standard_normal((slots, kv_heads, length, dim)).astype(np.float16)
    v_cache = rng.standard_normal((slots, kv_heads, length, dim)).astype(np.float16)
    positions = np.array([0, length // 2 + 1, length - 1], np.int32)
    slot_ids = np.array([1, 0, 1], np.int32)
    tokens = positions.size
    q = rng.standard_normal((tokens, heads * dim)).astype(np.float32)
    parts = (length + partition - 1) // partition
    part_max = np.full((tokens * heads, parts), np.nan, np.float32)
    part_sum = np.full_like(part_max, np.nan)
    part_acc = np.full((tokens * heads, parts, dim), np.nan, np.float32)
    out = np.full((tokens, heads * dim), np.nan, np.float32)
    words = lambda cache: cache.view(np.uint32).reshape(-1, dim // 2)
    partial_args = (q, words(k_cache), words(v_cache), kv_heads, length, positions, slot_ids,
                    window, partition, part_max, part_sum, part_acc)
    digits = _empty_digits(tokens, heads * dim)
    if kind in ("decode", "grouped"):  # one launch: the last partition block of each merges
        tickets = np.zeros(tokens * heads, np.int32)
        name, blocks = ("attention_decode", tokens * heads) if kind == "decode" else (
            "attention_decode_grouped", tokens * kv_heads)
        jit(attention, name)[(blocks, parts), attention.THREADS](*partial_args, tickets, out, 1,
                                                                 *digits)
        assert not tickets.any()  # reset for the next launch
    else:
        jit(attention, "attention_partial_prefill")[(tokens * heads, parts), attention.THREADS](
            *partial_args)
        jit(attention, "attention_combine")[tokens * heads, attention.THREADS](
            part_max, part_sum, part_acc, positions, window, partition, out, 1, *digits)
    _assert_digits_equal(digits, out)
    for t in range(tokens):
        start = max(0, positions[t] - window + 1) if window else 0
        for h in range(heads):
            kv = h // (heads // kv_heads)
            keys = k_cache[slot_ids[t], kv, start:positions[t] + 1].astype(np.float32)
            values = v_cache[slot_ids[t], kv, start:positions[t] + 1].astype(np.float32)
            scores = keys @ q[t, h * dim:(h + 1) * dim] / np.sqrt(dim)
            weights = np.exp(scores - scores.max())
            expected = weights @ values / weights.sum()
            np.testing.assert_allclose(out[t, h * dim:(h + 1) * dim], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kernel,heads,position", [("attention_decode", 1, 130),
                                                    ("attention_decode_grouped", 2, 70)])
def test_attention_merge_of_more_partitions_than_threads(kernel, heads, position):
    """A thread of the merge folds several partitions into a running sum (decode partitions of
    one key: 131 against the per-head merge's 128 threads, 71 against the grouped merge's 32
    lanes per head, each with a ragged last round; the grouped block merges two query heads
    sharing one KV head). Each partition is a simulated block, hence no more than needed."""
    dim, length = 32, 136
    k_cache = rng.standard_normal((1, 1, length, dim)).astype(np.float16)
    v_cache = rng.standard_normal((1, 1, length, dim)).astype(np.float16)
    q = rng.standard_normal((1, heads * dim)).astype(np.float32)
    parts = position + 1
    part_max = np.full((heads, parts), np.nan, np.float32)
    part_sum = np.full_like(part_max, np.nan)
    part_acc = np.full((heads, parts, dim), np.nan, np.float32)
    out = np.full((1, heads * dim), np.nan, np.float32)
    words = lambda cache: cache.view(np.uint32).reshape(-1, dim // 2)
    blocks = heads if kernel == "attention_decode" else 1
    tickets = np.zeros(blocks, np.int32)
    jit(attention, kernel)[(blocks, parts), attention.THREADS](
        q, words(k_cache), words(v_cache), 1, length, np.array([position], np.int32),
        np.zeros(1, np.int32), 0, 1, part_max, part_sum, part_acc, tickets, out, 0,
        *_no_digits())
    keys = k_cache[0, 0, :position + 1].astype(np.float32)
    for h in range(heads):
        scores = keys @ q[0, h * dim:(h + 1) * dim] / np.sqrt(dim)
        weights = np.exp(scores - scores.max())
        expected = weights @ v_cache[0, 0, :position + 1].astype(np.float32) / weights.sum()
        np.testing.assert_allclose(out[0, h * dim:(h + 1) * dim], expected, rtol=1e-4, atol=1e-5)
    assert not tickets.any()


@pytest.mark.parametrize("kernel", ["attention_decode", "attention_decode_grouped"])
def test_attention_decode_of_one_partition_writes_its_output_without_a_merge(kernel):
    """A token whose keys all lie in the first partition: its block writes the output and its
    digits itself, leaving the workspace and the tickets untouched, and equal bit for bit to the
    partition written and merged (prefill's partition pass and attention_combine); a token with
    two partitions in the same launch still goes through the merge."""
    dim, length, partition, heads, kv_heads = 64, 64, 32, 4, 2
    k_cache = rng.standard_normal((1, kv_heads, length, dim)).astype(np.float16)
    v_cache = rng.standard_normal((1, kv_heads, length, dim)).astype(np.float16)
    positions = np.array([20, 45], np.int32)  # one partition; two
    slot_ids = np.zeros(2, np.int32)
    q = rng.standard_normal((2, heads * dim)).astype(np.float32)
    words = lambda cache: cache.view(np.uint32).reshape(-1, dim // 2)

    def workspace():
        return (np.full((2 * heads, 2), np.nan, np.float32),
                np.full((2 * heads, 2), np.nan, np.float32),
                np.full((2 * heads, 2, dim), np.nan, np.float32))

    inputs = (q, words(k_cache), words(v_cache), kv_heads, length, positions, slot_ids, 0,
              partition)
    decoded = np.full((2, heads * dim), np.nan, np.float32)
    decoded_digits = _empty_digits(2, heads * dim)
    part_max, part_sum, part_acc = workspace()
    tickets = np.zeros(2 * heads, np.int32)
    blocks = 2 * heads if kernel == "attention_decode" else 2 * kv_heads
    jit(attention, kernel)[(blocks, 2), attention.THREADS](
        *inputs, part_max, part_sum, part_acc, tickets, decoded, 1, *decoded_digits)
    assert np.isnan(part_max[:heads]).all() and np.isnan(part_acc[:heads]).all()  # token 0
    assert not np.isnan(part_max[heads:]).any()  # token 1 was merged from its partitions
    assert not tickets.any()

    merged, merged_digits = np.full_like(decoded, np.nan), _empty_digits(2, heads * dim)
    part_max, part_sum, part_acc = workspace()
    jit(attention, "attention_partial_prefill")[(2 * heads, 2), attention.THREADS](
        *inputs, part_max, part_sum, part_acc)
    jit(attention, "attention_combine")[2 * heads, attention.THREADS](
        part_max, part_sum, part_acc, positions, 0, partition, merged, 1, *merged_digits)
    np.testing.assert_array_equal(decoded[0], merged[0])
    for got, want in zip(decoded_digits, merged_digits):
        np.testing.assert_array_equal(got[0], want[0])
    _assert_digits_equal(decoded_digits, decoded)


def test_silu_mul():
    """A thread per value over (tokens, blocks of the row), the last block past the row's end
    by a whole warp; fused digits."""
    gate_up = rng.standard_normal((3, 192)).astype(np.float32)
    out = np.full((3, 96), np.nan, np.float32)
    digits = _empty_digits(3, 96)
    no_norm = (0, np.zeros((1, 1), np.float32), np.float32(1e-5))
    jit(activation, "silu_mul")[(3, 2), 64](gate_up, out, 1, *digits, *no_norm)
    gate, up = gate_up[:, :96], gate_up[:, 96:]
    np.testing.assert_allclose(out, gate / (1 + np.exp(-gate)) * up, rtol=1e-5, atol=1e-6)
    _assert_digits_equal(digits, out)
    out[:] = np.nan
    untouched = _no_digits()
    jit(activation, "silu_mul")[(3, 2), 64](gate_up, out, 0, *untouched, *no_norm)
    np.testing.assert_allclose(out, gate / (1 + np.exp(-gate)) * up, rtol=1e-5, atol=1e-6)
    assert not untouched[0].any()
    # deferred: gate_up is W (r * gamma), scaled by rms(r)^-1 first
    r = rng.standard_normal((3, 64)).astype(np.float32) * np.array([[1], [30], [0.1]], np.float32)
    sumsq, inverse = _deferred_norm(r)
    jit(activation, "silu_mul")[(3, 2), 64](gate_up, out, 1, *digits, 1, sumsq, np.float32(1e-5))
    scaled = gate_up * inverse
    gate, up = scaled[:, :96], scaled[:, 96:]
    np.testing.assert_allclose(out, gate / (1 + np.exp(-gate)) * up, rtol=1e-5, atol=1e-6)
    _assert_digits_equal(digits, out)


def _sample_on_device(logits, params, steps, threads=32, blocks=3):
    """The sampling launches (geometry.sampling_launches) over rows of `logits`, each row cut
    into `blocks` slices of blocks of `threads`."""
    rows = len(params)
    out = np.full(rows, -1, np.int32)
    args = (logits.copy(),  # consumed
            np.array([p.temperature for p in params], np.float32),
            np.array([p.top_k for p in params], np.int32),
            np.array([p.top_p for p in params], np.float32),
            np.array([p.seed for p in params], np.uint64), np.asarray(steps, np.uint64), out,
            np.full((rows, blocks), np.nan, np.float32), np.full((rows, blocks), -1, np.int32),
            np.full((rows, SAMPLING_HISTOGRAMS, SAMPLING_BINS), 7, np.uint32),  # cleared first
            np.full((rows, SAMPLING_HISTOGRAMS, SAMPLING_BINS), 7, np.uint64),
            np.zeros((rows, SAMPLING_HISTOGRAMS + 1, SAMPLING_STATE_FIELDS), np.uint64),
            np.zeros((rows, blocks), np.uint64))
    for name, grid, step in sampling_launches(rows, blocks):
        jit(sampling, name)[grid, threads](*args, np.int32(step))
    return out


def test_sampling_matches_the_reference():
    vocab = 300
    logits = (rng.standard_normal((6, vocab)) * 3).astype(np.float32)
    logits[0, [17, 250]] = logits[0].max() + 1  # a tie across slices: the lowest index wins
    params = [SamplingParams(0.0), SamplingParams(0.0), SamplingParams(1.0, seed=7),
              SamplingParams(0.7, top_k=20, seed=8), SamplingParams(1.3, top_p=0.8, seed=9),
              SamplingParams(0.9, top_k=50, top_p=0.5, seed=2**63 + 5)]
    steps = [0, 1, 2, 3, 4, 2**40]
    expected = [sample(logits[i], params[i], steps[i]) for i in range(6)]
    out = _sample_on_device(logits, params, steps)
    assert out.tolist() == expected
    assert out[0] == 17


def test_sampling_cutoffs_match_the_reference_across_shapes():
    """Radix selection finds the same top-k and top-p thresholds as the sorted reference: peaked
    and flat rows, ties at the k-th value, k at and past the vocabulary, top_p so small that one
    token stays, and a vocabulary that is not a multiple of the block."""
    vocab = 517
    logits = (rng.standard_normal((8, vocab)) * np.array([[0.3], [3], [8], [1], [2], [5], [1], [0.01]])
              ).astype(np.float32)
    logits[3, ::7] = logits[3].max()  # 74 tied maxima
    logits[4, 100:140] = 1.5  # ties straddling the k-th value
    params = [SamplingParams(1.0, seed=1), SamplingParams(0.7, top_p=0.9, seed=2),
              SamplingParams(1.5, top_k=1, seed=3), SamplingParams(1.0, top_k=10, seed=4),
              SamplingParams(1.0, top_k=vocab - 60, top_p=0.97, seed=5),
              SamplingParams(0.5, top_k=vocab, top_p=1e-6, seed=6),
              SamplingParams(2.0, top_k=vocab + 5, top_p=0.3, seed=7),
              SamplingParams(1.0, top_p=0.5, seed=8)]
    steps = list(range(8))
    expected = [sample(logits[i], params[i], steps[i]) for i in range(8)]
    assert _sample_on_device(logits, params, steps, 32, 4).tolist() == expected


def test_sampled_token_does_not_depend_on_the_launch_geometry():
    """Masses are summed as integers: the same seed draws the same token at any thread count
    and any number of slices per row."""
    logits = (rng.standard_normal((4, 600)) * 2).astype(np.float32)
    params = [SamplingParams(0.8, top_p=0.9, seed=s) for s in (11, 12)] + [
        SamplingParams(1.0, top_k=50, seed=13), SamplingParams(1.1, seed=14)]
    steps = [5, 6, 7, 8]
    draws = {(threads, blocks): _sample_on_device(logits, params, steps, threads, blocks).tolist()
             for threads, blocks in ((32, 1), (64, 1), (32, 5))}
    assert len({tuple(d) for d in draws.values()}) == 1, draws
    assert draws[32, 1] == [sample(logits[i], params[i], steps[i]) for i in range(4)]


def test_sampling_survives_nan_and_underflow():
    """NaN logits are never drawn; a row whose probabilities all underflow falls back to argmax."""
    logits = np.zeros((2, 300), np.float32)
    logits[0] = np.nan
    logits[0, 77] = 1.0
    logits[1] = -1e30
    logits[1, 5] = 0.0
    params = [SamplingParams(1.0, seed=3), SamplingParams(1e-30, top_p=0.5, seed=4)]
    assert _sample_on_device(logits, params, [1, 2], 32, 4).tolist() == [77, 5]


def test_device_uniform_matches_host():
    @cuda.jit
    def draw(seeds, steps, out):
        i = cuda.grid(1)
        if i < out.size:
            out[i] = sampling.uniform(seeds[i], steps[i])

    seeds = np.array([0, 1, 2**64 - 1, 12345], np.uint64)
    steps = np.array([0, 7, 3, 2**33], np.uint64)
    out = np.zeros(4, np.float32)
    draw[1, 4](seeds, steps, out)
    assert out.tolist() == [uniform(int(s), int(t)) for s, t in zip(seeds, steps)]


@pytest.mark.parametrize("dim,tokens,window,start", [(32, 70, 0, 0), (64, 20, 50, 100)])
def test_attention_tiled_prefill_chunk(dim, tokens, window, start):
    """Tensor-core prefill attention (mma emulated) against float64: a chunk of one sequence,
    ragged in tokens (70 = 64 + 6) and in keys; one that continues earlier keys in the cache
    with a sliding window; a second slot and keys past the chunk that must not be read. Q and P
    enter the products as float16, so the tolerance is float16's."""
    heads, kv_heads, slots, length, slot = 2, 1, 2, 192, 1
    k_cache = rng.standard_normal((slots, kv_heads, length, dim)).astype(np.float16)
    v_cache = rng.standard_normal((slots, kv_heads, length, dim)).astype(np.float16)
    positions = np.arange(start, start + tokens, dtype=np.int32)
    q = (rng.standard_normal((tokens, heads * dim)) * 2).astype(np.float32)
    out = np.full((tokens, heads * dim), np.nan, np.float32)
    words = lambda cache: cache.view(np.uint32).reshape(-1, dim // 2)
    grid = (-(-tokens // attention_tiled.TILE_TOKENS), heads)
    jit(attention_tiled, "attention_tiled")[grid, attention_tiled.THREADS](
        q, words(k_cache), words(v_cache), kv_heads, length, positions, slot, window, out)
    for t in range(tokens):
        first = max(0, positions[t] - window + 1) if window else 0
        for h in range(heads):
            keys = k_cache[slot, 0, first:positions[t] + 1].astype(np.float64)
            values = v_cache[slot, 0, first:positions[t] + 1].astype(np.float64)
            scores = keys @ q[t, h * dim:(h + 1) * dim] / np.sqrt(dim)
            weights = np.exp(scores - scores.max())
            expected = weights @ values / weights.sum()
            np.testing.assert_allclose(out[t, h * dim:(h + 1) * dim], expected, rtol=0, atol=4e-3)
