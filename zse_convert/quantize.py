"""Group-wise asymmetric INT4 quantization with a calibration-free clipping search.

Each row is split into groups of `group_size` consecutive input-dimension values. A group is
stored as 4-bit codes q in [0, 15] plus an fp16 scale s and fp16 zero z, and reconstructs as
w = (q - z) * s (the formula every kernel uses).

Choosing (s, z): like llama.cpp's `make_qkx2_quants`, we try a grid of inverse scales at and
below 15 / (max - min) (none above: starts that clip the extremes lowered the error described
below but raised the models' perplexity), assign codes for each, and fit (s, m) to those codes by
weighted least squares; the candidate with the smallest weighted squared error wins. Each
element's error is weighted by rms(group) + |x| (llama.cpp's weighting): with plain squared
error the search clipped the few large weights the output depends on most, and SmolLM2's
perplexity got worse than with round-to-nearest although the squared error went down. The final
choice is made between that candidate, plain min/max round-to-nearest, and a symmetric
fallback, *after* rounding s and z to fp16 and re-assigning codes, so the reported error is the
error the kernel will see and the result is never worse than round-to-nearest on any group (in
that weighted error).

Two numba passes with a cheap numpy step between them (fp16 rounding, which numba's CPU target
does not do) keep the hot loops compiled and parallel over rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from zse_runtime.zsefile import INT4_GROUP_SIZES, Int4Weight

LEVELS = 15  # largest 4-bit code
FP16_MAX = float(np.finfo(np.float16).max)
# Inverse-scale numerators tried by the search, over the group range: above LEVELS would clip
# the group's extremes, below leaves headroom; each start's codes are then refit by least squares.
# Starts in [14, 15] only: on both real-model fixtures the clipping starts of the earlier grid
# ([14, 17], 13 steps) lowered the weighted error but raised perplexity and KL; without them the
# g128 perplexity increase went 0.647 -> 0.593 (Qwen2.5-Coder-0.5B) and 6.55 -> 5.44 (SmolLM2)
# (docs/quality.md, "The search without clipping starts").
SEARCH_NUMERATORS = np.linspace(LEVELS - 1.0, LEVELS, 5).astype(np.float32)
# The earlier grid, clipping starts included, for GPTQ (gptq.py): there the error is weighted by
# the calibration inputs' energy, and without the clipping starts SmolLM2's --gptq lost more
# (CI's 600 tokens: perplexity increase 0.575 -> 0.654, KL 0.078 -> 0.098).
CALIBRATED_SEARCH_NUMERATORS = np.linspace(LEVELS - 1.0, LEVELS + 2.0, 13).astype(np.float32)

_CANDIDATE_SEARCH, _CANDIDATE_RTN, _CANDIDATE_SYMMETRIC = range(3)


@dataclass
class QuantStats:
    """Weighted squared reconstruction error (v_i = rms + |x_i|) of the chosen parameters, and of
    round-to-nearest on the same groups."""

    error: float
    rtn_error: float
    numel: int


@numba.njit(inline="always")
def _importance_scale(w, r, start, group_size):
    """sqrt(mean(x^2)) of a group: the floor of every element's error weight."""
    total = 0.0
    for i in range(group_size):
        x = np.float64(w[r, start + i])
        total += x * x
    return np.sqrt(total / group_size)


