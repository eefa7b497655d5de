"""Run from the repository: python docs/results/probe_gemv_variants_kernels_2026-11-30.py BUILD_DIR, then on the device
python docs/results/probe_gemv_variants_run_2026-11-30.py BUILD_DIR (OUT=folder for the JSON).

Probe: does the batch-1 INT4 GEMV's instruction count matter? Variants of gemv_int4's
kernel body: 'ref' (as shipped), 'odd16' (odd nibbles kept in place, w & 0xF0F0F0F0: one
instruction fewer per word, exact: their dot is 16x and shifted back per block), 'hi_only'
(one activation digit: half the dp4a, NOT exact, measures the saving only). Built locally
into scripts/.probe_gv (index.json + sm_90 cubin); timed by .probe_gv_run.py on the device."""
import json, re, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository
from numba import cuda, float32, int32, uint32
from zse_runtime.kernels import build
from zse_runtime.kernels.common import WARP, store_gemv_tile
from zse_runtime.kernels.gemv_int4 import NIBBLES, LO_RADIX, _group_shift, _SIGNATURE
from zse_runtime.kernels.memory import dot4_u8s8, load_at, load_u32x4_at, load_u32x4_streaming_at

HIGH_NIBBLES = uint32(0xF0F0F0F0)


def make(block_rows, mode):
    tokens = 1

    def int4_gemv(xq, xstep, xsum, qweight, scales, zeros, group_size, bias, has_bias, out):
        lane = cuda.threadIdx.x % WARP
        warp = cuda.threadIdx.x // WARP
        warps = cuda.blockDim.x // WARP
        rows = qweight.shape[0]
        blocks = qweight.shape[1] // 4
        last_token = xq.shape[0] - 1
        n0 = cuda.blockIdx.x * block_rows
        t0 = cuda.blockIdx.y * tokens
        group_shift = _group_shift(group_size)
        acc = cuda.local.array((tokens, block_rows), float32)
        words = cuda.local.array((block_rows, 4), uint32)
        scale = cuda.local.array(block_rows, float32)
        zero = cuda.local.array(block_rows, float32)
        hi_dot = cuda.local.array(block_rows, int32)
        lo_dot = cuda.local.array(block_rows, int32)
        hi_odd = cuda.local.array(block_rows, int32)
        lo_odd = cuda.local.array(block_rows, int32)
        row_word = cuda.local.array(block_rows, uint32)
        row_group = cuda.local.array(block_rows, uint32)
        for r in range(block_rows):
            n = uint32(min(n0 + r, rows - 1))
            row_word[r] = uint32(n * uint32(qweight.shape[1]))
            row_group[r] = uint32(n * uint32(scales.shape[1]))
        for r in range(block_rows):
            acc[0, r] = float32(0.0)
        for b in range(warp * WARP + lane, blocks, warps * WARP):
            g = uint32(uint32(b) >> group_shift)
            word0 = uint32(uint32(b) * uint32(4))
            for r in range(block_rows):
                words[r, 0], words[r, 1], words[r, 2], words[r, 3] = load_u32x4_streaming_at(
                    qweight, row_word[r], word0)
                scale[r] = float32(load_at(scales, row_group[r], g))
                zero[r] = float32(load_at(zeros, row_group[r], g))
            for r in range(block_rows):
                hi_dot[r] = int32(0)
                lo_dot[r] = int32(0)
                hi_odd[r] = int32(0)
                lo_odd[r] = int32(0)
            for word in range(4):
                x_he, x_ho, x_le, x_lo = load_u32x4_at(xq, uint32(0), uint32(word0 * uint32(4) + uint32(4 * word)))
                for r in range(block_rows):
                    even = words[r, word] & NIBBLES
                    if mode == 1:  # odd16
                        odd16 = words[r, word] & HIGH_NIBBLES
                        hi_dot[r] = dot4_u8s8(even, x_he, hi_dot[r])
                        hi_odd[r] = dot4_u8s8(odd16, x_ho, hi_odd[r])
                        lo_dot[r] = dot4_u8s8(even, x_le, lo_dot[r])
                        lo_odd[r] = dot4_u8s8(odd16, x_lo, lo_odd[r])
                    elif mode == 2:  # hi only
                        odd = (words[r, word] >> uint32(4)) & NIBBLES
                        hi_dot[r] = dot4_u8s8(odd, x_ho, dot4_u8s8(even, x_he, hi_dot[r]))
                    else:
                        odd = (words[r, word] >> uint32(4)) & NIBBLES
                        hi_dot[r] = dot4_u8s8(odd, x_ho, dot4_u8s8(even, x_he, hi_dot[r]))
                        lo_dot[r] = dot4_u8s8(odd, x_lo, dot4_u8s8(even, x_le, lo_dot[r]))
            step = load_at(xstep, uint32(0), b)
            block_sum = load_at(xsum, uint32(0), b)
            for r in range(block_rows):
                if mode == 1:
                    digits = float32(int32(hi_dot[r] * LO_RADIX + lo_dot[r]
                                           + ((hi_odd[r] * LO_RADIX + lo_odd[r]) >> 4)))
                elif mode == 2:
                    digits = float32(int32(hi_dot[r] * LO_RADIX))
                else:
                    digits = float32(int32(hi_dot[r] * LO_RADIX + lo_dot[r]))
                acc[0, r] += scale[r] * (step * digits - zero[r] * block_sum)
        partial = cuda.shared.array((tokens, block_rows, WARP), float32)
        store_gemv_tile(acc, partial, n0, t0, rows, last_token, bias, has_bias, out)

    return int4_gemv


VARIANTS = {}
for rows_, cap in ((8, 96), (4, 72)):
    for mode, label in ((0, "ref"), (1, "odd16"), (2, "hi_only")):
        VARIANTS[f"r{rows_}_{label}"] = (rows_, mode, cap)
        VARIANTS[f"r{rows_}_{label}_nocap"] = (rows_, mode, 0)
VARIANTS["r8_odd16_c112"] = (8, 1, 112)
VARIANTS["r8_odd16_c128"] = (8, 1, 128)
VARIANTS["r4_odd16_c80"] = (4, 1, 80)

if __name__ == "__main__":
    out = Path(sys.argv[1])  # a folder for index.json and kernels.sm_90.cubin
    ptx, entries = {}, {}
    for name, (rows_, mode, cap) in VARIANTS.items():
        text, _ = cuda.compile_ptx(make(rows_, mode), _SIGNATURE, cc=(7, 5), lineinfo=False)
        ptx[name] = build._cap_registers(text, cap) if cap else text
        entries[name] = re.findall(r"\.entry\s+([\w$]+)\s*\(", text)[0]
    out.mkdir(exist_ok=True)
    (out / "kernels.sm_90.cubin").write_bytes(build.link_cubin(ptx, "sm_90"))
    (out / "index.json").write_text(json.dumps({"entries": entries, "ptx_compute_capability": [7, 5]}))
    from tests.test_prebuilt_kernels import _function_attribute, EIATTR_REGCOUNT, EIATTR_FRAME_SIZE
    cub = (out / "kernels.sm_90.cubin").read_bytes()
    regs, frames = _function_attribute(cub, EIATTR_REGCOUNT), _function_attribute(cub, EIATTR_FRAME_SIZE)
    for name, e in entries.items():
        print(name, regs[e], frames.get(e))
