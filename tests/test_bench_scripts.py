"""Smoke test of the issue-5 benchmarks on the CPU backend: scripts/bench_coldstart.py and
scripts/bench_decode.py run end to end (zse-run subprocesses, the transformers fp16 baseline, a
synthetic checkpoint converted once and shared) on the llama-tiny preset, and write JSON with
positive numbers where the CPU can measure, "skipped: no GPU" where it cannot, and both plots."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY = ["--device", "cpu", "--preset", "llama-tiny", "--baseline", "--runs", "1"]
SKIPPED = "skipped: no GPU"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench-work")


def run_script(name: str, out: Path, work: Path, *args: str) -> dict:
    result = subprocess.run([sys.executable, str(REPO / "scripts" / name), "--out", str(out),
                             "--work", str(work), *TINY, *args], capture_output=True, text=True,
                            cwd=REPO, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "median of 1 run(s)" in result.stdout  # the table comes last
    return json.loads((out / name.replace(".py", ".json")).read_text())


def positive(value) -> bool:
    return isinstance(value, (int, float)) and value > 0


def png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


def test_bench_coldstart_cpu(tmp_path, work):
    report = run_script("bench_coldstart.py", tmp_path, work, "--no-cold")
    zse = report["zse"]["warm"]["median"]
    for key in ("spawn_to_health_200_s", "spawn_to_first_token_s", "chat_request_to_first_token_s",
                "spawn_to_http_up_s", "engine_open_s"):
        assert positive(zse[key]), key
    assert zse["spawn_to_first_token_s"] > zse["spawn_to_health_200_s"]
    # the two processes' milestones: the HTTP stack imports before the first HTTP answer; the
    # engine's imports and the tokenizer (built from the manifest the engine process sends
    # before those imports) both before /health 200
    assert 0 < zse["spawn_to_http_import_s"] < zse["spawn_to_http_up_s"]
    assert 0 < zse["spawn_to_engine_import_s"] < zse["spawn_to_health_200_s"]
    assert 0 < zse["spawn_to_tokenizer_built_s"] < zse["spawn_to_health_200_s"]
    assert {"manifest", "tokenizer (overlapped)", "kernel_load"} <= set(zse["stages_s"])
    assert all(positive(v) for v in zse["stages_s"].values())
    assert zse["gpu_in_use_gib"] == SKIPPED
    assert report["zse"]["cold"] == "cold: not requested (--no-cold)"
    hf = report["transformers"]["warm"]["median"]
    assert hf["spawn_to_imported_s"] < hf["spawn_to_loaded_s"] < hf["spawn_to_first_token_s"]
    assert positive(hf["spawn_to_imported_s"]) and hf["gpu_in_use_gib"] == SKIPPED
    assert positive(report["models"]["conversion"]["convert_s"])
    assert report["settings"]["max_model_len"] == 4096 and report["settings"]["slots"] == 1
    assert png(tmp_path / "coldstart_waterfall.png")
    bytecode = report["bytecode"]
    assert bytecode["dont_write_bytecode"] == bool(sys.flags.dont_write_bytecode)
    assert {"numpy", "starlette", "tokenizers", "zse_runtime"} <= set(
        bytecode["package_init_compiled"])


def test_bench_coldstart_says_which_packages_lack_bytecode(tmp_path, monkeypatch):
    """A start-up figure depends on whether imports compile from source: the benchmark records
    it per package (compiled, not, or not installed)."""
    import compileall

    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    from bench_coldstart import bytecode_state

    package = tmp_path / "zse_probe_package"
    package.mkdir()
    (package / "__init__.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    names = ("zse_probe_package", "zse_no_such_package")
    assert bytecode_state(names)["package_init_compiled"] == {
        "zse_probe_package": False, "zse_no_such_package": None}
    assert compileall.compile_dir(str(package), quiet=1)
    assert bytecode_state(names)["package_init_compiled"]["zse_probe_package"] is True


def test_bench_decode_cpu(tmp_path, work):
    report = run_script("bench_decode.py", tmp_path, work, "--contexts", "16,64",
                        "--decode-tokens", "4", "--prefill", "16,32", "--streams", "1,2",
                        "--server-tokens", "4")
    engine = report["engine"]
    assert [(d["context"], d["sampling"]) for d in engine["decode"]] == [
        (16, "greedy"), (16, "sampled"), (64, "greedy"), (64, "sampled")]
    assert all(positive(d["tok_s"]) and d["gpu_step_ms"] == SKIPPED for d in engine["decode"])
    assert [p["prompt_tokens"] for p in engine["prefill"]] == [16, 32]
    assert all(positive(p["tok_s"]) for p in engine["prefill"])
    step = engine["bytes_per_step"]
    assert 0 < step["bytes_read"] < step["file_tensor_bytes"]  # the embedding is not read
    assert engine["roofline"] == SKIPPED and report["gemv"] == SKIPPED
    batched = report["batched"]["levels"]
    assert [level["streams"] for level in batched] == [1, 2]
    assert all(positive(level["decode_tok_s"]) and positive(level["prefill_128_ms"])
               and "gpu_step_ms" not in level for level in batched)
    levels = report["server"]["levels"]
    assert [level["streams"] for level in levels] == [1, 2]
    assert all(positive(level["aggregate_tok_s"]) for level in levels)
    hf = report["transformers"]
    assert [d["context"] for d in hf["decode"]] == [16, 64]
    assert all(positive(d["tok_s"]) for d in hf["decode"])
    assert hf["gpu_in_use_gib"] == SKIPPED
    assert png(tmp_path / "decode_concurrency.png")


def test_a_synthetic_zse_can_carry_a_real_tokenizer(tmp_path):
    """--tokenizer: the benchmarks' random .zse embeds the given tokenizer.json (start-up then
    pays for building it, as a real model's does) and ends generation at its <|im_end|>; one
    without that token is refused before anything is written."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    sys.path.insert(0, str(REPO / "scripts"))
    from benchlib import synthetic_model_config
    from make_synthetic_zse import write_random_zse

    from tests.checkpoints import build_tokenizer
    from zse_runtime.zsefile import ZseFile

    model = synthetic_model_config("llama-tiny", None)
    text = build_tokenizer(700).to_str()  # not the default synthetic one
    path = write_random_zse(tmp_path / "real.zse", model, tokenizer_json=text)
    section = ZseFile(path).manifest["tokenizer"]
    assert section["tokenizer_json"] == text
    assert section["eos_token_ids"] == [Tokenizer.from_str(text).token_to_id("<|im_end|>")]
    no_end = Tokenizer(WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).to_str()
    with pytest.raises(ValueError, match="im_end"):
        write_random_zse(tmp_path / "refused.zse", model, tokenizer_json=no_end)
    assert not (tmp_path / "refused.zse").exists()


