"""Device side of .probe_pg_kernels.py: the persistent pipelined GEMV against the shipped one."""
import json, math, os, sys
from pathlib import Path
import numpy as np
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from gpu_check import Gpu, quantize_on_device, random_int4, rel_error
from zse_runtime.gpu.kernels import KernelLibrary

gpu, rng = Gpu(), np.random.default_rng(0)
lib = KernelLibrary(gpu.context.info.compute_capability, Path(sys.argv[1]))
sms = 132
shapes = {"qkv": (4608, 3584, "ref_r4", 4, 64), "o_proj": (3584, 3584, "ref_r4", 4, 128),
          "gate_up": (37888, 3584, "ref_r8", 8, 64), "down_proj": (3584, 18944, "ref_r4", 4, 128)}
results = {}
for shape, (rows, cols, ref, ref_rows, ref_threads) in shapes.items():
    w = random_int4(rng, rows, cols)
    q, s, z = gpu.put(w.qweight), gpu.put(w.scales), gpu.put(w.zeros)
    xq, xstep, xsum = quantize_on_device(gpu, gpu.put(rng.standard_normal((1, cols)).astype(np.float32)))
    bias = gpu.put(np.zeros(rows, np.float32))
    want = gpu.empty((1, rows), np.float32)
    run = lambda: lib.launch(ref, math.ceil(rows / ref_rows), ref_threads, gpu.stream, xq, xstep,
                             xsum, q, s, z, np.int32(128), bias, np.int32(0), want)
    run(); gpu.stream.synchronize()
    expected = gpu.get(want)[0]
    t = min(gpu.time_ms(run) for _ in range(3)) * 1e3
    results[f"{shape} {ref}"] = dict(us=t)
    print(f"{shape:10s} {ref:12s} {t:7.2f} us", flush=True)
    for name in ("pg_r2_c80", "pg_r2_c96", "pg_r4_c128", "pg_r8_c168"):
        for per_sm, threads in ((2, 128), (4, 128), (8, 128), (4, 256), (8, 64)):
            out = gpu.empty((1, rows), np.float32)
            go = lambda: lib.launch(name, sms * per_sm, threads, gpu.stream, xq, xstep, xsum, q, s,
                                    z, np.int32(128), out)
            go(); gpu.stream.synchronize()
            err = rel_error(gpu.get(out)[0], expected)
            t = min(gpu.time_ms(go) for _ in range(3)) * 1e3
            results[f"{shape} {name} {per_sm}x{threads}"] = dict(us=t, rel_err=err)
            print(f"{shape:10s} {name:12s} {per_sm}/SM x {threads:3d}  {t:7.2f} us  rel {err:.1e}", flush=True)
    gpu.free_all()
Path(os.environ.get("OUT", "/tmp"), "persistent_gemv_probe.json").write_text(json.dumps(results, indent=1))
