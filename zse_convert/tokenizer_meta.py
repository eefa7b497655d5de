"""Tokenizer, chat template and generation settings, gathered from a checkpoint's side files.

The runtime must serve without transformers, so the manifest carries tokenizer.json verbatim
(for the `tokenizers` library), the chat template (for jinja2), and special token ids resolved
here once.
"""

from __future__ import annotations

import json
from typing import Any

from .source import Checkpoint, SourceError

SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")


def _token_text(value: Any) -> str | None:
    # tokenizer_config stores a special token as a string or as an AddedToken dict.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _vocab_lookup(tokenizer: dict[str, Any]) -> dict[str, int]:
    lookup: dict[str, int] = {}
    vocab = tokenizer.get("model", {}).get("vocab")
    if isinstance(vocab, dict):  # BPE / WordPiece
        lookup.update(vocab)
    elif isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        lookup.update({piece: i for i, (piece, _) in enumerate(vocab)})
    for added in tokenizer.get("added_tokens", []):
        lookup[added["content"]] = added["id"]
    return lookup


def _ids(value: Any) -> list[int]:
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]


def _chat_templates(ckpt: Checkpoint, config: dict[str, Any]) -> tuple[str | None, dict[str, str]]:
    """The default chat template and any named extra templates (e.g. tool_use)."""
    template = config.get("chat_template")
    if template is None and (ckpt.folder / "chat_template.jinja").exists():
        template = (ckpt.folder / "chat_template.jinja").read_text(encoding="utf-8")
    if template is None:
        template = (ckpt.read_json("chat_template.json") or {}).get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        named = {t["name"]: t["template"] for t in template}
        return named.pop("default", None), named
    return template, {}


def tokenizer_section(ckpt: Checkpoint, vocab_size: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Returns (manifest 'tokenizer', manifest 'generation')."""
    path = ckpt.folder / "tokenizer.json"
    if not path.exists():
        raise SourceError(f"{ckpt.folder}: tokenizer.json is missing; the runtime needs the fast "
                          "tokenizer file (convert a slow tokenizer with transformers first)")
    tokenizer_text = path.read_text(encoding="utf-8")
    try:
        tokenizer = json.loads(tokenizer_text)
    except ValueError as exc:
        raise SourceError(f"{path}: not valid JSON: {exc}") from None
    config = ckpt.read_json("tokenizer_config.json") or {}
    special_map = ckpt.read_json("special_tokens_map.json") or {}
    generation = ckpt.read_json("generation_config.json") or {}
    generation.pop("transformers_version", None)

    lookup = _vocab_lookup(tokenizer)
    tokens = {key: _token_text(config.get(key)) or _token_text(special_map.get(key))
              for key in SPECIAL_TOKENS}
    token_ids = {key: lookup.get(text) if text is not None else None for key, text in tokens.items()}

    eos_ids = _ids(generation.get("eos_token_id")) + _ids(token_ids["eos_token"])
    eos_ids = list(dict.fromkeys(eos_ids))
    bos_id = (_ids(generation.get("bos_token_id")) or _ids(token_ids["bos_token"]) or [None])[0]
    pad_id = (_ids(generation.get("pad_token_id")) or _ids(token_ids["pad_token"]) or [None])[0]
    bad = [i for i in [*eos_ids, bos_id, pad_id] if i is not None and not 0 <= i < vocab_size]
    if bad:
        raise SourceError(f"special token ids {bad} are outside the vocabulary of {vocab_size}")
    chat_template, extra_templates = _chat_templates(ckpt, config)
    section = {
        "tokenizer_json": tokenizer_text,
        "chat_template": chat_template,
        "chat_templates": extra_templates,
        "special_tokens": tokens,
        "bos_token_id": bos_id,
        "eos_token_ids": eos_ids,
        "pad_token_id": pad_id,
        "add_bos_token": config.get("add_bos_token"),
        "model_max_length": config.get("model_max_length")
        if isinstance(config.get("model_max_length"), int) and config["model_max_length"] < 2**31
        else None,
    }
    return section, generation
