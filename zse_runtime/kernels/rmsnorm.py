"""Residual add fused with RMSNorm (and the next GEMV's input quantization): one block per token."""

import math

from numba import cuda, float32

from .common import block_sum
from .quantize_activations import quantize_row_blocks


def add_rmsnorm(delta, residual, weight, eps, accumulate, out, quantize, xq, xstep, xsum):
    """residual[t] = (residual[t] if accumulate else 0) + delta[t];
    out[t] = residual[t] / sqrt(mean(residual[t]^2) + eps) * weight.
    delta, residual, out [T, H] float32; weight [H] float32. When quantize, out also goes to
    xq, xstep, xsum (quantize_activations.py) for an INT4 GEMV."""
    t = cuda.blockIdx.x
    hidden = out.shape[1]
    scratch = cuda.shared.array(32, float32)
    partial = float32(0.0)
    for h in range(cuda.threadIdx.x, hidden, cuda.blockDim.x):
        value = delta[t, h]
        if accumulate:
            value += residual[t, h]
        residual[t, h] = value
        partial += value * value
    total = block_sum(partial, scratch)
    inv = float32(1.0) / math.sqrt(total / float32(hidden) + eps)
    for h in range(cuda.threadIdx.x, hidden, cuda.blockDim.x):
        out[t, h] = residual[t, h] * inv * weight[h]
    if quantize:
        cuda.syncthreads()
        quantize_row_blocks(out, xq, xstep, xsum, t)


KERNELS = {
    "add_rmsnorm": (add_rmsnorm, "void(float32[:, ::1], float32[:, ::1], float32[::1], float32, "
                                 "int32, float32[:, ::1], int32, uint32[:, ::1], float32[:, ::1], "
                                 "float32[:, ::1])"),
}
