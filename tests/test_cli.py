"""`zse-convert` as users run it: fresh processes, exit codes, output, the Hub cache, signals."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.checkpoints import make_checkpoint
from tests.conftest import REPO, run_cli
from zse_runtime.zsefile import ZseFile

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_convert_inspect_verify(tiny_qwen2, tmp_path):
    out = tmp_path / "cli.zse"
    result = run_cli(str(tiny_qwen2), "--out", str(out), "--group-size", "64", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["output"] == str(out) and summary["architecture"] == "qwen2"
    assert summary["group_size"] == 64 and summary["group_size_fallbacks"] == {}
    assert summary["file_bytes"] == out.stat().st_size
    # 4 bits + two fp16 per 64 weights, per 32 in qkv (320 x 192 of the 319,488 per layer)
    assert summary["int4_bits_per_weight"] == round((4.5 * 319488 + 0.5 * 320 * 192) / 319488, 4)

    inspected = run_cli("inspect", str(out), "--json")
    assert inspected.returncode == 0, inspected.stderr
    data = json.loads(inspected.stdout)
    assert data["header"]["data_offset"] % 4096 == 0
    assert data["manifest"]["model"]["architecture"] == "qwen2"
    assert data["manifest"]["tokenizer"]["tokenizer_json"].endswith("bytes>")
    assert len(data["manifest"]["tensors"]) == 17

    table = run_cli("inspect", str(out))
    assert table.returncode == 0 and "layers.1.gate_up" in table.stdout and "int4.rows.v1" in table.stdout

    verified = run_cli("verify", str(out))
    assert verified.returncode == 0 and "all checksums match" in verified.stdout

    with ZseFile(out) as zse:  # flip one bit inside a tensor
        info = zse.tensors["layers.0.o_proj"]
        position = zse.header.data_offset + info.offset + 100
    blob = bytearray(out.read_bytes())
    blob[position] ^= 0x10
    out.write_bytes(blob)
    broken = run_cli("verify", str(out), "--json")
    assert broken.returncode == 1
    report = json.loads(broken.stdout)
    assert [c["tensor"] for c in report["corrupt"]] == ["layers.0.o_proj"] and not report["ok"]
    plain = run_cli("verify", str(out))
    assert plain.returncode == 1 and "checksum mismatch" in plain.stderr and "layers.0.o_proj" in plain.stderr


def test_default_command_and_human_summary(tiny_qwen2, tmp_path):
    out = tmp_path / "human.zse"
    result = run_cli("convert", str(tiny_qwen2), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "bits per weight" in result.stdout and "group size fallback" in result.stdout
    assert "clipping search (down_proj columns weighted)" in result.stdout


def test_gptq_with_a_calibration_file(tiny_qwen2, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text((REPO / "formats" / "zse-v1.md").read_text() * 3)
    out = tmp_path / "gptq.zse"
    result = run_cli(str(tiny_qwen2), "--out", str(out), "--gptq", "--calibration", str(text),
                     "--calibration-tokens", "1024")
    assert result.returncode == 0, result.stderr
    assert "GPTQ on 1024 tokens of calib.txt" in result.stdout
    inspected = json.loads(run_cli("inspect", str(out), "--json").stdout)
    record = inspected["manifest"]["quantization"]["gptq"]
    assert record["calibration"] == "calib.txt" and record["tokens"] == 1024
    assert record["calibration_sha256"] == hashlib.sha256(text.read_bytes()).hexdigest()

    text.write_text("")
    empty = run_cli(str(tiny_qwen2), "--out", str(tmp_path / "empty.zse"), "--gptq",
                    "--calibration", str(text))
    assert empty.returncode == 1 and "holds 0 tokens" in empty.stderr
    assert "Traceback" not in empty.stderr and not (tmp_path / "empty.zse").exists()
    stray = run_cli(str(tiny_qwen2), "--out", str(tmp_path / "s.zse"), "--calibration", str(text))
    assert stray.returncode == 1 and "apply only with --gptq" in stray.stderr


def test_awq_option(tiny_qwen2, tmp_path):
    out = tmp_path / "awq.zse"
    result = run_cli(str(tiny_qwen2), "--out", str(out), "--awq", "--calibration-tokens", "512")
    assert result.returncode == 0, result.stderr
    assert "AWQ (clipping search) on 512 tokens of python-stdlib" in result.stdout
    quantization = json.loads(run_cli("inspect", str(out), "--json").stdout)["manifest"][
        "quantization"]
    assert quantization["gptq"] is None and quantization["awq"]["tokens"] == 512
    assert len(quantization["awq"]["alpha"]["down_proj"].split()) == 2

    text = tmp_path / "calib.txt"
    text.write_text("")
    empty = run_cli(str(tiny_qwen2), "--out", str(tmp_path / "empty.zse"), "--awq",
                    "--calibration", str(text))
    assert empty.returncode == 1 and "holds 0 tokens" in empty.stderr
    assert "Traceback" not in empty.stderr and not (tmp_path / "empty.zse").exists()


@pytest.mark.parametrize("args,message", [
    (["inspect", "missing.zse"], "No such file"),
    (["verify", "pyproject.toml"], "bad magic"),
    (["no/such-repo-offline", "--out", "x.zse"], "not in the local Hub cache"),
    (["./nowhere", "--out", "x.zse"], "neither an existing folder nor a Hub repo id"),
])
def test_errors_are_one_clear_line(args, message, tmp_path):
    result = run_cli(*args, env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (REPO / "x.zse").exists()


def _lay_out_hub_cache(folder, hf_home, repo_id):
    """The layout huggingface_hub itself writes: blobs by hash, refs, symlinked snapshots."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for file in folder.iterdir():
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        (repo / "blobs" / digest).write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(os.path.join("..", "..", "blobs", digest))


