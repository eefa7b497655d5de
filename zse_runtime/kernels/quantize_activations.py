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

from .geometry import ELEMENTWISE_THREADS
from .memory import load_f32x4

BLOCK = 32  # values per step: one dp4a chain per weight word, one quantization group or less
HI_LIMIT = float32(127.0)
LO_RADIX = 254  # |x - hi d| <= d / 2 = 127 steps: lo fits in int8


@cuda.jit(device=True, inline="always")
def _byte(value, position):
    return (uint32(int32(value)) & uint32(0xFF)) << uint32(8 * position)


@cuda.jit(device=True, inline="always")
def quantize_block(values, xq, xstep, xsum, t, block):
    """Write block `block` of token row t from `values`, a local array of its 32 inputs."""
    largest = float32(0.0)
    for i in range(BLOCK):
        largest = max(largest, abs(values[i]))
    d = largest / HI_LIMIT
    step = d / float32(LO_RADIX)
    inverse_d = HI_LIMIT / largest if largest > float32(0.0) else float32(0.0)
    inverse_step = float32(1.0) / step if largest > float32(0.0) else float32(0.0)
    total = int32(0)
    for word in range(BLOCK // 8):
        hi_even = uint32(0)
        hi_odd = uint32(0)
        lo_even = uint32(0)
        lo_odd = uint32(0)
        for j in range(8):
            value = values[word * 8 + j]
            hi = min(max(float32(math.floor(value * inverse_d + float32(0.5))), -HI_LIMIT), HI_LIMIT)
            lo = min(max(float32(math.floor((value - hi * d) * inverse_step + float32(0.5))),
                         -HI_LIMIT), HI_LIMIT)
            total += int32(hi) * LO_RADIX + int32(lo)
            if j % 2 == 0:
                hi_even |= _byte(hi, j // 2)
                lo_even |= _byte(lo, j // 2)
            else:
                hi_odd |= _byte(hi, j // 2)
                lo_odd |= _byte(lo, j // 2)
        base = (block * (BLOCK // 8) + word) * 4
        xq[t, base] = hi_even
        xq[t, base + 1] = hi_odd
        xq[t, base + 2] = lo_even
        xq[t, base + 3] = lo_odd
    xstep[t, block] = step
    xsum[t, block] = step * float32(total)


def quantize_activations(x, xq, xstep, xsum):
    """x [T, K] f32 -> xq [T, K/2] u32, xstep, xsum [T, K/32] f32 (module docstring). One thread
    per block of 32 values; 1-D grid over T * K/32 blocks."""
    blocks_per_row = xstep.shape[1]
    item = cuda.grid(1)
    if item >= x.shape[0] * blocks_per_row:
        return
    t = item // blocks_per_row
    block = item % blocks_per_row
    values = cuda.local.array(BLOCK, float32)
    for i in range(0, BLOCK, 4):
        values[i], values[i + 1], values[i + 2], values[i + 3] = load_f32x4(x, t, block * BLOCK + i)
    quantize_block(values, xq, xstep, xsum, t, block)


THREADS = ELEMENTWISE_THREADS

KERNELS = {
    "quantize_activations": (quantize_activations, "void(float32[:, ::1], uint32[:, ::1], "
                                                   "float32[:, ::1], float32[:, ::1])"),
}
