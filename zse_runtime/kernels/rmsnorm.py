"""Residual add fused with RMSNorm (for a decode step, deferred: the GEMV input digits).

Grid (T, slices): every block of a token row first computes the whole row's sum of squares (the
row is 14 KB at 7B and stays in L2), then normalizes and stores only its own slice of the row.
A decode step's rows are thereby spread over many SMs: one 1024-thread block per row was
issue-bound on one SM (H200, ncu: 22K cycles, 13.9 us with the digits; docs/kernel-notes.md). Because blocks read the old residual while others write the new one,
the new residual goes to a second buffer (the backend alternates two).

In the read-only first pass a thread loads VALUES_PER_THREAD values before it uses any, so
the loads overlap.

A decode step's norm is deferred: RMSNorm is a per-token scale rms(r)^-1 times a per-input
weight gamma, so W x_norm = rms(r)^-1 W (r * gamma). The kernel then writes the INT4 GEMV's
digits of r * gamma (a warp's lanes hold 32 consecutive values of the slice:
quantize_activations.quantize_lane) and each block of 32's sum of squares, and needs no pass
over the whole row (2.8 us instead of 6.3 for a 7B row on the H200). The GEMV multiplies as
usual; the elementwise kernel after it (rope_and_cache after qkv, silu_mul after gate_up)
scales its inputs by rms(r)^-1 (deferred_norm_inverse) and adds the bias the GEMV left out.
"""

import math

from numba import cuda, float32

from .common import WARP, block_sum, warp_sum
from .grid_dependency import enter_as_dependent
from .quantize_activations import quantize_lane

VALUES_PER_THREAD = 4


@cuda.jit(device=True, inline="always")
def deferred_norm_inverse(norm_sumsq, t, eps):
    """rms(r)^-1 = 1 / sqrt(mean(r^2) + eps) of token row t of a deferred norm, from its sums of
    squares per block of 32, norm_sumsq [T, H/32], added in an order that depends on H alone.
    Every lane of the warp gets it; every thread of the block must call this (warp_sum)."""
    chunks = norm_sumsq.shape[1]
    total = float32(0.0)
    for c in range(cuda.threadIdx.x % WARP, chunks, WARP):
        total += norm_sumsq[t, c]
    return float32(1.0) / math.sqrt(warp_sum(total) / float32(chunks * WARP) + eps)


def add_rmsnorm(delta, residual, weight, eps, accumulate, slice_width, residual_out, out,
                deferred, xq, xstep, xsum, norm_sumsq):
    """residual_out[t] = (residual[t] if accumulate else 0) + delta[t] = r;
    out[t] = r / sqrt(mean(r^2) + eps) * weight, or if deferred, instead of out: r * weight as
    the INT4 GEMV's digits xq, xstep, xsum (quantize_activations.py) and the sums of squares of
    r's blocks of 32, norm_sumsq [T, H/32] (module docstring).
    delta, residual, residual_out, out [T, H] float32 (H a multiple of 32; residual_out is not
    residual); weight [H] float32. Grid (T, ceil(H / slice_width)); slice_width and the block
    multiples of 32."""
    enter_as_dependent()  # the GEMV that reads the output may start (grid_dependency.py)
    t = cuda.blockIdx.x
    hidden = out.shape[1]
    threads = cuda.blockDim.x
    inv = float32(0.0)
    if not deferred:
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
        value = float32(0.0)
        gamma = float32(0.0)
        if h < last:
            gamma = weight[h]  # loaded with the row's values, not after the warp sum below
            value = delta[t, h] + residual[t, h] if accumulate else delta[t, h]
            residual_out[t, h] = value
            if not deferred:
                out[t, h] = value * inv * gamma
        if deferred:
            squares = warp_sum(value * value)
            if h < last and h % WARP == 0:
                norm_sumsq[t, h // WARP] = squares
            quantize_lane(value * gamma, h, h < last, xq, xstep, xsum, t)


KERNELS = {
    "add_rmsnorm": (add_rmsnorm, "void(float32[:, ::1], float32[:, ::1], float32[::1], float32, "
                                 "int32, int32, float32[:, ::1], float32[:, ::1], int32, "
                                 "uint32[:, ::1], float32[:, ::1], float32[:, ::1], "
                                 "float32[:, ::1])"),
}