def test_the_default_tokenizer_is_a_bpe_as_large_as_the_vocabulary(tmp_path):
    """Without --tokenizer the .zse carries a byte-level BPE trained on Python sources
    with as many ids as the model's vocabulary (152,064 at the 7B preset: as costly to build as
    a real one), <|im_end|> as its end token; it round-trips text and its merges apply."""
    from tokenizers import Tokenizer

    sys.path.insert(0, str(REPO / "scripts"))
    from benchlib import direct_zse, synthetic_model_config
    from make_synthetic_zse import write_random_zse

    from tests.checkpoints import synthetic_tokenizer_json
    from zse_runtime.zsefile import ZseFile

    model = dict(synthetic_model_config("llama-tiny", None), vocab_size=3000)
    section = ZseFile(write_random_zse(tmp_path / "t.zse", model)).manifest["tokenizer"]
    tokenizer = Tokenizer.from_str(section["tokenizer_json"])
    assert tokenizer.get_vocab_size() == 3000
    assert section["eos_token_ids"] == [tokenizer.token_to_id("<|im_end|>")]
    text = "def main(self, value):\n    return value  # Ünïcode 1234"
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids) == text and len(ids) < len(text.encode()) / 2
    with pytest.raises(ValueError, match="smaller than 256 bytes"):
        synthetic_tokenizer_json(256 + 21)
    # the benchmarks record its size (a host with too little Python source trains fewer ids)
    made = direct_zse(tmp_path, "llama-tiny", 1, "float16", lambda line: None).provenance
    assert made["tokenizer_ids"] == synthetic_model_config("llama-tiny", 1)["vocab_size"]


def test_a_synthetic_zse_has_the_converters_group_sizes(tmp_path):
    """The benchmarks' random .zse is laid out as zse-convert lays a checkpoint out (q/k/v at 32
    by default), takes --group-size-for like it, and its name and JSON say which layout."""
    sys.path.insert(0, str(REPO / "scripts"))
    from benchlib import direct_zse, synthetic_model_config
    from make_synthetic_zse import write_random_zse

    from tests.checkpoints import build_tokenizer
    from zse_runtime.zsefile import ZseFile

    model = synthetic_model_config("llama-tiny", 1)
    text = build_tokenizer(700).to_str()
    for overrides, want in (({}, {"qkv": 32}), ({"qkv": 128, "down_proj": 64}, {"down_proj": 64})):
        with ZseFile(write_random_zse(tmp_path / "g.zse", model, tokenizer_json=text,
                                      group_size_overrides=overrides)) as zse:
            assert zse.manifest["quantization"]["group_size_overrides"] == want
            groups = {name.split(".")[-1]: t.group_size for name, t in zse.tensors.items()
                      if name.startswith("layers.0.") and t.group_size}
        assert groups == {"qkv": 128, "o_proj": 128, "gate_up": 128, "down_proj": 128, **want}
    models = direct_zse(tmp_path, "llama-tiny", 1, "float16", lambda line: None)
    assert "-qkv32-" in models.zse.name
    assert models.provenance["group_size_overrides"] == {"qkv": 32}

    bad = subprocess.run([sys.executable, str(REPO / "scripts" / "make_synthetic_zse.py"),
                          str(tmp_path / "bad.zse"), "--group-size-for", "qkv=48"],
                         capture_output=True, text=True, cwd=REPO, timeout=120, check=False)
    assert bad.returncode == 2 and "qkv's group size must be one of [32, 64, 96, 128], got 48" in (
        bad.stderr) and "Traceback" not in bad.stderr
    assert not (tmp_path / "bad.zse").exists()


@pytest.mark.parametrize("args,message", [
    (["--tokenizer", "missing.json"], "--tokenizer missing.json does not exist"),
    (["--tokenizer", "README.md", "--zse", "README.md"], "keeps its own tokenizer")])
def test_tokenizer_option_refuses_what_it_cannot_apply(tmp_path, args, message):
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_coldstart.py"), "--out",
                             str(tmp_path), "--device", "cpu", *args], capture_output=True,
                            text=True, cwd=REPO, timeout=120, check=False)
    assert result.returncode != 0 and message in result.stderr + result.stdout
    assert not list(tmp_path.iterdir())
