"""Stream a remote `.zse` data section: parallel ranged reads, in-order verification.

Fetcher threads read chunks of the data section from a ByteSource into a ring of staging
buffers (pinned on a GPU). Chunk i always lands in ring slot i % len(ring), and a fetcher may
start chunk i only once chunk i - len(ring) has been consumed, so the ring bounds memory and can
never deadlock. Chunks complete out of order; ONE consumer takes them in file order, updates the
running xxh64 of every tensor the chunk touches (a chunk may hold several tensors, or part of
one), hands the bytes to a sink (a device copy, or host memory in tests) and, optionally,
writes them to a mirror file. A checksum mismatch or a failed fetch aborts the whole load and
deletes the partial mirror: a caller never gets a half-loaded model.

The mirror is the `--cache-dir` copy: written to a temporary name beside its final name,
fsync'd and renamed only when every tensor has verified, so concurrent starts never see a
partial file. Its name is derived from the URL and the source's validator (ETag, commit), so a
changed object gets a new name and is fetched again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import xxhash

from .zsefile import ZseFile, ZseFormatError

log = logging.getLogger("zse")

CHUNK_BYTES = 8 << 20  # one ranged GET; large enough to amortise a request, small enough to spread
FETCHERS = 8  # concurrent ranged reads
RING_SLOTS_PER_FETCHER = 2  # staging memory = FETCHERS * 2 * CHUNK_BYTES (128 MiB)


class Sink(Protocol):
    """Where streamed bytes go, in file order, at their offset in the data section. `copy` may
    be asynchronous: the pipeline calls `issued(slot)` after copying out of a ring slot and
    `wait(slot)` (from a fetcher thread) before refilling it."""

    def staging(self, count: int, nbytes: int) -> list[np.ndarray]: ...
    def copy(self, device_offset: int, host_view: np.ndarray) -> None: ...
    def issued(self, slot: int) -> None: ...
    def wait(self, slot: int) -> None: ...
    def finish(self) -> None: ...


class HostSink:
    """The data section in host memory: the device side of the pipeline, minus the device."""

    def __init__(self, nbytes: int):
        self.memory = np.zeros(nbytes, np.uint8)
        self.copies: list[tuple[int, int]] = []  # (offset, nbytes) in the order they were issued

    def staging(self, count: int, nbytes: int) -> list[np.ndarray]:
        return [np.empty(nbytes, np.uint8) for _ in range(count)]

    def copy(self, device_offset: int, host_view: np.ndarray) -> None:
        self.memory[device_offset:device_offset + host_view.size] = host_view
        self.copies.append((device_offset, host_view.size))

    def issued(self, slot: int) -> None:
        pass

    def wait(self, slot: int) -> None:
        pass

    def finish(self) -> None:
        pass


@dataclass
class StreamStats:
    bytes: int = 0
    chunks: int = 0
    wall: float = 0.0  # first request to last byte verified, copied and written
    download: float = 0.0  # first fetch started to last fetch finished
    consume: float = 0.0  # consumer busy: checksums, device copies, mirror writes
    waiting: float = 0.0  # consumer idle, waiting for the next chunk in order
    retries: int = 0

    def report(self, startup, label: str | None = None) -> None:
        """Record in engine.startup: `label` (the wall time) on the critical path, when given,
        and the download and verify+copy times that ran beside each other, as overlapped."""
        if label:
            startup.stages[label] = self.wall
        startup.stages["download (overlapped)"] = self.download
        startup.stages["verify+copy (overlapped)"] = self.consume

    def __str__(self) -> str:
        rate = self.bytes / self.wall / 2**20 if self.wall else 0.0
        return (f"{self.bytes / 2**20:.1f} MiB in {self.wall:.2f} s ({rate:.0f} MiB/s): download "
                f"{self.download:.2f} s, verify+copy {self.consume:.2f} s, consumer waited "
                f"{self.waiting:.2f} s, {self.retries} retries")


class _TensorChecker:
    """Running xxh64 of each tensor, fed with consecutive spans of the data section."""

    def __init__(self, zse: ZseFile):
        self.path = zse.path
        self.tensors = sorted(zse.tensors.values(), key=lambda t: t.offset)
        self.index = 0  # first tensor not yet complete
        self.hasher = xxhash.xxh64()

    def feed(self, start: int, view: np.ndarray) -> None:
        """`view` holds data bytes [start, start + len(view)); spans arrive in order."""
        end = start + view.size
        while self.index < len(self.tensors):
            info = self.tensors[self.index]
            first, last = max(info.offset, start), min(info.offset + info.nbytes, end)
            if first >= end:
                return
            if first < last:
                self.hasher.update(view[first - start:last - start])
            if last < info.offset + info.nbytes:
                return  # the tensor continues in the next chunk
            actual = self.hasher.hexdigest()
            if actual != info.xxh64:
                raise ZseFormatError(self.path, f"checksum mismatch in the streamed bytes: the "
                                     f"manifest says {info.xxh64}, the data gives {actual} (corrupt "
                                     "or replaced object)", tensor=info.name, offset=info.offset)
            self.hasher.reset()
            self.index += 1

    def finish(self) -> None:
        if self.index != len(self.tensors):
            raise ZseFormatError(self.path, "the stream ended before every tensor was verified",
                                 tensor=self.tensors[self.index].name)


class MirrorFile:
    """A verified local copy being written: temp name, then fsync + rename on commit()."""

    def __init__(self, final: Path, head: bytes, size: int):
        self.final = Path(final)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.temp = self.final.with_name(f"{self.final.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        self.fd = os.open(self.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.ftruncate(self.fd, size)
            self.write(0, head)
        except BaseException:
            self.discard()
            raise

    def write(self, offset: int, data) -> None:
        view = memoryview(data).cast("B")
        while view.nbytes:
            written = os.pwrite(self.fd, view, offset)
            view, offset = view[written:], offset + written

    def commit(self, durable: bool = True) -> Path:
        """Publish the file under its final name; `durable` fsyncs it first (a cache copy must
        survive a crash; a temporary copy need not, and skipping it saves seconds)."""
        if durable:
            os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        os.replace(self.temp, self.final)
        if durable:
            directory = os.open(self.final.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        return self.final

    def discard(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.temp.unlink(missing_ok=True)


def cache_path(cache_dir: str | os.PathLike, source) -> Path | None:
    """`cache_dir/<url hash>-<validator hash>-<file name>`, or None when the source has no
    validator (nothing would tell a stale copy from a fresh one)."""
    if not source.validator:
        return None
    url = source.describe()
    name = re.sub(r"[^A-Za-z0-9._-]", "_", url.rstrip("/").rpartition("/")[2])[-80:] or "model.zse"
    url_key = hashlib.sha256(url.encode()).hexdigest()[:16]
    version_key = hashlib.sha256(source.validator.encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{url_key}-{version_key}-{name}"


def remove_stale_copies(final: Path) -> list[Path]:
    """Delete other versions of the same URL (same url hash, other validator) beside `final`.
    A process still serving one keeps its mapping; the name just goes away."""
    url_key = final.name.split("-", 1)[0]
    stale = [p for p in final.parent.glob(f"{url_key}-*") if p != final and not p.name.endswith(".tmp")]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def stream_data_section(zse: ZseFile, sink: Sink | None = None, mirror: MirrorFile | None = None,
                        fetchers: int | None = None, chunk_bytes: int | None = None,
                        ring_slots: int | None = None) -> StreamStats:
    """Fetch zse's data section from zse.source in parallel and consume it in order: verify
    every tensor's xxh64, copy to `sink`, write to `mirror`. Raises on the first failure, after
    every fetcher has stopped and every issued copy has finished. Defaults: FETCHERS,
    CHUNK_BYTES and RING_SLOTS_PER_FETCHER, read at call time."""
    source, header = zse.source, zse.header
    fetchers, chunk_bytes = fetchers or FETCHERS, chunk_bytes or CHUNK_BYTES
    length = header.data_length
    chunks = [(start, min(chunk_bytes, length - start)) for start in range(0, length, chunk_bytes)]
    slots = min(ring_slots or fetchers * RING_SLOTS_PER_FETCHER, max(len(chunks), 1))
    fetchers = max(1, min(fetchers, slots))
    ring: list[np.ndarray] = []
    checker = _TensorChecker(zse)
    stats = StreamStats(bytes=length, chunks=len(chunks))
    cond = threading.Condition()
    state = {"next": 0, "consumed": 0, "failure": None}
    ready: set[int] = set()
    fetch_times: list[tuple[float, float]] = []
    started = time.perf_counter()

    def fetcher() -> None:
        while True:
            with cond:
                if state["failure"] is not None or state["next"] >= len(chunks):
                    return
                index = state["next"]
                state["next"] += 1
                while index - state["consumed"] >= slots and state["failure"] is None:
                    cond.wait()
                if state["failure"] is not None:
                    return
            slot = index % slots
            start, size = chunks[index]
            try:
                if sink:
                    sink.wait(slot)  # the previous copy out of this slot has finished
                began = time.perf_counter()
                source.read_into(header.data_offset + start, memoryview(ring[slot][:size]))
                fetch_times.append((began, time.perf_counter()))
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                with cond:
                    if state["failure"] is None:
                        state["failure"] = exc
                    cond.notify_all()
                source.aborted.set()
                return
            with cond:
                ready.add(index)
                cond.notify_all()

    pool = ThreadPoolExecutor(fetchers, thread_name_prefix="zse-fetch")
    failed = False
    try:
        ring[:] = sink.staging(slots, chunk_bytes) if sink else [
            np.empty(chunk_bytes, np.uint8) for _ in range(slots)]
        for _ in range(fetchers):
            pool.submit(fetcher)
        for index, (start, size) in enumerate(chunks):
            waited = time.perf_counter()
            with cond:
                while index not in ready and state["failure"] is None:
                    cond.wait()
                if state["failure"] is not None:
                    raise state["failure"]
                ready.discard(index)
            busy = time.perf_counter()
            stats.waiting += busy - waited
            slot = index % slots
            view = ring[slot][:size]
            checker.feed(start, view)
            if sink:
                sink.copy(start, view)
                sink.issued(slot)
            if mirror:
                mirror.write(header.data_offset + start, view)
            stats.consume += time.perf_counter() - busy
            with cond:
                state["consumed"] = index + 1
                cond.notify_all()
        checker.finish()
        if sink:
            sink.finish()
    except BaseException:
        failed = True
        with cond:
            if state["failure"] is None:
                state["failure"] = RuntimeError("the consumer failed")
            cond.notify_all()
        source.aborted.set()
        raise
    finally:
        pool.shutdown(wait=True)  # no fetcher may still write into the ring after this returns
        if failed:
            if sink:
                sink.finish()
            if mirror:
                mirror.discard()
    stats.wall = time.perf_counter() - started
    if fetch_times:
        stats.download = max(e for _, e in fetch_times) - min(s for s, _ in fetch_times)
    stats.retries = source.retries
    return stats


def download_to_file(zse: ZseFile, final: Path, durable: bool = True, **options) -> StreamStats:
    """Stream zse's bytes, verified, into `final` (atomically). Returns the stream's stats."""
    mirror = MirrorFile(final, zse.head, zse.source.size)
    stats = stream_data_section(zse, None, mirror, **options)  # discards the mirror on failure
    mirror.commit(durable)
    return stats
