"""Embedding lookup: a token's table row, copied and widened by a thread per value (fp16) or per
packed word (int4) over a grid (T, ceil(width / block)): a loop per row would wait for memory
once per value."""

from numba import cuda, float32

from .common import int4_value


def embed_fp16(tokens, table, out):
    """tokens [T] int32; table [V, H] float16; out [T, H] float32."""
    t = cuda.blockIdx.x
    h = cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x
    if h < out.shape[1]:
        out[t, h] = float32(table[tokens[t], h])


def embed_int4(tokens, qweight, scales, zeros, group_size, out):
    """As embed_fp16 for an int4.rows.v1 table: qweight [V, H/8], scales/zeros [V, H/group]."""
    t = cuda.blockIdx.x
    w = cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x
    if w < qweight.shape[1]:
        row = tokens[t]
        word = qweight[row, w]
        g = (w * 8) // group_size
        scale = float32(scales[row, g])
        zero = float32(zeros[row, g])
        for j in range(8):
            out[t, w * 8 + j] = int4_value(word, j, scale, zero)


KERNELS = {
    "embed_fp16": (embed_fp16, "void(int32[::1], float16[:, ::1], float32[:, ::1])"),
    "embed_int4": (embed_int4, "void(int32[::1], uint32[:, ::1], float16[:, ::1], float16[:, ::1], "
                               "int32, float32[:, ::1])"),
}
