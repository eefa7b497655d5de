"""Data-free column weights for the calibration-free search: each input column's error weight
multiplied by an estimate of that input's mean square, from the checkpoint alone.
  q/k/v, gate/up: gamma_j^2 (the RMSNorm weight feeding them)
  o_proj: ||v_proj row * gamma||^2 + bias^2 of the value channel the column reads
  down_proj: E[silu(g)^2] * s_u^2, g ~ N(0, s_g^2), s_g = ||gate row * gamma||, s_u likewise
modes: base, full, sqrt (weights^0.5), down (down_proj only), noqkv (all but q/k/v), downsqrt,
and act* (weights from the measured inputs on the calibration text).
Ran against `afb0943` (before the converter had column weights; it monkeypatches the
converter's quantize_int4 call of that tree), from the repository root:
    python docs/results/quality_column_weights_probe_2026-12-01.py MODES smollm2|qwen2.5 [64]
HELDOUT=1 scores idlelib's NEWS2x.txt + HISTORY.txt instead of the default text."""
import json, sys, tempfile, time
from pathlib import Path
import numpy as np
from safetensors.numpy import load_file
sys.path.insert(0, "scripts"); sys.path.insert(0, ".")
from eval_quality import Scores, default_text, hf_logprobs, hf_model, log_softmax, text_windows
import zse_convert.convert as conv
from zse_convert.quantize import quantize_int4 as shipped
from zse_runtime.engine import Engine
from zse_runtime.model import Batch

Z = np.random.default_rng(0).standard_normal(20001)

def silu_ms(s):
    g = np.outer(s, Z)
    return ((g / (1 + np.exp(-g))) ** 2).mean(axis=1)

def column_weights(folder):
    t = load_file(str(folder / "model.safetensors"))
    t = {k: v.astype(np.float64) for k, v in t.items() if "norm" in k or "proj" in k}
    cfg = json.load(open(folder / "config.json"))
    heads, kv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"] // cfg["num_attention_heads"]
    out = {}
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}."
        g_in = t[p + "input_layernorm.weight"]; g_post = t[p + "post_attention_layernorm.weight"]
        for n in ("q", "k", "v"):
            out[p + f"self_attn.{n}_proj.weight"] = ("qkv", g_in ** 2)
        for n in ("gate", "up"):
            out[p + f"mlp.{n}_proj.weight"] = ("mlp", g_post ** 2)
        v = t[p + "self_attn.v_proj.weight"] * g_in
        vms = (v ** 2).sum(1) + t.get(p + "self_attn.v_proj.bias", np.zeros(v.shape[0])) ** 2
        head_of = np.arange(heads * hd) // hd // (heads // kv)
        out[p + "self_attn.o_proj.weight"] = ("o", vms[head_of * hd + np.arange(heads * hd) % hd])
        sg = np.sqrt(((t[p + "mlp.gate_proj.weight"] * g_post) ** 2).sum(1))
        su2 = ((t[p + "mlp.up_proj.weight"] * g_post) ** 2).sum(1)
        out[p + "mlp.down_proj.weight"] = ("down", silu_ms(sg) * su2)
    return out

def actual_weights(folder, tokens=4096):
    import torch
    from zse_convert.calibration import stdlib_text, token_windows
    ids = token_windows(open(folder / "tokenizer.json").read(), stdlib_text(), tokens)
    m = hf_model(folder); acc = {}
    def hook(name):
        def f(mod, inp):
            x = inp[0].detach().double().reshape(-1, inp[0].shape[-1])
            acc[name] = acc.get(name, 0) + (x ** 2).sum(0).numpy()
        return f
    for name, mod in m.named_modules():
        if name.endswith(("_proj",)):
            mod.register_forward_pre_hook(hook(name + ".weight"))
    with torch.no_grad():
        for w in np.asarray(ids).reshape(-1, 512): m(torch.tensor([w.tolist()]))
    kind = lambda k: "qkv" if k.split(".")[-2] in ("q_proj", "k_proj", "v_proj") else "mlp" if k.split(".")[-2] in ("gate_proj", "up_proj") else "o" if "o_proj" in k else "down"
    return {k: (kind(k), v) for k, v in acc.items()}

MODES = {"base": (None, 1.0), "full": ({"qkv", "mlp", "o", "down"}, 1.0), "sqrt": ({"qkv", "mlp", "o", "down"}, 0.5),
         "down": ({"down"}, 1.0), "noqkv": ({"mlp", "o", "down"}, 1.0), "downsqrt": ({"down"}, 0.5),
         "actdown": ({"down"}, 1.0), "actfull": ({"qkv", "mlp", "o", "down"}, 1.0), "actdownsqrt": ({"down"}, 0.5)}
out = {}
for folder, tokens in [(Path(f), n) for f, n in [("tests/.fixtures/smollm2-135m-instruct", 4096), ("tests/.fixtures/qwen2.5-coder-0.5b-instruct", 2048)] if Path(f).name.split("-")[0] in sys.argv[2].split(",")]:
    import os, idlelib
    I = os.path.dirname(idlelib.__file__)
    text = default_text() if not os.environ.get("HELDOUT") else "\n\n".join(open(f"{I}/{n}").read() for n in ("NEWS2x.txt", "HISTORY.txt"))
    if os.environ.get("HELDOUT"): tokens = 4096
    windows = text_windows(folder, text, tokens, 512)
    m = hf_model(folder); reference = [hf_logprobs(m, w) for w in windows]; del m
    base = Scores()
    for w, r in zip(windows, reference): base.add(r, r, w)
    fp16 = base.summary()["perplexity"]
    cw = column_weights(folder)
    if any(m.startswith("act") for m in sys.argv[1].split(",")):
        aw = actual_weights(folder)
    for mode in sys.argv[1].split(","):
        kinds, power = MODES[mode]
        def q(values, group_size, clip_search, name, kinds=kinds, power=power, mode=mode):
            kind, c = (aw if mode.startswith("act") else cw).get(name, (None, None))
            if kinds is None or kind not in kinds:
                return shipped(values, group_size, clip_search, name)
            c = c ** power
            return shipped(values, group_size, clip_search, name, column_weight=np.maximum(c / c.mean(), 1e-6))
        conv.quantize_int4 = q
        t0 = time.perf_counter()
        path = Path(tempfile.mkdtemp()) / "v.zse"
        conv.convert(str(folder), path, conv.ConvertOptions(group_size=int(sys.argv[3]) if len(sys.argv) > 3 else 128))
        engine = Engine.open(path, device="cpu", max_model_len=512)
        s = Scores()
        for w, r in zip(windows, reference):
            n = len(w)
            s.add(log_softmax(np.asarray(engine.forward(Batch.of(w, np.arange(n), np.zeros(n), np.arange(n - 1))))), r, w)
        r = s.summary()
        out[f"{folder.name} {mode}"] = dict(dppl=round(r["perplexity"] - fp16, 4), kl=round(r["kl_mean"], 5),
                                            top1=round(r["top1_agreement"], 4), kl_p99=round(r["kl_p99"], 4))
        print(folder.name, mode, out[f"{folder.name} {mode}"], f"{time.perf_counter() - t0:.0f} s", flush=True)
json.dump(out, open(f"/tmp/q/datafree_{sys.argv[2]}_{sys.argv[1]}_{sys.argv[3:]}_{os.environ.get('HELDOUT')}.json", "w"), indent=1)
