"""SiLU(gate) * up over the fused gate_up projection (and, for decode, the down_proj GEMV's
input digits: a warp's lanes hold 32 consecutive outputs, quantized a lane per value). In a
decode step it also finishes the deferred MLP norm (rmsnorm.py): gate_up holds W (r * gamma),
which it scales by rms(r)^-1 first."""

import math

from numba import cuda, float32

from .grid_dependency import enter_as_dependent
from .quantize_activations import quantize_lane
from .rmsnorm import deferred_norm_inverse


def silu_mul(gate_up, out, quantize, xq, xstep, xsum, deferred, norm_sumsq, eps):
    """gate_up [T, 2I] float32 (gate columns, then up columns); out [T, I] float32 (I a multiple
    of 32); if quantize, also out as digits xq, xstep, xsum (quantize_activations.py); if
    deferred, gate_up is scaled by deferred_norm_inverse(norm_sumsq [T, hidden/32], t, eps).
    A thread per output over a (T, ceil(I / block)) grid, the block a multiple of 32 threads:
    no 64-bit division per value (a 1-D grid-stride loop spent 123 us on 512 x 18944, H200)."""
    enter_as_dependent()  # the GEMV that reads the output may start (grid_dependency.py)
    inter = out.shape[1]
    t = cuda.blockIdx.x
    c = cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x
    active = c < inter  # uniform over each warp: I is a multiple of 32
    gate = float32(0.0)
    up = float32(0.0)
    if active:  # in flight while the deferred norm's sums of squares are loaded and summed
        gate = gate_up[t, c]
        up = gate_up[t, inter + c]
    scale = deferred_norm_inverse(norm_sumsq, t, eps) if deferred else float32(1.0)
    value = float32(0.0)
    if active:
        gate *= scale
        value = gate / (float32(1.0) + math.exp(-gate)) * (up * scale)
        out[t, c] = value
    if quantize:
        quantize_lane(value, c, active, xq, xstep, xsum, t)


KERNELS = {"silu_mul": (silu_mul, "void(float32[:, ::1], float32[:, ::1], int32, uint32[:, ::1], "
                                  "float32[:, ::1], float32[:, ::1], int32, float32[:, ::1], "
                                  "float32)")}
