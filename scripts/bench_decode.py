"""Decode and prefill speed of a `.zse` on one GPU, against the memory roofline and against
transformers fp16 on the same weights: batch-1 greedy and sampled decode at two contexts, the
decode step on the GPU alone, prefill, aggregate tokens/s over concurrent `zse-run` streams, and
INT4 GEMV bandwidth at every 7B matrix shape next to a device-to-device copy of the same run.

    python scripts/bench_decode.py --out DIR                    # random 7B .zse (~30 s to write)
    python scripts/bench_decode.py --out DIR --baseline         # + checkpoint, conversion, HF fp16
    python scripts/bench_decode.py --out DIR --zse Q7.zse --checkpoint Q7_FP16_DIR --parts baseline
    python scripts/bench_decode.py --out DIR --device cpu --preset llama-tiny --contexts 16,64 \
        --decode-tokens 4 --prefill 16,32 --streams 1,2 --server-tokens 4 --runs 1

Model choice: writing the 15.2 GB fp16 checkpoint and converting it takes minutes (on the 2-core
box a 7B-shaped checkpoint with 1 layer converts in 25 s and each further layer adds ~6.6 s:
~200 s for 28, plus ~60 s to write it), too much to share one 10-minute device call with the
measurements. So by default the model is a Qwen2.5-7B-shaped .zse with random INT4
codes written directly by make_synthetic_zse.write_random_zse (with a 152k-id BPE trained on
Python sources, or --tokenizer's), and no baseline runs. --baseline
writes a random fp16 checkpoint with make_synthetic_checkpoint, converts it with
zse_convert.convert() (time recorded), measures ZSE on that conversion and transformers on the
checkpoint. Both are kept in --work and reused, so a first call can build them (`--parts
prepare`) and a second measure.

Parts (--parts, comma-separated; default all):
  engine    in-process Engine.open(slots=1, --max-model-len), then (on a GPU) the wait for
            the embedding mapping, so that decode steps launch ahead: batch-1 decode, greedy and
            sampled (temperature 0.7, top-p 0.9), at each --contexts: prefill, then
            --decode-tokens timed (decode only, tokens/s by the wall clock); the decode graph's
            replay timed with events (GPU time of one step); prefill tokens/s of each --prefill
            prompt (first token included); the roofline fraction = (bytes a step reads, from the
            manifest: every tensor but the embedding) / copy bandwidth / step time.
  gemv      gpu_check.copy_bandwidth and gpu_check.gemv (INT4 GEMV at the 7B shapes, T = 1..32).
  batched   in-process Engine.open(slots=max(--streams)): for each --streams N, N distinct
            128-token prompts prefilled one by one (eager, timed), then --decode-tokens steps of
            all N through Engine.begin_step/end_step, launched ahead (FED tokens) once the
            engine does: decode tokens/s, wall ms per step, the bucket graph's GPU ms per step,
            and the difference (host time per step the GPU waited for).
  server    `zse-run --max-num-seqs max(--streams)`: N concurrent greedy streams of
            --server-tokens after distinct 128-token prompts, read by one asyncio client
            (benchlib.stream_completions); aggregate tokens/s = generated tokens (the usage the
            server reports) / wall time from sending to the last stream's end, so each
            stream's prefill is inside it (as in gpu_server_check.throughput).
  baseline  transformers fp16 in a fresh process (benchlib.py hf-baseline): greedy batch-1
            decode tokens/s at each --contexts (manual loop with the KV cache, one sync per
            token), GPU memory in use (cuMemGetInfo, context included) and torch's peak.
  prepare   build (or find) the models and stop.
On the CPU the GPU-only measurements say "skipped: no GPU". Writes bench_decode.json,
decode_concurrency.png to --out and prints a table last.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]
import benchlib  # noqa: E402  (a sibling script, not a package)
from benchlib import GIB, SKIPPED_NO_GPU, csv_ints, median  # noqa: E402

PARTS = ("engine", "batched", "gemv", "server", "baseline", "prepare")
SAMPLED = {"temperature": 0.7, "top_p": 0.9, "seed": 1}
SERVER_PROMPT_TOKENS = 128


def prompt(vocab: int, tokens: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, tokens).tolist()


def graph_step_ms(engine, bucket: int = 1, replays: int = 20) -> float:
    """GPU time of one decode step of `bucket` sequences: the captured graph replayed with the
    metadata of the last real step (as gpu_check.speed_7b does), timed with events."""
    from zse_runtime.gpu import driver

    ops = engine.ops
    graph = ops.graphs[bucket]
    graph.launch(ops.stream)
    start, end = driver.Event(), driver.Event()
    start.record(ops.stream)
    for _ in range(replays):
        graph.launch(ops.stream)
    end.record(ops.stream)
    end.synchronize()
    return end.elapsed_ms(start) / replays


def engine_part(zse: Path, args: argparse.Namespace, copy_gbps) -> dict[str, Any]:
    from zse_runtime.engine import Engine
    from zse_runtime.sampling import SamplingParams

    started = time.perf_counter()
    engine = Engine.open(zse, device=args.device, max_model_len=args.max_model_len, slots=1)
    section: dict[str, Any] = {"open_s": time.perf_counter() - started,
                               "startup_s": dict(engine.startup.stages), "device": engine.device}
    # the steady state: decode steps run ahead once the embedding is mapped (in the background)
    section["launches_ahead"] = engine.wait_for_launches_ahead(60)
    section["embedding_mapping"] = getattr(engine.ops, "embedding_mapping", None)
    vocab = engine.config.vocab_size
    cuda = args.device == "cuda"
    list(engine.generate(prompt(vocab, 8), 4, ignore_eos=True))  # first launches, out of the timing
    decode = []
    for context in args.contexts:
        for label, params in (("greedy", SamplingParams()), ("sampled", SamplingParams(**SAMPLED))):
            runs, counted = [], []
            for run in range(args.runs):
                tokens = engine.generate(prompt(vocab, context, run), args.decode_tokens + 1,
                                         params, ignore_eos=True)
                next(tokens)  # prefill and the first token: not decode
                started = time.perf_counter()
                count = sum(1 for _ in tokens)
                runs.append(count / (time.perf_counter() - started))
                counted.append(count)
            entry = {"context": context, "sampling": label, "decode_tokens": counted,
                     "tok_s": median(runs), "tok_s_runs": runs}
            # the graph replays the last step: position context + decode_tokens
            entry["gpu_step_ms"] = graph_step_ms(engine) if cuda else SKIPPED_NO_GPU
            decode.append(entry)
            print(f"decode {label} at context {context}: {entry['tok_s']:.1f} tok/s", flush=True)
    section["decode"] = decode
    prefill = []
    for tokens in args.prefill:
        ids = prompt(vocab, tokens, 7)
        list(engine.generate(ids, 1, ignore_eos=True))  # warm-up
        runs = []
        for _ in range(args.runs):
            started = time.perf_counter()
            list(engine.generate(ids, 1, ignore_eos=True))
            runs.append(tokens / (time.perf_counter() - started))
        prefill.append({"prompt_tokens": tokens, "tok_s": median(runs), "tok_s_runs": runs})
        print(f"prefill {tokens}: {prefill[-1]['tok_s']:.0f} tok/s", flush=True)
    section["prefill"] = prefill
    step = benchlib.bytes_per_decode_step(zse)
    section["bytes_per_step"] = step
    if cuda and copy_gbps:
        floor_ms = step["bytes_read"] / (copy_gbps * 1e9) * 1e3
        section["roofline"] = {
            "copy_gbps": copy_gbps, "floor_ms": floor_ms,
            "basis": "bytes_read / device-to-device copy GB/s (read + write counted, as "
                     "gpu_check.copy_bandwidth reports it)",
            "by_context": [{"context": d["context"], "sampling": d["sampling"],
                            "fraction_of_gpu_step": floor_ms / d["gpu_step_ms"],
                            "fraction_of_wall_clock": floor_ms * d["tok_s"] / 1e3}
                           for d in decode]}
    else:
        section["roofline"] = SKIPPED_NO_GPU if not cuda else "copy bandwidth failed (see gemv)"
    del engine
    gc.collect()
    return section


def batched_part(zse: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Decode steps over N sequences at once, in process (no HTTP): what the GPU and the
    engine's host side give before the server's share. Each level prefills N distinct 128-token
    prompts (one eager forward each, timed), then times --decode-tokens steps of all N, each
    begun before the previous one ends where the engine launches steps ahead (as the scheduler
    does for a steady batch), else one at a time."""
    import gpu_check

    from zse_runtime.engine import Engine
    from zse_runtime.model import Batch
    from zse_runtime.sampling import SamplingParams

    engine = Engine.open(zse, device=args.device, max_model_len=args.max_model_len,
                         slots=max(args.streams))
    engine.wait_for_launches_ahead(60)  # the steady state
    cuda = args.device == "cuda"
    vocab = engine.config.vocab_size
    levels = []
    for streams in args.streams:
        slots = [engine.acquire_slot() for _ in range(streams)]
        try:
            prefill_s, tokens = [], []
            for i, slot in enumerate(slots):
                ids = prompt(vocab, SERVER_PROMPT_TOKENS, 100 + i)
                started = time.perf_counter()
                logits = engine.forward(Batch.of(ids, np.arange(len(ids)), np.full(len(ids), slot),
                                                 [len(ids) - 1]))
                tokens.append(int(engine.sample(logits, [SamplingParams()], [0])[0]))
                prefill_s.append(time.perf_counter() - started)
            params = [SamplingParams()] * streams
            # as the scheduler decodes a steady batch: each step begun before the previous one
            # ends, its tokens FED on the device, where the engine runs steps ahead
            ahead = engine.launches_ahead
            started = time.perf_counter()
            gpu_check.decode_steps(engine, tokens,
                                   lambda k: [SERVER_PROMPT_TOKENS + k] * streams, slots, params,
                                   args.decode_tokens, ahead)
            seconds = time.perf_counter() - started
        finally:
            for slot in slots:
                engine.release_slot(slot)
        step_ms = seconds / args.decode_tokens * 1e3
        level = {"streams": streams, "decode_tok_s": streams * args.decode_tokens / seconds,
                 "step_ms": step_ms, "prefill_128_ms": median(prefill_s) * 1e3,
                 "launches_ahead": ahead}
        if cuda:
            bucket = next(b for b in engine.ops.buckets if b >= streams)
            level["bucket"] = bucket
            level["gpu_step_ms"] = graph_step_ms(engine, bucket)
            level["host_ms_per_step"] = step_ms - level["gpu_step_ms"]
        levels.append(level)
        print(f"engine {streams} sequences: {level['decode_tok_s']:.0f} tok/s, "
              f"{step_ms:.2f} ms/step, prefill {level['prefill_128_ms']:.1f} ms", flush=True)
    del engine
    gc.collect()
    return {"prompt_tokens": SERVER_PROMPT_TOKENS, "decode_tokens": args.decode_tokens,
            "levels": levels}