def test_hub_repo_id_through_offline_cache(tiny_qwen2, tmp_path):
    hf_home = tmp_path / "hf"
    _lay_out_hub_cache(tiny_qwen2, hf_home, "zse-test/tiny-qwen2")
    env = {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "hub.zse"
    result = run_cli("zse-test/tiny-qwen2", "--out", str(out), "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["commit"] == COMMIT
    with ZseFile(out) as zse:
        prov = zse.manifest["provenance"]
    assert (prov["source"], prov["source_kind"], prov["revision"], prov["commit"]) == (
        "zse-test/tiny-qwen2", "hub", None, COMMIT)

    pinned = run_cli("zse-test/tiny-qwen2", "--revision", COMMIT, "--out", str(out), "--json",
                     env=env)
    assert pinned.returncode == 0 and json.loads(pinned.stdout)["commit"] == COMMIT
    missing = run_cli("zse-test/tiny-qwen2", "--revision", "v9", "--out", str(tmp_path / "v9.zse"),
                      env=env)
    assert missing.returncode == 1 and "zse-test/tiny-qwen2@v9 is not in the local Hub cache" in missing.stderr
    assert not (tmp_path / "v9.zse").exists()


@pytest.fixture(scope="module")
def medium_checkpoint(tmp_path_factory):
    """Big enough (~100 M parameters) that conversion takes seconds, so a signal lands mid-way."""
    return make_checkpoint(tmp_path_factory.mktemp("medium") / "ckpt", "llama", hidden_size=1024,
                           intermediate_size=4096, num_hidden_layers=4, num_attention_heads=8,
                           num_key_value_heads=2, vocab_size=16000)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_mid_conversion_leaves_nothing(medium_checkpoint, tmp_path, signum):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "zse_convert.cli", str(medium_checkpoint),
                             "--out", str(out_dir / "m.zse")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not any(p.name.endswith(".tmp") for p in out_dir.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    time.sleep(0.3)  # inside the quantization loop
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted; no output was written" in stderr
    assert list(out_dir.iterdir()) == []
