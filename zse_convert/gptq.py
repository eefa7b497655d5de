"""GPTQ: INT4 codes chosen against a layer's inputs, in the unchanged int4.rows.v1 layout.

The clipping search (quantize.py) minimises each group's own weight error. GPTQ (Frantar et
al., 2022) minimises the layer's output error ||X·Wᵀ − X·Ŵᵀ||² over calibration inputs X: it
quantizes one input column at a time and spreads that column's rounding error over the columns
not yet quantized, through the inverse of H = XᵀX. Here the groups stay static and contiguous,
so the file, its readers and every kernel are unchanged: each group's (scale, zero) is still
chosen by the clipping search, on the error-updated weights at the moment the group starts, and
still reconstructs w = (q − z)·s.

Act-order (columns with the largest H diagonal first) would scatter a group's columns over the
whole row. We order *groups* by their summed H diagonal and columns by H diagonal within each
group instead, so a group is still contiguous when its parameters are chosen.

Cost per matrix [N, K]: one Cholesky factorization and one triangular inverse of K x K
(~K³/3 multiply-adds each; float64 up to FLOAT64_MAX_COLUMNS inputs, float32 above, to bound
memory at 7B's 18944-wide down_proj), and ~N·K²/2 multiply-adds of lazy block updates (BLAS);
the column-by-column inner loop is numba, parallel over rows (rows are independent once the
group's parameters are fixed), and the clipping search runs once per group.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from zse_runtime.zsefile import Int4Weight

from .quantize import (CALIBRATED_SEARCH_NUMERATORS, LEVELS, QuantStats, check_quantizable,
                       quantize_int4)

# Fraction of mean(diag(H)) added to H's diagonal. The GPTQ reference uses 0.01; with 8192
# calibration tokens that overfits the calibration text: on Qwen2.5-Coder-0.5B (layers 0-2) the
# output error on held-out text relative to the clipping search's fell from 0.571 to 0.506 at
# 0.1, and 0.3 was no better.
DAMPING = 0.1
BLOCK_COLUMNS = 128  # lazy-update block, rounded to a multiple of the group size (96: 96)
FLOAT64_MAX_COLUMNS = 8192  # a float64 18944² inverse alone would take 2.9 GB
CHOLESKY_BLOCK = 4096
ACT_ORDERS = ("groups", "none")
SEARCH_WEIGHTS = ("hessian", "sqrt", "none")


@dataclass
class GptqOptions:
    damping: float = DAMPING
    act_order: str = "groups"
    clip_search: bool = True
    # weight each column's error in the group search by its input energy diag(H) (llama.cpp's
    # imatrix idea) rather than only by rms(group) + |w|: "hessian", "sqrt" (of it) or "none"
    search_weights: str = "hessian"


@numba.njit(parallel=True, cache=True, nogil=True)
def _quantize_group_with_feedback(block, hinv, start, group_size, scales, zeros, codes, errors):
    """Quantize columns [start, start + group_size) of block [N, B], pushing each column's error
    onto the block's later columns.

    hinv: float32 [B, B] upper Cholesky factor of H⁻¹ for the block's columns.
    scales, zeros: float32 [N], fp16-representable. codes: uint8 [N, B]; errors: float32 [N, B]
    (the scaled errors the caller applies to the columns after the block).
    """
    rows, width = block.shape
    for r in numba.prange(rows):
        scale = scales[r]
        zero = zeros[r]
        for i in range(start, start + group_size):
            x = block[r, i]
            q = min(max(np.floor(x / scale + zero + np.float32(0.5)), np.float32(0.0)),
                    np.float32(LEVELS))
            codes[r, i] = np.uint8(q)
            err = (x - (q - zero) * scale) / hinv[i, i]
            errors[r, i] = err
            for j in range(i + 1, width):
                block[r, j] -= err * hinv[i, j]


def column_order(hessian_diag: np.ndarray, group_size: int, act_order: str) -> np.ndarray:
    """Permutation of the K input columns: groups by summed diag(H), descending, then columns
    by diag(H) within each group; every group stays contiguous in the new order."""
    cols = hessian_diag.size
    if act_order == "none":
        return np.arange(cols)
    if act_order != "groups":
        raise ValueError(f"act_order must be one of {ACT_ORDERS}, got {act_order!r}")
    per_group = hessian_diag.reshape(-1, group_size)
    group_rank = np.argsort(-per_group.sum(1), kind="stable")
    within = np.argsort(-per_group, axis=1, kind="stable")
    return (group_rank[:, None] * group_size + within[group_rank]).reshape(-1)


def inverse_hessian_factor(hessian: np.ndarray, damping: float) -> np.ndarray:
    """Upper Cholesky factor U of (H + λI)⁻¹ (so H⁻¹ = UᵀU), with λ = damping · mean(diag(H)).

    With J the reversal permutation and J·H·J = C·Cᵀ (lower Cholesky), H = R·Rᵀ for the upper
    triangular R = J·C·J, so U = R⁻¹ = J·C⁻¹·J: one Cholesky and one triangular inverse
    (~K³/3 multiply-adds each), never a general inverse. Columns the calibration never
    activated (diag 0) get a unit diagonal, so they carry no error to others. Returns float32
    [K, K]; raises ValueError if H is not positive definite even after damping.
    """
    cols = hessian.shape[0]
    dtype = np.float64 if cols <= FLOAT64_MAX_COLUMNS else np.float32
    h = np.array(hessian[::-1, ::-1], dtype=dtype)
    diag = np.einsum("ii->i", h)  # a writable view of the diagonal
    diag[diag <= 0] = 1.0
    diag += damping * float(diag.mean())
    try:
        lower = blocked_cholesky(h)
    except np.linalg.LinAlgError:
        raise ValueError("the calibration Hessian is not positive definite even after damping "
                         f"{damping}; use more calibration tokens or more damping") from None
    del h
    return np.ascontiguousarray(lower_triangular_inverse(lower)[::-1, ::-1], np.float32)


def blocked_cholesky(a: np.ndarray, block: int = CHOLESKY_BLOCK) -> np.ndarray:
    """Lower Cholesky factor of the symmetric positive definite `a`, computed in place (a is
    overwritten and returned). Right-looking, by diagonal blocks: numpy's cholesky (LAPACK potrf)
    crashed the process (SIGSEGV) on a float32 18944 x 18944 matrix (7B down_proj) on this box,
    while blocks of 4096 factor fine; the off-diagonal work is matrix products."""
    n = a.shape[0]
    if n <= block:
        return np.linalg.cholesky(a)
    for k0 in range(0, n, block):
        k1 = min(n, k0 + block)
        l11 = np.linalg.cholesky(a[k0:k1, k0:k1])
        a[k0:k1, k0:k1] = l11
        if k1 == n:
            break
        a[k0:k1, k1:] = 0
        l21 = a[k1:, k0:k1] @ lower_triangular_inverse(l11).T  # L21 = A21·L11⁻ᵀ
        a[k1:, k0:k1] = l21
        for j0 in range(k1, n, block):  # A22 -= L21·L21ᵀ, lower block columns only
            j1 = min(n, j0 + block)
            a[j0:, j0:j1] -= l21[j0 - k1:] @ l21[j0 - k1:j1 - k1].T
    return a


def lower_triangular_inverse(lower: np.ndarray, leaf: int = 256) -> np.ndarray:
    """L⁻¹ of a lower triangular matrix by 2 x 2 block recursion (numpy has no trtri):
    inv([[A, 0], [B, D]]) = [[A⁻¹, 0], [−D⁻¹·B·A⁻¹, D⁻¹]]."""
    n = lower.shape[0]
    if n <= leaf:
        return np.tril(np.linalg.inv(lower))
    half = n // 2
    out = np.zeros_like(lower)
    a_inv = lower_triangular_inverse(lower[:half, :half], leaf)
    out[:half, :half] = a_inv
    d_inv = lower_triangular_inverse(lower[half:, half:], leaf)
    out[half:, half:] = d_inv
    out[half:, :half] = -(d_inv @ (lower[half:, :half] @ a_inv))
    return out


def gptq_quantize(w: np.ndarray, hessian: np.ndarray, group_size: int,
                  options: GptqOptions | None = None, name: str = "tensor"
                  ) -> tuple[Int4Weight, QuantStats]:
    """float32 [N, K] and H = XᵀX [K, K] -> int4.rows.v1 arrays chosen by GPTQ.

    The stats are the clipping search's weighted weight error (quantize.py) of the result and of
    round-to-nearest, so they show what GPTQ gives up in weight error to lower output error.
    """
    options = options or GptqOptions()
    w = np.ascontiguousarray(w, np.float32)
    check_quantizable(w, group_size, name)
    rows, cols = w.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"{name}: Hessian {hessian.shape} does not match {cols} input columns")
    order = column_order(np.diag(hessian).astype(np.float64), group_size, options.act_order)
    diag = np.diag(hessian).astype(np.float64)[order]
    damped = diag + options.damping * diag.mean() + 1e-30
    column_weight = {"hessian": damped, "sqrt": np.sqrt(damped),
                     "none": np.ones(cols)}[options.search_weights]
    upper = inverse_hessian_factor(hessian[np.ix_(order, order)], options.damping)
    work = np.ascontiguousarray(w[:, order])
    codes = np.empty((rows, cols), np.uint8)
    groups = cols // group_size
    scales = np.empty((rows, groups), np.float16)
    zeros = np.empty((rows, groups), np.float16)
    block_cols = group_size * max(1, BLOCK_COLUMNS // group_size)  # whole groups
    errors = np.empty((rows, block_cols), np.float32)
    for b0 in range(0, cols, block_cols):
        b1 = min(cols, b0 + block_cols)
        block = np.ascontiguousarray(work[:, b0:b1])
        hinv_block = np.ascontiguousarray(upper[b0:b1, b0:b1])
        block_codes = np.empty((rows, b1 - b0), np.uint8)
        for g0 in range(0, b1 - b0, group_size):
            group = order[b0 + g0] // group_size  # its index in the file
            weights = column_weight[b0 + g0:b0 + g0 + group_size]
            params, _ = quantize_int4(np.ascontiguousarray(block[:, g0:g0 + group_size]),
                                      group_size, options.clip_search, name,
                                      weights / weights.mean(), CALIBRATED_SEARCH_NUMERATORS)
            scales[:, group], zeros[:, group] = params.scales[:, 0], params.zeros[:, 0]
            _quantize_group_with_feedback(block, hinv_block, g0, group_size,
                                          params.scales[:, 0].astype(np.float32),
                                          params.zeros[:, 0].astype(np.float32),
                                          block_codes, errors)
        codes[:, order[b0:b1]] = block_codes
        if b1 < cols:  # the block's errors reach every later column at once (BLAS)
            work[:, b1:] -= errors[:, :b1 - b0] @ upper[b0:b1, b1:]
    weight = Int4Weight(pack_codes(codes), scales, zeros, group_size)
    return weight, weight_error_stats(w, weight)


def pack_codes(codes: np.ndarray) -> np.ndarray:
    """uint8 [N, K] codes 0..15 -> uint32 [N, K/8] words, nibble j of word w holding k = 8w + j."""
    rows, cols = codes.shape
    nibbles = codes.reshape(rows, cols // 8, 8).astype(np.uint32)
    return (nibbles << np.arange(0, 32, 4, dtype=np.uint32)).sum(-1, dtype=np.uint32)


def weight_error_stats(w: np.ndarray, weight: Int4Weight) -> QuantStats:
    """The clipping search's weighted error (rms(group) + |x|) of `weight` and of plain RTN."""
    from zse_runtime.zsefile import dequantize_int4

    g = weight.group_size
    x = w.astype(np.float64).reshape(w.shape[0], -1, g)
    importance = np.sqrt((x * x).mean(-1, keepdims=True)) + np.abs(x)
    d = dequantize_int4(weight).astype(np.float64).reshape(x.shape) - x
    _, rtn = quantize_int4(w, g, clip_search=False)
    return QuantStats(float((importance * d * d).sum()), rtn.rtn_error, w.size)


def output_error(w: np.ndarray, restored: np.ndarray, hessian: np.ndarray) -> float:
    """Σ over calibration rows of ||x·wᵀ − x·ŵᵀ||² = tr(D H Dᵀ) with D = w − ŵ."""
    d = (w.astype(np.float64) - restored.astype(np.float64))
    return float(np.einsum("nk,nk->", d @ hessian.astype(np.float64), d))
