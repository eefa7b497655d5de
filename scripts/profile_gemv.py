"""Launch each decode GEMV once at the 7B shapes, for `ncu` (no graphs, no timing):

    ncu --clock-control none --section SpeedOfLight --section WarpStateStats \\
        --section MemoryWorkloadAnalysis --section Occupancy python scripts/profile_gemv.py
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import SHAPES_7B, Gpu, quantize_on_device, random_int4  # noqa: E402

from zse_runtime.gpu.backend import int4_gemv_plan  # noqa: E402
from zse_runtime.gpu.kernels import DeviceArray  # noqa: E402
from zse_runtime.kernels import geometry as geo  # noqa: E402


def main() -> None:
    gpu, rng = Gpu(), np.random.default_rng(0)
    for name, (rows, cols) in SHAPES_7B.items():
        weight = random_int4(rng, rows, cols)
        q, s, z = gpu.put(weight.qweight), gpu.put(weight.scales), gpu.put(weight.zeros)
        xq, xstep, xsum = quantize_on_device(
            gpu, gpu.put(rng.standard_normal((8, cols)).astype(np.float32)))
        bias = gpu.put(np.zeros(rows, np.float32))
        out = gpu.empty((8, rows), np.float32)
        for tokens in (1, 8):
            kernel, block_rows, tile, threads = int4_gemv_plan(rows, cols, tokens)
            gpu.launch(kernel, (math.ceil(rows / block_rows), 1), threads,
                       *(DeviceArray(a.pointer, (tokens, a.shape[1]), a.dtype)
                         for a in (xq, xstep, xsum)),
                       q, s, z, np.uint32(geo.gemv_group_reciprocal(128)), bias, np.int32(0),
                       DeviceArray(out.pointer, (tokens, rows), out.dtype))
        gpu.stream.synchronize()
        print(name, "launched", flush=True)
        gpu.free_all()
    rows, cols = SHAPES_7B["lm_head"]
    w = gpu.put((rng.standard_normal((rows, cols)) * 0.02).astype(np.float16))
    x = gpu.put(rng.standard_normal((1, cols)).astype(np.float32))
    out = gpu.empty((1, rows), np.float32)
    gpu.launch("fp16_matmul_t1", (math.ceil(rows / geo.GEMV_ROWS), 1), geo.FP16_GEMV_THREADS, x,
               DeviceArray(w.pointer, (rows, cols // 2), np.dtype(np.uint32)), out)
    gpu.stream.synchronize()
    print("lm_head fp16 launched", flush=True)


if __name__ == "__main__":
    main()
