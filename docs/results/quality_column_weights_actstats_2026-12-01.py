import sys, json, numpy as np, torch
from pathlib import Path
sys.path.insert(0, "scripts"); sys.path.insert(0, ".")
import importlib.util
spec = importlib.util.spec_from_file_location("df", "docs/results/quality_column_weights_probe_2026-12-01.py")
src = open("docs/results/quality_column_weights_probe_2026-12-01.py").read().split("MODES =")[0]
ns = {}; exec(src, ns)
from eval_quality import hf_model, text_windows, default_text
folder = Path(sys.argv[1])
cw = ns["column_weights"](folder)
m = hf_model(folder)
w = text_windows(folder, default_text(), 1024, 512)
acts = {}
def hook(name):
    def f(mod, inp):
        x = inp[0].detach().double().reshape(-1, inp[0].shape[-1])
        acts.setdefault(name, []).append((x ** 2).mean(0).numpy())
    return f
for name, mod in m.named_modules():
    if name.endswith(("q_proj", "o_proj", "gate_proj", "down_proj")):
        mod.register_forward_pre_hook(hook(name + ".weight"))
with torch.no_grad():
    for ids in w: m(torch.tensor([ids]))
def stats(a):
    a = a / a.mean(); s = np.sort(a)[::-1]
    return f"max/mean {s[0]:8.1f} top1% share {s[:max(1,len(s)//100)].sum()/s.sum():.2f}"
for l in [0, 1, len([k for k in cw if 'down_proj' in k]) // 2, len([k for k in cw if 'down_proj' in k]) - 1]:
    for part in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
        k = f"model.layers.{l}.{part}.weight"
        actual = np.mean(acts[k], 0); est = cw[k][1]
        r = np.corrcoef(np.log(actual + 1e-12), np.log(est + 1e-12))[0, 1]
        print(f"L{l:2d} {part:18s} logcorr {r:5.2f} | actual {stats(actual)} | est {stats(est)}")
