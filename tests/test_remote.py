"""Serving from object storage and the Hub: s3:// against a real S3 server (moto, on loopback),
https:// through pre-signed URLs, hf:// through the Hub's offline cache layout, and the streaming
pipeline itself (ordering, ring bound, checksums) with a host-memory sink."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time

import httpx
import numpy as np
import pytest

from tests.conftest import LiveServer
from tests.s3_server import CREDENTIALS, FlakyProxy, MotoServer
from tests.test_cli import COMMIT, _lay_out_hub_cache
from zse_runtime import source as source_module
from zse_runtime.engine import Engine
from zse_runtime.source import (ByteSource, RemoteAccessDenied, RemoteNotFound,
                                RemoteUnavailable, open_source, redact)
from zse_runtime.streaming import HostSink, MirrorFile, cache_path, stream_data_section
from zse_runtime.tokenizer import IncrementalDecoder
from zse_runtime.zsefile import ZseFile, ZseFormatError, device_window_start

BUCKET = "zse-models"
PROMPT = list(range(10, 40))


@pytest.fixture(scope="module")
def moto(tiny_qwen2_zse):
    """One S3 server for the module, holding the tiny model and broken variants of it."""
    server = MotoServer()
    blob = tiny_qwen2_zse.read_bytes()
    with ZseFile(tiny_qwen2_zse) as zse:
        corrupt_at = zse.header.data_offset + zse.tensors["layers.1.gate_up"].offset + 77
    corrupt = bytearray(blob)
    corrupt[corrupt_at] ^= 0x01
    server.etags = {
        "tiny.zse": server.upload(BUCKET, "tiny.zse", blob),
        "corrupt.zse": server.upload(BUCKET, "corrupt.zse", bytes(corrupt)),
        "truncated.zse": server.upload(BUCKET, "truncated.zse", blob[:-5000]),
    }
    with pytest.MonkeyPatch.context() as patch:
        for key, value in server.env.items():
            patch.setenv(key, value)
        yield server
    server.stop()


@pytest.fixture(scope="module")
def local_greedy(tiny_qwen2_zse):
    """(token ids, text) of a greedy completion of PROMPT from the local file."""
    engine = Engine.open(tiny_qwen2_zse, device="cpu", max_model_len=256)
    return _greedy(engine)


def _greedy(engine, max_tokens: int = 12):
    tokens = list(engine.generate(PROMPT, max_tokens, ignore_eos=True))
    decoder = IncrementalDecoder(engine.tokenizer)
    return tokens, "".join(decoder.push(t) for t in tokens) + decoder.flush()


# -- zse-run from s3:// --------------------------------------------------------------------


def test_zse_run_from_s3_answers_like_the_local_file_and_logs_no_secret(moto, local_greedy):
    live = LiveServer(f"s3://{BUCKET}/tiny.zse", "--max-model-len", "256", "--log-level", "debug",
                      env=moto.env)
    try:
        live.wait_ready()
        response = httpx.post(f"{live.url}/v1/completions", timeout=60, json={
            "model": "tiny", "prompt": PROMPT, "max_tokens": 12, "temperature": 0,
            "ignore_eos": True}).json()
        assert response["choices"][0]["text"] == local_greedy[1]
        metrics = httpx.get(f"{live.url}/metrics").text
        for stage in ("manifest (remote)", "download+verify", "download (overlapped)"):
            assert f'stage="{stage}"' in metrics
        output = live.output()
        assert "ready in" in output
    finally:
        live.stop()
    for secret in (CREDENTIALS["AWS_SECRET_ACCESS_KEY"], CREDENTIALS["AWS_SESSION_TOKEN"]):
        assert secret not in output


def _health_until_exit(live) -> set[int]:
    """Every /health status the server answered with before its process ended."""
    seen = set()
    while live.process.poll() is None:
        try:
            seen.add(httpx.get(f"{live.url}/health", timeout=1).status_code)
        except httpx.TransportError:
            time.sleep(0.02)
    return seen


@pytest.mark.parametrize("key,message", [
    ("corrupt.zse", "tensor 'layers.1.gate_up'"),
    ("missing.zse", "not found"),
])
def test_zse_run_failed_remote_load_exits_1_and_is_never_ready(moto, key, message):
    live = LiveServer(f"s3://{BUCKET}/{key}", env=moto.env)
    try:
        seen = _health_until_exit(live)
        assert live.process.wait() == 1
        assert 200 not in seen
        output = live.output()
        assert message in output and f"could not load s3://{BUCKET}/{key}" in output
        assert "Traceback" not in output
    finally:
        live.stop()


def test_server_killed_mid_download_fails_cleanly(tiny_qwen2_zse, tmp_path):
    """A dedicated S3 server, reached through a proxy that kills it in the middle of the data
    section: the reads are retried with backoff, then the start fails with exit 1."""
    server = MotoServer()
    blob = tiny_qwen2_zse.read_bytes()
    server.upload(BUCKET, "tiny.zse", blob)
    with ZseFile(tiny_qwen2_zse) as zse:
        data_length = zse.header.data_length
    # the first request reads the whole (small) file as the manifest prefetch; cut halfway
    # through the second, the data section
    proxy = FlakyProxy(server.port, [len(blob) + data_length // 2], on_cut=server.stop)
    live = LiveServer(f"s3://{BUCKET}/tiny.zse", "--cache-dir", str(tmp_path / "cache"),
                      env={**server.env, "AWS_ENDPOINT_URL": proxy.endpoint})
    try:
        seen = _health_until_exit(live)
        assert live.process.wait() == 1 and 200 not in seen
        output = live.output()
        assert proxy.cuts == 1 and server.process.poll() is not None
        assert "retry 4 of 4" in output
        assert f"s3://{BUCKET}/tiny.zse: reading bytes" in output and "failed after 5 attempts" in output
        assert list((tmp_path / "cache").iterdir()) == []  # the partial copy was removed
    finally:
        live.stop()
        proxy.close()
        server.stop()


# -- Engine.open from s3:// ----------------------------------------------------------------


def test_engine_from_s3_stages_and_tokens(moto, local_greedy):
    engine = Engine.open(f"s3://{BUCKET}/tiny.zse", device="cpu", max_model_len=256)
    assert _greedy(engine) == local_greedy
    stages = engine.startup.stages
    assert list(stages)[:4] == ["manifest (remote)", "download+verify", "download (overlapped)",
                                "verify+copy (overlapped)"]
    assert stages["download (overlapped)"] <= stages["download+verify"]
    assert not engine.zse.path.exists()  # the temporary copy is unlinked once mapped


@pytest.mark.parametrize("key,error,message", [
    ("corrupt.zse", ZseFormatError, "checksum mismatch in the streamed bytes"),
    ("truncated.zse", ZseFormatError, "(truncated or extended file)"),
    ("missing.zse", RemoteNotFound, f"s3://{BUCKET}/missing.zse: not found"),
])
def test_engine_remote_failures_are_clear_and_leave_no_cache(moto, tmp_path, key, error, message):
    cache = tmp_path / "cache"
    with pytest.raises(error) as caught:
        Engine.open(f"s3://{BUCKET}/{key}", device="cpu", cache_dir=cache)
    assert message in str(caught.value)
    assert not cache.exists() or list(cache.iterdir()) == []


def test_access_denied_is_not_retried(tiny_qwen2_zse, monkeypatch):
    server = MotoServer(require_auth=True)  # knows no keys: every request is refused with 403
    try:
        for key, value in server.env.items():
            monkeypatch.setenv(key, value)
        started = time.monotonic()
        with pytest.raises(RemoteAccessDenied) as caught:
            Engine.open(f"s3://{BUCKET}/tiny.zse", device="cpu")
        assert time.monotonic() - started < 5  # no backoff on a 403
        assert f"s3://{BUCKET}/tiny.zse: access denied" in str(caught.value)
        assert CREDENTIALS["AWS_SECRET_ACCESS_KEY"] not in str(caught.value)
    finally:
        server.stop()


def test_cache_dir_reuse_and_stale_etag_refetch(moto, tiny_qwen2_zse, tmp_path, local_greedy):
    cache, url = tmp_path / "cache", f"s3://{BUCKET}/cached.zse"
    blob = tiny_qwen2_zse.read_bytes()
    moto.upload(BUCKET, "cached.zse", blob)
    first = Engine.open(url, device="cpu", cache_dir=cache, max_model_len=256)
    assert "manifest (remote)" in first.startup.stages
    [copy] = list(cache.iterdir())
    assert copy == cache_path(cache, open_source(url)) and copy.read_bytes() == blob
    inode = copy.stat().st_ino

    again = Engine.open(url, device="cpu", cache_dir=cache, max_model_len=256)
    assert list(again.startup.stages)[0] == "manifest (cache hit)"
    assert "download+verify" not in again.startup.stages
    assert again.zse.path == copy and copy.stat().st_ino == inode
    assert _greedy(again) == local_greedy

    # a new version of the object: same model, one padding byte changed, so a new ETag
    with ZseFile(tiny_qwen2_zse) as zse:
        padding = zse.header.manifest_offset + zse.header.manifest_length
    changed = bytearray(blob)
    changed[padding] = 0x20
    moto.upload(BUCKET, "cached.zse", bytes(changed))
    fresh = Engine.open(url, device="cpu", cache_dir=cache, max_model_len=256)
    assert "manifest (remote)" in fresh.startup.stages
    [new_copy] = list(cache.iterdir())  # the stale copy is gone
    assert new_copy != copy and new_copy.read_bytes() == bytes(changed)
    assert _greedy(fresh) == local_greedy


# -- https:// (pre-signed URLs) ------------------------------------------------------------


def test_presigned_https_url_serves_and_never_logs_the_signature(moto, local_greedy, caplog):
    client = moto.client()
    url = client.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": "tiny.zse"},
                                        ExpiresIn=600)
    signature = url.split("X-Amz-Signature=")[1].split("&")[0]
    caplog.set_level(logging.DEBUG)
    engine = Engine.open(url, device="cpu", max_model_len=256)
    assert _greedy(engine) == local_greedy
    source = open_source(url)
    assert source.validator == moto.etags["tiny.zse"] and source.size == engine.zse.header.data_offset + engine.zse.header.data_length
    assert source.describe() == f"{moto.endpoint}/{BUCKET}/tiny.zse"

    missing = client.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": "nope.zse"})
    with pytest.raises(RemoteNotFound) as caught:
        Engine.open(missing, device="cpu")
    assert str(caught.value).startswith(f"{moto.endpoint}/{BUCKET}/nope.zse: not found")
    assert signature not in caplog.text and "X-Amz-Signature" not in caplog.text
    assert "X-Amz-Signature" not in str(caught.value)


def test_redact_strips_userinfo_query_and_fragment():
    assert redact("https://user:pw@host.example:8443/a/b.zse?sig=abc#frag") == \
        "https://host.example:8443/a/b.zse"
    assert redact("s3://bucket/key.zse") == "s3://bucket/key.zse"
    assert redact("/local/model.zse") == "/local/model.zse"


# -- hf:// through the offline Hub cache ---------------------------------------------------


def test_hf_url_through_offline_hub_cache(tiny_qwen2_zse, tmp_path, monkeypatch, local_greedy):
    from huggingface_hub import constants

    folder = tmp_path / "repo"
    folder.mkdir()
    shutil.copy(tiny_qwen2_zse, folder / "tiny.zse")
    _lay_out_hub_cache(folder, tmp_path / "hf", "zse-test/tiny-zse")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    for url in ("hf://zse-test/tiny-zse/tiny.zse", f"hf://zse-test/tiny-zse@{COMMIT}/tiny.zse"):
        source = open_source(url)
        assert source.local_path is not None and source.validator == COMMIT
        engine = Engine.open(url, device="cpu", max_model_len=256)
        assert list(engine.startup.stages)[0] == "manifest (hub cache)"
        assert _greedy(engine) == local_greedy
    with pytest.raises(RemoteNotFound, match="zse-test/tiny-zse@v9/tiny.zse is not in the local "
                       "Hub cache and HF_HUB_OFFLINE is set"):
        Engine.open("hf://zse-test/tiny-zse@v9/tiny.zse", device="cpu")
    with pytest.raises(ValueError, match="expected hf://org/repo"):
        open_source("hf://just-a-repo")
    assert source_module._parse_hf("hf://datasets/org/data@v1/sub/m.zse") == (
        "dataset", "org/data", "v1", "sub/m.zse")

    # not cached and online: the Hub is asked (here a closed port), and the failure is clear
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(source_module, "RETRY_BACKOFF_S", 0.01)
    with pytest.raises(RemoteUnavailable, match=r"hf://zse-test/other/tiny.zse: could not reach the "
                       r"Hub at http://127.0.0.1:9 after 5 attempts \("):
        open_source("hf://zse-test/other/tiny.zse")


# -- retries and the dropped-connection path -----------------------------------------------


class FakeSource(ByteSource):
    """Bytes in memory; `delay(offset)` seconds per read and injected failures, for the
    pipeline's ordering, ring-bound and failure paths."""

    def __init__(self, blob: bytes, delay=lambda offset: 0.0, fail=None):
        super().__init__("fake://bucket/model.zse?token=SECRET")
        self.blob, self.size, self.validator = blob, len(blob), "v1"
        self.delay, self.fail = delay, fail
        self.finished: list[int] = []
        self.active = 0
        self.max_active = 0
        self.lock = threading.Lock()

    def _read_once(self, offset, view):
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            time.sleep(self.delay(offset))
            if self.fail:
                self.fail(offset)
            view[:] = self.blob[offset:offset + view.nbytes]
            with self.lock:
                self.finished.append(offset)
        finally:
            with self.lock:
                self.active -= 1


