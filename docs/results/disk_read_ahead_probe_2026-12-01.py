"""Probe (device run, 2026-12-01): how the device's disk reads a .zse's device window after a
dropped page cache, and whether reading ahead from the manifest on can shorten a cold start.

    python docs/results/disk_read_ahead_probe_2026-12-01.py FILE.zse OUT.json

Each case drops the page cache (root), then reads data-section bytes [window start, end) the
way it says and reports GB/s. No GPU: plain reads into host buffers, as the upload's readers
do before they copy.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from zse_runtime.zsefile import ZseFile, device_window_start  # noqa: E402


def drop() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def read_range(path, start, end, threads, chunk, direct=False, stop=None):
    """Interleaved chunks over `threads` readers, as the upload does; returns bytes read."""
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    chunks = range(start, end, chunk)
    done = [0] * threads

    def reader(first):
        fd = os.open(path, flags)
        buffer = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT needs
        view = memoryview(buffer)
        try:
            for offset in chunks[first::threads]:
                if stop is not None and stop.is_set():
                    return
                length = min(chunk, end - offset)
                if direct:
                    length = (length + 4095) // 4096 * 4096
                got = os.preadv(fd, [view[:length]], offset)
                done[first] += got
                if got <= 0:
                    return
        finally:
            view.release()
            buffer.close()
            os.close(fd)

    workers = [threading.Thread(target=reader, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(done)


def resident_fraction(path, start, end) -> float:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    page = 4096
    lo, hi = start // page * page, end
    fd = os.open(path, os.O_RDONLY)
    try:
        address = libc.mmap(None, hi - lo, mmap.PROT_READ, mmap.MAP_SHARED, fd, lo)
        pages = (hi - lo + page - 1) // page
        vector = (ctypes.c_ubyte * pages)()
        if libc.mincore(ctypes.c_void_p(address), hi - lo, vector) != 0:
            return -1.0
        libc.munmap(ctypes.c_void_p(address), hi - lo)
        return sum(v & 1 for v in vector) / pages
    finally:
        os.close(fd)


def main() -> int:
    path, out = sys.argv[1], Path(sys.argv[2])
    with ZseFile(path) as zse:
        start = zse.header.data_offset + device_window_start(zse)
        end = zse.header.data_offset + zse.header.data_length
    size = end - start
    result = {"file": path, "window_bytes": size, "cases": []}
    info = {}
    for name, command in (("df", "df -T " + path),
                          ("lsblk", "lsblk -o NAME,SIZE,ROTA,TYPE,MOUNTPOINT"),
                          ("queue", "grep -H . /sys/block/*/queue/{read_ahead_kb,max_sectors_kb,"
                                    "nr_requests,rotational} 2>/dev/null"),
                          ("nproc", "nproc"), ("mem", "free -g")):
        info[name] = subprocess.run(["bash", "-c", command], capture_output=True, text=True).stdout
    result["system"] = info

    def case(name, run):
        drop()
        started = time.perf_counter()
        extra = run() or {}
        seconds = time.perf_counter() - started
        row = {"case": name, "seconds": seconds, "gbps": size / seconds / 1e9, **extra}
        result["cases"].append(row)
        print(f"{name:58s} {seconds:6.3f} s {size / seconds / 1e9:6.2f} GB/s {extra}", flush=True)

    for threads, chunk in ((8, 16 << 20), (1, 8 << 20), (4, 8 << 20), (4, 32 << 20),
                           (16, 16 << 20), (32, 4 << 20)):
        case(f"buffered {threads} x {chunk >> 20} MiB",
             lambda t=threads, c=chunk: read_range(path, start, end, t, c) and None)
    for threads, chunk in ((8, 16 << 20), (32, 16 << 20)):
        case(f"O_DIRECT {threads} x {chunk >> 20} MiB",
             lambda t=threads, c=chunk: read_range(path, start, end, t, c, direct=True) and None)

    def fadvise_then_read():
        fd = os.open(path, os.O_RDONLY)
        t = time.perf_counter()
        os.posix_fadvise(fd, start, size, os.POSIX_FADV_WILLNEED)
        call = time.perf_counter() - t
        os.close(fd)
        time.sleep(0.5)
        resident = resident_fraction(path, start, end)
        read_range(path, start, end, 8, 16 << 20)
        return {"fadvise_call_s": call, "resident_after_call_and_0.5s": resident}

    case("fadvise WILLNEED (one call), 0.5 s, then buffered 8 x 16 MiB", fadvise_then_read)

    for lead, readers in ((0.6, 4), (0.6, 1), (0.6, 8)):
        def read_ahead_then_upload(lead=lead, readers=readers):
            stop = threading.Event()
            ahead = threading.Thread(target=read_range,
                                     args=(path, start, end, readers, 8 << 20, False, stop))
            ahead.start()
            time.sleep(lead)
            stop.set()
            resident = resident_fraction(path, start, end)
            t = time.perf_counter()
            read_range(path, start, end, 8, 16 << 20)
            ahead.join()
            return {"resident_at_upload": resident, "upload_s": time.perf_counter() - t}

        case(f"read ahead {readers} x 8 MiB for {lead} s, then buffered 8 x 16 MiB",
             read_ahead_then_upload)

    def idle_then_upload():
        time.sleep(0.6)
        t = time.perf_counter()
        read_range(path, start, end, 8, 16 << 20)
        return {"upload_s": time.perf_counter() - t}

    case("idle 0.6 s, then buffered 8 x 16 MiB", idle_then_upload)
    out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
