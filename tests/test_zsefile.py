"""The reader: exact bytes of what the writer produced, and hostile files that must be refused."""

from __future__ import annotations

import json
import shutil
import struct
import threading
import time

import numpy as np
import pytest
import xxhash

from zse_runtime import zsefile
from zse_runtime.zsefile import (ALIGNMENT, HEADER_SIZE, HEADER_STRUCT, LAYOUT_INT4_ROWS, MAGIC,
                                 MAX_MANIFEST_BYTES, ZseFile, ZseFormatError)


def _parts(path):
    blob = bytearray(path.read_bytes())
    fields = list(HEADER_STRUCT.unpack(bytes(blob[:HEADER_SIZE])))
    manifest = json.loads(blob[fields[4]:fields[4] + fields[5]])
    return blob, fields, manifest


def _rewrite(src, dst, mutate_manifest=None, mutate_header=None, data_tail: bytes | None = None):
    """Copy src to dst, editing the manifest (checksum kept consistent) and/or header fields."""
    blob, fields, manifest = _parts(src)
    data_offset = fields[7]
    if mutate_manifest:
        mutate_manifest(manifest)
    raw = json.dumps(manifest, separators=(",", ":")).encode()
    assert HEADER_SIZE + len(raw) <= data_offset, "edited manifest must fit the reserved space"
    fields[5], fields[6] = len(raw), xxhash.xxh64_intdigest(raw)
    if mutate_header:
        mutate_header(fields)
    out = bytearray(HEADER_STRUCT.pack(*fields)) + raw
    out += b"\0" * (data_offset - len(out)) + blob[data_offset:]
    if data_tail is not None:
        out = out[:data_offset] + data_tail
    dst.write_bytes(bytes(out))
    return dst


def _tensor(manifest, name):
    return next(t for t in manifest["tensors"] if t["name"] == name)


def test_header_and_layout_bytes(tiny_qwen2_zse):
    blob, fields, manifest = _parts(tiny_qwen2_zse)
    magic, major, minor, header_size, m_off, m_len, m_hash, d_off, d_len, reserved = fields
    assert blob[:8] == MAGIC == b"\x89ZSE\r\n\x1a\n"
    assert (major, minor, header_size, m_off, reserved) == (1, 5, 64, 64, b"\0" * 8)  # v1.5
    assert xxhash.xxh64_intdigest(bytes(blob[m_off:m_off + m_len])) == m_hash
    assert d_off % ALIGNMENT == 0 and d_off >= m_off + m_len
    assert d_off + d_len == len(blob) and d_len % ALIGNMENT == 0
    assert set(blob[m_off + m_len:d_off]) <= {0}  # padding is zeros
    previous_end = 0
    for entry in manifest["tensors"]:  # file order, aligned, padded with zeros
        start = d_off + entry["offset"]
        assert entry["offset"] % ALIGNMENT == 0 and entry["offset"] >= previous_end
        assert set(blob[d_off + previous_end:start]) <= {0}
        assert xxhash.xxh64_hexdigest(bytes(blob[start:start + entry["nbytes"]])) == entry["xxh64"]
        previous_end = entry["offset"] + entry["nbytes"]


