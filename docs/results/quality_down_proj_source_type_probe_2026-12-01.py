"""Where does Qwen2.5-Coder-0.5B lose with down_proj's column weights? Its GGUF source stored
down_proj as Q4_K in 12 layers (a 4-bit grid on blocks of 32, like all of SmolLM2's Q4_1
tensors) and as Q6_K in the other 12 (much closer to continuous weights). Convert with and
without the column weights, splice the unweighted down_proj into the weighted file for one set
of layers at a time (same specs, same offsets), and score each file on the evaluation text.

    python docs/results/quality_down_proj_source_type_probe_2026-12-01.py FOLDER [TOKENS] [OUT]
"""
import json, re, shutil, sys, tempfile
from pathlib import Path
import numpy as np
import gguf
sys.path.insert(0, "scripts"); sys.path.insert(0, ".")
from eval_quality import Scores, default_text, hf_logprobs, hf_model, log_softmax, text_windows
from tests import gguf_fixtures
from zse_convert.convert import ConvertOptions, convert
from zse_runtime.engine import Engine
from zse_runtime.model import Batch
from zse_runtime.zsefile import ZseFile

folder = Path(sys.argv[1]); tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 2048
out_json = sys.argv[3] if len(sys.argv) > 3 else f"/tmp/q/down_proj_source_type_{folder.name}.json"
source = {"qwen2.5-coder-0.5b-instruct": gguf_fixtures._QWEN_CODER,
          "smollm2-135m-instruct": gguf_fixtures._SMOLLM2}[folder.name]
with tempfile.TemporaryDirectory() as scratch:
    reader = gguf.GGUFReader(gguf_fixtures._gguf_file(source, Path(scratch)))
    down_type = {int(re.match(r"blk\.(\d+)\.", t.name).group(1)): t.tensor_type.name
                 for t in reader.tensors if t.name.endswith("ffn_down.weight")}
by_type = {}
for layer, kind in sorted(down_type.items()):
    by_type.setdefault(kind, []).append(layer)
print({k: v for k, v in by_type.items()}, flush=True)

windows = text_windows(folder, default_text(), tokens, 512)
ref_model = hf_model(folder); reference = [hf_logprobs(ref_model, w) for w in windows]; del ref_model
base = Scores()
for w, r in zip(windows, reference): base.add(r, r, w)
fp16 = base.summary()["perplexity"]

def score(path):
    s = Scores()
    engine = Engine.open(path, device="cpu", max_model_len=512)
    for w, r in zip(windows, reference):
        n = len(w)
        logits = engine.forward(Batch.of(w, np.arange(n), np.zeros(n), np.arange(n - 1)))
        s.add(log_softmax(np.asarray(logits)), r, w)
    out = s.summary(); return round(out["perplexity"] - fp16, 4), round(out["kl_mean"], 4)

def splice(into, source, names, out):
    shutil.copy(into, out)
    with ZseFile(into) as a, ZseFile(source) as b:
        off = a.header.data_offset
        ta = {t["name"]: t for t in a.manifest["tensors"]}; tb = {t["name"]: t for t in b.manifest["tensors"]}
    blob = Path(source).read_bytes()
    with open(out, "r+b") as f:
        for name in names:
            t, u = ta[name], tb[name]; assert (u["offset"], u["nbytes"]) == (t["offset"], t["nbytes"])
            f.seek(off + t["offset"]); f.write(blob[off + u["offset"]:off + u["offset"] + u["nbytes"]])
    return out

tmp = Path(tempfile.mkdtemp())
files = {"weighted": tmp / "weighted.zse", "plain": tmp / "plain.zse"}
convert(str(folder), files["weighted"], ConvertOptions())
convert(str(folder), files["plain"], ConvertOptions(column_weights=False))
with ZseFile(files["weighted"]) as z:
    down_names = {int(re.search(r"layers\.(\d+)\.", t["name"]).group(1)): t["name"]
                  for t in z.manifest["tensors"] if t["name"].endswith("down_proj")}
results = {"weighted": score(files["weighted"]), "plain": score(files["plain"])}
for label in ("weighted", "plain"):
    print(f"{label:48s} dppl {results[label][0]:8.4f}  KL {results[label][1]:.4f}", flush=True)
for kind, layers in by_type.items():
    label = f"weighted, plain down_proj in the {kind} layers"
    path = splice(files["weighted"], files["plain"], [down_names[i] for i in layers], tmp / "hybrid.zse")
    results[label] = score(path)
    print(f"{label:48s} dppl {results[label][0]:8.4f}  KL {results[label][1]:.4f}", flush=True)
json.dump({"fp16_perplexity": fp16, "tokens": tokens, "down_proj_source_type": by_type,
           "results": results}, open(out_json, "w"), indent=1)
