"""Row gather: the few token rows whose logits are needed, out of a whole prefill chunk."""

from numba import cuda


def gather_rows(src, rows, out):
    """src [T, H] f32; rows [B] i32; out [B, H] f32. Grid B."""
    b = cuda.blockIdx.x
    row = rows[b]
    for h in range(cuda.threadIdx.x, out.shape[1], cuda.blockDim.x):
        out[b, h] = src[row, h]


KERNELS = {"gather_rows": (gather_rows, "void(float32[:, ::1], int32[::1], float32[:, ::1])")}
