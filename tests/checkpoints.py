"""Tiny random Hugging Face checkpoints, saved by transformers itself, with a real tokenizer."""

from __future__ import annotations

import json
import sys
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Shapes chosen so hidden (192) is divisible by 64 but not by 128: the group-size fallback path.
TINY = dict(hidden_size=192, intermediate_size=384, num_hidden_layers=2, num_attention_heads=6,
            num_key_value_heads=2, vocab_size=320, max_position_embeddings=512)


# Qwen2.5's pre-tokenizer split (tokenizer.json), so a synthetic tokenizer pre-tokenizes as it does
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SYNTHETIC_SPECIALS = 22  # as many as Qwen2.5's tokenizer.json has


def synthetic_tokenizer_json(vocab_size: int, seed: int = 0) -> str:
    """tokenizer.json text of a byte-level BPE that fills `vocab_size` ids: the 256 byte tokens,
    random merges of earlier tokens (short, early ones most often; at most 12 characters), and
    22 special tokens (<|endoftext|>, <|im_start|>, <|im_end|>, then reserved ones), with
    Qwen2.5's normalizer, pre-tokenizer and decoder. It builds in a little more time than a
    real tokenizer of its size (2-core box: 0.34-0.35 s at Qwen2.5-7B's 152,064 ids against
    0.27-0.30 s for Qwen2.5's own 151,665), so a start-up benchmark on it pays for one."""
    import random

    from tokenizers import pre_tokenizers

    rng = random.Random(seed)
    tokens = sorted(pre_tokenizers.ByteLevel.alphabet())
    regular = vocab_size - SYNTHETIC_SPECIALS
    if regular < len(tokens):
        raise ValueError(f"vocab_size {vocab_size} is smaller than 256 bytes + "
                         f"{SYNTHETIC_SPECIALS} special tokens")
    vocab = {token: i for i, token in enumerate(tokens)}
    merges = []
    while len(tokens) < regular:
        left = tokens[int(len(tokens) * rng.random() ** 4)]
        right = tokens[int(len(tokens) * rng.random() ** 4)]
        merged = left + right
        if len(merged) <= 12 and merged not in vocab:
            vocab[merged] = len(tokens)
            tokens.append(merged)
            merges.append([left, right])
    specials = SPECIAL + [f"<|reserved_{i}|>" for i in range(SYNTHETIC_SPECIALS - len(SPECIAL))]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                  "use_regex": False}
    return json.dumps({
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": regular + i, "content": text, "single_word": False,
                          "lstrip": False, "rstrip": False, "normalized": False, "special": True}
                         for i, text in enumerate(specials)],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN_SPLIT}, "behavior": "Isolated",
             "invert": False}, {**byte_level, "trim_offsets": True}]},
        "post_processor": byte_level,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }, ensure_ascii=False)


def build_tokenizer(vocab_size: int):
    """A byte-level BPE trained on CPython's LICENSE text: real merges, real special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    license_text = (Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}."
                    f"{sys.version_info.minor}" / "LICENSE.txt")
    text = license_text.read_text() if license_text.exists() else "The capital of France is Paris."
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(text.splitlines(), trainer)
    return tokenizer


def make_checkpoint(folder: Path, arch: str = "qwen2", dtype: str = "bfloat16",
                    tied: bool = False, shard_mb: float | None = None, seed: int = 0,
                    **overrides) -> Path:
    """Write config.json, safetensors weights (sharded when shard_mb is set) and tokenizer files."""
    import torch
    import transformers

    config_cls, model_cls = {
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[arch]
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(256 + len(SPECIAL) + 40)
    eos_id = tokenizer.token_to_id("<|im_end|>")
    settings = dict(TINY, tie_word_embeddings=tied, rope_theta=10000.0, eos_token_id=eos_id,
                    bos_token_id=tokenizer.token_to_id("<|endoftext|>"))
    settings.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**settings)).to(getattr(torch, dtype))
    with torch.no_grad():  # transformers inits biases to 0 and norms to 1, which hide bugs
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.02)
            elif name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    max_shard = f"{int(shard_mb * 1000)}KB" if shard_mb else "10GB"
    model.save_pretrained(folder, safe_serialization=True, max_shard_size=max_shard)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "chat_template": CHAT_TEMPLATE, "model_max_length": 512,
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    return folder
