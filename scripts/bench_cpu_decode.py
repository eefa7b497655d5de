"""CPU backend speed on one `.zse`: start-up, prefill and batch-1 decode tokens/s.

    python scripts/bench_cpu_decode.py MODEL.zse [--tokens 64] [--prompt-tokens 512] [--json-out F]

Defaults to the SmolLM2 fixture (built and converted on first use) when no file is given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zse_runtime.engine import Engine  # noqa: E402
from zse_runtime.sampling import SamplingParams  # noqa: E402


def default_model() -> Path:
    from tests.gguf_fixtures import smollm2_folder
    from zse_convert.convert import convert

    out = smollm2_folder().parent / "smollm2.zse"
    if not out.exists():
        convert(str(smollm2_folder()), out)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", type=Path)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--json-out", type=Path, default=Path("bench_cpu_decode.json"))
    args = parser.parse_args()
    model = args.model or default_model()
    started = time.perf_counter()
    engine = Engine.open(model, device="cpu", max_model_len=2048)
    open_s = time.perf_counter() - started
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, min(engine.config.vocab_size, 30000), args.prompt_tokens).tolist()
    rows = {"open (s)": round(open_s, 2)}
    started = time.perf_counter()
    list(engine.generate(prompt, 1, ignore_eos=True))
    rows["prefill (tok/s)"] = round(len(prompt) / (time.perf_counter() - started), 1)
    for label, params in (("greedy", SamplingParams()),
                          ("sampled t=0.7 top_p=0.9", SamplingParams(0.7, top_p=0.9, seed=1))):
        generator = engine.generate("The capital of France is", args.tokens, params,
                                    ignore_eos=True)
        next(generator)  # the prompt's prefill and first token are not decode
        started = time.perf_counter()
        count = sum(1 for _ in generator)
        rows[f"decode {label} (tok/s)"] = round(count / (time.perf_counter() - started), 1)
    result = {"model": str(model), "cpus": os.cpu_count(), "startup": engine.startup.stages,
              **rows}
    args.json_out.write_text(json.dumps(result, indent=2))
    print(f"{model} on {os.cpu_count()} CPUs")
    for key, value in rows.items():
        print(f"  {key:<32} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