def gemv_part(gpu, run_gemv: bool) -> dict[str, Any]:
    import gpu_check

    copy_gbps = gpu_check.copy_bandwidth(gpu)
    section: dict[str, Any] = {"copy_gbps": copy_gbps}
    if not run_gemv:
        return section
    gpu_check.gemv(gpu, copy_gbps, np.random.default_rng(0))
    records = [r for r in gpu_check.RESULTS if "shape" in r and r.get("tokens")]
    failures = [r for r in gpu_check.RESULTS if not r["ok"]]
    by_shape = {}
    for shape in dict.fromkeys(r["shape"] for r in records):
        solo = [r for r in records if r["shape"] == shape and r["tokens"] == 1]
        best = max(solo, key=lambda r: r["gbps"]) if solo else None
        by_shape[shape] = {"batch1_best": best, "batch1_all": solo}
    section.update(shapes=gpu_check.SHAPES_7B, batch1_by_shape=by_shape, records=records,
                   failures=failures)
    return section


def server_part(zse: Path, args: argparse.Namespace) -> dict[str, Any]:
    slots = max(args.streams)
    server = benchlib.launch_server(zse, benchlib.free_port(), "--max-num-seqs", str(slots),
                                    "--max-model-len", str(args.max_model_len),
                                    device=args.device, log_dir=args.work)
    try:
        # a first stream through the whole stack, out of the timing
        benchlib.stream_completions(server.url, [prompt(1000, SERVER_PROMPT_TOKENS)], 4)
        levels = []
        for streams in args.streams:
            prompts = [prompt(1000, SERVER_PROMPT_TOKENS, 100 + i) for i in range(streams)]
            runs = []
            for _ in range(args.runs):
                started = time.perf_counter()
                counts = benchlib.stream_completions(server.url, prompts, args.server_tokens)
                runs.append(sum(counts) / (time.perf_counter() - started))
            levels.append({"streams": streams, "tokens_per_stream": args.server_tokens,
                           "aggregate_tok_s": median(runs), "aggregate_tok_s_runs": runs})
            print(f"{streams} streams: {levels[-1]['aggregate_tok_s']:.1f} tok/s aggregate",
                  flush=True)
    finally:
        server.stop()
    return {"max_num_seqs": slots, "prompt_tokens": SERVER_PROMPT_TOKENS,
            "spawn_to_health_200_s": server.ready_s, "levels": levels}


