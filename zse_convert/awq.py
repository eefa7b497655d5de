"""AWQ: per-input-channel scales chosen on calibration activations, folded into the producer.

For a projection y = x·Wᵀ, multiplying input column j of W by s_j and dividing input channel j
by s_j leaves y unchanged in float. Quantizing W·diag(s) instead of W gives the columns that
meet large activations (s_j > 1) finer steps relative to their weights (Lin et al., 2023,
"activation-aware weight quantization"). The 1/s is folded into whatever produces the input:

    consumer        its input                        1/s goes into
    qkv             rmsnorm(h) · attn_norm           attn_norm
    gate_up         rmsnorm(h) · mlp_norm            mlp_norm
    o_proj          softmax(q·kᵀ) · v, per head      v's rows (and v's bias) of qkv
    down_proj       silu(gate) · up                  up's rows of gate_up

so the float model computes exactly what it did, and nothing about the file changes: the norms
stay float32 vectors and the projections int4.rows.v1. For o_proj under grouped-query attention
one v row feeds the same channel of every query head that shares its key-value head, so those
heads share one scale (their activation statistics are averaged).

The scale is s_j = m_j^α with m_j = mean |x_j| over the calibration tokens, normalised so that
max(s)·min(s) = 1; α is chosen per consumer from a grid by the output error ||X·Wᵀ − X·Ŵ(α)ᵀ||²
of the quantized result Ŵ(α) = Q(W·diag(s))·diag(s)⁻¹ on a sample of the calibration tokens and
of W's rows. α = 0 gives s = 1, i.e. exactly the quantization without AWQ, so on that sample
the chosen α is never worse than none.

The scaled weights go through the same group search as without AWQ (quantize.py). Weighting that
search by the scaled inputs' energy as well (AWQ's output-aware clipping, approximated by
diag(H)) lowered the calibration output error further but raised Qwen2.5-Coder-0.5B's perplexity
increase (docs/quality.md, "AWQ"), so it is not done.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from zse_runtime.zsefile import dequantize_int4

from .quantize import quantize_int4

# 0, 0.05, ..., 1 as in the AWQ reference's grid of 20 (which stops before 1).
ALPHAS = tuple(round(a, 2) for a in np.linspace(0.0, 1.0, 21))
SEARCH_ROWS = 512  # rows of W the output error is measured on (evenly spaced); all if fewer
SEARCH_TOKENS = 2048  # calibration tokens it is measured on (every k-th); all if fewer
MEAN_FLOOR = 1e-5  # channels with mean |x| below this fraction of the largest are raised to it


@dataclass
class AwqOptions:
    alphas: tuple[float, ...] = ALPHAS
    clip_search: bool = True  # the group search on the scaled weights (False: round-to-nearest)
    search_rows: int = SEARCH_ROWS
    search_tokens: int = SEARCH_TOKENS


@dataclass
class ScaleChoice:
    alpha: float
    scales: np.ndarray  # float32 [K]: column j of W is multiplied, input channel j divided by it
    errors: list[float] = field(default_factory=list)  # output error at each α, smallest α first

    @property
    def error_ratio(self) -> float:
        """Output error at the chosen α over that at α = 0 (no scaling), on the search sample."""
        return min(self.errors) / self.errors[0] if self.errors and self.errors[0] else 1.0


def channel_scales(mean_abs: np.ndarray, alpha: float) -> np.ndarray:
    """s = m^α normalised to max(s)·min(s) = 1, float32 [K]; all ones at α = 0."""
    if alpha == 0:
        return np.ones(mean_abs.shape, np.float32)
    m = mean_abs.astype(np.float64)
    top = float(m.max()) if m.size else 0.0
    if not top > 0:
        return np.ones(mean_abs.shape, np.float32)
    s = np.maximum(m, top * MEAN_FLOOR) ** alpha
    return (s / np.sqrt(s.max() * s.min())).astype(np.float32)


def shared_by_kv_heads(mean_abs: np.ndarray, heads: int, kv_heads: int) -> np.ndarray:
    """o_proj's per-channel statistic [heads · head_dim] averaged over the query heads that
    share a key-value head (so one scale per v row), expanded back to every head."""
    per_head = mean_abs.reshape(heads, -1)
    grouped = per_head.reshape(kv_heads, heads // kv_heads, -1).mean(1)
    return np.repeat(grouped, heads // kv_heads, axis=0).reshape(-1)


def search_scales(w: np.ndarray, x: np.ndarray, group_size: int, options: AwqOptions,
                  mean_abs: np.ndarray | None = None, name: str = "tensor") -> ScaleChoice:
    """The α of options.alphas whose scaled quantization has the least output error on x.

    w: float32 [N, K]; x: float32 [T, K] the consumer's inputs; mean_abs: the statistic the
    scales come from (default mean |x| per channel; o_proj passes the kv-shared one).
    """
    if mean_abs is None:
        mean_abs = np.abs(x).mean(0, dtype=np.float64)
    rows = np.unique(np.linspace(0, w.shape[0] - 1, min(w.shape[0], options.search_rows))
                     .astype(np.int64))
    sample = np.ascontiguousarray(w[rows], np.float32)
    tokens = np.ascontiguousarray(x[::max(1, -(-x.shape[0] // options.search_tokens))])
    best = None
    errors = []
    for alpha in sorted(options.alphas):
        s = channel_scales(mean_abs, alpha)
        try:
            weight, _ = quantize_int4(sample * s, group_size, options.clip_search, name)
        except ValueError:  # scaled weights beyond what fp16 scales hold: not a candidate
            errors.append(float("inf"))
            continue
        difference = sample - dequantize_int4(weight) / s
        error = float(np.square(tokens @ difference.T, dtype=np.float32).sum(dtype=np.float64))
        errors.append(error)
        if best is None or error < best[0]:
            best = (error, alpha, s)
    if best is None:
        raise ValueError(f"{name}: no AWQ scale in {options.alphas} gives quantizable weights")
    return ScaleChoice(best[1], best[2], errors)


# The folds. Each keeps the float layer's output unchanged (tests/test_awq.py checks it).

def scale_columns(w: np.ndarray, s: np.ndarray) -> np.ndarray:
    """The consumer: W·diag(s) [N, K]."""
    return (w * s[None, :]).astype(np.float32)


def fold_into_norm(norm_weight: np.ndarray, s: np.ndarray) -> np.ndarray:
    """RMSNorm's weight divided by s: the norm's output is the consumer's input over s."""
    return (norm_weight / s).astype(np.float32)


