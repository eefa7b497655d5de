"""The GPU backend's launches, recorded without a GPU: every argument list matches the kernel's
compiled signature (count, array dtypes and ranks, scalar types), the integer and split
activations it hands the GEMV and the tensor-core GEMM have the shapes those kernels index, and
1-D grids cover the items a kernel expects. A mistake here would otherwise first show on a
device, as a crash or as wrong numbers."""

from __future__ import annotations

import dataclasses
import math
import re
import sys
import threading
from collections import deque
from types import SimpleNamespace

import numpy as np
import pytest

from tests.conftest import REPO
from zse_runtime.config import ModelConfig
from zse_runtime.engine import FED
from zse_runtime.gpu.backend import GpuOps, Int4Device, gemv_token_tile, int4_gemm_plan
from zse_runtime.gpu.kernels import DeviceArray
from zse_runtime.kernels import build
from zse_runtime.kernels import geometry as geo
from zse_runtime.model import Batch, Decoder
from zse_runtime.sampling import SamplingParams
from zse_runtime.zsefile import EMBED, LM_HEAD, ZseFile, device_window_start

sys.path.insert(0, str(REPO / "scripts"))
from make_synthetic_zse import write_random_zse  # noqa: E402

TINY = dict(architecture="qwen2", vocab_size=512, hidden_size=256, intermediate_size=640,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
            rms_norm_eps=1e-6, rope_theta=1e6, rope_scaling=None, max_position_embeddings=4096,
            tie_word_embeddings=False, qkv_bias=True, o_bias=False, sliding_window=None,
            source_dtype="synthetic")


def _signature(name):
    """[(dtype, ndim) for arrays, dtype for scalars] of a kernel's numba signature."""
    text = build.kernel_table()[name][1]
    inner = text[text.index("(") + 1:text.rindex(")")]
    parts = re.findall(r"\w+(?:\[[^\]]*\])?", inner)
    return [(np.dtype(p.split("[")[0]), p.count(",") + 1) if "[" in p else np.dtype(p)
            for p in parts]


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, name, grid, block, *args):
        expected = _signature(name)
        assert len(args) == len(expected), (name, len(args), len(expected))
        for position, (arg, want) in enumerate(zip(args, expected)):
            if isinstance(want, tuple):
                assert isinstance(arg, DeviceArray), (name, position, arg)
                assert (arg.dtype, len(arg.shape)) == want, (name, position, arg, want)
                assert all(extent > 0 for extent in arg.shape), (name, position, arg)
            else:
                assert np.asarray(arg).dtype == want, (name, position, arg, want)
        grid = (grid, 1, 1) if isinstance(grid, int) else (*grid, *(1,) * (3 - len(grid)))
        assert all(g >= 1 for g in grid) and block % 32 == 0, (name, grid, block)
        # the kernels are compiled without launch bounds (geometry.MAX_THREADS)
        assert block <= geo.MAX_THREADS, (name, block)
        self.calls.append((name, grid, block, args))

    def named(self, name):
        return [call for call in self.calls if call[0] == name]


