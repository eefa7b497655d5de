"""Plot perplexity increase against bits per weight from eval_quality.py JSON files.

    python scripts/plot_quality.py docs/results/eval_quality_smollm2.json \
        docs/results/eval_quality_qwen2.5_coder.json --out docs/quality.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {"zse": ("o", "tab:blue"), "plain": ("o", "tab:cyan"), "rtn": ("s", "tab:gray"),
         "gptq": ("D", "tab:green"), "awq": ("v", "tab:purple"), "awq+gptq": ("P", "tab:olive"),
         "gguf": ("^", "tab:red")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("reports", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, default=Path("quality.png"))
    args = parser.parse_args()
    figure, axes = plt.subplots(1, len(args.reports), figsize=(5.5 * len(args.reports), 4.2),
                                squeeze=False)
    for axis, path in zip(axes[0], args.reports):
        report = json.loads(path.read_text())
        base = report["results"]["fp16"]["perplexity"]
        for name, result in report["results"].items():
            if name == "fp16":
                continue
            marker, color = STYLE[name.split("-")[0]]
            increase = result["perplexity"] - base
            axis.scatter(result["bits_per_weight"], increase, marker=marker, color=color, s=50)
            axis.annotate(name, (result["bits_per_weight"], increase), textcoords="offset points",
                          xytext=(5, 4), fontsize=8)
        axis.set_title(f"{report['model']} ({report['tokens']} tokens, lm_head {report['lm_head']})",
                       fontsize=9)
        axis.set_xlabel("bits per weight (quantized tensors)")
        axis.set_ylabel(f"perplexity increase over fp16 ({base:.2f})")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
