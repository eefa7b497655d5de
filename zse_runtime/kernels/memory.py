"""Loads, bit casts and integer intrinsics that numba's indexing and operators cannot express,
as PTX through inline asm (or libdevice).

numba indexes arrays one element at a time with no alignment information, so a lane reading 8
consecutive floats issues 8 scalar loads; across a warp those are 8 requests spanning 1 KB each.
The 16-byte vector loads here bring the same bytes in 2 requests (callers guarantee 16-byte
alignment: every weight row and activation row starts on a multiple of 16 bytes). Weights are
read with `.cs` (evict first: streamed once per step, so they should not push the activations
out of L1/L2).

Each helper has a plain-Python twin for the CUDA simulator, which has no inline asm.
"""

from __future__ import annotations

import numpy as np
from numba import config, cuda, types

if config.ENABLE_CUDASIM:

    @cuda.jit(device=True, inline="always")
    def load_f32x4(array, row, col):
        return array[row, col], array[row, col + 1], array[row, col + 2], array[row, col + 3]

    @cuda.jit(device=True, inline="always")
    def load_u32x4_streaming(array, row, col):
        return array[row, col], array[row, col + 1], array[row, col + 2], array[row, col + 3]

    @cuda.jit(device=True, inline="always")
    def load_u32x4(array, row, col):
        return array[row, col], array[row, col + 1], array[row, col + 2], array[row, col + 3]

    @cuda.jit(device=True, inline="always")
    def load_u32x4_at(array, offset, extra):
        flat = array.reshape(-1)
        i = int(offset) + int(extra)
        return flat[i], flat[i + 1], flat[i + 2], flat[i + 3]

    load_u32x4_streaming_at = load_u32x4_at

    @cuda.jit(device=True, inline="always")
    def load_at(array, offset, extra):
        return array.reshape(-1)[int(offset) + int(extra)]

    @cuda.jit(device=True, inline="always")
    def dot4_u8s8(unsigned_bytes, signed_bytes, accumulator):
        # Python ints, not numpy scalars: the simulator calls this for every word of every lane
        a, b, total = int(unsigned_bytes), int(signed_bytes), int(accumulator)
        for shift in (0, 8, 16, 24):
            signed = (b >> shift) & 0xFF
            total += ((a >> shift) & 0xFF) * (signed - 256 if signed >= 128 else signed)
        return np.int32((total + 2**31) % 2**32 - 2**31)  # dp4a's 32-bit accumulator wraps

    @cuda.jit(device=True, inline="always")
    def mulhi_u32(a, b):
        return np.uint32((int(a) * int(b)) >> 32)

    @cuda.jit(device=True, inline="always")
    def load(array, row, col):
        return array[row, col]

    @cuda.jit(device=True, inline="always")
    def load_l2_f32(array, index):
        return array[index]

    @cuda.jit(device=True, inline="always")
    def bits_as_float(bits):
        return np.uint32(bits).view(np.float32)

    @cuda.jit(device=True, inline="always")
    def float_bits(value):
        return np.float32(value).view(np.uint32)

    @cuda.jit(device=True, inline="always")
    def floats_as_halves(low, high):
        return np.array([low, high], np.float32).astype(np.float16).view(np.uint32)[0]

    @cuda.jit(device=True, inline="always")
    def codes_as_halves(word, j):
        codes = np.array([(word >> (4 * j)) & 0xF, (word >> (4 * j + 16)) & 0xF], np.float16)
        return codes.view(np.uint32)[0]

    @cuda.jit(device=True, inline="always")
    def mma_m16n8k8(a0, a1, b0, c0, c1, c2, c3):
        # The warp-wide tensor-core product emulated through shared memory: every lane publishes
        # its fragments, then computes the four results it owns (PTX ISA, "mma.m16n8k8" with
        # .f16 inputs and .f32 accumulators). All threads of the block must call it together.
        fragments = cuda.shared.array((32, 32, 3), np.uint32)
        warp = cuda.threadIdx.x // 32
        lane = cuda.threadIdx.x % 32
        fragments[warp, lane, 0] = a0
        fragments[warp, lane, 1] = a1
        fragments[warp, lane, 2] = b0
        cuda.syncthreads()
        halves = np.array(fragments[warp]).view(np.float16).astype(np.float32)  # [lane, 6]
        a = np.concatenate([halves[:, 0:2].reshape(8, 8), halves[:, 2:4].reshape(8, 8)])  # [16, 8]
        b = halves[:, 4:6].reshape(8, 8)  # [token, k]
        group = lane // 4
        pair = lane % 4
        results = [c0, c1, c2, c3]
        for index in range(4):
            row = group + 8 * (index // 2)
            col = 2 * pair + index % 2
            results[index] = np.float32(results[index]) + np.float32(np.dot(a[row], b[col]))
        cuda.syncthreads()
        return results[0], results[1], results[2], results[3]

    @cuda.jit(device=True, inline="always")
    def halves_as_floats(bits):
        pair = np.array([bits], np.uint32).view(np.float16)
        return np.float32(pair[0]), np.float32(pair[1])

else:
    from llvmlite import ir
    from numba.cuda import cgutils, libdevice
    from numba.cuda.extending import intrinsic

    def _element_pointer(context, builder, array_type, array, indices, index_types):
        """Address of array[indices] (no negative-index wraparound: callers index in range)."""
        indices = [context.cast(builder, value, ty, types.intp)
                   for value, ty in zip(indices, index_types)]
        struct = context.make_array(array_type)(context, builder, value=array)
        return cgutils.get_item_pointer(context, builder, array_type, struct, indices,
                                        wraparound=False)

    def _vector_load(element, llvm_element, constraint, instruction):
        @intrinsic
        def load(typingctx, array, row, col):
            signature = types.UniTuple(element, 4)(array, row, col)

            def codegen(context, builder, sig, args):
                pointer = _element_pointer(context, builder, sig.args[0], args[0], args[1:],
                                           sig.args[1:])
                result = ir.LiteralStructType([llvm_element] * 4)
                asm = ir.InlineAsm(ir.FunctionType(result, [pointer.type]),
                                   f"{instruction} {{$0, $1, $2, $3}}, [$4];",
                                   f"={constraint},={constraint},={constraint},={constraint},l")
                loaded = builder.call(asm, [pointer])
                values = [builder.extract_value(loaded, i) for i in range(4)]
                return context.make_tuple(builder, sig.return_type, values)

            return signature, codegen

        return load

    _load_f32x4 = _vector_load(types.float32, ir.FloatType(), "f", "ld.global.nc.v4.f32")
    _load_u32x4_streaming = _vector_load(types.uint32, ir.IntType(32), "r",
                                         "ld.global.cs.v4.u32")
    _load_u32x4 = _vector_load(types.uint32, ir.IntType(32), "r", "ld.global.nc.v4.u32")

    def _flat_pointer(context, builder, sig, args):
        """Address of element offset + extra of the C-contiguous array args[0] (both uint32, each
        widened on its own: base + offset * size + extra * size, two IMAD.WIDE.U32 at most, and
        a constant `extra` folds into the load's immediate). numba's 2-D indexing instead
        multiplies 64-bit indices by 64-bit strides for every load."""
        struct = context.make_array(sig.args[0])(context, builder, value=args[0])
        pointer = struct.data
        for value, value_type in zip(args[1:3], sig.args[1:3]):
            index = builder.zext(context.cast(builder, value, value_type, types.uint32),
                                 ir.IntType(64))
            pointer = builder.gep(pointer, [index])
        return pointer

    def _vector_load_at(instruction):
        def load(typingctx, array, offset, extra):
            def codegen(context, builder, sig, args):
                pointer = _flat_pointer(context, builder, sig, args)
                result = ir.LiteralStructType([ir.IntType(32)] * 4)
                asm = ir.InlineAsm(ir.FunctionType(result, [pointer.type]),
                                   f"{instruction} {{$0, $1, $2, $3}}, [$4];", "=r,=r,=r,=r,l")
                loaded = builder.call(asm, [pointer])
                values = [builder.extract_value(loaded, i) for i in range(4)]
                return context.make_tuple(builder, sig.return_type, values)

            return types.UniTuple(types.uint32, 4)(array, offset, extra), codegen

        return intrinsic(load)

    _load_u32x4_at = _vector_load_at("ld.global.nc.v4.u32")
    _load_u32x4_streaming_at = _vector_load_at("ld.global.cs.v4.u32")

    @intrinsic
    def _load_at(typingctx, array, offset, extra):
        def codegen(context, builder, sig, args):
            return builder.load(_flat_pointer(context, builder, sig, args))

        return array.dtype(array, offset, extra), codegen

    @intrinsic
    def _dot4_u8s8(typingctx, unsigned_bytes, signed_bytes, accumulator):
        def codegen(context, builder, sig, args):
            asm = ir.InlineAsm(ir.FunctionType(ir.IntType(32), [ir.IntType(32)] * 3),
                               "dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r")
            values = [context.cast(builder, value, ty, want) for value, ty, want
                      in zip(args, sig.args, (types.uint32, types.uint32, types.int32))]
            return builder.call(asm, values)

        return types.int32(unsigned_bytes, signed_bytes, accumulator), codegen

    @intrinsic
    def _load(typingctx, array, row, col):
        def codegen(context, builder, sig, args):
            return builder.load(_element_pointer(context, builder, sig.args[0], args[0], args[1:],
                                                 sig.args[1:]))

        return array.dtype(array, row, col), codegen

    @intrinsic
    def _load_l2_f32(typingctx, array, index):
        def codegen(context, builder, sig, args):
            index_types = list(sig.args[1])
            indices = [builder.extract_value(args[1], i) for i in range(len(index_types))]
            pointer = _element_pointer(context, builder, sig.args[0], args[0], indices,
                                       index_types)
            asm = ir.InlineAsm(ir.FunctionType(ir.FloatType(), [pointer.type]),
                               "ld.global.cg.f32 $0, [$1];", "=f,l")
            return builder.call(asm, [pointer])

        return types.float32(array, index), codegen

    @intrinsic
    def _bits_as_float(typingctx, bits):
        def codegen(context, builder, sig, args):
            word = context.cast(builder, args[0], sig.args[0], types.uint32)
            return builder.bitcast(word, ir.FloatType())

        return types.float32(bits), codegen

    @intrinsic
    def _float_bits(typingctx, value):
        signature = types.uint32(value)

        def codegen(context, builder, sig, args):
            single = context.cast(builder, args[0], sig.args[0], types.float32)
            return builder.bitcast(single, ir.IntType(32))

        return signature, codegen

    @intrinsic
    def _floats_as_halves(typingctx, low, high):
        def codegen(context, builder, sig, args):
            values = [context.cast(builder, v, t, types.float32) for v, t in zip(args, sig.args)]
            asm = ir.InlineAsm(ir.FunctionType(ir.IntType(32), [ir.FloatType()] * 2),
                               "{ .reg .b16 lo, hi; cvt.rn.f16.f32 lo, $1; cvt.rn.f16.f32 hi, $2; "
                               "mov.b32 $0, {lo, hi}; }", "=r,f,f")
            return builder.call(asm, values)

        return types.uint32(low, high), codegen

    @intrinsic
    def _codes_as_halves(typingctx, word, j):
        def codegen(context, builder, sig, args):
            word = context.cast(builder, args[0], sig.args[0], types.uint32)
            shift = builder.trunc(context.cast(builder, args[1], sig.args[1], types.int64),
                                  ir.IntType(32))
            shifted = builder.lshr(word, builder.mul(shift, ir.Constant(ir.IntType(32), 4)))
            # nibbles j and j + 4 in the low and high halves, as the fp16 numbers 1024 + q ...
            biased = builder.or_(builder.and_(shifted, ir.Constant(ir.IntType(32), 0x000F000F)),
                                 ir.Constant(ir.IntType(32), 0x64006400))
            # ... minus 1024 in both halves: q exactly
            asm = ir.InlineAsm(ir.FunctionType(ir.IntType(32), [ir.IntType(32)] * 2),
                               "sub.f16x2 $0, $1, $2;", "=r,r,r")
            return builder.call(asm, [biased, ir.Constant(ir.IntType(32), 0x64006400)])

        return types.uint32(word, j), codegen

    @intrinsic
    def _mma_m16n8k8(typingctx, a0, a1, b0, c0, c1, c2, c3):
        def codegen(context, builder, sig, args):
            wants = (types.uint32,) * 3 + (types.float32,) * 4
            values = [context.cast(builder, v, t, w) for v, t, w in zip(args, sig.args, wants)]
            result = ir.LiteralStructType([ir.FloatType()] * 4)
            asm = ir.InlineAsm(
                ir.FunctionType(result, [ir.IntType(32)] * 3 + [ir.FloatType()] * 4),
                "mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 "
                "{$0, $1, $2, $3}, {$4, $5}, {$6}, {$7, $8, $9, $10};",
                "=f,=f,=f,=f,r,r,r,f,f,f,f")
            out = builder.call(asm, values)
            return context.make_tuple(builder, sig.return_type,
                                      [builder.extract_value(out, i) for i in range(4)])

        return types.UniTuple(types.float32, 4)(a0, a1, b0, c0, c1, c2, c3), codegen

    @intrinsic
    def _halves_as_floats(typingctx, bits):
        signature = types.UniTuple(types.float32, 2)(bits)

        def codegen(context, builder, sig, args):
            result = ir.LiteralStructType([ir.FloatType()] * 2)
            asm = ir.InlineAsm(ir.FunctionType(result, [ir.IntType(32)]),
                               "{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $2; "
                               "cvt.f32.f16 $0, lo; cvt.f32.f16 $1, hi; }", "=f,=f,r")
            pair = builder.call(asm, [args[0]])
            values = [builder.extract_value(pair, i) for i in range(2)]
            return context.make_tuple(builder, sig.return_type, values)

        return signature, codegen

    load_f32x4 = _load_f32x4  # array[row, col:col + 4], float32; col * 4 a multiple of 16
    load_u32x4_streaming = _load_u32x4_streaming  # the same for uint32, evict-first
    load_u32x4 = _load_u32x4  # array[row, col:col + 4], uint32, read-only cache path
    # accumulator + the dot product of 4 unsigned bytes with 4 signed bytes (dp4a, sm_61+)
    dot4_u8s8 = _dot4_u8s8

    @cuda.jit(device=True, inline="always")
    def mulhi_u32(a, b):
        """The high 32 bits of the 64-bit product of two uint32 (mul.hi.u32)."""
        return libdevice.umulhi(a, b)
    load = _load  # array[row, col] without numba's negative-index wraparound
    # the same three loads at element offset + extra of a C-contiguous array, both uint32
    # (a row's start and a position in it: fewer address instructions than [row, col])
    load_u32x4_at = _load_u32x4_at  # flat[offset + extra:offset + extra + 4], read-only path
    load_u32x4_streaming_at = _load_u32x4_streaming_at  # the same, evict-first
    load_at = _load_at  # flat[offset + extra]
    # array[index] (a tuple), float32, from L2 (.cg): never from an L1 line this SM may hold
    # from before another block of the same launch wrote it (attention.py's last-block merge)
    load_l2_f32 = _load_l2_f32
    float_bits = _float_bits  # the bit pattern of a float32, as a uint32
    bits_as_float = _bits_as_float  # the float32 with this bit pattern
    halves_as_floats = _halves_as_floats  # the two float16 halves of a uint32, low first
    floats_as_halves = _floats_as_halves  # two float32 rounded to float16, packed low first
    # nibbles j and j + 4 of a weight word as two exact float16 numbers (low, high)
    codes_as_halves = _codes_as_halves
    # D = A B + C on tensor cores, one m16n8k8 tile per warp (fp16 inputs, fp32 accumulators;
    # fragment layouts in the PTX ISA; sm_75+). Every lane of the warp must call it together.
    mma_m16n8k8 = _mma_m16n8k8
