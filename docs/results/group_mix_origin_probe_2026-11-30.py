"""Issue-6 experiment (2026-11-30; a probe kept for the record, not part of the toolchain): how much
of a per-projection g32 gain on Qwen2.5-Coder-0.5B comes from the fixture's GGUF origin.

The fixture was decoded from a GGUF file whose ffn_down is Q4_K in 12 layers and Q6_K in the other
12 (q/k/o/gate/up Q5_0, v Q8_0 or Q5_0). A Q4_K block of 32 is an asymmetric 4-bit grid, so ZSE's
g32 recovers those 12 down_proj tensors almost exactly. Here g32 is applied to down_proj only in
the layers of one source type, every other tensor at the converter's g128, each tensor quantized by
ZSE's own search, dequantized and run through transformers in float32 (as the GGUF rows are; the
`g128` row reproduces the runtime's perplexity). Run from the repository root:

    python docs/results/group_mix_origin_probe_2026-11-30.py \
        tests/.fixtures/qwen2.5-coder-0.5b-instruct g128,down32@Q6_K,down32@Q4_K,down32,qkv32 \
        --json-out docs/results/quality_group_mix_origin_probe_qwen.json

`--weight-errors` prints instead the search's relative weight error (Frobenius) at g32/g64/g128 of
a few layers' tensors, with their source types, and of Gaussian and Student-t(3) matrices.
"""
import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]  # docs/results/ -> the repository
sys.path.insert(0, str(REPO)); sys.path.insert(0, str(REPO / "scripts"))
import eval_quality as eq  # noqa: E402
import gguf  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from tests import gguf_fixtures  # noqa: E402
from zse_convert.convert import _group_size_for  # noqa: E402
from zse_convert.quantize import quantize_int4  # noqa: E402
from zse_runtime.zsefile import dequantize_int4  # noqa: E402

HF_PART = {"ffn_down": "mlp.down_proj", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
           "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
           "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj"}
KIND_PARTS = {"down": ["mlp.down_proj"], "qkv": ["self_attn.q_proj", "self_attn.k_proj",
                                                 "self_attn.v_proj"]}


def source_types() -> dict[str, str]:
    """HF weight name -> the GGUF quantization type it was decoded from (Qwen fixture only)."""
    with tempfile.TemporaryDirectory() as tmp:
        reader = gguf.GGUFReader(gguf_fixtures._gguf_file(gguf_fixtures._QWEN_CODER, Path(tmp)))
        out = {}
        for t in reader.tensors:
            parts = t.name.split(".")
            if parts[0] == "blk" and parts[2] in HF_PART and parts[3] == "weight":
                out[f"model.layers.{parts[1]}.{HF_PART[parts[2]]}.weight"] = t.tensor_type.name
        return out


def weight_errors(folder: Path, types: dict[str, str]) -> None:
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(f))

    def row(label: str, w: np.ndarray) -> None:
        errors = []
        for group in (32, 64, 128):
            weight, _ = quantize_int4(w, group)
            errors.append(np.linalg.norm(dequantize_int4(weight) - w) / np.linalg.norm(w))
        print(f"{label:<40} g32 {errors[0]:.4f} g64 {errors[1]:.4f} g128 {errors[2]:.4f} "
              f"g32/g128 {errors[0] / errors[2]:.3f}", flush=True)

    names = [f"model.layers.{i}.mlp.down_proj.weight" for i in range(6)] + [
        f"model.layers.{i}.{part}.weight" for i in (0, 2) for part in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj")]
    for name in names:
        row(f"{name.removeprefix('model.layers.')} ({types[name]})",
            tensors[name].astype(np.float32))
    rng = np.random.default_rng(0)
    row("gaussian 896x4864", rng.standard_normal((896, 4864)).astype(np.float32))
    row("student-t(3) 896x4864", rng.standard_t(3, (896, 4864)).astype(np.float32))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("variants", nargs="?", help="g128, or KIND32[@TYPE] with KIND down or "
                        "qkv: that kind at g32 (only where the source was TYPE)")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--weight-errors", action="store_true")
    args = parser.parse_args()
    types = source_types()
    if args.weight_errors:
        weight_errors(args.folder, types)
        return 0
    if not args.variants or not args.json_out:
        parser.error("variants and --json-out are required unless --weight-errors")
    tensors = {}
    for f in sorted(args.folder.glob("*.safetensors")):
        tensors.update(load_file(f))
    names = [n for n in tensors if n.endswith(eq.QUANTIZED_SUFFIXES)]
    cache: dict[tuple[str, int], np.ndarray] = {}

    def dequantized(name: str, group: int) -> np.ndarray:
        group = _group_size_for(tensors[name].shape[1], group, name)
        if (name, group) not in cache:
            weight, _ = quantize_int4(tensors[name].astype(np.float32), group)
            cache[(name, group)] = dequantize_int4(weight).astype(np.float32)
        return cache[(name, group)]

    windows = eq.text_windows(args.folder, eq.default_text(), args.tokens, 512)
    model = eq.hf_model(args.folder)
    reference = [eq.hf_logprobs(model, w) for w in windows]
    del model
    scores = eq.Scores()
    for w, ref in zip(windows, reference):
        scores.add(ref, ref, w)
    results = {"fp16": scores.summary()}
    print("fp16", json.dumps(results["fp16"]), flush=True)
    for variant in args.variants.split(","):
        started = time.perf_counter()
        kind, _, only = variant.partition("@")
        g32 = set()
        if kind != "g128":
            parts = KIND_PARTS[kind.removesuffix("32")]
            g32 = {n for n in names if any(f".{p}." in n for p in parts)
                   and (not only or types[n] == only)}
        weights = {n: dequantized(n, 32 if n in g32 else 128) for n in names}
        bits = (sum(weights[n].size * (4 + 32 / (32 if n in g32 else 128)) for n in names)
                / sum(weights[n].size for n in names))
        model = eq.hf_model(args.folder, weights)
        scores = eq.Scores()
        for w, ref in zip(windows, reference):
            scores.add(eq.hf_logprobs(model, w), ref, w)
        del model
        results[variant] = {**scores.summary(), "bits_per_weight": round(bits, 3),
                            "g32_tensors": len(g32),
                            "g32_source_types": dict(collections.Counter(types[n] for n in g32))}
        print(variant, json.dumps(results[variant]), f"{time.perf_counter() - started:.0f} s",
              flush=True)
    args.json_out.write_text(json.dumps({"model": args.folder.name, "tokens": args.tokens,
                                         "window": 512, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
