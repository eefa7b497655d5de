"""CUDA ops for the decoder, and decode steps replayed as CUDA graphs.

Every activation lives in a workspace buffer sized for the largest batch, allocated once, so
launches captured into a graph stay valid. A decode step's inputs (tokens, positions, slots,
sampling parameters) are written to a pinned host block and copied to the device just before
its graph; the chosen token ids come back right after it: no logits ever cross PCIe.

The embedding table stays in host memory (it would cost 1.09 GB of GPU memory at 7B). Eager
forwards (prompt chunks) gather their rows on the host. Once a background thread has mapped the
table for the device (`_map_embedding`, after start-up), the decode graphs read it in place by
token ids in device memory, so a step whose token is FED (the id its row chose one step before,
still on the device) can be launched before that id reaches the host: two decode steps may be in
flight, each with its own pinned block, and the GPU never waits for the host between them
(`Engine.generate`, the scheduler). Until then decode graphs read rows the host gathered, one
step at a time: a second set of graphs, captured only if a decode step comes that early.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass

import numpy as np

from ..config import ModelConfig, rope_tables
from ..engine import FED, PREFILL_CHUNK
from ..kernels import geometry as geo
from ..model import Batch, Decoder
from ..sampling import SamplingParams
from ..zsefile import (EMBED, FINAL_NORM, LAYOUT_INT4_ROWS, LM_HEAD, Int4Weight, ZseFile,
                       device_window_start, int4_section_sizes, tensor_view)
from . import driver
from .kernels import DeviceArray, KernelLibrary, download, upload
from .loader import upload_weights

log = logging.getLogger("zse")

DECODE_BUCKETS = (1, 2, 4, 8, 16, 32)


def _row(array: DeviceArray, t: int) -> DeviceArray:
    """Row t of a [T, N] array as a [1, N] array."""
    width = array.shape[1]
    return DeviceArray(array.pointer + t * width * array.dtype.itemsize, (1, width), array.dtype)


def _unregister(table: np.ndarray) -> None:
    try:
        driver.unregister_host(table.ctypes.data)
    except driver.CudaError:  # the context is gone (the interpreter is exiting)
        pass


def gemv_token_tile(tokens: int) -> int:
    """The smallest GEMV token tile that holds `tokens` in one pass, else the largest."""
    return next((tile for tile in geo.GEMV_TOKEN_TILES if tile >= tokens), geo.GEMV_TOKEN_TILES[-1])


def int4_gemv_plan(rows: int, cols: int, tokens: int) -> tuple[str, int, int, int]:
    """(kernel, rows per block, token tile, threads per block) for an INT4 GEMV of a
    [rows, cols] matrix."""
    tile = gemv_token_tile(tokens)
    tall = rows >= geo.GEMV_TALL_MIN_ROWS
    block_rows = geo.GEMV_TALL_ROWS if tile == 1 and tall else geo.GEMV_ROWS
    threads = geo.GEMV_MANY_ROWS_THREADS if rows > cols else geo.GEMV_THREADS
    return f"int4_gemv_t{tile}_r{block_rows}", block_rows, tile, threads


def int4_through_gemm(tokens: int, batch_invariant: bool = False) -> bool:
    """Whether the INT4 matrices multiply a batch of `tokens` rows on tensor cores (int4_gemm,
    float16 activations) rather than through the GEMV token tiles (integer digits written by
    the producers): every prompt chunk, and decode batches past one GEMV tile unless decode
    must be batch-invariant (geometry.py has the measurements)."""
    return tokens > geo.GEMV_MAX_TOKENS or (not batch_invariant
                                             and tokens >= geo.INT4_GEMM_MIN_TOKENS)


def int4_gemm_plan(rows: int, tokens: int, groups: int,
                   multiprocessors: int) -> tuple[str, tuple[int, int, int]]:
    """(kernel, grid) of an int4_gemm launch. Batches of up to GEMM_DECODE_TILE_T tokens take
    the 128-row x 32-token blocks (no warp on padding tokens), longer ones 64 x 64. K is split
    over quantization groups (grid z) until there are GEMM_SPLIT_BLOCKS_PER_SM blocks per SM,
    if the row and token tiles alone are fewer (decode batches, 3584-row matrices)."""
    decode = tokens <= geo.GEMM_DECODE_TILE_T
    tile_rows = geo.GEMM_DECODE_TILE_N if decode else geo.GEMM_TILE_N
    tile_tokens = geo.GEMM_DECODE_TILE_T if decode else geo.GEMM_TILE_T
    tiles = (math.ceil(rows / tile_rows), math.ceil(tokens / tile_tokens))
    return ("int4_gemm_t32" if decode else "int4_gemm"), (*tiles, gemm_splits(tiles, groups,
                                                                             multiprocessors))


def gemm_splits(tiles: tuple[int, int], groups: int, multiprocessors: int) -> int:
    """K splits for a GEMM grid of tiles (row tiles, token tiles): enough for
    GEMM_SPLIT_BLOCKS_PER_SM blocks per SM, at most one quantization group per split."""
    wanted = geo.GEMM_SPLIT_BLOCKS_PER_SM * multiprocessors
    return max(1, min(groups, math.ceil(wanted / (tiles[0] * tiles[1]))))


def fp16_through_gemm(cols: int, tokens: int, batch_invariant: bool = False) -> bool:
    """Whether an fp16 matrix (the lm_head) multiplies `tokens` rows on tensor cores (fp16_gemm,
    whose lanes read K in runs of 32) rather than through the GEMV token tiles, which read the
    weights once per tile: unless decode must be batch-invariant, from FP16_GEMM_MIN_TOKENS on."""
    return not batch_invariant and tokens >= geo.FP16_GEMM_MIN_TOKENS and cols % 32 == 0


def cache_words(cache: DeviceArray) -> DeviceArray:
    """A float16 KV cache [S, KVH, L, D] as attention_partial reads it: [S * KVH * L, D / 2]
    pairs of halves."""
    slots, heads, length, dim = cache.shape
    return DeviceArray(cache.pointer, (slots * heads * length, dim // 2), np.dtype(np.uint32))


def quantize_launch(tokens: int, cols: int) -> tuple[int, int]:
    """(grid, block) of quantize_activations over [tokens, cols]: a thread per value."""
    return math.ceil(tokens * cols / geo.ELEMENTWISE_THREADS), geo.ELEMENTWISE_THREADS


def split_launch(tokens: int, cols: int, group_size: int) -> tuple[int, int]:
    """(grid, block) of split_activations over [tokens, cols]: a warp per (token, group)."""
    warps = tokens * cols // group_size
    return math.ceil(warps * geo.WARP / geo.ELEMENTWISE_THREADS), geo.ELEMENTWISE_THREADS


@dataclass(frozen=True)
class QuantizedActivation(DeviceArray):
    """An activation whose producer also wrote it as the INT4 GEMV's digits (xq, xstep, xsum),
    in the workspace's one digits buffer: valid until the next producer writes there, which in
    the decoder is after this activation's consumer has been launched."""

    digits: tuple = ()


