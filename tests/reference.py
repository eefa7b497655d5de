"""HF transformers (float32, CPU) running exactly the weights a `.zse` file holds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from zse_runtime.zsefile import ZseFile


def hf_model_from_zse(zse_path: Path, checkpoint: Path):
    """The source architecture with every weight replaced by its dequantized `.zse` value.

    lm_head is loaded on its own (untied): the file stores it separately from the embedding.
    """
    import transformers

    config = transformers.AutoConfig.from_pretrained(checkpoint)
    config.tie_word_embeddings = False
    config.torch_dtype = torch.float32
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32,
                                                          attn_implementation="eager")
    with ZseFile(zse_path) as zse:
        m = zse.model_config
        q, kv = m["num_attention_heads"] * m["head_dim"], m["num_key_value_heads"] * m["head_dim"]
        t = lambda name: torch.from_numpy(np.array(zse.dequantized(name), np.float32))
        state = {"model.embed_tokens.weight": t("embed_tokens"), "model.norm.weight": t("final_norm"),
                 "lm_head.weight": t("lm_head")}
        for i in range(m["num_hidden_layers"]):
            p, layer = f"model.layers.{i}.", lambda part: t(f"layers.{i}.{part}")
            qkv = layer("qkv")
            state.update({
                p + "input_layernorm.weight": layer("attn_norm"),
                p + "post_attention_layernorm.weight": layer("mlp_norm"),
                p + "self_attn.q_proj.weight": qkv[:q], p + "self_attn.k_proj.weight": qkv[q:q + kv],
                p + "self_attn.v_proj.weight": qkv[q + kv:],
                p + "self_attn.o_proj.weight": layer("o_proj"),
                p + "mlp.down_proj.weight": layer("down_proj"),
            })
            gate, up = layer("gate_up").chunk(2)
            state[p + "mlp.gate_proj.weight"], state[p + "mlp.up_proj.weight"] = gate, up
            if m["qkv_bias"]:
                bias = layer("qkv_bias")
                state[p + "self_attn.q_proj.bias"] = bias[:q]
                state[p + "self_attn.k_proj.bias"] = bias[q:q + kv]
                state[p + "self_attn.v_proj.bias"] = bias[q + kv:]
            if m["o_bias"]:
                state[p + "self_attn.o_proj.bias"] = layer("o_bias")
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if "rotary" not in k], (missing, unexpected)
    return model.eval()


@torch.no_grad()
def hf_logits(model, ids: list[int]) -> np.ndarray:
    """Logits [len(ids), vocab] for every position."""
    return model(torch.tensor([ids])).logits[0].float().numpy()


@torch.no_grad()
def hf_greedy(model, ids: list[int], steps: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy tokens and the logits each was chosen from, with a KV cache."""
    out = model(torch.tensor([ids]), use_cache=True)
    tokens, logits = [], []
    for _ in range(steps):
        step_logits = out.logits[0, -1].float().numpy()
        logits.append(step_logits)
        tokens.append(int(step_logits.argmax()))
        out = model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values,
                    use_cache=True)
    return tokens, logits


def logit_distances(checkpoint: Path, zse_paths: list[Path], ids: list[int]) -> dict[str, float]:
    """RMS distance of each `.zse` file's logits (CPU backend, one prefill of `ids`) from the
    checkpoint's own logits (transformers, float32), keyed by file stem."""
    import transformers

    from zse_runtime.engine import Engine
    from zse_runtime.model import Batch

    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        reference = hf(torch.tensor([ids])).logits[0].numpy()
    distances, n = {}, len(ids)
    for path in zse_paths:
        engine = Engine.open(path, device="cpu", max_model_len=n)
        logits = np.asarray(engine.forward(Batch.of(ids, np.arange(n), np.zeros(n), np.arange(n))))
        distances[path.stem] = float(np.sqrt(np.mean((logits - reference) ** 2)))
        del engine
    return distances


def float_calibration(folder: Path, gptq, awq=None):
    """A LayerCalibrator over the checkpoint in `folder` with float inputs propagated, on two
    windows of the stdlib calibration text, beside transformers' hidden states for the same
    tokens: (checkpoint, canonical config, calibrator, ids [windows, WINDOW], hidden states,
    the transformers model). The caller closes the checkpoint."""
    import transformers

    from zse_convert.architectures import canonical_config
    from zse_convert.calibration import WINDOW, LayerCalibrator, stdlib_text, token_windows
    from zse_convert.convert import ConvertOptions, _check_sources, plan_tensors
    from zse_convert.source import Checkpoint

    ckpt = Checkpoint.open(folder)
    model = canonical_config(ckpt.read_json("config.json"))
    specs = plan_tensors(model, ConvertOptions())
    ids = token_windows((folder / "tokenizer.json").read_text(), stdlib_text(), 2 * WINDOW)
    calibrator = LayerCalibrator(ckpt, model, _check_sources(ckpt, model, specs),
                                 {s.name: s.group_size for s in specs if s.group_size}, ids,
                                 gptq, propagate_quantized=False, awq=awq)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    with torch.no_grad():
        states = hf(torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True).hidden_states
    return ckpt, model, calibrator, ids, states, hf
