"""Hugging Face config + tensor names -> the canonical `.zse` model config and tensor map.

llama, mistral and qwen2 share one decoder and one naming scheme in transformers; they differ
only in which biases exist and in attention options, which the canonical config records.
"""

from __future__ import annotations

from typing import Any

from zse_runtime.zsefile import (ARCHITECTURES, EMBED, FINAL_NORM, LAYER_TENSORS, LM_HEAD,
                                 ROPE_SCALING_KEYS, ROPE_TYPES)

from .source import SourceError

# HF `architectures[0]` -> canonical architecture (also accepted by `model_type`).
HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
assert set(HF_ARCHITECTURES.values()) == set(ARCHITECTURES)

# Canonical tensor -> HF tensors concatenated along rows (fusion happens here, once).
# "{i}" is the layer index.
LAYER_SOURCES = {
    "attn_norm": ["model.layers.{i}.input_layernorm.weight"],
    "qkv": ["model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.k_proj.weight",
            "model.layers.{i}.self_attn.v_proj.weight"],
    "qkv_bias": ["model.layers.{i}.self_attn.q_proj.bias", "model.layers.{i}.self_attn.k_proj.bias",
                 "model.layers.{i}.self_attn.v_proj.bias"],
    "o_proj": ["model.layers.{i}.self_attn.o_proj.weight"],
    "o_bias": ["model.layers.{i}.self_attn.o_proj.bias"],
    "mlp_norm": ["model.layers.{i}.post_attention_layernorm.weight"],
    "gate_up": ["model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"],
    "down_proj": ["model.layers.{i}.mlp.down_proj.weight"],
}
assert set(LAYER_SOURCES) == set(LAYER_TENSORS)
GLOBAL_SOURCES = {
    EMBED: ["model.embed_tokens.weight"],
    FINAL_NORM: ["model.norm.weight"],
    LM_HEAD: ["lm_head.weight"],
}


class UnsupportedModelError(SourceError):
    pass


def _supported() -> str:
    return ", ".join(f"{a} ({h})" for h, a in HF_ARCHITECTURES.items())


def _rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    # transformers >= 5 nests theta and scaling under rope_parameters; older configs use
    # top-level rope_theta and rope_scaling.
    params = hf.get("rope_parameters") or {}
    theta = float(hf.get("rope_theta", params.get("rope_theta", 10000.0)))
    scaling = hf.get("rope_scaling") or (params if params.get("rope_type", "default") != "default"
                                         else None)
    if not scaling:
        return theta, None
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise UnsupportedModelError(f"rope scaling type {rope_type!r} is not supported; supported: "
                                    f"{list(ROPE_TYPES)}")
    if rope_type == "default":
        return theta, None
    keys = ROPE_SCALING_KEYS[rope_type]
    missing = [k for k in keys if not isinstance(scaling.get(k), (int, float))]
    if missing:
        raise UnsupportedModelError(f"rope_scaling of type {rope_type} lacks numeric {missing}")
    return theta, {"rope_type": rope_type, **{k: scaling[k] for k in keys}}


def canonical_config(hf: dict[str, Any]) -> dict[str, Any]:
    """Validate a HF config.json and return the canonical model config (zsefile.MODEL_KEYS)."""
    declared = (hf.get("architectures") or [None])[0]
    arch = HF_ARCHITECTURES.get(declared) or (hf.get("model_type") if hf.get("model_type")
                                               in ARCHITECTURES else None)
    if arch is None:
        name = declared or hf.get("model_type") or "unknown"
        raise UnsupportedModelError(f"architecture {name!r} is not supported; supported: "
                                    f"{_supported()}")
    if hf.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"hidden_act {hf['hidden_act']!r} is not supported (only silu)")
    if hf.get("mlp_bias"):
        raise UnsupportedModelError("mlp_bias=true is not supported")
    if arch == "qwen2" and hf.get("use_sliding_window"):
        raise UnsupportedModelError("qwen2 with use_sliding_window=true is not supported")
    required = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads"]
    missing = [k for k in required if not isinstance(hf.get(k), int)]
    if missing:
        raise UnsupportedModelError(f"config.json lacks integer {missing}")
    heads = hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads") or heads
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    if heads % kv_heads:
        raise UnsupportedModelError(f"{heads} attention heads are not a multiple of {kv_heads} "
                                    "key/value heads")
    theta, scaling = _rope(hf)
    attention_bias = bool(hf.get("attention_bias", False))
    return {
        "architecture": arch,
        "vocab_size": hf["vocab_size"],
        "hidden_size": hf["hidden_size"],
        "intermediate_size": hf["intermediate_size"],
        "num_hidden_layers": hf["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "rope_theta": theta,
        "rope_scaling": scaling,
        "max_position_embeddings": int(hf.get("max_position_embeddings", 4096)),
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "qkv_bias": arch == "qwen2" or attention_bias,
        "o_bias": arch != "qwen2" and attention_bias,
        "sliding_window": hf.get("sliding_window") if arch == "mistral" else None,
        "source_dtype": str(hf.get("torch_dtype") or hf.get("dtype") or "unknown"),
    }


def source_names(canonical_name: str, model: dict[str, Any], available: set[str]) -> list[str]:
    """HF tensor names that make up one canonical tensor, in row order."""
    if canonical_name == LM_HEAD and "lm_head.weight" not in available:
        if not model["tie_word_embeddings"]:
            raise UnsupportedModelError("lm_head.weight is missing and tie_word_embeddings is false")
        return GLOBAL_SOURCES[EMBED]
    if canonical_name in GLOBAL_SOURCES:
        return GLOBAL_SOURCES[canonical_name]
    _, layer, part = canonical_name.split(".", 2)
    return [name.format(i=layer) for name in LAYER_SOURCES[part]]
