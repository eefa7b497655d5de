"""Run from the repository: python docs/results/probe_swiglu_epilogue_kernels_2026-11-30.py BUILD_DIR, then on the device
python docs/results/probe_swiglu_epilogue_run_2026-11-30.py BUILD_DIR (OUT=folder for the JSON).

Probe: the batch-1 gate_up GEMV with a SwiGLU epilogue (a block owns 32 gate rows and their
32 up rows, so it can write silu(g) * u and the down_proj digits itself). Built locally into
scripts/.probe_glue (index.json + cubins), timed on the device by .probe_glue_run.py."""
import json, math, re, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository
import math
from numba import cuda, float32, int32, uint32
from zse_runtime.kernels import build
from zse_runtime.kernels.common import WARP, warp_sum
from zse_runtime.kernels.gemv_int4 import KERNELS as GEMV, NIBBLES, LO_RADIX, _group_shift
from zse_runtime.kernels.memory import dot4_u8s8, load_at, load_u32x4_at, load_u32x4_streaming_at
from zse_runtime.kernels.quantize_activations import quantize_lane


def make(rows_per_group, group_threads):
    groups = 64 // rows_per_group   # 32 gate rows + 32 up rows per block
    R = rows_per_group

    def swiglu_gemv(xq, xstep, xsum, qweight, scales, zeros, group_size, out, aq, astep, asum):
        tid = cuda.threadIdx.x
        grp = tid // group_threads
        gl = tid % group_threads
        lane = gl % WARP
        warp = gl // WARP
        gwarps = group_threads // WARP
        inter = qweight.shape[0] // 2
        blocks = qweight.shape[1] // 4
        half = groups // 2
        first = cuda.blockIdx.x * 32 + (grp % half) * R + (inter if grp >= half else 0)
        group_shift = _group_shift(group_size)
        acc = cuda.local.array(R, float32)
        words = cuda.local.array((R, 4), uint32)
        scale = cuda.local.array(R, float32)
        zero = cuda.local.array(R, float32)
        hi_dot = cuda.local.array(R, int32)
        lo_dot = cuda.local.array(R, int32)
        row_word = cuda.local.array(R, uint32)
        row_group = cuda.local.array(R, uint32)
        for r in range(R):
            n = uint32(first + r)
            row_word[r] = uint32(n * uint32(qweight.shape[1]))
            row_group[r] = uint32(n * uint32(scales.shape[1]))
            acc[r] = float32(0.0)
        for b in range(warp * WARP + lane, blocks, gwarps * WARP):
            g = uint32(uint32(b) >> group_shift)
            word0 = uint32(uint32(b) * uint32(4))
            for r in range(R):
                words[r, 0], words[r, 1], words[r, 2], words[r, 3] = load_u32x4_streaming_at(
                    qweight, row_word[r], word0)
                scale[r] = float32(load_at(scales, row_group[r], g))
                zero[r] = float32(load_at(zeros, row_group[r], g))
            for r in range(R):
                hi_dot[r] = int32(0)
                lo_dot[r] = int32(0)
            for word in range(4):
                hi_even, hi_odd, lo_even, lo_odd = load_u32x4_at(
                    xq, uint32(0), uint32(word0 * uint32(4) + uint32(4 * word)))
                for r in range(R):
                    even = words[r, word] & NIBBLES
                    odd = (words[r, word] >> uint32(4)) & NIBBLES
                    hi_dot[r] = dot4_u8s8(odd, hi_odd, dot4_u8s8(even, hi_even, hi_dot[r]))
                    lo_dot[r] = dot4_u8s8(odd, lo_odd, dot4_u8s8(even, lo_even, lo_dot[r]))
            step = load_at(xstep, uint32(0), b)
            block_sum = load_at(xsum, uint32(0), b)
            for r in range(R):
                digits = float32(int32(hi_dot[r] * LO_RADIX + lo_dot[r]))
                acc[r] += scale[r] * (step * digits - zero[r] * block_sum)
        partial = cuda.shared.array((64, 2), float32)  # row of the block, warp of its group
        for r in range(R):
            total = warp_sum(acc[r])
            if lane == 0:
                partial[grp * R + r, warp] = total
        cuda.syncthreads()
        if tid < WARP:
            g_row = (tid // R) * R + tid % R            # gate rows are groups 0..half-1
            u_row = 32 + g_row
            gate = float32(0.0)
            up = float32(0.0)
            for w in range(gwarps):
                gate += partial[g_row, w]
                up += partial[u_row, w]
            value = gate / (float32(1.0) + math.exp(-gate)) * up
            column = cuda.blockIdx.x * 32 + tid
            out[0, column] = value
            quantize_lane(value, column, True, aq, astep, asum, 0)

    return swiglu_gemv


SIG = ("void(uint32[:, ::1], float32[:, ::1], float32[:, ::1], uint32[:, ::1], float16[:, ::1], "
       "float16[:, ::1], int32, float32[:, ::1], uint32[:, ::1], float32[:, ::1], float32[:, ::1])")
VARIANTS = {"swiglu_r8_g64": (8, 64, 96), "swiglu_r8_g32": (8, 32, 96),
            "swiglu_r16_g64": (16, 64, 128), "swiglu_r16_g32": (16, 32, 128),
            "swiglu_r8_g64_c80": (8, 64, 80)}

if __name__ == "__main__":
    import math as _m
    out = Path(sys.argv[1])  # a folder for index.json and kernels.sm_90.cubin
    ptx, entries = {}, {}
    f, sig = GEMV["int4_gemv_t1_r8"]
    text, _ = cuda.compile_ptx(f, sig, cc=(7, 5), lineinfo=False)
    ptx["ref_t1_r8"] = build._cap_registers(text, 96)
    for name, (R, G, cap) in VARIANTS.items():
        text, _ = cuda.compile_ptx(make(R, G), SIG, cc=(7, 5), lineinfo=False)
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
