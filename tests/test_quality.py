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


def test_smollm2_perplexity_increase_is_pinned():
    folder = smollm2_folder()
    windows = text_windows(folder, default_text(), 600, 300)
    results = evaluate(folder, windows, ["zse-g128", "rtn-g128"], log=lambda line: None)
    increase = results["zse-g128"]["perplexity"] - results["fp16"]["perplexity"]
    assert increase == pytest.approx(MEASURED_PERPLEXITY_INCREASE, rel=0.05)
    # the clipping search beats plain round-to-nearest on this model
    assert results["zse-g128"]["perplexity"] < results["rtn-g128"]["perplexity"]
    assert results["zse-g128"]["kl_mean"] < results["rtn-g128"]["kl_mean"]
