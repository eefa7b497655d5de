"""Run after writing /tmp/qzp/qz_sq.py and qz_x2.py: copies of zse_convert/quantize.py whose
error weight (floor + abs(x)) is replaced by (floor + abs(x))**2 and x*x + floor*floor.

Search error weightings (probe copies of quantize.py): rms+|x| (shipped), (rms+|x|)^2, x^2+rms^2;
g128 default layout, both fixtures, Δppl and KL."""
import importlib.util, json, sys, tempfile, time
from pathlib import Path
import numpy as np
sys.path.insert(0, "scripts"); sys.path.insert(0, ".")
from eval_quality import Scores, default_text, hf_logprobs, hf_model, log_softmax, text_windows
import zse_convert.convert as conv
from zse_runtime.engine import Engine
from zse_runtime.model import Batch

def load(name):
    spec = importlib.util.spec_from_file_location(f"qz_{name}", f"/tmp/qzp/qz_{name}.py")
    m = importlib.util.module_from_spec(spec); sys.modules[spec.name] = m; spec.loader.exec_module(m); return m
out = {}
for folder, tokens in [("tests/.fixtures/smollm2-135m-instruct", 4096), ("tests/.fixtures/qwen2.5-coder-0.5b-instruct", 2048)]:
    folder = Path(folder)
    windows = text_windows(folder, default_text(), tokens, 512)
    m = hf_model(folder); reference = [hf_logprobs(m, w) for w in windows]; del m
    base = Scores()
    for w, r in zip(windows, reference): base.add(r, r, w)
    fp16 = base.summary()["perplexity"]
    for mode in sys.argv[1].split(","):
        t0 = time.perf_counter()
        conv.quantize_int4 = load(mode).quantize_int4
        path = Path(tempfile.mkdtemp()) / "v.zse"
        conv.convert(str(folder), path, conv.ConvertOptions())
        engine = Engine.open(path, device="cpu", max_model_len=512)
        s = Scores()
        for w, r in zip(windows, reference):
            n = len(w)
            s.add(log_softmax(np.asarray(engine.forward(Batch.of(w, np.arange(n), np.zeros(n), np.arange(n - 1))))), r, w)
        r = s.summary()
        out[f"{folder.name} {mode}"] = dict(dppl=round(r["perplexity"] - fp16, 4), kl=round(r["kl_mean"], 5),
                                            top1=round(r["top1_agreement"], 4), kl_p99=round(r["kl_p99"], 4))
        print(folder.name, mode, out[f"{folder.name} {mode}"], f"{time.perf_counter() - t0:.0f} s", flush=True)
json.dump(out, open("/tmp/q/weights_probe.json", "w"), indent=1)