def baseline_part(checkpoint: Path, args: argparse.Namespace, gpu) -> dict[str, Any]:
    free_before = gpu.context.memory_info()[0] if gpu else None
    report = benchlib.run_hf_baseline(checkpoint, args.device, args.decode_tokens, args.contexts,
                                      args.runs)
    decode = []
    for context in args.contexts:
        runs = [d["tok_s"] for d in report["decode"] if d["context"] == context]
        decode.append({"context": context, "sampling": "greedy", "tok_s": median(runs),
                       "tok_s_runs": runs})
    section = {"checkpoint": str(checkpoint), "dtype": "float16", "load_path": report["load_path"],
               "versions": {"torch": report["torch"], "transformers": report["transformers"]},
               "parameters": report["parameters"], "decode": decode,
               "spawn_to_first_token_s": report["spawn_to_first_token_s"]}
    if gpu:
        section["gpu_in_use_gib"] = (free_before - report["free_at_end"]) / GIB
        section["torch_max_allocated_gib"] = report["max_allocated"] / GIB
        section["torch_max_reserved_gib"] = report["max_reserved"] / GIB
    else:
        section["gpu_in_use_gib"] = section["torch_max_allocated_gib"] = SKIPPED_NO_GPU
    for entry in decode:
        print(f"transformers fp16 greedy at context {entry['context']}: {entry['tok_s']:.1f} tok/s",
              flush=True)
    return section


