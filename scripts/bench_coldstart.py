"""Cold start of `zse-run` (and of transformers fp16 on the same weights): seconds from process
spawn to /health 200 and to the first streamed token of a short chat request, the runtime's own
stage breakdown, and GPU memory in use when ready, with the page cache warm and dropped.

    python scripts/bench_coldstart.py --out DIR                       # random 7B .zse, ZSE only
    python scripts/bench_coldstart.py --out DIR --baseline            # + transformers fp16
    python scripts/bench_coldstart.py --out DIR --zse Q7.zse --checkpoint Q7_FP16_DIR
    python scripts/bench_coldstart.py --out DIR --device cpu --preset llama-tiny --runs 1

Model: by default a Qwen2.5-7B-shaped .zse with random INT4 codes written directly by
make_synthetic_zse.write_random_zse (~30 s, 5.65 GB, with a chat template and a 152k-id BPE
trained on Python sources, or --tokenizer's tokenizer.json). With --baseline a
random fp16 checkpoint is written by make_synthetic_checkpoint (15.2 GB) and converted with
zse_convert.convert() (minutes; the time is recorded), and both sides run on those weights.
Everything is built in --work and reused there by later runs.

Each run is a fresh `python -m zse_runtime.cli FILE --device D --max-model-len 4096
--max-num-seqs 1` process, timed from just before Popen. One unrecorded priming run comes first
so the "warm" runs find the file, Python and its libraries in the page cache. "Cold" runs drop
the page cache first (`sync; echo 3 > /proc/sys/vm/drop_caches`, root only; otherwise the JSON
says why not). GPU memory in use is this process's cuMemGetInfo before spawning minus at /health
200 (or, for transformers, at its first token): the child's CUDA context counts. The stage
breakdown is read from /metrics (zse_startup_seconds) and placed on the timeline with the
"ready in" log lines' timestamps (millisecond, wall clock). Writes bench_coldstart.json and
coldstart_waterfall.png to --out; prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]
import benchlib  # noqa: E402  (a sibling script, not a package)
from benchlib import GIB, SKIPPED_NO_GPU, median  # noqa: E402

CHAT = {"messages": [{"role": "user", "content": "Name one colour."}], "max_tokens": 1,
        "temperature": 0, "stream": True, "ignore_eos": True, "model": "m"}


def first_chat_token(server: benchlib.ServerStart) -> tuple[float, float]:
    """(seconds from spawn, seconds from sending) to the first streamed token: the first chunk
    with text, or the finish chunk of this one-token request, which the server sends as soon as
    the token exists (a random model's token may decode to no text at all)."""
    import httpx

    sent = time.perf_counter()
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=CHAT, timeout=120) as reply:
        if reply.status_code != 200:
            raise RuntimeError(f"chat request failed: {reply.status_code} {reply.read()[:500]!r}")
        for line in reply.iter_lines():
            if not line.startswith("data: {"):
                continue
            choices = json.loads(line[6:]).get("choices") or []
            if choices and (choices[0]["delta"].get("content") or choices[0].get("finish_reason")):
                now = time.perf_counter()
                return now - server.spawned, now - sent
    raise RuntimeError("the chat stream ended without a token")


def zse_run(model: Path, args: argparse.Namespace, memory) -> dict[str, Any]:
    free_before = memory.free() if memory else None
    server = benchlib.launch_server(model, benchlib.free_port(), "--max-model-len",
                                    str(args.max_model_len), "--max-num-seqs", "1",
                                    device=args.device, log_dir=args.work)
    try:
        in_use = (free_before - memory.free()) / GIB if memory else SKIPPED_NO_GPU
        first_token_s, request_s = first_chat_token(server)
        stages = benchlib.metrics_startup(server.url)
    finally:
        server.stop()
    logged = benchlib.parse_ready_lines(server.log_text())
    missing = {"engine_ready_wall", "cli_ready_wall"} - set(logged)
    if missing:
        raise RuntimeError(f"zse-run's log lacks the 'ready in' line(s) {sorted(missing)}:\n"
                           f"{server.log_text()[-2000:]}")
    order = list(logged["logged_stages_s"]) + [s for s in stages if s not in logged["logged_stages_s"]]
    stages = {name: stages.get(name, logged["logged_stages_s"].get(name)) for name in order}
    engine_start = logged["engine_ready_wall"] - logged["engine_open_s"] - server.spawned_wall
    # zse-run's engine process reads the manifest before Engine.open, right after the fork
    critical = sum(v for k, v in stages.items()
                   if "overlapped" not in k and not k.startswith("manifest"))
    cli_import = logged["cli_ready_wall"] - logged["cli_since_start_s"] - server.spawned_wall
    milestones = {f"spawn_to_{key}_s": cli_import + logged[f"cli_to_{key}_s"]
                  for key in benchlib.MILESTONE_KEYS.values() if f"cli_to_{key}_s" in logged}
    return {"spawn_to_http_up_s": server.first_answer_s, "spawn_to_health_200_s": server.ready_s,
            "spawn_to_first_token_s": first_token_s, "chat_request_to_first_token_s": request_s,
            "gpu_in_use_gib": in_use, "stages_s": stages,
            "spawn_to_cli_import_s": cli_import, **milestones,
            "spawn_to_engine_open_s": engine_start, "engine_open_s": logged["engine_open_s"],
            "engine_open_outside_stages_s": logged["engine_open_s"] - critical,
            "return_code": server.process.returncode}


