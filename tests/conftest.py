"""Shared fixtures: tiny random checkpoints (built once per session) and their conversions."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# Kernel tests run in numba's CUDA simulator; it must be chosen before numba is imported.
os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import pytest  # noqa: E402

from tests.checkpoints import make_checkpoint  # noqa: E402
from zse_convert.convert import ConvertOptions, convert

REPO = Path(__file__).resolve().parent.parent


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


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300):
    """Run `zse-convert` as a user would: a fresh process, its exit code, stdout and stderr."""
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = f"{REPO}{os.pathsep}{full_env.get('PYTHONPATH', '')}"
    return subprocess.run([sys.executable, "-m", "zse_convert.cli", *args], capture_output=True,
                          text=True, env=full_env, timeout=timeout, cwd=REPO)