@dataclass(frozen=True)
class DeferredNorm:
    """A decode step's RMSNorm output as only the INT4 GEMV reads it (kernels/rmsnorm.py): the
    digits of r * gamma, and the sums of squares of r's blocks of 32, [T, H/32]. There are no
    normed floats: the GEMV's output is a PendingNorm."""

    shape: tuple
    digits: tuple
    norm_sumsq: DeviceArray


@dataclass(frozen=True)
class PendingNorm(DeviceArray):
    """A GEMV's output of a DeferredNorm input: W (r * gamma), still to be scaled by rms(r)^-1
    (and to have `bias` added) by the elementwise kernel that reads it next (rope_and_cache,
    silu_mul)."""

    norm_sumsq: DeviceArray | None = None
    bias: DeviceArray | None = None


class OutOfDeviceMemory(RuntimeError):
    pass


@dataclass(frozen=True)
class Int4Device:
    qweight: DeviceArray
    scales: DeviceArray
    zeros: DeviceArray
    group_size: int

    @property
    def rows(self) -> int:
        return self.qweight.shape[0]

    @property
    def cols(self) -> int:
        return self.qweight.shape[1] * 8  # eight 4-bit codes per word

    @property
    def groups(self) -> int:
        """Quantization groups per row."""
        return self.scales.shape[1]


class Arena:
    """Carves typed arrays out of one device allocation, each aligned to 256 bytes."""

    def __init__(self):
        self.sizes: list[tuple[str, tuple, np.dtype]] = []

    @staticmethod
    def nbytes_of(shape, dtype) -> int:
        return (int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize + 255) // 256 * 256

    def add(self, name: str, shape, dtype) -> None:
        self.sizes.append((name, tuple(int(s) for s in shape), np.dtype(dtype)))

    @property
    def nbytes(self) -> int:
        return sum(self.nbytes_of(s, d) for _, s, d in self.sizes)

    def allocate(self) -> dict[str, DeviceArray]:
        self.pointer = driver.allocate(self.nbytes)
        arrays, offset = {}, 0
        for name, shape, dtype in self.sizes:
            arrays[name] = DeviceArray(self.pointer + offset, shape, dtype)
            offset += self.nbytes_of(shape, dtype)
        return arrays