def fold_into_v(qkv: np.ndarray, qkv_bias: np.ndarray | None, s: np.ndarray, q_size: int,
                kv_size: int, heads: int, kv_heads: int) -> tuple[np.ndarray, np.ndarray | None]:
    """v's rows (and bias) of the fused qkv divided by o_proj's scales [heads · head_dim], which
    must be equal across the query heads of each key-value head (shared_by_kv_heads)."""
    per_kv = s.reshape(kv_heads, heads // kv_heads, -1)
    if not (per_kv == per_kv[:, :1]).all():
        raise ValueError("o_proj's scales differ between query heads that share a v row")
    s_v = per_kv[:, 0].reshape(-1)
    qkv = qkv.copy()
    qkv[q_size + kv_size:] /= s_v[:, None]
    if qkv_bias is not None:
        qkv_bias = qkv_bias.copy()
        qkv_bias[q_size + kv_size:] /= s_v
    return qkv, qkv_bias


def fold_into_up(gate_up: np.ndarray, s: np.ndarray) -> np.ndarray:
    """up's rows of the fused [gate; up] divided by down_proj's scales: silu(gate)·up is linear
    in up."""
    gate_up = gate_up.copy()
    gate_up[gate_up.shape[0] // 2:] /= s[:, None]
    return gate_up
