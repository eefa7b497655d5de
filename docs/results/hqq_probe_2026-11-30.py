"""Issue-6 experiment (2026-11-30; a probe kept for the record, not part of the toolchain): HQQ-style zero refinement (half-quadratic, l_p shrinkage, no data) against
ZSE's clipping search at g128, all dequantized and run through transformers (as the GGUF rows)."""
import json, sys, time
from pathlib import Path
import numpy as np
REPO = Path(__file__).resolve().parents[2]  # docs/results/ -> the repository
sys.path.insert(0, str(REPO)); sys.path.insert(0, str(REPO / "scripts"))
import eval_quality as eq
from safetensors.numpy import load_file
from zse_convert.convert import _group_size_for
from zse_convert.quantize import quantize_int4
from zse_runtime.zsefile import dequantize_int4

folder = Path(sys.argv[1]); GROUP = int(sys.argv[2]); variants = sys.argv[3].split(",")
tokens = int(sys.argv[4]) if len(sys.argv) > 4 else 2048
tensors = {}
for f in sorted(folder.glob("*.safetensors")):
    tensors.update(load_file(f))
names = [n for n in tensors if n.endswith(eq.QUANTIZED_SUFFIXES)]

def shrink(x, beta, p):
    a = np.abs(x)
    return np.sign(x) * np.maximum(a - (1.0 / beta) * np.power(a + 1e-8, p - 1), 0)

def hqq(w, scale, zero, iters=20, p=0.7, beta=10.0, kappa=1.01):
    """w [n, G]; w ~ (q - zero) * scale. Refines zero (fp32) with scale fixed."""
    inv = 1.0 / scale
    best, best_zero = np.inf, zero.copy()
    for _ in range(iters):
        q = np.clip(np.rint(w * inv + zero), 0, 15)
        r = (q - zero) * scale
        e = shrink(w - r, beta, p)
        zero = np.mean(q - (w - e) * inv, axis=1, keepdims=True)
        beta *= kappa
        err = np.abs(w - r).mean()
        if err < best:
            best, best_zero = err, zero.copy()
        else:
            break
    return best_zero

def dequant(w, zero, scale):
    q = np.clip(np.rint(w / scale + zero), 0, 15)
    return (q - zero) * scale

def variant_weights(kind):
    out = {}
    for name in names:
        w = tensors[name].astype(np.float32)
        rows, cols = w.shape
        group = _group_size_for(cols, GROUP, name)  # the converter's fallback (SmolLM2's 576)
        if kind == "zse":
            weight, _ = quantize_int4(w, group)
            out[name] = dequantize_int4(weight).astype(np.float32)
            continue
        g = w.reshape(-1, group)
        if kind == "hqq":  # from min-max, as HQQ does
            lo, hi = g.min(1, keepdims=True), g.max(1, keepdims=True)
            scale = np.maximum(hi - lo, 1e-8) / 15
            zero = -lo / scale
        else:  # "zse+hqq": ZSE's chosen scale, its zero refined
            weight, _ = quantize_int4(w, group)
            scale = weight.scales.astype(np.float32).reshape(-1, 1)
            zero = weight.zeros.astype(np.float32).reshape(-1, 1)
        zero = hqq(g, scale, zero)
        scale16 = scale.astype(np.float16).astype(np.float32)
        zero16 = zero.astype(np.float16).astype(np.float32)
        out[name] = dequant(g, zero16, scale16).reshape(rows, cols).astype(np.float32)
    return out

windows = eq.text_windows(folder, eq.default_text(), tokens, 512)
ref_model = eq.hf_model(folder)
reference = [eq.hf_logprobs(ref_model, w) for w in windows]
del ref_model
results = {}
scores = eq.Scores()
for w, ref in zip(windows, reference):
    scores.add(ref, ref, w)
results["fp16"] = scores.summary()
print("fp16", json.dumps(results["fp16"]), flush=True)
for kind in variants:
    t = time.perf_counter()
    if kind == "q4_0":
        model = eq.hf_model(folder, eq.gguf_variant(folder, "Q4_0", lm_head=False))
    else:
        model = eq.hf_model(folder, variant_weights(kind))
    scores = eq.Scores()
    for w, ref in zip(windows, reference):
        scores.add(eq.hf_logprobs(model, w), ref, w)
    del model
    results[kind] = scores.summary()
    print(kind, json.dumps(results[kind]), f"{time.perf_counter() - t:.0f} s", flush=True)
json.dump(results, open(f"hqq_{folder.name}_g{GROUP}.json", "w"), indent=1)  # in the cwd
