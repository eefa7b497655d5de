"""Benchmark `zse-convert` on one checkpoint: wall time, throughput, peak RSS, output size.

    python scripts/bench_convert.py CHECKPOINT_DIR
    python scripts/bench_convert.py /data/qwen7b --preset qwen2.5-7b       # create it first
    python scripts/bench_convert.py /tmp/q7-l1 --preset qwen2.5-7b --layers 1 --json-out q7-l1.json

With --preset, CHECKPOINT_DIR is filled by scripts/make_synthetic_checkpoint.py first, unless it
already holds a complete synthetic checkpoint made with the same preset, layers, dtype and seed.

The converter runs as a subprocess (`zse-convert DIR --out FILE --json`), so the peak RSS is its
own: `os.wait4` returns the child's rusage. Results are compared with the targets (a 7B model in
under 300 s, peak RSS under 3 GB); a smaller model's time is projected to 7B: start-up once,
convert() linearly in parameters. The JSON (--json-out, default ./bench_convert.json) records
the machine, the git commit and whether the page cache was dropped; a rich table comes last.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(Path(__file__).resolve().parent), str(REPO_ROOT)]
import make_synthetic_checkpoint as synthetic  # noqa: E402  (a sibling script, not a package)
from zse_convert.architectures import canonical_config  # noqa: E402
from zse_convert.convert import ConvertOptions, plan_tensors  # noqa: E402
from zse_runtime.zsefile import LAYOUT_INT4_ROWS  # noqa: E402

REFERENCE_PRESET = "qwen2.5-7b"  # what "7B" means in the targets
TARGET_SECONDS_7B = 300.0
TARGET_PEAK_RSS_BYTES = 3 * 10**9  # GB = 1e9 bytes throughout
FULL_SIZE_FRACTION = 0.8  # a model with this share of the reference's parameters is "7B"

console = Console()


@dataclass(frozen=True)
class Workload:
    parameters: int
    int4_elements: int  # what the quantizer touches; the rest is copied


@dataclass
class ConverterRun:
    command: list[str]
    returncode: int
    wall_seconds: float
    user_seconds: float
    system_seconds: float
    peak_rss_bytes: int
    summary: dict[str, Any] | None  # the converter's --json output


# ---------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------

def _proc_field(path: str, key: str) -> str | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def machine_info() -> dict[str, Any]:
    mem_kb = _proc_field("/proc/meminfo", "MemTotal")
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": _proc_field("/proc/cpuinfo", "model name"),
        "ram_bytes": int(mem_kb.split()[0]) * 1024 if mem_kb else None,
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],  # shared machines drift
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def git_commit() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def drop_page_cache() -> str:
    """Drop the page cache so the converter reads from disk; returns what happened."""
    path = "/proc/sys/vm/drop_caches"
    if os.geteuid() != 0:
        return "not done: needs root"
    if not os.access(path, os.W_OK):
        return f"not done: {path} is not writable"
    os.sync()
    try:
        with open(path, "w") as fh:
            fh.write("3\n")
    except OSError as exc:
        return f"not done: writing {path} failed: {exc}"
    return "dropped"


# ---------------------------------------------------------------------------------------------
# Checkpoint
# ---------------------------------------------------------------------------------------------

def ensure_checkpoint(folder: Path, args: argparse.Namespace) -> dict[str, Any] | None:
    """Create the synthetic checkpoint for --preset unless a matching one is there; returns how it
    was made (the marker), or None for a checkpoint that is not synthetic."""
    marker = synthetic.read_marker(folder)
    if args.preset is None:
        return marker
    wanted_layers = synthetic.preset_config(args.preset, args.layers)["num_hidden_layers"]
    wanted = {"preset": args.preset, "layers": wanted_layers, "dtype": args.dtype,
              "seed": args.seed}
    if marker and all(marker.get(k) == v for k, v in wanted.items()):
        console.print(f"reusing {folder} ({args.preset}, {wanted_layers} layers, {args.dtype})")
        return marker | {"reused": True}
    console.print(f"writing a synthetic {args.preset} checkpoint ({wanted_layers} layers, "
                  f"{args.dtype}) into {folder}")
    report = synthetic.write_checkpoint(folder, args.preset, args.layers, args.dtype,
                                        args.shard_gb, args.seed, force=marker is not None,
                                        log=console.print)
    console.print(synthetic.describe(report))
    return synthetic.read_marker(folder) | {"reused": False}


def checkpoint_info(folder: Path, config: dict[str, Any]) -> dict[str, Any]:
    weights = sorted(folder.glob("*.safetensors"))
    return {
        "folder": str(folder),
        "architecture": (config.get("architectures") or [config.get("model_type")])[0],
        "num_hidden_layers": config.get("num_hidden_layers"),
        "dtype": config.get("torch_dtype") or config.get("dtype"),
        "weight_files": len(weights),
        "weight_bytes": sum(p.stat().st_size for p in weights),
    }


def workload(hf_config: dict[str, Any], args: argparse.Namespace) -> Workload:
    """Parameters, and elements the converter will quantize, as convert() plans them."""
    options = ConvertOptions(group_size=args.group_size, clip_search=not args.no_clip_search)
    specs = plan_tensors(canonical_config(hf_config), options)
    int4 = sum(math.prod(s.shape) for s in specs if s.layout == LAYOUT_INT4_ROWS)
    hf_tensors = synthetic.plan_tensors(hf_config)
    return Workload(sum(t.numel for t in hf_tensors), int4)


def reference_workload(args: argparse.Namespace) -> Workload:
    return workload(synthetic.preset_config(REFERENCE_PRESET), args)


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------

def converter_command(folder: Path, out: Path, args: argparse.Namespace) -> list[str]:
    """The venv's `zse-convert` entry point, or the module when it is not installed."""
    script = Path(sys.executable).parent / "zse-convert"
    base = [str(script)] if script.exists() else [sys.executable, "-m", "zse_convert.cli"]
    command = [*base, str(folder), "--out", str(out), "--group-size", str(args.group_size),
               "--json"]
    return (command + (["--no-clip-search"] if args.no_clip_search else [])
            + (["--no-column-weights"] if args.no_column_weights else []))


