"""Shared pieces of the issue-5 benchmarks (bench_coldstart.py, bench_decode.py): the models they
measure, a `zse-run` subprocess, the transformers fp16 baseline, GPU memory, tables and plots.

The transformers baseline runs in a fresh process (this file is its entry point):

    python scripts/benchlib.py hf-baseline CHECKPOINT --device cuda [--decode-tokens 128]
        [--contexts 128,2048] [--runs 3]

It prints one JSON line last: CLOCK_MONOTONIC stamps (comparable with the parent's
time.monotonic()) after the imports, after the load and at the first token, then decode tokens/s
and GPU memory.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(Path(__file__).resolve().parent), str(REPO)]

SKIPPED_NO_GPU = "skipped: no GPU"
POLL_S = 0.01  # /health poll interval: the resolution of "ready", kept light on the server's GIL
GIB = 2**30


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def csv_ints(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment() -> dict[str, Any]:
    from bench_convert import git_commit, machine_info

    versions = {}
    for module in ("numpy", "numba", "cuda.bindings", "torch", "transformers"):
        try:
            versions[module] = __import__(module, fromlist=["__version__"]).__version__
        except Exception as exc:  # noqa: BLE001 - recorded, not needed by every part
            versions[module] = f"unavailable ({type(exc).__name__})"
    return {"created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "git_commit": git_commit(), "machine": machine_info(), "versions": versions}


# ---------------------------------------------------------------------------------------------
# Models: a direct synthetic .zse, or a synthetic fp16 checkpoint and its conversion
# ---------------------------------------------------------------------------------------------

@dataclass
class Models:
    zse: Path
    checkpoint: Path | None  # the HF checkpoint the .zse was converted from, for the baseline
    provenance: dict[str, Any]


def synthetic_model_config(preset: str, layers: int | None) -> dict[str, Any]:
    """The .zse model section of a make_synthetic_checkpoint preset (same shapes either way)."""
    import make_synthetic_checkpoint as synthetic

    from zse_convert.architectures import canonical_config

    return {**canonical_config(synthetic.preset_config(preset, layers)), "source_dtype": "synthetic"}


def lm_head_suffix(lm_head: str) -> str:
    """What a built model's file name adds for an lm_head other than the default fp16."""
    return "" if lm_head == "float16" else f"-lmhead-{lm_head}"


def tokenizer_size(zse: Path) -> int:
    """Ids in a .zse's tokenizer (a default one is as large as the Python sources it was trained
    on allow, up to the model's vocabulary)."""
    from tokenizers import Tokenizer

    from zse_runtime.zsefile import ZseFile

    with ZseFile(zse) as file:
        return Tokenizer.from_str(file.manifest["tokenizer"]["tokenizer_json"]).get_vocab_size()


def direct_zse(work: Path, preset: str, layers: int | None, lm_head: str,
               log: Callable[[str], None], tokenizer: Path | None = None) -> Models:
    """make_synthetic_zse.write_random_zse: random INT4 codes written straight into a .zse, with
    a chat template and a BPE as large as the vocabulary trained on Python sources, or
    `tokenizer` (a tokenizer.json); reused when `work` already holds one for this preset."""
    from make_synthetic_zse import write_random_zse

    from tests.checkpoints import CHAT_TEMPLATE
    from zse_convert.convert import ConvertOptions

    tokenizer_json = tokenizer.read_text() if tokenizer else None
    # a different tokenizer is a different file (and files of older versions of this script,
    # which embedded a 512-token toy tokenizer, are not reused)
    tag = (f"-tok{hashlib.sha256(tokenizer_json.encode()).hexdigest()[:8]}" if tokenizer
           else "-synthtok")
    # the converter's default group sizes (files of another default are not reused)
    defaults = ConvertOptions()
    groups = defaults.effective_group_size_overrides
    layout = "".join(f"-{kind}{size}" for kind, size in groups.items())
    path = work / f"{preset}-l{layers or 'all'}{lm_head_suffix(lm_head)}{tag}{layout}-direct.zse"
    sidecar = path.with_name(path.name + ".json")
    if path.is_file() and sidecar.is_file():
        made = json.loads(sidecar.read_text())
        log(f"reusing {path} (written in {made['write_s']:.1f} s earlier)")
        return Models(path, None, {**made, "reused": True})
    log(f"writing a random {preset} .zse directly into {path}")
    started = time.perf_counter()
    write_random_zse(path, synthetic_model_config(preset, layers), defaults.group_size,
                     chat_template=CHAT_TEMPLATE, lm_head=lm_head, tokenizer_json=tokenizer_json)
    made = {"how": "scripts/make_synthetic_zse.py write_random_zse (random INT4 codes, no "
                   "checkpoint, no quantization)", "preset": preset, "layers": layers,
            "lm_head": lm_head, "group_size": defaults.group_size, "group_size_overrides": groups,
            "tokenizer": str(tokenizer) if tokenizer else "BPE trained on Python sources",
            "tokenizer_ids": tokenizer_size(path),
            "write_s": time.perf_counter() - started, "zse_bytes": path.stat().st_size}
    sidecar.write_text(json.dumps(made, indent=2))
    log(f"  {made['zse_bytes'] / 1e9:.2f} GB in {made['write_s']:.1f} s")
    return Models(path, None, {**made, "reused": False})


