"""SiLU(gate) * up over the fused gate_up projection (and, for decode, the down_proj GEMV's
input digits: a warp's lanes hold 32 consecutive outputs, quantized a lane per value)."""

import math

from numba import cuda, float32

from .quantize_activations import quantize_lane


def silu_mul(gate_up, out, quantize, xq, xstep, xsum):
    """gate_up [T, 2I] float32 (gate columns, then up columns); out [T, I] float32 (I a multiple
    of 32); if quantize, also out as digits xq, xstep, xsum (quantize_activations.py).
    A thread per output over a (T, ceil(I / block)) grid, the block a multiple of 32 threads:
    no 64-bit division per value (a 1-D grid-stride loop spent 123 us on 512 x 18944, H200)."""
    inter = out.shape[1]
    t = cuda.blockIdx.x
    c = cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x
    active = c < inter  # uniform over each warp: I is a multiple of 32
    value = float32(0.0)
    if active:
        gate = gate_up[t, c]
        value = gate / (float32(1.0) + math.exp(-gate)) * gate_up[t, inter + c]
        out[t, c] = value
    if quantize:
        quantize_lane(value, c, active, xq, xstep, xsum, t)


KERNELS = {"silu_mul": (silu_mul, "void(float32[:, ::1], float32[:, ::1], int32, uint32[:, ::1], "
                                  "float32[:, ::1], float32[:, ::1])")}
