"""Where a checkpoint comes from: a local folder or a Hub repo id, resolved to files on disk.

Also reads safetensors shards without loading them: each tensor is located by parsing the
shard header (validated against the file size), and rows are read on demand with `pread`, so
peak memory is one chunk of one tensor whatever the model size. (The safetensors library's numpy
backend cannot return bfloat16, the dtype most checkpoints ship in.)
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numba
import numpy as np

_FP16_BITS_TO_FP32 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(
    np.float32)


@numba.njit(parallel=True, cache=True, nogil=True)
def _widen_fp16(bits, lut, out):
    for i in numba.prange(bits.size):
        out[i] = lut[bits[i]]


@numba.njit(parallel=True, cache=True, nogil=True)
def _widen_bf16(bits, out_bits):
    for i in numba.prange(bits.size):  # bfloat16 is the top half of a float32
        out_bits[i] = np.uint32(bits[i]) << 16


class SourceError(Exception):
    """The checkpoint cannot be used; the message says why and what to do."""


# Files a conversion needs; everything else in a repo (pytorch .bin, consolidated weights,
# images, ONNX exports) is never downloaded.
HUB_ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "model*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
]
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class ResolvedSource:
    folder: Path
    kind: str  # "local" | "hub"
    source: str  # what the user typed
    revision: str | None = None  # what the user asked for (hub)
    commit: str | None = None  # what it resolved to (hub)


def resolve_source(source: str, revision: str | None = None, token: str | None = None,
                   tqdm_class: Any = None) -> ResolvedSource:
    """A local folder is used as is; anything shaped like `org/name` is fetched from the Hub.

    Hub access goes through huggingface_hub, so HF_TOKEN, HF_HOME and HF_HUB_OFFLINE behave as
    they do for every other tool; only the files in HUB_ALLOW_PATTERNS are downloaded.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        if revision is not None:
            raise SourceError(f"--revision {revision!r} applies to Hub repos, but {source!r} is a "
                              "local folder")
        return ResolvedSource(path.resolve(), "local", source)
    if path.exists():
        raise SourceError(f"{source!r} is a file; pass the folder holding config.json and the "
                          "safetensors weights")
    if not _REPO_ID.match(source):
        raise SourceError(f"{source!r} is neither an existing folder nor a Hub repo id of the form "
                          "'org/name'")
    return _download(source, revision, token, tqdm_class)


def _download(repo_id: str, revision: str | None, token: str | None, tqdm_class) -> ResolvedSource:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    kwargs = {"tqdm_class": tqdm_class} if tqdm_class is not None else {}
    try:
        folder = snapshot_download(repo_id, revision=revision, token=token,
                                   allow_patterns=HUB_ALLOW_PATTERNS, **kwargs)
    except GatedRepoError:
        raise SourceError(f"{repo_id} is gated: accept its license on the Hub and set HF_TOKEN "
                          "(or `hf auth login`)") from None
    except RepositoryNotFoundError:
        raise SourceError(f"Hub repo {repo_id} was not found (or is private: set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise SourceError(f"revision {revision!r} does not exist in {repo_id}") from None
    except LocalEntryNotFoundError:
        raise SourceError(f"{repo_id}@{revision or 'main'} is not in the local Hub cache and the Hub "
                          "cannot be reached (HF_HUB_OFFLINE set, or no network)") from None
    folder = Path(folder)
    # snapshot_download returns <cache>/models--org--name/snapshots/<commit>.
    commit = folder.name if _COMMIT.match(folder.name) else None
    return ResolvedSource(folder, "hub", repo_id, revision, commit)


# ---------------------------------------------------------------------------------------------
# safetensors shards
# ---------------------------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {"F16": np.float16, "BF16": np.uint16, "F32": np.float32}
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # the limit the safetensors library enforces


@dataclass(frozen=True)
class SourceTensor:
    name: str
    file: Path
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]
    start: int  # absolute byte offset in file

    @property
    def row_bytes(self) -> int:
        cols = int(np.prod(self.shape[1:], dtype=np.int64)) if len(self.shape) > 1 else 1
        return cols * np.dtype(_SAFETENSORS_DTYPES[self.dtype]).itemsize


