"""Run from the repository: python docs/results/probe_persistent_gemv_kernels_2026-11-30.py BUILD_DIR,
then on the device python docs/results/probe_persistent_gemv_run_2026-11-30.py BUILD_DIR.

Probe: a persistent, software-pipelined batch-1 INT4 GEMV. A warp owns tasks of R rows
(task = global warp, + all warps, ...) and walks its (task, k-block) items with two register
buffers: the next item's weights are loaded before this one's dot products. No block barrier,
no shared memory: each task ends in warp sums. Built into a folder given on the command line
(index.json + sm_90 cubin), with the shipped kernels beside it as the reference."""
import json, re, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository
from numba import cuda, float32, int32, uint32
from zse_runtime.kernels import build
from zse_runtime.kernels.common import WARP, warp_sum
from zse_runtime.kernels.gemv_int4 import KERNELS as GEMV, NIBBLES, LO_RADIX, _group_shift
from zse_runtime.kernels.memory import dot4_u8s8, load_at, load_u32x4_at, load_u32x4_streaming_at

SIG = ("void(uint32[:, ::1], float32[:, ::1], float32[:, ::1], uint32[:, ::1], float16[:, ::1], "
       "float16[:, ::1], int32, float32[:, ::1])")


def make(R):
    @cuda.jit(device=True, inline="always")
    def load_item(qweight, scales, zeros, row0, rows, kb, kblocks, group_shift, words, scale, zero):
        if kb < kblocks:
            g = uint32(uint32(kb) >> group_shift)
            word0 = uint32(uint32(kb) * uint32(4))
            for r in range(R):
                n = uint32(min(row0 + r, rows - 1))
                words[r, 0], words[r, 1], words[r, 2], words[r, 3] = load_u32x4_streaming_at(
                    qweight, uint32(n * uint32(qweight.shape[1])), word0)
                scale[r] = float32(load_at(scales, uint32(n * uint32(scales.shape[1])), g))
                zero[r] = float32(load_at(zeros, uint32(n * uint32(scales.shape[1])), g))

    @cuda.jit(device=True, inline="always")
    def compute_item(xq, xstep, xsum, kb, kblocks, words, scale, zero, acc):
        if kb < kblocks:
            word0 = uint32(uint32(kb) * uint32(4))
            hi = cuda.local.array(R, int32)
            lo = cuda.local.array(R, int32)
            for r in range(R):
                hi[r] = int32(0)
                lo[r] = int32(0)
            for word in range(4):
                he, ho, le, lo_odd = load_u32x4_at(xq, uint32(0), uint32(word0 * uint32(4) + uint32(4 * word)))
                for r in range(R):
                    even = words[r, word] & NIBBLES
                    odd = (words[r, word] >> uint32(4)) & NIBBLES
                    hi[r] = dot4_u8s8(odd, ho, dot4_u8s8(even, he, hi[r]))
                    lo[r] = dot4_u8s8(odd, lo_odd, dot4_u8s8(even, le, lo[r]))
            step = load_at(xstep, uint32(0), kb)
            block_sum = load_at(xsum, uint32(0), kb)
            for r in range(R):
                digits = float32(int32(hi[r] * LO_RADIX + lo[r]))
                acc[r] += scale[r] * (step * digits - zero[r] * block_sum)

    @cuda.jit(device=True, inline="always")
    def finish_task(acc, row0, rows, out):
        lane = cuda.threadIdx.x % WARP
        for r in range(R):
            total = warp_sum(acc[r])
            if lane == 0 and row0 + r < rows:
                out[0, row0 + r] = total
            acc[r] = float32(0.0)

    def gemv(xq, xstep, xsum, qweight, scales, zeros, group_size, out):
        lane = cuda.threadIdx.x % WARP
        me = (cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x) // WARP
        warps = cuda.gridDim.x * cuda.blockDim.x // WARP
        rows = qweight.shape[0]
        kblocks = qweight.shape[1] // 4
        shift = _group_shift(group_size)
        tasks = (rows + R - 1) // R
        per_task = (kblocks + WARP - 1) // WARP
        mine = (tasks - me + warps - 1) // warps if me < tasks else 0
        items = mine * per_task
        wa = cuda.local.array((R, 4), uint32)
        sa = cuda.local.array(R, float32)
        za = cuda.local.array(R, float32)
        wb = cuda.local.array((R, 4), uint32)
        sb = cuda.local.array(R, float32)
        zb = cuda.local.array(R, float32)
        acc = cuda.local.array(R, float32)
        for r in range(R):
            acc[r] = float32(0.0)
        if items > 0:
            load_item(qweight, scales, zeros, me * R, rows, lane, kblocks, shift, wa, sa, za)
        i = 0
        while i < items:  # two items per trip: buffer a holds item i, buffer b item i + 1
            j = i + 1
            row_j = (me + (j // per_task) * warps) * R
            if j < items:
                load_item(qweight, scales, zeros, row_j, rows, lane + WARP * (j % per_task),
                          kblocks, shift, wb, sb, zb)
            row_i = (me + (i // per_task) * warps) * R
            compute_item(xq, xstep, xsum, lane + WARP * (i % per_task), kblocks, wa, sa, za, acc)
            if i % per_task == per_task - 1:
                finish_task(acc, row_i, rows, out)
            k = i + 2
            if k < items:
                load_item(qweight, scales, zeros, (me + (k // per_task) * warps) * R, rows,
                          lane + WARP * (k % per_task), kblocks, shift, wa, sa, za)
            if j < items:
                compute_item(xq, xstep, xsum, lane + WARP * (j % per_task), kblocks, wb, sb, zb, acc)
                if j % per_task == per_task - 1:
                    finish_task(acc, row_j, rows, out)
            i += 2

    return gemv


VARIANTS = {"pg_r2_c80": (2, 80), "pg_r2_c96": (2, 96), "pg_r4_c128": (4, 128), "pg_r8_c168": (8, 168)}

if __name__ == "__main__":
    out = Path(sys.argv[1])
    ptx, entries = {}, {}
    for ref, cap in (("int4_gemv_t1_r8", 96), ("int4_gemv_t1_r4", 72)):
        f, sig = GEMV[ref]
        text, _ = cuda.compile_ptx(f, sig, cc=(7, 5), lineinfo=False)
        ptx["ref_" + ref[-2:]] = build._cap_registers(text, cap)
    for name, (R, cap) in VARIANTS.items():
        text, _ = cuda.compile_ptx(make(R), SIG, cc=(7, 5), lineinfo=False)
        ptx[name] = build._cap_registers(text, cap)
    for name, text in ptx.items():
        entries[name] = re.findall(r"\.entry\s+([\w$]+)\s*\(", text)[0]
    out.mkdir(exist_ok=True)
    (out / "kernels.sm_90.cubin").write_bytes(build.link_cubin(ptx, "sm_90"))
    (out / "index.json").write_text(json.dumps({"entries": entries, "ptx_compute_capability": [7, 5]}))
    from tests.test_prebuilt_kernels import _function_attribute, EIATTR_REGCOUNT, EIATTR_FRAME_SIZE
    cub = (out / "kernels.sm_90.cubin").read_bytes()
    regs, frames = _function_attribute(cub, EIATTR_REGCOUNT), _function_attribute(cub, EIATTR_FRAME_SIZE)
    for name, e in entries.items():
        print(name, regs[e], frames.get(e))
