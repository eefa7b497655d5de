"""The `.zse` v1 container: constants, validation and zero-copy reading.

This module is the single table of format constants (mirrored by `formats/zse-v1.md`;
`tests/test_spec.py` checks that the two agree). The converter imports it; it
imports nothing from the converter.

Reading follows one rule: every offset and length is checked against the file size with
exact integer arithmetic before any tensor byte is touched. A malformed file raises
`ZseFormatError` naming the file, the tensor and the offset; it never causes an
out-of-bounds read.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, NamedTuple

import xxhash

if TYPE_CHECKING:
    import numpy as np

# numpy is imported where tensor bytes are first viewed, not with this module: zse-run's engine
# process reads the manifest and hands the tokenizer on before it imports numpy (0.3 s on the
# H200 host), so the HTTP process can start building the tokenizer that much earlier.

# ---------------------------------------------------------------------------------------------
# Constants (normative copy: formats/zse-v1.md). Never reuse a retired value.
# ---------------------------------------------------------------------------------------------

MAGIC = b"\x89ZSE\r\n\x1a\n"  # PNG-style: catches text-mode transfers and truncation at byte 0
FORMAT_VERSION_MAJOR = 1  # bumped only for changes an old reader would misread
FORMAT_VERSION_MINOR = 5  # bumped for additions an old reader may ignore (1.1: quantization.gptq,
# 1.2: quantization.awq, 1.3: quantization.group_size_overrides,
# 1.4: quantization.search_column_weights) or refuses by name (1.5: group size 96)
PREFETCH_CHUNK = 8 << 20  # bytes per read of ZseFile.prefetch
ALIGNMENT = 4096  # every tensor and the data section start on a multiple of this
MAX_MANIFEST_BYTES = 256 * 1024 * 1024
# Bytes a remote open reads first: header and manifest in one request for most models (the
# manifest holds tokenizer.json, often 1-7 MB, which then takes a second request).
MANIFEST_PREFETCH = 1 << 20

# Header: fixed 64 bytes, little-endian.
HEADER_STRUCT = struct.Struct(
    "<"
    "8s"  # 0   magic
    "H"  # 8   format version major
    "H"  # 10  format version minor
    "I"  # 12  header size (64)
    "Q"  # 16  manifest offset (64)
    "Q"  # 24  manifest length in bytes
    "Q"  # 32  xxh64 of the manifest bytes (seed 0)
    "Q"  # 40  data offset (multiple of ALIGNMENT)
    "Q"  # 48  data length (multiple of ALIGNMENT); data offset + data length == file size
    "8s"  # 56  reserved, must be zero
)
HEADER_SIZE = HEADER_STRUCT.size
assert HEADER_SIZE == 8 + 2 + 2 + 4 + 8 + 8 + 8 + 8 + 8 + 8 == 64

# Element dtypes. "int4" appears only with an int4 layout.
DTYPE_ITEMSIZE = {"float16": 2, "float32": 4}
DTYPE_INT4 = "int4"
DTYPES = (*DTYPE_ITEMSIZE, DTYPE_INT4)

# Layout ids: how a tensor's bytes are arranged. Versioned by suffix; a new arrangement gets a new
# id and old ids keep their meaning forever.
LAYOUT_DENSE = "dense.v1"  # C-order, little-endian, no padding
LAYOUT_INT4_ROWS = "int4.rows.v1"  # packed nibbles, then fp16 scales, then fp16 zeros (spec §5.2)
LAYOUTS = (LAYOUT_DENSE, LAYOUT_INT4_ROWS)

INT4_GROUP_SIZES = (32, 64, 96, 128)
INT4_VALUES_PER_WORD = 8  # nibbles per little-endian uint32 word
INT4_SCALE_DTYPE = "float16"
INT4_ZERO_DTYPE = "float16"

ARCHITECTURES = ("llama", "mistral", "qwen2")
ROPE_TYPES = ("default", "linear", "llama3")
# Scaled rope types and the parameters each requires ("default" is stored as rope_scaling null).
ROPE_SCALING_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}

TOP_LEVEL_KEYS = (
    "format",
    "format_version",
    "model",
    "quantization",
    "tokenizer",
    "generation",
    "tensors",
    "provenance",
)
FORMAT_NAME = "zse"
TENSOR_KEYS = ("name", "dtype", "shape", "layout", "offset", "nbytes", "xxh64")
MODEL_KEYS = (
    "architecture",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "max_position_embeddings",
    "tie_word_embeddings",
    "qkv_bias",
    "o_bias",
    "sliding_window",
    "source_dtype",
)


def align_up(value: int, alignment: int = ALIGNMENT) -> int:
    return (value + alignment - 1) // alignment * alignment


def int4_section_sizes(rows: int, cols: int, group_size: int) -> tuple[int, int, int]:
    """Bytes of the (packed weights, scales, zeros) sections of an int4.rows.v1 tensor."""
    groups = rows * (cols // group_size)
    return rows * cols // 2, groups * 2, groups * 2


def expected_nbytes(dtype: str, shape: list[int], layout: str, group_size: int | None) -> int:
    """nbytes = f(shape, dtype, layout): the one formula the writer and the reader share."""
    if layout == LAYOUT_DENSE:
        return math.prod(shape) * DTYPE_ITEMSIZE[dtype]
    rows, cols = shape
    return sum(int4_section_sizes(rows, cols, group_size))


# ---------------------------------------------------------------------------------------------
# Canonical tensor names: one decoder, whatever the source architecture.
# ---------------------------------------------------------------------------------------------

EMBED = "embed_tokens"  # [vocab, hidden]
FINAL_NORM = "final_norm"  # [hidden]
LM_HEAD = "lm_head"  # [vocab, hidden]; present even when the source ties it to the embedding
LAYER_TENSORS = (
    "attn_norm",  # [hidden]
    "qkv",  # [(heads + 2 * kv_heads) * head_dim, hidden]: q rows, then k rows, then v rows
    "qkv_bias",  # [(heads + 2 * kv_heads) * head_dim], only when model.qkv_bias
    "o_proj",  # [hidden, heads * head_dim]
    "o_bias",  # [hidden], only when model.o_bias
    "mlp_norm",  # [hidden]
    "gate_up",  # [2 * intermediate, hidden]: gate rows, then up rows
    "down_proj",  # [hidden, intermediate]
)


def layer_tensor_name(layer: int, part: str) -> str:
    return f"layers.{layer}.{part}"


def expected_tensor_shapes(model: dict[str, Any]) -> dict[str, list[int]]:
    """Canonical name -> logical shape, in the order the loader consumes the file."""
    hidden, inter = model["hidden_size"], model["intermediate_size"]
    heads, kv_heads, head_dim = (
        model["num_attention_heads"],
        model["num_key_value_heads"],
        model["head_dim"],
    )
    qkv_rows = (heads + 2 * kv_heads) * head_dim
    shapes: dict[str, list[int]] = {EMBED: [model["vocab_size"], hidden]}
    for layer in range(model["num_hidden_layers"]):
        parts = {
            "attn_norm": [hidden],
            "qkv": [qkv_rows, hidden],
            "qkv_bias": [qkv_rows] if model["qkv_bias"] else None,
            "o_proj": [hidden, heads * head_dim],
            "o_bias": [hidden] if model["o_bias"] else None,
            "mlp_norm": [hidden],
            "gate_up": [2 * inter, hidden],
            "down_proj": [hidden, inter],
        }
        for part in LAYER_TENSORS:
            if parts[part] is not None:
                shapes[layer_tensor_name(layer, part)] = parts[part]
    shapes[FINAL_NORM] = [hidden]
    shapes[LM_HEAD] = [model["vocab_size"], hidden]
    return shapes


# ---------------------------------------------------------------------------------------------
# Errors and parsed structures
# ---------------------------------------------------------------------------------------------


class ZseFormatError(ValueError):
    """A `.zse` file is malformed. The message names the file and, where known, tensor and offset."""

    def __init__(self, path: str | os.PathLike, problem: str, tensor: str | None = None,
                 offset: int | None = None):
        where = f"{os.fspath(path)}"
        if tensor is not None:
            where += f", tensor '{tensor}'"
        if offset is not None:
            where += f", offset {offset}"
        super().__init__(f"{where}: {problem}")
        self.path, self.problem, self.tensor, self.offset = path, problem, tensor, offset


@dataclass(frozen=True)
class Header:
    version_major: int
    version_minor: int
    manifest_offset: int
    manifest_length: int
    manifest_xxh64: int
    data_offset: int
    data_length: int

    def pack(self) -> bytes:
        return HEADER_STRUCT.pack(
            MAGIC, self.version_major, self.version_minor, HEADER_SIZE, self.manifest_offset,
            self.manifest_length, self.manifest_xxh64, self.data_offset, self.data_length,
            b"\0" * 8,
        )


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    layout: str
    offset: int  # relative to the data section
    nbytes: int
    xxh64: str  # 16 lower-case hex digits
    group_size: int | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class Int4Weight(NamedTuple):
    """Zero-copy views of an int4.rows.v1 tensor; w[n, k] = (q[n, k] - zeros[n, g]) * scales[n, g]."""

    qweight: np.ndarray  # uint32 [N, K // 8], nibble j of word w holds k = 8 * w + j
    scales: np.ndarray  # float16 [N, K // group_size]
    zeros: np.ndarray  # float16 [N, K // group_size]
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.qweight.shape[0], self.qweight.shape[1] * INT4_VALUES_PER_WORD


def unpack_int4(qweight: np.ndarray) -> np.ndarray:
    """uint32 [N, K/8] -> uint8 [N, K] quantized values, in k order."""
    import numpy as np

    shifts = np.arange(0, 32, 4, dtype=np.uint32)
    values = (qweight[..., None] >> shifts) & np.uint32(0xF)
    return values.reshape(*qweight.shape[:-1], qweight.shape[-1] * 8).astype(np.uint8)


def dequantize_int4(weight: Int4Weight) -> np.ndarray:
    """Reference dequantization in float32, exactly as the kernels compute it."""
    import numpy as np

    q = unpack_int4(weight.qweight).astype(np.float32)
    rows, cols = q.shape
    q = q.reshape(rows, cols // weight.group_size, weight.group_size)
    scales = weight.scales.astype(np.float32)[..., None]
    zeros = weight.zeros.astype(np.float32)[..., None]
    return ((q - zeros) * scales).reshape(rows, cols)


# ---------------------------------------------------------------------------------------------
# Validation (pure functions over parsed JSON; no file access)
# ---------------------------------------------------------------------------------------------


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def parse_manifest(path: str | os.PathLike, raw: bytes) -> dict[str, Any]:
    try:
        manifest = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicate_keys,
                              parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ZseFormatError(path, f"manifest is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise ZseFormatError(path, "manifest must be a JSON object")
    return manifest


def _is_uint(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_tensor_entry(path, entry: Any, data_length: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise ZseFormatError(path, f"tensor entry must be an object, got {type(entry).__name__}")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise ZseFormatError(path, "tensor entry without a string 'name'")
    missing = [key for key in TENSOR_KEYS if key not in entry]
    if missing:
        raise ZseFormatError(path, f"missing keys {missing}", tensor=name)
    unknown = sorted(set(entry) - set(TENSOR_KEYS) - {"group_size"})
    if unknown:
        raise ZseFormatError(path, f"unknown keys {unknown} (a newer writer? this reader refuses "
                             "tensor options it cannot honour)", tensor=name)
    dtype, layout, shape = entry["dtype"], entry["layout"], entry["shape"]
    offset, nbytes, digest = entry["offset"], entry["nbytes"], entry["xxh64"]
    if not isinstance(dtype, str) or not isinstance(layout, str):
        raise ZseFormatError(path, "dtype and layout must be strings", tensor=name)
    if layout not in LAYOUTS:
        raise ZseFormatError(
            path, f"unknown layout {layout!r}; this reader knows {list(LAYOUTS)}. "
            "The file needs a newer zse_runtime.", tensor=name)
    if not (isinstance(shape, list) and shape and all(_is_uint(d) and d > 0 for d in shape)):
        raise ZseFormatError(path, f"shape must be a non-empty list of positive integers, got {shape!r}",
                             tensor=name)
    if not _is_uint(offset) or not _is_uint(nbytes):
        raise ZseFormatError(path, "offset and nbytes must be non-negative integers", tensor=name)
    if not (isinstance(digest, str) and len(digest) == 16
            and all(c in "0123456789abcdef" for c in digest)):
        raise ZseFormatError(path, f"xxh64 must be 16 lower-case hex digits, got {digest!r}",
                             tensor=name)
    group_size = entry.get("group_size")
    if layout == LAYOUT_DENSE:
        if dtype not in DTYPE_ITEMSIZE:
            raise ZseFormatError(path, f"dtype {dtype!r} is not valid with layout {layout}; "
                                 f"expected one of {list(DTYPE_ITEMSIZE)}", tensor=name)
        if group_size is not None:
            raise ZseFormatError(path, "group_size is only valid for int4 layouts", tensor=name)
    else:
        if dtype != DTYPE_INT4:
            raise ZseFormatError(path, f"layout {layout} requires dtype 'int4', got {dtype!r}",
                                 tensor=name)
        if not _is_uint(group_size) or group_size not in INT4_GROUP_SIZES:
            raise ZseFormatError(path, f"group_size must be one of {list(INT4_GROUP_SIZES)}, "
                                 f"got {group_size!r}", tensor=name)
        if len(shape) != 2 or shape[1] % group_size:
            raise ZseFormatError(path, f"int4 shape must be [rows, cols] with cols a multiple of "
                                 f"group_size {group_size}, got {shape}", tensor=name)
    want = expected_nbytes(dtype, shape, layout, group_size)
    if nbytes != want:
        raise ZseFormatError(path, f"nbytes is {nbytes} but dtype {dtype}, shape {shape} and layout "
                             f"{layout} need {want}", tensor=name, offset=offset)
    if offset % ALIGNMENT:
        raise ZseFormatError(path, f"offset is not a multiple of {ALIGNMENT}", tensor=name,
                             offset=offset)
    if offset + nbytes > data_length:
        raise ZseFormatError(path, f"tensor ends at data byte {offset + nbytes}, past the data section "
                             f"of {data_length} bytes (truncated or corrupt file)", tensor=name,
                             offset=offset)
    return TensorInfo(name, dtype, tuple(shape), layout, offset, nbytes, digest, group_size)


def validate_tensors(path, entries: Any, data_length: int) -> dict[str, TensorInfo]:
    """Check every tensor entry, then that no two tensors overlap. Returns name -> info."""
    if not isinstance(entries, list):
        raise ZseFormatError(path, "manifest 'tensors' must be a list")
    tensors: dict[str, TensorInfo] = {}
    for entry in entries:
        info = _check_tensor_entry(path, entry, data_length)
        if info.name in tensors:
            raise ZseFormatError(path, "duplicate tensor name", tensor=info.name)
        tensors[info.name] = info
    by_offset = sorted(tensors.values(), key=lambda t: t.offset)
    for before, after in zip(by_offset, by_offset[1:]):
        if before.offset + before.nbytes > after.offset:
            raise ZseFormatError(path, f"overlaps tensor '{before.name}' "
                                 f"(which spans {before.offset}..{before.offset + before.nbytes})",
                                 tensor=after.name, offset=after.offset)
    return tensors


def _check_model_values(path, model: dict[str, Any]) -> None:
    is_number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v == v
    problems = [key for key in ("tie_word_embeddings", "qkv_bias", "o_bias")
                if not isinstance(model[key], bool)]
    problems += [key for key in ("rms_norm_eps", "rope_theta")
                 if not (is_number(model[key]) and model[key] > 0)]
    if not (_is_uint(model["max_position_embeddings"]) and model["max_position_embeddings"] > 0):
        problems.append("max_position_embeddings")
    window = model["sliding_window"]
    if window is not None and not (_is_uint(window) and window > 0):
        problems.append("sliding_window")
    scaling = model["rope_scaling"]
    if scaling is not None:
        keys = ROPE_SCALING_KEYS.get(scaling.get("rope_type") if isinstance(scaling, dict) else None)
        if keys is None or set(scaling) != {"rope_type", *keys} or not all(
                is_number(scaling[k]) and scaling[k] > 0 for k in keys):
            problems.append("rope_scaling")
    if problems:
        raise ZseFormatError(path, f"manifest 'model' has invalid values for {problems}")


def validate_model(path, model: Any, tensors: dict[str, TensorInfo]) -> None:
    """The config must be complete and the tensor set must be exactly what it implies."""
    if not isinstance(model, dict):
        raise ZseFormatError(path, "manifest 'model' must be an object")
    missing = [key for key in MODEL_KEYS if key not in model]
    if missing:
        raise ZseFormatError(path, f"manifest 'model' is missing keys {missing}")
    unknown = sorted(set(model) - set(MODEL_KEYS))
    if unknown:  # an ignored model option would silently change the output
        raise ZseFormatError(path, f"manifest 'model' has unknown keys {unknown}")
    _check_model_values(path, model)
    if model["architecture"] not in ARCHITECTURES:
        raise ZseFormatError(path, f"unsupported architecture {model['architecture']!r}; "
                             f"supported: {list(ARCHITECTURES)}")
    sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads", "head_dim")
    bad = [key for key in sizes if not (_is_uint(model[key]) and model[key] > 0)]
    if bad:
        raise ZseFormatError(path, f"model sizes must be positive integers: {bad}")
    if model["num_attention_heads"] % model["num_key_value_heads"]:
        raise ZseFormatError(path, "num_attention_heads must be a multiple of num_key_value_heads")
    expected = expected_tensor_shapes(model)
    missing_tensors = [name for name in expected if name not in tensors]
    extra_tensors = [name for name in tensors if name not in expected]
    if missing_tensors or extra_tensors:
        raise ZseFormatError(path, f"tensor set does not match the model config: missing "
                             f"{missing_tensors[:8]}, unexpected {extra_tensors[:8]}")
    for name, shape in expected.items():
        if list(tensors[name].shape) != shape:
            raise ZseFormatError(path, f"shape {list(tensors[name].shape)} does not match the "
                                 f"config, which implies {shape}", tensor=name)


# ---------------------------------------------------------------------------------------------
# The reader
# ---------------------------------------------------------------------------------------------


def read_header(path, blob: bytes, file_size: int) -> Header:
    if file_size < HEADER_SIZE:
        raise ZseFormatError(path, f"file is {file_size} bytes, shorter than the {HEADER_SIZE}-byte "
                             "header")
    (magic, major, minor, header_size, manifest_offset, manifest_length, manifest_xxh64,
     data_offset, data_length, reserved) = HEADER_STRUCT.unpack(blob[:HEADER_SIZE])
    if magic != MAGIC:
        raise ZseFormatError(path, f"bad magic {magic!r}: not a .zse file (expected {MAGIC!r})",
                             offset=0)
    if major != FORMAT_VERSION_MAJOR:
        raise ZseFormatError(path, f"format version {major}.{minor} is not supported; this reader "
                             f"reads version {FORMAT_VERSION_MAJOR}.x", offset=8)
    if header_size != HEADER_SIZE or reserved != b"\0" * 8:
        raise ZseFormatError(path, f"header size {header_size} or reserved bytes are invalid",
                             offset=12)
    if manifest_offset != HEADER_SIZE:
        raise ZseFormatError(path, f"manifest offset {manifest_offset}, expected {HEADER_SIZE}",
                             offset=16)
    if manifest_length > MAX_MANIFEST_BYTES:
        raise ZseFormatError(path, f"manifest length {manifest_length} exceeds the "
                             f"{MAX_MANIFEST_BYTES}-byte limit", offset=24)
    manifest_end = manifest_offset + manifest_length
    if manifest_end > file_size:
        raise ZseFormatError(path, f"manifest ends at byte {manifest_end}, past the end of the "
                             f"{file_size}-byte file (truncated?)", offset=24)
    if data_offset % ALIGNMENT or data_offset < manifest_end:
        raise ZseFormatError(path, f"data offset {data_offset} must be a multiple of {ALIGNMENT} "
                             f"at or after the manifest end {manifest_end}", offset=40)
    if data_length % ALIGNMENT or data_offset + data_length != file_size:
        raise ZseFormatError(path, f"data section {data_offset}+{data_length} does not end at the "
                             f"file size {file_size} (truncated or extended file)", offset=48)
    return Header(major, minor, manifest_offset, manifest_length, manifest_xxh64, data_offset,
                  data_length)


def dense_view(info: TensorInfo, blob: np.ndarray) -> np.ndarray:
    """A dense.v1 tensor's bytes (uint8, info.nbytes of them) as its typed array, zero-copy."""
    if info.layout != LAYOUT_DENSE:
        raise TypeError(f"tensor '{info.name}' has layout {info.layout}, not {LAYOUT_DENSE}")
    import numpy as np

    return blob.view(np.dtype(info.dtype).newbyteorder("<")).reshape(info.shape)


