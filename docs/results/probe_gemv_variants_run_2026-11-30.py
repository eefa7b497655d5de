"""Device side of .probe_gv_kernels.py: us per 7B GEMV shape for each variant (batch 1)."""
import json, math, os, sys
from pathlib import Path
import numpy as np
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from gpu_check import Gpu, quantize_on_device, random_int4, rel_error
from zse_runtime.gpu.kernels import KernelLibrary

gpu, rng = Gpu(), np.random.default_rng(0)
lib = KernelLibrary(gpu.context.info.compute_capability, Path(sys.argv[1]))
names = list(lib.entries)
shapes = {"qkv": (4608, 3584, 4, 64), "o_proj": (3584, 3584, 4, 128), "gate_up": (37888, 3584, 8, 64),
          "down_proj": (3584, 18944, 4, 128), "lm_head_int4": (152064, 3584, 8, 64)}
results = {}
for shape, (rows, cols, block_rows, threads) in shapes.items():
    w = random_int4(rng, rows, cols)
    q, s, z = gpu.put(w.qweight), gpu.put(w.scales), gpu.put(w.zeros)
    x = gpu.put(rng.standard_normal((1, cols)).astype(np.float32))
    xq, xstep, xsum = quantize_on_device(gpu, x)
    bias = gpu.put(np.zeros(rows, np.float32))
    ref_out = None
    for name in names:
        if not name.startswith(f"r{block_rows}_"):
            continue
        out = gpu.empty((1, rows), np.float32)
        run = lambda: lib.launch(name, (math.ceil(rows / block_rows), 1), threads, gpu.stream, xq,
                                 xstep, xsum, q, s, z, np.int32(128), bias, np.int32(0), out)
        run(); gpu.stream.synchronize()
        got = gpu.get(out)[0]
        if ref_out is None:
            ref_out = got
        t = gpu.time_ms(run, 20) * 1e3
        t2 = gpu.time_ms(run, 20) * 1e3
        same = bool(np.array_equal(got, ref_out))
        results[f"{shape} {name}"] = dict(us=min(t, t2), us_runs=[t, t2], bit_equal_ref=same,
                                          rel_err_ref=rel_error(got, ref_out))
        print(f"{shape:13s} {name:18s} {min(t, t2):7.2f} us  equal to ref: {same}  "
              f"rel {rel_error(got, ref_out):.1e}", flush=True)
    gpu.free_all()
Path(os.environ.get("OUT", "/tmp"), "gemv_variants_probe.json").write_text(json.dumps(results, indent=1))
