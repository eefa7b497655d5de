"""Rotary embedding (rotate-half, as transformers) on q and k, and the KV-cache write.

A thread per element of a token: it rotates the token's query heads into q_out, and stores its
rotated key heads and its value heads (fp16) at [slot, kv_head, position] of this layer's cache.
In a decode step it also finishes the deferred attention norm (rmsnorm.py): qkv holds
W (r * gamma), which it scales by rms(r)^-1 before adding the bias.
"""

from numba import cuda, float32

from .grid_dependency import enter_as_dependent
from .rmsnorm import deferred_norm_inverse


def rope_and_cache(qkv, positions, slots, cos, sin, k_cache, v_cache, q_out, num_heads,
                   deferred, norm_sumsq, eps, bias, has_bias):
    """qkv [T, (H + 2 KVH) * D] f32; positions, slots [T] i32; cos, sin [L, D/2] f32;
    k_cache, v_cache [S, KVH, L, D] f16; q_out [T, H * D] f32. If deferred, qkv is scaled by
    deferred_norm_inverse(norm_sumsq [T, hidden/32], t, eps) first; if has_bias, bias
    [(H + 2 KVH) * D] f32 is added then. Grid (T, ceil(work / block)), the block a multiple of
    32: a thread per rotated pair ((H + KVH) * D/2 of them) or copied value (KVH * D), so a
    decode step's token is spread over many blocks instead of looping in one."""
    enter_as_dependent()  # the attention may become resident (grid_dependency.py)
    t = cuda.blockIdx.x
    e = cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x
    position = positions[t]
    slot = slots[t]
    kv_heads = k_cache.shape[1]
    dim = k_cache.shape[3]
    half = dim // 2
    rotations = (num_heads + kv_heads) * half
    rotating = e < rotations
    copying = not rotating and e < rotations + kv_heads * dim
    # this thread's inputs, in flight while the deferred norm's sums of squares are loaded and
    # summed (all of a block's threads take part in that warp sum)
    head = e // half
    i = e % half
    column = (num_heads + kv_heads) * dim + e - rotations
    a = float32(0.0)
    b = float32(0.0)
    c = float32(0.0)
    s = float32(0.0)
    bias_a = float32(0.0)
    bias_b = float32(0.0)
    if rotating:
        c = cos[position, i]
        s = sin[position, i]
        a = qkv[t, head * dim + i]
        b = qkv[t, head * dim + i + half]
        if has_bias:
            bias_a = bias[head * dim + i]
            bias_b = bias[head * dim + i + half]
    elif copying:
        a = qkv[t, column]
        if has_bias:
            bias_a = bias[column]
    scale = deferred_norm_inverse(norm_sumsq, t, eps) if deferred else float32(1.0)
    if rotating:
        a *= scale
        b *= scale
        if has_bias:
            a += bias_a
            b += bias_b
        first = a * c - b * s
        second = b * c + a * s
        if head < num_heads:
            q_out[t, head * dim + i] = first
            q_out[t, head * dim + i + half] = second
        else:
            kv = head - num_heads
            k_cache[slot, kv, position, i] = first
            k_cache[slot, kv, position, i + half] = second
    elif copying:
        a *= scale
        if has_bias:
            a += bias_a
        e -= rotations
        v_cache[slot, e // dim, position, e % dim] = a


KERNELS = {
    "rope_and_cache": (rope_and_cache, "void(float32[:, ::1], int32[::1], int32[::1], "
                                       "float32[:, ::1], float32[:, ::1], float16[:, :, :, ::1], "
                                       "float16[:, :, :, ::1], float32[:, ::1], int32, int32, "
                                       "float32[:, ::1], float32, float32[::1], int32)"),
}
