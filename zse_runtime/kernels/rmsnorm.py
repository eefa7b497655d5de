"""Residual add fused with RMSNorm (and, for decode, the GEMV input digits): one block per token.

A thread owns VALUES_PER_THREAD values per chunk of the row and reads all of them before it
writes anything: loads then overlap, where a load-add-store loop waits for memory once per value
(the compiler cannot move a load above a store that may alias it; H200, 7.1 us for one 3584-wide
row at 256 threads, docs/kernel-notes.md). A warp's lanes hold 32 consecutive values, so the
normed row is quantized for the GEMV a lane per value (quantize_activations.quantize_lane).
"""

import math

from numba import cuda, float32

from .common import block_sum
from .quantize_activations import quantize_lane

VALUES_PER_THREAD = 4  # with 1024 threads, rows up to 4096 wide take one chunk


def add_rmsnorm(delta, residual, weight, eps, accumulate, out, quantize, xq, xstep, xsum):
    """residual[t] = (residual[t] if accumulate else 0) + delta[t];
    out[t] = residual[t] / sqrt(mean(residual[t]^2) + eps) * weight; if quantize, also out[t] as
    the INT4 GEMV's digits xq, xstep, xsum (quantize_activations.py; rows T of them).
    delta, residual, out [T, H] float32 (H a multiple of 32); weight [H] float32. Grid T; the
    block a multiple of 32 threads."""
    t = cuda.blockIdx.x
    hidden = out.shape[1]
    threads = cuda.blockDim.x
    chunk = VALUES_PER_THREAD * threads
    scratch = cuda.shared.array(32, float32)
    values = cuda.local.array(VALUES_PER_THREAD, float32)
    partial = float32(0.0)
    for base in range(cuda.threadIdx.x, hidden, chunk):  # read only: the loads overlap
        for i in range(VALUES_PER_THREAD):
            h = base + i * threads
            values[i] = float32(0.0)
            if h < hidden:
                values[i] = delta[t, h] + residual[t, h] if accumulate else delta[t, h]
        for i in range(VALUES_PER_THREAD):
            partial += values[i] * values[i]
    inv = float32(1.0) / math.sqrt(block_sum(partial, scratch) / float32(hidden) + eps)
    for start in range(0, hidden, chunk):  # block-uniform trip count, for quantize_lane
        base = start + cuda.threadIdx.x
        scales = cuda.local.array(VALUES_PER_THREAD, float32)
        for i in range(VALUES_PER_THREAD):  # loads first: the compiler must assume the stores alias them
            h = base + i * threads
            values[i] = float32(0.0)
            scales[i] = float32(0.0)
            if h < hidden:
                values[i] = delta[t, h] + residual[t, h] if accumulate else delta[t, h]
                scales[i] = weight[h]
        for i in range(VALUES_PER_THREAD):
            h = base + i * threads
            normed = values[i] * inv * scales[i]
            if h < hidden:
                residual[t, h] = values[i]
                out[t, h] = normed
            if quantize:
                quantize_lane(normed, h, h < hidden, xq, xstep, xsum, t)


KERNELS = {
    "add_rmsnorm": (add_rmsnorm, "void(float32[:, ::1], float32[:, ::1], float32[::1], float32, "
                                 "int32, float32[:, ::1], int32, uint32[:, ::1], float32[:, ::1], "
                                 "float32[:, ::1])"),
}