def zse_lane(run: dict[str, Any]) -> list[tuple[str, float, float]]:
    """The waterfall of one zse run: (stage, start, seconds) from spawn. zse-run forks its
    engine process right after the CLI module imports; the two lanes run side by side."""
    cli, start = run["spawn_to_cli_import_s"], run["spawn_to_engine_open_s"]
    manifest = next((v for k, v in run["stages_s"].items() if k.startswith("manifest")), 0.0)
    lane = [("python + imports to zse_runtime.cli", 0.0, cli),
            ("engine process: engine imports", cli + manifest, start - cli - manifest),
            ("HTTP process: imports, uvicorn answering", cli, run["spawn_to_http_up_s"] - cli)]
    if "spawn_to_http_import_s" in run:
        http_import = run["spawn_to_http_import_s"]
        lane += [("HTTP process: HTTP stack imports", cli, http_import - cli),
                 ("HTTP process: uvicorn start -> answering", http_import,
                  run["spawn_to_http_up_s"] - http_import)]
    at = start
    for stage, seconds in run["stages_s"].items():
        if stage.startswith("manifest"):
            lane.append(("engine process: " + stage, cli, seconds))
        elif stage.startswith("tokenizer (overlapped)") and "spawn_to_tokenizer_built_s" in run:
            lane.append(("HTTP process: " + stage, run["spawn_to_tokenizer_built_s"] - seconds,
                         seconds))
        elif "overlapped" in stage:
            lane.append((stage, start, seconds))
        else:
            lane.append((stage, at, seconds))
            at += seconds
    ready = start + run["engine_open_s"]
    lane += [("Engine.open outside stages", at, max(ready - at, 0.0)),
             ("engine ready -> /health 200", ready, run["spawn_to_health_200_s"] - ready),
             ("chat request -> first token", run["spawn_to_health_200_s"],
              run["chat_request_to_first_token_s"])]
    return lane


def hf_run(checkpoint: Path, args: argparse.Namespace, memory) -> dict[str, Any]:
    free_before = memory.free() if memory else None
    report = benchlib.run_hf_baseline(checkpoint, args.device)
    if memory:
        report["gpu_in_use_gib"] = (free_before - report["free_at_end"]) / GIB
        report["torch_max_allocated_gib"] = report["max_allocated"] / GIB
    else:
        report["gpu_in_use_gib"] = report["torch_max_allocated_gib"] = SKIPPED_NO_GPU
    return report


def hf_lane(run: dict[str, Any]) -> list[tuple[str, float, float]]:
    imported, loaded = run["spawn_to_imported_s"], run["spawn_to_loaded_s"]
    return [("python + import torch, transformers", 0.0, imported),
            ("load fp16 checkpoint onto the device", imported, loaded - imported),
            ("first token (16-token prompt)", loaded, run["spawn_to_first_token_s"] - loaded)]


def summarise(runs: list[dict[str, Any]], keys: list[str]) -> dict[str, Any]:
    summary = {}
    for key in keys:
        values = [r[key] for r in runs]
        summary[key] = median(values) if all(isinstance(v, float) for v in values) else values[0]
    if runs and "stages_s" in runs[0]:
        summary["stages_s"] = {stage: median([r["stages_s"][stage] for r in runs])
                               for stage in runs[0]["stages_s"]}
    return summary


# what zse-run's two processes import on the way to /health 200
STARTUP_PACKAGES = ("numpy", "cuda.bindings", "starlette", "uvicorn", "anyio", "jinja2",
                    "tokenizers", "prometheus_client", "msgspec", "typer", "zse_runtime")


def bytecode_state(packages=STARTUP_PACKAGES) -> dict[str, Any]:
    """Whether the packages zse-run imports at start-up come byte-compiled. Python compiles a
    module without a .pyc at every import when it may not write one (PYTHONDONTWRITEBYTECODE, a
    read-only tree): on the H200 host that was 0.1-0.4 s of every warm start (docs/benchmarks.md,
    sixteenth session), so a start-up figure means little without this."""
    import importlib.util

    compiled = {}
    for name in packages:
        try:
            origin = importlib.util.find_spec(name).origin
        except (ImportError, AttributeError, TypeError, ValueError):  # not installed, no file
            compiled[name] = None
            continue
        compiled[name] = os.path.exists(importlib.util.cache_from_source(origin))
    return {"dont_write_bytecode": bool(sys.flags.dont_write_bytecode),
            "package_init_compiled": compiled}