@pytest.fixture(scope="module")
def ops(tmp_path_factory):
    path = write_random_zse(tmp_path_factory.mktemp("tiny") / "tiny.zse", dict(TINY), 64)
    zse = ZseFile(path)
    ops = object.__new__(GpuOps)
    ops.zse_path = path
    ops.config, ops.slots, ops.max_len = ModelConfig.from_manifest(zse.model_config), 4, 256
    ops.window, ops.max_batch, ops.max_tokens, ops.capturing = 0, 4, 512, False
    ops.batch_invariant, ops.multiprocessors = False, 132
    ops.context = SimpleNamespace(memory_info=lambda: (1 << 40, 1 << 40))
    ops.window_start = device_window_start(zse)
    ops._plan_memory(zse)
    pointer, ops.buffers = 1 << 32, {}
    for name, shape, dtype in ops.arena.sizes:  # disjoint fake addresses, 256-byte aligned
        ops.buffers[name] = DeviceArray(pointer, shape, dtype)
        pointer += ops.arena.nbytes_of(shape, dtype)
    ops.weights_pointer = 1 << 36
    ops.weights = {name: ops._tensor(zse, name) for name, info in zse.tensors.items()
                   if info.offset >= ops.window_start}
    ops._host_embedding(zse.weight(EMBED))
    ops.embedding_bytes = zse.raw(EMBED)
    ops.mapped_table = ops.graph_table = 1 << 44  # where the device reads the host table
    ops.embedding_mapped = threading.Event()
    ops.embedding_mapped.set()
    ops.embed_host = SimpleNamespace(array=np.zeros(sum(ops.embed_staging_bytes), np.uint8))
    ops.embed_staging = ops._embed_staging_views()
    ops._no_bias = ops.buffers["no_bias"]
    pinned = lambda pointer: SimpleNamespace(array=np.zeros(ops.meta_bytes, np.uint8),
                                             pointer=pointer)
    ops.meta_host = pinned(1 << 40)
    ops.meta = ops._meta_views(ops.meta_host)
    ops.step_hosts = [pinned(2 << 40), pinned(3 << 40)]
    ops.step_meta = [ops._meta_views(host) for host in ops.step_hosts]
    ops.step_done = [SimpleNamespace(record=lambda stream: None, synchronize=lambda: None)] * 2
    ops.staging_copied = ops.step_done[0]
    ops.in_flight, ops.launched_steps, ops.graphs, ops.graph_sets = deque(), 0, {}, {}
    ops.copies = []
    ops.stream = SimpleNamespace(copy_to_device=lambda *a: ops.copies.append(a),
                                 copy_to_host=lambda *a: ops.copies.append(a),
                                 synchronize=lambda: None, begin_capture=lambda: None,
                                 end_capture=lambda: SimpleNamespace(launch=lambda stream: None))
    return ops