def test_transient_errors_retry_with_exponential_backoff(monkeypatch):
    waits: list[float] = []
    failures = iter([ConnectionResetError("reset by peer"), TimeoutError("read timed out"),
                     OSError("503 Slow Down")])

    def fail(offset):
        error = next(failures, None)
        if error:
            raise error

    source = FakeSource(b"x" * 100, fail=fail)
    monkeypatch.setattr(source.aborted, "wait", lambda seconds: waits.append(seconds) or False)
    assert source.read(10, 5) == b"xxxxx"
    assert source.retries == 3 and waits == [0.25, 0.5, 1.0]

    dead = FakeSource(b"x" * 100, fail=lambda offset: (_ for _ in ()).throw(ConnectionRefusedError()))
    monkeypatch.setattr(dead.aborted, "wait", lambda seconds: waits.append(seconds) or False)
    with pytest.raises(RemoteUnavailable, match="failed after 5 attempts: ConnectionRefusedError"):
        dead.read(0, 10)
    assert waits[3:] == [0.25, 0.5, 1.0, 2.0] and dead.retries == 4
    with pytest.raises(RemoteUnavailable) as caught:  # the query string never shows
        dead.read(0, 10)
    assert "SECRET" not in str(caught.value) and "fake://bucket/model.zse:" in str(caught.value)


