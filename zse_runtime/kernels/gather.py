"""Row gather: the few token rows whose logits are needed, out of a whole prefill chunk."""

from numba import cuda


def gather_rows(src, rows, out):
    """src [T, H] f32; rows [B] i32; out [B, H] f32. Grid (B, ceil(H / block)), a thread per
    value (a loop per row would wait for memory once per value)."""
    b = cuda.blockIdx.x
    h = cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x
    if h < out.shape[1]:
        out[b, h] = src[rows[b], h]


KERNELS = {"gather_rows": (gather_rows, "void(float32[:, ::1], int32[::1], float32[:, ::1])")}
