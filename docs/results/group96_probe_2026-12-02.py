"""Feasibility: SmolLM2 with o/gate/up (576 inputs, not a multiple of 128) at group 96 (576 =
6 x 96, 4.33 bits) instead of the g64 fallback (4.5 bits); the converter's default file
dequantized, those projections requantized by the same search at g96 (the quantizer's group
check widened for the probe only: no kernel reads g96), every variant through transformers in
float32 on the evaluation text (4096 tokens in windows of 512), as the Q4_0 rows are.
    python docs/results/group96_probe_2026-12-02.py tests/.fixtures/smollm2-135m-instruct OUT.json
"""
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import eval_quality as eq  # noqa: E402
import zse_convert.quantize as qz  # noqa: E402
import zse_runtime.zsefile as zf  # noqa: E402
from zse_convert.architectures import source_names  # noqa: E402
from zse_convert.convert import ConvertOptions, convert  # noqa: E402

folder, out = Path(sys.argv[1]), Path(sys.argv[2])
windows = eq.text_windows(folder, eq.default_text(), 4096, 512)
m = eq.hf_model(folder)
reference = [eq.hf_logprobs(m, w) for w in windows]
del m


def score(replace):
    m = eq.hf_model(folder, replace)
    s = eq.Scores()
    for w, r in zip(windows, reference):
        s.add(eq.hf_logprobs(m, w), r, w)
    return s.summary()


s = eq.Scores()
for w, r in zip(windows, reference):
    s.add(r, r, w)
base = s.summary()["perplexity"]
print("fp16", base, flush=True)
orig = {}
for f in sorted(folder.glob("*.safetensors")):
    orig.update(load_file(f))
default, sizes = {}, {}
with tempfile.TemporaryDirectory() as tmp:
    convert(str(folder), Path(tmp) / "d.zse", ConvertOptions())
    with zf.ZseFile(Path(tmp) / "d.zse") as zse:
        for t in zse.tensors.values():
            if not t.group_size or t.name == "lm_head":
                continue
            w = zf.dequantize_int4(zse.int4(t.name))
            row = 0
            for n in source_names(t.name, zse.manifest["model"], set(orig)):
                r = orig[n].shape[0]
                default[n] = w[row:row + r].copy()
                row += r
                sizes[n] = t.group_size
qz.INT4_GROUP_SIZES = zf.INT4_GROUP_SIZES = (32, 64, 96, 128)


def at(w, g):
    return zf.dequantize_int4(qz.quantize_int4(np.ascontiguousarray(w.astype(np.float32)), g)[0])


results = {"fp16": base, "group_sizes_of_the_default": dict(list(sizes.items())[:7])}
q40 = score(eq.gguf_variant(folder, "Q4_0", lm_head=False))
results["q4_0"] = q40
print("q4_0", q40, flush=True)
results["default"] = score(default)
print("default", results["default"], flush=True)
for label, kinds in (("o, gate, up at g96", ("o_proj", "gate_proj", "up_proj")),
                     ("gate, up at g96", ("gate_proj", "up_proj"))):
    rep = dict(default)
    for n in rep:
        if n.rsplit(".", 2)[-2] in kinds:
            rep[n] = at(orig[n], 96)
    results[label] = score(rep)
    print(label, results[label], flush=True)
for k, v in results.items():
    if isinstance(v, dict) and "perplexity" in v:
        d = v["perplexity"] - base
        print(f"{k:20s} dppl {d:.4f}  x q4_0 {d / (q40['perplexity'] - base):.3f}  "
              f"kl {v['kl_mean']:.5f}")
out.write_text(json.dumps(results, indent=1))
