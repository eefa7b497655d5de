"""GPU check, run through the device tool: every kernel at real (7B) shapes against numpy, the
CUDA engine against transformers end to end, and first timings. Prints a pass/fail table last
and writes gpu_check.json.

    python scripts/gpu_check.py --out DIR [--gguf PATH_TO_SmolLM2.gguf] [--skip-speed]

Each check is independent: a failure is recorded with its traceback and the rest still run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "0")

from zse_runtime.gpu import driver  # noqa: E402
from zse_runtime.gpu.backend import (cache_words, int4_through_gemm, quantize_launch,  # noqa: E402
                                     split_launch)
from zse_runtime.gpu.kernels import DeviceArray, KernelLibrary, download, upload  # noqa: E402
from zse_runtime.kernels import geometry as geo  # noqa: E402
from zse_runtime.zsefile import Int4Weight, dequantize_int4  # noqa: E402

RESULTS: list[dict] = []
TOLERANCE = 1e-3  # max |logit difference| / max |reference logit|, as on the CPU backend
# Prefill chunks round the GEMM's inputs, q and the softmax weights to float16 (gemm_int4.py,
# attention_tiled.py). A CPU emulation of exactly that rounding moved the random 4-layer qwen2's
# prefill logits from 4.6e-4 to 8.7e-4; the H200 gave 1.0e-3 (float32 prefill: 4.8e-4).
PREFILL_TOLERANCE = 2e-3


def record(name: str, ok: bool, detail: str, **numbers) -> None:
    RESULTS.append({"check": name, "ok": bool(ok), "detail": detail, **numbers})
    print(f"[{'PASS' if ok else 'FAIL'}] {name}: {detail}", flush=True)


def check(name: str):
    def wrap(fn):
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception:  # noqa: BLE001 - every check reports, none stops the run
                record(name, False, "raised: " + traceback.format_exc()[-1500:])
        return run
    return wrap


class Gpu:
    """Context, stream, kernels and device buffers created from numpy arrays."""

    def __init__(self):
        self.context = driver.Context(0)
        self.stream = driver.Stream()
        self.kernels = KernelLibrary(self.context.info.compute_capability)
        self.allocations: list[int] = []

    def put(self, array: np.ndarray) -> DeviceArray:
        array = np.ascontiguousarray(array)
        pointer = driver.allocate(array.nbytes)
        self.allocations.append(pointer)
        upload(self.stream, pointer, array)
        return DeviceArray(pointer, array.shape, array.dtype)

    def empty(self, shape, dtype) -> DeviceArray:
        dtype = np.dtype(dtype)
        pointer = driver.allocate(int(np.prod(shape)) * dtype.itemsize)
        self.allocations.append(pointer)
        return DeviceArray(pointer, tuple(shape), dtype)

    def get(self, array: DeviceArray) -> np.ndarray:
        return download(self.stream, array)

    def launch(self, name, grid, block, *args):
        self.kernels.launch(name, grid, block, self.stream, *args)

    def time_ms(self, fn, repeats: int = 20) -> float:
        """Milliseconds of one fn() on the GPU alone: `repeats` calls are captured into a CUDA
        graph and the graph's replay is timed with events, so host launch overhead (tens of
        microseconds through Python) is not counted. Median of 5 replays, after a warm-up."""
        fn()
        self.stream.begin_capture()
        try:
            for _ in range(repeats):
                fn()
        finally:
            graph = self.stream.end_capture()
        graph.launch(self.stream)
        times = []
        for _ in range(5):
            start, end = driver.Event(), driver.Event()
            start.record(self.stream)
            graph.launch(self.stream)
            end.record(self.stream)
            end.synchronize()
            times.append(end.elapsed_ms(start) / repeats)
        return float(np.median(times))

    def free_all(self):
        self.stream.synchronize()
        for pointer in self.allocations:
            driver.free(pointer)
        self.allocations.clear()


def random_int4(rng, rows, cols, group=128) -> Int4Weight:
    return Int4Weight(rng.integers(0, 2**32, (rows, cols // 8), dtype=np.uint32),
                      rng.uniform(0.001, 0.003, (rows, cols // group)).astype(np.float16),
                      rng.uniform(6.0, 9.0, (rows, cols // group)).astype(np.float16), group)


def rel_error(ours, ref) -> float:
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-30))


# ---------------------------------------------------------------------------------------------


@check("copy bandwidth")
def copy_bandwidth(gpu: Gpu) -> float:
    from cuda.bindings import driver as cu

    nbytes = 2 << 30
    src, dst = gpu.empty((nbytes,), np.uint8), gpu.empty((nbytes,), np.uint8)
    copy = lambda: driver.check(cu.cuMemcpyDtoDAsync(dst.pointer, src.pointer, nbytes,
                                                     gpu.stream.handle))
    copy()
    times = []  # plain events: a 2 GiB copy dwarfs any launch overhead (graph memcpy nodes ran slower)
    for _ in range(5):
        start, end = driver.Event(), driver.Event()
        start.record(gpu.stream)
        copy()
        end.record(gpu.stream)
        end.synchronize()
        times.append(end.elapsed_ms(start))
    ms = float(np.median(times))
    gbps = 2 * nbytes / ms / 1e6
    record("copy bandwidth", True, f"device-to-device {gbps:.0f} GB/s (read + write)", gbps=gbps)
    gpu.free_all()
    return gbps


SHAPES_7B = {"qkv": (4608, 3584), "o_proj": (3584, 3584), "gate_up": (37888, 3584),
             "down_proj": (3584, 18944), "lm_head": (152064, 3584)}


BATCHES = (1, 2, 4, 8, 16, 32)


def _bandwidth(name: str, weight_bytes: int, ms: float, copy_gbps: float | None, err: float,
               ok: bool, **extra) -> None:
    gbps = weight_bytes / ms / 1e6
    frac = gbps / copy_gbps if copy_gbps else float("nan")
    record(name, ok, f"rel err {err:.1e}; {ms * 1000:.1f} us, {gbps:.0f} GB/s = {frac:.0%} of copy",
           us=ms * 1000, gbps=gbps, fraction_of_copy=frac, rel_err=err, **extra)


def quantize_on_device(gpu: Gpu, dx: DeviceArray, into=None) -> tuple[DeviceArray, ...]:
    """x [T, K] on the device -> the INT4 GEMV's integer inputs (xq, xstep, xsum), allocated
    unless given."""
    tokens, cols = dx.shape
    xq, xstep, xsum = into or (gpu.empty((tokens, cols // 2), np.uint32),
                               gpu.empty((tokens, cols // 32), np.float32),
                               gpu.empty((tokens, cols // 32), np.float32))
    gpu.launch("quantize_activations", *quantize_launch(tokens, cols), dx, xq, xstep, xsum)
    return xq, xstep, xsum


def empty_digits(gpu: Gpu, tokens: int, cols: int) -> tuple[DeviceArray, ...]:
    return (gpu.empty((tokens, cols // 2), np.uint32), gpu.empty((tokens, cols // 32), np.float32),
            gpu.empty((tokens, cols // 32), np.float32))


def fused_digits_exact(gpu: Gpu, out: DeviceArray, digits) -> bool:
    """A producer's fused digits equal the standalone quantizer's on its output, bit for bit."""
    expected = quantize_on_device(gpu, out)
    return all(np.array_equal(gpu.get(a).view(np.uint32), gpu.get(b).view(np.uint32))
               for a, b in zip(digits, expected))


def split_on_device(gpu: Gpu, dx: DeviceArray, group: int, into=None) -> tuple[DeviceArray, ...]:
    """x [T, K] on the device -> the prefill GEMM's inputs (halves, group sums, unscale)."""
    tokens, cols = dx.shape
    split = into or (gpu.empty((tokens, cols // 2), np.uint32),
                     gpu.empty((tokens, cols // group), np.float32),
                     gpu.empty((tokens, cols // group), np.float32))
    gpu.launch("split_activations", *split_launch(tokens, cols, group), dx, np.int32(group), *split)
    return split


@check("int4_gemv")
def gemv(gpu: Gpu, copy_gbps: float | None, rng) -> None:
    from zse_runtime.gpu.backend import gemm_splits, int4_gemm_plan, int4_gemv_plan

    for name, (rows, cols) in SHAPES_7B.items():
        weight = random_int4(rng, rows, cols)
        x = rng.standard_normal((BATCHES[-1], cols)).astype(np.float32)
        bias = rng.standard_normal(rows).astype(np.float32)
        expected = x @ dequantize_int4(weight).T + bias
        weight_bytes = weight.qweight.nbytes + weight.scales.nbytes * 2
        copies = max(1, math.ceil(256e6 / weight_bytes))  # rotate past the 50 MB L2
        devices = [(gpu.put(weight.qweight), gpu.put(weight.scales), gpu.put(weight.zeros))
                   for _ in range(copies)]
        dx, dbias = gpu.put(x), gpu.put(bias)
        activations = quantize_on_device(gpu, dx)
        out = gpu.empty((BATCHES[-1], rows), np.float32)
        args = lambda i, T: (*(a.rows(T) for a in activations), *devices[i % copies],
                             np.uint32(geo.gemv_group_reciprocal(128)), dbias, np.int32(1),
                             out.rows(T))

        def timed(kernel, grid, block, T):
            gpu.launch(kernel, grid, block, *args(0, T))
            got = gpu.get(out)[:T]
            counter = iter(range(10**9))
            ms = gpu.time_ms(lambda: gpu.launch(kernel, grid, block, *args(next(counter), T)), 30)
            return got, ms

        solo = None
        for T in BATCHES:
            kernel, block_rows, tile, threads = int4_gemv_plan(rows, cols, T)
            grid = (math.ceil(rows / block_rows), math.ceil(T / tile))
            got, ms = timed(kernel, grid, threads, T)
            err = rel_error(got, expected[:T])
            solo = got[0] if solo is None else solo
            same = bool(np.array_equal(got[0], solo))  # token 0 as in the T=1 launch, bit for bit
            _bandwidth(f"{kernel} {name} {rows}x{cols} T={T} ({threads} thr)", weight_bytes, ms,
                       copy_gbps, err, err < 1e-4 and same, kernel=kernel, shape=name, tokens=T,
                       threads=threads, equals_solo=same)
            if T in (1, 8):  # the other block sizes, for the plan's choice
                for other in (64, 128, 256, 512):
                    if other != threads:
                        try:
                            got, ms = timed(kernel, grid, other, T)
                        except driver.CudaError as exc:  # e.g. too many registers for the block
                            print(f"  sweep {kernel} {name} T={T} ({other} thr): {exc}")
                            continue
                        err = rel_error(got, expected[:T])
                        _bandwidth(f"  sweep {kernel} {name} T={T} ({other} thr)", weight_bytes,
                                   ms, copy_gbps, err, err < 1e-4, kernel=kernel, shape=name,
                                   tokens=T, threads=other, sweep=True)
        groups, sms = cols // 128, gpu.context.info.multiprocessors

        def gemm_launches(T):
            """The backend's launch (128 x 32 blocks, split-K) and 64 x 64 blocks beside it,
            split as the backend would and whole."""
            square = (math.ceil(rows / geo.GEMM_TILE_N), math.ceil(T / geo.GEMM_TILE_T))
            return list(dict.fromkeys([int4_gemm_plan(rows, T, groups, sms),
                                       ("int4_gemm", (*square, gemm_splits(square, groups, sms))),
                                       ("int4_gemm", (*square, 1))]))

        most = max(grid[2] for T in (8, 16, 32) for _, grid in gemm_launches(T))
        partials = gpu.empty((most * BATCHES[-1], rows), np.float32)
        for T in (8, 16, 32):  # the tensor-core GEMM at decode batch sizes
            for kernel, grid in gemm_launches(T):
                splits = grid[2]
                split = split_on_device(gpu, dx.rows(T), 128)
                target = out.rows(T) if splits == 1 else partials.rows(splits * T)

                def run(i, T=T, kernel=kernel, grid=grid, split=split, target=target, splits=splits):
                    gpu.launch(kernel, grid, geo.GEMM_THREADS, *split, *devices[i % copies],
                               np.int32(128), dbias, np.int32(1), target)
                    if splits > 1:
                        gpu.launch("sum_splits", (T, math.ceil(rows / geo.ROW_THREADS)),
                                   geo.ROW_THREADS, target, np.int32(splits), out.rows(T))

                run(0)
                err = rel_error(gpu.get(out)[:T], expected[:T])
                counter = iter(range(10**9))
                ms = gpu.time_ms(lambda: run(next(counter)), 30)
                _bandwidth(f"{kernel} {name} {rows}x{cols} T={T} split {splits}", weight_bytes, ms,
                           copy_gbps, err, err < GEMM_TOLERANCE, kernel=kernel, shape=name,
                           tokens=T, splits=splits)
        gpu.free_all()
    # the quantizer's own cost, per GEMV input width
    for cols in (3584, 18944):
        for T in (1, 8, 32):
            dx = gpu.put(rng.standard_normal((T, cols)).astype(np.float32))
            outputs = quantize_on_device(gpu, dx)
            ms = gpu.time_ms(lambda: quantize_on_device(gpu, dx, outputs), 30)
            record(f"quantize_activations T={T} K={cols}", True, f"{ms * 1000:.1f} us",
                   us=ms * 1000, tokens=T, cols=cols)
            gpu.free_all()


@check("fp16_matmul")
def fp16_lm_head(gpu: Gpu, copy_gbps: float | None, rng) -> None:
    from zse_runtime.gpu.backend import fp16_through_gemm, gemv_token_tile

    rows, cols = SHAPES_7B["lm_head"]
    weight = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float16)
    x = rng.standard_normal((BATCHES[-1], cols)).astype(np.float32)
    expected = x @ weight.astype(np.float32).T
    dw, dx = gpu.put(weight), gpu.put(x)
    words = DeviceArray(dw.pointer, (rows, cols // 2), np.dtype(np.uint32))
    out = gpu.empty((BATCHES[-1], rows), np.float32)
    x_of = lambda T: DeviceArray(dx.pointer, (T, cols), dx.dtype)
    out_of = lambda T: DeviceArray(out.pointer, (T, rows), out.dtype)
    runs = []
    for T in BATCHES:
        tile = gemv_token_tile(T)
        grid = (math.ceil(rows / geo.GEMV_ROWS), math.ceil(T / tile))
        runs.append((f"fp16_matmul_t{tile}", T, lambda grid=grid, tile=tile, T=T: gpu.launch(
            f"fp16_matmul_t{tile}", grid, geo.FP16_GEMV_THREADS, x_of(T), words, out_of(T))))
    for T in BATCHES:  # the tensor-core kernel, where the backend takes it
        if fp16_through_gemm(cols, T):
            grid = (math.ceil(rows / geo.GEMM_TILE_N), math.ceil(T / geo.GEMM_TILE_T))
            runs.append(("fp16_gemm", T, lambda grid=grid, T=T: gpu.launch(
                "fp16_gemm", grid, geo.GEMM_THREADS, x_of(T), words, out_of(T))))
    for kernel, T, run in runs:
        run()
        err = rel_error(gpu.get(out)[:T], expected[:T])
        ms = gpu.time_ms(run, 10)
        tolerance = GEMM_TOLERANCE if kernel == "fp16_gemm" else 1e-4  # float16 activations
        _bandwidth(f"{kernel} lm_head {rows}x{cols} T={T}", weight.nbytes, ms, copy_gbps, err,
                   err < tolerance, kernel=kernel, shape="lm_head_fp16", tokens=T)
    gpu.free_all()


# the prefill GEMM's error bound against the float64 product (max |error| / max |y|): float16
# activations (kernels/gemm_int4.py); measured 3.7-4.0e-4 at the 7B shapes (H200)
GEMM_TOLERANCE = 1e-3


@check("int4_gemm")
def gemm(gpu: Gpu, rng) -> None:
    for tokens, (rows, cols) in ((512, SHAPES_7B["gate_up"]), (512, SHAPES_7B["down_proj"]),
                                 (512, SHAPES_7B["qkv"]), (4, SHAPES_7B["qkv"]),
                                 (37, SHAPES_7B["down_proj"])):
        weight = random_int4(rng, rows, cols)
        x = rng.standard_normal((tokens, cols)).astype(np.float32)
        dq, ds, dz = gpu.put(weight.qweight), gpu.put(weight.scales), gpu.put(weight.zeros)
        dx, out = gpu.put(x), gpu.empty((tokens, rows), np.float32)
        nobias = gpu.put(np.zeros(1, np.float32))
        grid = (math.ceil(rows / geo.GEMM_TILE_N), math.ceil(tokens / geo.GEMM_TILE_T))
        split = split_on_device(gpu, dx, 128)
        sample_rows = rng.choice(rows, 512, replace=False)
        dense = dequantize_int4(Int4Weight(weight.qweight[sample_rows], weight.scales[sample_rows],
                                           weight.zeros[sample_rows], 128))
        expected = x @ dense.T
        split_ms = gpu.time_ms(lambda: split_on_device(gpu, dx, 128, split), 10)
        run = lambda: gpu.launch("int4_gemm", grid, geo.GEMM_THREADS, *split, dq, ds, dz,
                                 np.int32(128), nobias, np.int32(0), out)
        run()
        err = rel_error(gpu.get(out)[:, sample_rows], expected)
        ms = gpu.time_ms(run, 10)
        tflops = 2 * tokens * rows * cols / ms / 1e9
        record(f"int4_gemm T={tokens} {rows}x{cols}", err < GEMM_TOLERANCE,
               f"rel err {err:.1e}; {ms:.2f} ms, {tflops:.1f} TFLOP/s; split_activations "
               f"{split_ms * 1000:.0f} us", ms=ms, tflops=tflops, split_us=split_ms * 1000)
        gpu.free_all()


@check("attention")
def attention(gpu: Gpu, rng) -> None:
    heads, kv_heads, dim, length = 28, 4, 128, 4096
    prefill_chunk = list(range(1536, 2048))  # the last 512-token chunk of a 2048-token prompt
    batch = list(range(100, 3300, 100))  # 32 sequences' positions
    for tokens, positions, kind in ((1, [4095], "decode"), (1, [255], "decode"),
                                    (1, [127], "decode"), (3, [0, 700, 2047], "decode"),
                                    (3, [0, 700, 2047], "grouped"), (32, batch, "decode"),
                                    (32, batch, "grouped"), (512, prefill_chunk, "prefill")):
        k = (rng.standard_normal((2, kv_heads, length, dim))).astype(np.float16)
        v = (rng.standard_normal((2, kv_heads, length, dim))).astype(np.float16)
        q = rng.standard_normal((tokens, heads * dim)).astype(np.float32)
        pos = np.array(positions, np.int32)
        slots = np.array([1] * tokens, np.int32)
        partition = geo.ATTENTION_PREFILL_PARTITION if kind == "prefill" \
            else geo.ATTENTION_DECODE_PARTITION
        parts = math.ceil(length / partition)  # what a decode graph launches at any context
        items = tokens * heads
        dk, dv, dq = gpu.put(k), gpu.put(v), gpu.put(q)
        dpos, dslots = gpu.put(pos), gpu.put(slots)
        pmax, psum = gpu.empty((items, parts), np.float32), gpu.empty((items, parts), np.float32)
        pacc, out = gpu.empty((items, parts, dim), np.float32), gpu.empty((tokens, heads * dim), np.float32)
        digits = empty_digits(gpu, tokens, heads * dim)
        partial_args = (dq, cache_words(dk), cache_words(dv), np.int32(kv_heads), np.int32(length),
                        dpos, dslots, np.int32(0), np.int32(partition), pmax, psum, pacc)
        if kind != "prefill":  # one launch: the last partition block per block row merges
            kernel, blocks = (("attention_decode", items) if kind == "decode" else
                              ("attention_decode_grouped", tokens * kv_heads))
            tickets = gpu.put(np.zeros(blocks, np.int32))
            run = lambda: gpu.launch(kernel, (blocks, parts), geo.ATTENTION_THREADS,
                                     *partial_args, tickets, out, np.int32(1), *digits)
        else:
            run = lambda: (
                gpu.launch("attention_partial_prefill", (items, parts), geo.ATTENTION_THREADS,
                           *partial_args),
                gpu.launch("attention_combine", items, geo.ATTENTION_THREADS, pmax, psum, pacc,
                           dpos, np.int32(0), np.int32(partition), out, np.int32(1), *digits))
        run()
        got = gpu.get(out)
        digits_ok = fused_digits_exact(gpu, out, digits)
        err = 0.0
        for t in range(tokens):
            for h in range(heads):
                keys = k[1, h // 7, :pos[t] + 1].astype(np.float32)
                scores = keys @ q[t, h * dim:(h + 1) * dim] / np.sqrt(dim)
                w = np.exp(scores - scores.max())
                ref = w @ v[1, h // 7, :pos[t] + 1].astype(np.float32) / w.sum()
                err = max(err, rel_error(got[t, h * dim:(h + 1) * dim], ref))
        ms = gpu.time_ms(run, 20)
        if kind != "prefill":  # every replay left the tickets at zero
            tickets_ok = not gpu.get(tickets).any()
            digits_ok = digits_ok and tickets_ok
        where = f"positions {positions}" if tokens < 8 else f"positions {positions[0]}-{positions[-1]}"
        if kind == "prefill":  # the tensor-core kernel for one sequence's chunk
            tiled_out = gpu.empty((tokens, heads * dim), np.float32)
            tiled = lambda: gpu.launch(
                "attention_tiled", (math.ceil(tokens / geo.ATTENTION_TILE_TOKENS), heads),
                geo.ATTENTION_TILED_THREADS, dq, cache_words(dk), cache_words(dv),
                np.int32(kv_heads), np.int32(length), dpos, np.int32(1), np.int32(0), tiled_out)
            tiled()
            tiled_got = gpu.get(tiled_out)
            tiled_err = max(rel_error(tiled_got[t, h * dim:(h + 1) * dim],
                                      got[t, h * dim:(h + 1) * dim])
                            for t in range(tokens) for h in range(heads))
            tiled_ms = gpu.time_ms(tiled, 20)
            record(f"attention_tiled T={tokens} {where}", tiled_err < 3e-3 and err < 1e-4,
                   f"rel err {tiled_err:.1e} against attention_partial (float32 throughout); "
                   f"{tiled_ms * 1000:.1f} us against {ms * 1000:.1f} us", us=tiled_ms * 1000,
                   split_us=ms * 1000, rel_err=tiled_err)
        launches = kernel if kind != "prefill" else "partial_prefill + combine"
        record(f"attention T={tokens} {where} {launches}", err < 1e-4 and digits_ok,
               f"rel err {err:.1e}; {ms * 1000:.1f} us; fused digits "
               f"{'exact' if digits_ok else 'DIFFER'}" + (
                   "" if kind == "prefill" else f"; tickets {'reset' if tickets_ok else 'LEFT SET'}"),
               us=ms * 1000, launches=launches, digits_exact=digits_ok)
        gpu.free_all()


@check("small kernels")
def small_kernels(gpu: Gpu, rng) -> None:
    hidden, tokens = 3584, 5
    delta = rng.standard_normal((tokens, hidden)).astype(np.float32)
    residual = rng.standard_normal((tokens, hidden)).astype(np.float32)
    weight = rng.uniform(0.5, 1.5, hidden).astype(np.float32)
    dd, dr, dw, out = gpu.put(delta), gpu.put(residual), gpu.put(weight), gpu.empty((tokens, hidden), np.float32)
    digits = empty_digits(gpu, tokens, hidden)
    sumsq = gpu.empty((tokens, hidden // 32), np.float32)
    summed_out = gpu.empty((tokens, hidden), np.float32)
    norm = lambda rows, width, deferred, digits, sumsq: gpu.launch(
        "add_rmsnorm", (rows, math.ceil(hidden / width)), geo.NORM_THREADS, dd.rows(rows),
        dr.rows(rows), dw, np.float32(1e-6), np.int32(1), np.int32(width), summed_out.rows(rows),
        out.rows(rows), np.int32(deferred), *digits, sumsq)
    norm(tokens, hidden, 0, digits, sumsq)  # a prompt chunk's: normed floats
    summed = delta + residual
    ref = summed / np.sqrt((summed ** 2).mean(1, keepdims=True) + 1e-6) * weight
    err = rel_error(gpu.get(out), ref)
    residual_ok = rel_error(gpu.get(summed_out), summed) < 1e-6
    norm(tokens, geo.NORM_DECODE_SLICE, 1, digits, sumsq)  # a decode step's: deferred
    digits_ok = fused_digits_exact(gpu, gpu.put((gpu.get(summed_out) * weight).astype(np.float32)),
                                   digits)
    squares = (summed.astype(np.float64) ** 2).reshape(tokens, -1, 32).sum(-1)
    squares_ok = rel_error(gpu.get(sumsq), squares) < 1e-5
    one = [d.rows(1) for d in digits]
    ms = gpu.time_ms(lambda: norm(1, geo.NORM_DECODE_SLICE, 1, one, sumsq.rows(1)))
    record("add_rmsnorm 5x3584", err < 1e-5 and residual_ok and digits_ok and squares_ok,
           f"rel err {err:.1e}; deferred: digits of r * gamma {'exact' if digits_ok else 'DIFFER'}, "
           f"sums of squares {'ok' if squares_ok else 'WRONG'}, {ms * 1000:.1f} us for one token",
           us=ms * 1000, digits_exact=digits_ok)
    for width in (hidden, geo.NORM_DECODE_SLICE):
        ms = gpu.time_ms(lambda: norm(1, width, 0, one, sumsq.rows(1)))
        record(f"  sweep add_rmsnorm 1x3584 (slices of {width}, normed floats)", True,
               f"{ms * 1000:.1f} us", us=ms * 1000, width=width, sweep=True)
    inter = 18944
    gate_up = rng.standard_normal((tokens, 2 * inter)).astype(np.float32)
    dg, act = gpu.put(gate_up), gpu.empty((tokens, inter), np.float32)
    digits = empty_digits(gpu, tokens, inter)
    silu_grid = lambda T: (T, math.ceil(inter / geo.ROW_THREADS))
    inverse = 1 / np.sqrt(squares.sum(1, keepdims=True) / hidden + 1e-6)  # the norm above's
    finish = (np.int32(1), sumsq, np.float32(1e-6))
    gpu.launch("silu_mul", silu_grid(tokens), geo.ROW_THREADS, dg, act, np.int32(1), *digits,
               *finish)
    g, u = gate_up[:, :inter] * inverse, gate_up[:, inter:] * inverse
    err = rel_error(gpu.get(act), g / (1 + np.exp(-g)) * u)
    digits_ok = fused_digits_exact(gpu, act, digits)
    one = [d.rows(1) for d in digits]
    ms = gpu.time_ms(lambda: gpu.launch("silu_mul", silu_grid(1), geo.ROW_THREADS, dg.rows(1),
                                        act.rows(1), np.int32(1), *one, np.int32(1),
                                        sumsq.rows(1), np.float32(1e-6)))
    record("silu_mul 5x18944", err < 1e-5 and digits_ok,
           f"rel err {err:.1e} (scaled by a deferred norm); {ms * 1000:.1f} us for one token, "
           f"with its digits ({'exact' if digits_ok else 'DIFFER'})", us=ms * 1000,
           digits_exact=digits_ok)
    ms = gpu.time_ms(lambda: quantize_on_device(gpu, out.rows(1), [d.rows(1) for d in digits]))
    record("quantize_activations 1x3584 (lm_head input)", True, f"{ms * 1000:.1f} us", us=ms * 1000)
    table = rng.standard_normal((152064, hidden)).astype(np.float16)
    ids = np.array([0, 152063, 17, 17, 99999], np.int32)
    given = np.array([0, -1, 17, -1, 99999], np.int32)  # FED rows take the previous step's id
    previous = np.array([5, 152063, 3, 17, 8], np.int32)
    dt, emb = gpu.put(table), gpu.empty((tokens, hidden), np.float32)
    di, dp = gpu.put(given), gpu.put(previous)
    embed = lambda rows: gpu.launch("embed_fp16", (rows, math.ceil(hidden / geo.ROW_THREADS)),
                                    geo.ROW_THREADS, di, dp, dt, emb)
    embed(tokens)
    ms = gpu.time_ms(lambda: embed(1))
    record("embed_fp16 152064x3584", np.array_equal(gpu.get(emb), table[ids].astype(np.float32)),
           f"exact, FED rows included; {ms * 1000:.1f} us for one token", us=ms * 1000)
    heads, kv_heads, dim, length = 28, 4, 128, 4096
    qkv = gpu.put(rng.standard_normal((1, (heads + 2 * kv_heads) * dim)).astype(np.float32))
    angles = rng.uniform(0, 1, (length, dim // 2)).astype(np.float32)
    cos, sin = gpu.put(np.cos(angles)), gpu.put(np.sin(angles))
    caches = [gpu.empty((1, kv_heads, length, dim), np.float16) for _ in range(2)]
    q_out, pos, slot = gpu.empty((1, heads * dim), np.float32), gpu.put(np.array([100], np.int32)), \
        gpu.put(np.array([0], np.int32))
    work = (heads + kv_heads) * dim // 2 + kv_heads * dim
    bias = rng.standard_normal((heads + 2 * kv_heads) * dim).astype(np.float32)
    plain = (np.int32(0), sumsq.rows(1), np.float32(1e-6), gpu.put(bias), np.int32(0))
    finish = (np.int32(1), sumsq.rows(1), np.float32(1e-6), gpu.put(bias), np.int32(1))
    rope = lambda extra: gpu.launch("rope_and_cache", (1, math.ceil(work / geo.ROW_THREADS)),
                                    geo.ROW_THREADS, qkv, pos, slot, cos, sin, *caches, q_out,
                                    np.int32(heads), *extra)
    rope(finish)  # the deferred attention norm of token 0 above, then the bias
    half = dim // 2
    q = (gpu.get(qkv)[0] * inverse[0, 0] + bias)[:heads * dim].reshape(heads, dim)
    c, si = np.cos(angles[100]), np.sin(angles[100])
    rotated = np.concatenate([q[:, :half] * c - q[:, half:] * si, q[:, half:] * c + q[:, :half] * si], 1)
    err = rel_error(gpu.get(q_out).reshape(heads, dim), rotated)
    ms = gpu.time_ms(lambda: rope(plain))
    finish_ms = gpu.time_ms(lambda: rope(finish))
    record("rope_and_cache 1 token (28+4 heads of 128)", err < 1e-5,
           f"rel err {err:.1e} (scaled by a deferred norm, then the bias); {ms * 1000:.1f} us, "
           f"{finish_ms * 1000:.1f} us finishing a deferred norm", us=ms * 1000,
           finishing_us=finish_ms * 1000)
    gpu.free_all()


def _sampling_args(gpu: Gpu, logits: DeviceArray, params, step: int) -> tuple:
    """The arguments every sampling kernel takes (kernels/sampling.py), for `params` per row."""
    rows, vocab = logits.shape
    blocks, histograms = geo.sampling_blocks(vocab), geo.SAMPLING_HISTOGRAMS
    return (logits, gpu.put(np.array([p.temperature for p in params], np.float32)),
            gpu.put(np.array([p.top_k for p in params], np.int32)),
            gpu.put(np.array([p.top_p for p in params], np.float32)),
            gpu.put(np.array([p.seed for p in params], np.uint64)),
            gpu.put(np.full(rows, step, np.uint64)), gpu.empty((rows,), np.int32),
            gpu.empty((rows, blocks), np.float32), gpu.empty((rows, blocks), np.int32),
            gpu.empty((rows, histograms, geo.SAMPLING_BINS), np.uint32),
            gpu.empty((rows, histograms, geo.SAMPLING_BINS), np.uint64),
            gpu.empty((rows, histograms + 1, geo.SAMPLING_STATE_FIELDS), np.uint64),
            gpu.empty((rows, blocks), np.uint64))


def _launch_sampling(gpu: Gpu, args: tuple) -> None:
    rows, vocab = args[0].shape
    for name, grid, step in geo.sampling_launches(rows, geo.sampling_blocks(vocab)):
        gpu.launch(name, grid, geo.SAMPLING_THREADS, *args, np.int32(step))


@check("sampling")
def sampling_kernel(gpu: Gpu, rng) -> None:
    from cuda.bindings import driver as cu

    from zse_runtime.sampling import SamplingParams, sample

    vocab = 152064
    params = [SamplingParams(0.0), SamplingParams(0.7, top_p=0.9, seed=1),
              SamplingParams(1.0, top_k=40, seed=2), SamplingParams(0.8, top_k=100, top_p=0.95, seed=3)]
    agree, trials = 0, 0
    for trial in range(8):
        logits = (rng.standard_normal((4, vocab)) * 2.5).astype(np.float32)
        args = _sampling_args(gpu, gpu.put(logits), params, trial)
        _launch_sampling(gpu, args)
        got = gpu.get(args[6])
        expected = [sample(logits[i], params[i], trial) for i in range(4)]
        agree += int(np.sum(got == expected))
        trials += 4
        gpu.free_all()
    record("sampling 4x152064", agree >= trials - 1,
           f"{agree}/{trials} draws equal the CPU reference (greedy, top-p, top-k, both)")
    # GPU time per pass, on a fresh copy of the logits each replay (the kernels consume them);
    # the copy alone is timed too
    cases = (("greedy", 1, SamplingParams(0.0)), ("T 0.7 top_p 0.9", 1, SamplingParams(0.7, top_p=0.9, seed=1)),
             ("top_k 40 top_p 0.95", 1, SamplingParams(0.8, top_k=40, top_p=0.95, seed=2)),
             ("greedy", 32, SamplingParams(0.0)), ("T 0.7 top_p 0.9", 32, SamplingParams(0.7, top_p=0.9, seed=1)))
    for label, rows, param in cases:
        logits = gpu.put((rng.standard_normal((rows, vocab)) * 2.5).astype(np.float32))
        fresh = gpu.put(gpu.get(logits))
        args = _sampling_args(gpu, logits, [param] * rows, 0)
        copy = lambda: driver.check(cu.cuMemcpyDtoDAsync(logits.pointer, fresh.pointer,
                                                          logits.nbytes, gpu.stream.handle))
        copy_ms = gpu.time_ms(copy, 10)
        ms = gpu.time_ms(lambda: (copy(), _launch_sampling(gpu, args)), 10)
        record(f"sampling {rows}x{vocab} {label}", True,
               f"{(ms - copy_ms) * 1000:.1f} us ({ms * 1000:.1f} with the logits copy, "
               f"{copy_ms * 1000:.1f} for the copy)", us=(ms - copy_ms) * 1000, rows=rows,
               sampling=label)
        gpu.free_all()


# ---------------------------------------------------------------------------------------------


def _engine_vs_transformers(label: str, zse_path: Path, checkpoint: Path, prompts: dict,
                            steps: int = 32) -> None:
    import torch

    from tests.reference import hf_model_from_zse
    from zse_runtime.engine import Engine
    from zse_runtime.model import Batch

    engine = Engine.open(zse_path, device="cuda", max_model_len=2048, slots=4)
    ahead = engine.wait_for_launches_ahead(60)
    record(f"{label}: engine open", engine.device.startswith("cuda") and ahead,
           f"{engine.device}; {engine.startup}; embedding {engine.ops.embedding_mapping}")
    reference = hf_model_from_zse(zse_path, checkpoint).cuda()
    for prompt_name, ids in prompts.items():
        n = len(ids)
        with torch.no_grad():
            ref_logits = reference(torch.tensor([ids]).cuda()).logits[0].float().cpu().numpy()
        if n <= 512:  # one prefill chunk: check logits at the start, middle and end
            err = 0.0
            for first in (0, n // 2, n - 4):
                rows = np.unique(np.clip(np.arange(first, first + 4), 0, n - 1))
                got = engine.ops.to_host(engine.forward(Batch.of(ids, np.arange(n), np.zeros(n),
                                                                 rows)))
                err = max(err, rel_error(got, ref_logits[rows]))
            tolerance = PREFILL_TOLERANCE if int4_through_gemm(n) else TOLERANCE
            record(f"{label}: prefill logits ({prompt_name}, {n} tokens)", err <= tolerance,
                   f"max rel err {err:.1e} at 12 positions", rel_err=err)
        expected = []
        with torch.no_grad():
            out = reference(torch.tensor([ids]).cuda(), use_cache=True)
            for _ in range(steps):
                expected.append(int(out.logits[0, -1].argmax()))
                out = reference(torch.tensor([[expected[-1]]]).cuda(),
                                past_key_values=out.past_key_values, use_cache=True)
        got_tokens = list(engine.generate(ids, steps, ignore_eos=True))
        same = sum(a == b for a, b in zip(got_tokens, expected))
        record(f"{label}: greedy tokens ({prompt_name}, {n} tokens)", got_tokens == expected,
               f"{same}/{steps} equal transformers; first {got_tokens[:8]}")
    # batched decode through the graph equals solo decode
    from zse_runtime.sampling import SamplingParams

    solo = {}
    for slot, ids in enumerate(list(prompts.values())[:3]):
        ids = ids[:300]
        solo[slot] = list(engine.generate(ids, 8, ignore_eos=True))
    slots_ids = {s: list(prompts.values())[s][:300] for s in solo}
    tokens = {}
    for slot, ids in slots_ids.items():
        n = len(ids)
        logits = engine.forward(Batch.of(ids, np.arange(n), np.full(n, slot), [n - 1]))
        tokens[slot] = [int(engine.sample(logits, [SamplingParams()], [0])[0])]
    for step in range(1, 8):
        order = sorted(tokens)
        nxt = engine.step([tokens[s][-1] for s in order],
                          [len(slots_ids[s]) + step - 1 for s in order], order,
                          [SamplingParams()] * len(order), [step] * len(order))
        for s, t in zip(order, nxt):
            tokens[s].append(int(t))
    record(f"{label}: batched graph decode == solo", tokens == solo,
           f"{len(solo)} sequences x 8 steps")


def _synthetic_zse(work: Path, name: str, arch: str, **shape) -> tuple[Path, Path]:
    """(checkpoint folder, .zse) of a random model of `shape`, converted with the defaults;
    32000 tokens and 4096 positions."""
    from tests.checkpoints import make_checkpoint
    from zse_convert.convert import ConvertOptions, convert

    checkpoint = make_checkpoint(work / f"{name}-ckpt", arch, vocab_size=32000,
                                 max_position_embeddings=4096, **shape)
    out = work / f"{name}.zse"
    convert(str(checkpoint), out, ConvertOptions())
    return checkpoint, out


def _random_prompts(seed: int, long: int) -> dict[str, list[int]]:
    rng = np.random.default_rng(seed)
    return {"short": rng.integers(0, 300, 150).tolist(),
            "long": rng.integers(0, 300, long).tolist()}


@check("synthetic qwen2 vs transformers")
def synthetic_model(work: Path, long_text: str) -> None:
    checkpoint, out = _synthetic_zse(work, "qwen2", "qwen2", hidden_size=896,
                                     intermediate_size=4864, num_hidden_layers=4,
                                     num_attention_heads=14, num_key_value_heads=2)
    prompts = _random_prompts(5, 1100)
    _engine_vs_transformers("synthetic qwen2", out, checkpoint, prompts)
    dependent_launch(out, prompts["short"])
    launch_ahead(out, prompts["short"])


@check("synthetic llama, group 96")
def synthetic_group96_model(work: Path) -> None:
    """SmolLM2-135M's widths: o_proj and gate_up (576 inputs) fall back to group 96, the only
    group size whose blocks per group is no power of two (the GEMV's group index)."""
    from zse_runtime.zsefile import ZseFile

    checkpoint, out = _synthetic_zse(work, "llama576", "llama", hidden_size=576,
                                     intermediate_size=1536, num_hidden_layers=3,
                                     num_attention_heads=9, num_key_value_heads=3)
    with ZseFile(out) as zse:
        groups = {name.rsplit(".", 1)[-1]: t.group_size for name, t in zse.tensors.items()
                  if t.group_size}
    record("synthetic llama 576: group sizes", groups == {"qkv": 32, "o_proj": 96, "gate_up": 96,
                                                          "down_proj": 128}, str(groups))
    _engine_vs_transformers("synthetic llama 576", out, checkpoint, _random_prompts(7, 700))


@check("dependent launch")
def dependent_launch(zse_path: Path, prompt: list[int], steps: int = 64) -> None:
    """The GEMVs launched as dependents (kernels/grid_dependency.py) change when a kernel starts,
    never what it computes: greedy tokens through the decode graphs and eager decode logits
    equal, bit for bit, those of an engine that launches every kernel after the previous one."""
    from zse_runtime.engine import Engine
    from zse_runtime.model import Batch

    runs = {}
    for mode in ("1", "0"):
        os.environ["ZSE_DEPENDENT_LAUNCH"] = mode
        engine = Engine.open(zse_path, device="cuda", max_model_len=2048, slots=4)
        tokens = list(engine.generate(prompt, steps, ignore_eos=True))
        n = len(prompt)
        logits = [engine.ops.to_host(engine.forward(Batch.of([token], [n + i], [0], [0])))
                  for i, token in enumerate(tokens[:8])]
        runs[mode] = (tokens, np.stack(logits), sorted(engine.ops.kernels.dependents))
        del engine
    os.environ.pop("ZSE_DEPENDENT_LAUNCH")
    (tokens, logits, dependents), (serial_tokens, serial_logits, none) = runs["1"], runs["0"]
    record("dependent launch: kernels launched as dependents", bool(dependents) and not none,
           f"{dependents or 'none (no sm_90 cubin with griddepcontrol)'}")
    record("dependent launch: greedy tokens == serial launches", tokens == serial_tokens,
           f"{sum(a == b for a, b in zip(tokens, serial_tokens))}/{steps} equal")
    record("dependent launch: decode logits == serial launches, bit for bit",
           np.array_equal(logits, serial_logits),
           f"max abs diff {np.abs(logits - serial_logits).max():.1e} over 8 eager steps")


@check("launch ahead")
def launch_ahead(zse_path: Path, prompt: list[int], steps: int = 48) -> None:
    """Decode steps begun before the previous one ends, their tokens FED on the device from
    the mapped host embedding, choose the ids that steps begun one at a time from host ids do
    (with the mapped table, and with the rows the host gathers until it is mapped), greedy and
    sampled, for one sequence, for three, and through the scheduler; and so does an engine whose
    table could not be registered in place (a pinned copy)."""
    from zse_runtime.engine import Engine
    from zse_runtime.gpu import driver
    from zse_runtime.model import Batch
    from zse_runtime.sampling import SamplingParams

    sampled = SamplingParams(temperature=0.7, top_p=0.9, seed=3)
    engine = Engine.open(zse_path, device="cuda", max_model_len=2048, slots=4)
    mapped = engine.wait_for_launches_ahead(60)
    record("launch ahead: embedding mapped", mapped, f"{engine.ops.embedding_mapping}")

    def generated(params, ahead: bool, staged: bool = False):
        if staged:
            engine.ops.embedding_mapped.clear()  # as before the mapping is done
        try:
            with _launching_ahead(ahead):
                return list(engine.generate(prompt, steps, params, ignore_eos=True))
        finally:
            engine.ops.embedding_mapped.set()

    for label, params in (("greedy", SamplingParams()), ("sampled", sampled)):
        ahead, one_by_one = generated(params, True), generated(params, False)
        staged = generated(params, False, staged=True)
        record(f"launch ahead: {label} tokens == steps one by one", ahead == one_by_one,
               f"{sum(a == b for a, b in zip(ahead, one_by_one))}/{steps} equal")
        record(f"launch ahead: {label} tokens == host-gathered rows (before the mapping)",
               ahead == staged, f"{sum(a == b for a, b in zip(ahead, staged))}/{steps} equal")
    # three sequences: FED rows read their own row's previous id
    prompts = [prompt[:n] for n in (40, 90, 150)]
    first = []
    for slot, ids in enumerate(prompts):
        logits = engine.forward(Batch.of(ids, np.arange(len(ids)), np.full(len(ids), slot),
                                         [len(ids) - 1]))
        first.append(int(engine.sample(logits, [SamplingParams()], [0])[0]))
    runs, slots, params = {}, [0, 1, 2], [SamplingParams()] * 3

    def positions(k):
        return [len(ids) + k for ids in prompts]

    for ahead in (True, False):
        chosen = decode_steps(engine, first, positions, slots, params, 8, ahead)
        runs[ahead] = [[t, *column] for t, column in zip(first, np.array(chosen).T.tolist())]
    record("launch ahead: 3 sequences x 8 steps == one by one", runs[True] == runs[False],
           f"{runs[True][2][:6]}")
    # two generate() calls consumed in turn: each step's ids reach the call that began it
    alone = [list(engine.generate(ids, 24, ignore_eos=True)) for ids in prompts[:2]]
    turns, together = [engine.generate(ids, 24, ignore_eos=True) for ids in prompts[:2]], [[], []]
    for _ in range(24):
        for out, turn in zip(together, turns):
            out.append(next(turn))
    for turn in turns:
        turn.close()
    record("launch ahead: two generate() calls consumed in turn == each alone",
           together == alone and not engine._pending, f"{together[0][:4]} {together[1][:4]}")
    served = {ahead: _scheduled(engine, prompt, ahead) for ahead in (True, False)}
    (outputs, fed), (plain, _) = served[True], served[False]
    record("launch ahead: scheduler, 4 requests joining and stopping == steps one by one",
           outputs == plain and fed > 0, f"{fed} steps begun with FED tokens; lengths "
           f"{[len(o) for o in outputs]}")
    greedy = generated(SamplingParams(), True)
    del engine
    register = driver.register_host

    def refuse(pointer, nbytes):
        raise driver.CudaError("cuMemHostRegister refused (simulated by gpu_check)")

    driver.register_host = refuse
    try:
        engine = Engine.open(zse_path, device="cuda", max_model_len=2048, slots=4)
        mapped = engine.wait_for_launches_ahead(60)
        copied = list(engine.generate(prompt, steps, ignore_eos=True))
    finally:
        driver.register_host = register
    record("launch ahead: a pinned copy where registering fails", mapped and copied == greedy,
           f"{engine.ops.embedding_mapping}; {sum(a == b for a, b in zip(copied, greedy))}/"
           f"{steps} tokens equal")


def decode_steps(engine, tokens, positions, slots, params, count: int,
                 ahead: bool) -> list[np.ndarray]:
    """`count` decode steps of the same sequences, fed their last tokens `tokens` first, as the
    scheduler decodes a steady batch: each step begun before the previous one ends, its tokens
    FED on the device, if `ahead`; else one at a time from the ids on the host. positions(k):
    the positions step k feeds. The ids each step chose (bench_decode times this too)."""
    from zse_runtime.engine import FED

    rows = len(tokens)
    engine.begin_step(tokens, positions(0), slots, params, [1] * rows)
    chosen = []
    for k in range(1, count):  # begins step k, ends the one before
        if ahead:
            engine.begin_step([FED] * rows, positions(k), slots, params, [k + 1] * rows)
        chosen.append(engine.end_step())
        if not ahead:
            engine.begin_step(chosen[-1].tolist(), positions(k), slots, params, [k + 1] * rows)
    chosen.append(engine.end_step())
    return chosen


def _scheduled(engine, prompt: list[int], ahead: bool) -> tuple[list[list[int]], int]:
    """Four greedy requests through the scheduler (three slots: the fourth joins when one
    ends; one stops at a stop id): their tokens, and how many steps were begun FED."""
    import threading

    from zse_runtime.engine import FED
    from zse_runtime.sampling import SamplingParams
    from zse_runtime.scheduler import FinishEvent, Request, Scheduler

    prompts = [prompt[:n] for n in (30, 70, 110, 50)]
    lengths = [6, 20, 24, 12]
    free = list(engine.generate(prompts[2], lengths[2], ignore_eos=True))
    stops = [frozenset(), frozenset(), frozenset({free[9]}), frozenset()]
    begin, fed = engine.begin_step, []
    engine.begin_step = lambda tokens, *a: (fed.append(FED in list(tokens)), begin(tokens, *a))[1]
    outputs, finished = [[] for _ in prompts], threading.Semaphore(0)

    def emitter(out):
        return lambda event: finished.release() if isinstance(event, FinishEvent) \
            else out.append(event.token)

    try:
        with _launching_ahead(ahead):
            scheduler = Scheduler(engine, max_waiting=4)
            try:
                with scheduler._wake:
                    for ids, n, stop, out in zip(prompts, lengths, stops, outputs):
                        scheduler.submit(Request(ids, SamplingParams(), n, emitter(out),
                                                 stop_token_ids=stop))
                for _ in prompts:
                    finished.acquire(timeout=60)
            finally:
                scheduler.stop()
    finally:
        del engine.begin_step
    return outputs, sum(fed)


@contextlib.contextmanager
def _launching_ahead(ahead: bool):
    """Engine.launches_ahead forced to `ahead` meanwhile (steps begun one at a time with False)."""
    from zse_runtime.engine import Engine

    saved = Engine.launches_ahead
    Engine.launches_ahead = property(lambda self: ahead)
    try:
        yield
    finally:
        Engine.launches_ahead = saved


@check("SmolLM2")
def smollm2(work: Path, gguf: Path, long_text: str) -> None:
    from tests.gguf_fixtures import gguf_to_hf
    from zse_convert.convert import ConvertOptions, convert
    from zse_runtime.engine import Engine

    folder = work / "smollm2"
    gguf_to_hf(gguf, folder)
    out = work / "smollm2.zse"
    convert(str(folder), out, ConvertOptions())
    engine = Engine.open(out, device="cuda", max_model_len=2048)
    text = engine.tokenizer.decode(list(engine.generate("The capital of France is", 8)))
    record("SmolLM2: 'The capital of France is'", text.startswith(" Paris"), repr(text))
    tokenizer = engine.tokenizer
    del engine
    prompts = {"short": tokenizer.encode("The capital of France is"),
               "long": tokenizer.encode(long_text)[:1100]}
    _engine_vs_transformers("SmolLM2", out, folder, prompts)


@check("prebuilt .zse")
def prebuilt_zse(zse: Path, config_dir: Path, long_text: str) -> None:
    """A .zse converted elsewhere (e.g. Qwen2.5-Coder-0.5B) against transformers; config_dir holds
    its config.json for the reference architecture."""
    from zse_runtime.engine import Engine

    label = zse.stem
    engine = Engine.open(zse, device="cuda", max_model_len=2048)
    text = engine.tokenizer.decode(list(engine.generate("The capital of France is", 8)))
    record(f"{label}: 'The capital of France is'", text.startswith(" Paris"), repr(text))
    tokenizer = engine.tokenizer
    del engine
    prompts = {"short": tokenizer.encode("The capital of France is"),
               "long": tokenizer.encode(long_text)[:1100]}
    _engine_vs_transformers(label, zse, config_dir, prompts)


@check("7B speed")
def profile_forward(engine, tokens: int) -> None:
    """GPU time per kernel of one eager forward of `tokens` tokens (a decode step at position
    200, or a prefill chunk): events around every launch, summed by kernel name. Events add
    about a microsecond per launch; the graph replay above has no such gaps."""
    from zse_runtime.model import Batch

    ops = engine.ops
    launches: list[tuple[str, driver.Event, driver.Event]] = []
    plain = ops._launch

    def timed(name, *args):
        start, end = driver.Event(), driver.Event()
        start.record(ops.stream)
        plain(name, *args)
        end.record(ops.stream)
        launches.append((name, start, end))

    positions = np.arange(tokens) + (200 if tokens == 1 else 0)
    batch = Batch.of(np.arange(tokens) % 1000, positions, np.zeros(tokens), [tokens - 1])
    engine.decoder.forward(batch)  # warm-up
    ops._launch = timed
    try:
        engine.decoder.forward(batch)
    finally:
        del ops._launch
    ops.stream.synchronize()
    by_name: dict[str, list[float]] = {}
    for name, start, end in launches:
        by_name.setdefault(name, []).append(end.elapsed_ms(start) * 1000)
    total = sum(sum(v) for v in by_name.values())
    table = sorted(by_name.items(), key=lambda item: -sum(item[1]))
    detail = "; ".join(f"{name} {sum(us):.0f} us ({len(us)}x {np.median(us):.1f})"
                       for name, us in table)
    record(f"7B forward of {tokens} token(s), GPU time by kernel", True,
           f"{total:.0f} us in {len(launches)} launches: {detail}", total_us=total,
           kernels={name: {"launches": len(us), "total_us": sum(us), "median_us": float(np.median(us))}
                    for name, us in table})


def speed_7b(work: Path) -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    from make_synthetic_zse import PRESETS, write_random_zse
    from zse_runtime.engine import Engine
    from zse_runtime.sampling import SamplingParams

    path = work / "q7-synthetic.zse"
    started = time.perf_counter()
    write_random_zse(path, dict(PRESETS["qwen2.5-7b"]))
    record("7B synthetic .zse written", True, f"{path.stat().st_size / 1e9:.2f} GB in "
           f"{time.perf_counter() - started:.1f} s")
    context = driver.Context(0)
    free_before, _ = context.memory_info()
    started = time.perf_counter()
    engine = Engine.open(path, device="cuda", max_model_len=4096, slots=1)
    open_s = time.perf_counter() - started
    engine.wait_for_launches_ahead(60)  # the steady state
    free_after, _ = context.memory_info()
    record("7B open", True, f"{open_s:.2f} s ({engine.startup}); GPU memory in use "
           f"{(free_before - free_after) / 2**30:.2f} GiB", open_s=open_s,
           gpu_gib=(free_before - free_after) / 2**30)
    for label, params in (("greedy", SamplingParams()),
                          ("sampled", SamplingParams(temperature=0.7, top_p=0.9, seed=1))):
        list(engine.generate([1, 2, 3], 8, params, ignore_eos=True))
        started = time.perf_counter()
        count = len(list(engine.generate(list(range(100, 228)), 128, params, ignore_eos=True)))
        seconds = time.perf_counter() - started
        record(f"7B batch-1 {label} decode", True, f"{count / seconds:.1f} tok/s (128 tokens "
               "after a 128-token prompt, prefill included)", tok_s=count / seconds)
    ops = engine.ops
    graph = ops.graphs[1]
    start, end = driver.Event(), driver.Event()
    start.record(ops.stream)
    for _ in range(20):
        graph.launch(ops.stream)
    end.record(ops.stream)
    end.synchronize()
    step_ms = end.elapsed_ms(start) / 20
    record("7B decode step on the GPU (graph replay)", True,
           f"{step_ms:.2f} ms per token = {1000 / step_ms:.0f} tok/s if the host added nothing",
           step_ms=step_ms)
    for tokens in (1, 512):
        profile_forward(engine, tokens)
    prompt = list(np.random.default_rng(0).integers(0, 500, 2048))
    list(engine.generate(prompt[:512], 1, ignore_eos=True))
    started = time.perf_counter()
    list(engine.generate(prompt, 1, ignore_eos=True))
    seconds = time.perf_counter() - started
    record("7B prefill 2048 tokens", True, f"{2048 / seconds:.0f} tok/s ({seconds:.2f} s)",
           tok_s=2048 / seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--work", type=Path, default=Path("/tmp/zse_gpu_check"))
    parser.add_argument("--gguf", type=Path, help="SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--zse", type=Path, help="a converted .zse to check against transformers")
    parser.add_argument("--hf-config", type=Path, help="folder with the --zse model's config.json")
    parser.add_argument("--skip-kernels", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-synthetic", action="store_true")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    gpu = Gpu()
    info = gpu.context.info
    versions = {}
    for module in ("numpy", "numba", "numba_cuda", "cuda.bindings", "torch", "transformers"):
        try:
            versions[module] = __import__(module, fromlist=["__version__"]).__version__
        except Exception as exc:  # noqa: BLE001
            versions[module] = f"unavailable ({exc})"
    print(f"GPU {info.name}, compute {info.compute_capability}, {info.multiprocessors} SMs, "
          f"{info.total_memory / 2**30:.0f} GiB; kernels from {gpu.kernels.source}; {versions}")
    rng = np.random.default_rng(0)
    long_text = (Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}."
                 f"{sys.version_info.minor}" / "LICENSE.txt")
    long_text = long_text.read_text() if long_text.exists() else "The license text. " * 400
    if not args.skip_kernels:
        copy_gbps = copy_bandwidth(gpu)
        gemv(gpu, copy_gbps, rng)
        fp16_lm_head(gpu, copy_gbps, rng)
        gemm(gpu, rng)
        attention(gpu, rng)
        small_kernels(gpu, rng)
        sampling_kernel(gpu, rng)
    if not args.skip_synthetic:
        synthetic_model(args.work, long_text)
        synthetic_group96_model(args.work)
    if args.gguf:
        smollm2(args.work, args.gguf, long_text)
    if args.zse:
        prebuilt_zse(args.zse, args.hf_config, long_text)
    if not args.skip_speed:
        speed_7b(args.work)
    summary = {"gpu": info.name, "compute_capability": info.compute_capability,
               "kernels": gpu.kernels.source, "versions": versions, "results": RESULTS}
    (args.out / "gpu_check.json").write_text(json.dumps(summary, indent=2, default=str))
    print("\n" + "=" * 100)
    for r in RESULTS:
        print(f"{'PASS' if r['ok'] else 'FAIL'}  {r['check'][:48]:<48}  {r['detail'][:120]}")
    failed = sum(not r["ok"] for r in RESULTS)
    print(f"{len(RESULTS) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
