"""Device side of .probe_gemm_kernels.py: shipped prefill GEMM against the prefetched-epilogue
variant, at the 7B shapes, group 32 and 128, 512-token chunks; split_activations at both."""
import json, math, os, sys
from pathlib import Path
import numpy as np
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import Gpu, random_int4
from zse_runtime.gpu.backend import int4_gemm_plan, split_launch
from zse_runtime.gpu.kernels import KernelLibrary
from zse_runtime.kernels import geometry as geo

gpu, rng = Gpu(), np.random.default_rng(0)
lib = KernelLibrary(gpu.context.info.compute_capability, Path(sys.argv[1]))
sms = gpu.context.info.multiprocessors
results = {}
VARIANTS = sys.argv[2].split(",") if len(sys.argv) > 2 else ["ref_int4_gemm", "pf_int4_gemm"]
for name, rows, cols, group in (("qkv", 4608, 3584, 32), ("qkv", 4608, 3584, 128),
                                ("o_proj", 3584, 3584, 128), ("gate_up", 37888, 3584, 128),
                                ("down_proj", 3584, 18944, 128), ("down_proj", 3584, 18944, 32)):
    for tokens in (512,):
        w = random_int4(rng, rows, cols, group)
        q, s, z = gpu.put(w.qweight), gpu.put(w.scales), gpu.put(w.zeros)
        dx = gpu.put(rng.standard_normal((tokens, cols)).astype(np.float32))
        split = (gpu.empty((tokens, cols // 2), np.uint32), gpu.empty((tokens, cols // group), np.float32),
                 gpu.empty((tokens, cols // group), np.float32))
        run_split = lambda: lib.launch("ref_split_activations", *split_launch(tokens, cols, group),
                                       gpu.stream, dx, np.int32(group), *split)
        run_split(); gpu.stream.synchronize()
        kernel, grid = int4_gemm_plan(rows, tokens, cols // group, sms)
        assert kernel == "int4_gemm"
        nobias = gpu.put(np.zeros(1, np.float32))
        outs = {}
        row = {"split_us": min(gpu.time_ms(run_split, 10) for _ in range(3)) * 1e3, "grid": list(grid)}
        for variant in VARIANTS:
            out = gpu.empty((grid[2] * tokens, rows), np.float32)
            run = lambda: lib.launch(variant, grid, geo.GEMM_THREADS, gpu.stream, *split, q, s, z,
                                     np.int32(group), nobias, np.int32(0), out)
            run(); gpu.stream.synchronize()
            outs[variant] = gpu.get(out)
            row[variant] = min(gpu.time_ms(run, 10) for _ in range(3)) * 1e3
        row["max_abs_diff"] = max(float(np.abs(outs[VARIANTS[0]] - outs[v]).max()) for v in VARIANTS)
        row["max_abs"] = float(np.abs(outs[VARIANTS[0]]).max())
        key = f"{name} {rows}x{cols} g{group} T{tokens}"
        results[key] = row
        print(f"{key:34s} split {row['split_us']:6.1f} us " + " ".join(
              f"{v.split('_')[0]} {row[v]:7.1f}" for v in VARIANTS) +
              f"  diff {row['max_abs_diff']:.1e}", flush=True)
        gpu.free_all()
json.dump(results, open(os.environ.get("OUT", "/tmp") + f"/gemm_probe_{len(VARIANTS)}.json", "w"), indent=1)
