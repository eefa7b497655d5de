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

# Shapes chosen so hidden (192) is divisible by 96 but not by 128: the group-size fallback path
# (to 96, a group of three 32-value blocks, as SmolLM2's 576).
TINY = dict(hidden_size=192, intermediate_size=384, num_hidden_layers=2, num_attention_heads=6,
            num_key_value_heads=2, vocab_size=320, max_position_embeddings=512)


# Qwen2.5's pre-tokenizer split (tokenizer.json), so a synthetic tokenizer pre-tokenizes as it does
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SYNTHETIC_SPECIALS = 22  # as many as Qwen2.5's tokenizer.json has
TRAINING_BYTES_PER_TOKEN = 1000  # Python source text read per vocabulary entry


def synthetic_tokenizer_json(vocab_size: int) -> str:
    """tokenizer.json text of a byte-level BPE with `vocab_size` ids (fewer if the text runs
    out), trained on this interpreter's Python sources (~1 KB of them per id: the standard
    library, then installed packages) with Qwen2.5's normalizer, pre-tokenizer and decoder, and
    22 special tokens (<|endoftext|>, <|im_start|>, <|im_end|>, then reserved ones). Real merges
    of real text, so it builds and encodes about as a real tokenizer of its size does (2-core
    box, 152,064 ids: ~30 s to train, and built within ~10% of the time Qwen2.5's own 151,665
    take)."""
    import sysconfig

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from tokenizers import Regex

    if vocab_size < 256 + SYNTHETIC_SPECIALS:
        raise ValueError(f"vocab_size {vocab_size} is smaller than 256 bytes + "
                         f"{SYNTHETIC_SPECIALS} special tokens")
    specials = SPECIAL + [f"<|reserved_{i}|>" for i in range(SYNTHETIC_SPECIALS - len(SPECIAL))]

    def texts():
        budget = TRAINING_BYTES_PER_TOKEN * vocab_size
        # the standard library first, then installed packages: some hosts' standard library
        # alone is too small to train 152k ids (an H200 image's was)
        roots = dict.fromkeys(sysconfig.get_paths()[key] for key in ("stdlib", "purelib",
                                                                      "platlib"))
        for root in roots:
            for path in sorted(Path(root).rglob("*.py")):
                if budget <= 0:
                    return
                try:
                    text = path.read_text(errors="replace")
                except OSError:
                    continue
                budget -= len(text)
                yield text

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts(), trainer)
    return tokenizer.to_str()


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