def run_converter(command: list[str]) -> ConverterRun:
    """Run the converter; stderr (its progress bar) passes through, stdout is its JSON summary."""
    with tempfile.TemporaryFile("w+") as stdout:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=stdout, cwd=REPO_ROOT)
        # wait4 instead of Popen.wait: it returns this child's own rusage (ru_maxrss in KiB).
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0)
        text = stdout.read()
    try:
        summary = json.loads(text[text.index("{"):]) if process.returncode == 0 else None
    except ValueError:
        summary = None
    return ConverterRun(command, process.returncode, wall, usage.ru_utime, usage.ru_stime,
                        usage.ru_maxrss * 1024, summary)


def evaluate_targets(run: ConverterRun, measured: Workload,
                     reference: Workload) -> list[dict[str, Any]]:
    """Each target with its measured value and verdict; for a model smaller than the reference,
    the time is projected (start-up once, convert() scaled) and judged by the upper bound."""
    params = run.summary["parameters"]
    projected = params < FULL_SIZE_FRACTION * reference.parameters
    seconds_7b, basis, low = run.wall_seconds, "measured", None
    if projected:
        converting = run.summary["seconds"]
        startup = max(run.wall_seconds - converting, 0.0)
        # Two scalings bracket the 7B time: every parameter costs the same, or all time is
        # quantization and copying is free (a shrunken model copies a larger share).
        by_params = startup + converting * reference.parameters / params
        by_int4 = startup + converting * reference.int4_elements / max(measured.int4_elements, 1)
        low, seconds_7b = sorted((by_params, by_int4))
        basis = (f"projected to {reference.parameters / 1e9:.2f} B params from "
                 f"{params / 1e9:.3f} B ({measured.int4_elements / 1e9:.3f} B quantized): "
                 f"{startup:.1f} s start-up + convert() scaled by parameters ({by_params:.0f} s) "
                 f"or by INT4 elements ({by_int4:.0f} s); judged on the larger")
    return [
        {"target": "7B conversion time", "limit": f"< {TARGET_SECONDS_7B:.0f} s",
         "value": round(seconds_7b, 1), "low": round(low, 1) if low is not None else None,
         "unit": "s", "projected": projected, "basis": basis,
         "pass": seconds_7b < TARGET_SECONDS_7B},
        {"target": "peak RSS", "limit": f"< {TARGET_PEAK_RSS_BYTES / 1e9:.0f} GB",
         "value": round(run.peak_rss_bytes / 1e9, 3), "unit": "GB", "projected": False,
         "basis": "measured", "pass": run.peak_rss_bytes < TARGET_PEAK_RSS_BYTES},
    ]


