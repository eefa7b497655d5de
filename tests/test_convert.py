"""End-to-end conversion of tiny random checkpoints: values, fusion, metadata, failures."""

from __future__ import annotations

import errno
import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.checkpoints import CHAT_TEMPLATE, make_checkpoint
from tests.test_quantize import reference_quantize, weighted_error
from zse_convert import convert as convert_module
from zse_convert.convert import ConvertOptions, convert
from zse_convert.importance import down_proj_column_weight, scaled_row_energy
from zse_convert.source import SourceError
from zse_runtime.zsefile import LAYOUT_DENSE, LAYOUT_INT4_ROWS, ZseFile, dequantize_int4


def _source_tensors(folder) -> dict[str, np.ndarray]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update({k: v.to(torch.float32).numpy() for k, v in load_file(file).items()})
    return tensors


FUSED = {
    "qkv": ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"],
    "qkv_bias": ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"],
    "o_proj": ["self_attn.o_proj.weight"],
    "gate_up": ["mlp.gate_proj.weight", "mlp.up_proj.weight"],
    "down_proj": ["mlp.down_proj.weight"],
    "attn_norm": ["input_layernorm.weight"],
    "mlp_norm": ["post_attention_layernorm.weight"],
}


def down_proj_column_weight_of(name: str, src: dict[str, np.ndarray]) -> np.ndarray:
    """layers.{i}.down_proj's search column weights, from the whole gate, up and post-attention
    norm tensors (the converter takes them chunk by chunk while it quantizes gate_up)."""
    prefix = f"model.layers.{name.split('.')[1]}."
    gate, up, norm = (src[prefix + p] for p in FUSED["gate_up"] + FUSED["mlp_norm"])
    return down_proj_column_weight(scaled_row_energy(gate, norm), scaled_row_energy(up, norm))


def _expected(name: str, src: dict[str, np.ndarray]) -> np.ndarray:
    if name == "embed_tokens":
        return src["model.embed_tokens.weight"]
    if name == "lm_head":
        return src.get("lm_head.weight", src["model.embed_tokens.weight"])
    if name == "final_norm":
        return src["model.norm.weight"]
    _, layer, part = name.split(".", 2)
    return np.concatenate([src[f"model.layers.{layer}.{p}"] for p in FUSED[part]])


@pytest.mark.parametrize("checkpoint", ["tiny_qwen2", "tiny_llama_tied"])
def test_every_tensor_matches_its_source(checkpoint, request, tmp_path):
    folder = request.getfixturevalue(checkpoint)
    out = tmp_path / "model.zse"
    summary = convert(str(folder), out, ConvertOptions(group_size=128))
    src = _source_tensors(folder)
    with ZseFile(out) as zse:
        assert zse.manifest["quantization"]["search_column_weights"] == {
            "down_proj": "gate_up_estimate"}
        assert [t["name"] for t in zse.manifest["tensors"]][:3] == [
            "embed_tokens", "layers.0.attn_norm", "layers.0.qkv"]
        for name, info in zse.tensors.items():
            expected = _expected(name, src)
            if info.layout == LAYOUT_DENSE:
                # embeddings: exact fp16 of the source; norms and biases: exact float32
                np.testing.assert_array_equal(zse.dense(name), expected.astype(info.dtype), name)
                continue
            assert info.layout == LAYOUT_INT4_ROWS
            # qkv: group 32 by default; hidden=192 is not a multiple of 128: the other tensors
            # with 192 inputs fall back to group 96
            want = 32 if name.endswith(".qkv") else 128 if expected.shape[1] % 128 == 0 else 96
            assert info.group_size == want, name
            weight = zse.int4(name)
            # down_proj's search weights its columns by importance.py's estimate (checked
            # against its formula in test_importance.py); the other kinds are unweighted
            column_weight = (down_proj_column_weight_of(name, src)
                             if name.endswith(".down_proj") else None)
            codes, scales, zeros, _, rtn_err = reference_quantize(expected, info.group_size,
                                                                  column_weight=column_weight)
            np.testing.assert_array_equal(weight.scales, scales, name)
            np.testing.assert_array_equal(weight.zeros, zeros, name)
            restored = dequantize_int4(weight)
            err = weighted_error(restored, expected, info.group_size, column_weight)
            assert (err <= rtn_err * (1 + 1e-6) + 1e-12).all(), name
            rel = np.linalg.norm(restored - expected) / np.linalg.norm(expected)
            assert rel < 0.12, (name, rel)
    assert set(summary["group_size_fallbacks"].values()) == {96}
    assert summary["error_vs_round_to_nearest"] < 0.95
    assert summary["search_column_weights"] == {"down_proj": "gate_up_estimate"}


def test_manifest_metadata(tiny_qwen2, tiny_qwen2_zse):
    with ZseFile(tiny_qwen2_zse) as zse:
        m = zse.manifest
    assert m["model"] == {
        "architecture": "qwen2", "vocab_size": 320, "hidden_size": 192,
        "intermediate_size": 384, "num_hidden_layers": 2, "num_attention_heads": 6,
        "num_key_value_heads": 2, "head_dim": 32, "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
        "rope_scaling": None, "max_position_embeddings": 512, "tie_word_embeddings": False,
        "qkv_bias": True, "o_bias": False, "sliding_window": None, "source_dtype": "bfloat16"}
    tok = m["tokenizer"]
    assert tok["tokenizer_json"] == (tiny_qwen2 / "tokenizer.json").read_text()
    assert tok["chat_template"] == CHAT_TEMPLATE
    assert tok["special_tokens"]["eos_token"] == "<|im_end|>"
    assert tok["eos_token_ids"] == [2] and tok["bos_token_id"] == 0
    assert m["generation"]["eos_token_id"] == 2
    assert m["quantization"]["group_size"] == 128 and m["quantization"]["lm_head"] == "float16"
    prov = m["provenance"]
    assert prov["source_kind"] == "local" and prov["commit"] is None
    assert prov["source_files"] == ["model.safetensors"]
    assert prov["converter"] == "zse-convert" and prov["created_utc"].endswith("Z")


