"""Embedding lookup: a token's table row, copied and widened by a thread per value (fp16) or per
packed word (int4) over a grid (T, ceil(width / block)): a loop per row would wait for memory
once per value.

A token id below zero (`FED`) stands for the id the sampler chose for the same row in the step
before (`previous`, still on the device): a decode step launched before its predecessor's ids
reach the host feeds them this way. The table may be host memory mapped for the device (the
decode graphs read the embedding there, gpu/backend.py)."""

from numba import cuda, float32

from .common import int4_value


@cuda.jit(device=True, inline="always")
def token_id(tokens, previous, t):
    token = tokens[t]
    return previous[t] if token < 0 else token


def embed_fp16(tokens, previous, table, out):
    """tokens [T] int32 (FED: previous[t]); table [V, H] float16; out [T, H] float32."""
    t = cuda.blockIdx.x
    h = cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x
    if h < out.shape[1]:
        out[t, h] = float32(table[token_id(tokens, previous, t), h])


def embed_int4(tokens, previous, qweight, scales, zeros, group_size, out):
    """As embed_fp16 for an int4.rows.v1 table: qweight [V, H/8], scales/zeros [V, H/group]."""
    t = cuda.blockIdx.x
    w = cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x
    if w < qweight.shape[1]:
        row = token_id(tokens, previous, t)
        word = qweight[row, w]
        g = (w * 8) // group_size
        scale = float32(scales[row, g])
        zero = float32(zeros[row, g])
        for j in range(8):
            out[t, w * 8 + j] = int4_value(word, j, scale, zero)


KERNELS = {
    "embed_fp16": (embed_fp16, "void(int32[::1], int32[::1], float16[:, ::1], float32[:, ::1])"),
    "embed_int4": (embed_int4, "void(int32[::1], int32[::1], uint32[:, ::1], float16[:, ::1], "
                               "float16[:, ::1], int32, float32[:, ::1])"),
}
