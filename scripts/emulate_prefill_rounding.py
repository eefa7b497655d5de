"""Which float16 rounding of the GPU prefill moves the logits, emulated on the CPU backend.

The GPU prefill rounds the INT4 GEMM's inputs to float16 per (token, group of 128) with a power
of two that puts the group's largest value in [2^14, 2^15) (kernels/gemm_int4.py), and rounds
q / sqrt(D) and the softmax weights to float16 in attention (kernels/attention_tiled.py). This
script applies exactly those roundings to the CPU backend's prefill (chunks of more than 32
tokens) and prints the prefill logits' error against transformers (float32, the dequantized
weights) on the random 4-layer qwen2 that scripts/gpu_check.py checks, for each rounding alone
and together, and for the GEMM's zero-point term summed over x itself instead of the rounded x.

    python scripts/emulate_prefill_rounding.py [--work DIR]      # ~2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zse_runtime.cpu import backend as cpu  # noqa: E402
from zse_runtime.engine import Engine  # noqa: E402
from zse_runtime.model import Batch  # noqa: E402

GEMV_MAX_TOKENS = 32  # larger batches are prefill chunks (kernels/geometry.py)
PLAIN_MATMUL, PLAIN_ATTENTION = cpu.CpuOps._matmul, cpu.CpuOps.attention


def fp16_per_group(x: np.ndarray, group: int) -> np.ndarray:
    """x rounded as split_activations rounds it."""
    tokens, cols = x.shape
    g = x.reshape(tokens, cols // group, group).astype(np.float64)
    largest = np.abs(g).max(-1, keepdims=True)
    exponent = np.floor(np.log2(np.where(largest > 0, largest, 1.0)))
    factor = 2.0 ** (14 - exponent)
    return ((g * factor).astype(np.float16) / factor).reshape(tokens, cols).astype(np.float32)


def rounded_matmul(exact_zero_point_sums: bool):
    def matmul(self, x, w):
        if not isinstance(w, cpu.CpuInt4) or x.shape[0] <= GEMV_MAX_TOKENS:
            return PLAIN_MATMUL(self, x, w)
        rounded = fp16_per_group(x, w.group_size)
        out = PLAIN_MATMUL(self, rounded, w)  # dequant(W) x'
        if exact_zero_point_sums:  # s (sum q x' - z sum x): the zero point sees x itself
            drift = (rounded - x).reshape(x.shape[0], -1, w.group_size).sum(-1)
            out += drift @ (w.scales * w.zeros).T
        return out

    return matmul


def rounded_attention(self, q, batch, layer):
    if q.shape[0] <= GEMV_MAX_TOKENS:
        return PLAIN_ATTENTION(self, q, batch, layer)
    c = self.config
    dim, heads, group = c.head_dim, c.num_attention_heads, c.group_ratio
    keys = self.k_cache[layer].view(np.float16).astype(np.float32)
    values = self.v_cache[layer].view(np.float16).astype(np.float32)
    q = q.reshape(q.shape[0], heads, dim)
    out = np.empty_like(q)
    for t, (position, slot) in enumerate(zip(batch.positions, batch.slots)):
        for h in range(heads):
            query = (q[t, h] / np.sqrt(dim)).astype(np.float16).astype(np.float32)
            scores = keys[slot, h // group, :position + 1] @ query
            weights = np.exp(scores - scores.max())
            rounded = weights.astype(np.float16).astype(np.float32)  # P; the sum stays float32
            out[t, h] = rounded @ values[slot, h // group, :position + 1] / weights.sum()
    return out.reshape(q.shape[0], -1)


def main() -> int:
    import torch

    from tests.checkpoints import make_checkpoint
    from tests.reference import hf_model_from_zse
    from zse_convert.convert import ConvertOptions, convert

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/zse_prefill_rounding"))
    args = parser.parse_args()
    checkpoint = make_checkpoint(args.work / "qwen2-ckpt", "qwen2", hidden_size=896,
                                 intermediate_size=4864, num_hidden_layers=4,
                                 num_attention_heads=14, num_key_value_heads=2, vocab_size=32000,
                                 max_position_embeddings=4096)
    model = args.work / "qwen2.zse"
    if not model.exists():
        convert(str(checkpoint), model, ConvertOptions())
    ids = np.random.default_rng(5).integers(0, 300, 150).tolist()  # gpu_check's short prompt
    n = len(ids)
    with torch.no_grad():
        reference = hf_model_from_zse(model, checkpoint)(torch.tensor([ids])).logits[0].numpy()
    variants = {
        "float32 (the CPU backend)": (PLAIN_MATMUL, PLAIN_ATTENTION),
        "float16 GEMM inputs": (rounded_matmul(False), PLAIN_ATTENTION),
        "float16 q and softmax weights": (PLAIN_MATMUL, rounded_attention),
        "both (the GPU prefill)": (rounded_matmul(False), rounded_attention),
        "both, zero points on x itself": (rounded_matmul(True), rounded_attention),
    }
    print(f"{'prefill rounding':<34} max |logit error| / max |logit| at 12 positions")
    try:
        for label, (matmul, attention) in variants.items():
            cpu.CpuOps._matmul, cpu.CpuOps.attention = matmul, attention
            engine = Engine.open(model, device="cpu", max_model_len=2048)
            error = 0.0
            for first in (0, n // 2, n - 4):  # as gpu_check's prefill logits check
                rows = np.unique(np.clip(np.arange(first, first + 4), 0, n - 1))
                got = engine.forward(Batch.of(ids, np.arange(n), np.zeros(n), rows))
                error = max(error, float(np.abs(got - reference[rows]).max()
                                         / np.abs(reference[rows]).max()))
            print(f"{label:<34} {error:.2e}", flush=True)
    finally:
        cpu.CpuOps._matmul, cpu.CpuOps.attention = PLAIN_MATMUL, PLAIN_ATTENTION
    return 0


if __name__ == "__main__":
    sys.exit(main())
