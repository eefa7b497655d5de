"""Residual add fused with RMSNorm: one block per token."""

import math

from numba import cuda, float32

from .common import block_sum


def add_rmsnorm(delta, residual, weight, eps, accumulate, out):
    """residual[t] = (residual[t] if accumulate else 0) + delta[t];
    out[t] = residual[t] / sqrt(mean(residual[t]^2) + eps) * weight.
    delta, residual, out [T, H] float32; weight [H] float32."""
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


KERNELS = {
    "add_rmsnorm": (add_rmsnorm, "void(float32[:, ::1], float32[:, ::1], float32[::1], float32, "
                                 "int32, float32[:, ::1])"),
}
