"""Device side of the SwiGLU-epilogue probe (.probe_glue_kernels.py): us per gate_up layer."""
import json, math, os, sys
from pathlib import Path
import numpy as np
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from gpu_check import Gpu, quantize_on_device, random_int4, empty_digits, rel_error
from zse_runtime.gpu.kernels import KernelLibrary
from zse_runtime.kernels import geometry as geo

gpu, rng = Gpu(), np.random.default_rng(0)
lib = KernelLibrary(gpu.context.info.compute_capability, Path(sys.argv[1]))
inter, hidden = 18944, 3584
w = random_int4(rng, 2 * inter, hidden)
q, s, z = gpu.put(w.qweight), gpu.put(w.scales), gpu.put(w.zeros)
x = gpu.put(rng.standard_normal((1, hidden)).astype(np.float32))
xq, xstep, xsum = quantize_on_device(gpu, x)
bias = gpu.put(np.zeros(2 * inter, np.float32))
gu = gpu.empty((1, 2 * inter), np.float32)
act = gpu.empty((1, inter), np.float32)
digits = empty_digits(gpu, 1, inter)
ref = lambda: lib.launch("ref_t1_r8", 2 * inter // 8, 64, gpu.stream, xq, xstep, xsum, q, s, z,
                         np.int32(128), bias, np.int32(0), gu)
norm = (np.int32(0), gpu.empty((1, 1), np.float32), np.float32(1e-6))
silu = lambda: gpu.launch("silu_mul", (1, math.ceil(inter / geo.ROW_THREADS)), geo.ROW_THREADS, gu,
                          act, np.int32(1), *digits, *norm)
ref(); silu(); gpu.stream.synchronize()
g = gpu.get(gu)[0]
want = g[:inter] / (1 + np.exp(-g[:inter])) * g[inter:]
results = {}
t_ref, t_silu = gpu.time_ms(ref), gpu.time_ms(silu)
t_pair = gpu.time_ms(lambda: (ref(), silu()))
results["ref_t1_r8 + silu_mul"] = dict(gemv_us=t_ref * 1e3, silu_us=t_silu * 1e3, pair_us=t_pair * 1e3)
print(f"ref gemv {t_ref*1e3:.2f} us, silu_mul {t_silu*1e3:.2f} us, both {t_pair*1e3:.2f} us", flush=True)
for name, threads in (("swiglu_r8_g64", 512), ("swiglu_r8_g32", 256), ("swiglu_r16_g64", 256),
                      ("swiglu_r16_g32", 128), ("swiglu_r8_g64_c80", 512)):
    out = gpu.empty((1, inter), np.float32)
    d2 = empty_digits(gpu, 1, inter)
    run = lambda: lib.launch(name, inter // 32, threads, gpu.stream, xq, xstep, xsum, q, s, z,
                             np.int32(128), out, *d2)
    run(); gpu.stream.synchronize()
    err = rel_error(gpu.get(out)[0], want)
    t = gpu.time_ms(run)
    results[name] = dict(us=t * 1e3, rel_err=err, threads=threads)
    print(f"{name:20s} {t*1e3:7.2f} us  rel err {err:.1e}", flush=True)
Path(os.environ.get("OUT", "/tmp"), "glue_probe.json").write_text(json.dumps(results, indent=1))