def checkpoint_and_conversion(work: Path, preset: str, layers: int | None,
                              checkpoint: Path | None, zse: Path | None, lm_head: str,
                              log: Callable[[str], None]) -> Models:
    """A random fp16 HF checkpoint (make_synthetic_checkpoint.write_checkpoint, unless
    `checkpoint` is given) and its `zse_convert.convert()` output (unless `zse` is given), both
    reused from `work` when already there; the conversion time is recorded."""
    import make_synthetic_checkpoint as synthetic

    from zse_convert.convert import ConvertOptions, convert

    provenance: dict[str, Any] = {"how": "scripts/make_synthetic_checkpoint.py (random fp16 "
                                         "safetensors) converted by zse_convert.convert()"}
    if checkpoint is None:
        checkpoint = work / f"{preset}-l{layers or 'all'}-fp16-checkpoint"
        marker = synthetic.read_marker(checkpoint)
        wanted_layers = synthetic.preset_config(preset, layers)["num_hidden_layers"]
        if marker and marker.get("preset") == preset and marker.get("layers") == wanted_layers \
                and marker.get("dtype") == "float16":
            log(f"reusing the checkpoint {checkpoint}")
            provenance["checkpoint"] = {**marker, "reused": True}
        else:
            log(f"writing a random fp16 {preset} checkpoint into {checkpoint}")
            report = synthetic.write_checkpoint(checkpoint, preset, layers, "float16",
                                                force=marker is not None, log=log)
            log(synthetic.describe(report))
            provenance["checkpoint"] = {**synthetic.read_marker(checkpoint), "reused": False}
    else:
        if not (checkpoint / "config.json").is_file():
            raise SystemExit(f"error: --checkpoint {checkpoint} has no config.json")
        provenance["checkpoint"] = {"folder": str(checkpoint), "given": True,
                                    "marker": synthetic.read_marker(checkpoint)}
    if zse is not None:
        provenance["conversion"] = {"given": str(zse)}
        return Models(zse, checkpoint, provenance)
    zse = work / f"{checkpoint.name}{lm_head_suffix(lm_head)}.zse"
    sidecar = zse.with_name(zse.name + ".json")
    source_id = str(checkpoint.resolve())
    if zse.is_file() and sidecar.is_file() and json.loads(sidecar.read_text()).get("source") == source_id:
        provenance["conversion"] = {**json.loads(sidecar.read_text()), "reused": True}
        log(f"reusing {zse} (converted in {provenance['conversion']['convert_s']:.1f} s earlier)")
        return Models(zse, checkpoint, provenance)
    log(f"converting {checkpoint} -> {zse}")
    started = time.perf_counter()
    summary = convert(str(checkpoint), zse, ConvertOptions(lm_head=lm_head))
    conversion = {"source": source_id, "convert_s": time.perf_counter() - started,
                  "zse_bytes": zse.stat().st_size, "cpus": os.cpu_count(),
                  "converter_summary": summary}
    sidecar.write_text(json.dumps(conversion, indent=2, default=str))
    log(f"  converted in {conversion['convert_s']:.1f} s ({conversion['zse_bytes'] / 1e9:.2f} GB)")
    provenance["conversion"] = {**conversion, "reused": False}
    return Models(zse, checkpoint, provenance)