def test_views_are_zero_copy_and_match_the_bytes(tiny_qwen2_zse):
    blob, fields, manifest = _parts(tiny_qwen2_zse)
    d_off = fields[7]
    with ZseFile(tiny_qwen2_zse) as zse:
        entry = _tensor(manifest, "layers.1.qkv")
        weight = zse.int4("layers.1.qkv")
        rows, cols = entry["shape"]
        group = entry["group_size"]
        start = d_off + entry["offset"]
        packed = rows * cols // 2
        assert weight.qweight.tobytes() == bytes(blob[start:start + packed])
        scales = np.frombuffer(blob, "<f2", rows * cols // group, start + packed).reshape(rows, -1)
        np.testing.assert_array_equal(weight.scales, scales)
        assert not weight.qweight.flags.owndata and not weight.qweight.flags.writeable
        norm = zse.dense("final_norm")
        entry = _tensor(manifest, "final_norm")
        np.testing.assert_array_equal(
            norm, np.frombuffer(blob, "<f4", entry["shape"][0], d_off + entry["offset"]))
        assert list(zse.iter_corrupt()) == []


def _recorded_reads(monkeypatch, gate=None):
    """Replace the prefetch reader's os.preadv with one that records (offset, length) and, with
    `gate`, blocks each read until the gate opens."""
    reads = []

    def preadv(fd, buffers, offset):
        reads.append((offset, buffers[0].nbytes))
        if gate is not None:
            gate.wait(10)
        return buffers[0].nbytes

    monkeypatch.setattr(zsefile.os, "preadv", preadv)
    return reads


def test_prefetch_reads_exactly_the_range(tiny_qwen2_zse, monkeypatch):
    monkeypatch.setattr(zsefile, "PREFETCH_CHUNK", 4096)
    reads = _recorded_reads(monkeypatch)
    with ZseFile(tiny_qwen2_zse) as zse:
        base = zse.header.data_offset
        start, end = ALIGNMENT, zse.header.data_length - 1000  # a short last chunk
        zse.prefetch(start, end).join(30)
        assert reads == [(offset, min(4096, base + end - offset))
                         for offset in range(base + start, base + end, 4096)]
        reads.clear()
        embed = zse.tensors["embed_tokens"]
        zse.prefetch_tensor("embed_tokens").join(30)
        assert reads[0][0] == base + embed.offset
        assert sum(length for _, length in reads) == embed.nbytes
        reads.clear()
        zse.prefetch().join(30)  # the whole data section
        assert sum(length for _, length in reads) == zse.header.data_length


def test_stop_prefetching_and_close_end_the_reader_at_its_next_chunk(tiny_qwen2_zse,
                                                                     monkeypatch):
    monkeypatch.setattr(zsefile, "PREFETCH_CHUNK", 4096)
    gate = threading.Event()
    reads = _recorded_reads(monkeypatch, gate)
    with ZseFile(tiny_qwen2_zse) as zse:
        assert zse.header.data_length > 2 * 4096
        reader = zse.prefetch()
        deadline = time.monotonic() + 10
        while not reads and time.monotonic() < deadline:  # until it is held in its first read
            time.sleep(0.001)
        zse.stop_prefetching()
        gate.set()
        reader.join(30)
        assert not reader.is_alive()
        assert len(reads) == 1  # the read under way finished; no other began
        zse.prefetch().join(30)  # a later prefetch is not stopped by the earlier stop
        assert sum(length for _, length in reads[1:]) == zse.header.data_length
        gate.clear()
        reads.clear()
        reader = zse.prefetch()
        deadline = time.monotonic() + 10
        while not reads and time.monotonic() < deadline:
            time.sleep(0.001)
    gate.set()  # the file was closed while the reader was held: it ends there too
    reader.join(30)
    assert not reader.is_alive() and len(reads) == 1


def test_a_prefetch_is_stopped_only_by_a_reader_of_bytes_it_has_still_to_read(tiny_qwen2_zse,
                                                                             monkeypatch):
    """stop_prefetching_overtaken(start, end): the upload about to read [start, end) ends the
    prefetches with unread bytes there; one that has read past them, or reads elsewhere, goes
    on."""
    monkeypatch.setattr(zsefile, "PREFETCH_CHUNK", 4096)
    gate = threading.Event()
    reads = _recorded_reads(monkeypatch, gate)
    with ZseFile(tiny_qwen2_zse) as zse:
        base = zse.header.data_offset
        assert zse.header.data_length >= 8 * 4096
        reader = zse.prefetch(4 * 4096, 8 * 4096)
        deadline = time.monotonic() + 10
        while not reads and time.monotonic() < deadline:  # held in its first read
            time.sleep(0.001)
        assert reader.position == base + 4 * 4096
        zse.stop_prefetching_overtaken(base, base + 4 * 4096)  # bytes before its range
        zse.stop_prefetching_overtaken(base + 8 * 4096, base + 9 * 4096)  # and after it
        assert not reader._stop_reading.is_set()
        zse.stop_prefetching_overtaken(base + 3 * 4096, base + 5 * 4096)  # some it has to read
        assert reader._stop_reading.is_set()
        gate.set()
        reader.join(30)
        assert reads == [(base + 4 * 4096, 4096)]


def test_prefetch_of_a_remote_file_does_nothing(tiny_qwen2_zse):
    class Bytes:  # the ByteSource calls ZseFile.from_source makes
        def __init__(self, blob):
            self.blob, self.size = blob, len(blob)

        def describe(self):
            return "mem://model.zse"

        def read(self, offset, length):
            return self.blob[offset:offset + length]

    zse = ZseFile.from_source(Bytes(tiny_qwen2_zse.read_bytes()))
    assert zse.prefetch() is None and zse.prefetch_tensor("embed_tokens") is None
    zse.stop_prefetching()


def _expect_error(path, *fragments):
    with pytest.raises(ZseFormatError) as info:
        ZseFile(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    return info.value


def test_bad_magic(tiny_qwen2_zse, tmp_path):
    bad = tmp_path / "bad.zse"
    blob = bytearray(tiny_qwen2_zse.read_bytes())
    blob[:8] = b"GGUF\x03\x00\x00\x00"
    bad.write_bytes(blob)
    _expect_error(bad, "bad magic", "not a .zse file")


def test_unknown_major_version(tiny_qwen2_zse, tmp_path):
    def bump(fields):
        fields[1], fields[2] = 2, 0
    path = _rewrite(tiny_qwen2_zse, tmp_path / "v2.zse", mutate_header=bump)
    _expect_error(path, "format version 2.0 is not supported")


def test_newer_minor_version_with_extra_keys_is_read(tiny_qwen2_zse, tmp_path):
    def add_key(manifest):
        manifest["format_version"] = [1, 7]
        manifest["a_future_optional_key"] = {"x": 1}

    def bump(fields):
        fields[2] = 7
    path = _rewrite(tiny_qwen2_zse, tmp_path / "v1_7.zse", add_key, bump)
    with ZseFile(path) as zse:
        assert zse.header.version_minor == 7


@pytest.mark.parametrize("cut", [1, ALIGNMENT, None])
def test_truncated_file(tiny_qwen2_zse, tmp_path, cut):
    blob = tiny_qwen2_zse.read_bytes()
    path = tmp_path / "cut.zse"
    path.write_bytes(blob[:len(blob) - cut] if cut else blob[:40])
    _expect_error(path, "shorter than the 64-byte header" if cut is None else "truncated")


def test_extended_file(tiny_qwen2_zse, tmp_path):
    path = tmp_path / "long.zse"
    path.write_bytes(tiny_qwen2_zse.read_bytes() + b"\0" * ALIGNMENT)
    _expect_error(path, "does not end at the file size")


def test_manifest_length_past_end_of_file(tiny_qwen2_zse, tmp_path):
    def huge(fields):
        fields[5] = 10 * 2**20
    path = _rewrite(tiny_qwen2_zse, tmp_path / "past.zse", mutate_header=huge)
    _expect_error(path, "past the end of the", "offset 24")


def test_oversized_manifest_length(tiny_qwen2_zse, tmp_path):
    def huge(fields):
        fields[5] = 2**63
    path = _rewrite(tiny_qwen2_zse, tmp_path / "huge.zse", mutate_header=huge)
    _expect_error(path, f"exceeds the {MAX_MANIFEST_BYTES}-byte limit")


def test_corrupt_manifest_byte(tiny_qwen2_zse, tmp_path):
    blob = bytearray(tiny_qwen2_zse.read_bytes())
    blob[HEADER_SIZE + 10] ^= 0x20
    path = tmp_path / "flip.zse"
    path.write_bytes(blob)
    _expect_error(path, "manifest checksum mismatch")


def test_overlapping_tensors(tiny_qwen2_zse, tmp_path):
    def overlap(manifest):
        _tensor(manifest, "layers.0.qkv")["offset"] = _tensor(manifest, "layers.0.attn_norm")["offset"]
    path = _rewrite(tiny_qwen2_zse, tmp_path / "overlap.zse", overlap)
    _expect_error(path, "overlaps tensor", "layers.0")


def test_shape_and_length_disagree(tiny_qwen2_zse, tmp_path):
    def widen(manifest):
        _tensor(manifest, "final_norm")["shape"] = [4096]
    path = _rewrite(tiny_qwen2_zse, tmp_path / "shape.zse", widen)
    _expect_error(path, "tensor 'final_norm'", "nbytes is 768 but", "need 16384")


@pytest.mark.parametrize("offset", [2**64 - ALIGNMENT, 2**40])
def test_tensor_offset_past_data(tiny_qwen2_zse, tmp_path, offset):
    def move(manifest):
        _tensor(manifest, "lm_head")["offset"] = offset
    path = _rewrite(tiny_qwen2_zse, tmp_path / "far.zse", move)
    _expect_error(path, "tensor 'lm_head'", f"offset {offset}", "past the data section")


def test_misaligned_tensor(tiny_qwen2_zse, tmp_path):
    def shift(manifest):
        _tensor(manifest, "lm_head")["offset"] += 16
    path = _rewrite(tiny_qwen2_zse, tmp_path / "misaligned.zse", shift)
    _expect_error(path, "not a multiple of 4096", "lm_head")


@pytest.mark.parametrize("field,value,fragment", [
    ("offset", 1.5, "non-negative integers"),
    ("offset", -4096, "non-negative integers"),
    ("nbytes", True, "non-negative integers"),
    ("shape", [0, 192], "positive integers"),
    ("shape", "192", "positive integers"),
    ("xxh64", "XYZ", "16 lower-case hex"),
    ("dtype", "bfloat16", "dtype 'bfloat16' is not valid"),
    ("layout", "int4.cols.v9", "unknown layout 'int4.cols.v9'"),
])
def test_bad_tensor_fields(tiny_qwen2_zse, tmp_path, field, value, fragment):
    def edit(manifest):
        _tensor(manifest, "final_norm")[field] = value
    path = _rewrite(tiny_qwen2_zse, tmp_path / "field.zse", edit)
    _expect_error(path, fragment)


def test_bad_group_size(tiny_qwen2_zse, tmp_path):
    def edit(manifest):
        _tensor(manifest, "layers.0.qkv")["group_size"] = 48
    path = _rewrite(tiny_qwen2_zse, tmp_path / "group.zse", edit)
    _expect_error(path, "group_size must be one of", "layers.0.qkv")


def test_missing_and_duplicate_tensors(tiny_qwen2_zse, tmp_path):
    def drop(manifest):
        manifest["tensors"] = [t for t in manifest["tensors"] if t["name"] != "layers.1.down_proj"]
    _expect_error(_rewrite(tiny_qwen2_zse, tmp_path / "drop.zse", drop),
                  "does not match the model config", "layers.1.down_proj")

    def duplicate(manifest):
        manifest["tensors"].append(dict(_tensor(manifest, "final_norm")))
    _expect_error(_rewrite(tiny_qwen2_zse, tmp_path / "dup.zse", duplicate),
                  "duplicate tensor name", "final_norm")


def test_config_and_tensor_shape_disagree(tiny_qwen2_zse, tmp_path):
    def edit(manifest):
        manifest["model"]["intermediate_size"] = 320
    _expect_error(_rewrite(tiny_qwen2_zse, tmp_path / "cfg.zse", edit),
                  "tensor 'layers.0.gate_up'", "does not match the config")


def test_duplicate_json_keys(tiny_qwen2_zse, tmp_path):
    blob, fields, _ = _parts(tiny_qwen2_zse)
    raw = bytes(blob[64:64 + fields[5]])
    raw = raw.replace(b'"format":"zse"', b'"format":"zse","format":"zse"', 1)
    fields[5], fields[6] = len(raw), xxhash.xxh64_intdigest(raw)
    path = tmp_path / "dupkey.zse"
    path.write_bytes(HEADER_STRUCT.pack(*fields) + raw + bytes(blob[64 + len(raw):]))
    _expect_error(path, "duplicate key 'format'")


def test_unknown_architecture_in_manifest(tiny_qwen2_zse, tmp_path):
    def edit(manifest):
        manifest["model"]["architecture"] = "gpt2"
    _expect_error(_rewrite(tiny_qwen2_zse, tmp_path / "arch.zse", edit),
                  "unsupported architecture 'gpt2'", "llama")


def test_corrupt_tensor_data_is_found_by_checksums(tiny_qwen2_zse, tmp_path):
    _, fields, manifest = _parts(tiny_qwen2_zse)
    path = tmp_path / "rot.zse"
    shutil.copy(tiny_qwen2_zse, path)
    entry = _tensor(manifest, "layers.1.gate_up")
    with open(path, "r+b") as fh:
        fh.seek(fields[7] + entry["offset"] + 5)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0x01]))
    with ZseFile(path) as zse:  # structure is intact; only the checksum pass finds the damage
        corrupt = list(zse.iter_corrupt())
    assert [info.name for info, _ in corrupt] == ["layers.1.gate_up"]
    assert corrupt[0][1] != entry["xxh64"]


def test_int4_tensor_metadata(tiny_qwen2_zse):
    with ZseFile(tiny_qwen2_zse) as zse:
        info = zse.tensors["layers.0.down_proj"]
        assert info.layout == LAYOUT_INT4_ROWS and info.group_size == 128
        rows, cols = info.shape
        assert info.nbytes == rows * cols // 2 + 2 * 2 * rows * cols // 128
        weight = zse.int4("layers.0.down_proj")
        assert weight.shape == (rows, cols)
        with pytest.raises(TypeError, match="not dense.v1"):
            zse.dense("layers.0.down_proj")


def test_header_struct_is_64_bytes():
    assert struct.calcsize(HEADER_STRUCT.format) == 64