@numba.njit(parallel=True, cache=True, nogil=True)
def _search_groups(w, group_size, numerators, column_weight):
    """Per group: weighted least-squares (scale, min) of the best searched assignment.

    Errors are weighted by v_i = rms(group) + |x_i| (llama.cpp's make_qkx2_quants weighting):
    plain squared error lets the search clip the few large weights that matter most to the
    output. Sums are float64, in element order. Returns float32 arrays [rows, groups, 3] of
    scales and mins for the candidates (search, min/max round-to-nearest, symmetric) before fp16
    rounding.
    """
    rows, cols = w.shape
    groups = cols // group_size
    scales = np.empty((rows, groups, 3), np.float32)
    mins = np.empty((rows, groups, 3), np.float32)
    for r in numba.prange(rows):
        for g in range(groups):
            start = g * group_size
            floor = _importance_scale(w, r, start, group_size)
            xmin = np.float64(w[r, start])
            xmax = xmin
            sum_v = 0.0
            sum_vx = 0.0
            sum_vxx = 0.0
            for i in range(group_size):
                x = np.float64(w[r, start + i])
                v = (floor + abs(x)) * column_weight[start + i]
                xmin = min(xmin, x)
                xmax = max(xmax, x)
                sum_v += v
                sum_vx += v * x
                sum_vxx += v * x * x
            span = xmax - xmin
            rtn_scale = span / LEVELS if span > 0.0 else 1.0
            best_scale, best_min = rtn_scale, xmin
            best_err = np.inf
            if span > 0.0:
                for c in range(numerators.shape[0]):
                    inv_scale = numerators[c] / span
                    sum_vl = 0.0
                    sum_vll = 0.0
                    sum_vxl = 0.0
                    for i in range(group_size):
                        x = np.float64(w[r, start + i])
                        v = (floor + abs(x)) * column_weight[start + i]
                        level = np.floor((x - xmin) * inv_scale + 0.5)
                        level = min(max(level, 0.0), np.float64(LEVELS))
                        sum_vl += v * level
                        sum_vll += v * level * level
                        sum_vxl += v * x * level
                    det = sum_v * sum_vll - sum_vl * sum_vl
                    if det <= 0.0:
                        continue
                    scale = (sum_v * sum_vxl - sum_vl * sum_vx) / det
                    if scale <= 0.0:
                        continue
                    shift = (sum_vll * sum_vx - sum_vl * sum_vxl) / det
                    # sum(v * (scale * l + shift - x)^2), expanded so one pass over x suffices.
                    err = (scale * scale * sum_vll + sum_v * shift * shift + sum_vxx
                           + 2.0 * scale * shift * sum_vl - 2.0 * scale * sum_vxl
                           - 2.0 * shift * sum_vx)
                    if err < best_err:
                        best_err, best_scale, best_min = err, scale, shift
            amax = max(abs(xmin), abs(xmax))
            scales[r, g, 0] = best_scale
            mins[r, g, 0] = best_min
            scales[r, g, 1] = rtn_scale
            mins[r, g, 1] = xmin
            scales[r, g, 2] = amax / (LEVELS / 2.0) if amax > 0.0 else 1.0
            mins[r, g, 2] = -amax
    return scales, mins