def prepare_models(args: argparse.Namespace, log: Callable[[str], None] = print) -> Models:
    """What --zse / --checkpoint / --baseline ask for (see each script's docstring)."""
    args.work.mkdir(parents=True, exist_ok=True)
    for path, what in ((args.zse, "--zse"), (args.checkpoint, "--checkpoint"),
                       (args.tokenizer, "--tokenizer")):
        if path is not None and not path.exists():
            raise SystemExit(f"error: {what} {path} does not exist")
    if args.tokenizer is not None and (args.zse or args.checkpoint or args.baseline):
        raise SystemExit("error: --tokenizer applies to the .zse this script writes directly; "
                         "a given or converted file keeps its own tokenizer")
    if args.baseline or args.checkpoint is not None:
        return checkpoint_and_conversion(args.work, args.preset, args.layers, args.checkpoint,
                                         args.zse, args.lm_head, log)
    if args.zse is not None:
        return Models(args.zse, None, {"given": str(args.zse)})
    return direct_zse(args.work, args.preset, args.layers, args.lm_head, log, args.tokenizer)


def add_model_arguments(parser: argparse.ArgumentParser, default_work: str) -> None:
    import make_synthetic_checkpoint as synthetic

    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: a smoke test of the script with a tiny preset")
    parser.add_argument("--preset", choices=sorted(synthetic.PRESETS), default="qwen2.5-7b")
    parser.add_argument("--layers", type=int, help="override num_hidden_layers (shrinks the model)")
    parser.add_argument("--lm-head", choices=("float16", "int4"), default="float16",
                        help="lm_head precision of the model built (zse-convert --lm-head)")
    parser.add_argument("--tokenizer", type=Path,
                        help="a real model's tokenizer.json for the built .zse (default: a "
                             "BPE as large as the model's vocabulary, trained on Python sources)")
    parser.add_argument("--zse", type=Path, help="use this .zse instead of building one")
    parser.add_argument("--checkpoint", type=Path,
                        help="HF checkpoint for the transformers baseline (implies --baseline); "
                             "converted to a .zse unless --zse is given")
    parser.add_argument("--baseline", action="store_true",
                        help="measure transformers fp16 on a random checkpoint and ZSE on its "
                             "conversion (built in --work unless given)")
    parser.add_argument("--work", type=Path, default=Path(default_work),
                        help="where models are built and reused")
    parser.add_argument("--runs", type=int, default=3,
                        help="repetitions of each measurement (medians are reported)")
    parser.add_argument("--out", type=Path, required=True, help="JSON and PNGs go here")


def bytes_per_decode_step(zse_path: Path) -> dict[str, int]:
    """Bytes one batch-1 decode step must read, from the manifest: every tensor but the
    embedding, which is only gathered (one row per token), unless it doubles as the lm_head."""
    from zse_runtime.zsefile import EMBED, LM_HEAD, ZseFile

    with ZseFile(zse_path) as zse:
        sizes = {name: info.nbytes for name, info in zse.tensors.items()}
    read = sum(n for name, n in sizes.items() if name != EMBED)
    if LM_HEAD not in sizes:
        read += sizes[EMBED]
    return {"bytes_read": read, "lm_head_bytes": sizes.get(LM_HEAD, sizes[EMBED]),
            "embedding_bytes": sizes[EMBED], "file_tensor_bytes": sum(sizes.values())}


# ---------------------------------------------------------------------------------------------
# GPU memory and the page cache
# ---------------------------------------------------------------------------------------------

def require_gpu(device: str) -> None:
    """Fail at once, before minutes of model building, when --device cuda has no GPU."""
    if device != "cuda":
        return
    try:
        from zse_runtime.gpu import driver

        count = driver.device_count()  # raises, not 0, where libcuda itself is missing
    except Exception as exc:  # noqa: BLE001 - ImportError, DynamicLibNotFoundError, ...
        raise SystemExit(f"error: --device cuda, but CUDA is unusable here: {exc} (--device cpu "
                         "runs a smoke test)") from None
    if count == 0:
        raise SystemExit("error: --device cuda, but no CUDA GPU is visible (--device cpu runs a "
                         "smoke test)")


class GpuMemory:
    """cuMemGetInfo from this process (its own context is counted before and after alike, so a
    difference is what another process took, its CUDA context included)."""

    def __init__(self):
        from zse_runtime.gpu import driver

        self.context = driver.Context(0)

    def free(self) -> int:
        return int(self.context.memory_info()[0])


def drop_page_cache() -> str:
    """'dropped', or why not (bench_convert.drop_page_cache: needs root)."""
    from bench_convert import drop_page_cache as drop

    return drop()


