"""Pins SmolLM2's measured quality so a quantizer or runtime regression fails CI."""

from __future__ import annotations

import sys

import pytest

from tests.conftest import REPO
from tests.gguf_fixtures import smollm2_folder

sys.path.insert(0, str(REPO / "scripts"))
from eval_quality import default_text, evaluate, text_windows  # noqa: E402

pytestmark = pytest.mark.slow

# Measured 2026-11-29 with `scripts/eval_quality.py` on the first 600 tokens of the default text
# (CPython's LICENSE), windows of 300, fp16 lm_head: fp16 perplexity 9.605, ZSE g128 11.779.
MEASURED_PERPLEXITY_INCREASE = 2.174
# The same windows, `zse-convert --gptq` (default calibration text and options), measured
# 2026-11-30 on the 2-core box: perplexity 10.4075 (KL 0.0966 against fp16, 0.279 for ZSE g128).
MEASURED_GPTQ_PERPLEXITY_INCREASE = 0.8024


def test_smollm2_perplexity_increase_is_pinned():
    folder = smollm2_folder()
    windows = text_windows(folder, default_text(), 600, 300)
    results = evaluate(folder, windows, ["zse-g128", "rtn-g128"], log=lambda line: None)
    increase = results["zse-g128"]["perplexity"] - results["fp16"]["perplexity"]
    assert increase == pytest.approx(MEASURED_PERPLEXITY_INCREASE, rel=0.05)
    # the clipping search beats plain round-to-nearest on this model
    assert results["zse-g128"]["perplexity"] < results["rtn-g128"]["perplexity"]
    assert results["zse-g128"]["kl_mean"] < results["rtn-g128"]["kl_mean"]


def test_smollm2_gptq_perplexity_increase_is_pinned():
    """`--gptq` (calibrated error feedback, docs/quality.md): its SmolLM2 quality is pinned
    like the default's, and it stays well below the default's loss. ~80 s on 2 cores."""
    folder = smollm2_folder()
    windows = text_windows(folder, default_text(), 600, 300)
    results = evaluate(folder, windows, ["gptq-g128"], log=lambda line: None)
    increase = results["gptq-g128"]["perplexity"] - results["fp16"]["perplexity"]
    assert increase == pytest.approx(MEASURED_GPTQ_PERPLEXITY_INCREASE, rel=0.05)
    assert increase < MEASURED_PERPLEXITY_INCREASE / 2
