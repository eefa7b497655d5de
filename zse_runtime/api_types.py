"""OpenAI request bodies (the fields ZSE honours), validated with msgspec.

Unknown fields are ignored, as the OpenAI API does for forward compatibility of clients; fields
of the wrong type or out of range are a 400 with the field named (`parse`). msgspec rather than
pydantic: the request models are on the path to `/health` 200 at start-up, where pydantic's
import and model building took 0.26 s on the H200 host and msgspec's ~0.02 s.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, Optional, Union

import msgspec
from msgspec import Meta, Struct


class RequestError(ValueError):
    """A body that does not fit its model: `param` names the field (None for the whole body)."""

    def __init__(self, message: str, param: str | None):
        super().__init__(message)
        self.message, self.param = message, param


_MISSING = re.compile(r"missing required field `(\w+)`")


def parse(body: dict, model_type: type[Struct]):
    """`body` (decoded JSON) as `model_type`; RequestError naming the field if it does not fit.
    Lax about JSON types as clients send them: "2" and 2.0 are accepted where an int is due."""
    try:
        return msgspec.convert(body, model_type, strict=False)
    except msgspec.ValidationError as exc:
        message, _, path = str(exc).partition(" - at `$")
        param = path.rstrip("`").lstrip(".")
        if missing := _MISSING.search(message):
            param = f"{param}.{missing.group(1)}" if param else missing.group(1)
        raise RequestError(message, param or None) from None


class StreamOptions(Struct):
    include_usage: bool = False


def _stops(stop) -> list[str]:
    return [stop] if isinstance(stop, str) else (stop or [])


class _Sampling(Struct, kw_only=True):
    model: str
    temperature: Optional[Annotated[float, Meta(ge=0.0, le=2.0)]] = None
    top_p: Optional[Annotated[float, Meta(gt=0.0, le=1.0)]] = None
    top_k: Optional[Annotated[int, Meta(ge=-1)]] = None  # extension: 0 or -1 keeps all
    n: Annotated[int, Meta(ge=1, le=8)] = 1
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] = 0.0
    ignore_eos: bool = False  # extension
    user: Optional[str] = None

    def __post_init__(self):  # a ValueError here becomes msgspec's ValidationError
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        if len(_stops(self.stop)) > 4:
            raise ValueError("stop may hold at most 4 sequences")

    @property
    def stop_strings(self) -> list[str]:
        return [s for s in _stops(self.stop) if s]


def _token_ids(value) -> bool:
    return all(isinstance(i, int) and not isinstance(i, bool) for i in value)


class CompletionRequest(_Sampling, kw_only=True):
    # a string, or token ids, or a batch of one of either (msgspec unions hold one list type)
    prompt: Union[str, list]
    max_tokens: Optional[Annotated[int, Meta(ge=1)]] = 16
    logprobs: Optional[Annotated[int, Meta(ge=0, le=5)]] = None
    echo: bool = False

    def __post_init__(self):
        super().__post_init__()
        prompt = self.prompt
        if isinstance(prompt, list):
            if not prompt:
                raise ValueError("prompt must not be empty")
            if isinstance(prompt[0], (str, list)) and len(prompt) != 1:
                raise ValueError("batched prompts are not supported: send one prompt per request")
            one = self.single_prompt
            if not (isinstance(one, str) or (isinstance(one, list) and _token_ids(one))):
                raise ValueError("prompt must be a string, a list of token ids, or a list "
                                 "holding one of either")

    @property
    def single_prompt(self) -> Union[str, list[int]]:
        prompt = self.prompt
        return prompt[0] if isinstance(prompt, list) and isinstance(prompt[0], (str, list)) \
            else prompt


class TextPart(Struct):
    type: Literal["text"]
    text: str


class ChatMessage(Struct):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[TextPart]]] = None
    name: Optional[str] = None

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling, kw_only=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    max_tokens: Optional[Annotated[int, Meta(ge=1)]] = None
    max_completion_tokens: Optional[Annotated[int, Meta(ge=1)]] = None
    logprobs: bool = False
    top_logprobs: Optional[Annotated[int, Meta(ge=0, le=20)]] = None

    def __post_init__(self):
        super().__post_init__()
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")

    @property
    def token_limit(self) -> Optional[int]:
        return self.max_completion_tokens or self.max_tokens
