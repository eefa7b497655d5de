"""Residual add fused with RMSNorm (and, for decode, the GEMV input digits).

Grid (T, slices): every block of a token row first computes the whole row's sum of squares (the
row is 14 KB at 7B and stays in L2), then normalizes, stores and quantizes only its own slice
of the row. A decode step's single row is thereby spread over many SMs: one 1024-thread block
per row was issue-bound on one SM (H200, ncu: 22K cycles, 13.9 us with the digits;
docs/kernel-notes.md). Because blocks read the old residual while others write the new one,
the new residual goes to a second buffer (the backend alternates two).

In the read-only first pass a thread loads VALUES_PER_THREAD values before it uses any, so
the loads overlap. A warp's lanes hold 32 consecutive values of the slice, so the normed
values are quantized for the GEMV a lane per value (quantize_activations.quantize_lane).
"""

import math

from numba import cuda, float32

from .common import block_sum
from .quantize_activations import quantize_lane

VALUES_PER_THREAD = 4


def add_rmsnorm(delta, residual, weight, eps, accumulate, slice_width, residual_out, out,
                quantize, xq, xstep, xsum):
    """residual_out[t] = (residual[t] if accumulate else 0) + delta[t];
    out[t] = residual_out[t] / sqrt(mean(residual_out[t]^2) + eps) * weight; if quantize, also
    out[t] as the INT4 GEMV's digits xq, xstep, xsum (quantize_activations.py).
    delta, residual, residual_out, out [T, H] float32 (H a multiple of 32; residual_out is not
    residual); weight [H] float32. Grid (T, ceil(H / slice_width)); slice_width and the block
    multiples of 32."""
    t = cuda.blockIdx.x
    hidden = out.shape[1]
    threads = cuda.blockDim.x
    scratch = cuda.shared.array(32, float32)
    values = cuda.local.array(VALUES_PER_THREAD, float32)
    partial = float32(0.0)
    for base in range(cuda.threadIdx.x, hidden, VALUES_PER_THREAD * threads):
        for i in range(VALUES_PER_THREAD):
            h = base + i * threads
            values[i] = float32(0.0)
            if h < hidden:
                values[i] = delta[t, h] + residual[t, h] if accumulate else delta[t, h]
        for i in range(VALUES_PER_THREAD):
            partial += values[i] * values[i]
    inv = float32(1.0) / math.sqrt(block_sum(partial, scratch) / float32(hidden) + eps)
    first = cuda.blockIdx.y * slice_width
    last = min(hidden, first + slice_width)
    for start in range(first, last, threads):  # block-uniform trip count, for quantize_lane
        h = start + cuda.threadIdx.x
        normed = float32(0.0)
        if h < last:
            value = delta[t, h] + residual[t, h] if accumulate else delta[t, h]
            normed = value * inv * weight[h]
            residual_out[t, h] = value
            out[t, h] = normed
        if quantize:
            quantize_lane(normed, h, h < last, xq, xstep, xsum, t)


KERNELS = {
    "add_rmsnorm": (add_rmsnorm, "void(float32[:, ::1], float32[:, ::1], float32[::1], float32, "
                                 "int32, int32, float32[:, ::1], float32[:, ::1], int32, "
                                 "uint32[:, ::1], float32[:, ::1], float32[:, ::1])"),
}
