"""Probe 2: which of the prefill GEMM's epilogue operands to load ahead (rows' scales and zeros,
tokens' unscales and sums, or both), against the kernel before the change; sm_90 cubin."""
import importlib, json, re, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from numba import cuda
from zse_runtime.kernels import build
out = Path(sys.argv[1]); ptx, entries = {}, {}
for name in ("old", "rows", "tokens", "both"):
    mod = importlib.import_module(f"zse_runtime.kernels._pv_{name}")
    f, sig = mod.KERNELS["int4_gemm"]
    text, _ = cuda.compile_ptx(f, sig, cc=(7, 5), lineinfo=False)
    ptx[f"{name}_int4_gemm"] = build._cap_registers(text, 168) if name != "old" else text
    if name == "old":
        ptx["ref_split_activations"], _ = cuda.compile_ptx(*mod.KERNELS["split_activations"], cc=(7, 5), lineinfo=False)
for name, text in ptx.items():
    entries[name] = re.findall(r"\.entry\s+([\w$]+)\s*\(", text)[0]
out.mkdir(exist_ok=True)
(out / "kernels.sm_90.cubin").write_bytes(build.link_cubin(ptx, "sm_90"))
(out / "index.json").write_text(json.dumps({"entries": entries, "ptx_compute_capability": [7, 5]}))
from tests.test_prebuilt_kernels import _function_attribute, EIATTR_REGCOUNT, EIATTR_FRAME_SIZE
for arch in ("sm_75", "sm_90"):
    cub = build.link_cubin(ptx, arch)
    regs, frames = _function_attribute(cub, EIATTR_REGCOUNT), _function_attribute(cub, EIATTR_FRAME_SIZE)
    print(arch, {n: (regs[e], frames.get(e)) for n, e in entries.items()})
