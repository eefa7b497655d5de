"""Probe (2026-12-02, nineteenth session): the window before decode steps run ahead. Opens the
7B file with the page cache as it is (run it after dropping the cache for a cold start), reports
how long after the upload the embedding was mapped, then decode tok/s (128 tokens after a
128-token prompt, greedy) with steps launched ahead and with the path taken until the mapping
is done ("before": in the first version of this change eager forwards, 109-117 tok/s; then
graphs reading rows the host gathered, one step at a time). Prints a line per figure and writes
eager_window_LABEL.json under $OUT.
Usage: launch_ahead_eager_window_2026-12-02.py Q7_ZSE LABEL
"""
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.getcwd())
from zse_runtime.engine import Engine  # noqa: E402

started = time.perf_counter()
engine = Engine.open(sys.argv[1], device="cuda", max_model_len=4096, slots=1)
opened = time.perf_counter() - started
engine.wait_for_launches_ahead(120)
result = {"open_s": opened, "mapped_s_after_open": time.perf_counter() - started - opened,
          "embedding_mapping": engine.ops.embedding_mapping,
          "startup": dict(engine.startup.stages)}
prompt = np.random.default_rng(0).integers(0, engine.config.vocab_size, 128).tolist()
list(engine.generate(prompt[:8], 4, ignore_eos=True))
for label in ("ahead", "before", "ahead"):
    if label == "before":
        engine.ops.embedding_mapped.clear()
    tokens = engine.generate(prompt, 129, ignore_eos=True)
    next(tokens)
    t = time.perf_counter()
    count = sum(1 for _ in tokens)
    result.setdefault(label, []).append(count / (time.perf_counter() - t))
    engine.ops.embedding_mapped.set()
out = os.environ.get("OUT", ".")
with open(os.path.join(out, f"eager_window_{sys.argv[2]}.json"), "w") as fh:
    json.dump(result, fh, indent=1, default=str)
print(sys.argv[2], json.dumps(result, default=str))