# ---------------------------------------------------------------------------------------------
# zse-run as a subprocess
# ---------------------------------------------------------------------------------------------

@dataclass
class ServerStart:
    process: subprocess.Popen
    port: int
    log_path: Path
    spawned_wall: float  # time.time() just before Popen: log timestamps are wall clock
    first_answer_s: float | None = None  # first /health answer of any status (HTTP up)
    ready_s: float = 0.0  # /health 200
    spawned: float = 0.0  # time.perf_counter() just before Popen
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def launch_server(model: Path, port: int, *args: str, device: str = "cuda",
                  timeout: float = 600, log_dir: Path | None = None) -> ServerStart:
    """`python -m zse_runtime.cli MODEL --port PORT --device DEVICE ARGS` in a fresh process,
    served as model "m"; returns once /health answers 200. Its log goes to a file (a pipe nobody
    reads can fill and stall the server). A server that exits or times out raises with its log."""
    import httpx

    log_dir = log_dir or Path(tempfile.gettempdir())
    log_path = log_dir / f"zse-run-{port}.log"
    with open(log_path, "w") as log:
        spawned_wall, spawned = time.time(), time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, "-m", "zse_runtime.cli", str(model), "--port", str(port), "--device",
             device, "--served-model-name", "m", *args],
            env={**os.environ, "PYTHONPATH": os.pathsep.join(
                p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)},
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    server = ServerStart(process, port, log_path, spawned_wall, spawned=spawned)
    with httpx.Client(timeout=1) as client:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"zse-run exited with status {process.returncode} before "
                                   f"/health was 200:\n{server.log_text()[-3000:]}")
            if time.perf_counter() - spawned > timeout:
                server.stop()
                raise RuntimeError(f"zse-run was not ready after {timeout:.0f} s:\n"
                                   f"{server.log_text()[-3000:]}")
            try:
                status = client.get(f"{server.url}/health").status_code
            except httpx.TransportError:
                time.sleep(POLL_S)
                continue
            now = time.perf_counter() - spawned
            if server.first_answer_s is None:
                server.first_answer_s = now
            if status == 200:
                server.ready_s = now
                return server
            time.sleep(POLL_S)


def start_server(model: Path, port: int, *args: str, device: str = "cuda"):
    """(process, seconds from spawn to /health 200), as scripts/gpu_server_check.py uses it."""
    server = launch_server(model, port, *args, device=device)
    return server.process, server.ready_s


def stream_completions(url: str, prompts: list[list[int]], max_tokens: int) -> list[int]:
    """Stream greedy completions (ignore_eos) of all `prompts` at once and return the tokens
    the server says each generated (usage from its last chunk). One asyncio loop with httpx
    reads every stream, as a load generator should: a thread per stream through the openai SDK
    spent ~100 us of Python per chunk under one GIL (H200 host, 2026-11-30), so at 32 streams
    the client fell behind the server it was measuring."""
    import asyncio

    import httpx

    async def one(client, prompt: list[int]) -> int:
        body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
        generated = None
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    usage = json.loads(line[len("data: "):]).get("usage")
                    if usage:
                        generated = usage["completion_tokens"]
        if generated is None:
            raise RuntimeError("a stream ended without a usage chunk")
        return generated

    async def run() -> list[int]:
        limits = httpx.Limits(max_connections=len(prompts), max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=600, limits=limits) as client:
            return list(await asyncio.gather(*(one(client, p) for p in prompts)))

    return asyncio.run(run())


LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
ENGINE_READY = re.compile(r"zse: ready in ([\d.]+) s on .*\); KV cache")
CLI_READY = re.compile(r"zse: ready in ([\d.]+) s since process start \((.*)\)$")
STAGE = re.compile(r"^(.+) (\d+) ms$")
CLI_MILESTONE = re.compile(r"zse: (engine modules imported|HTTP stack imported|tokenizer built) "
                           r"([\d.]+) s since process start")
MILESTONE_KEYS = {"engine modules imported": "engine_import", "HTTP stack imported": "http_import",
                  "tokenizer built": "tokenizer_built"}


def log_time(line: str) -> float | None:
    """Wall-clock seconds of a `logging` line's default asctime (local time, millisecond)."""
    import datetime as dt

    match = LOG_TIME.match(line)
    if not match:
        return None
    stamp = dt.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")
    return stamp.timestamp()


