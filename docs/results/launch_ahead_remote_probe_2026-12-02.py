"""Probe (2026-12-02, nineteenth session): steps launched ahead after a remote start. Builds a
synthetic Qwen2.5-0.5B-shaped .zse, serves it from bench_remote_start's ranged HTTP server on
loopback, opens it on the GPU from the http:// URL (the streamed path, whose embedding is a
page-aligned copy in host memory) and from the local file, waits for the embedding mapping and
decodes 32 greedy tokens launched ahead, and 32 one step at a time. Prints the four token lists'
agreement and how each table was mapped; writes remote_probe.json under $OUT."""
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.join(os.getcwd(), "scripts"))
from bench_remote_start import RangeServer  # noqa: E402
from make_synthetic_zse import PRESETS, write_random_zse  # noqa: E402

from zse_runtime.engine import Engine  # noqa: E402

work = Path(tempfile.mkdtemp())
model = write_random_zse(work / "q05.zse", dict(PRESETS["qwen2.5-0.5b"]))
server = RangeServer(Path(model))
result = {}
try:
    for label, location in (("http", server.url), ("local", str(model))):
        engine = Engine.open(location, device="cuda", max_model_len=1024)
        mapped = engine.wait_for_launches_ahead(60)
        ahead = list(engine.generate(list(range(1, 17)), 32, ignore_eos=True))
        saved = Engine.launches_ahead
        Engine.launches_ahead = property(lambda self: False)
        try:
            one_by_one = list(engine.generate(list(range(1, 17)), 32, ignore_eos=True))
        finally:
            Engine.launches_ahead = saved
        result[label] = {"mapped": mapped, "embedding_mapping": engine.ops.embedding_mapping,
                         "aligned": engine.ops.embedding_bytes.ctypes.data % 4096 == 0,
                         "ahead": ahead, "one_by_one": one_by_one}
        del engine
finally:
    server.stop()
tokens = [result[k][m] for k in result for m in ("ahead", "one_by_one")]
result["all_equal"] = all(t == tokens[0] for t in tokens)
json.dump(result, open(os.path.join(os.environ.get("OUT", "."), "remote_probe.json"), "w"),
          indent=1, default=str)
for label in ("http", "local"):
    r = result[label]
    print(label, r["mapped"], r["embedding_mapping"], "page-aligned", r["aligned"], r["ahead"][:6])
print("all four token lists equal:", result["all_equal"])
