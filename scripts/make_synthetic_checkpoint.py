"""Write a random Hugging Face checkpoint with a real model's shapes, for converter benchmarks.

    python scripts/make_synthetic_checkpoint.py OUT_DIR --preset qwen2.5-7b
    python scripts/make_synthetic_checkpoint.py OUT_DIR --preset qwen2.5-7b --layers 1
    python scripts/make_synthetic_checkpoint.py OUT_DIR --preset llama-tiny --dtype bfloat16

OUT_DIR receives what `save_pretrained` would write: config.json, generation_config.json,
safetensors weights (`model.safetensors`, or `model-0000i-of-0000n.safetensors` shards of at most
--shard-gb plus `model.safetensors.index.json`, split the way huggingface_hub splits them), and a
small real byte-level BPE tokenizer (tokenizer.json, tokenizer_config.json) from
`tests.checkpoints.build_tokenizer`. The model vocabulary is larger than the tokenizer's, which
is legal. `zse_synthetic.json` records how the folder was made, so benchmarks can reuse it.

Memory stays flat whatever the model size: each shard's safetensors header is written by hand
from the planned shapes, then every tensor is generated and written one chunk at a time.

Values are i.i.d. draws from a table of 65,536 normal quantiles, held as float16 / bfloat16 bit
patterns and indexed by raw PCG64 output. That is ~8x faster than `standard_normal` followed by a
cast, and the converter sees the same distribution: matrices N(0, 0.02) (never zero), norms
1 + N(0, 0.1), biases N(0, 0.02). Tails stop at 4.3 sigma; real checkpoints have outliers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any, Callable

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent

TRANSFORMERS_VERSION = "4.43.1"  # what the presets' real config.json files were saved with
SAFETENSORS_DTYPES = {"float16": "F16", "bfloat16": "BF16"}
ITEMSIZE = 2  # both supported dtypes
TABLE_SIZE = 1 << 16  # one uint16 index per value
CHUNK_VALUES = 1 << 22  # values generated per step: 8 MiB written, ~50 MiB of temporaries
TOKENIZER_VOCAB = 512  # trained tokenizer size; the model vocabulary is larger
MARKER = "zse_synthetic.json"

# value kind -> (mean, std) of the normal it is drawn from
DISTRIBUTIONS = {"matrix": (0.0, 0.02), "norm": (1.0, 0.1), "bias": (0.0, 0.02)}

_QWEN2_COMMON = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_act": "silu",
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "sliding_window": 131072,
    "use_sliding_window": False,
    "use_cache": True,
}

# Real config.json fields (minus token ids and dtype, which come from the tokenizer and --dtype).
PRESETS: dict[str, dict[str, Any]] = {
    "qwen2.5-7b": {**_QWEN2_COMMON, "hidden_size": 3584, "intermediate_size": 18944,
                   "num_hidden_layers": 28, "max_window_layers": 28, "num_attention_heads": 28,
                   "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False},
    "qwen2.5-0.5b": {**_QWEN2_COMMON, "hidden_size": 896, "intermediate_size": 4864,
                     "num_hidden_layers": 24, "max_window_layers": 21, "num_attention_heads": 14,
                     "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True},
    # Small enough to generate and convert in about a second.
    "llama-tiny": {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                   "hidden_act": "silu", "hidden_size": 256, "intermediate_size": 768,
                   "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4,
                   "head_dim": 32, "vocab_size": 4096, "tie_word_embeddings": False,
                   "attention_bias": False, "mlp_bias": False, "max_position_embeddings": 4096,
                   "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "rope_scaling": None,
                   "initializer_range": 0.02, "use_cache": True},
}


class CheckpointError(Exception):
    """The folder cannot be written; the message says why and what to do."""


@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    kind: str  # key of DISTRIBUTIONS

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE


@dataclass
class WriteReport:
    folder: Path
    files: dict[str, int] = field(default_factory=dict)  # file name -> bytes
    parameters: int = 0
    generate_seconds: float = 0.0
    write_seconds: float = 0.0
    seconds: float = 0.0

    @property
    def weight_bytes(self) -> int:
        return sum(size for name, size in self.files.items() if name.endswith(".safetensors"))

    def as_dict(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "files": self.files, "parameters": self.parameters,
                "weight_bytes": self.weight_bytes, "seconds": round(self.seconds, 2),
                "generate_seconds": round(self.generate_seconds, 2),
                "write_seconds": round(self.write_seconds, 2),
                "values_per_second": round(self.parameters / max(self.generate_seconds, 1e-9))}


# ---------------------------------------------------------------------------------------------
# What to write
# ---------------------------------------------------------------------------------------------

def preset_config(preset: str, layers: int | None = None) -> dict[str, Any]:
    """The preset's HF config fields, with num_hidden_layers overridden when `layers` is given."""
    if preset not in PRESETS:
        raise CheckpointError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    config = dict(PRESETS[preset])
    if layers is not None:
        if layers < 1:
            raise CheckpointError(f"--layers must be at least 1, got {layers}")
        config["num_hidden_layers"] = layers
        if "max_window_layers" in config:
            config["max_window_layers"] = min(config["max_window_layers"], layers)
    return config


