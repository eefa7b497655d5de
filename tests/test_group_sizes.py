"""Per-projection group sizes (`zse-convert --group-size-for KIND=SIZE`): what reaches the file,
what stays the default, the manifest record, and how bad values fail."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from tests.conftest import REPO, run_cli
from tests.test_convert import (_assert_nothing_written, _expected, _source_tensors,
                                down_proj_column_weight_of)
from tests.test_quantize import reference_quantize
from zse_convert.convert import (QUANTIZED_PARTS, ConvertOptions, convert,
                                 parse_group_size_override)
from zse_convert.source import SourceError
from zse_runtime.zsefile import ZseFile, int4_section_sizes


def _table(path) -> tuple[dict, dict[str, dict], int]:
    with ZseFile(path) as zse:
        return zse.manifest, {t["name"]: t for t in zse.manifest["tensors"]}, zse.header.data_offset


def test_override_reaches_the_bytes_and_nothing_else_moves(tiny_qwen2, tiny_qwen2_zse, tmp_path):
    out = tmp_path / "down32.zse"
    summary = convert(str(tiny_qwen2), out, ConvertOptions(group_size_overrides={"down_proj": 32}))
    manifest, tensors, data_offset = _table(out)
    _, default, _ = _table(tiny_qwen2_zse)  # the same checkpoint with no override

    assert manifest["quantization"]["group_size"] == 128
    # the default's qkv=32 stays beside the override
    assert manifest["quantization"]["group_size_overrides"] == {"qkv": 32, "down_proj": 32}
    assert summary["group_size_overrides"] == {"qkv": 32, "down_proj": 32}
    # hidden 192 is no multiple of 128: o_proj and gate_up fall back to 96 as before; qkv and
    # down_proj got what was asked for them, so they are no fallbacks
    assert set(summary["group_size_fallbacks"]) == {
        f"layers.{i}.{kind}" for i in range(2) for kind in ("o_proj", "gate_up")}

    blob = out.read_bytes()
    src = _source_tensors(tiny_qwen2)
    for name, entry in tensors.items():
        if not name.endswith(".down_proj"):  # every other tensor: the default's bytes exactly
            assert {**entry, "offset": None} == {**default[name], "offset": None}, name
            continue
        assert entry["group_size"] == 32 and default[name]["group_size"] == 128
        rows, cols = entry["shape"]
        packed, scale_bytes, zero_bytes = int4_section_sizes(rows, cols, 32)
        assert entry["nbytes"] == packed + scale_bytes + zero_bytes
        assert scale_bytes == rows * (cols // 32) * 2 == 4 * (default[name]["nbytes"] - packed) // 2
        start = data_offset + entry["offset"] + packed
        scales = np.frombuffer(blob[start:start + scale_bytes], "<f2").reshape(rows, cols // 32)
        zeros = np.frombuffer(blob[start + scale_bytes:start + scale_bytes + zero_bytes],
                              "<f2").reshape(rows, cols // 32)
        column_weight = down_proj_column_weight_of(name, src)
        _, want_scales, want_zeros, _, _ = reference_quantize(_expected(name, src), 32,
                                                              column_weight=column_weight)
        np.testing.assert_array_equal(scales, want_scales, name)
        np.testing.assert_array_equal(zeros, want_zeros, name)


def test_the_default_puts_qkv_at_32_and_an_override_replaces_it(tiny_qwen2, tiny_qwen2_zse,
                                                                  tmp_path):
    _, default, _ = _table(tiny_qwen2_zse)
    with ZseFile(tiny_qwen2_zse) as zse:
        assert zse.manifest["quantization"]["group_size_overrides"] == {"qkv": 32}
        assert zse.int4("layers.1.qkv").scales.shape == (320, 192 // 32)
    assert [default[f"layers.1.{kind}"]["group_size"] for kind in QUANTIZED_PARTS] == [
        32, 96, 96, 128]

    # qkv=128 asks for one size everywhere: qkv then falls back to 96 like o_proj and gate_up
    uniform = tmp_path / "uniform.zse"
    summary = convert(str(tiny_qwen2), uniform, ConvertOptions(group_size_overrides={"qkv": 128}))
    manifest, tensors, _ = _table(uniform)
    assert manifest["quantization"]["group_size_overrides"] == summary["group_size_overrides"] == {}
    assert summary["group_size_fallbacks"]["layers.0.qkv"] == 96
    for name, entry in tensors.items():
        if not name.endswith(".qkv"):
            assert {**entry, "offset": None} == {**default[name], "offset": None}, name
        else:
            assert entry["group_size"] == 96

    # at -g 32 the default asks nothing different from the base, and the manifest says so
    manifest, _, _ = _table(convert(str(tiny_qwen2), tmp_path / "g32.zse",
                                    ConvertOptions(group_size=32))["output"])
    assert manifest["quantization"]["group_size_overrides"] == {}


def test_override_above_the_base_and_its_fallback(tiny_qwen2, tmp_path):
    """g64 with down_proj at 128 (384 inputs: divisible) and qkv at 128 (192: falls back to
    96, the largest supported size below 128 that divides it)."""
    out = tmp_path / "mix.zse"
    summary = convert(str(tiny_qwen2), out, ConvertOptions(
        group_size=64, group_size_overrides={"qkv": 128, "down_proj": 128}))
    manifest, tensors, _ = _table(out)
    assert manifest["quantization"]["group_size_overrides"] == {"qkv": 128, "down_proj": 128}
    groups = {name: t.get("group_size") for name, t in tensors.items()}
    assert [groups[f"layers.1.{kind}"] for kind in QUANTIZED_PARTS] == [96, 64, 64, 128]
    assert summary["group_size_fallbacks"] == {"layers.0.qkv": 96, "layers.1.qkv": 96}
    with ZseFile(out) as zse:
        assert zse.int4("layers.0.down_proj").scales.shape == (192, 3)
        assert zse.int4("layers.0.qkv").scales.shape == (320, 2)


@pytest.mark.parametrize("overrides,message", [
    ({"lm_head": 32}, "unknown projection kind 'lm_head'"),
    ({"down": 32}, "unknown projection kind 'down'; the INT4 projections of a layer are "
                   "['qkv', 'o_proj', 'gate_up', 'down_proj']"),
    ({"down_proj": 16}, "down_proj's group size must be one of [32, 64, 96, 128], got 16"),
    ({"gate_up": 32.0}, "gate_up's group size must be one of [32, 64, 96, 128], got 32.0"),
    ({"qkv": True}, "qkv's group size must be one of"),
])
def test_bad_overrides_fail_before_any_output(tiny_qwen2, tmp_path, overrides, message):
    with pytest.raises(SourceError, match="^--group-size-for: ") as raised:
        convert(str(tiny_qwen2), tmp_path / "m.zse", ConvertOptions(group_size_overrides=overrides))
    assert message in str(raised.value)
    _assert_nothing_written(tmp_path)


def test_parse_group_size_override():
    assert parse_group_size_override("down_proj=32") == ("down_proj", 32)
    assert parse_group_size_override(" gate_up = 64 ") == ("gate_up", 64)
    for text, message in [("down_proj", "expected KIND=SIZE"), ("down_proj=", "expected KIND=SIZE"),
                          ("=32", "expected KIND=SIZE"), ("down_proj=-32", "expected KIND=SIZE"),
                          ("down_proj=48", "got 48"), ("mlp=32", "unknown projection kind 'mlp'")]:
        with pytest.raises(SourceError, match=message):
            parse_group_size_override(text)


def test_cli_option(tiny_qwen2, tmp_path):
    out = tmp_path / "cli.zse"
    result = run_cli(str(tiny_qwen2), "--out", str(out), "--group-size-for", "down_proj=32",
                     "--group-size-for", "o_proj=32", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["group_size_overrides"] == {"qkv": 32, "o_proj": 32, "down_proj": 32}
    inspected = json.loads(run_cli("inspect", str(out), "--json").stdout)["manifest"]
    assert inspected["quantization"]["group_size_overrides"] == {
        "qkv": 32, "o_proj": 32, "down_proj": 32}
    assert {t["name"]: t.get("group_size") for t in inspected["tensors"]}["layers.0.o_proj"] == 32

    for args, message in [
        (["--group-size-for", "down_proj=16"],
         "down_proj's group size must be one of [32, 64, 96, 128]"),
        (["--group-size-for", "lm_head=32"], "unknown projection kind 'lm_head'"),
        (["--group-size-for", "down_proj"], "expected KIND=SIZE, e.g. down_proj=32"),
        (["--group-size-for", "down_proj=32", "--group-size-for", "down_proj=64"],
         "down_proj is given twice"),
    ]:
        bad = run_cli(str(tiny_qwen2), "--out", str(tmp_path / "bad.zse"), *args)
        assert bad.returncode == 2, (args, bad.stderr)
        text = " ".join(bad.stderr.replace("│", " ").split())  # rich wraps the usage error
        assert "Invalid value for '--group-size-for'" in text and message in text, text
        assert "Traceback" not in bad.stderr and not (tmp_path / "bad.zse").exists()


def test_eval_quality_counts_each_tensors_group_size(tiny_qwen2):
    sys.path.insert(0, str(REPO / "scripts"))
    from eval_quality import evaluate

    windows = [list(range(5, 69)), list(range(100, 164))]
    results = evaluate(tiny_qwen2, windows, ["zse-g128", "zse-g128+down_proj=32"],
                       log=lambda line: None)
    # per layer: qkv 320x192 at g32 (the default), o_proj 192x192 and gate_up 768x192 at g96
    # (192 is no multiple of 128), down_proj 192x384 at g128 or g32; 4 bits, two fp16 per group
    qkv, other, down = 320 * 192, 192 * 192 + 768 * 192, 192 * 384
    for variant, down_group in (("zse-g128", 128), ("zse-g128+down_proj=32", 32)):
        bits = (qkv * (4 + 32 / 32) + other * (4 + 32 / 96) + down * (4 + 32 / down_group)) / (
            qkv + other + down)
        assert results[variant]["bits_per_weight"] == round(bits, 3)
        assert results[variant]["group_sizes"] == {"qkv": [32], "o_proj": [96], "gate_up": [96],
                                                   "down_proj": [down_group]}
    assert results["zse-g128+down_proj=32"]["kl_mean"] >= 0
    with pytest.raises(SourceError, match="unknown projection kind 'down'"):
        evaluate(tiny_qwen2, windows, ["zse-g128+down=32"], log=lambda line: None)


def test_eval_quality_ratio_interval_resamples_whole_windows():
    """The ratio of two losses with a paired bootstrap over windows. Perplexity: its point is
    the ratio of the increases over all windows; a variant whose every window adds half the
    baseline's NLL gets a narrow interval around it, and windows that disagree widen it. KL: the
    ratio of token-weighted mean KLs. Rows without per-window scores (older files) give no
    interval."""
    sys.path.insert(0, str(REPO / "scripts"))
    from eval_quality import ratio_interval

    fp16 = np.array([2.0, 2.5, 1.5, 3.0])
    tokens = [511, 511, 511, 300]
    results = {"fp16": {"window_nll": list(fp16)},
               "q4": {"window_nll": list(fp16 + 0.2), "window_kl": [0.2, 0.1, 0.3, 0.2]},
               "half": {"window_nll": list(fp16 + 0.1), "window_kl": [0.1, 0.05, 0.15, 0.1]},
               "mixed": {"window_nll": list(fp16 + [0.0, 0.2, 0.05, 0.15]),
                         "window_kl": [0.0, 0.2, 0.05, 0.3]},
               "old": {"perplexity": 9.0}}

    def mean(nll):
        return np.exp(np.dot(nll, tokens) / sum(tokens))

    point, low, high = ratio_interval(results, "half", "q4", tokens)
    assert point == pytest.approx((mean(fp16 + 0.1) - mean(fp16)) / (mean(fp16 + 0.2) - mean(fp16)))
    assert low - 1e-9 <= point <= high + 1e-9 and high - low < 0.02  # only the weights vary
    point, low, high = ratio_interval(results, "mixed", "q4", tokens)
    assert low < point < high and high - low > 0.2
    # KL: every window's KL is half the baseline's, whatever windows are drawn
    assert ratio_interval(results, "half", "q4", tokens, "kl") == pytest.approx((0.5, 0.5, 0.5))
    point, low, high = ratio_interval(results, "mixed", "q4", tokens, "kl")
    assert point == pytest.approx(np.dot([0.0, 0.2, 0.05, 0.3], tokens)
                                  / np.dot([0.2, 0.1, 0.3, 0.2], tokens))
    assert low < point < high
    assert ratio_interval(results, "old", "q4", tokens) is None
    assert ratio_interval(results, "fp16", "q4", tokens, "kl") is None
