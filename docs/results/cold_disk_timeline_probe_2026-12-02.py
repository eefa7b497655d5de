"""Probe (device run, 2026-12-02, twentieth session): what the disk does during a cold `zse-run`
start. Each run drops the page cache (root), spawns zse-run as bench_coldstart does and samples,
every 5 ms until /health answers 200, /proc/diskstats (sectors read, time the disk was busy,
requests in flight) and /proc/<pid>/io (bytes each of zse-run's processes caused to be read from
storage). Prints, per 100 ms from spawn, the disk's MB/s and busy share, each process's MB/s and
the log's milestones; writes the samples and the summary as JSON.

    python docs/results/cold_disk_timeline_probe_2026-12-02.py MODEL.zse OUT.json [--runs 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import benchlib  # noqa: E402

SECTOR = 512


def disk_counters(device: str) -> tuple[int, int, int]:
    """(sectors read, ms spent doing I/O, requests in flight) of `device`."""
    for line in Path("/proc/diskstats").read_text().splitlines():
        fields = line.split()
        if fields[2] == device:
            return int(fields[5]), int(fields[12]), int(fields[11])
    raise RuntimeError(f"no {device} in /proc/diskstats")


def busiest_disk() -> str:
    """The whole disk (not a partition) with the most sectors read since boot."""
    best, name = -1, None
    for line in Path("/proc/diskstats").read_text().splitlines():
        fields = line.split()
        if fields[2].startswith(("loop", "ram", "dm-")) or fields[2][-1].isdigit() \
                and not fields[2].startswith("nvme"):
            continue
        if int(fields[5]) > best:
            best, name = int(fields[5]), fields[2]
    return name


def process_tree(pid: int) -> list[int]:
    found, stack = [], [pid]
    while stack:
        current = stack.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                stack += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return sorted(set(found))


def read_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def sample_run(model: Path, device: str, work: Path, backend: str) -> dict:
    samples: list[tuple] = []
    done = threading.Event()
    holder: dict = {}

    def sampler() -> None:
        start = time.perf_counter()
        while not done.is_set():
            now = time.perf_counter() - start
            sectors, busy_ms, in_flight = disk_counters(device)
            per_process = {}
            root = holder.get("pid")
            if root:
                for pid in process_tree(root):
                    value = read_bytes(pid)
                    if value is not None:
                        per_process[pid] = value
            samples.append((now, sectors, busy_ms, in_flight, per_process))
            time.sleep(0.005)

    dropped = benchlib.drop_page_cache()
    if dropped != "dropped":
        raise SystemExit(f"cannot drop the page cache: {dropped}")
    thread = threading.Thread(target=sampler, daemon=True)
    sampling_started = time.perf_counter()
    thread.start()
    # launch_server blocks until /health 200: find the pid from another thread
    watcher_stop = threading.Event()

    def watch() -> None:
        me = str(Path("/proc/self").resolve().name)
        while not watcher_stop.is_set() and "pid" not in holder:
            for task in Path(f"/proc/{me}/task").glob("*"):
                try:
                    kids = (task / "children").read_text().split()
                except OSError:
                    kids = []
                if kids:
                    holder["pid"] = int(kids[0])
                    return
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    server = benchlib.launch_server(model, benchlib.free_port(), "--max-model-len", "4096",
                                    "--max-num-seqs", "1", device=backend, log_dir=work)
    done.set()
    watcher_stop.set()
    thread.join()
    offset = server.spawned - sampling_started  # sample times are since sampling_started
    log = server.log_text()
    server.stop()
    events = []
    for line in log.splitlines()[:60]:
        stamp = benchlib.log_time(line)
        if stamp is not None:
            events.append((round(stamp - server.spawned_wall, 3), line[24:140]))
    timeline = [(round(t - offset, 4), s, b, f, p) for t, s, b, f, p in samples]
    return {"health_200_s": server.ready_s, "samples": timeline, "log": events,
            "pids": {"zse-run": holder.get("pid")}}


def summarise(run: dict, bin_s: float = 0.1) -> list[dict]:
    samples = [s for s in run["samples"] if s[0] >= 0]
    rows, first = [], samples[0]
    edges = [i * bin_s for i in range(int(run["health_200_s"] / bin_s) + 2)]
    index = 0
    previous = first
    for lo in edges:
        hi = lo + bin_s
        while index < len(samples) and samples[index][0] < hi:
            index += 1
        last = samples[min(index, len(samples)) - 1]
        seconds = max(last[0] - previous[0], 1e-9)
        pids = {}
        for pid, value in last[4].items():
            before = previous[4].get(pid, 0)
            pids[pid] = round((value - before) / 1e6 / seconds)
        rows.append({"from_s": round(lo, 2), "disk_mb_s": round((last[1] - previous[1]) * SECTOR
                                                                / 1e6 / seconds),
                     "busy": round((last[2] - previous[2]) / 1000 / seconds, 2),
                     "in_flight": last[3], "process_mb_s": pids})
        previous = last
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/zse_cold_probe"))
    parser.add_argument("--device", default="cuda", help="zse-run's --device")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    device = busiest_disk()
    benchlib.launch_server(args.model, benchlib.free_port(), "--max-model-len", "4096",
                           "--max-num-seqs", "1", device=args.device,
                           log_dir=args.work).stop()  # priming run
    runs = []
    for i in range(args.runs):
        run = sample_run(args.model, device, args.work, args.device)
        run["bins"] = summarise(run)
        total = sum(r["disk_mb_s"] * 0.1 for r in run["bins"])
        run["disk_mb_before_health"] = round(total)
        runs.append(run)
        print(f"run {i + 1}: /health 200 at {run['health_200_s']:.3f} s, {total:.0f} MB read "
              f"from {device} by then")
        root = run["pids"]["zse-run"]
        for row in run["bins"]:
            http = row["process_mb_s"].get(root, 0)
            engine = sum(v for pid, v in row["process_mb_s"].items() if pid != root)
            print(f"{row['from_s']:4.1f} {row['disk_mb_s']:5d} MB/s busy {row['busy']:4.2f} "
                  f"q {row['in_flight']:2d} http {http:4d} engine {engine:5d}")
        for stamp, text in run["log"]:
            print(f"  log {stamp:6.3f} s  {text[:90]}")
    args.out.write_text(json.dumps({"device": device, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
