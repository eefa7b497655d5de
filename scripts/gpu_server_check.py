"""`zse-run --device cuda` end to end, run through the device tool: concurrent greedy streams
against solo in-process generation, time to ready, and aggregate decode throughput on a
7B-shaped file. Prints a table last and writes gpu_server_check.json.

    python scripts/gpu_server_check.py --out DIR
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
from benchlib import start_server  # noqa: E402  (shared with bench_coldstart / bench_decode)

ROWS: list[tuple[str, str]] = []


def row(name: str, value: str) -> None:
    ROWS.append((name, value))
    print(f"{name}: {value}", flush=True)


def stream(client, prompt, max_tokens) -> str:
    text = ""
    for chunk in client.completions.create(model="m", prompt=prompt, max_tokens=max_tokens,
                                           temperature=0, stream=True,
                                           extra_body={"ignore_eos": True}):
        text += chunk.choices[0].text
    return text


def concurrency_check(work: Path) -> None:
    import openai

    from tests.checkpoints import make_checkpoint
    from zse_convert.convert import convert
    from zse_runtime.engine import Engine
    from zse_runtime.tokenizer import IncrementalDecoder

    checkpoint = make_checkpoint(work / "qwen2-ckpt", "qwen2", hidden_size=896,
                                 intermediate_size=4864, num_hidden_layers=4,
                                 num_attention_heads=14, num_key_value_heads=2, vocab_size=32000,
                                 max_position_embeddings=4096)
    model = work / "qwen2.zse"
    convert(str(checkpoint), model)
    rng = np.random.default_rng(1)
    jobs = [(rng.integers(0, 300, int(rng.integers(3, 700))).tolist(), int(rng.integers(4, 40)))
            for _ in range(20)]
    engine = Engine.open(model, device="cuda", max_model_len=2048)
    solo = []
    for ids, max_tokens in jobs:
        decoder = IncrementalDecoder(engine.tokenizer)
        tokens = list(engine.generate(ids, max_tokens, ignore_eos=True))
        solo.append("".join(decoder.push(t) for t in tokens) + decoder.flush())
    del engine
    # with --batch-invariant every stream must equal its solo run; by default prompts share
    # prefill chunks and the 16-sequence decode batches multiply on tensor cores (float16
    # activations), which may change a token where two logits nearly tie: counted, not required
    for port, flags in ((8301, ("--batch-invariant",)), (8303, ())):
        process, ready = start_server(model, port, "--max-num-seqs", "16", "--max-model-len",
                                      "2048", *flags)
        label = " ".join(flags) or "default"
        try:
            row(f"synthetic qwen2 ({label}): process start -> /health 200", f"{ready:.2f} s")
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x",
                                   max_retries=0)
            with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
                texts = list(pool.map(lambda job: stream(client, *job), jobs))
            same = sum(a == b for a, b in zip(texts, solo))
            row(f"{len(jobs)} concurrent greedy streams (16 slots, {label}) == solo",
                f"{same}/{len(jobs)}")
        finally:
            process.terminate()
            process.wait(timeout=60)
            row(f"SIGTERM exit status ({label})", str(process.returncode))


def throughput(work: Path) -> None:
    import openai

    from make_synthetic_zse import PRESETS, write_random_zse

    model = work / "q7.zse"
    if not model.exists():
        write_random_zse(model, dict(PRESETS["qwen2.5-7b"]))
    process, ready = start_server(model, 8302, "--max-num-seqs", "32", "--max-model-len", "4096")
    try:
        row("7B: process start -> /health 200 (page cache warm)", f"{ready:.2f} s")
        client = openai.OpenAI(base_url="http://127.0.0.1:8302/v1", api_key="x", max_retries=0)
        started = time.perf_counter()
        first = None
        for chunk in client.completions.create(model="m", prompt="hi", max_tokens=2, stream=True):
            if first is None and chunk.choices[0].text is not None:
                first = time.perf_counter() - started
        row("7B: first streamed token (ready server)", f"{first * 1000:.0f} ms")
        for streams in (1, 4, 16, 32):
            prompts = [list(range(100 + i, 228 + i)) for i in range(streams)]
            started = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(streams) as pool:
                list(pool.map(lambda p: stream(client, p, 128), prompts))
            seconds = time.perf_counter() - started
            row(f"7B: {streams} concurrent streams x 128 tokens", f"{streams * 128 / seconds:.0f} tok/s aggregate")
    finally:
        process.terminate()
        process.wait(timeout=60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--work", type=Path, default=Path("/tmp/zse_gpu_server"))
    parser.add_argument("--only", choices=["concurrency", "throughput"])
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    checks = {"concurrency": concurrency_check, "throughput": throughput}
    for name, check in checks.items():
        if args.only and name != args.only:
            continue
        try:
            check(args.work)
        except Exception:  # noqa: BLE001 - report and go on
            import traceback

            row(f"{check.__name__} FAILED", traceback.format_exc()[-1500:])
    (args.out / "gpu_server_check.json").write_text(json.dumps(dict(ROWS), indent=2))
    print("\n" + "\n".join(f"{k:<52} {v}" for k, v in ROWS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
