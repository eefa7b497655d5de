"""Which projection kind makes the search lose to RTN on SmolLM2 (g128, qkv at 32)? Splice
tensors of one conversion into another (same specs, same offsets) and score each file."""
import json, shutil, sys, tempfile
from pathlib import Path
import numpy as np
sys.path.insert(0, "scripts"); sys.path.insert(0, ".")
from eval_quality import Scores, default_text, hf_logprobs, hf_model, log_softmax, text_windows
from zse_convert.convert import ConvertOptions, convert
from zse_runtime.engine import Engine
from zse_runtime.model import Batch
from zse_runtime.zsefile import ZseFile

folder = Path(sys.argv[1]); tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 4096
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

def splice(into, source, kinds, out):
    shutil.copy(into, out)
    with ZseFile(into) as a, ZseFile(source) as b:
        off = a.header.data_offset
        ta = {t["name"]: t for t in a.manifest["tensors"]}; tb = {t["name"]: t for t in b.manifest["tensors"]}
    blob_b = Path(source).read_bytes()
    with open(out, "r+b") as f:
        for name, t in ta.items():
            if name.rsplit(".", 1)[-1] in kinds:
                u = tb[name]; assert (u["offset"], u["nbytes"]) == (t["offset"], t["nbytes"])
                f.seek(off + t["offset"]); f.write(blob_b[off + u["offset"]:off + u["offset"] + u["nbytes"]])
    return out

tmp = Path(tempfile.mkdtemp())
files = {}
variants = [("zse", {}), ("rtn", {"clip_search": False}),
            ("zse_u", {"group_size_overrides": {"qkv": 128}}),
            ("rtn_u", {"clip_search": False, "group_size_overrides": {"qkv": 128}})]
for label, opts in variants[:2] if len(sys.argv) > 3 else variants:
    files[label] = tmp / f"{label}.zse"; convert(str(folder), files[label], ConvertOptions(**opts))
results = {}
plan = [("zse", None, ()), ("rtn", None, ())]
for kind in ("qkv", "o_proj", "gate_up", "down_proj"):
    plan.append(("zse", "rtn", (kind,)))
plan += [("zse_u", None, ()), ("rtn_u", None, ()), ("zse_u", "rtn_u", ("qkv",)), ("rtn_u", "zse_u", ("qkv",)),
         ("zse_u", "rtn_u", ("down_proj",))]
if len(sys.argv) > 3:  # "short": the current default's layout only
    plan = plan[:6]
    files = {k: v for k, v in files.items()}
for into, source, kinds in plan:
    label = into if not source else f"{into} with {source}'s {'+'.join(kinds)}"
    path = files[into] if not source else splice(files[into], files[source], kinds, tmp / "hybrid.zse")
    results[label] = score(path); print(f"{label:40s} dppl {results[label][0]:8.4f}  KL {results[label][1]:.4f}", flush=True)
json.dump({"fp16": fp16, "tokens": tokens, "results": results}, open(f"/tmp/q/splice_{folder.name}.json", "w"), indent=1)
