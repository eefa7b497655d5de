"""SiLU(gate) * up over the fused gate_up projection."""

import math

from numba import cuda, float32


def silu_mul(gate_up, out):
    """gate_up [T, 2I] float32 (gate columns, then up columns); out [T, I] float32.
    Grid-stride over all T * I outputs."""
    inter = out.shape[1]
    total = out.shape[0] * inter
    start = cuda.grid(1)
    for i in range(start, total, cuda.gridsize(1)):
        t = i // inter
        c = i % inter
        gate = gate_up[t, c]
        out[t, c] = gate / (float32(1.0) + math.exp(-gate)) * gate_up[t, inter + c]


KERNELS = {"silu_mul": (silu_mul, "void(float32[:, ::1], float32[:, ::1])")}
