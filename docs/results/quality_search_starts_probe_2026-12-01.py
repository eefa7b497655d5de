"""Search variants that keep a group's largest-|w| element unclipped, on both fixtures (default
layout), scored like eval_quality: Δppl and KL against fp16."""
import json, sys, tempfile, time
from pathlib import Path
import numpy as np
sys.path.insert(0, "scripts"); sys.path.insert(0, ".")
from eval_quality import Scores, default_text, hf_logprobs, hf_model, log_softmax, text_windows
import zse_convert.convert as conv
import zse_convert.quantize as qz
from zse_runtime.engine import Engine
from zse_runtime.model import Batch
from zse_runtime.zsefile import Int4Weight

def make_quantizer(mode):
    def quantize_int4(w, group_size, clip_search=True, name="tensor", column_weight=None):
        w = np.ascontiguousarray(w); qz.check_quantizable(w, group_size, name)
        cw = np.ones(w.shape[1]) if column_weight is None else np.ascontiguousarray(column_weight, np.float64)
        numerators = qz.SEARCH_NUMERATORS
        if mode == "noclip":
            numerators = numerators[numerators <= qz.LEVELS]
        grids = {"n15": [15.0], "n13_15": np.linspace(13, 15, 9), "n14_16": np.linspace(14, 16, 9),
                 "n12_15": np.linspace(12, 15, 13), "n14_15_fine": np.linspace(14, 15, 9)}
        if mode in grids:
            numerators = np.asarray(grids[mode], np.float32)
        scales, mins = qz._search_groups(w, group_size, numerators, cw)
        s16, z16 = qz.fp16_candidates(scales, mins)
        if mode in ("protect", "protect2"):
            rows, cols = w.shape; g = w.reshape(rows, cols // group_size, group_size)
            order = np.argsort(-np.abs(g), axis=2)[..., :(1 if mode == "protect" else 2)]
            x = np.take_along_axis(g, order, axis=2)
            s, z = s16[..., :1], z16[..., :1]
            with np.errstate(all="ignore"):
                q = np.clip(np.floor(x / s + z + 0.5), 0, qz.LEVELS)
                clipped = (np.abs((q - z) * s - x) > 0.5001 * s).any(axis=2)
            s16[..., 0][clipped] = np.inf
            quantize_int4.clipped += int(clipped.sum()); quantize_int4.groups += clipped.size
        qweight, choice, errors = qz._choose_and_pack(w, group_size, s16, z16, cw)
        picked = np.take_along_axis(np.stack([s16, z16]), choice[None, ..., None].astype(np.intp), axis=3)[..., 0]
        stats = qz.QuantStats(error=1.0, rtn_error=1.0, numel=w.size)
        return Int4Weight(qweight, picked[0].astype(np.float16), picked[1].astype(np.float16), group_size), stats
    quantize_int4.clipped = 0; quantize_int4.groups = 0
    return quantize_int4

out = {}
for folder, tokens in [("tests/.fixtures/smollm2-135m-instruct", 4096), ("tests/.fixtures/qwen2.5-coder-0.5b-instruct", 2048)]:
    folder = Path(folder)
    windows = text_windows(folder, default_text(), tokens, 512)
    m = hf_model(folder); reference = [hf_logprobs(m, w) for w in windows]; del m
    base = Scores()
    for w, r in zip(windows, reference): base.add(r, r, w)
    fp16 = base.summary()["perplexity"]
    for mode in sys.argv[1].split(","):
        started = time.perf_counter()
        quant = make_quantizer(mode); conv.quantize_int4 = quant
        path = Path(tempfile.mkdtemp()) / "v.zse"
        conv.convert(str(folder), path, conv.ConvertOptions())
        engine = Engine.open(path, device="cpu", max_model_len=512)
        s = Scores()
        for w, r in zip(windows, reference):
            n = len(w)
            s.add(log_softmax(np.asarray(engine.forward(Batch.of(w, np.arange(n), np.zeros(n), np.arange(n - 1))))), r, w)
        r = s.summary()
        out[f"{folder.name} {mode}"] = dict(dppl=round(r["perplexity"] - fp16, 4), kl=round(r["kl_mean"], 5),
                                            top1=round(r["top1_agreement"], 4), kl_p99=round(r["kl_p99"], 4),
                                            search_refused=f"{quant.clipped}/{quant.groups}")
        print(folder.name, mode, out[f"{folder.name} {mode}"], f"{time.perf_counter() - started:.0f} s", flush=True)
json.dump(out, open(f"/tmp/q/search_probe_{sys.argv[1].replace(',', '_')}.json", "w"), indent=1)