def test_tied_embeddings_and_precision_options(tiny_llama_tied, tmp_path):
    out = tmp_path / "opts.zse"
    convert(str(tiny_llama_tied), out, ConvertOptions(group_size=32, lm_head="float16",
                                                      embedding="int4"))
    src = _source_tensors(tiny_llama_tied)
    assert "lm_head.weight" not in src
    with ZseFile(out) as zse:
        assert zse.model_config["tie_word_embeddings"] is True
        assert zse.model_config["qkv_bias"] is False and "layers.0.qkv_bias" not in zse.tensors
        lm_head = zse.dense("lm_head")
        assert lm_head.dtype == np.float16
        np.testing.assert_array_equal(lm_head, src["model.embed_tokens.weight"].astype(np.float16))
        embed = zse.tensors["embed_tokens"]
        assert embed.layout == LAYOUT_INT4_ROWS and embed.group_size == 32


def test_mistral_and_llama3_rope_scaling(tmp_path):
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 256, "rope_theta": 5e5}
    llama = make_checkpoint(tmp_path / "l3", "llama", rope_parameters=rope)
    mistral = make_checkpoint(tmp_path / "mi", "mistral", sliding_window=64)
    convert(str(llama), tmp_path / "l3.zse")
    convert(str(mistral), tmp_path / "mi.zse")
    with ZseFile(tmp_path / "l3.zse") as zse:
        assert zse.model_config["rope_theta"] == 5e5
        assert zse.model_config["rope_scaling"] == {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 256}
    with ZseFile(tmp_path / "mi.zse") as zse:
        assert zse.model_config["architecture"] == "mistral"
        assert zse.model_config["sliding_window"] == 64


def _edit_config(folder, tmp_path, **changes):
    copy = tmp_path / "edited"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    config.update(changes)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def _assert_nothing_written(folder):
    leftovers = [p.name for p in folder.iterdir() if p.name.endswith((".zse", ".tmp"))]
    assert leftovers == []


@pytest.mark.parametrize("changes,message", [
    ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"},
     "architecture 'GPT2LMHeadModel' is not supported; supported: llama (LlamaForCausalLM), "
     "mistral (MistralForCausalLM), qwen2 (Qwen2ForCausalLM)"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
     "rope scaling type 'yarn' is not supported"),
    ({"intermediate_size": 512}, "model.layers.0.mlp.gate_proj.weight"),
    ({"num_key_value_heads": 4}, "not a multiple of 4 key/value heads"),
])
def test_bad_checkpoints_fail_before_work_and_leave_nothing(tiny_qwen2, tmp_path, changes,
                                                             message):
    folder = _edit_config(tiny_qwen2, tmp_path, **changes)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(SourceError) as info:
        convert(str(folder), out_dir / "m.zse")
    assert message in str(info.value)
    _assert_nothing_written(out_dir)


def test_missing_tokenizer_and_weights(tiny_qwen2, tmp_path):
    folder = tmp_path / "no_tok"
    shutil.copytree(tiny_qwen2, folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(SourceError, match="tokenizer.json is missing"):
        convert(str(folder), tmp_path / "a.zse")
    for file in folder.glob("*.safetensors"):
        file.unlink()
    with pytest.raises(SourceError, match="no safetensors weights found"):
        convert(str(folder), tmp_path / "a.zse")


def test_truncated_safetensors_shard(tiny_qwen2, tmp_path):
    folder = tmp_path / "cut"
    shutil.copytree(tiny_qwen2, folder)
    shard = folder / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(SourceError, match="ends past the end of the file"):
        convert(str(folder), tmp_path / "a.zse")
    _assert_nothing_written(tmp_path)


def test_interrupted_conversion_leaves_nothing_and_keeps_an_existing_file(tiny_qwen2, tmp_path,
                                                                           monkeypatch):
    out = tmp_path / "model.zse"
    out.write_bytes(b"previous good file")
    calls = {"n": 0}
    real = convert_module.quantize_int4

    def interrupt_midway(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(convert_module, "quantize_int4", interrupt_midway)
    with pytest.raises(KeyboardInterrupt):
        convert(str(tiny_qwen2), out)
    assert calls["n"] == 5
    assert out.read_bytes() == b"previous good file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.zse"]


def test_full_disk_is_reported_before_quantizing(tiny_qwen2, tmp_path, monkeypatch):
    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    quantized = []
    monkeypatch.setattr(os, "posix_fallocate", no_space)
    monkeypatch.setattr(convert_module, "quantize_int4", lambda *a, **k: quantized.append(1))
    with pytest.raises(OSError, match="not enough disk space"):
        convert(str(tiny_qwen2), tmp_path / "m.zse")
    assert quantized == []
    _assert_nothing_written(tmp_path)


def test_bad_options(tiny_qwen2, tmp_path):
    with pytest.raises(SourceError, match="--group-size must be one of"):
        convert(str(tiny_qwen2), tmp_path / "m.zse", ConvertOptions(group_size=100))
    with pytest.raises(SourceError, match="--lm-head must be one of"):
        convert(str(tiny_qwen2), tmp_path / "m.zse", ConvertOptions(lm_head="int8"))
    with pytest.raises(SourceError, match="is a folder"):
        convert(str(tiny_qwen2), tmp_path)
    with pytest.raises(SourceError, match="neither an existing folder nor a Hub repo id"):
        convert("./no/such/folder", tmp_path / "m.zse")
