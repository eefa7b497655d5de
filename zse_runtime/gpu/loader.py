"""File or URL -> one device allocation: the `.zse` data section is copied byte for byte, all
but the embedding table, which stays in host memory (`zsefile.device_window_start`).

Local files: reader threads each own two pinned staging buffers and a stream: a thread reads
chunk i into one buffer while the copy engine moves chunk i - 1 out of the other, so disk (or
page cache) reads and PCIe transfers overlap. No checksums: the file is local (`zse-convert
verify` checks it).

Remote sources: `streaming.stream_data_section` fetches ranges in parallel into a ring of
pinned buffers and verifies every tensor in file order; `DeviceSink` issues the copies as the
chunks arrive. Tensor pointers are then base + the manifest offset.
"""

from __future__ import annotations

import mmap
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

from ..streaming import MirrorFile, stream_data_section
from ..zsefile import EMBED, ZseFile
from . import driver

# H200, warm page cache, 3.76 GB (2026-11-30): 8 readers of 16 MiB chunks upload in 0.29 s in
# isolation against 0.37 s for 4 of 32 MiB; inside zse-run (beside the HTTP stack's imports)
# engine start-up took 0.70 s against 0.76-0.79 s
CHUNK_BYTES = 16 << 20
READERS = 8


def upload_data_section(path: str | os.PathLike, data_offset: int, data_length: int,
                        device_pointer: int, context: driver.Context,
                        reading: Callable[[int, int], None] | None = None) -> None:
    """File bytes [data_offset, data_offset + data_length) to device_pointer. `reading` is
    called with each chunk's file bytes [start, end) before they are read."""
    readers, chunk_bytes = READERS, CHUNK_BYTES
    chunks = [(start, min(chunk_bytes, data_length - start))
              for start in range(0, data_length, chunk_bytes)]
    fd = os.open(path, os.O_RDONLY)
    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, data_offset, data_length, os.POSIX_FADV_SEQUENTIAL)
        failure: list[BaseException] = []
        lock = threading.Lock()

        def reader(index: int) -> None:
            context.make_current()
            stream = driver.Stream()
            buffers = [driver.PinnedBuffer(chunk_bytes) for _ in range(2)]
            events = [driver.Event() for _ in range(2)]
            in_flight = [False, False]
            try:
                for turn, (start, length) in enumerate(chunks[index::readers]):
                    slot = turn % 2
                    if in_flight[slot]:
                        events[slot].synchronize()  # the copy out of this buffer is done
                    view = memoryview(buffers[slot].array)[:length]
                    offset = data_offset + start
                    if reading is not None:
                        reading(offset, offset + length)
                    while view.nbytes:
                        got = os.preadv(fd, [view], offset)
                        if got == 0:
                            raise OSError(f"{path}: unexpected end of file at byte {offset}")
                        view, offset = view[got:], offset + got
                    stream.copy_to_device(device_pointer + start, buffers[slot].pointer, length)
                    events[slot].record(stream)
                    in_flight[slot] = True
                stream.synchronize()
            except BaseException as exc:  # reported once, by the caller
                with lock:
                    failure.append(exc)
            finally:
                stream.synchronize()
                for buffer in buffers:
                    buffer.close()

        with ThreadPoolExecutor(readers) as pool:
            list(pool.map(reader, range(readers)))
        if failure:
            raise failure[0]
    finally:
        os.close(fd)


class DeviceSink:
    """The streaming pipeline's device side: a ring of pinned buffers and one copy stream.
    Copies run in issue order on the stream; an event per ring slot says when it is free.
    Data-section bytes from `window_start` on go to the device; the embedding's bytes (all
    before it, as `device_window_start` chooses it) are copied into host memory (`embedding`)."""

    def __init__(self, device_pointer: int, context: driver.Context, window_start: int,
                 embedding: tuple[int, int]):
        self.device_pointer, self.context, self.window_start = device_pointer, context, window_start
        self.embedding_offset = embedding[0]
        # page-aligned, as a local file's mapping is: the GPU backend registers it in place
        pages = np.empty(embedding[1] + mmap.PAGESIZE, np.uint8)
        first = -pages.ctypes.data % mmap.PAGESIZE
        self.embedding = pages[first:first + embedding[1]]
        self.stream = driver.Stream()
        self.buffers: list[driver.PinnedBuffer] = []
        self.events: list[driver.Event] = []
        self.recorded: list[bool] = []
        self._threads = threading.local()

    def staging(self, count: int, nbytes: int) -> list[np.ndarray]:
        self.buffers = [driver.PinnedBuffer(nbytes) for _ in range(count)]
        self.events = [driver.Event() for _ in range(count)]
        self.recorded = [False] * count
        return [buffer.array for buffer in self.buffers]

    def copy(self, offset: int, host_view: np.ndarray) -> None:
        """Bytes [offset, offset + size) of the data section: the part inside the device window
        to the device (asynchronously), the part inside the embedding to host memory."""
        end = offset + host_view.size
        first = max(offset, self.window_start)
        if first < end:
            self.stream.copy_to_device(self.device_pointer + first - self.window_start,
                                       host_view[first - offset:].ctypes.data, end - first)
        lo = max(offset, self.embedding_offset)
        hi = min(end, self.embedding_offset + self.embedding.size)
        if lo < hi:
            self.embedding[lo - self.embedding_offset:hi - self.embedding_offset] = \
                host_view[lo - offset:hi - offset]

    def issued(self, slot: int) -> None:
        self.events[slot].record(self.stream)
        self.recorded[slot] = True

    def wait(self, slot: int) -> None:
        if not getattr(self._threads, "current", False):  # fetcher threads: once each
            self.context.make_current()
            self._threads.current = True
        if self.recorded[slot]:
            self.events[slot].synchronize()

    def finish(self) -> None:
        self.stream.synchronize()

    def close(self) -> None:
        self.stream.synchronize()
        for buffer in self.buffers:
            buffer.close()
        self.buffers = []


def upload_weights(zse: ZseFile, device_pointer: int, window_start: int,
                   context: driver.Context, startup=None) -> np.ndarray:
    """The backend's one entry point: data-section bytes [window_start, end) to the device, and
    the embedding's bytes returned as a host uint8 array. A local file takes the unverified
    fast path above and its embedding is the memory map's own (read on demand, from the page
    cache); a remote source streams with verification (and writes zse.mirror, the --cache-dir
    copy, when set) and its embedding is copied out of the stream. Remote loads add their
    overlapped download and verify+copy times to `startup`; the caller's own stage ("upload")
    is then download+upload."""
    embedding = zse.tensors[EMBED]
    if zse.source is None:
        # `starter.read_ahead` keeps reading until the upload's readers reach what it has not
        # read yet: they go through what it read (in the page cache) while the disk stays busy
        upload_data_section(zse.path, zse.header.data_offset + window_start,
                            zse.header.data_length - window_start, device_pointer, context,
                            reading=zse.stop_prefetching_overtaken)
        return zse.raw(EMBED)
    sink = DeviceSink(device_pointer, context, window_start, (embedding.offset, embedding.nbytes))
    mirror = MirrorFile(zse.mirror, zse.head, zse.source.size) if zse.mirror else None
    try:
        stats = stream_data_section(zse, sink, mirror)
    finally:
        sink.close()
    if mirror:
        mirror.commit()
    if startup is not None:  # the backend's "upload" stage is the wall time
        stats.report(startup)
    return sink.embedding
