"""Probe: the prefill INT4 GEMM with each group's epilogue operands (scales, zeros of the lane's
rows; unscale and xsum of its tokens) loaded before the group's MMAs instead of after them, so
their latency hides behind the MMAs; at group 32 the epilogue comes after every quad. Built into
a folder given on the command line (index.json + sm_90 cubin) beside the shipped kernel."""
import json, re, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from numba import cuda, float32, uint32
from zse_runtime.kernels import build
from zse_runtime.kernels.gemm_int4 import KERNELS as GEMM, _GEMM_SIGNATURE
from zse_runtime.kernels.geometry import GEMM_TILE_N, GEMM_TILE_T
from zse_runtime.kernels.memory import codes_as_halves, load, load_u32x4, mma_m16n8k8
from zse_runtime.kernels.mma_tile import A_REGISTERS, M_TILES, N_TILES, make_warp_tile, store_tile


def make(tile_rows, tile_tokens):
    warp_tile = make_warp_tile(tile_rows, tile_tokens)

    def int4_gemm_pf(halves, xsum, unscale, qweight, scales, zeros, group_size, bias, has_bias, out):
        pair = cuda.threadIdx.x % 4
        rows = qweight.shape[0]
        tokens = halves.shape[0]
        a_rows = cuda.local.array(A_REGISTERS, uint32)
        b_tokens = cuda.local.array(N_TILES, uint32)
        row0, tok0 = warp_tile(rows, tokens, a_rows, b_tokens)
        words_per_group = group_size // 8
        groups = qweight.shape[1] // words_per_group
        per_split = (groups + cuda.gridDim.z - 1) // cuda.gridDim.z
        first_group = cuda.blockIdx.z * per_split
        partial = cuda.local.array((M_TILES, N_TILES, 4), float32)
        acc = cuda.local.array((M_TILES, N_TILES, 4), float32)
        a_words = cuda.local.array((A_REGISTERS, 4), uint32)
        x_words = cuda.local.array((N_TILES, 4), uint32)
        a = cuda.local.array(A_REGISTERS, uint32)
        s_rows = cuda.local.array(A_REGISTERS, float32)
        z_rows = cuda.local.array(A_REGISTERS, float32)
        u_toks = cuda.local.array((N_TILES, 2), float32)
        x_toks = cuda.local.array((N_TILES, 2), float32)
        for i in range(M_TILES):
            for j in range(N_TILES):
                for e in range(4):
                    partial[i, j, e] = float32(0.0)
                    acc[i, j, e] = float32(0.0)
        for g in range(first_group, min(groups, first_group + per_split)):
            for r in range(A_REGISTERS):  # the epilogue's operands, in flight during the MMAs
                s_rows[r] = float32(load(scales, a_rows[r], g))
                z_rows[r] = float32(load(zeros, a_rows[r], g))
            for j in range(N_TILES):
                for c in range(2):
                    t = min(tok0 + 8 * j + 2 * pair + c, tokens - 1)
                    u_toks[j, c] = load(unscale, t, g)
                    x_toks[j, c] = load(xsum, t, g)
            for quad in range(g * words_per_group // 4, (g + 1) * words_per_group // 4):
                for i in range(A_REGISTERS):
                    (a_words[i, 0], a_words[i, 1], a_words[i, 2],
                     a_words[i, 3]) = load_u32x4(qweight, a_rows[i], 4 * quad)
                for j in range(N_TILES):
                    (x_words[j, 0], x_words[j, 1], x_words[j, 2],
                     x_words[j, 3]) = load_u32x4(halves, b_tokens[j], 16 * quad + 4 * pair)
                for chunk in range(4):
                    for i in range(A_REGISTERS):
                        a[i] = codes_as_halves(a_words[i, chunk], pair)
                    for i in range(M_TILES):
                        for j in range(N_TILES):
                            (partial[i, j, 0], partial[i, j, 1], partial[i, j, 2],
                             partial[i, j, 3]) = mma_m16n8k8(a[2 * i], a[2 * i + 1], x_words[j, chunk],
                                                             partial[i, j, 0], partial[i, j, 1],
                                                             partial[i, j, 2], partial[i, j, 3])
            for i in range(M_TILES):
                for half in range(2):
                    s = s_rows[2 * i + half]
                    z = z_rows[2 * i + half]
                    for j in range(N_TILES):
                        for c in range(2):
                            e = 2 * half + c
                            acc[i, j, e] += s * (partial[i, j, e] * u_toks[j, c] - z * x_toks[j, c])
                            partial[i, j, e] = float32(0.0)
        store_tile(acc, row0, tok0, rows, tokens, bias, has_bias != 0 and cuda.blockIdx.z == 0, out,
                   cuda.blockIdx.z * tokens)

    return int4_gemm_pf


if __name__ == "__main__":
    out = Path(sys.argv[1])
    ptx, entries = {}, {}
    for name in ("int4_gemm", "split_activations"):
        f, sig = GEMM[name]
        ptx["ref_" + name], _ = cuda.compile_ptx(f, sig, cc=(7, 5), lineinfo=False)
    ptx["pf_int4_gemm"], _ = cuda.compile_ptx(make(GEMM_TILE_N, GEMM_TILE_T), _GEMM_SIGNATURE,
                                              cc=(7, 5), lineinfo=False)
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
