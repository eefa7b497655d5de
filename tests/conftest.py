"""Shared fixtures: tiny random checkpoints (built once per session) and their conversions."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# Kernel tests run in numba's CUDA simulator; it must be chosen before numba is imported.
os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import pytest  # noqa: E402

from tests import simulator_scheduler  # noqa: E402
from tests.checkpoints import make_checkpoint  # noqa: E402
from zse_convert.convert import ConvertOptions, convert

REPO = Path(__file__).resolve().parent.parent
simulator_scheduler.install()


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("qwen2") / "ckpt", "qwen2", dtype="bfloat16")


@pytest.fixture(scope="session")
def tiny_llama_tied(tmp_path_factory) -> Path:
    # float16 and sharded: the other input paths.
    return make_checkpoint(tmp_path_factory.mktemp("llama") / "ckpt", "llama", dtype="float16",
                           tied=True, shard_mb=0.3)


@pytest.fixture(scope="session")
def tiny_qwen2_zse(tiny_qwen2, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("qwen2_zse") / "tiny.zse"
    convert(str(tiny_qwen2), out, ConvertOptions())
    return out


def run_module(module: str, *args: str, env: dict[str, str] | None = None, timeout: float = 300):
    """Run `python -m module args` as a user would: a fresh process, its exit code and output."""
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = f"{REPO}{os.pathsep}{full_env.get('PYTHONPATH', '')}"
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True,
                          text=True, env=full_env, timeout=timeout, cwd=REPO)


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300):
    """`zse-convert args` in a fresh process."""
    return run_module("zse_convert.cli", *args, env=env, timeout=timeout)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """`zse-run` in a subprocess on a free loopback port."""

    def __init__(self, model: Path, *args: str, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"zse-run-{self.port}.log", "w+")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "zse_runtime.cli", str(model), "--port", str(self.port),
             "--device", "cpu", *args], env=full_env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 120) -> "LiveServer":
        import time

        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.output()
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise TimeoutError(self.output())

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-5000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log.close()