@pytest.mark.parametrize("tokens", [1, 3, 40, 512])
def test_a_forward_pass_launches_what_the_kernels_expect(ops, tokens):
    """Decode-sized batches go through the integer-activation GEMVs, larger ones through the
    tensor-core GEMM; either way each launch matches its kernel."""
    ops._launch = recorder = Recorder()
    batch = Batch.of(np.arange(tokens) % 512, np.arange(tokens), np.zeros(tokens, np.int32),
                     [tokens - 1])
    Decoder(ops.config, ops).forward(batch)
    c = ops.config
    linears = 4 * c.num_hidden_layers  # qkv, o_proj, gate_up, down_proj (the lm_head is fp16)
    # producer -> (position of its output, of its quantize flag) in the argument list
    producers = {"add_rmsnorm": (7, 8), "attention_decode": (13, 14),
                 "attention_decode_grouped": (13, 14), "attention_combine": (6, 7),
                 "silu_mul": (1, 2)}
    if tokens <= geo.GEMV_MAX_TOKENS:
        assert not recorder.named("quantize_activations")  # every GEMV input comes quantized
        gemvs = 0
        for index, (name, grid, block, args) in enumerate(recorder.calls):
            if not name.startswith("int4_gemv_t"):
                continue
            gemvs += 1
            # the launch just before wrote this GEMV's digits, of its own output
            producer, _, _, made = recorder.calls[index - 1]
            out_at, flag_at = producers[producer]
            x, digits = made[out_at], made[flag_at + 1:flag_at + 4]
            assert int(made[flag_at]) == 1 and tuple(args[:3]) == tuple(digits), (producer, name)
            t, k = x.shape
            assert [d.shape for d in digits] == [(t, k // 2), (t, k // 32), (t, k // 32)]
            xq, qweight, scales, out = args[0], args[3], args[4], args[-1]
            assert xq.shape == (tokens, qweight.shape[1] * 4) and out.shape[0] == tokens
            # the group argument is the reciprocal the kernel's mul.hi takes, not the group size
            group = qweight.shape[1] * 8 // scales.shape[1]
            assert isinstance(args[6], np.uint32)
            assert int(args[6]) == geo.gemv_group_reciprocal(group), (name, group)
        assert gemvs == linears
    else:
        splits = recorder.named("split_activations")
        assert len(splits) == linears
        for name, grid, block, (x, group, halves, xsum, unscale) in splits:
            t, k = x.shape
            assert halves.shape == (t, k // 2)
            assert xsum.shape == unscale.shape == (t, k // int(group))
            assert grid[0] * block >= 32 * t * k // int(group)  # a warp per (token, group)
        gemms = recorder.named("int4_gemm")
        for index, (name, grid, block, args) in enumerate(recorder.calls):
            if not name.startswith("int4_gemm"):
                continue
            halves, qweight, group, out = args[0], args[3], int(args[6]), args[-1]
            rows, splits = qweight.shape[0], grid[2]
            assert halves.shape == (tokens, qweight.shape[1] * 4)
            assert args[1].shape == (tokens, qweight.shape[1] * 8 // group)
            assert (name, grid) == int4_gemm_plan(rows, tokens, qweight.shape[1] * 8 // group, 132)
            assert grid[:2] == (math.ceil(rows / geo.GEMM_TILE_N), math.ceil(tokens / geo.GEMM_TILE_T))
            assert block == geo.GEMM_THREADS and out.shape == (splits * tokens, rows)
            if splits > 1:  # the runs over K go to the workspace, then are added into the output
                assert out.pointer == ops.buffers["gemm_partials"].pointer
                assert out.nbytes <= ops.buffers["gemm_partials"].nbytes
                name, grid, block, (partials, count, summed) = recorder.calls[index + 1]
                assert name == "sum_splits" and partials == out and int(count) == splits
                assert summed.shape == (tokens, rows) and summed.pointer != out.pointer
                assert grid[:2] == (tokens, math.ceil(rows / block))
        assert any(grid[2] > 1 for _, grid, _, _ in gemms)  # the toy's grids are small
        assert len(gemms) == linears
        for name, (out_at, flag_at) in producers.items():
            assert all(int(args[flag_at]) == 0 for _, _, _, args in recorder.named(name))
    # a thread per value over 2-D grids; the embedding rows come from the host-gathered staging
    (_, grid, block, (ids, previous, rows, out)), = recorder.named("embed_fp16")
    assert grid[:2] == (tokens, math.ceil(c.hidden_size / block))
    assert rows.pointer == ops.buffers["embed_part0"].pointer and rows.shape == (tokens, c.hidden_size)
    assert ids.pointer == ops.buffers["row_ids"].pointer and ids.shape == (tokens,)
    assert previous == ops.meta["ids"][1]
    table = ZseFile(ops.zse_path).weight(EMBED)
    np.testing.assert_array_equal(ops.embed_staging[0][:tokens], table[batch.tokens])
    assert (rows.pointer, ops.embed_staging[0].ctypes.data, rows.nbytes) in ops.copies
    for _, grid, block, args in recorder.named("rope_and_cache"):
        work = (c.num_attention_heads + c.num_key_value_heads) * c.head_dim // 2 + c.kv_size
        assert grid[:2] == (tokens, math.ceil(work / block))
    for _, grid, block, args in recorder.named("add_rmsnorm"):
        residual, width, residual_out = args[1], int(args[5]), args[6]
        assert residual.pointer != residual_out.pointer and width % 32 == 0
        assert grid[:2] == (tokens, math.ceil(c.hidden_size / width))
        assert width == (geo.NORM_DECODE_SLICE if tokens <= geo.GEMV_MAX_TOKENS else c.hidden_size)
    (_, grid, block, (_, rows, out)), = recorder.named("gather_rows")
    assert grid[:2] == (rows.shape[0], math.ceil(out.shape[1] / block))
    if tokens > geo.GEMV_MAX_TOKENS:  # one sequence's prompt chunk: the tensor-core kernel
        tiled = recorder.named("attention_tiled")
        assert len(tiled) == c.num_hidden_layers and not recorder.named("attention_combine")
        for name, grid, block, args in tiled:
            q, k_words, kv_heads, length, slot, out = (args[0], args[1], int(args[3]),
                                                       int(args[4]), int(args[6]), args[-1])
            assert grid[:2] == (math.ceil(tokens / geo.ATTENTION_TILE_TOKENS),
                                c.num_attention_heads) and block == geo.ATTENTION_TILED_THREADS
            assert k_words.shape == (ops.kv_slots * kv_heads * length, c.head_dim // 2)
            assert slot == 0 and q.shape == out.shape == (tokens, c.q_size)
    else:
        # decode steps merge in the partition launch; chunks the tiled kernel does not take
        # merge in a second one
        decode = tokens <= ops.max_batch
        # fewer sequences: a block per query head; more: a block per KV head and its group
        kernel, heads = (("attention_decode", c.num_attention_heads)
                         if tokens < geo.ATTENTION_GROUPED_MIN_TOKENS else
                         ("attention_decode_grouped", c.num_key_value_heads))
        partials = recorder.named(kernel if decode else "attention_partial_prefill")
        assert len(partials) == c.num_hidden_layers
        assert len(recorder.named("attention_combine")) == (0 if decode else c.num_hidden_layers)
        for name, grid, block, args in partials:
            k_words, kv_heads, length = args[1], int(args[3]), int(args[4])
            assert k_words.shape == (ops.kv_slots * kv_heads * length, c.head_dim // 2)
            if decode:  # a ticket per block row
                assert args[12].shape == (tokens * heads,) == grid[:1]


@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_decode_norms_are_deferred_to_the_kernels_after_the_gemvs(ops, tokens):
    """Through the GEMVs, every norm but the final one is deferred (kernels/rmsnorm.py): it
    writes the digits of r * gamma and the sums of squares; qkv and gate_up multiply without
    bias, and the next launch (rope_and_cache, silu_mul) reads those sums and adds qkv's bias.
    Prefill chunks normalize in add_rmsnorm and leave nothing to finish."""
    ops._launch = recorder = Recorder()
    Decoder(ops.config, ops).forward(Batch.of(np.arange(tokens), np.arange(tokens),
                                              np.zeros(tokens), [tokens - 1]))
    c, calls = ops.config, recorder.calls
    norms = [i for i, call in enumerate(calls) if call[0] == "add_rmsnorm"]
    assert len(norms) == 2 * c.num_hidden_layers + 1
    gemv = tokens <= geo.GEMV_MAX_TOKENS
    for n, at in enumerate(norms):
        args = calls[at][3]
        deferred, digits, sumsq = int(args[8]), args[9:12], args[12]
        final = n == len(norms) - 1
        assert deferred == (gemv and not final)
        if not deferred:
            continue
        assert sumsq.shape == (tokens, c.hidden_size // 32)
        layer, part = divmod(n, 2)
        assert args[2] == ops.weights[f"layers.{layer}.{('attn_norm', 'mlp_norm')[part]}"]
        name, _, _, gemv_args = calls[at + 1]  # qkv or gate_up, on those digits, no bias
        assert name.startswith("int4_gemv_t") and tuple(gemv_args[:3]) == tuple(digits)
        assert int(gemv_args[8]) == 0
        name, _, _, finisher = calls[at + 2]
        if part == 0:
            assert name == "rope_and_cache" and finisher[0].pointer == gemv_args[-1].pointer
            assert (int(finisher[9]), finisher[10]) == (1, sumsq)
            assert finisher[12] == ops.weights[f"layers.{layer}.qkv_bias"] and int(finisher[13]) == 1
        else:
            assert name == "silu_mul" and finisher[0].pointer == gemv_args[-1].pointer
            assert (int(finisher[6]), finisher[7]) == (1, sumsq)
    for name, at in (("rope_and_cache", 9), ("silu_mul", 6)):
        assert all(int(args[at]) == gemv for _, _, _, args in recorder.named(name))
    if not gemv:  # the GEMM adds qkv's bias itself
        assert all(int(args[13]) == 0 for _, _, _, args in recorder.named("rope_and_cache"))


def test_decode_attention_groups_query_heads_only_where_it_can(ops):
    """A batch of ATTENTION_GROUPED_MIN_TOKENS or more takes a block per token x KV head when
    its query heads fit one block; smaller batches, models with a KV head per query head and
    groups past ATTENTION_MAX_GROUP keep a block per token x query head."""
    plan = lambda heads, kv_heads, tokens: type(ops).decode_attention_plan(SimpleNamespace(
        config=dataclasses.replace(ops.config, num_attention_heads=heads,
                                   num_key_value_heads=kv_heads)), tokens)
    assert plan(28, 4, 32) == ("attention_decode_grouped", 128)
    assert plan(28, 4, geo.ATTENTION_GROUPED_MIN_TOKENS) == (
        "attention_decode_grouped", 4 * geo.ATTENTION_GROUPED_MIN_TOKENS)
    fewer = geo.ATTENTION_GROUPED_MIN_TOKENS - 1
    assert plan(28, 4, fewer) == ("attention_decode", 28 * fewer)
    assert plan(28, 4, 1) == ("attention_decode", 28)
    assert plan(8, 8, 32) == ("attention_decode", 256)
    group = geo.ATTENTION_MAX_GROUP + 1
    assert plan(2 * group, 2, 32) == ("attention_decode", 64 * group)


def test_grouped_decode_attention_launch(ops, monkeypatch):
    """The grouped kernel's launch (at a threshold lowered to the fixture's batch): a grid row
    and a ticket per token x KV head, the decode partition, and the o_proj GEMV's digits."""
    monkeypatch.setattr(geo, "ATTENTION_GROUPED_MIN_TOKENS", 2)
    ops._launch = recorder = Recorder()
    tokens, c = 3, ops.config
    Decoder(c, ops).forward(Batch.of(np.arange(tokens), np.arange(tokens), np.arange(tokens) % 2,
                                     np.arange(tokens)))
    launches = recorder.named("attention_decode_grouped")
    assert len(launches) == c.num_hidden_layers and not recorder.named("attention_decode")
    for _, grid, block, args in launches:
        assert grid[0] == tokens * c.num_key_value_heads and block == geo.ATTENTION_THREADS
        assert int(args[8]) == geo.ATTENTION_DECODE_PARTITION
        assert args[12].shape == (tokens * c.num_key_value_heads,)
        assert int(args[14]) == 1  # digits for the o_proj GEMV


def test_wide_decode_batches_multiply_on_tensor_cores(ops):
    """Past one GEMV token tile, every INT4 matrix goes through split_activations and int4_gemm,
    and the fp16 lm_head through fp16_gemm; up to it, through the GEMVs."""
    ops._launch = recorder = Recorder()
    tokens = geo.INT4_GEMM_MIN_TOKENS
    Decoder(ops.config, ops).forward(Batch.of(np.arange(tokens), np.arange(tokens),
                                              np.zeros(tokens), [tokens - 1]))
    layers = ops.config.num_hidden_layers
    gemms = recorder.named("int4_gemm_t32")  # decode batches: 128-row x 32-token blocks
    assert len(gemms) == len(recorder.named("split_activations")) == 4 * layers
    for _, grid, _, args in gemms:
        rows, groups = args[3].shape[0], args[4].shape[1]
        assert grid == (math.ceil(rows / geo.GEMM_DECODE_TILE_N), 1,
                        int4_gemm_plan(rows, tokens, groups, 132)[1][2])
    assert not recorder.named("int4_gemm")
    assert not [c for c in recorder.calls if c[0].startswith("int4_gemv_t")]
    for producer, (_, flag_at) in {"add_rmsnorm": (7, 8), "attention_decode_grouped": (13, 14),
                                   "attention_combine": (6, 7),
                                   "silu_mul": (1, 2)}.items():  # no digits to write
        assert all(int(args[flag_at]) == 0 for _, _, _, args in recorder.named(producer))
    recorder.calls.clear()  # one token fewer: every matrix on the GEMVs
    Decoder(ops.config, ops).forward(Batch.of(np.arange(tokens - 1), np.arange(tokens - 1),
                                              np.zeros(tokens - 1), [tokens - 2]))
    assert not [c for c in recorder.calls if c[0].startswith("int4_gemm")]
    assert len([c for c in recorder.calls if c[0].startswith("int4_gemv_t")]) == 4 * layers
    # the fp16 lm_head for as many logit rows (the fixture's workspace holds 4, so by hand)
    lm_head, hidden = ops.weights[LM_HEAD], ops.config.hidden_size
    rows = DeviceArray(0, (tokens, hidden), np.dtype(np.float32))
    logits = DeviceArray(0, (tokens, lm_head.shape[0]), np.dtype(np.float32))
    ops._matmul(rows, lm_head, logits, None)
    (_, grid, block, (x, words, out)), = recorder.named("fp16_gemm")
    assert (x, out) == (rows, logits) and words.shape == (lm_head.shape[0], hidden // 2)
    assert grid[:2] == (math.ceil(words.shape[0] / geo.GEMM_TILE_N), 1) and block == geo.GEMM_THREADS
    fewer = geo.FP16_GEMM_MIN_TOKENS - 1
    ops._matmul(rows.rows(fewer), lm_head, logits.rows(fewer), None)
    assert recorder.calls[-1][0] == f"fp16_matmul_t{gemv_token_tile(fewer)}"


def test_batch_invariant_decode_stays_on_the_gemvs(ops, monkeypatch):
    """With batch_invariant (zse-run --batch-invariant) every decode batch takes the GEMV tiles,
    whose per-token arithmetic does not depend on the batch; prefill chunks still take the GEMM."""
    monkeypatch.setattr(ops, "batch_invariant", True)
    ops._launch = recorder = Recorder()
    tokens = geo.GEMV_MAX_TOKENS
    Decoder(ops.config, ops).forward(Batch.of(np.arange(tokens), np.arange(tokens),
                                              np.zeros(tokens), [tokens - 1]))
    assert not [c for c in recorder.calls if c[0].startswith("int4_gemm")]
    assert not recorder.named("split_activations")
    lm_head, hidden = ops.weights[LM_HEAD], ops.config.hidden_size
    ops._matmul(DeviceArray(0, (tokens, hidden), np.dtype(np.float32)), lm_head,
                DeviceArray(0, (tokens, lm_head.shape[0]), np.dtype(np.float32)), None)
    assert recorder.calls[-1][0] == f"fp16_matmul_t{geo.GEMV_TOKEN_TILES[-1]}"
    tokens = geo.GEMV_MAX_TOKENS + 1
    Decoder(ops.config, ops).forward(Batch.of(np.arange(tokens), np.arange(tokens),
                                              np.zeros(tokens), [tokens - 1]))
    assert len(recorder.named("int4_gemm")) == 4 * ops.config.num_hidden_layers


def test_prefill_of_several_sequences_splits_attention_over_keys(ops):
    """attention_tiled stages one slot's keys for all of a block's tokens, so a chunk that mixes
    sequences goes through the per-token kernel pair instead."""
    ops._launch = recorder = Recorder()
    tokens = 2 * geo.GEMV_MAX_TOKENS
    slots = np.repeat([0, 1], tokens // 2).astype(np.int32)
    positions = np.tile(np.arange(tokens // 2), 2)
    Decoder(ops.config, ops).forward(Batch.of(np.arange(tokens), positions, slots, [tokens - 1]))
    layers = ops.config.num_hidden_layers
    assert not recorder.named("attention_tiled")
    assert len(recorder.named("attention_partial_prefill")) == len(
        recorder.named("attention_combine")) == layers


def test_sampling_launch_matches_its_kernel(ops):
    ops._launch = recorder = Recorder()
    ops.prepare(Batch.of([5], [0], [0], [0]))
    ops.sample(ops.buffers["logits"].rows(1), [SamplingParams(0.7, top_p=0.9, seed=1)], [0])
    blocks = geo.sampling_blocks(ops.config.vocab_size)
    assert [(name, grid[:2], block, args[-1]) for name, grid, block, args in recorder.calls] == [
        (name, (*grid, 1)[:2], geo.SAMPLING_THREADS, step)
        for name, grid, step in geo.sampling_launches(1, blocks)]
    for name, grid, block, args in recorder.calls:
        assert args[0].shape == (1, 512) and args[7].shape == args[12].shape == (1, blocks)


def test_weights_are_views_of_the_file_layout(ops):
    """Every INT4 weight's three arrays lie inside the one weight allocation, in file order."""
    for name, weight in ops.weights.items():
        if isinstance(weight, Int4Device):
            assert weight.qweight.pointer < weight.scales.pointer < weight.zeros.pointer
            assert weight.scales.shape == weight.zeros.shape
            assert weight.qweight.shape[1] * 8 // weight.group_size == weight.scales.shape[1]


def test_decode_graphs_read_the_mapped_table_by_the_device_token_ids(ops):
    """A captured decode step gathers its rows from the host table where the device sees it,
    by the step's token ids in device memory (FED ones by the ids the step before chose), and
    copies nothing itself: launch_decode copies its inputs and ids around it."""
    ops.buckets = [1, 2, 4]
    ops._launch = recorder = Recorder()
    copies = len(ops.copies)
    ops.capture_decode_graphs(Decoder(ops.config, ops))
    assert len(ops.copies) == copies and sorted(ops.graphs) == [1, 2, 4]
    assert ops.graph_sets == {ops.mapped_table: ops.graphs}
    table = ZseFile(ops.zse_path).weight(EMBED)
    for (_, grid, _, (ids, previous, rows, out)), bucket in zip(recorder.named("embed_fp16"),
                                                                ops.buckets):
        assert ids == ops.meta["tokens"][1].rows(bucket) and previous == ops.meta["ids"][1]
        assert rows == DeviceArray(ops.graph_table, table.shape, table.dtype)
        assert grid[0] == bucket and out.shape == (bucket, ops.config.hidden_size)


def test_decode_steps_stage_their_inputs_in_alternate_pinned_blocks(ops):
    """Each launch writes its block (padding rows: token 0, the scratch slot), copies it
    before its graph and its ids into it after; ids past the vocabulary are refused on the
    host, before any device read, and FED ids pass."""
    ops.buckets = [1, 2, 4]
    ops.graphs = {bucket: SimpleNamespace(launch=lambda stream: None) for bucket in ops.buckets}
    ops.copies.clear()
    ops.replay_decode(np.array([7, FED, 511]), np.array([3, 4, 5]), np.array([0, 1, 2]),
                      [SamplingParams(temperature=0.5)] * 3, [1, 2, 3])
    block = ops.step_meta[0]
    assert block["tokens"][0][:4].tolist() == [7, FED, 511, 0]
    assert block["positions"][0][:4].tolist() == [3, 4, 5, 0]
    assert block["slots"][0][:4].tolist() == [0, 1, 2, ops.slots]
    assert block["steps"][0][:4].tolist() == [1, 2, 3, 0]
    assert block["temperature"][0][:4].tolist() == [0.5, 0.5, 0.5, SamplingParams().temperature]
    ids = ops.meta["ids"][1]
    assert ops.copies == [(ops.buffers["meta"].pointer, ops.step_hosts[0].pointer,
                           ops.meta_input_bytes),
                          (ops.step_hosts[0].pointer + ids.pointer - ops.buffers["meta"].pointer,
                           ids.pointer, 3 * 4)]
    ops.replay_decode(np.array([8]), np.array([6]), np.array([0]), [SamplingParams()], [4])
    assert ops.step_meta[1]["tokens"][0][0] == 8 and ops.copies[-2][1] == ops.step_hosts[1].pointer
    for bad in (512, -2):
        with pytest.raises(IndexError):
            ops.replay_decode(np.array([bad]), np.array([0]), np.array([0]), [SamplingParams()],
                              [0])
    assert not ops.in_flight


def test_two_decode_steps_may_be_in_flight_and_are_collected_in_order(ops):
    """launch_decode returns at once; a second step may be launched before the first is
    collected (each has its own pinned block), a third may not (it would restage the first's
    block while its copies may still be queued); collect_decode returns the oldest step's ids,
    and refuses when nothing was launched."""
    ops.buckets = [1, 2, 4]
    ops.graphs = {bucket: SimpleNamespace(launch=lambda stream: None) for bucket in ops.buckets}
    ops.launch_decode(np.array([7, 9]), np.array([3, 4]), np.array([0, 1]), [SamplingParams()] * 2,
                      [0, 0])
    ops.launch_decode(np.array([FED, FED]), np.array([4, 5]), np.array([0, 1]),
                      [SamplingParams()] * 2, [1, 1])
    with pytest.raises(RuntimeError, match="in flight"):
        ops.launch_decode(np.array([7]), np.array([3]), np.array([0]), [SamplingParams()], [0])
    first, second = (ops.step_meta[(ops.launched_steps - 2 + i) % 2]["ids"][0] for i in (0, 1))
    first[:2], second[:2] = [11, 12], [13, 14]  # what each step's ids copy would bring back
    assert ops.collect_decode().tolist() == [11, 12]
    assert ops.collect_decode().tolist() == [13, 14]
    with pytest.raises(RuntimeError, match="no decode step"):
        ops.collect_decode()


def test_until_the_table_is_mapped_decode_graphs_read_rows_the_host_gathered(ops):
    """A decode step before the embedding is mapped captures (once) graphs that embed the rows
    launch_decode gathers and copies, one step at a time, and FED tokens are refused; once the
    table is mapped, steps use the graphs captured at start-up to read it by token ids."""
    ops.buckets = [1, 2, 4]
    ops._launch = recorder = Recorder()
    decoder = Decoder(ops.config, ops)
    ops.graph_sets.clear()
    ops.capture_decode_graphs(decoder)
    mapped_graphs = ops.graphs
    ops.embedding_mapped.clear()
    recorder.calls.clear()
    try:
        ops.copies.clear()
        ops.launch_decode(np.array([7, 300]), np.array([3, 4]), np.array([0, 1]),
                          [SamplingParams()] * 2, [1, 1])
        assert set(ops.graph_sets) == {ops.mapped_table, None}
        assert ops.graphs is ops.graph_sets[None]
        (_, _, _, (ids, previous, rows, out)), *_ = recorder.named("embed_fp16")
        assert ids == ops.buffers["row_ids"].rows(1) and rows == ops.buffers["embed_part0"].rows(1)
        table = ZseFile(ops.zse_path).weight(EMBED)
        np.testing.assert_array_equal(ops.embed_staging[0][:2], table[[7, 300]])
        staged = ops.buffers["embed_part0"]
        assert (staged.pointer, ops.embed_staging[0].ctypes.data, 2 * staged.shape[1] * 2) \
            in ops.copies
        with pytest.raises(RuntimeError, match="in flight"):  # one step at a time
            ops.launch_decode(np.array([8]), np.array([5]), np.array([0]), [SamplingParams()], [2])
        ops.collect_decode()
        with pytest.raises(IndexError, match="FED once the embedding is mapped"):
            ops.launch_decode(np.array([FED]), np.array([5]), np.array([0]), [SamplingParams()],
                              [2])
    finally:
        ops.embedding_mapped.set()
    captured = len(recorder.calls)
    ops.launch_decode(np.array([FED]), np.array([5]), np.array([0]), [SamplingParams()], [2])
    assert ops.graphs is mapped_graphs and len(recorder.calls) == captured  # nothing captured
    ops.collect_decode()
    ops.mapped_table = 5 << 44  # a pinned copy's address, say: not the one captured for
    try:
        ops.launch_decode(np.array([FED]), np.array([6]), np.array([0]), [SamplingParams()], [3])
        assert ops.graphs is ops.graph_sets[5 << 44] and ops.graphs is not mapped_graphs
        (_, _, _, (_, _, rows, _)), *_ = recorder.named("embed_fp16")[-3:]
        assert rows.pointer == 5 << 44
        ops.collect_decode()
    finally:
        ops.mapped_table = ops.graph_table = 1 << 44
