"""Tokenizer, chat template and incremental detokenization, against transformers."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerFast

from tests.checkpoints import CHAT_TEMPLATE
from zse_runtime.tokenizer import ChatTemplateError, IncrementalDecoder, Tokenizer
from zse_runtime.zsefile import ZseFile

TEXT = "Grüße 2024 – naïve café 🙂 日本語, \"quoted\"\n\tand tabs"
MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi 👋"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": TEXT}]


@pytest.fixture(scope="module")
def tokenizers(tiny_qwen2, tiny_qwen2_zse):
    with ZseFile(tiny_qwen2_zse) as zse:
        ours = Tokenizer(zse.manifest["tokenizer"])
    # tokenizer.json as transformers loads it (AutoTokenizer would rebuild a Qwen2 pipeline from
    # the vocabulary for model_type qwen2 and ignore the file's pre-tokenizer)
    reference = PreTrainedTokenizerFast(tokenizer_file=str(tiny_qwen2 / "tokenizer.json"),
                                        eos_token="<|im_end|>", bos_token="<|endoftext|>",
                                        chat_template=CHAT_TEMPLATE)
    return ours, reference


def test_encode_decode_match_transformers(tokenizers):
    ours, reference = tokenizers
    assert ours.encode(TEXT) == reference.encode(TEXT)
    ids = ours.encode(TEXT)
    assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True) == TEXT


def test_chat_template_matches_transformers(tokenizers):
    ours, reference = tokenizers
    assert ours.chat_template == CHAT_TEMPLATE
    for add in (True, False):
        expected = reference.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=add)
        assert ours.apply_chat_template(MESSAGES, add_generation_prompt=add) == expected
    expected_ids = reference.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)
    if not isinstance(expected_ids, list):  # transformers 5 returns a BatchEncoding
        expected_ids = expected_ids["input_ids"]
    assert ours.encode_chat(MESSAGES) == list(expected_ids)


def test_template_errors_are_reported(tokenizers):
    ours, _ = tokenizers
    broken = Tokenizer({**_section(ours), "chat_template": "{{ raise_exception('no system role') }}"})
    with pytest.raises(ChatTemplateError, match="no system role"):
        broken.apply_chat_template(MESSAGES)
    sandboxed = Tokenizer({**_section(ours), "chat_template": "{{ messages.__class__.__mro__ }}"})
    with pytest.raises(ChatTemplateError, match="chat template failed"):
        sandboxed.apply_chat_template(MESSAGES)
    with pytest.raises(ChatTemplateError, match="no chat template"):
        Tokenizer({**_section(ours), "chat_template": None}).apply_chat_template(MESSAGES)


def _section(tokenizer: Tokenizer) -> dict:
    return {"tokenizer_json": tokenizer._fast.to_str(), "eos_token_ids": tokenizer.eos_token_ids,
            "bos_token_id": tokenizer.bos_token_id, "special_tokens": tokenizer.special_tokens,
            "chat_template": tokenizer.chat_template}


def test_incremental_decoding_never_splits_characters(tokenizers):
    ours, _ = tokenizers
    ids = ours.encode(TEXT * 3)
    assert len(ids) > len(TEXT)  # multi-byte characters span several byte-level tokens
    decoder = IncrementalDecoder(ours)
    deltas = [decoder.push(i) for i in ids]
    deltas.append(decoder.flush())
    assert "".join(deltas) == TEXT * 3
    assert not any("\ufffd" in d for d in deltas)
    assert sum(1 for d in deltas if d == "") > 0  # some tokens were held back


def test_incremental_decoding_of_a_dangling_partial_character(tokenizers):
    ours, _ = tokenizers
    ids = ours.encode("ok 🙂")
    decoder = IncrementalDecoder(ours)
    text = "".join(decoder.push(i) for i in ids[:-1]) + decoder.flush()
    assert text == ours.decode(ids[:-1])  # the full decode's own replacement character, no more
