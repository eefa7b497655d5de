"""Check that the GGUF-derived HF folders behave like the real models under transformers."""

import json

import numpy as np
import pytest

from safetensors import safe_open

from tests.gguf_fixtures import MARKER, qwen_coder_folder, smollm2_folder, unpermute_rope

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPT = "The capital of France is"
MIXED_TEXT = "Grüße 2024 – naïve café"

EXPECTED_CONFIG = {
    "smollm2": {
        "architectures": ["LlamaForCausalLM"],
        "num_hidden_layers": 30,
        "hidden_size": 576,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
    },
    "qwen-coder": {
        "architectures": ["Qwen2ForCausalLM"],
        "num_hidden_layers": 24,
        "hidden_size": 896,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "tie_word_embeddings": False,
    },
}
BUILDERS = {"smollm2": smollm2_folder, "qwen-coder": qwen_coder_folder}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def loaded(request):
    """(name, folder, tokenizer, model) for one fixture model, loaded once per module."""
    folder = BUILDERS[request.param]()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    return request.param, folder, tokenizer, model


def test_unpermute_rope_inverts_llama_cpp_permutation():
    rows, cols, n_head = 3 * 8, 5, 3
    w = np.arange(rows * cols, dtype=np.float32).reshape(rows, cols)
    # The HF->GGUF permutation from llama.cpp's convert_hf_to_gguf.py.
    permuted = w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(w.shape)
    np.testing.assert_array_equal(unpermute_rope(permuted, n_head), w)


@pytest.mark.slow
def test_folder_layout_and_config(loaded):
    name, folder, _, model = loaded
    assert (folder / MARKER).is_file()
    config = json.loads((folder / "config.json").read_text())
    assert config.items() >= EXPECTED_CONFIG[name].items()
    assert config["torch_dtype"] == "float16"
    with safe_open(folder / "model.safetensors", "np") as weights:
        names = set(weights.keys())
        assert {weights.get_slice(n).get_dtype() for n in names} == {"F16"}
    is_qwen = name == "qwen-coder"
    assert ("lm_head.weight" in names) == is_qwen
    assert ("model.layers.0.self_attn.q_proj.bias" in names) == is_qwen
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == (not is_qwen)


@pytest.mark.slow
def test_greedy_continuation_says_paris(loaded):
    _, _, tokenizer, model = loaded
    inputs = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    new_tokens = out[0, inputs["input_ids"].shape[1]:]
    assert tokenizer.decode(new_tokens).startswith(" Paris")


@pytest.mark.slow
def test_tokenizer_round_trips_mixed_text(loaded):
    _, _, tokenizer, _ = loaded
    ids = tokenizer(MIXED_TEXT)["input_ids"]
    assert tokenizer.decode(ids) == MIXED_TEXT
    # Both models split numbers into single digits.
    digits = [tokenizer.decode([i]) for i in ids if tokenizer.decode([i]).strip().isdigit()]
    assert digits == ["2", "0", "2", "4"]


@pytest.mark.slow
def test_prompt_token_ids_are_plausible(loaded):
    _, _, tokenizer, _ = loaded
    assert tokenizer.is_fast
    ids = tokenizer(PROMPT)["input_ids"]
    assert 0 < len(ids) <= len(PROMPT.split()) + 2
    assert tokenizer.decode(ids) == PROMPT
    assert tokenizer.decode(ids[-1:]) == " is"


@pytest.mark.slow
def test_special_tokens_are_atomic(loaded):
    _, _, tokenizer, _ = loaded
    ids = tokenizer("<|im_start|>user\nhi<|im_end|>")["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids[-1] == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi"
