"""Time to ready from object storage against from a local file.

    python scripts/bench_remote_start.py --device cpu --out bench-out
    python scripts/bench_remote_start.py --device cuda --runs 3 --out bench-out
    python scripts/bench_remote_start.py --device cuda --zse model.zse --chunk-mb 64 --out bench-out

Builds a synthetic .zse of a real model's shape (default qwen2.5-0.5b, ~0.5 GB) unless --zse is
given, starts a local S3 server (moto, on loopback), uploads the file, then opens it in fresh
processes: from the local path, from s3:// (streamed: parallel ranged reads, verified, copied as
they arrive), and from s3:// with a warm --cache-dir (one metadata request, then the local
copy). Each run reports Engine.open's wall time and its start-up stages; for the s3 runs the
breakdown shows the download and the verify+copy work that overlapped it. Every run then
decodes 8 greedy tokens, and the script fails unless all starts agree (a check that the
streamed upload is byte-exact on the device). Prints a table last and writes every run to
OUT/bench_remote_start.json. Needs the `bench` extra (moto[server], s3fs); a GPU run also
needs cuda-bindings and the prebuilt kernels, as zse-run does.

moto answers every ranged GET by materialising the whole object and slicing it, so each
request costs O(object size) on the server: with 8 MiB ranges a 700 MB object downloads at
~20 MB/s from moto, and a 7B file would take tens of minutes. The "whole-object GET" line
measures moto itself (one request); `--chunk-mb 64` makes fewer, larger requests. Real S3
serves ranges in O(range). For a view of the pipeline without that server cost, the
"http:// ranged" row streams the same file from a minimal Range-capable HTTP server on loopback
(this script's RangeServer, O(range) per request) through the https:// code path.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BUCKET = "zse-bench"


class RangeServer:
    """Serves one file over HTTP/1.1 with single-range GETs (206), threaded, on loopback."""

    def __init__(self, path: Path):
        import http.server
        import threading

        blob_path, size = path, path.stat().st_size

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802 - http.server's naming
                first, _, last = self.headers["Range"].removeprefix("bytes=").partition("-")
                first, last = int(first), min(int(last), size - 1)
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
                self.send_header("Content-Length", str(last - first + 1))
                self.send_header("ETag", f'"{size}-{blob_path.stat().st_mtime_ns}"')
                self.end_headers()
                with open(blob_path, "rb") as fh:
                    self.wfile.write(os.pread(fh.fileno(), last - first + 1, first))

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/{path.name}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()


def child(location: str, device: str, cache_dir: str | None, chunk_mb: int) -> None:
    """One measurement, in a fresh process: Engine.open, then its stages as JSON on stdout."""
    started = time.perf_counter()
    from zse_runtime import streaming
    from zse_runtime.engine import Engine

    streaming.CHUNK_BYTES = chunk_mb << 20
    imported = time.perf_counter()
    engine = Engine.open(location, device=device, max_model_len=1024, cache_dir=cache_dir)
    ready = time.perf_counter()
    # greedy tokens after ready: equal across starts only if every weight byte arrived intact
    tokens = list(engine.generate(list(range(1, 17)), 8, ignore_eos=True))
    print(json.dumps({"imports_s": imported - started, "open_s": ready - imported,
                      "device": engine.device, "stages": engine.startup.stages,
                      "tokens": tokens}))


def measure(location: str, device: str, env: dict, chunk_mb: int,
            cache_dir: str | None = None) -> dict:
    command = [sys.executable, __file__, "--child", location, "--device", device,
               "--chunk-mb", str(chunk_mb)]
    if cache_dir:
        command += ["--cache-dir", cache_dir]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env},
                            cwd=REPO, timeout=1800)
    if result.returncode:
        raise SystemExit(f"run failed ({location}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def summarise(runs: list[dict]) -> dict:
    stage = lambda name: [r["stages"].get(name) for r in runs if name in r["stages"]]
    median = lambda values: statistics.median(values) if values else None
    weights = stage("download+verify") or stage("upload") or stage("weights+kv_cache")
    return {"open_s": median([r["open_s"] for r in runs]),
            "open_min_s": min(r["open_s"] for r in runs),
            "manifest_s": median([next(v for k, v in r["stages"].items() if k.startswith("manifest"))
                                  for r in runs]),
            "weights_s": median(weights),
            "download_s": median(stage("download (overlapped)")),
            "verify_copy_s": median(stage("verify+copy (overlapped)"))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--zse", type=Path, help="model to use (default: build a synthetic one)")
    parser.add_argument("--preset", default="qwen2.5-0.5b", help="synthetic model shape")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--chunk-mb", type=int, default=8, help="bytes per ranged GET (MiB)")
    parser.add_argument("--out", type=Path, default=Path("bench-remote-start"))
    args = parser.parse_args()
    if args.child:
        child(args.child, args.device, args.cache_dir, args.chunk_mb)
        return 0

    from tests.s3_server import MotoServer

    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="zse-bench-"))
    model = args.zse
    if model is None:
        from scripts.make_synthetic_zse import PRESETS, write_random_zse

        model = work / f"{args.preset}.zse"
        started = time.perf_counter()
        write_random_zse(model, dict(PRESETS[args.preset]))
        print(f"built {model} ({model.stat().st_size / 2**20:.0f} MiB) in "
              f"{time.perf_counter() - started:.1f} s", flush=True)
    size = model.stat().st_size
    server = MotoServer()
    range_server = RangeServer(model)
    try:
        started = time.perf_counter()
        client = server.client()
        client.create_bucket(Bucket=BUCKET)
        client.upload_file(str(model), BUCKET, model.name)
        print(f"uploaded to {server.endpoint} in {time.perf_counter() - started:.1f} s", flush=True)
        url = f"s3://{BUCKET}/{model.name}"
        cache = work / "cache"
        started = time.perf_counter()
        whole_get = len(client.get_object(Bucket=BUCKET, Key=model.name)["Body"].read())
        whole_get_s = time.perf_counter() - started
        assert whole_get == size
        measure(url, args.device, server.env, args.chunk_mb, str(cache))  # fills the cache
        measure(str(model), args.device, {}, args.chunk_mb)  # warms the page and numba caches
        modes = {"local file": (str(model), None), "s3:// streamed": (url, None),
                 "s3:// cache hit": (url, str(cache)), "http:// ranged": (range_server.url, None)}
        runs: dict[str, list[dict]] = {mode: [] for mode in modes}
        for number in range(args.runs):
            for mode, (location, cache_dir) in modes.items():
                runs[mode].append(measure(location, args.device, server.env, args.chunk_mb,
                                          cache_dir))
                print(f"run {number + 1}/{args.runs} {mode}: {runs[mode][-1]['open_s']:.2f} s",
                      flush=True)
    finally:
        server.stop()
        range_server.stop()
        shutil.rmtree(work, ignore_errors=True)
    summary = {mode: summarise(r) for mode, r in runs.items()}
    outputs = {json.dumps(run["tokens"]) for mode_runs in runs.values() for run in mode_runs}
    report = {"model": str(args.zse or f"synthetic {args.preset}"), "bytes": size, "device": runs["local file"][0]["device"],
              "machine": f"{platform.node()} {platform.processor() or platform.machine()} "
                         f"{os.cpu_count()} cores",
              "chunk_mb": args.chunk_mb, "whole_object_get_s": whole_get_s,
              "identical_outputs": len(outputs) == 1,
              "runs": runs, "summary": summary}
    (args.out / "bench_remote_start.json").write_text(json.dumps(report, indent=2))

    fmt = lambda v: "-" if v is None else f"{v:6.2f}"
    print(f"\n{model.name}: {size / 2**20:.0f} MiB on {report['device']}, {args.runs} runs each "
          f"(median seconds; S3 = moto on loopback, {args.chunk_mb} MiB ranges); moto's "
          f"whole-object GET alone: {whole_get_s:.2f} s")
    print(f"{'start from':<18}{'Engine.open':>12}{'(min)':>8}{'manifest':>10}{'weights':>9}"
          f"{'download':>10}{'verify+copy':>13}{'overlap':>9}")
    for mode, s in summary.items():
        overlap = None
        if s["download_s"] is not None:  # work that ran beside the download instead of after it
            overlap = s["download_s"] + s["verify_copy_s"] - s["weights_s"]
        print(f"{mode:<18}{fmt(s['open_s']):>12}{fmt(s['open_min_s']):>8}{fmt(s['manifest_s']):>10}"
              f"{fmt(s['weights_s']):>9}{fmt(s['download_s']):>10}{fmt(s['verify_copy_s']):>13}"
              f"{fmt(overlap):>9}")
    print("weights: download+verify (cpu) or upload (cuda) for remote starts; download and "
          "verify+copy ran concurrently within it; overlap = download + verify+copy - weights")
    print(f"greedy tokens after ready, every start: "
          f"{'identical' if len(outputs) == 1 else 'DIFFERENT: ' + ' / '.join(sorted(outputs))}")
    return 0 if len(outputs) == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