def plan_tensors(config: dict[str, Any]) -> list[TensorPlan]:
    """Every tensor of the checkpoint, in transformers' `named_parameters()` order."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    q_rows, kv_rows = heads * head_dim, kv_heads * head_dim
    attention_bias = config["model_type"] == "qwen2" or config.get("attention_bias", False)

    tensors = [TensorPlan("model.embed_tokens.weight", (config["vocab_size"], hidden), "matrix")]
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}"
        for proj, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            tensors.append(TensorPlan(f"{prefix}.self_attn.{proj}.weight", (rows, hidden),
                                      "matrix"))
            if attention_bias:
                tensors.append(TensorPlan(f"{prefix}.self_attn.{proj}.bias", (rows,), "bias"))
        tensors.append(TensorPlan(f"{prefix}.self_attn.o_proj.weight", (hidden, q_rows), "matrix"))
        if attention_bias and config["model_type"] != "qwen2":
            tensors.append(TensorPlan(f"{prefix}.self_attn.o_proj.bias", (hidden,), "bias"))
        tensors += [TensorPlan(f"{prefix}.mlp.gate_proj.weight", (inter, hidden), "matrix"),
                    TensorPlan(f"{prefix}.mlp.up_proj.weight", (inter, hidden), "matrix"),
                    TensorPlan(f"{prefix}.mlp.down_proj.weight", (hidden, inter), "matrix"),
                    TensorPlan(f"{prefix}.input_layernorm.weight", (hidden,), "norm"),
                    TensorPlan(f"{prefix}.post_attention_layernorm.weight", (hidden,), "norm")]
    tensors.append(TensorPlan("model.norm.weight", (hidden,), "norm"))
    if not config["tie_word_embeddings"]:
        tensors.append(TensorPlan("lm_head.weight", (config["vocab_size"], hidden), "matrix"))
    return tensors


def plan_shards(tensors: list[TensorPlan], max_shard_bytes: int) -> dict[str, list[TensorPlan]]:
    """File name -> tensors, filled greedily in model order as huggingface_hub does.

    One shard is named `model.safetensors` (and gets no index), as `save_pretrained` does.
    """
    shards: list[list[TensorPlan]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    if len(shards) == 1:
        return {"model.safetensors": shards[0]}
    count = len(shards)
    return {f"model-{i + 1:05d}-of-{count:05d}.safetensors": shard
            for i, shard in enumerate(shards)}


def safetensors_header(tensors: list[TensorPlan], dtype: str) -> bytes:
    """u64 length + JSON header, padded with spaces to 8 bytes; data in name order, as safetensors
    itself lays a single-dtype file out."""
    entries: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for tensor in sorted(tensors, key=lambda t: t.name):
        entries[tensor.name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(tensor.shape),
                                "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


# ---------------------------------------------------------------------------------------------
# Random values
# ---------------------------------------------------------------------------------------------

def to_bits(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values -> little-endian uint16 bits of float16 or bfloat16 (round half to even)."""
    if dtype == "float16":
        return values.astype("<f2").view("<u2")
    bits = values.astype(np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")


def value_tables(dtype: str) -> dict[str, np.ndarray]:
    """Per value kind, TABLE_SIZE equally likely values: the normal's quantiles at (i + 0.5) / N."""
    unit = NormalDist()
    quantiles = np.array([unit.inv_cdf((i + 0.5) / TABLE_SIZE) for i in range(TABLE_SIZE)],
                         np.float32)
    return {kind: to_bits(mean + std * quantiles, dtype)
            for kind, (mean, std) in DISTRIBUTIONS.items()}


def random_bits(rng: np.random.Generator, table: np.ndarray, count: int) -> np.ndarray:
    """`count` i.i.d. draws from `table`: four uint16 indices per raw 64-bit PCG64 output."""
    indices = rng.bit_generator.random_raw(-(-count // 4)).view("<u2")[:count]
    return table[indices]


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

def write_shard(path: Path, tensors: list[TensorPlan], dtype: str, rng: np.random.Generator,
                tables: dict[str, np.ndarray], report: WriteReport) -> None:
    """Header, then each tensor chunk by chunk, into a temp file renamed when complete."""
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as fh:
        fh.write(safetensors_header(tensors, dtype))
        for tensor in sorted(tensors, key=lambda t: t.name):
            for start in range(0, tensor.numel, CHUNK_VALUES):
                count = min(CHUNK_VALUES, tensor.numel - start)
                t0 = time.perf_counter()
                chunk = random_bits(rng, tables[tensor.kind], count)
                t1 = time.perf_counter()
                fh.write(chunk)
                report.generate_seconds += t1 - t0
                report.write_seconds += time.perf_counter() - t1
    os.replace(partial, path)
    report.files[path.name] = path.stat().st_size
    report.parameters += sum(t.numel for t in tensors)


def write_index(folder: Path, shards: dict[str, list[TensorPlan]]) -> None:
    weight_map = {t.name: file for file, tensors in shards.items() for t in tensors}
    total = sum(t.nbytes for tensors in shards.values() for t in tensors)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_tokenizer(folder: Path) -> dict[str, int]:
    """tokenizer.json + tokenizer_config.json; returns the special token ids."""
    sys.path.insert(0, str(REPO_ROOT))
    from tests.checkpoints import CHAT_TEMPLATE, build_tokenizer

    tokenizer = build_tokenizer(TOKENIZER_VOCAB)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "add_bos_token": False, "chat_template": CHAT_TEMPLATE, "model_max_length": 32768,
        "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2) + "\n")
    return {"bos_token_id": tokenizer.token_to_id("<|endoftext|>"),
            "eos_token_id": tokenizer.token_to_id("<|im_end|>"),
            "pad_token_id": tokenizer.token_to_id("<|endoftext|>")}


def write_configs(folder: Path, config: dict[str, Any], dtype: str, ids: dict[str, int]) -> None:
    full = {**config, "bos_token_id": ids["bos_token_id"], "eos_token_id": ids["eos_token_id"],
            "torch_dtype": dtype, "transformers_version": TRANSFORMERS_VERSION}
    (folder / "config.json").write_text(json.dumps(dict(sorted(full.items())), indent=2) + "\n")
    generation = {**ids, "do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20,
                  "repetition_penalty": 1.05, "transformers_version": TRANSFORMERS_VERSION}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def prepare_folder(folder: Path, needed_bytes: int, force: bool) -> None:
    """Create `folder`, refuse to clobber a checkpoint without `force`, check free space first."""
    folder.mkdir(parents=True, exist_ok=True)
    existing = sorted(p.name for p in folder.iterdir()
                      if p.name == "config.json" or ".safetensors" in p.name)
    if existing and not force:
        raise CheckpointError(f"{folder} already holds a checkpoint ({', '.join(existing[:4])}); "
                              "pass --force to replace it")
    for name in existing:
        if ".safetensors" in name:  # stale shards of another shard count would confuse readers
            (folder / name).unlink()
    free = shutil.disk_usage(folder).free
    if free < needed_bytes + (256 << 20):
        raise CheckpointError(f"{folder}: {needed_bytes / 1e9:.2f} GB of weights need writing but "
                              f"only {free / 1e9:.2f} GB are free")


def write_checkpoint(folder: Path, preset: str, layers: int | None = None,
                     dtype: str = "float16", shard_gb: float = 4.0, seed: int = 0,
                     force: bool = False, log: Callable[[str], None] = print) -> WriteReport:
    """Write the whole checkpoint folder; returns what was written and how long it took."""
    if dtype not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"--dtype must be one of {sorted(SAFETENSORS_DTYPES)}, got {dtype!r}")
    if shard_gb <= 0:
        raise CheckpointError(f"--shard-gb must be positive, got {shard_gb}")
    started = time.perf_counter()
    config = preset_config(preset, layers)
    tensors = plan_tensors(config)
    shards = plan_shards(tensors, int(shard_gb * 1e9))  # huggingface_hub's "4GB" is 4e9 bytes
    prepare_folder(folder, sum(t.nbytes for t in tensors), force)

    report = WriteReport(folder)
    rng = np.random.default_rng(seed)
    tables = value_tables(dtype)
    for name, shard_tensors in shards.items():
        before = report.generate_seconds + report.write_seconds
        write_shard(folder / name, shard_tensors, dtype, rng, tables, report)
        took = report.generate_seconds + report.write_seconds - before
        log(f"  {name}: {len(shard_tensors)} tensors, {report.files[name] / 1e9:.2f} GB "
            f"in {took:.1f} s")
    if len(shards) > 1:
        write_index(folder, shards)
    write_configs(folder, config, dtype, write_tokenizer(folder))
    report.seconds = time.perf_counter() - started
    marker = {"generator": "scripts/make_synthetic_checkpoint.py", "preset": preset,
              "layers": config["num_hidden_layers"], "dtype": dtype, "shard_gb": shard_gb,
              "seed": seed, **report.as_dict()}
    (folder / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    for name in ("config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "model.safetensors.index.json", MARKER):
        if (folder / name).exists():
            report.files[name] = (folder / name).stat().st_size
    return report


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker of a complete synthetic checkpoint (every weight file present at its recorded
    size), or None."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    for name, size in marker.get("files", {}).items():
        path = folder / name
        if name.endswith(".safetensors") and (not path.exists() or path.stat().st_size != size):
            return None
    return marker


def describe(report: WriteReport) -> str:
    gb = report.weight_bytes / 1e9
    return (f"wrote {report.folder}: {report.parameters / 1e9:.3f} B parameters, {gb:.2f} GB in "
            f"{len([f for f in report.files if f.endswith('.safetensors')])} safetensors file(s), "
            f"{report.seconds:.1f} s total\n"
            f"  random values: {report.parameters / max(report.generate_seconds, 1e-9) / 1e6:,.0f} "
            f"M/s ({report.generate_seconds:.1f} s); writes: "
            f"{gb / max(report.write_seconds, 1e-9):.2f} GB/s ({report.write_seconds:.1f} s, to "
            "the page cache: the kernel flushes later)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder to write the checkpoint into")
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--layers", type=int, help="override num_hidden_layers (shrinks the model)")
    parser.add_argument("--dtype", default="float16", choices=sorted(SAFETENSORS_DTYPES))
    parser.add_argument("--shard-gb", type=float, default=4.0,
                        help="maximum shard size in GB (1e9 bytes), as max_shard_size='4GB'")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="replace a checkpoint already in OUT")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = write_checkpoint(args.out, args.preset, args.layers, args.dtype, args.shard_gb,
                                  args.seed, args.force)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(describe(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
