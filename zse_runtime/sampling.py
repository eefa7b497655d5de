"""Sampling semantics shared by every backend (this file is the reference).

Stateless and counter-based, so the GPU can sample without a host round trip and a request's
output depends only on (logits, params, seed, step):
  1. temperature == 0: argmax (the lowest index wins ties).
  2. logits / temperature; keep the top_k largest (top_k <= 0 keeps all; ties at the k-th value
     are all kept); softmax over the kept tokens.
  3. top_p < 1: keep tokens whose probability is >= tau, where tau is the largest probability
     such that the kept mass reaches top_p (the sorted-prefix rule, without a sort).
  4. u = uniform(seed, step) in [0, 1); the token is the first index, in vocabulary order, at
     which the running kept mass reaches u * (kept mass).
"""

from __future__ import annotations

import numpy as np

from .protocol import SamplingParams  # the type lives with the other request types

_MASK64 = (1 << 64) - 1


def splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def uniform(seed: int, step: int) -> float:
    """A float in [0, 1) from 24 random bits: exactly representable in float32 on every backend."""
    bits = splitmix64((seed & _MASK64) ^ splitmix64(step & _MASK64))
    return (bits >> 40) / float(1 << 24)


def sample(logits: np.ndarray, params: SamplingParams, step: int) -> int:
    """One token id from float32 logits [vocab] under the rules in the module docstring."""
    logits = np.asarray(logits, dtype=np.float32)
    if params.greedy:
        return int(np.argmax(logits))
    scaled = logits / np.float32(params.temperature)
    keep = np.ones(scaled.shape, bool)
    if 0 < params.top_k < scaled.size:
        kth = np.partition(scaled, scaled.size - params.top_k)[scaled.size - params.top_k]
        keep = scaled >= kth
    probs = np.where(keep, np.exp(scaled - scaled[keep].max()), 0.0).astype(np.float32)
    probs /= probs.sum(dtype=np.float32)
    if params.top_p < 1.0:
        ordered = np.sort(probs[keep])[::-1]
        mass = np.cumsum(ordered, dtype=np.float32)
        tau = ordered[min(int(np.searchsorted(mass, np.float32(params.top_p))), ordered.size - 1)]
        keep &= probs >= tau
        probs = np.where(keep, probs, 0.0).astype(np.float32)
    running = np.cumsum(probs, dtype=np.float32)
    target = np.float32(uniform(params.seed, step)) * running[-1]
    return int(min(np.searchsorted(running, target, side="right"), probs.size - 1))