def parse_ready_lines(text: str) -> dict[str, Any]:
    """From zse-run's log: when the engine and the CLI logged "ready" (wall clock), the engine's
    own open time, the CLI's time since its module was imported, the stage list as printed
    (milliseconds, rounded), and when the engine's modules and the HTTP stack had imported and
    the tokenizer was built (seconds since the CLI module was imported)."""
    found: dict[str, Any] = {}
    for line in text.splitlines():
        if (match := ENGINE_READY.search(line)) and "engine_ready_wall" not in found:
            found["engine_ready_wall"], found["engine_open_s"] = log_time(line), float(match.group(1))
        elif match := CLI_READY.search(line):
            found["cli_ready_wall"], found["cli_since_start_s"] = log_time(line), float(match.group(1))
            stages = {}
            for part in match.group(2).split(", "):
                if stage := STAGE.match(part):
                    stages[stage.group(1)] = int(stage.group(2)) / 1000
            found["logged_stages_s"] = stages
        elif match := CLI_MILESTONE.search(line):
            found[f"cli_to_{MILESTONE_KEYS[match.group(1)]}_s"] = float(match.group(2))
    return found


def metrics_startup(url: str) -> dict[str, float]:
    """zse_startup_seconds{stage=...} from /metrics: the same stages, unrounded."""
    import httpx

    stages = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        match = re.match(r'^zse_startup_seconds\{stage="(.*)"\} ([0-9.eE+-]+)$', line)
        if match:
            stages[match.group(1)] = float(match.group(2))
    return stages


# ---------------------------------------------------------------------------------------------
# The transformers fp16 baseline, in a fresh process
# ---------------------------------------------------------------------------------------------

def run_hf_baseline(checkpoint: Path, device: str, decode_tokens: int = 0,
                    contexts: list[int] | None = None, runs: int = 1,
                    timeout: float = 900) -> dict[str, Any]:
    """Spawn this file's hf-baseline child; its JSON with `spawn_to_*_s` measured from just
    before Popen (CLOCK_MONOTONIC in both processes)."""
    command = [sys.executable, str(Path(__file__).resolve()), "hf-baseline", str(checkpoint),
               "--device", device, "--decode-tokens", str(decode_tokens), "--runs", str(runs)]
    if contexts:
        command += ["--contexts", ",".join(map(str, contexts))]
    spawned = time.monotonic()
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if result.returncode:
        raise RuntimeError(f"the transformers baseline failed (status {result.returncode}):\n"
                           f"{result.stderr[-3000:]}")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("imported", "loaded", "first_token"):
        report[f"spawn_to_{key}_s"] = report.pop(f"{key}_monotonic") - spawned
    return report


def hf_baseline_child(args: argparse.Namespace) -> None:
    import torch
    import transformers

    imported = time.monotonic()
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.init()
        free_at_start = torch.cuda.mem_get_info()[0]
    newer = tuple(int(v) for v in re.findall(r"\d+", transformers.__version__)[:2]) >= (4, 56)
    dtype_arg = {"dtype" if newer else "torch_dtype": torch.float16}
    try:  # straight onto the device; older transformers need accelerate for device_map
        model = transformers.AutoModelForCausalLM.from_pretrained(
            args.checkpoint, device_map=args.device, **dtype_arg)
        load_path = f"from_pretrained(device_map={args.device!r})"
    except (ImportError, ValueError) as exc:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.checkpoint, **dtype_arg)
        model = model.to(args.device)
        load_path = f"from_pretrained on the CPU, then .to({args.device!r}) ({exc})"[:300]
    model.eval()
    if cuda:
        torch.cuda.synchronize()
    loaded = time.monotonic()
    vocab = model.config.vocab_size
    prompt = torch.arange(100, 116, device=args.device).remainder(vocab)[None]  # 16 token ids
    with torch.no_grad():
        first = int(model(prompt).logits[0, -1].argmax())  # int(): waits for the GPU
    first_token = time.monotonic()
    decode = []
    with torch.no_grad():
        for context in args.contexts if args.decode_tokens else []:
            ids = torch.arange(context, device=args.device).remainder(vocab - 1)[None] + 1
            for _ in range(args.runs):
                out = model(ids, use_cache=True)
                token = out.logits[0, -1].argmax()
                int(token)
                started = time.perf_counter()
                for _ in range(args.decode_tokens):  # greedy, one token at a time, as served
                    out = model(token.view(1, 1), past_key_values=out.past_key_values,
                                use_cache=True)
                    token = out.logits[0, -1].argmax()
                    int(token)
                seconds = time.perf_counter() - started
                decode.append({"context": context, "tokens": args.decode_tokens,
                               "seconds": seconds, "tok_s": args.decode_tokens / seconds})
    report = {"imported_monotonic": imported, "loaded_monotonic": loaded,
              "first_token_monotonic": first_token, "first_token_id": first,
              "load_path": load_path, "decode": decode,
              "torch": torch.__version__, "transformers": transformers.__version__,
              "parameters": sum(p.numel() for p in model.parameters())}
    if cuda:
        free_now, _ = torch.cuda.mem_get_info()
        report.update(free_at_start=free_at_start, free_at_end=free_now,
                      max_allocated=torch.cuda.max_memory_allocated(),
                      max_reserved=torch.cuda.max_memory_reserved())
    print(json.dumps(report))


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------

