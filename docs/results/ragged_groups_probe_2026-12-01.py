"""Feasibility: SmolLM2 with o/gate/up at a ragged group 128 (4x128 + 64) instead of the g64
fallback; dequantized weights evaluated through transformers (default row for comparison)."""
import sys, json, tempfile
from pathlib import Path
import numpy as np
sys.path.insert(0, "/work/main"); sys.path.insert(0, "/work/main/scripts")
import eval_quality as eq
from zse_convert.convert import ConvertOptions, convert
from zse_convert.architectures import source_names
from zse_convert.quantize import quantize_int4
from zse_runtime.zsefile import ZseFile, dequantize_int4, Int4Weight
from safetensors.numpy import load_file

folder = Path(sys.argv[1])
windows = eq.text_windows(folder, eq.default_text(), 4096, 512)
m = eq.hf_model(folder); reference = [eq.hf_logprobs(m, w) for w in windows]; del m
def score(replace):
    m = eq.hf_model(folder, replace); s = eq.Scores()
    for w, r in zip(windows, reference):
        s.add(eq.hf_logprobs(m, w), r, w)
    return s.summary()
s = eq.Scores()
for w, r in zip(windows, reference): s.add(r, r, w)
base = s.summary()["perplexity"]; print("fp16", base, flush=True)
orig = {}
for f in sorted(folder.glob("*.safetensors")): orig.update(load_file(f))
with tempfile.TemporaryDirectory() as tmp:
    convert(str(folder), Path(tmp)/"d.zse", ConvertOptions(group_size=128))
    with ZseFile(Path(tmp)/"d.zse") as zse:
        default = {}; sizes = {}
        for t in zse.tensors.values():
            if not t.group_size or t.name == "lm_head": continue
            w = dequantize_int4(zse.int4(t.name))
            names = source_names(t.name, zse.manifest["model"], set(orig))
            row = 0
            for n in names:
                r = orig[n].shape[0]; default[n] = w[row:row+r].copy(); row += r
                sizes[n] = t.group_size
print({k: v for k, v in list(sizes.items())[:7]}, flush=True)

def ragged(w, g):
    w = np.ascontiguousarray(w.astype(np.float32)); K = w.shape[1]; full = K // g * g
    parts = [dequantize_int4(quantize_int4(np.ascontiguousarray(w[:, :full]), g)[0])]
    if full < K:
        tail = K - full; tg = max(s for s in (32, 64, 128) if tail % s == 0)
        parts.append(dequantize_int4(quantize_int4(np.ascontiguousarray(w[:, full:]), tg)[0]))
    return np.concatenate(parts, 1)

results = {"fp16": base}
q40 = score(eq.gguf_variant(folder, "Q4_0", lm_head=False)); results["q4_0"] = q40
print("q4_0", q40, flush=True)
d = score(default); results["default"] = d; print("default", d, flush=True)
for label, kinds in (("ragged o,gate,up", ("o_proj", "gate_proj", "up_proj")),
                     ("ragged gate,up", ("gate_proj", "up_proj")),
                     ("ragged o", ("o_proj",))):
    rep = dict(default)
    for n in rep:
        if n.rsplit(".", 2)[-2] in kinds:
            rep[n] = ragged(orig[n], 128)
    r = score(rep); results[label] = r; print(label, r, flush=True)
for k, v in results.items():
    if k != "fp16":
        print(f"{k:20s} dppl {v['perplexity']-base:.4f}  x q4_0 {(v['perplexity']-base)/(q40['perplexity']-base):.3f}  kl {v['kl_mean']:.5f}")
json.dump(results, open("/tmp/sim/ragged_smollm2.json", "w"), indent=1)
