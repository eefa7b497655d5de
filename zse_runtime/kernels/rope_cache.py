"""Rotary embedding (rotate-half, as transformers) on q and k, and the KV-cache write.

A thread per element of a token: it rotates the token's query heads into q_out, and stores its
rotated key heads and its value heads (fp16) at [slot, kv_head, position] of this layer's cache.
"""

from numba import cuda


def rope_and_cache(qkv, positions, slots, cos, sin, k_cache, v_cache, q_out, num_heads):
    """qkv [T, (H + 2 KVH) * D] f32; positions, slots [T] i32; cos, sin [L, D/2] f32;
    k_cache, v_cache [S, KVH, L, D] f16; q_out [T, H * D] f32. Grid (T, ceil(work / block)):
    a thread per rotated pair ((H + KVH) * D/2 of them) or copied value (KVH * D), so a decode
    step's token is spread over many blocks instead of looping in one."""
    t = cuda.blockIdx.x
    e = cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x
    position = positions[t]
    slot = slots[t]
    kv_heads = k_cache.shape[1]
    dim = k_cache.shape[3]
    half = dim // 2
    rotations = (num_heads + kv_heads) * half
    if e < rotations:
        head = e // half
        i = e % half
        c = cos[position, i]
        s = sin[position, i]
        a = qkv[t, head * dim + i]
        b = qkv[t, head * dim + i + half]
        first = a * c - b * s
        second = b * c + a * s
        if head < num_heads:
            q_out[t, head * dim + i] = first
            q_out[t, head * dim + i + half] = second
        else:
            kv = head - num_heads
            k_cache[slot, kv, position, i] = first
            k_cache[slot, kv, position, i + half] = second
    elif e < rotations + kv_heads * dim:
        e -= rotations
        v_cache[slot, e // dim, position, e % dim] = qkv[t, (num_heads + kv_heads) * dim + e]


KERNELS = {
    "rope_and_cache": (rope_and_cache, "void(float32[:, ::1], int32[::1], int32[::1], "
                                       "float32[:, ::1], float32[:, ::1], float16[:, :, :, ::1], "
                                       "float16[:, :, :, ::1], float32[:, ::1], int32)"),
}