ZSE_KEYS = ["spawn_to_health_200_s", "spawn_to_first_token_s", "chat_request_to_first_token_s",
            "spawn_to_http_up_s", "spawn_to_engine_import_s", "spawn_to_http_import_s",
            "spawn_to_tokenizer_built_s", "engine_open_s", "gpu_in_use_gib"]
HF_KEYS = ["spawn_to_imported_s", "spawn_to_loaded_s", "spawn_to_first_token_s", "gpu_in_use_gib",
           "torch_max_allocated_gib"]


def measure(name: str, run, lane, keys, args) -> tuple[dict[str, Any], list]:
    """Priming run, --runs warm runs, then --runs cold runs (when the page cache can be
    dropped). Returns the JSON section and the waterfall lanes (each condition's median run)."""
    print(f"{name}: priming run (not recorded)", flush=True)
    run()
    section: dict[str, Any] = {}
    lanes = []
    for condition in ("warm", "cold"):
        runs: list[dict[str, Any]] = []
        for i in range(args.runs):
            if condition == "cold" and not args.cold:
                section["cold"] = "cold: not requested (--no-cold)"
                break
            if condition == "cold":
                dropped = benchlib.drop_page_cache()
                if dropped != "dropped":
                    section["cold"] = f"cold: not possible here ({dropped})"
                    break
            runs.append(run())
            print(f"{name} {condition} {i + 1}/{args.runs}: first token "
                  f"{runs[-1]['spawn_to_first_token_s']:.2f} s after spawn", flush=True)
        if runs:
            section[condition] = {"runs": runs, "median": summarise(runs, keys)}
            middle = sorted(runs, key=lambda r: r["spawn_to_first_token_s"])[len(runs) // 2]
            lanes.append((f"{name} {condition}", lane(middle)))
    return section, lanes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    benchlib.add_model_arguments(parser, "/tmp/zse_bench")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--no-cold", dest="cold", action="store_false",
                        help="skip the dropped-page-cache runs")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    benchlib.require_gpu(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    models = benchlib.prepare_models(args)
    memory = benchlib.GpuMemory() if args.device == "cuda" else None
    result: dict[str, Any] = {
        "benchmark": "bench_coldstart", **benchlib.environment(),
        "settings": {"device": args.device, "preset": args.preset, "layers": args.layers,
                     "runs": args.runs, "max_model_len": args.max_model_len, "slots": 1,
                     "zse": str(models.zse), "zse_bytes": models.zse.stat().st_size,
                     "checkpoint": str(models.checkpoint) if models.checkpoint else None,
                     "chat_request": CHAT},
        "models": models.provenance, "bytecode": bytecode_state()}
    uncompiled = [n for n, c in result["bytecode"]["package_init_compiled"].items() if c is False]
    if uncompiled:
        print(f"note: no .pyc for {', '.join(uncompiled)}: their imports compile from source at "
              "every start (python -m compileall on their site-packages removes that)", flush=True)
    lanes: list = []
    save = lambda: benchlib.write_json(args.out, "bench_coldstart.json", result)  # noqa: E731

    def measured(name: str, run, lane, keys):
        found, found_lanes = measure(name, run, lane, keys, args)
        lanes.extend(found_lanes)
        return found

    ok = benchlib.guarded(result, "zse", lambda: measured(
        "zse", lambda: zse_run(models.zse, args, memory), zse_lane, ZSE_KEYS))
    save()
    if models.checkpoint is not None:
        ok &= benchlib.guarded(result, "transformers", lambda: measured(
            "transformers", lambda: hf_run(models.checkpoint, args, memory), hf_lane, HF_KEYS))
    else:
        result["transformers"] = "not run: pass --baseline or --checkpoint"
    png = "not drawn: no run succeeded" if not lanes else benchlib.try_plot(
        lambda: benchlib.plot_waterfall(
            lanes, args.out / "coldstart_waterfall.png",
            f"cold start, {args.preset}{f' ({args.layers} layers)' if args.layers else ''} on "
            f"{args.device}; median run of {args.runs}"))
    result["plots"] = {"waterfall": png}
    path = save()
    rows = []
    for system, keys in (("zse", ZSE_KEYS), ("transformers", HF_KEYS)):
        section = result[system]
        if isinstance(section, str):
            rows.append((system, section.strip().splitlines()[-1][:150]))
            continue
        for condition in ("warm", "cold"):
            if isinstance(section.get(condition), str) or condition not in section:
                rows.append((f"{system} {condition}", str(section.get(condition, "not run"))))
                continue
            for key in keys:
                value = section[condition]["median"][key]
                shown = f"{value:.3f}" if isinstance(value, float) else value
                rows.append((f"{system} {condition} {key}", shown))
    benchlib.print_table(f"median of {args.runs} run(s); JSON {path}, plot {png}", rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