def table(result: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    models = result["models"]
    if "conversion" in models and "convert_s" in models["conversion"]:
        rows.append(("conversion (zse_convert.convert)", f"{models['conversion']['convert_s']:.1f} s"))
    for key in ("transformers", "gemv", "engine", "batched", "server"):
        if str(result.get(key, "")).startswith("failed"):
            rows.append((key, result[key].strip().splitlines()[-1][:150]))
    engine = result.get("engine")
    if isinstance(engine, dict):
        rows.append(("Engine.open", f"{engine['open_s']:.2f} s"))
        for d in engine["decode"]:
            step = d["gpu_step_ms"]
            step = f"{step:.2f} ms/step on the GPU" if isinstance(step, float) else step
            rows.append((f"decode {d['sampling']} ctx {d['context']}", f"{d['tok_s']:.1f} tok/s; {step}"))
        for p in engine["prefill"]:
            rows.append((f"prefill {p['prompt_tokens']} tokens", f"{p['tok_s']:.0f} tok/s"))
        roof = engine["roofline"]
        read = engine["bytes_per_step"]["bytes_read"] / 1e9
        rows.append(("bytes read per decode step", f"{read:.3f} GB (manifest, embedding excluded)"
                     + (f"; floor {roof['floor_ms']:.2f} ms at the copy rate"
                        if isinstance(roof, dict) else "")))
        if isinstance(roof, dict):
            for r in roof["by_context"]:
                rows.append((f"roofline fraction {r['sampling']} ctx {r['context']}",
                             (f"{r['fraction_of_gpu_step']:.1%} of GPU step, "
                              f"{r['fraction_of_wall_clock']:.1%} of wall clock")))
        else:
            rows.append(("roofline fraction", roof))
    gemv = result.get("gemv")
    if isinstance(gemv, dict):
        rows.append(("device-to-device copy", f"{gemv['copy_gbps']:.0f} GB/s (read + write)"
                     if gemv["copy_gbps"] else "failed"))
        if gemv.get("failures"):
            rows.append(("INT4 GEMV checks failed", ", ".join(f["check"][:40] for f in gemv["failures"])))
        for shape, entry in gemv.get("batch1_by_shape", {}).items():
            best = entry["batch1_best"]
            if best is None:
                continue
            rows.append((f"INT4 GEMV {shape} T=1 (best kernel)",
                         (f"{best['gbps']:.0f} GB/s = {best['fraction_of_copy']:.0%} of copy "
                          f"({best['kernel']})")))
    elif gemv == SKIPPED_NO_GPU:
        rows.append(("INT4 GEMV", gemv))
    batched = result.get("batched")
    if isinstance(batched, dict):
        for level in batched["levels"]:
            gpu_ms = level.get("gpu_step_ms")
            rows.append((f"Engine.step {level['streams']} sequences",
                         f"{level['decode_tok_s']:.0f} tok/s; {level['step_ms']:.2f} ms/step"
                         + (f" ({gpu_ms:.2f} on the GPU, bucket {level['bucket']})" if gpu_ms else "")
                         + f"; 128-token prefill {level['prefill_128_ms']:.1f} ms"))
    server = result.get("server")
    if isinstance(server, dict):
        for level in server["levels"]:
            rows.append((f"zse-run {level['streams']} streams", f"{level['aggregate_tok_s']:.1f} tok/s aggregate"))
    baseline = result.get("transformers")
    if isinstance(baseline, dict):
        for d in baseline["decode"]:
            rows.append((f"transformers fp16 greedy ctx {d['context']}", f"{d['tok_s']:.1f} tok/s"))
        rows.append(("transformers spawn -> first token", f"{baseline['spawn_to_first_token_s']:.2f} s"))
        memory = baseline["gpu_in_use_gib"]
        rows.append(("transformers GPU memory in use",
                     f"{memory:.2f} GiB (torch peak allocated "
                     f"{baseline['torch_max_allocated_gib']:.2f} GiB)"
                     if isinstance(memory, float) else memory))
    elif baseline and not baseline.startswith("failed"):
        rows.append(("transformers", baseline))
    return rows


def plot(result: dict[str, Any], args: argparse.Namespace) -> str:
    server, engine, baseline = result.get("server"), result.get("engine"), result.get("transformers")
    if not isinstance(server, dict):
        return "not drawn: the server part did not run"
    ours = {level["streams"]: level["aggregate_tok_s"] for level in server["levels"]}
    points = {}
    first_context = args.contexts[0]
    if isinstance(engine, dict):
        solo = next(d for d in engine["decode"] if d["sampling"] == "greedy")
        points[f"zse Engine batch-1 greedy, ctx {first_context}"] = (1, solo["tok_s"])
    if isinstance(baseline, dict):
        points[f"transformers fp16 batch-1 greedy, ctx {first_context}"] = (
            1, baseline["decode"][0]["tok_s"])
    name = f"{args.preset}{f' ({args.layers} layers)' if args.layers else ''}"
    return benchlib.try_plot(lambda: benchlib.plot_concurrency(
        ours, points, args.out / "decode_concurrency.png",
        f"decode tokens/s, {name} on {args.device}; {args.server_tokens} tokens per stream "
        f"after {SERVER_PROMPT_TOKENS}-token prompts"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    benchlib.add_model_arguments(parser, "/tmp/zse_bench")
    parser.add_argument("--parts", default="engine,batched,gemv,server,baseline",
                        type=lambda text: [p for p in text.split(",") if p],
                        help=f"comma-separated, from {', '.join(PARTS)}")
    parser.add_argument("--contexts", type=csv_ints, default=[128, 2048],
                        help="prompt tokens before the timed batch-1 decode")
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--prefill", type=csv_ints, default=[512, 2048])
    parser.add_argument("--streams", type=csv_ints, default=[1, 4, 16, 32],
                        help="concurrency levels through zse-run (at most 32)")
    parser.add_argument("--server-tokens", type=int, default=128)
    parser.add_argument("--max-model-len", type=int, default=4096)
    args = parser.parse_args()
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown --parts {sorted(unknown)}; choose from {PARTS}")
    if args.runs < 1 or args.decode_tokens < 1 or args.server_tokens < 1:
        parser.error("--runs, --decode-tokens and --server-tokens must be at least 1")
    longest = max(args.contexts) + args.decode_tokens + 1
    if longest > args.max_model_len or max(args.prefill) >= args.max_model_len:
        parser.error(f"--contexts + --decode-tokens ({longest}) and --prefill must fit in "
                     f"--max-model-len {args.max_model_len}")
    if max(args.streams) > 32:
        parser.error("zse-run serves at most 32 sequences (--max-num-seqs)")
    benchlib.require_gpu(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    models = benchlib.prepare_models(args)
    result: dict[str, Any] = {
        "benchmark": "bench_decode", **benchlib.environment(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "zse": str(models.zse), "zse_bytes": models.zse.stat().st_size,
        "models": models.provenance}
    if args.parts == ["prepare"]:
        path = benchlib.write_json(args.out, "bench_decode.json", result)
        print(f"models ready: {models.zse}, {models.checkpoint}; JSON {path}")
        return 0
    gpu = None
    if args.device == "cuda":
        import gpu_check

        gpu = gpu_check.Gpu()
    save = lambda: benchlib.write_json(args.out, "bench_decode.json", result)  # noqa: E731
    ok = True
    if "baseline" in args.parts:  # first: its process needs the GPU memory ours will hold
        if models.checkpoint is None:
            result["transformers"] = "not run: pass --baseline or --checkpoint"
        else:
            ok &= benchlib.guarded(result, "transformers",
                                   lambda: baseline_part(models.checkpoint, args, gpu))
        save()
    copy_gbps = None
    if gpu and {"gemv", "engine"} & set(args.parts):
        ok &= benchlib.guarded(result, "gemv", lambda: gemv_part(gpu, "gemv" in args.parts))
        if isinstance(result["gemv"], dict):
            copy_gbps = result["gemv"]["copy_gbps"]
        save()
    elif "gemv" in args.parts:
        result["gemv"] = SKIPPED_NO_GPU
    if "engine" in args.parts:
        ok &= benchlib.guarded(result, "engine", lambda: engine_part(models.zse, args, copy_gbps))
        save()
    if "batched" in args.parts:
        ok &= benchlib.guarded(result, "batched", lambda: batched_part(models.zse, args))
        save()
    if "server" in args.parts:
        ok &= benchlib.guarded(result, "server", lambda: server_part(models.zse, args))
        save()
    result["plots"] = {"concurrency": plot(result, args)}
    path = save()
    benchlib.print_table(f"median of {args.runs} run(s); JSON {path}, plot "
                         f"{result['plots']['concurrency']}", table(result))
    if not ok:
        print("some parts failed: see the JSON", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
