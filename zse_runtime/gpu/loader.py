"""File -> one device allocation: the `.zse` data section is copied byte for byte.

Reader threads each own two pinned staging buffers and a stream: a thread reads chunk i into
one buffer while the copy engine moves chunk i - 1 out of the other, so disk (or page cache)
reads and PCIe transfers overlap. Tensor pointers are then base + the manifest offset.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

from . import driver

CHUNK_BYTES = 32 << 20
READERS = 4


def upload_data_section(path: str | os.PathLike, data_offset: int, data_length: int,
                        device_pointer: int, context: driver.Context, readers: int = READERS,
                        chunk_bytes: int = CHUNK_BYTES) -> None:
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