def build_result(run: ConverterRun, checkpoint: dict[str, Any], synthetic_marker, page_cache: str,
                 output_kept: str | None, measured: Workload,
                 reference: Workload) -> dict[str, Any]:
    summary = run.summary or {}
    params = summary.get("parameters")
    return {
        "benchmark": "zse-convert",
        "created_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_commit": git_commit(),
        "machine": machine_info(),
        "checkpoint": checkpoint,
        "synthetic": synthetic_marker,
        "page_cache": page_cache,
        "command": run.command,
        "returncode": run.returncode,
        "wall_seconds": round(run.wall_seconds, 2),
        "converter_seconds": summary.get("seconds"),  # excludes interpreter start and imports
        "cpu_user_seconds": round(run.user_seconds, 2),
        "cpu_system_seconds": round(run.system_seconds, 2),
        "peak_rss_bytes": run.peak_rss_bytes,
        "parameters": params,
        "params_per_second": round(params / run.wall_seconds) if params else None,
        "convert_params_per_second": summary.get("params_per_second"),  # inside convert() only
        "output_bytes": summary.get("file_bytes"),
        "output_kept": output_kept,
        "bits_per_weight": summary.get("bits_per_weight"),
        "int4_bits_per_weight": summary.get("int4_bits_per_weight"),
        "int4_elements": measured.int4_elements,
        "targets": evaluate_targets(run, measured, reference) if run.summary else [],
        "converter_summary": run.summary,
    }


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def result_table(result: dict[str, Any]) -> Table:
    ckpt, machine = result["checkpoint"], result["machine"]
    table = Table("metric", "value", "target", title=f"zse-convert on {ckpt['folder']}")
    table.add_row("checkpoint", f"{ckpt['architecture']}, {ckpt['num_hidden_layers']} layers, "
                  f"{ckpt['dtype']}, {ckpt['weight_bytes'] / 1e9:.2f} GB in "
                  f"{ckpt['weight_files']} file(s)", "")
    table.add_row("machine", f"{machine['cpus_usable']} CPUs ({machine['cpu_model']}), "
                  f"{(machine['ram_bytes'] or 0) / 2**30:.0f} GiB RAM, load "
                  f"{machine['load_average_1_5_15'][0]}", "")
    table.add_row("page cache", result["page_cache"], "")
    if result["returncode"] != 0:
        table.add_row("result", f"[red]zse-convert exited with {result['returncode']}[/]", "")
        return table
    targets = {t["target"]: t for t in result["targets"]}
    time_target, rss_target = targets["7B conversion time"], targets["peak RSS"]
    cpu = result["cpu_user_seconds"] + result["cpu_system_seconds"]
    table.add_row("parameters", f"{result['parameters'] / 1e9:.3f} B", "")
    table.add_row("wall time", f"{result['wall_seconds']:.1f} s ({result['converter_seconds']} s "
                  f"inside convert())", "")
    table.add_row("CPU time", f"{cpu:.1f} s ({cpu / result['wall_seconds']:.2f} cores busy)", "")
    table.add_row("throughput", f"{result['params_per_second'] / 1e6:.1f} M params/s end to end, "
                  f"{result['convert_params_per_second'] / 1e6:.1f} inside convert()", "")
    table.add_row(f"7B time ({'projected' if time_target['projected'] else 'measured'})",
                  f"{time_target['low']:.0f}-{time_target['value']:.0f} s (see JSON 'basis')"
                  if time_target["projected"] else f"{time_target['value']:.1f} s",
                  _verdict(time_target))
    table.add_row("peak RSS", f"{result['peak_rss_bytes'] / 1e9:.3f} GB", _verdict(rss_target))
    table.add_row("output", f"{result['output_bytes'] / 1e9:.3f} GB, "
                  f"{result['bits_per_weight']:.2f} bits/weight overall, "
                  f"{result['int4_bits_per_weight']:.2f} in INT4 tensors", "")
    return table


def _verdict(target: dict[str, Any]) -> str:
    colour, word = ("green", "PASS") if target["pass"] else ("red", "FAIL")
    return f"[{colour}]{word}[/] {target['limit']}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path,
                        help="checkpoint folder to convert (with --preset: to create, or reuse)")
    parser.add_argument("--preset", choices=sorted(synthetic.PRESETS),
                        help="create a synthetic checkpoint of this model in CHECKPOINT first")
    parser.add_argument("--layers", type=int, help="with --preset: override num_hidden_layers")
    parser.add_argument("--dtype", default="float16", choices=sorted(synthetic.SAFETENSORS_DTYPES),
                        help="with --preset: weight dtype")
    parser.add_argument("--shard-gb", type=float, default=4.0, help="with --preset: shard size")
    parser.add_argument("--seed", type=int, default=0, help="with --preset: random seed")
    parser.add_argument("--out", type=Path,
                        help="keep the .zse here (default: a temporary file, deleted afterwards)")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--no-clip-search", action="store_true",
                        help="pass --no-clip-search to the converter")
    parser.add_argument("--no-column-weights", action="store_true",
                        help="pass --no-column-weights to the converter")
    parser.add_argument("--drop-caches", action="store_true",
                        help="drop the page cache before converting (root only)")
    parser.add_argument("--json-out", type=Path, default=Path("bench_convert.json"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    folder = args.checkpoint.resolve()
    try:
        marker = ensure_checkpoint(folder, args)
    except synthetic.CheckpointError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        return 1
    if not (folder / "config.json").exists():
        console.print(f"[bold red]error:[/] {folder} has no config.json (pass --preset to create "
                      "a synthetic checkpoint there)", highlight=False)
        return 1
    hf_config = json.loads((folder / "config.json").read_text())
    measured = workload(hf_config, args)
    page_cache = drop_page_cache() if args.drop_caches else (
        "not dropped (not requested): the source may be read from memory")

    scratch = None if args.out else Path(tempfile.mkdtemp(prefix="bench_convert_",
                                                           dir=args.json_out.resolve().parent))
    out = args.out.resolve() if args.out else scratch / "model.zse"
    try:
        run = run_converter(converter_command(folder, out, args))
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)

    result = build_result(run, checkpoint_info(folder, hf_config), marker, page_cache,
                          str(out) if args.out else None, measured, reference_workload(args))
    args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.json_out}")
    console.print(result_table(result))
    return 0 if run.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
