"""A real S3-compatible server on loopback (moto's server mode, in a subprocess), and a TCP
proxy that drops connections mid-response: the remote-loading tests and the start-up benchmark
use them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time


def _free_port() -> int:
    # not tests.conftest.free_port: importing conftest switches numba to the CUDA simulator,
    # and scripts/bench_remote_start.py uses this module on real GPUs
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

# Credentials for the moto server; the secret is distinctive so tests can grep logs for it.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "AKIAZSETESTKEY000001",
    "AWS_SECRET_ACCESS_KEY": "zse-secret-3a9f7c1d-never-log-me",
    "AWS_SESSION_TOKEN": "zse-session-token-77b2e4-never-log-me",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class MotoServer:
    """`python -m moto.server` on a free loopback port. `env` holds the variables a client
    process needs (credentials and AWS_ENDPOINT_URL)."""

    def __init__(self, require_auth: bool = False):
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        server_env = {**os.environ, **CREDENTIALS}
        if require_auth:  # every request must be signed by a key moto's IAM knows: 403 for ours
            server_env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            env=server_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.env = {**CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint}
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    break
            except OSError:
                assert self.process.poll() is None and time.monotonic() < deadline, "moto died"
                time.sleep(0.05)

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            config=Config(signature_version="s3v4"),
                            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])

    def upload(self, bucket: str, key: str, body: bytes) -> str:
        """Put an object (creating the bucket); returns its ETag."""
        client = self.client()
        if bucket not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
            client.create_bucket(Bucket=bucket)
        return client.put_object(Bucket=bucket, Key=key, Body=body)["ETag"].strip('"')

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)


class FlakyProxy:
    """Forwards loopback TCP to `upstream_port`. When the bytes sent back to clients cross each
    of `cut_at` (a sorted list), it closes that connection mid-response, like a dropped link;
    `on_cut` runs at each cut (e.g. to kill the server). `cuts` counts the cuts made."""

    def __init__(self, upstream_port: int, cut_at: list[int], on_cut=None):
        self.upstream_port, self.cut_at, self.on_cut = upstream_port, list(cut_at), on_cut
        self.sent = 0
        self.cuts = 0
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
            except OSError:
                client.close()  # upstream dead: the client sees a dropped connection
                continue
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, source: socket.socket, target: socket.socket, to_client: bool) -> None:
        try:
            while True:
                data = source.recv(16384)
                if not data:
                    break
                if to_client:
                    with self.lock:
                        self.sent += len(data)
                        cut = bool(self.cut_at) and self.sent >= self.cut_at[0]
                        if cut:
                            self.cut_at.pop(0)
                            self.cuts += 1
                    if cut:
                        target.sendall(data[:len(data) // 2])
                        if self.on_cut:
                            self.on_cut()
                        break
                target.sendall(data)
        except OSError:
            pass
        for sock in (source, target):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def close(self) -> None:
        self.listener.close()
