"""Probe (2026-12-02, nineteenth session): where the host time between batch-1 decode steps
goes, and what launching the next step before the previous id is read would need.

1. Engine.step at batch 1, 256 steps: wall ms per step, split into launch_decode (host staging +
   cuGraphLaunch), the wait in collect_decode, and the rest (the caller's Python).
2. The bucket-1 graph replayed back to back (no host work between): the launch-ahead ceiling.
3. The embedding table registered in place (cuMemHostRegister, DEVICEMAP | READ_ONLY on the
   file's memory map): does it succeed, how long does it take with the page cache warm, and what
   does embed_fp16 cost gathering 1 and 32 rows straight from it (zero-copy over PCIe)?
4. The same from a cuMemHostAlloc'd copy of the table (allocation + copy time).
Prints a table and writes launch_ahead_probe.json under $OUT.
Usage: launch_ahead_probe_2026-12-02.py Q7_ZSE
"""
import json
import os
import sys
import time

import numpy as np
from cuda.bindings import driver as cu

sys.path.insert(0, os.getcwd())
from zse_runtime.engine import Engine  # noqa: E402
from zse_runtime.gpu import driver  # noqa: E402
from zse_runtime.gpu.kernels import DeviceArray, download  # noqa: E402
from zse_runtime.kernels import geometry as geo  # noqa: E402
from zse_runtime.sampling import SamplingParams  # noqa: E402
from zse_runtime.zsefile import EMBED  # noqa: E402

result = {}
engine = Engine.open(sys.argv[1], device="cuda", max_model_len=4096, slots=1)
ops = engine.ops
vocab = engine.config.vocab_size
rng = np.random.default_rng(0)
list(engine.generate(rng.integers(0, vocab, 128).tolist(), 8, ignore_eos=True))

# 1. Engine.step, instrumented
spans = {"launch": [], "collect": [], "total": []}
launch, collect = ops.launch_decode, ops.collect_decode


def timed(fn, key):
    def wrapper(*a):
        t = time.perf_counter()
        r = fn(*a)
        spans[key].append(time.perf_counter() - t)
        return r
    return wrapper


ops.launch_decode, ops.collect_decode = timed(launch, "launch"), timed(collect, "collect")
slot = engine.acquire_slot()
token, position = 5, 128
for rep in range(2):
    for k in spans:
        spans[k].clear()
    t0 = time.perf_counter()
    for step in range(256):
        token = int(engine.step([token], [position], [slot], [SamplingParams()], [step + 1])[0])
        position += 1
    total = time.perf_counter() - t0
    result[f"step_loop_{rep}"] = {
        "wall_ms_per_step": total / 256 * 1e3,
        "launch_ms_median": float(np.median(spans["launch"]) * 1e3),
        "collect_ms_median": float(np.median(spans["collect"]) * 1e3),
        "other_ms_per_step": (total - sum(spans["launch"]) - sum(spans["collect"])) / 256 * 1e3}
ops.launch_decode, ops.collect_decode = launch, collect

# 2. back-to-back replays of the bucket-1 graph (the metadata of the last step)
graph = ops.graphs[1]
start, end = driver.Event(), driver.Event()
for rep in range(2):
    ops.stream.synchronize()
    t0 = time.perf_counter()
    launches = []
    start.record(ops.stream)
    for _ in range(256):
        t = time.perf_counter()
        graph.launch(ops.stream)
        launches.append(time.perf_counter() - t)
    end.record(ops.stream)
    end.synchronize()
    wall = time.perf_counter() - t0
    result[f"back_to_back_{rep}"] = {"wall_ms_per_step": wall / 256 * 1e3,
                                     "gpu_ms_per_step": end.elapsed_ms(start) / 256,
                                     "cuGraphLaunch_us_median": float(np.median(launches) * 1e6)}

# 3. / 4. zero-copy gathers
table = engine.zse.raw(EMBED).view(np.float16).reshape(vocab, -1)
hidden = table.shape[1]
table.sum(dtype=np.float32)  # into the page cache
ids_host = rng.integers(0, vocab, 32).astype(np.int32)
ids = DeviceArray(driver.allocate(32 * 4), (32,), np.dtype(np.int32))
ops.stream.copy_to_device(ids.pointer, ids_host.ctypes.data, 32 * 4)
out = DeviceArray(driver.allocate(32 * hidden * 4), (32, hidden), np.dtype(np.float32))


def time_gather(pointer, label):
    src = DeviceArray(pointer, (vocab, hidden), np.dtype(np.float16))
    for T in (1, 32):
        args = (DeviceArray(ids.pointer, (T,), ids.dtype), src,
                DeviceArray(out.pointer, (T, hidden), out.dtype))
        grid = (T, -(-hidden // geo.ROW_THREADS))
        ops._launch("embed_fp16", grid, geo.ROW_THREADS, *args)
        ops.stream.synchronize()
        start.record(ops.stream)
        for _ in range(100):
            ops._launch("embed_fp16", grid, geo.ROW_THREADS, *args)
        end.record(ops.stream)
        end.synchronize()
        entry = {"us_per_gather": end.elapsed_ms(start) / 100 * 1e3}
        got = download(ops.stream, args[2])
        entry["exact"] = bool(np.array_equal(got, table[ids_host[:T]].astype(np.float32)))
        result[f"{label}_T{T}"] = entry


flags = cu.CU_MEMHOSTREGISTER_DEVICEMAP | cu.CU_MEMHOSTREGISTER_READ_ONLY
t = time.perf_counter()
err, = cu.cuMemHostRegister(table.ctypes.data, table.nbytes, flags)
result["register_mmap"] = {"error": str(err), "seconds": time.perf_counter() - t,
                           "bytes": int(table.nbytes)}
if err == cu.CUresult.CUDA_SUCCESS:
    err, dptr = cu.cuMemHostGetDevicePointer(table.ctypes.data, 0)
    result["register_mmap"]["device_pointer_equals_host"] = int(dptr) == table.ctypes.data
    time_gather(int(dptr), "mapped_mmap")
    t = time.perf_counter()
    cu.cuMemHostUnregister(table.ctypes.data)
    result["register_mmap"]["unregister_seconds"] = time.perf_counter() - t

t = time.perf_counter()
err, pointer = cu.cuMemHostAlloc(table.nbytes, cu.CU_MEMHOSTALLOC_DEVICEMAP)
alloc_s = time.perf_counter() - t
copy = np.ctypeslib.as_array((np.ctypeslib.ctypes.c_uint8 * table.nbytes).from_address(
    int(pointer))).view(np.float16).reshape(vocab, hidden)
t = time.perf_counter()
np.copyto(copy, table)
result["host_alloc"] = {"error": str(err), "alloc_seconds": alloc_s,
                        "copy_seconds": time.perf_counter() - t}
time_gather(int(pointer), "mapped_alloc")

device_table = driver.allocate(table.nbytes)
ops.stream.copy_to_device(device_table, table.ctypes.data, table.nbytes)
time_gather(device_table, "device")

rows = [(k, json.dumps(v)) for k, v in result.items()]
json.dump(result, open(os.path.join(os.environ.get("OUT", "."), "launch_ahead_probe.json"), "w"),
          indent=1)
for k, v in rows:
    print(f"{k:22s} {v}")