def guarded(result: dict[str, Any], key: str, fn: Callable[[], Any]) -> bool:
    """result[key] = fn(), or "failed: <traceback tail>" so the other parts still run (as each
    gpu_check check does). Returns whether it succeeded."""
    import traceback

    try:
        result[key] = fn()
        return True
    except Exception:  # noqa: BLE001 - recorded in the JSON and the table, exit status 1
        result[key] = "failed: " + traceback.format_exc()[-2000:]
        print(f"{key} FAILED:\n{result[key]}", file=sys.stderr, flush=True)
        return False


def try_plot(draw: Callable[[], Path]) -> str:
    """The PNG's path, or why it was not drawn (the JSON is kept either way)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        return f"not drawn: matplotlib is not installed ({exc})"
    return str(draw())


def write_json(out: Path, name: str, result: dict[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return path


def print_table(title: str, rows: list[tuple[str, str]]) -> None:
    width = max(len(name) for name, _ in rows) + 2
    print("\n" + title)
    print("-" * (width + 40))
    for name, value in rows:
        print(f"{name:<{width}}{value}")


def plot_waterfall(lanes: list[tuple[str, list[tuple[str, float, float]]]], path: Path,
                   title: str) -> Path:
    """One group of horizontal bars per lane (e.g. "zse warm"): (stage, start s, seconds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(lane, stage, start, seconds) for lane, stages in lanes
            for stage, start, seconds in stages]
    stages = list(dict.fromkeys(stage for _, stage, _, _ in rows))
    colors = {stage: plt.cm.tab20(i % 20) for i, stage in enumerate(stages)}
    figure, axis = plt.subplots(figsize=(10, 1.2 + 0.28 * len(rows)))
    for y, (_, stage, start, seconds) in enumerate(rows):
        axis.barh(y, max(seconds, 1e-4), left=start, color=colors[stage])
        axis.text(start + seconds, y, f" {seconds * 1000:.0f} ms", va="center", fontsize=7)
    axis.set_yticks(range(len(rows)), [f"{lane}: {stage}" for lane, stage, _, _ in rows],
                    fontsize=7)
    axis.invert_yaxis()
    axis.set_xlabel("seconds since the process was spawned")
    axis.set_title(title, fontsize=9)
    axis.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_concurrency(ours: dict[int, float], points: dict[str, tuple[int, float]], path: Path,
                     title: str) -> Path:
    """Aggregate tokens/s against concurrent streams, plus single labelled points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    streams = sorted(ours)
    axis.plot(streams, [ours[s] for s in streams], "o-", label="zse-run, aggregate")
    for s in streams:
        axis.annotate(f"{ours[s]:.0f}", (s, ours[s]), textcoords="offset points", xytext=(4, 4),
                      fontsize=8)
    for (label, (x, y)), marker in zip(points.items(), "s^Dv"):
        axis.plot([x], [y], marker, label=label)
        axis.annotate(f"{y:.0f}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=8)
    axis.set_xscale("log", base=2)
    axis.set_xticks(streams, [str(s) for s in streams])
    axis.set_xlabel("concurrent streams")
    axis.set_ylabel("generated tokens/s")
    axis.set_ylim(bottom=0)
    axis.set_title(title, fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    child = commands.add_parser("hf-baseline", help="load CHECKPOINT in fp16, time the first "
                                                    "token and greedy decode")
    child.add_argument("checkpoint", type=Path)
    child.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    child.add_argument("--decode-tokens", type=int, default=0)
    child.add_argument("--contexts", type=csv_ints, default=[128])
    child.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    hf_baseline_child(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
