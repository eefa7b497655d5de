"""SmolLM2's weights sit on a 4-bit grid (its GGUF source is Q4_1: blocks of 32 with their own
min and step). Does down_proj's column weighting still help once that grid is gone? Write a copy
of the fixture whose projection weights get uniform noise of +-step/2 per block of 32 (step =
(max - min) / 15 of the block, as Q4_1 stored it), so they are spread like continuous weights,
then score it with scripts/eval_quality.py against its own float model.

    python docs/results/quality_degridded_smollm2_2026-12-01.py FOLDER OUT_FOLDER
"""
import shutil, sys
from pathlib import Path
import numpy as np
from safetensors.numpy import load_file, save_file

source, out = Path(sys.argv[1]), Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
for path in source.iterdir():
    if path.suffix != ".safetensors" and path.is_file():
        shutil.copy(path, out / path.name)
rng = np.random.default_rng(0)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
for path in source.glob("*.safetensors"):
    tensors = load_file(path)
    for name, w in tensors.items():
        if name.endswith(".weight") and name.split(".")[-2] in PROJECTIONS:
            blocks = w.astype(np.float32).reshape(w.shape[0], -1, 32)
            step = (blocks.max(-1, keepdims=True) - blocks.min(-1, keepdims=True)) / 15
            noisy = blocks + rng.uniform(-0.5, 0.5, blocks.shape).astype(np.float32) * step
            tensors[name] = noisy.reshape(w.shape).astype(w.dtype)
    save_file(tensors, out / path.name, metadata={"format": "pt"})
print(out)
