"""Streaming, atomic `.zse` writer.

The whole layout (every tensor's dtype, shape, layout and so its size and offset) is known
before the first byte of data, so the header and manifest are written first with placeholder
checksums of the same width, tensors are streamed in file order, and the manifest is rewritten
in place at the end. Output goes to a hidden temp file beside the target that is renamed only
after everything is on disk; any failure (exception, Ctrl-C, full disk) removes it.
"""

from __future__ import annotations

import enum
import errno
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from zse_runtime.zsefile import (FORMAT_VERSION_MAJOR, FORMAT_VERSION_MINOR,
                                 HEADER_SIZE, MAX_MANIFEST_BYTES, Header, align_up,
                                 expected_nbytes)

_PLACEHOLDER_DIGEST = "0" * 16  # same width as a real xxh64 hex digest


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]
    layout: str
    group_size: int | None = None

    @property
    def nbytes(self) -> int:
        return expected_nbytes(self.dtype, list(self.shape), self.layout, self.group_size)


class WriterState(enum.Enum):
    NEW = "new"
    WRITING = "writing"  # header and manifest written, tensors streaming
    FINISHED = "finished"
    ABORTED = "aborted"


class ZseWriter:
    """Usage: `with ZseWriter(out, manifest, specs) as w: w.write(name, blob) ...; w.finish()`.

    Leaving the `with` block without finish() (an exception included) aborts and deletes the
    temp file.
    """

    def __init__(self, out: str | os.PathLike, manifest: dict[str, Any], specs: list[TensorSpec]):
        self.out = Path(out)
        names = [s.name for s in specs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate tensor names: {duplicates}")
        self.state = WriterState.NEW
        self.specs = specs
        self.manifest = dict(manifest)
        offset = 0
        self.entries: list[dict[str, Any]] = []
        for spec in specs:
            entry = {"name": spec.name, "dtype": spec.dtype, "shape": list(spec.shape),
                     "layout": spec.layout, "offset": offset, "nbytes": spec.nbytes,
                     "xxh64": _PLACEHOLDER_DIGEST}
            if spec.group_size is not None:
                entry["group_size"] = spec.group_size
            self.entries.append(entry)
            offset = align_up(offset + spec.nbytes)
        self.data_length = offset
        self.manifest["tensors"] = self.entries
        manifest_len = len(self._manifest_bytes())
        if manifest_len > MAX_MANIFEST_BYTES:
            raise ValueError(f"manifest is {manifest_len} bytes, over the {MAX_MANIFEST_BYTES} limit")
        self.data_offset = align_up(HEADER_SIZE + manifest_len)
        self.file_size = self.data_offset + self.data_length
        self._next = 0  # index of the next tensor to write
        self._fh = None
        self.tmp_path = self.out.with_name(f".{self.out.name}.{secrets.token_hex(4)}.tmp")

    def _manifest_bytes(self) -> bytes:
        return json.dumps(self.manifest, ensure_ascii=False, separators=(",", ":"),
                          allow_nan=False).encode("utf-8")

    def _expect(self, state: WriterState) -> None:
        if self.state is not state:
            raise RuntimeError(f"Expected writer state {state.value}, got {self.state.value}")

    def __enter__(self) -> "ZseWriter":
        self._expect(WriterState.NEW)
        if not self.out.parent.is_dir():
            raise FileNotFoundError(f"output folder {self.out.parent} does not exist")
        self._fh = open(self.tmp_path, "xb")
        try:
            self._reserve_space()
            self._write_preamble()
        except BaseException:
            self._abort()
            raise
        self.state = WriterState.WRITING
        return self

    def _reserve_space(self) -> None:
        # Fail on a full disk now, not after minutes of quantization.
        try:
            os.posix_fallocate(self._fh.fileno(), 0, self.file_size)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise OSError(errno.ENOSPC, f"not enough disk space for {self.out} "
                              f"({self.file_size / 1e9:.2f} GB needed)") from None
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
        except AttributeError:  # platforms without posix_fallocate
            pass

    def _write_preamble(self) -> None:
        raw = self._manifest_bytes()
        header = Header(FORMAT_VERSION_MAJOR, FORMAT_VERSION_MINOR, HEADER_SIZE, len(raw),
                        xxhash.xxh64_intdigest(raw), self.data_offset, self.data_length)
        self._fh.seek(0)
        self._fh.write(header.pack())
        self._fh.write(raw)
        self._fh.write(b"\0" * (self.data_offset - HEADER_SIZE - len(raw)))

    def write(self, name: str, blob: np.ndarray | bytes) -> None:
        """Write the next tensor's bytes (exactly the planned size, in the planned order)."""
        self._expect(WriterState.WRITING)
        if self._next >= len(self.entries):
            raise RuntimeError(f"tensor '{name}' was not planned; all tensors are written")
        entry = self.entries[self._next]
        if name != entry["name"]:
            raise RuntimeError(f"expected tensor '{entry['name']}' next, got '{name}'")
        data = memoryview(blob).cast("B")
        if data.nbytes != entry["nbytes"]:
            raise ValueError(f"tensor '{name}': got {data.nbytes} bytes, planned {entry['nbytes']}")
        entry["xxh64"] = xxhash.xxh64_hexdigest(data)
        self._fh.seek(self.data_offset + entry["offset"])
        self._fh.write(data)
        self._next += 1

    def finish(self) -> Path:
        """Patch checksums into the manifest, flush to disk and move the file into place."""
        self._expect(WriterState.WRITING)
        if self._next != len(self.entries):
            missing = [e["name"] for e in self.entries[self._next:]]
            raise RuntimeError(f"{len(missing)} planned tensors were not written: {missing[:5]}")
        planned_len = self.data_offset  # the manifest must not change size when patched
        self._write_preamble()
        assert self._fh.tell() == planned_len, "manifest changed size while patching checksums"
        self._fh.truncate(self.file_size)  # the last tensor's padding
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self.tmp_path, self.out)
        self.state = WriterState.FINISHED
        return self.out

    def _abort(self) -> None:
        if self._fh is not None and not self._fh.closed:
            self._fh.close()
        self.tmp_path.unlink(missing_ok=True)
        self.state = WriterState.ABORTED

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.state is not WriterState.FINISHED:
            self._abort()