def _read_safetensors_header(path: Path) -> dict[str, SourceTensor]:
    size = path.stat().st_size
    with open(path, "rb") as fh:
        prefix = fh.read(8)
        if len(prefix) != 8:
            raise SourceError(f"{path}: too short to be a safetensors file")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > _MAX_SAFETENSORS_HEADER or 8 + header_len > size:
            raise SourceError(f"{path}: safetensors header length {header_len} is invalid for a "
                              f"{size}-byte file (truncated download?)")
        try:
            header = json.loads(fh.read(header_len))
        except ValueError as exc:
            raise SourceError(f"{path}: safetensors header is not JSON: {exc}") from None
    data_start = 8 + header_len
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        if dtype not in _SAFETENSORS_DTYPES:
            raise SourceError(f"{path}: tensor {name} has dtype {dtype}; supported source dtypes "
                              f"are {sorted(_SAFETENSORS_DTYPES)}")
        itemsize = np.dtype(_SAFETENSORS_DTYPES[dtype]).itemsize
        if end - begin != int(np.prod(shape, dtype=np.int64)) * itemsize or end < begin:
            raise SourceError(f"{path}: tensor {name} spans {begin}..{end}, which does not match "
                              f"shape {list(shape)} of {dtype}")
        if data_start + end > size:
            raise SourceError(f"{path}: tensor {name} ends past the end of the file "
                              "(truncated download?)")
        tensors[name] = SourceTensor(name, path, dtype, shape, data_start + begin)
    return tensors


@dataclass
class Checkpoint:
    """All safetensors tensors of a folder, by name, plus its JSON side files."""

    folder: Path
    tensors: dict[str, SourceTensor] = field(default_factory=dict)
    _handles: dict[Path, int] = field(default_factory=dict)
    # Reused between reads: fresh multi-MB allocations each chunk cost more in page faults
    # than the conversion itself.
    _raw: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint8))
    _wide: np.ndarray = field(default_factory=lambda: np.empty(0, np.float32))

    @classmethod
    def open(cls, folder: Path) -> "Checkpoint":
        index = folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({folder / f for f in weight_map.values()})
        else:
            files = sorted(folder.glob("*.safetensors"))
        if not files:
            found = sorted(p.name for p in folder.iterdir())
            raise SourceError(f"{folder}: no safetensors weights found (files: {found[:12]}). "
                              "Only safetensors checkpoints are supported.")
        ckpt = cls(folder)
        for file in files:
            if not file.exists():
                raise SourceError(f"{folder}: the index lists {file.name}, which is missing")
            for name, tensor in _read_safetensors_header(file).items():
                if name in ckpt.tensors:
                    raise SourceError(f"{folder}: tensor {name} appears in both "
                                      f"{ckpt.tensors[name].file.name} and {file.name}")
                ckpt.tensors[name] = tensor
        return ckpt

    def read_json(self, name: str, required: bool = False) -> dict[str, Any] | None:
        path = self.folder / name
        if not path.exists():
            if required:
                raise SourceError(f"{self.folder}: {name} is missing")
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise SourceError(f"{path}: not valid JSON: {exc}") from None

    def read_raw(self, name: str, start: int, stop: int) -> np.ndarray:
        """Raw bytes of rows [start, stop); a view valid until the next read."""
        tensor = self.tensors[name]
        nbytes = (stop - start) * tensor.row_bytes
        if self._raw.size < nbytes:
            self._raw = np.empty(nbytes, np.uint8)
        fd = self._handles.get(tensor.file)
        if fd is None:
            fd = self._handles[tensor.file] = os.open(tensor.file, os.O_RDONLY)
        view, offset = memoryview(self._raw)[:nbytes], tensor.start + start * tensor.row_bytes
        while view.nbytes:  # pread may return short counts on some filesystems
            got = os.preadv(fd, [view], offset)
            if got == 0:
                raise SourceError(f"{tensor.file}: unexpected end of file reading {name}")
            view, offset = view[got:], offset + got
        return self._raw[:nbytes]

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as float32 (1-D tensors: one row per element); a view valid until
        the next read."""
        tensor = self.tensors[name]
        raw = self.read_raw(name, start, stop)
        count = raw.size // np.dtype(_SAFETENSORS_DTYPES[tensor.dtype]).itemsize
        if self._wide.size < count:
            self._wide = np.empty(count, np.float32)
        wide = self._wide[:count]
        if tensor.dtype == "F16":
            _widen_fp16(raw.view("<u2"), _FP16_BITS_TO_FP32, wide)
        elif tensor.dtype == "BF16":
            _widen_bf16(raw.view("<u2"), wide.view(np.uint32))
        else:
            wide[:] = raw.view("<f4")
        return wide.reshape(stop - start, *tensor.shape[1:])

    def close(self) -> None:
        for fd in self._handles.values():
            os.close(fd)
        self._handles.clear()
