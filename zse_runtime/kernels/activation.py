"""SiLU(gate) * up over the fused gate_up projection (and the down GEMV's input quantization)."""

import math

from numba import cuda, float32

from .quantize_activations import BLOCK, quantize_block


def silu_mul(gate_up, out, quantize, xq, xstep, xsum):
    """gate_up [T, 2I] float32 (gate columns, then up columns); out [T, I] float32. One thread per
    32 consecutive outputs of a row, grid-stride over T * ceil(I / 32); when quantize (I a
    multiple of 32), the thread also writes its block to xq, xstep, xsum
    (quantize_activations.py) from registers."""
    inter = out.shape[1]
    blocks_per_row = (inter + BLOCK - 1) // BLOCK
    values = cuda.local.array(BLOCK, float32)
    for item in range(cuda.grid(1), out.shape[0] * blocks_per_row, cuda.gridsize(1)):
        t = item // blocks_per_row
        block = item % blocks_per_row
        for i in range(BLOCK):
            c = block * BLOCK + i
            if c < inter:
                gate = gate_up[t, c]
                values[i] = gate / (float32(1.0) + math.exp(-gate)) * gate_up[t, inter + c]
                out[t, c] = values[i]
        if quantize:
            quantize_block(values, xq, xstep, xsum, t, block)


KERNELS = {"silu_mul": (silu_mul, "void(float32[:, ::1], float32[:, ::1], int32, uint32[:, ::1], "
                                  "float32[:, ::1], float32[:, ::1])")}
