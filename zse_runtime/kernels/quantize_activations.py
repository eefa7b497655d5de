"""Activations as integers for the INT4 GEMVs: each block of 32 values becomes two int8 digits.

x ~= step * (254 * hi + lo), hi = rint(x / d) with d = max|x| / 127, lo = rint((x - hi d) / step)
and step = d / 254: both digits fit in int8, and the error is at most step / 2 = max|x| / 64516
(15 significant bits, finer than float16's 11, with no overflow at any magnitude). The GEMV
then multiplies 4-bit codes by these digits with dp4a, four products per instruction, instead
of converting every nibble to a float (docs/kernel-notes.md).

Layout, per token row (the order the GEMV reads):
  xq [T, K/2] uint32: for weight word w (inputs 8w..8w+7), four words at 4w: hi digits of the
      even inputs (8w, 8w+2, 8w+4, 8w+6, one byte each, low byte first), hi of the odd inputs,
      lo of the even, lo of the odd; matching a weight word's nibbles split by `& 0x0F0F0F0F`
      (even) and `>> 4 & 0x0F0F0F0F` (odd);
  xstep [T, K/32] float32: step of each block of 32;
  xsum [T, K/32] float32: sum of the block's reconstructed values (for the zero points).
"""

import math

from numba import cuda, float32, int32, uint32

from .common import or_over_byte_lanes, warp_max, warp_sum
from .geometry import ELEMENTWISE_THREADS
from .grid_dependency import launch_dependents

BLOCK = 32  # values per step: one dp4a chain per weight word, one quantization group or less
HI_LIMIT = float32(127.0)
LO_RADIX = 254  # |x - hi d| <= d / 2 = 127 steps: lo fits in int8


@cuda.jit(device=True, inline="always")
def _byte(value, position):
    return (uint32(int32(value)) & uint32(0xFF)) << uint32(8 * position)


@cuda.jit(device=True, inline="always")
def quantize_lane(value, column, active, xq, xstep, xsum, t):
    """Quantize one value per lane: the warp's 32 lanes hold one block of 32 consecutive inputs,
    lane i input column = 32 b + i of token row t (`active` False for a whole warp past the
    row's end: it contributes nothing and stores nothing). Producers call this on the values
    they just computed, so the GEMV's inputs cost no launch of their own. Every thread of the
    block must call it together (warp shuffles; barriers in the simulator)."""
    largest = warp_max(abs(value))
    d = largest / HI_LIMIT
    step = d / float32(LO_RADIX)
    inverse_d = HI_LIMIT / largest if largest > float32(0.0) else float32(0.0)
    inverse_step = float32(1.0) / step if largest > float32(0.0) else float32(0.0)
    hi = min(max(float32(math.floor(value * inverse_d + float32(0.5))), -HI_LIMIT), HI_LIMIT)
    lo = min(max(float32(math.floor((value - hi * d) * inverse_step + float32(0.5))), -HI_LIMIT),
             HI_LIMIT)
    # the block's integer total is below 2^24: exact in float32 in any summation order
    total = warp_sum(hi * float32(LO_RADIX) + lo)
    j = column % 8  # input 8 w + j: byte j // 2 of the even (j even) or odd word of weight word w
    hi_word = or_over_byte_lanes(_byte(hi, j // 2))
    lo_word = or_over_byte_lanes(_byte(lo, j // 2))
    if active:
        if j < 2:
            base = (column // 8) * 4 + j
            xq[t, base] = hi_word
            xq[t, base + 2] = lo_word
        if column % BLOCK == 0:
            xstep[t, column // BLOCK] = step
            xsum[t, column // BLOCK] = step * total


def quantize_activations(x, xq, xstep, xsum):
    """x [T, K] f32 -> xq [T, K/2] u32, xstep, xsum [T, K/32] f32 (module docstring), for inputs
    no producer quantized (the lm_head's). A lane per value: 1-D grid over T * K values."""
    launch_dependents()  # the GEMV that reads the output may start (grid_dependency.py)
    cols = x.shape[1]
    total = x.shape[0] * cols
    # block-uniform trip count: every thread reaches quantize_lane together
    for base in range(cuda.blockIdx.x * cuda.blockDim.x, total, cuda.gridDim.x * cuda.blockDim.x):
        i = base + cuda.threadIdx.x
        active = i < total
        t = i // cols if active else 0
        column = i % cols
        value = x[t, column] if active else float32(0.0)
        quantize_lane(value, column, active, xq, xstep, xsum, t)


THREADS = ELEMENTWISE_THREADS

KERNELS = {
    "quantize_activations": (quantize_activations, "void(float32[:, ::1], uint32[:, ::1], "
                                                   "float32[:, ::1], float32[:, ::1])"),
}
