"""Tokenizer and chat template from the manifest, with no transformers at run time.

tokenizer.json runs through the `tokenizers` library; chat templates render in a sandboxed
jinja2 environment configured as transformers configures it, so a template behaves the same.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as FastTokenizer


class ChatTemplateError(ValueError):
    pass


def _raise_exception(message: str):
    raise ChatTemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators=None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return dt.datetime.now().strftime(fmt)


class Tokenizer:
    def __init__(self, section: dict[str, Any]):
        self._fast = FastTokenizer.from_str(section["tokenizer_json"])
        self.eos_token_ids: list[int] = list(section["eos_token_ids"])
        self.bos_token_id: int | None = section["bos_token_id"]
        self.special_tokens: dict[str, str | None] = section["special_tokens"]
        self.chat_template: str | None = section["chat_template"]
        self._template = None
        if self.chat_template is not None:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[loopcontrols])
            env.filters["tojson"] = _tojson
            env.globals["raise_exception"] = _raise_exception
            env.globals["strftime_now"] = _strftime_now
            self._template = env.from_string(self.chat_template)

    @property
    def vocab_size(self) -> int:
        return self._fast.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._fast.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._fast.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **extra: Any) -> str:
        """Render messages to the prompt text the model was trained on."""
        if self._template is None:
            raise ChatTemplateError("this model has no chat template; use plain completions")
        try:
            return self._template.render(messages=messages,
                                         add_generation_prompt=add_generation_prompt,
                                         **{k: v for k, v in self.special_tokens.items()
                                            if v is not None}, **extra)
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"chat template failed: {exc}") from None

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    **extra: Any) -> list[int]:
        # The rendered template already holds any BOS text; transformers encodes it without
        # adding special tokens again.
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **extra),
                           add_special_tokens=False)


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas.

    Byte-level BPE splits multi-byte characters across tokens; decoding a partial character
    yields U+FFFD. A delta is released only up to the last complete character, so concatenated
    deltas always equal the full decode, with no replacement character the full decode lacks.
    Only the tokens since the last released boundary are re-decoded (prefix offsets, as in
    vLLM's detokenizer), so the cost per token stays constant.
    """

    CONTEXT = 6  # tokens of left context decoded with the new ones, for correct spacing

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_start = 0  # decode window start
        self.read_offset = 0  # ids before this are already released

    def push(self, token: int) -> str:
        self.ids.append(token)
        prefix = self.tokenizer.decode(self.ids[self.prefix_start:self.read_offset], self.skip)
        full = self.tokenizer.decode(self.ids[self.prefix_start:], self.skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_start, self.read_offset = (max(0, len(self.ids) - self.CONTEXT),
                                                   len(self.ids))
            # the window moved: release exactly what the old window added
            return full[len(prefix):]
        return ""

    def flush(self) -> str:
        """At the end: whatever is still held back (a dangling partial character decodes to U+FFFD
        in the full text too)."""
        prefix = self.tokenizer.decode(self.ids[self.prefix_start:self.read_offset], self.skip)
        full = self.tokenizer.decode(self.ids[self.prefix_start:], self.skip)
        self.read_offset = self.prefix_start = len(self.ids)
        return full[len(prefix):]
