"""Quantization quality on real weights: perplexity, top-1 agreement and KL divergence against
the unquantized model, for ZSE's INT4 at group 32/64/128 (with and without the clipping search,
and with GPTQ and/or AWQ against calibration text) and llama.cpp's Q4_0 / Q4_1.

    python scripts/eval_quality.py HF_FOLDER [--text FILE ...] [--tokens 4096] [--window 512]
                                   [--variants zse-g128,gptq-g64,...] [--calibration-tokens N]
                                   [--update JSON] [--json-out F]

Text defaults to CPython's LICENSE.txt and pydoc_data.topics (both ship with the interpreter).
The text is cut into non-overlapping windows; each window is a fresh sequence.

How each variant runs:
  fp16 (reference)  transformers, float32 on the CPU, on the checkpoint as it is;
  zse gN / rtn gN   converted with zse-convert and run through ZSE's own CPU backend;
  plain gN          the same as zse gN with --no-column-weights (down_proj's search unweighted);
  gptq gN           the same, converted with --gptq (calibration text: the converter's default,
                    Python standard-library source, disjoint from the text scored here);
  awq gN            the same, converted with --awq (same calibration text);
  awq+gptq gN       the same, converted with --awq --gptq;
  gguf q4_0 / q4_1  the same tensors quantized by the gguf package's reference quantizers,
                    dequantized, and run through transformers (ZSE cannot execute GGUF blocks).
A ZSE variant converts with zse-convert's defaults at its group size, q/k/v at 32 included, and
may add per-projection group sizes, `+KIND=SIZE` each (zse-convert's --group-size-for):
`zse-g128+down_proj=32`, `awq-g64+qkv=32+down_proj=32`; `zse-g128+qkv=128` is g128 throughout.
Quantized in every variant: the q/k/v, o, gate/up and down projections (and lm_head with
--lm-head int4); the embedding stays fp16 and norms/biases float32. Bits per weight count those
quantized tensors, from each tensor's size in the file (its own group size). Each row keeps its
per-window mean NLL and KL, and the table gives each variant's loss relative to Q4_0's, in
perplexity increase and in mean KL, with 95% intervals from a paired bootstrap over windows
(ratio_interval).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

QUANTIZED_SUFFIXES = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
                      "gate_proj.weight", "up_proj.weight", "down_proj.weight")


def default_text() -> str:
    import pydoc_data.topics

    license_file = (Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}."
                    f"{sys.version_info.minor}" / "LICENSE.txt")
    parts = [license_file.read_text()] if license_file.exists() else []
    return "\n\n".join(parts + list(pydoc_data.topics.topics.values()))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


class Scores:
    """Accumulates NLL, top-1 agreement and KL(reference || variant) over windows."""

    def __init__(self):
        self.nll, self.agree, self.kl = [], [], []

    def add(self, logprobs: np.ndarray, reference: np.ndarray, ids: list[int]) -> None:
        targets = np.asarray(ids[1:])
        self.nll.append(-logprobs[np.arange(len(targets)), targets])
        self.agree.append(logprobs.argmax(-1) == reference.argmax(-1))
        p_ref = np.exp(reference)
        self.kl.append((p_ref * (reference - logprobs)).sum(-1))

    def summary(self) -> dict:
        nll, kl = np.concatenate(self.nll), np.concatenate(self.kl)
        return {"perplexity": float(np.exp(nll.mean())),
                "top1_agreement": float(np.concatenate(self.agree).mean()),
                "kl_mean": float(kl.mean()), "kl_p99": float(np.percentile(kl, 99)),
                # per window, for intervals that resample whole windows (ratio_interval)
                "window_nll": [float(w.mean()) for w in self.nll],
                "window_kl": [float(w.mean()) for w in self.kl]}


BOOTSTRAP_SAMPLES = 4000


def _window_means(rows: list[list[float]], tokens: list[int], seed: int):
    """Token-weighted means of per-window values, per row: over all windows ([rows]) and over
    BOOTSTRAP_SAMPLES draws of windows with replacement, the same draws for every row
    ([samples, rows]), so that rows are compared on the same windows (a paired bootstrap)."""
    values = np.asarray(rows)  # [rows, windows]
    weights = np.asarray(tokens, np.float64)
    draws = np.random.default_rng(seed).integers(0, len(weights), (BOOTSTRAP_SAMPLES,
                                                                   len(weights)))
    counts = np.stack([np.bincount(d, minlength=len(weights)) for d in draws]) * weights
    return values @ weights / weights.sum(), counts @ values.T / counts.sum(1, keepdims=True)


def ratio_interval(results: dict, variant: str, baseline: str, tokens: list[int],
                   metric: str = "perplexity", level: float = 0.95,
                   seed: int = 0) -> tuple[float, float, float] | None:
    """(point, low, high) of variant's loss divided by baseline's: the perplexity increase over
    fp16 (metric "perplexity") or the mean KL from fp16 ("kl"), the interval by a paired
    bootstrap over windows. Windows, not tokens, are the unit: a window's tokens share their
    context, so resampling tokens would understate the spread. None where a row lacks
    per-window scores (files written before they were kept)."""
    key, names = (("window_nll", ("fp16", variant, baseline)) if metric == "perplexity"
                  else ("window_kl", (variant, baseline)))
    rows = [results[name].get(key) for name in names]
    if any(row is None for row in rows):
        return None
    whole, samples = _window_means(rows, tokens, seed)
    if metric == "perplexity":  # increases over the fp16 row
        whole, samples = np.exp(whole), np.exp(samples)
        whole, samples = whole[1:] - whole[0], samples[:, 1:] - samples[:, :1]
    ratios = samples[:, 0] / samples[:, 1]
    low, high = np.percentile(ratios, [50 * (1 - level), 50 * (1 + level)])
    return float(whole[0] / whole[1]), float(low), float(high)


def hf_model(folder: Path, replace: dict | None = None):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if replace:
        state = model.state_dict()
        for name, value in replace.items():
            state[name] = torch.from_numpy(value)
        if "lm_head.weight" in replace:
            model.config.tie_word_embeddings = False
            model.lm_head.weight = torch.nn.Parameter(torch.from_numpy(replace["lm_head.weight"]))
        model.load_state_dict({k: v for k, v in state.items() if k != "lm_head.weight"},
                              strict=False)
    return model.eval()


def hf_logprobs(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float().numpy()
    return log_softmax(logits)


def gguf_variant(folder: Path, qtype_name: str, lm_head: bool = True) -> dict[str, np.ndarray]:
    """Quantize and dequantize the same tensors ZSE quantizes, with gguf's reference code."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize
    from safetensors.numpy import load_file

    qtype = GGMLQuantizationType[qtype_name]
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    out = {}
    for name, value in tensors.items():
        if name.endswith(QUANTIZED_SUFFIXES) or (lm_head and name == "lm_head.weight"):
            w = value.astype(np.float32)
            out[name] = dequantize(quantize(w, qtype), qtype).reshape(w.shape).astype(np.float32)
    if lm_head and "lm_head.weight" not in out:  # tied: quantize a copy of the embedding
        w = tensors["model.embed_tokens.weight"].astype(np.float32)
        out["lm_head.weight"] = dequantize(quantize(w, qtype), qtype).reshape(w.shape).astype(np.float32)
    return out