@numba.njit(parallel=True, cache=True, nogil=True)
def _choose_and_pack(w, group_size, scales, zeros, column_weight):
    """Assign codes for each fp16-rounded candidate, keep the one with the least weighted error,
    pack nibbles.

    scales, zeros: float32 [rows, groups, candidates] holding exactly fp16-representable values;
    a non-finite or non-positive scale marks an unusable candidate.
    Returns (qweight uint32 [rows, cols / 8], choice int8 [rows, groups],
    weighted error float64 [rows, groups, candidates]).
    """
    rows, cols = w.shape
    groups = cols // group_size
    candidates = scales.shape[2]
    qweight = np.zeros((rows, cols // 8), np.uint32)
    choice = np.empty((rows, groups), np.int8)
    errors = np.full((rows, groups, candidates), np.inf)
    for r in numba.prange(rows):
        for g in range(groups):
            start = g * group_size
            floor = _importance_scale(w, r, start, group_size)
            best = -1
            for c in range(candidates):
                scale = scales[r, g, c]
                zero = zeros[r, g, c]
                if not (np.isfinite(scale) and np.isfinite(zero) and scale > 0.0):
                    continue
                err = 0.0
                for i in range(group_size):
                    x = w[r, start + i]
                    q = min(max(np.floor(x / scale + zero + np.float32(0.5)), np.float32(0.0)),
                            np.float32(LEVELS))
                    d = np.float64((q - zero) * scale - x)
                    err += (floor + abs(np.float64(x))) * column_weight[start + i] * d * d
                errors[r, g, c] = err
                if best < 0 or err < errors[r, g, best]:
                    best = c
            choice[r, g] = best
            scale = scales[r, g, best]
            zero = zeros[r, g, best]
            for i in range(group_size):
                k = start + i
                q = min(max(np.floor(w[r, k] / scale + zero + np.float32(0.5)), np.float32(0.0)),
                        np.float32(LEVELS))
                qweight[r, k >> 3] |= np.uint32(q) << np.uint32(4 * (k & 7))
    return qweight, choice, errors


def fp16_candidates(scales: np.ndarray, mins: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scale, min) in float32 -> (scale, zero) rounded to fp16, returned as float32.

    zero = -min / scale is taken from the *rounded* scale so that (q - zero) * scale hits min.
    Overflowing values become inf and are rejected by the chooser.
    """
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        scale16 = scales.astype(np.float16)
        zero16 = (-mins / scale16.astype(np.float32)).astype(np.float16)
    return scale16.astype(np.float32), zero16.astype(np.float32)


def check_quantizable(w: np.ndarray, group_size: int, name: str = "tensor") -> None:
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"group size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    if w.ndim != 2 or w.dtype != np.float32:
        raise ValueError(f"{name}: expected a 2-D float32 matrix, got {w.dtype} {w.shape}")
    if w.shape[1] % group_size:
        raise ValueError(f"{name}: {w.shape[1]} input columns are not a multiple of group size "
                         f"{group_size}")
    amax = max(float(w.max()), -float(w.min())) if w.size else 0.0  # NaN propagates
    if not np.isfinite(amax):
        raise ValueError(f"{name}: contains NaN or infinite values")
    if amax > FP16_MAX / 2:
        raise ValueError(f"{name}: |w| reaches {amax:.3g}, beyond what fp16 scales can represent")


def quantize_int4(w: np.ndarray, group_size: int, clip_search: bool = True,
                  name: str = "tensor", column_weight: np.ndarray | None = None,
                  numerators: np.ndarray = SEARCH_NUMERATORS) -> tuple[Int4Weight, QuantStats]:
    """float32 [rows, cols] -> int4.rows.v1 arrays (qweight, fp16 scales, fp16 zeros).

    column_weight: float64 [cols] multiplying every error weight of that input column (GPTQ
    passes its calibration inputs' mean square there); None means ones, bit for bit the
    calibration-free search. numerators: the search's starts (SEARCH_NUMERATORS, or GPTQ's
    CALIBRATED_SEARCH_NUMERATORS).
    """
    w = np.ascontiguousarray(w)
    check_quantizable(w, group_size, name)
    if column_weight is None:
        column_weight = np.ones(w.shape[1])
    column_weight = np.ascontiguousarray(column_weight, np.float64)
    if column_weight.shape != (w.shape[1],) or not (column_weight > 0).all():
        raise ValueError(f"{name}: column weights must be {w.shape[1]} positive values")
    numerators = numerators if clip_search else numerators[:0]
    scales, mins = _search_groups(w, group_size, numerators, column_weight)
    scales16, zeros16 = fp16_candidates(scales, mins)
    if not clip_search:  # the round-to-nearest ablation: symmetric only where RTN overflows fp16
        scales16[..., _CANDIDATE_SEARCH] = np.inf
        rtn_usable = np.isfinite(scales16[..., _CANDIDATE_RTN]) & np.isfinite(zeros16[..., _CANDIDATE_RTN])
        scales16[..., _CANDIDATE_SYMMETRIC][rtn_usable] = np.inf
    qweight, choice, errors = _choose_and_pack(w, group_size, scales16, zeros16, column_weight)
    picked = np.take_along_axis(np.stack([scales16, zeros16]), choice[None, ..., None].astype(np.intp),
                                axis=3)[..., 0]
    stats = QuantStats(
        error=float(np.take_along_axis(errors, choice[..., None].astype(np.intp), axis=2).sum()),
        rtn_error=float(np.where(np.isfinite(errors[..., _CANDIDATE_RTN]),
                                    errors[..., _CANDIDATE_RTN],
                                    errors[..., _CANDIDATE_SYMMETRIC]).sum()),
        numel=w.size,
    )
    weight = Int4Weight(qweight, picked[0].astype(np.float16), picked[1].astype(np.float16),
                        group_size)
    return weight, stats