@pytest.mark.parametrize("error,expected", [(PermissionError("403 Forbidden"), RemoteAccessDenied),
                                            (FileNotFoundError("404"), RemoteNotFound)])
def test_403_and_404_are_not_retried(error, expected):
    def fail(offset):
        raise error

    source = FakeSource(b"x" * 100, fail=fail)
    with pytest.raises(expected):
        source.read(0, 10)
    assert source.retries == 0


def test_dropped_connections_are_retried_against_real_s3(moto, tiny_qwen2_zse, monkeypatch):
    """Through a proxy that drops two connections in the middle of responses: the load
    recovers, and every byte equals the file's."""
    url = f"s3://{BUCKET}/tiny.zse"
    zse = ZseFile.from_source(open_source(url))
    proxy = FlakyProxy(moto.port, [150_000, 400_000])
    monkeypatch.setattr(source_module, "RETRY_BACKOFF_S", 0.05)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
            zse.source = open_source(url)  # the client binds the endpoint now
        sink = HostSink(zse.header.data_length)
        stats = stream_data_section(zse, sink, fetchers=4, chunk_bytes=64 << 10)
        # every cut was made and the load went on; a cut is not always one failed read: in one
        # CI run under load two cuts gave one retry (not reproduced since), so count >= 1
        assert proxy.cuts == 2 and stats.retries >= 1
        with ZseFile(tiny_qwen2_zse) as local:
            assert np.array_equal(sink.memory, local.data)
    finally:
        proxy.close()