def text_windows(folder: Path, text: str, tokens: int, window: int) -> list[list[int]]:
    """The text's first `tokens` tokens (the model's own tokenizer), in non-overlapping windows."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(folder).encode(text)[:tokens]
    windows = [ids[i:i + window] for i in range(0, len(ids) - 1, window)]
    return [w for w in windows if len(w) > 1]


def evaluate(folder: Path, windows: list[list[int]], variants: list[str], lm_head: str = "float16",
             log=print, gptq_options: dict | None = None) -> dict:
    """{variant: {perplexity, top1_agreement, kl_mean, kl_p99, bits_per_weight}}, fp16 first."""
    from zse_convert.convert import ConvertOptions, convert, parse_group_size_override
    from zse_runtime.engine import Engine
    from zse_runtime.model import Batch
    from zse_runtime.zsefile import ZseFile

    for variant in variants:  # a misspelt variant fails now, not after the reference run
        kind, spec = variant.split("-", 1)
        if kind != "gguf":
            [parse_group_size_override(part) for part in spec.split("+")[1:]]
    started = time.perf_counter()
    reference_model = hf_model(folder)
    reference = [hf_logprobs(reference_model, w) for w in windows]
    del reference_model
    scores = Scores()
    for w, ref in zip(windows, reference):
        scores.add(ref, ref, w)
    results = {"fp16": {**scores.summary(), "bits_per_weight": 16.0}}
    log(f"  fp16: ppl {results['fp16']['perplexity']:.4f} ({time.perf_counter() - started:.0f} s)")
    with tempfile.TemporaryDirectory() as tmp:
        for variant in variants:
            started = time.perf_counter()
            scores = Scores()
            kind, spec = variant.split("-", 1)
            if kind in ("zse", "rtn", "plain", "gptq", "awq", "awq+gptq"):
                out = Path(tmp) / f"{variant}.zse"
                group, *overrides = spec.split("+")
                extra = dict(gptq="gptq" in kind, awq="awq" in kind, column_weights=kind != "plain",
                             group_size_overrides=dict(map(parse_group_size_override, overrides)))
                if kind not in ("zse", "rtn", "plain"):
                    extra.update(gptq_options or {})
                summary = convert(str(folder), out, ConvertOptions(
                    group_size=int(group[1:]), clip_search=kind != "rtn", lm_head=lm_head, **extra))
                with ZseFile(out) as zse:
                    int4 = [t for t in zse.tensors.values() if t.group_size]
                    bits = sum(t.nbytes for t in int4) * 8 / sum(t.numel for t in int4)
                    # the group sizes in the file, per tensor kind (fallbacks included)
                    group_sizes = {}
                    for t in int4:
                        group_sizes.setdefault(t.name.rsplit(".", 1)[-1], set()).add(t.group_size)
                engine = Engine.open(out, device="cpu", max_model_len=max(len(w) for w in windows))
                for w, ref in zip(windows, reference):
                    n = len(w)
                    logits = engine.forward(Batch.of(w, np.arange(n), np.zeros(n), np.arange(n - 1)))
                    scores.add(log_softmax(np.asarray(logits)), ref, w)
                del engine
            else:
                model = hf_model(folder, gguf_variant(folder, spec.upper(), lm_head=lm_head == "int4"))
                bits = {"Q4_0": 4.5, "Q4_1": 5.0}[spec.upper()]  # (2 + 16) or (2 + 2 + 16) bytes / 32
                for w, ref in zip(windows, reference):
                    scores.add(hf_logprobs(model, w), ref, w)
                del model
            results[variant] = {**scores.summary(), "bits_per_weight": round(bits, 3)}
            if kind != "gguf":
                results[variant]["group_sizes"] = {k: sorted(v) for k, v in group_sizes.items()}
            if kind in ("gptq", "awq", "awq+gptq"):
                results[variant]["gptq"] = summary["gptq"]
                if summary["awq"]:
                    results[variant]["awq"] = summary["awq"]
                results[variant]["convert_seconds"] = summary["seconds"]
            log(f"  {variant}: ppl {results[variant]['perplexity']:.4f}, {bits:.3f} bits "
                f"({time.perf_counter() - started:.0f} s)")
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path, help="Hugging Face checkpoint folder")
    parser.add_argument("--text", type=Path, nargs="*")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens of text to score")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--variants", default="zse-g128,zse-g64,zse-g32,plain-g128,plain-g64,"
                                               "rtn-g128,rtn-g64,rtn-g32,gptq-g128,gptq-g64,"
                                               "awq-g128,awq-g64,awq+gptq-g128,awq+gptq-g64,"
                                               "gguf-q4_0,gguf-q4_1")
    parser.add_argument("--lm-head", choices=["int4", "float16"], default="float16",
                        help="lm_head precision in every quantized variant")
    parser.add_argument("--calibration-tokens", type=int, help="for the gptq and awq variants "
                        "(default: the converter's)")
    parser.add_argument("--json-out", type=Path, default=Path("eval_quality.json"))
    parser.add_argument("--update", type=Path, help="an earlier --json-out of the same model, "
                        "text, tokens and window: keep its rows, add or replace the ones run now")
    args = parser.parse_args()

    text = "\n\n".join(p.read_text() for p in args.text) if args.text else default_text()
    windows = text_windows(args.folder, text, args.tokens, args.window)
    scored = sum(len(w) - 1 for w in windows)
    print(f"{args.folder.name}: {scored} scored tokens in {len(windows)} windows", flush=True)
    gptq_options = ({"calibration_tokens": args.calibration_tokens}
                    if args.calibration_tokens else {})
    results = evaluate(args.folder, windows, args.variants.split(","), args.lm_head,
                       log=lambda line: print(line, flush=True), gptq_options=gptq_options)
    report = {"model": args.folder.name, "tokens": scored, "window": args.window,
              "lm_head": args.lm_head, "window_tokens": [len(w) - 1 for w in windows],
              "results": results}
    if args.update:
        earlier = json.loads(args.update.read_text())
        same = {k: earlier[k] for k in ("model", "tokens", "window", "lm_head")}
        if same != {k: report[k] for k in same}:
            parser.error(f"--update {args.update} was measured on {same}, not on "
                         f"{ {k: report[k] for k in same} }")
        ppl = (earlier["results"]["fp16"]["perplexity"], results["fp16"]["perplexity"])
        if abs(ppl[0] - ppl[1]) > 1e-6 * ppl[0]:
            parser.error(f"--update {args.update}: its fp16 perplexity {ppl[0]} differs from "
                         f"this run's {ppl[1]}; the rows would not be comparable")
        results = report["results"] = {**earlier["results"], **results}
    base = results["fp16"]["perplexity"]
    args.json_out.write_text(json.dumps(report, indent=2))
    width = max(10, *map(len, results))
    print(f"\n{'variant':<{width}} {'bits/w':>7} {'ppl':>9} {'d ppl':>8} {'top-1':>7} {'KL mean':>9} "
          f"{'KL p99':>8}  x Q4_0: d ppl, KL mean [95%, windows resampled]")
    for name, r in results.items():
        ratios = ""
        if "gguf-q4_0" in results and name not in ("fp16", "gguf-q4_0"):
            for metric in ("perplexity", "kl"):
                interval = ratio_interval(results, name, "gguf-q4_0", report["window_tokens"],
                                          metric)
                ratios += (f"  {interval[0]:.3f} [{interval[1]:.3f}, {interval[2]:.3f}]"
                           if interval else "")
        print(f"{name:<{width}} {r['bits_per_weight']:>7.3f} {r['perplexity']:>9.4f} "
              f"{r['perplexity'] - base:>8.4f} {r['top1_agreement']:>7.3f} {r['kl_mean']:>9.5f} "
              f"{r['kl_p99']:>8.4f}{ratios}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