class GpuOps:
    """Implements model.Ops on one GPU. Use `GpuOps.open(...)`."""

    def __init__(self, context: driver.Context, zse: ZseFile, config: ModelConfig, slots: int,
                 max_len: int, startup, batch_invariant: bool = False):
        self.context, self.config, self.slots, self.max_len = context, config, slots, max_len
        self.batch_invariant = batch_invariant  # decode batches stay on the GEMV tiles
        self.multiprocessors = context.info.multiprocessors
        t = time.perf_counter()
        # ZSE_DEPENDENT_LAUNCH=0 launches every kernel after the previous one ends (diagnostics
        # and A/B runs; kernels/grid_dependency.py)
        self.kernels = KernelLibrary(
            context.info.compute_capability,
            dependent_launch=os.environ.get("ZSE_DEPENDENT_LAUNCH", "1") != "0")
        # no kernel has a stack frame (tests/test_prebuilt_kernels.py): reserve what they use
        # rather than CUDA's 1 KiB per resident thread
        context.set_stack_size(self.kernels.local_bytes)
        t = startup.mark("kernel_load", t)
        self.stream = driver.Stream()
        self.window = config.sliding_window or 0
        self.max_batch = min(slots, DECODE_BUCKETS[-1])
        self.max_tokens = max(PREFILL_CHUNK, self.max_batch)
        self.buckets = sorted({b for b in DECODE_BUCKETS if b < self.max_batch} | {self.max_batch})
        # decode graphs by the embedding address they read (None: rows the host gathered), each
        # a graph per batch bucket; `graphs` is the set the last step used
        self.graph_sets: dict[int | None, dict[int, driver.Graph]] = {}
        self.graphs: dict[int, driver.Graph] = {}
        self.capturing = False  # True while decode graphs are captured: no syncs, fixed shapes
        self.window_start = device_window_start(zse)  # the embedding stays on the host
        self._plan_memory(zse)  # raises OutOfDeviceMemory before anything is uploaded
        self.weights_pointer = driver.allocate(zse.header.data_length - self.window_start)
        embedding = upload_weights(zse, self.weights_pointer, self.window_start, context, startup)
        self.weights = {name: self._tensor(zse, name) for name, info in zse.tensors.items()
                        if info.offset >= self.window_start}
        self._host_embedding(tensor_view(zse.tensors[EMBED], embedding))
        self.embedding_bytes = embedding
        # after a cold start, each new token's row would otherwise be a disk read on the
        # serving path (H200: +0.4-0.8 ms per token in the first decode run after a cache
        # drop): read the table into the page cache in the background, then map it
        prefetch = zse.prefetch_tensor(EMBED)
        t = startup.mark("upload", t)
        self.buffers = self.arena.allocate()
        cos, sin = rope_tables(config, max_len)
        upload(self.stream, self.buffers["rope_cos"].pointer, cos)
        upload(self.stream, self.buffers["rope_sin"].pointer, sin)
        self._no_bias = self.buffers["no_bias"]
        # eager forwards stage their inputs in one pinned block, decode steps alternate between
        # two (a step's block is rewritten two launches later, after its step was collected)
        self.meta_host = driver.PinnedBuffer(self.meta_bytes)
        self.meta = self._meta_views(self.meta_host)
        self.step_hosts = [driver.PinnedBuffer(self.meta_bytes) for _ in range(2)]
        self.step_meta = [self._meta_views(host) for host in self.step_hosts]
        for views in self.step_meta:
            views["rows"][0][:] = np.arange(self.max_batch)  # a decode step samples every row
        self.step_done = [driver.Event(timing=False) for _ in range(2)]
        self.in_flight: deque[tuple[int, int]] = deque()  # (block, rows) of uncollected steps
        self.launched_steps = 0
        self.embed_host = driver.PinnedBuffer(sum(self.embed_staging_bytes))
        self.embed_staging = self._embed_staging_views()
        self.staging_copied = driver.Event(timing=False)  # its last copy out has run
        upload(self.stream, self.buffers["row_ids"].pointer,
               np.arange(self.max_tokens, dtype=np.int32))
        upload(self.stream, self.buffers["attention_tickets"].pointer,
               np.zeros(self.buffers["attention_tickets"].shape, np.int32))
        # a FED token reads these: valid ids (0) before the first step writes any
        upload(self.stream, self.meta["ids"][1].pointer, np.zeros(self.max_batch, np.int32))
        self.stream.synchronize()
        startup.mark("kv_cache+workspace", t)
        self.decoder: Decoder | None = None
        self.graph_table: int | None = None  # while capturing: the embedding address read
        self.mapped_table: int | None = None  # where _map_embedding made it readable
        self.embedding_mapped = threading.Event()
        self.embedding_mapping: tuple[str, float] | None = None  # (how, seconds), once mapped
        threading.Thread(target=self._map_embedding, args=(prefetch,), name="zse-map-embedding",
                         daemon=True).start()

    # -- memory ---------------------------------------------------------------------------

    def _plan_memory(self, zse: ZseFile) -> None:
        c, T, B = self.config, self.max_tokens, self.max_batch
        # attention partials: prefill chunks and decode steps split keys differently
        partial_rows = max(T * self.partitions(T, self.max_len), B * self.partitions(B, self.max_len))
        arena = Arena()
        # slot `slots` is a scratch slot that padded graph entries write into; with one sequence
        # at a time nothing is ever padded (the only bucket is 1), so it is left out
        self.kv_slots = self.slots + (1 if self.max_batch > 1 else 0)
        kv_shape = (c.num_hidden_layers, 2, self.kv_slots, c.num_key_value_heads, self.max_len,
                    c.head_dim)
        arena.add("kv_cache", kv_shape, np.float16)
        for name, width in (("hidden", c.hidden_size), ("residual", c.hidden_size),
                            ("residual_next", c.hidden_size),
                            ("normed", c.hidden_size), ("qkv", c.q_size + 2 * c.kv_size),
                            ("q", c.q_size), ("attended", c.q_size),
                            ("gate_up", 2 * c.intermediate_size), ("act", c.intermediate_size)):
            arena.add(name, (T, width), np.float32)
        # decode GEMV inputs as integer digits (kernels/quantize_activations.py)
        gemv_tokens, widest = min(T, geo.GEMV_MAX_TOKENS), max(c.hidden_size, c.q_size,
                                                             c.intermediate_size)
        arena.add("xq", (gemv_tokens, widest // 2), np.uint32)
        arena.add("xstep", (gemv_tokens, widest // 32), np.float32)
        arena.add("xsum", (gemv_tokens, widest // 32), np.float32)
        # a deferred RMSNorm's sums of squares per block of 32 inputs (kernels/rmsnorm.py)
        arena.add("norm_sumsq", (gemv_tokens, c.hidden_size // 32), np.float32)
        # prefill GEMM inputs as float16 pairs (kernels/gemm_int4.py); groups hold >= 32 inputs
        arena.add("x_halves", (T, widest // 2), np.uint32)
        arena.add("group_sum", (T, widest // 32), np.float32)
        arena.add("group_unscale", (T, widest // 32), np.float32)
        # split-K runs of small GEMM grids: splits x tiles < 2 x the blocks wanted, and both
        # block shapes hold 4096 outputs (int4_gemm_plan)
        arena.add("gemm_partials", (2 * geo.GEMM_SPLIT_BLOCKS_PER_SM * self.multiprocessors
                                    * geo.GEMM_TILE_N * geo.GEMM_TILE_T,), np.float32)
        arena.add("part_max", (partial_rows * c.num_attention_heads,), np.float32)
        arena.add("part_sum", (partial_rows * c.num_attention_heads,), np.float32)
        arena.add("part_acc", (partial_rows * c.num_attention_heads, c.head_dim), np.float32)
        # decode attention's tickets, one per block row (token x head at most): zeroed once,
        # reset by the merging block
        arena.add("attention_tickets", (B * c.num_attention_heads,), np.int32)
        arena.add("last_hidden", (B, c.hidden_size), np.float32)
        arena.add("logits", (B, c.vocab_size), np.float32)
        # sampling: per row, each slice's arg max and kept mass, the radix histograms and the
        # search state between launches (kernels/sampling.py)
        blocks, histograms = geo.sampling_blocks(c.vocab_size), geo.SAMPLING_HISTOGRAMS
        arena.add("sample_part_best", (B, blocks), np.float32)
        arena.add("sample_part_index", (B, blocks), np.int32)
        arena.add("sample_hist_count", (B, histograms, geo.SAMPLING_BINS), np.uint32)
        arena.add("sample_hist_mass", (B, histograms, geo.SAMPLING_BINS), np.uint64)
        arena.add("sample_state", (B, histograms + 1, geo.SAMPLING_STATE_FIELDS), np.uint64)
        arena.add("sample_block_mass", (B, blocks), np.uint64)
        arena.add("rope_cos", (self.max_len, c.head_dim // 2), np.float32)
        arena.add("rope_sin", (self.max_len, c.head_dim // 2), np.float32)
        arena.add("no_bias", (1,), np.float32)
        # the embedding rows of a step's tokens, gathered on the host (GpuOps.embed), and the
        # row indices 0, 1, ... that the embed kernels read them by
        embed = zse.tensors[EMBED]
        if embed.layout == LAYOUT_INT4_ROWS:
            groups = embed.shape[1] // embed.group_size
            self.embed_parts = [((embed.shape[1] // 8,), np.uint32), ((groups,), np.float16),
                                ((groups,), np.float16)]
        else:
            self.embed_parts = [((embed.shape[1],), np.dtype(embed.dtype))]
        self.embed_staging_bytes = [Arena.nbytes_of((T, *shape), dtype)
                                    for shape, dtype in self.embed_parts]
        for i, (shape, dtype) in enumerate(self.embed_parts):
            arena.add(f"embed_part{i}", (T, *shape), dtype)
        arena.add("row_ids", (T,), np.int32)
        # step inputs, mirrored by one pinned host block: int32 tokens, positions, slots
        # [max_tokens]; rows, top_k, ids [max_batch]; float32 temperature, top_p; uint64 seeds, steps
        self.meta_layout = [("tokens", T, np.int32), ("positions", T, np.int32),
                            ("slots", T, np.int32), ("rows", B, np.int32), ("top_k", B, np.int32),
                            ("temperature", B, np.float32), ("top_p", B, np.float32),
                            ("seeds", B, np.uint64), ("steps", B, np.uint64),
                            ("ids", B, np.int32)]
        self.meta_bytes = sum(Arena.nbytes_of((n,), d) for _, n, d in self.meta_layout)
        arena.add("meta", (self.meta_bytes,), np.uint8)
        self.arena = arena
        self.kv_cache_bytes = Arena.nbytes_of(kv_shape, np.float16)
        weights = zse.header.data_length - self.window_start
        needed = weights + arena.nbytes
        free, total = self.context.memory_info()
        if needed > free:
            raise OutOfDeviceMemory(
                f"the model needs {needed / 2**30:.2f} GiB of GPU memory (weights "
                f"{weights / 2**30:.2f}, KV cache {self.kv_cache_bytes / 2**30:.2f}, "
                f"workspace {(arena.nbytes - self.kv_cache_bytes) / 2**30:.2f}) but "
                f"{free / 2**30:.2f} GiB of {total / 2**30:.2f} GiB is free; lower --max-model-len "
                "or the slot count")

    def _meta_views(self, host) -> dict[str, tuple[np.ndarray, DeviceArray]]:
        """{name: (its view in the pinned block `host`, its device array)}"""
        device, views, offset = self.buffers["meta"], {}, 0
        for name, count, dtype in self.meta_layout:
            dtype = np.dtype(dtype)
            views[name] = (host.array[offset:offset + count * dtype.itemsize].view(dtype),
                           DeviceArray(device.pointer + offset, (count,), dtype))
            offset += Arena.nbytes_of((count,), dtype)
        self.meta_input_bytes = offset - Arena.nbytes_of((self.max_batch,), np.int32)  # all but ids
        return views

    def _host_embedding(self, table) -> None:
        """The embedding table in host memory, as the parts the staging mirrors."""
        self.embedding = list(table[:3]) if isinstance(table, Int4Weight) else [table]
        self.embedding_group = table.group_size if isinstance(table, Int4Weight) else 0

    def _map_embedding(self, prefetch: threading.Thread | None) -> None:
        """Make the host embedding table readable by the decode graphs (a background thread:
        the table is read from disk first after a cold start). In place where the driver lets
        host memory be registered (40 ms for the 7B table on the H200 with the page cache
        warm), else as a pinned copy."""
        started = time.perf_counter()
        table = self.embedding_bytes
        try:
            self.context.make_current()
            if prefetch is not None:
                prefetch.join()
            try:
                driver.register_host(table.ctypes.data, table.nbytes)
                # before the mapping can go (it outlives this object, which holds a view of it)
                weakref.finalize(self, _unregister, table)
                address, how = driver.device_pointer(table.ctypes.data), "registered in place"
            except driver.CudaError as exc:
                log.warning("the embedding table could not be registered for the GPU (%s): "
                            "copying it into pinned host memory", exc)
                self.embedding_copy = driver.PinnedBuffer(table.nbytes, mapped=True)
                self.embedding_copy.array[:] = table
                address, how = driver.device_pointer(self.embedding_copy.pointer), "copied"
        except Exception:  # noqa: BLE001 - decode steps keep to one at a time, as correct
            log.exception("mapping the embedding table for the GPU failed: decode steps are not "
                          "launched ahead")
            return
        self.mapped_table = address
        self.embedding_mapping = (how, time.perf_counter() - started)
        self.embedding_mapped.set()
        log.info("embedding table (%.2f GB) %s for the decode graphs in %.2f s",
                 table.nbytes / 1e9, how, self.embedding_mapping[1])

    def _mapped_embedding(self, address: int) -> list[DeviceArray]:
        """The embedding's parts as the device sees them, the table's bytes at `address`."""
        base = self.embedding_bytes.ctypes.data
        return [DeviceArray(address + part.ctypes.data - base, part.shape, part.dtype)
                for part in self.embedding]

    @property
    def launches_ahead(self) -> bool:
        """Whether a decode step may be launched with FED tokens before the previous step's
        ids are collected: once the embedding is mapped."""
        return self.embedding_mapped.is_set()

    @property
    def max_in_flight(self) -> int:
        """Decode steps launch_decode lets be in flight at once."""
        return 2 if self.embedding_mapped.is_set() else 1

    def _embed_staging_views(self) -> list[np.ndarray]:
        views, offset = [], 0
        for (shape, dtype), nbytes in zip(self.embed_parts, self.embed_staging_bytes):
            count = self.max_tokens * int(np.prod(shape))
            views.append(self.embed_host.array[offset:offset + count * np.dtype(dtype).itemsize]
                         .view(dtype).reshape(self.max_tokens, *shape))
            offset += nbytes
        return views

    def _stage_embeddings(self, tokens: np.ndarray, rows: int) -> None:
        """Gather the tokens' embedding rows into the pinned staging, its first `rows` rows
        (padding rows repeat row 0). The caller makes sure no copy out of it is in flight."""
        ids = np.zeros(rows, np.int64)
        ids[:tokens.size] = tokens
        for table, staging in zip(self.embedding, self.embed_staging):
            np.take(table, ids, axis=0, out=staging[:rows])  # IndexError for an id >= vocab

    def _copy_embeddings(self, rows: int) -> None:
        for i, staging in enumerate(self.embed_staging):
            self.stream.copy_to_device(self.buffers[f"embed_part{i}"].pointer,
                                       staging.ctypes.data, rows * staging[0].nbytes)
        self.staging_copied.record(self.stream)

    def bind_thread(self) -> None:
        self.context.make_current()

    def to_host(self, array: DeviceArray) -> np.ndarray:
        """Synchronous device -> host copy (logprob requests, tests and checks)."""
        return download(self.stream, array)

    def _tensor(self, zse: ZseFile, name: str):
        info = zse.tensors[name]
        base = self.weights_pointer + info.offset
        base -= self.window_start  # the device holds the data section from window_start on
        if info.layout == LAYOUT_INT4_ROWS:
            rows, cols = info.shape
            packed, scale_bytes, _ = int4_section_sizes(rows, cols, info.group_size)
            groups = cols // info.group_size
            return Int4Device(DeviceArray(base, (rows, cols // 8), np.dtype(np.uint32)),
                              DeviceArray(base + packed, (rows, groups), np.dtype(np.float16)),
                              DeviceArray(base + packed + scale_bytes, (rows, groups),
                                          np.dtype(np.float16)), info.group_size)
        return DeviceArray(base, info.shape, np.dtype(info.dtype))

    def kv(self, layer: int, which: int) -> DeviceArray:
        c, cache = self.config, self.buffers["kv_cache"]
        shape = (self.kv_slots, c.num_key_value_heads, self.max_len, c.head_dim)
        size = int(np.prod(shape)) * 2
        return DeviceArray(cache.pointer + (layer * 2 + which) * size, shape, np.dtype(np.float16))

    def kv_words(self, layer: int, which: int) -> DeviceArray:
        return cache_words(self.kv(layer, which))

    def attention_kind(self, tokens: int) -> str:
        """"decode" for a decode step's batch, "prefill" for a prompt chunk: attention's
        partition length and kernel variant follow it."""
        return "decode" if tokens <= self.max_batch else "prefill"

    def decode_attention_plan(self, tokens: int) -> tuple[str, int]:
        """(kernel, blocks per partition) of a decode step's attention: a block per token x
        query head, or, for batches, per token x KV head, whose block reads each cached row
        once for every query head that shares it (geometry.py has the measurements)."""
        c = self.config
        group = c.num_attention_heads // c.num_key_value_heads
        if tokens >= geo.ATTENTION_GROUPED_MIN_TOKENS and 1 < group <= geo.ATTENTION_MAX_GROUP:
            return "attention_decode_grouped", tokens * c.num_key_value_heads
        return "attention_decode", tokens * c.num_attention_heads

    def partition_length(self, tokens: int) -> int:
        """Keys per attention partition: short for decode steps, long for prefill chunks."""
        return geo.ATTENTION_DECODE_PARTITION if self.attention_kind(tokens) == "decode" \
            else geo.ATTENTION_PREFILL_PARTITION

    def partitions(self, tokens: int, keys: int) -> int:
        span = min(keys, self.window) if self.window else keys
        return max(1, math.ceil(span / self.partition_length(tokens)))

    # -- step inputs ----------------------------------------------------------------------

    def prepare(self, batch: Batch) -> None:
        """Stage the batch's metadata and embedding rows (pinned host -> device, on the
        stream). While a decode graph is captured, only the shapes: launch_decode copies its
        inputs (and its rows, for graphs that do not read the mapped table)."""
        T = batch.tokens.size
        if T > self.max_tokens or batch.logit_rows.size > self.max_batch:
            raise ValueError(f"batch of {T} tokens / {batch.logit_rows.size} rows exceeds the "
                             f"workspace ({self.max_tokens} / {self.max_batch})")
        self.tokens_now = T
        self.rows_now = batch.logit_rows.size
        if self.capturing:
            # a graph is replayed at every context length: it covers the longest
            self.parts_now = self.partitions(T, self.max_len)
            return
        # the previous eager step's copies out of the pinned blocks may still be queued
        self.stream.synchronize()
        for name, values in (("tokens", batch.tokens), ("positions", batch.positions),
                             ("slots", batch.slots), ("rows", batch.logit_rows)):
            self.meta[name][0][:values.size] = values
        self._stage_embeddings(batch.tokens, T)
        self._copy_embeddings(T)
        self.parts_now = self.partitions(T, int(batch.positions.max()) + 1)
        self.stream.copy_to_device(self.buffers["meta"].pointer, self.meta_host.pointer,
                                   self.meta_input_bytes)

    def _meta(self, name: str, count: int) -> DeviceArray:
        return self.meta[name][1].rows(count)

    def _launch(self, name, grid, block, *args) -> None:
        self.kernels.launch(name, grid, block, self.stream, *args)

    # -- ops ------------------------------------------------------------------------------

    def embed(self, tokens) -> DeviceArray:
        """The step's embedding rows widened to float32 on the device: from rows the host
        gathered and copied (eager forwards, and decode graphs until the table is mapped), or
        in a decode graph from the mapped host table, by the token ids in device memory (a FED
        id: the row's previous choice, `meta["ids"]`)."""
        T, out = self.tokens_now, self.buffers["hidden"].rows(self.tokens_now)
        if self.capturing and self.graph_table is not None:
            ids, parts = self._meta("tokens", T), self._mapped_embedding(self.graph_table)
        else:
            ids, parts = self.buffers["row_ids"].rows(T), [self.buffers[f"embed_part{i}"].rows(T)
                                                           for i in range(len(self.embed_parts))]
        previous = self.meta["ids"][1]
        if self.embedding_group:
            words = parts[0].shape[1]
            self._launch("embed_int4", (T, math.ceil(words / geo.ROW_THREADS)), geo.ROW_THREADS,
                         ids, previous, *parts, np.int32(self.embedding_group), out)
        else:
            self._launch("embed_fp16", (T, math.ceil(out.shape[1] / geo.ROW_THREADS)),
                         geo.ROW_THREADS, ids, previous, parts[0], out)
        return out

    def _through_gemv(self, tokens: int) -> bool:
        """Whether a batch this size multiplies through the INT4 GEMVs, whose inputs its
        producers quantize, rather than the tensor-core GEMM."""
        return not int4_through_gemm(tokens, self.batch_invariant)

    def _tiled_attention_serves(self, batch: Batch) -> bool:
        """Whether attention_tiled computes this batch's attention: a prompt chunk (more tokens
        than a decode batch, so the GEMM reads the output as floats: no GEMV digits to write) of
        one sequence (its tokens share a KV-cache slot), with a head the kernel's fragments
        cover."""
        dim = self.config.head_dim
        return (batch.tokens.size > geo.GEMV_MAX_TOKENS and dim % 8 == 0
                and dim <= geo.ATTENTION_MAX_HEAD_DIM and bool((batch.slots == batch.slots[0]).all()))

    def _digits(self, T: int, K: int) -> tuple[DeviceArray, ...]:
        """The INT4 GEMV's input digits for a [T, K] activation (kernels/quantize_activations.py):
        contiguous prefixes of the workspace."""
        f32 = np.dtype(np.float32)
        return (DeviceArray(self.buffers["xq"].pointer, (T, K // 2), np.dtype(np.uint32)),
                DeviceArray(self.buffers["xstep"].pointer, (T, K // 32), f32),
                DeviceArray(self.buffers["xsum"].pointer, (T, K // 32), f32))

    def _producing(self, out: DeviceArray, quantize: bool):
        """(the producer's output, its digits arguments and flag): a decode step's producers write
        the digits of what they compute; prefill ones (the GEMM reads floats) do not."""
        T, K = out.shape
        if not quantize:
            return out, (np.int32(0), *self._digits(1, 32))  # never written
        digits = self._digits(T, K)
        return QuantizedActivation(out.pointer, out.shape, out.dtype, digits), (np.int32(1), *digits)

    def _norm_sumsq(self, T: int) -> DeviceArray:
        return self.buffers["norm_sumsq"].rows(T)

    def add_rmsnorm(self, delta: DeviceArray, residual, norm: str):
        """(normed, new residual). In a step whose INT4 matrices multiply through the GEMVs the
        norm is deferred (kernels/rmsnorm.py), except the last one: the lm_head's input is
        gathered and, in fp16, read as floats."""
        T, hidden = delta.shape
        # the kernel's blocks read the old residual while others write the new one: two buffers
        first, second = self.buffers["residual"].rows(T), self.buffers["residual_next"].rows(T)
        res_out = second if residual is not None and residual.pointer == first.pointer else first
        # spread a decode batch's rows over SMs
        width = geo.NORM_DECODE_SLICE if T <= geo.GEMV_MAX_TOKENS else hidden
        deferred = self._through_gemv(T) and norm != FINAL_NORM
        out = self.buffers["normed"].rows(T)
        # else neither is written
        digits = self._digits(T, hidden) if deferred else self._digits(1, 32)
        sumsq = self._norm_sumsq(T if deferred else 1)
        self._launch("add_rmsnorm", (T, math.ceil(hidden / width)), geo.NORM_THREADS, delta,
                     residual if residual is not None else second,  # not read without one
                     self.weights[norm], np.float32(self.config.rms_norm_eps),
                     np.int32(residual is not None), np.int32(width), res_out, out,
                     np.int32(deferred), *digits, sumsq)
        if deferred:
            return DeferredNorm((T, hidden), digits, sumsq), res_out
        return out, res_out

    def _optional(self, bias: DeviceArray | None) -> tuple:
        """A kernel's (bias, has_bias) arguments; without one, the bias is never read."""
        return (bias if bias is not None else self._no_bias), np.int32(bias is not None)

    def _finishing(self, x: DeviceArray):
        """The deferred-norm arguments of an elementwise kernel reading x: (deferred, sums of
        squares, eps), and the bias x still lacks (or None)."""
        eps = np.float32(self.config.rms_norm_eps)
        if isinstance(x, PendingNorm):
            return (np.int32(1), x.norm_sumsq, eps), x.bias
        return (np.int32(0), self._norm_sumsq(1), eps), None

    _OUTPUT = {"qkv": "qkv", "o_proj": "hidden", "gate_up": "gate_up", "down_proj": "hidden"}

    def linear(self, x, weight: str, bias: str | None = None) -> DeviceArray:
        T = x.shape[0]
        out = self.buffers[self._OUTPUT[weight.rsplit(".", 1)[-1]]].rows(T)
        bias_array = self.weights[bias] if bias else None
        if isinstance(x, DeferredNorm):  # the next kernel scales the output, then adds the bias
            self._matmul(x, self.weights[weight], out, None)
            return PendingNorm(out.pointer, out.shape, out.dtype, x.norm_sumsq, bias_array)
        self._matmul(x, self.weights[weight], out, bias_array)
        return out

    def _matmul(self, x: DeviceArray, w, out: DeviceArray, bias: DeviceArray | None) -> None:
        T = x.shape[0]
        if isinstance(x, PendingNorm):
            raise AssertionError("a GEMV's output of a deferred norm is not finished")
        if isinstance(x, DeferredNorm) and not (isinstance(w, Int4Device) and self._through_gemv(T)):
            raise AssertionError("a deferred norm can only feed an INT4 GEMV")
        if not isinstance(w, Int4Device):  # an fp16 lm_head (logit rows only), as pairs of halves
            tile = gemv_token_tile(T)
            words = DeviceArray(w.pointer, (w.shape[0], w.shape[1] // 2), np.dtype(np.uint32))
            if fp16_through_gemm(w.shape[1], T, self.batch_invariant):
                self._launch("fp16_gemm", (math.ceil(w.shape[0] / geo.GEMM_TILE_N),
                                           math.ceil(T / geo.GEMM_TILE_T)),
                             geo.GEMM_THREADS, x, words, out)
                return
            self._launch(f"fp16_matmul_t{tile}",
                         (math.ceil(w.shape[0] / geo.GEMV_ROWS), math.ceil(T / tile)),
                         geo.FP16_GEMV_THREADS, x, words, out)
            return
        if self._through_gemv(T):  # decode: one pass over the weights per token tile
            activations = x.digits if isinstance(x, (QuantizedActivation, DeferredNorm)) \
                else self._quantize_activations(x)
            kernel, block_rows, tile, threads = int4_gemv_plan(w.rows, w.cols, T)
            self._launch(kernel, (math.ceil(w.rows / block_rows), math.ceil(T / tile)), threads,
                         *activations, w.qweight, w.scales, w.zeros,
                         np.uint32(geo.gemv_group_reciprocal(w.group_size)),
                         *self._optional(bias), out)
        else:  # prefill and wide decode batches: tensor cores
            weight = (w.qweight, w.scales, w.zeros, np.int32(w.group_size), *self._optional(bias))
            split = self._split_activations(x, w.group_size)
            kernel, grid = int4_gemm_plan(w.rows, T, w.groups, self.multiprocessors)
            splits = grid[2]
            partials = out if splits == 1 else DeviceArray(
                self.buffers["gemm_partials"].pointer, (splits * T, w.rows), out.dtype)
            self._launch(kernel, grid, geo.GEMM_THREADS, *split, *weight, partials)
            if splits > 1:
                self._launch("sum_splits", (T, math.ceil(w.rows / geo.ROW_THREADS)),
                             geo.ROW_THREADS, partials, np.int32(splits), out)

    def _quantize_activations(self, x: DeviceArray) -> tuple[DeviceArray, ...]:
        """x [T, K] as the INT4 GEMV's integer digits, for an input no producer quantized (the
        INT4 lm_head's): a thread per value."""
        T, K = x.shape
        digits = self._digits(T, K)
        self._launch("quantize_activations", *quantize_launch(T, K), x, *digits)
        return digits

    def _split_activations(self, x: DeviceArray, group_size: int) -> tuple[DeviceArray, ...]:
        """x [T, K] as the prefill GEMM's float16 pairs, group sums and group unscales, in the
        workspace (contiguous prefixes)."""
        (T, K), u32, f32 = x.shape, np.dtype(np.uint32), np.dtype(np.float32)
        split = (DeviceArray(self.buffers["x_halves"].pointer, (T, K // 2), u32),
                 DeviceArray(self.buffers["group_sum"].pointer, (T, K // group_size), f32),
                 DeviceArray(self.buffers["group_unscale"].pointer, (T, K // group_size), f32))
        self._launch("split_activations", *split_launch(T, K, group_size), x,
                     np.int32(group_size), *split)
        return split

    def rope_and_cache(self, qkv: DeviceArray, batch: Batch, layer: int) -> DeviceArray:
        T, q = qkv.shape[0], self.buffers["q"].rows(qkv.shape[0])
        c = self.config
        work = (c.num_attention_heads + c.num_key_value_heads) * c.head_dim // 2 + c.kv_size
        deferred, bias = self._finishing(qkv)
        self._launch("rope_and_cache", (T, math.ceil(work / geo.ROW_THREADS)), geo.ROW_THREADS,
                     qkv, self._meta("positions", T),
                     self._meta("slots", T), self.buffers["rope_cos"], self.buffers["rope_sin"],
                     self.kv(layer, 0), self.kv(layer, 1), q,
                     np.int32(self.config.num_attention_heads), *deferred, *self._optional(bias))
        return q

    def attention(self, q: DeviceArray, batch: Batch, layer: int) -> DeviceArray:
        c, T, P = self.config, q.shape[0], self.parts_now
        if self._tiled_attention_serves(batch):
            out = self.buffers["attended"].rows(T)
            self._launch("attention_tiled", (math.ceil(T / geo.ATTENTION_TILE_TOKENS),
                                             c.num_attention_heads), geo.ATTENTION_TILED_THREADS,
                         q, self.kv_words(layer, 0), self.kv_words(layer, 1),
                         np.int32(c.num_key_value_heads), np.int32(self.max_len),
                         self._meta("positions", T), np.int32(batch.slots[0]),
                         np.int32(self.window), out)
            return out
        items, f32 = T * c.num_attention_heads, np.dtype(np.float32)
        # contiguous prefixes of the workspace, viewed with this step's partition count
        part_max = DeviceArray(self.buffers["part_max"].pointer, (items, P), f32)
        part_sum = DeviceArray(self.buffers["part_sum"].pointer, (items, P), f32)
        part_acc = DeviceArray(self.buffers["part_acc"].pointer, (items, P, c.head_dim), f32)
        # the combine quantizes a head's outputs: its blocks of 32 must not straddle heads
        out, digits = self._producing(self.buffers["attended"].rows(T),
                                      self._through_gemv(T) and c.head_dim % 32 == 0)
        partial_args = (q, self.kv_words(layer, 0), self.kv_words(layer, 1),
                        np.int32(c.num_key_value_heads), np.int32(self.max_len),
                        self._meta("positions", T), self._meta("slots", T), np.int32(self.window),
                        np.int32(self.partition_length(T)), part_max, part_sum, part_acc)
        if self.attention_kind(T) == "decode":  # the last partition block merges
            kernel, blocks = self.decode_attention_plan(T)
            self._launch(kernel, (blocks, P), geo.ATTENTION_THREADS, *partial_args,
                         self.buffers["attention_tickets"].rows(blocks), out, *digits)
            return out
        self._launch("attention_partial_prefill", (items, P), geo.ATTENTION_THREADS,
                     *partial_args)
        self._launch("attention_combine", items, geo.ATTENTION_THREADS, part_max, part_sum,
                     part_acc, self._meta("positions", T), np.int32(self.window),
                     np.int32(self.partition_length(T)), out, *digits)
        return out

    def silu_mul(self, gate_up: DeviceArray) -> DeviceArray:
        T = gate_up.shape[0]
        out, digits = self._producing(self.buffers["act"].rows(T), self._through_gemv(T))
        deferred, bias = self._finishing(gate_up)
        assert bias is None, "gate_up has no bias"
        self._launch("silu_mul", (T, math.ceil(self.config.intermediate_size / geo.ROW_THREADS)),
                     geo.ROW_THREADS, gate_up, out, *digits, *deferred)
        return out

    def logits(self, x: DeviceArray, rows) -> DeviceArray:
        B = self.rows_now
        last = self.buffers["last_hidden"].rows(B)
        self._launch("gather_rows", (B, math.ceil(x.shape[1] / geo.ROW_THREADS)), geo.ROW_THREADS,
                     x, self._meta("rows", B), last)
        out = self.buffers["logits"].rows(B)
        self._matmul(last, self.weights[LM_HEAD], out, None)
        return out

    # -- sampling and graphs --------------------------------------------------------------

    @staticmethod
    def _stage_sampling(views, params: list[SamplingParams], steps) -> None:
        for i, (p, step) in enumerate(zip(params, steps)):
            views["temperature"][0][i] = p.temperature
            views["top_k"][0][i] = p.top_k
            views["top_p"][0][i] = p.top_p
            views["seeds"][0][i] = p.seed & (2**64 - 1)
            views["steps"][0][i] = step

    def _launch_sampling(self, logits: DeviceArray) -> None:
        B = logits.shape[0]
        args = (logits, self._meta("temperature", B), self._meta("top_k", B),
                self._meta("top_p", B), self._meta("seeds", B), self._meta("steps", B),
                self._meta("ids", B), *(self.buffers[f"sample_{name}"].rows(B) for name in (
                    "part_best", "part_index", "hist_count", "hist_mass", "state", "block_mass")))
        blocks = self.buffers["sample_part_best"].shape[1]
        for name, grid, step in geo.sampling_launches(B, blocks):
            self._launch(name, grid, geo.SAMPLING_THREADS, *args, np.int32(step))

    def _copy_ids_to(self, host: driver.PinnedBuffer, rows: int) -> None:
        ids = self.meta["ids"][1]
        self.stream.copy_to_host(host.pointer + ids.pointer - self.buffers["meta"].pointer,
                                 ids.pointer, rows * 4)

    def sample(self, logits: DeviceArray, params: list[SamplingParams], steps) -> np.ndarray:
        """Eager sampling after a forward (whose metadata copy is already queued)."""
        self._stage_sampling(self.meta, params, steps)
        B = logits.shape[0]
        # the sampling inputs sit in the same pinned block: copy it again (a few hundred bytes)
        self.stream.copy_to_device(self.buffers["meta"].pointer, self.meta_host.pointer,
                                   self.meta_input_bytes)
        self._launch_sampling(logits)
        self._copy_ids_to(self.meta_host, B)
        self.stream.synchronize()
        return self.meta["ids"][0][:B].copy()

    def capture_decode_graphs(self, decoder: Decoder) -> None:
        """At start-up: the decode graphs that read the mapped embedding, at the address the
        mapping will give it if it is not mapped yet (the table's own, with unified addressing;
        where the mapping gives another, launch_decode captures them again)."""
        self.decoder = decoder
        self.graphs = self._graphs_reading(self.mapped_table or self.embedding_bytes.ctypes.data)

    def _graphs_reading(self, table: int | None) -> dict[int, driver.Graph]:
        """The decode graphs, one per batch bucket, whose embedding comes from the table at
        device address `table` (None: the rows launch_decode copies in), captured on first use:
        the whole forward and sampling."""
        if table in self.graph_sets:
            return self.graph_sets[table]
        self.stream.synchronize()
        graphs, self.graph_table = {}, table
        for bucket in self.buckets:
            scratch = np.full(bucket, self.slots, np.int32)  # padding rows write the scratch slot
            batch = Batch.of(np.zeros(bucket), np.zeros(bucket), scratch, np.arange(bucket))
            self.capturing = True
            try:
                self.stream.begin_capture()
                try:
                    self.prepare(batch)
                    logits = self.decoder.forward_prepared(batch)
                    self._launch_sampling(logits)
                finally:
                    graph = self.stream.end_capture()
            finally:
                self.capturing = False
            graphs[bucket] = graph
        self.graph_sets[table] = graphs
        return graphs

    def replay_decode(self, tokens, positions, slots, params, steps) -> np.ndarray:
        self.launch_decode(tokens, positions, slots, params, steps)
        return self.collect_decode()

    def launch_decode(self, tokens, positions, slots, params, steps) -> None:
        """Stage a decode step and replay its bucket's graph, without waiting for it:
        collect_decode() returns the ids, oldest step first. Once the embedding is mapped
        (`launches_ahead`) a token may be FED (the id its row chose in the step launched
        before, which need not be collected yet) and two steps may be in flight; before, the
        host gathers the step's rows, one step at a time."""
        mapped = self.embedding_mapped.is_set()
        if len(self.in_flight) >= self.max_in_flight:
            raise RuntimeError(f"{len(self.in_flight)} decode step(s) in flight: "
                               "collect_decode() first")
        B = len(tokens)
        bucket = next(b for b in self.buckets if b >= B)
        ids = np.asarray(tokens, np.int64)
        if ids.min() < (FED if mapped else 0) or ids.max() >= self.config.vocab_size:
            raise IndexError(f"token ids must be in 0..{self.config.vocab_size - 1}"
                             + (" (or FED)" if mapped else " (FED once the embedding is mapped)"))
        table = self.mapped_table if mapped else None
        self.graphs = self._graphs_reading(table)
        block = self.launched_steps % 2
        views, host = self.step_meta[block], self.step_hosts[block]
        views["tokens"][0][:B] = ids
        views["tokens"][0][B:bucket] = 0
        views["positions"][0][:B] = positions
        views["positions"][0][B:bucket] = 0
        views["slots"][0][:B] = slots
        views["slots"][0][B:bucket] = self.slots
        pad = bucket - B
        self._stage_sampling(views, list(params) + [SamplingParams()] * pad,
                             list(steps) + [0] * pad)
        self.stream.copy_to_device(self.buffers["meta"].pointer, host.pointer,
                                   self.meta_input_bytes)
        if table is None:
            self.staging_copied.synchronize()  # an eager forward's copy out of it has run
            self._stage_embeddings(ids, bucket)
            self._copy_embeddings(bucket)
        self.graphs[bucket].launch(self.stream)
        self._copy_ids_to(host, B)
        self.step_done[block].record(self.stream)
        self.in_flight.append((block, B))
        self.launched_steps += 1

    def collect_decode(self) -> np.ndarray:
        """The ids chosen by the oldest step launch_decode started (waits for it)."""
        if not self.in_flight:
            raise RuntimeError("no decode step was launched")
        block, rows = self.in_flight.popleft()
        self.step_done[block].synchronize()
        return self.step_meta[block]["ids"][0][:rows].copy()