def int4_view(info: TensorInfo, blob: np.ndarray) -> Int4Weight:
    """An int4.rows.v1 tensor's bytes as its three sections, zero-copy."""
    if info.layout != LAYOUT_INT4_ROWS:
        raise TypeError(f"tensor '{info.name}' has layout {info.layout}, not {LAYOUT_INT4_ROWS}")
    rows, cols = info.shape
    packed, scale_bytes, _ = int4_section_sizes(rows, cols, info.group_size)
    groups = cols // info.group_size
    return Int4Weight(
        blob[:packed].view("<u4").reshape(rows, cols // INT4_VALUES_PER_WORD),
        blob[packed:packed + scale_bytes].view("<f2").reshape(rows, groups),
        blob[packed + scale_bytes:].view("<f2").reshape(rows, groups),
        info.group_size,
    )


def tensor_view(info: TensorInfo, blob: np.ndarray) -> np.ndarray | Int4Weight:
    return int4_view(info, blob) if info.layout == LAYOUT_INT4_ROWS else dense_view(info, blob)


class Prefetch(threading.Thread):
    """One background read of file bytes [first, last) into the page cache, PREFETCH_CHUNK
    bytes per read, in order (ZseFile.prefetch). `position`: the file offset up to which it
    has read."""

    def __init__(self, path: Path, first: int, last: int):
        super().__init__(name="zse-prefetch", daemon=True)
        self.path, self.first, self.last = path, first, last
        self.position = first
        self._stop_reading = threading.Event()

    def stop(self) -> None:
        """End at the next chunk (the read under way completes)."""
        self._stop_reading.set()

    def run(self) -> None:
        buffer = memoryview(bytearray(PREFETCH_CHUNK))
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return
        try:
            for offset in range(self.first, self.last, PREFETCH_CHUNK):
                if self._stop_reading.is_set():
                    return
                length = min(PREFETCH_CHUNK, self.last - offset)
                if os.preadv(fd, [buffer[:length]], offset) <= 0:
                    return
                self.position = offset + length
        except OSError:
            return
        finally:
            os.close(fd)


class ZseFile:
    """A validated, memory-mapped `.zse` file. Use as a context manager or call close()."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.source = None  # a ByteSource when the bytes are remote (see from_source)
        self.mirror = None  # where a streaming load also writes a verified local copy
        with open(self.path, "rb") as fh:
            file_size = os.fstat(fh.fileno()).st_size
            self.header = read_header(self.path, fh.read(HEADER_SIZE), file_size)
            fh.seek(self.header.manifest_offset)
            raw = fh.read(self.header.manifest_length)
            if len(raw) != self.header.manifest_length:
                raise ZseFormatError(self.path, "file shrank while reading the manifest")
            self._accept_manifest(raw)
            self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        self._data = None
        self._closed = False
        self._prefetches: list[Prefetch] = []

    @classmethod
    def from_source(cls, source, prefetch: int = MANIFEST_PREFETCH) -> "ZseFile":
        """Validate a remote `.zse` from its first bytes: one ranged read of `prefetch` bytes,
        and a second only when the manifest runs past it. Tensor bytes are not read: the loader
        streams them (`data` is None). `head` keeps bytes [0, data_offset) for a local mirror."""
        self = cls.__new__(cls)
        self.path, self.source, self.mirror, self._map, self._data, self._closed = (
            source.describe(), source, None, None, None, False)
        self._prefetches = []
        head = source.read(0, min(source.size, prefetch))
        self.header = read_header(self.path, head, source.size)
        if self.header.data_offset > len(head):
            head += source.read(len(head), self.header.data_offset - len(head))
        self.head = head[:self.header.data_offset]
        start = self.header.manifest_offset
        self._accept_manifest(self.head[start:start + self.header.manifest_length])
        return self

    def _accept_manifest(self, raw: bytes) -> None:
        if xxhash.xxh64_intdigest(raw) != self.header.manifest_xxh64:
            raise ZseFormatError(self.path, "manifest checksum mismatch (corrupt manifest)",
                                 offset=self.header.manifest_offset)
        self.manifest = parse_manifest(self.path, raw)
        self._check_manifest()

    def _check_manifest(self) -> None:
        m = self.manifest
        missing = [key for key in TOP_LEVEL_KEYS if key not in m]
        if missing:
            raise ZseFormatError(self.path, f"manifest is missing top-level keys {missing}")
        if m["format"] != FORMAT_NAME:
            raise ZseFormatError(self.path, f"manifest format is {m['format']!r}, expected 'zse'")
        version = m["format_version"]
        if not (isinstance(version, list) and all(_is_uint(v) for v in version)
                and version == [self.header.version_major, self.header.version_minor]):
            raise ZseFormatError(self.path, f"manifest format_version {version} disagrees with "
                                 f"the header's {self.header.version_major}."
                                 f"{self.header.version_minor}")
        self.tensors = validate_tensors(self.path, m["tensors"], self.header.data_length)
        validate_model(self.path, m["model"], self.tensors)

    # -- access -----------------------------------------------------------------------------

    @property
    def model_config(self) -> dict[str, Any]:
        return self.manifest["model"]

    @property
    def data(self) -> np.ndarray | None:
        """The data section as a zero-copy uint8 array; None for a remote file or once closed."""
        if self._data is None and self._map is not None and not self._closed:
            import numpy as np

            self._data = np.frombuffer(self._map, dtype=np.uint8, offset=self.header.data_offset,
                                       count=self.header.data_length)
        return self._data

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a zero-copy uint8 view."""
        info = self.tensors[name]
        if self.data is None:
            raise RuntimeError(f"{self.path}: tensor bytes of a remote .zse are not mapped; "
                               "the loader streams them")
        return self.data[info.offset:info.offset + info.nbytes]

    def dense(self, name: str) -> np.ndarray:
        return dense_view(self.tensors[name], self.raw(name))

    def int4(self, name: str) -> Int4Weight:
        return int4_view(self.tensors[name], self.raw(name))

    def weight(self, name: str) -> np.ndarray | Int4Weight:
        return tensor_view(self.tensors[name], self.raw(name))

    def prefetch(self, start: int = 0, end: int | None = None) -> Prefetch | None:
        """Read data-section bytes [start, end) once in a background thread, so that they are in
        the page cache before they are used (best effort: a read error ends it quietly), until
        `stop_prefetching()` (or `stop_prefetching_overtaken`) ends it at its next chunk. One
        thread: on the H200 host's disk it reads as fast as 8 or 16 (1.7 GB/s), and more readers
        delay what else needs the disk (in a cold zse-run start, eight made the CUDA context,
        whose driver files are read too, 1.3-1.7 s later). None, and nothing to do, for a
        remote file."""
        if self._map is None:
            return None
        first = self.header.data_offset + start
        last = self.header.data_offset + (self.header.data_length if end is None else end)
        reader = Prefetch(self.path, first, last)
        self._prefetches.append(reader)
        reader.start()
        return reader

    def prefetch_tensor(self, name: str) -> Prefetch | None:
        info = self.tensors[name]
        return self.prefetch(info.offset, info.offset + info.nbytes)

    def stop_prefetching(self) -> None:
        """End the prefetches started so far at their next chunk (a reader of the same bytes
        has taken over)."""
        for reader in self._prefetches:
            reader.stop()
        self._prefetches = []

    def stop_prefetching_overtaken(self, start: int, end: int) -> None:
        """Another reader is about to read file bytes [start, end): end, at their next chunk,
        the prefetches that still have some of them to read (they would only compete with it
        now); those further ahead keep the disk busy while it catches up."""
        for reader in self._prefetches:
            if reader.position < end and start < reader.last:
                reader.stop()

    def dequantized(self, name: str) -> np.ndarray:
        """Any tensor as float32 (int4 dequantized with the reference formula)."""
        value = self.weight(name)
        return dequantize_int4(value) if isinstance(value, Int4Weight) else value.astype("float32")

    def iter_corrupt(self) -> Iterator[tuple[TensorInfo, str]]:
        """Recompute every checksum; yields (tensor, actual digest) for each mismatch."""
        for info in sorted(self.tensors.values(), key=lambda t: t.offset):
            actual = xxhash.xxh64_hexdigest(self.raw(info.name))
            if actual != info.xxh64:
                yield info, actual

    def close(self) -> None:
        """Unmap now if no tensor view is alive; otherwise the last view releases the mapping.
        Prefetches end at their next chunk."""
        self.stop_prefetching()
        self._data, self._closed = None, True
        if self.source is not None:
            self.source.close()
        try:
            if self._map is not None:
                self._map.close()
        except BufferError:
            pass

    def __enter__(self) -> "ZseFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def device_window_start(zse: ZseFile) -> int:
    """Data-section offset from which the tensors live on a GPU: where the first tensor other
    than the embedding begins. The converter writes the embedding first, so the device holds
    everything but it. A decode step reads one embedding row per token, which the host gathers
    (GpuOps.embed): at 7B shape that keeps 1.09 GB off the GPU and out of the upload."""
    return min(info.offset for name, info in zse.tensors.items() if name != EMBED)