# -- the streaming pipeline with a host-memory sink ----------------------------------------


def _remote_zse(path, **fake):
    return ZseFile.from_source(FakeSource(path.read_bytes(), **fake))


def test_pipeline_consumes_out_of_order_chunks_in_order(tiny_qwen2_zse):
    with ZseFile(tiny_qwen2_zse) as local:
        expected, data_offset = np.array(local.data), local.header.data_offset
    chunk = 5000  # not a multiple of 4096: chunks split tensors and hold several small ones
    # later chunks finish first
    zse = _remote_zse(tiny_qwen2_zse, delay=lambda offset: 0.002 * (7 - (offset // chunk) % 8))
    sink = HostSink(zse.header.data_length)
    stats = stream_data_section(zse, sink, fetchers=4, chunk_bytes=chunk, ring_slots=6)
    finished = [o for o in zse.source.finished if o >= data_offset]
    assert finished != sorted(finished)  # the fetches really completed out of order
    assert [offset for offset, _ in sink.copies] == list(range(0, zse.header.data_length, chunk))
    assert np.array_equal(sink.memory, expected)
    assert stats.chunks == len(sink.copies) and stats.bytes == zse.header.data_length
    assert zse.source.max_active <= 4


def test_pipeline_ring_bounds_chunks_in_flight(tiny_qwen2_zse):
    """A fetcher never runs more than `ring_slots` chunks ahead of the consumer."""
    chunk, slots = 8192, 3
    sink = HostSink(0)
    ahead: list[int] = []

    def delay(offset):
        if offset >= data_offset:
            ahead.append((offset - data_offset) // chunk - len(sink.copies))
        return 0.0

    data_offset = ZseFile(tiny_qwen2_zse).header.data_offset
    zse = _remote_zse(tiny_qwen2_zse, delay=delay)
    sink.memory = np.zeros(zse.header.data_length, np.uint8)
    slow_copy = sink.copy
    sink.copy = lambda offset, view: (time.sleep(0.003), slow_copy(offset, view))
    stream_data_section(zse, sink, fetchers=3, chunk_bytes=chunk, ring_slots=slots)
    assert max(ahead) == slots - 1  # reached (the consumer is the slow side), never passed
    assert len(ahead) == zse.header.data_length // chunk + (
        zse.header.data_length % chunk > 0)


def test_pipeline_checksum_mismatch_aborts_and_removes_the_mirror(tiny_qwen2_zse, tmp_path):
    blob = bytearray(tiny_qwen2_zse.read_bytes())
    with ZseFile(tiny_qwen2_zse) as local:
        info = local.tensors["layers.0.qkv"]
        blob[local.header.data_offset + info.offset + info.nbytes - 1] ^= 0x80  # its last byte
    zse = ZseFile.from_source(FakeSource(bytes(blob)))
    final = tmp_path / "copy.zse"
    mirror = MirrorFile(final, zse.head, zse.source.size)
    with pytest.raises(ZseFormatError) as caught:
        stream_data_section(zse, HostSink(zse.header.data_length), mirror, fetchers=3,
                            chunk_bytes=4096 * 3)
    assert "tensor 'layers.0.qkv'" in str(caught.value) and info.xxh64 in str(caught.value)
    assert "SECRET" not in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_pipeline_fetch_failure_aborts_every_fetcher(tiny_qwen2_zse, tmp_path):
    data_offset = ZseFile(tiny_qwen2_zse).header.data_offset

    def fail(offset):
        if offset >= data_offset + 3 * 8192:
            raise PermissionError("403 Forbidden")

    zse = _remote_zse(tiny_qwen2_zse, fail=fail, delay=lambda offset: 0.001)
    mirror = MirrorFile(tmp_path / "copy.zse", zse.head, zse.source.size)
    with pytest.raises(RemoteAccessDenied, match="fake://bucket/model.zse: access denied"):
        stream_data_section(zse, HostSink(zse.header.data_length), mirror, fetchers=4,
                            chunk_bytes=8192)
    assert zse.source.active == 0  # every fetcher stopped before the call returned
    assert list(tmp_path.iterdir()) == []


def test_pipeline_mirror_is_the_exact_file(tiny_qwen2_zse, tmp_path):
    zse = _remote_zse(tiny_qwen2_zse, delay=lambda offset: 0.0005)
    final = tmp_path / "copy.zse"
    mirror = MirrorFile(final, zse.head, zse.source.size)
    stream_data_section(zse, None, mirror, fetchers=5, chunk_bytes=12288)
    assert not final.exists()  # only commit() publishes it
    mirror.commit()
    assert hashlib.sha256(final.read_bytes()).digest() == hashlib.sha256(
        tiny_qwen2_zse.read_bytes()).digest()
    assert [p.name for p in tmp_path.iterdir()] == ["copy.zse"]


def test_remote_zsefile_reads_the_manifest_in_one_request(tiny_qwen2_zse):
    reads: list[tuple[int, int]] = []
    source = FakeSource(tiny_qwen2_zse.read_bytes())
    original = source.read_into
    source.read_into = lambda offset, view: (reads.append((offset, len(view))), original(offset, view))[1]
    zse = ZseFile.from_source(source)
    assert reads == [(0, source.size)]  # a small file: the 1 MiB prefetch covers it
    assert zse.data is None and zse.head == tiny_qwen2_zse.read_bytes()[:zse.header.data_offset]
    with pytest.raises(RuntimeError, match="not mapped"):
        zse.raw("final_norm")

    reads.clear()
    zse = ZseFile.from_source(source, prefetch=4096)  # a manifest longer than the prefetch
    assert reads == [(0, 4096), (4096, zse.header.data_offset - 4096)]


def test_missing_extra_names_what_to_install(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "s3fs", None)  # as if not installed
    with pytest.raises(ImportError, match=r"s3:// URLs need the s3fs package: pip install 'zse\[remote\]'"):
        open_source("s3://bucket/model.zse")
    with pytest.raises(ImportError, match="gcsfs") as caught:  # gcsfs is not installed here
        open_source("gs://bucket/model.zse?token=SECRET")
    assert "SECRET" not in str(caught.value) and "gs://bucket/model.zse: no filesystem" in str(caught.value)


def test_concurrent_downloads_into_one_cache_name(tiny_qwen2_zse, tmp_path):
    """Two starts filling the same cache entry at once: each writes its own temporary file and
    renames it into place, so the result is one complete, correct file and no leftovers."""
    from zse_runtime.streaming import download_to_file

    final = tmp_path / "cache" / "model.zse"
    errors: list[BaseException] = []

    def start():
        try:
            zse = _remote_zse(tiny_qwen2_zse, delay=lambda offset: 0.001)
            download_to_file(zse, final, fetchers=3, chunk_bytes=16384)
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert [p.name for p in final.parent.iterdir()] == ["model.zse"]
    assert final.read_bytes() == tiny_qwen2_zse.read_bytes()


# -- the GPU loader's device side, against a fake driver that defers copies like a stream -----


class _FakeDriver:
    """PinnedBuffer / Stream / Event stand-ins over host memory. A copy runs only when its
    stream or a later event is synchronized, as on a GPU, so refilling a staging buffer before
    its copy has finished corrupts the "device" bytes and fails the test."""

    def __init__(self):
        self.pinned: list = []
        self.pending: list[tuple[int, int, int]] = []
        driver = self

        class PinnedBuffer:
            def __init__(self, nbytes):
                self.array = np.zeros(nbytes, np.uint8)
                self.pointer = self.array.ctypes.data
                self.closed = False
                driver.pinned.append(self)

            def close(self):
                self.closed = True

        class Stream:
            def copy_to_device(self, device_pointer, host_pointer, nbytes):
                driver.pending.append((device_pointer, host_pointer, nbytes))

            def synchronize(self):
                driver.flush(len(driver.pending))

        class Event:
            def record(self, stream):
                self.mark = len(driver.pending)

            def synchronize(self):
                driver.flush(self.mark)

        self.PinnedBuffer, self.Stream, self.Event = PinnedBuffer, Stream, Event
        self.flushed = 0
        self.lock = threading.Lock()

    def flush(self, upto: int) -> None:
        import ctypes

        with self.lock:
            for device_pointer, host_pointer, nbytes in self.pending[self.flushed:upto]:
                ctypes.memmove(device_pointer, host_pointer, nbytes)
            self.flushed = max(self.flushed, upto)


class _FakeContext:
    def make_current(self):
        pass


@pytest.fixture
def fake_gpu(monkeypatch):
    from zse_runtime import streaming
    from zse_runtime.gpu import driver

    fake = _FakeDriver()
    for name in ("PinnedBuffer", "Stream", "Event"):
        monkeypatch.setattr(driver, name, getattr(fake, name))
    monkeypatch.setattr(streaming, "CHUNK_BYTES", 12288)
    monkeypatch.setattr(streaming, "FETCHERS", 3)
    return fake


def test_upload_weights_streams_remote_bytes_to_the_device(fake_gpu, tiny_qwen2_zse, tmp_path):
    """Everything after the embedding reaches the device, byte for byte; the embedding's bytes
    come back in host memory (the local file's own map, or a copy out of the stream)."""
    from zse_runtime.engine import StartupTimes
    from zse_runtime.gpu.loader import upload_weights

    with ZseFile(tiny_qwen2_zse) as local:
        embed = local.tensors["embed_tokens"]
        window = device_window_start(local)
        assert embed.offset == 0 and window >= embed.nbytes  # the converter writes it first
        expected = np.array(local.data)
        device = np.zeros(local.header.data_length - window, np.uint8)
        host = upload_weights(local, device.ctypes.data, window, _FakeContext())  # local fast path
        assert np.array_equal(device, expected[window:])
        assert np.shares_memory(host, local.data)
        assert np.array_equal(host, expected[embed.offset:embed.offset + embed.nbytes])

    fake_gpu.pinned.clear()
    device[:] = 0
    zse = _remote_zse(tiny_qwen2_zse, delay=lambda offset: 0.0002 * (offset % 3))
    zse.mirror = tmp_path / "cache" / "copy.zse"
    startup = StartupTimes()
    host = upload_weights(zse, device.ctypes.data, window, _FakeContext(), startup)
    assert np.array_equal(device, expected[window:])
    assert np.array_equal(host, expected[embed.offset:embed.offset + embed.nbytes])
    assert len(fake_gpu.pinned) == 6 and all(b.closed for b in fake_gpu.pinned)  # 3 fetchers x 2
    assert set(startup.stages) == {"download (overlapped)", "verify+copy (overlapped)"}
    assert zse.mirror.read_bytes() == tiny_qwen2_zse.read_bytes()


def test_a_local_upload_stops_the_read_ahead_once_it_reaches_it(fake_gpu, tiny_qwen2_zse,
                                                                monkeypatch):
    """zse-run reads the device window ahead from the manifest on (`starter.read_ahead`). The
    upload goes through what it has read while it keeps reading (the disk stays busy), and
    ends it when its own reads reach bytes the read-ahead has not read: the read-ahead finishes
    the chunk under way and reads no other; the device gets every byte all the same."""
    from zse_runtime import zsefile
    from zse_runtime.gpu import loader, starter
    from zse_runtime.gpu.loader import upload_weights

    monkeypatch.setattr(zsefile, "PREFETCH_CHUNK", 4096)
    monkeypatch.setattr(loader, "CHUNK_BYTES", 4096)
    monkeypatch.setattr(loader, "READERS", 1)  # one upload reader: chunks in file order
    held, gate, real_preadv = threading.Event(), threading.Event(), os.preadv
    ahead, uploads = [], []
    reader = None

    def preadv(fd, buffers, offset):
        if threading.current_thread().name == "zse-prefetch":
            ahead.append(offset)
            if len(ahead) == 3:  # it holds in its third read until the upload has reached it
                held.set()
                gate.wait(10)
        else:  # an upload read: was the read-ahead told to stop by then?
            uploads.append((offset, reader._stop_reading.is_set()))
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    with ZseFile(tiny_qwen2_zse) as local:
        window = device_window_start(local)
        first = local.header.data_offset + window
        assert local.header.data_length - window > 4 * 4096
        reader = starter.read_ahead(local)
        assert held.wait(10)
        assert reader.position == first + 2 * 4096  # two chunks read, the third under way
        device = np.zeros(local.header.data_length - window, np.uint8)
        upload_weights(local, device.ctypes.data, window, _FakeContext())
        gate.set()
        reader.join(10)
        assert not reader.is_alive()
        assert ahead == [first, first + 4096, first + 2 * 4096]  # no fourth read
        # the two chunks it had read were uploaded while it kept reading; the third stopped it
        assert uploads[:3] == [(first, False), (first + 4096, False), (first + 2 * 4096, True)]
        assert np.array_equal(device, np.array(local.data)[window:])


def test_upload_weights_checksum_failure_frees_buffers_and_leaves_no_cache(fake_gpu, tiny_qwen2_zse,
                                                                          tmp_path):
    from zse_runtime.gpu.loader import upload_weights

    blob = bytearray(tiny_qwen2_zse.read_bytes())
    with ZseFile(tiny_qwen2_zse) as local:
        blob[local.header.data_offset + local.tensors["lm_head"].offset + 5] ^= 0x04
    zse = ZseFile.from_source(FakeSource(bytes(blob)))
    zse.mirror = tmp_path / "copy.zse"
    window = device_window_start(zse)
    device = np.zeros(zse.header.data_length - window, np.uint8)
    with pytest.raises(ZseFormatError, match="tensor 'lm_head'"):
        upload_weights(zse, device.ctypes.data, window, _FakeContext())
    assert fake_gpu.pinned and all(b.closed for b in fake_gpu.pinned)
    assert fake_gpu.flushed == len(fake_gpu.pending)  # every issued copy finished first
    assert list(tmp_path.iterdir()) == []


def test_python_m_zse_runtime_from_s3(moto, tiny_qwen2_zse):
    from tests.conftest import run_module

    engine = Engine.open(tiny_qwen2_zse, device="cpu")
    expected = engine.tokenizer.decode(list(engine.generate("the license", 8)))
    result = run_module("zse_runtime", f"s3://{BUCKET}/tiny.zse", "the license", "-n", "8",
                        "--device", "cpu", env=moto.env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
    missing = run_module("zse_runtime", f"s3://{BUCKET}/gone.zse", "hi", "--device", "cpu",
                         env=moto.env)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert f"error: s3://{BUCKET}/gone.zse: not found" in missing.stderr
