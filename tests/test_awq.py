"""AWQ (zse_convert/awq.py): the folds leave the float model unchanged, the scale search lowers
the output error on inputs with outlier channels, α = 0 is the plain conversion bit for bit, and
the converter records its choices."""

from __future__ import annotations

import numpy as np
import pytest

from tests.checkpoints import make_checkpoint
from tests.reference import float_calibration, logit_distances
from zse_convert.awq import (AwqOptions, channel_scales, fold_into_up, fold_into_v,
                             search_scales, shared_by_kv_heads)
from zse_convert.calibration import WINDOW, _rmsnorm
from zse_convert.convert import ConvertOptions, convert
from zse_convert.gptq import output_error
from zse_convert.quantize import quantize_int4
from zse_convert.source import SourceError
from zse_runtime.zsefile import ZseFile, dequantize_int4


def _outlier_inputs(tokens: int, cols: int, seed: int = 0) -> np.ndarray:
    """Activations with a few channels ~100x the median, as in Qwen2.5's MLP inputs."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, cols)) * np.exp(rng.standard_normal(cols) * 0.5)
    x[:, rng.choice(cols, 8, replace=False)] *= 100
    return x.astype(np.float32)


def test_channel_scales_are_normalised_and_one_at_alpha_zero():
    m = np.array([0.01, 0.1, 1.0, 10.0, 0.0])
    assert np.array_equal(channel_scales(m, 0.0), np.ones(5, np.float32))
    s = channel_scales(m, 0.5)
    assert s.max() * s.min() == pytest.approx(1.0, rel=1e-5)
    assert np.all(np.diff(s[:4]) > 0) and np.isfinite(s).all() and (s > 0).all()


def test_fold_into_v_and_up_keep_the_float_outputs():
    """Attention (GQA, 6 query heads over 2 kv heads) and the gated MLP in numpy: dividing v's
    rows and bias (up's rows) by the consumer's scales and multiplying the consumer's columns by
    them gives the same outputs."""
    rng = np.random.default_rng(0)
    heads, kv_heads, head_dim, hidden, inter, length = 6, 2, 4, 16, 24, 7
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    x = rng.standard_normal((length, hidden)).astype(np.float32)
    qkv = rng.standard_normal((q_size + 2 * kv_size, hidden)).astype(np.float32)
    bias = rng.standard_normal(q_size + 2 * kv_size).astype(np.float32)
    o_proj = rng.standard_normal((hidden, q_size)).astype(np.float32)

    def attention_out(qkv, bias, o_proj):
        y = x @ qkv.T + bias
        q = y[:, :q_size].reshape(length, heads, head_dim)
        k = y[:, q_size:q_size + kv_size].reshape(length, kv_heads, head_dim)
        v = y[:, q_size + kv_size:].reshape(length, kv_heads, head_dim)
        group = heads // kv_heads
        out = np.empty((length, heads, head_dim))
        for h in range(heads):
            scores = q[:, h] @ k[:, h // group].T
            p = np.exp(scores - scores.max(-1, keepdims=True))
            out[:, h] = (p / p.sum(-1, keepdims=True)) @ v[:, h // group]
        return out.reshape(length, -1) @ o_proj.T

    s = channel_scales(shared_by_kv_heads(rng.random(q_size) + 0.1, heads, kv_heads), 1.0)
    folded_qkv, folded_bias = fold_into_v(qkv, bias, s, q_size, kv_size, heads, kv_heads)
    assert not np.allclose(folded_qkv, qkv)
    np.testing.assert_allclose(attention_out(folded_qkv, folded_bias, o_proj * s),
                               attention_out(qkv, bias, o_proj), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="share a v row"):  # scales not shared per kv head
        fold_into_v(qkv, bias, channel_scales(rng.random(q_size) + 0.1, 1.0), q_size, kv_size,
                    heads, kv_heads)

    gate_up = rng.standard_normal((2 * inter, hidden)).astype(np.float32)
    down = rng.standard_normal((hidden, inter)).astype(np.float32)

    def mlp_out(gate_up, down):
        gate, up = np.split(x @ gate_up.T, 2, axis=1)
        return (gate / (1 + np.exp(-gate)) * up) @ down.T

    s = channel_scales(rng.random(inter) + 0.1, 1.0)
    np.testing.assert_allclose(mlp_out(fold_into_up(gate_up, s), down * s), mlp_out(gate_up, down),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_folded_float_layer_gives_the_original_outputs(tmp_path, arch):
    """The calibrator with float propagation and a forced α = 1 (every fold active: norms, v rows
    and bias, up rows) leaves the residual stream after each layer what transformers computes."""
    ckpt, model, calibrator, _, states, hf = float_calibration(
        make_checkpoint(tmp_path / arch, arch, dtype="float32"), None, AwqOptions(alphas=(1.0,)))
    stream = None
    for layer in range(2):
        calibrator.weights(layer)
        stream = calibrator.hidden if stream is None else stream  # updated in place, then dropped
        assert set(calibrator.vectors) == {f"layers.{layer}.attn_norm", f"layers.{layer}.mlp_norm"} \
            | ({f"layers.{layer}.qkv_bias"} if model["qkv_bias"] else set())
        expected = states[layer + 1].numpy()
        ours = stream.reshape(expected.shape)
        if layer == 1:  # transformers' last hidden state is after the final norm
            ours = _rmsnorm(ours, hf.model.norm.weight.detach().numpy(), model["rms_norm_eps"])
        np.testing.assert_allclose(ours, expected, rtol=0, atol=2e-4 * np.abs(expected).max())
    assert calibrator.awq_alphas["down_proj"] == [1.0, 1.0]
    ckpt.close()


# Output error with AWQ over that without (the clipping search alone), 256 x 1024 Student-t
# weights, inputs with 8 of 1024 channels at 100x (seed 0), measured 2026-11-30: the outlier
# channels' weights dominate the error until they get finer steps (chosen α 0.5/0.45/0.45).
EXPECTED_AWQ_RATIO = {32: 0.0349, 64: 0.0550, 128: 0.0468}


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_awq_lowers_the_output_error_on_outlier_channels(group_size):
    x = _outlier_inputs(2048, 1024)
    w = (np.random.default_rng(1).standard_t(3, (256, 1024)) * 0.02).astype(np.float32)
    choice = search_scales(w, x, group_size, AwqOptions())
    assert choice.alpha > 0 and min(choice.errors) < choice.errors[0]
    scaled, _ = quantize_int4(w * choice.scales, group_size)
    searched, _ = quantize_int4(w, group_size)
    h = x.astype(np.float64).T @ x
    ratio = (output_error(w, dequantize_int4(scaled) / choice.scales, h)
             / output_error(w, dequantize_int4(searched), h))
    assert ratio == pytest.approx(EXPECTED_AWQ_RATIO[group_size], rel=0.1)
    assert choice.error_ratio == pytest.approx(ratio, rel=0.05)  # the search's own estimate
    # without outliers there is less to gain, and α = 0 bounds the loss on the search sample
    plain = np.random.default_rng(2).standard_normal((2048, 1024)).astype(np.float32)
    assert search_scales(w, plain, group_size, AwqOptions()).error_ratio <= 1.0


def test_alpha_zero_is_the_plain_conversion_bit_for_bit(tiny_qwen2, tmp_path):
    plain, awq = tmp_path / "plain.zse", tmp_path / "awq0.zse"
    # AWQ quantizes its scaled weights with the search alone: without the default's column
    # weights for down_proj (they stand in for the calibration inputs AWQ has)
    convert(str(tiny_qwen2), plain, ConvertOptions(group_size=64, column_weights=False))
    summary = convert(str(tiny_qwen2), awq, ConvertOptions(group_size=64, awq=True,
                                                         awq_alphas=(0.0,),
                                                         calibration_tokens=WINDOW))
    assert summary["awq"]["alpha"]["down_proj"] == "0.00 0.00"
    with ZseFile(plain) as a, ZseFile(awq) as b:
        assert [t.xxh64 for t in a.tensors.values()] == [t.xxh64 for t in b.tensors.values()]


def test_converter_with_awq_records_and_folds(tiny_qwen2, tmp_path):
    """End to end: the AWQ record in the manifest, norms that differ from the source by the
    folded scales, a valid file, and logits as close to the float model as the plain search's."""
    from tokenizers import Tokenizer

    plain, awq = tmp_path / "plain.zse", tmp_path / "awq.zse"
    convert(str(tiny_qwen2), plain, ConvertOptions(group_size=64))
    summary = convert(str(tiny_qwen2), awq, ConvertOptions(group_size=64, awq=True,
                                                         calibration_tokens=2 * WINDOW))
    record = summary["awq"]
    assert record["calibration"] == "python-stdlib" and record["tokens"] == 2 * WINDOW
    assert summary["gptq"] is None
    layers = 2
    for part in ("qkv", "o_proj", "gate_up", "down_proj"):
        alphas = [float(a) for a in record["alpha"][part].split()]
        ratios = [float(r) for r in record["error_ratio"][part].split()]
        assert len(alphas) == len(ratios) == layers
        assert all(a in record["alpha_grid"] for a in alphas) and all(0 < r <= 1 for r in ratios)
    with ZseFile(awq) as zse, ZseFile(plain) as reference:
        assert zse.manifest["quantization"]["awq"] == record
        assert list(zse.iter_corrupt()) == []
        assert reference.manifest["quantization"]["awq"] is None
        folded = [float(a) > 0 for a in record["alpha"]["qkv"].split()]
        for layer, changed in enumerate(folded):
            same = np.array_equal(zse.dequantized(f"layers.{layer}.attn_norm"),
                                  reference.dequantized(f"layers.{layer}.attn_norm"))
            assert same != changed

    ids = Tokenizer.from_str((tiny_qwen2 / "tokenizer.json").read_text()).encode(
        "def main():\n    return sorted(items, key=len)\n" * 8).ids[:200]
    distance = logit_distances(tiny_qwen2, [plain, awq], ids)
    assert distance["awq"] < 1.05 * distance["plain"], distance


def test_bad_awq_options_fail_before_any_output(tiny_qwen2, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("too short " * 20)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(SourceError, match="are needed"):
        convert(str(tiny_qwen2), out_dir / "m.zse", ConvertOptions(awq=True, calibration=str(text)))
    with pytest.raises(SourceError, match="hundredths"):
        convert(str(tiny_qwen2), out_dir / "m.zse", ConvertOptions(awq=True, awq_alphas=(1.5,)))
    assert list(out_dir.iterdir()) == []
