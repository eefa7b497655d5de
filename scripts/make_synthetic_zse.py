"""Write a `.zse` of a real model's shape with random weights, directly (no checkpoint, no
quantization): seconds for a 7B file, for load and speed measurements on a GPU machine.

    python scripts/make_synthetic_zse.py OUT.zse [--preset qwen2.5-7b] [--layers N]
                                         [--group-size 128] [--group-size-for KIND=SIZE ...]

Group sizes follow zse-convert's (its options of the same names; by default q/k/v at 32).

Weights are never all zero: codes are uniform random nibbles, scales ~0.002 and zeros ~7.5
(weights within about +-0.016), norms near 1, embeddings N(0, 0.02). The numbers it produces are
meaningless; the bytes per token and the shapes are a real model's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.checkpoints import CHAT_TEMPLATE, synthetic_tokenizer_json  # noqa: E402
from zse_convert.convert import (ConvertOptions, parse_group_size_override,  # noqa: E402
                                 plan_tensors)
from zse_convert.source import SourceError  # noqa: E402
from zse_convert.writer import ZseWriter  # noqa: E402
from zse_runtime.zsefile import (FORMAT_NAME, FORMAT_VERSION_MAJOR, FORMAT_VERSION_MINOR,  # noqa: E402
                                 LAYOUT_INT4_ROWS, int4_section_sizes)

PRESETS = {
    "qwen2.5-7b": dict(architecture="qwen2", vocab_size=152064, hidden_size=3584,
                       intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6,
                       rope_scaling=None, max_position_embeddings=32768, tie_word_embeddings=False,
                       qkv_bias=True, o_bias=False, sliding_window=None, source_dtype="synthetic"),
    "qwen2.5-0.5b": dict(architecture="qwen2", vocab_size=151936, hidden_size=896,
                         intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-6, rope_theta=1e6,
                         rope_scaling=None, max_position_embeddings=32768, tie_word_embeddings=True,
                         qkv_bias=True, o_bias=False, sliding_window=None, source_dtype="synthetic"),
}


def random_blob(spec, rng) -> np.ndarray:
    blob = np.empty(spec.nbytes, np.uint8)
    if spec.layout == LAYOUT_INT4_ROWS:
        rows, cols = spec.shape
        packed, scale_bytes, _ = int4_section_sizes(rows, cols, spec.group_size)
        blob[:packed] = rng.integers(0, 256, packed, dtype=np.uint8)
        groups = scale_bytes // 2
        blob[packed:packed + scale_bytes].view(np.float16)[:] = rng.uniform(0.0015, 0.0025, groups)
        blob[packed + scale_bytes:].view(np.float16)[:] = rng.uniform(7.0, 8.0, groups)
    elif spec.name.endswith("norm"):
        blob.view(np.float32)[:] = rng.uniform(0.8, 1.2, spec.nbytes // 4)
    else:
        values = blob.view(np.dtype(spec.dtype))
        values[:] = rng.standard_normal(values.size, dtype=np.float32) * 0.02
    return blob


def write_random_zse(out: Path, model: dict, group_size: int = 128, seed: int = 0,
                     chat_template: str | None = None, lm_head: str = "float16",
                     tokenizer_json: str | None = None,
                     group_size_overrides: dict[str, int] | None = None) -> Path:
    """`chat_template` (e.g. tests.checkpoints.CHAT_TEMPLATE) lets /v1/chat/completions serve it;
    `lm_head` is zse-convert's --lm-head (float16 or int4). `tokenizer_json`: a real model's
    tokenizer.json text (it must have `<|im_end|>`); by default a byte-level BPE as large as the
    model's vocabulary, trained on Python sources (tests.checkpoints.synthetic_tokenizer_json;
    ~30 s at the 7B preset's 152k ids on two cores), so that start-up pays about what a real
    model pays to build its tokenizer."""
    options = ConvertOptions(group_size=group_size, lm_head=lm_head,
                             group_size_overrides=group_size_overrides or {})
    options.validate()
    tokenizer_json = tokenizer_json or synthetic_tokenizer_json(model["vocab_size"])
    tokenizer = Tokenizer.from_str(tokenizer_json)
    eos = tokenizer.token_to_id("<|im_end|>")
    if eos is None:
        raise ValueError("the tokenizer has no <|im_end|> token to end generation with")
    manifest = {
        "format": FORMAT_NAME, "format_version": [FORMAT_VERSION_MAJOR, FORMAT_VERSION_MINOR],
        "model": model,
        "quantization": {"method": "synthetic-random", "bits": 4, "group_size": group_size,
                         "group_size_overrides": options.effective_group_size_overrides},
        "tokenizer": {"tokenizer_json": tokenizer_json, "chat_template": chat_template, "chat_templates": {},
                      "special_tokens": {"bos_token": None, "eos_token": "<|im_end|>",
                                         "pad_token": None, "unk_token": None},
                      "bos_token_id": None, "eos_token_ids": [eos], "pad_token_id": None,
                      "add_bos_token": None, "model_max_length": None},
        "generation": {},
        "provenance": {"source": "synthetic", "source_kind": "synthetic", "converter":
                       "scripts/make_synthetic_zse.py"},
    }
    specs = plan_tensors(model, options)
    rng = np.random.default_rng(seed)
    with ZseWriter(out, manifest, specs) as writer:
        for spec in specs:
            writer.write(spec.name, random_blob(spec, rng))
        writer.finish()
    return out


def _group_size_override(text: str) -> tuple[str, int]:
    try:
        return parse_group_size_override(text)
    except SourceError as exc:  # a usage error, not a traceback
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--group-size-for: ")) from None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="qwen2.5-7b")
    parser.add_argument("--layers", type=int, help="override num_hidden_layers")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--group-size-for", action="append", default=[], metavar="KIND=SIZE",
                        type=_group_size_override, help="as zse-convert's (repeatable)")
    parser.add_argument("--lm-head", choices=("float16", "int4"), default="float16")
    parser.add_argument("--tokenizer", type=Path,
                        help="a real model's tokenizer.json to embed instead of a BPE as large "
                             "as the model's vocabulary, trained on Python sources")
    args = parser.parse_args()
    model = dict(PRESETS[args.preset])
    if args.layers:
        model["num_hidden_layers"] = args.layers
    started = time.perf_counter()
    write_random_zse(args.out, model, args.group_size, chat_template=CHAT_TEMPLATE,
                     lm_head=args.lm_head,
                     tokenizer_json=args.tokenizer.read_text() if args.tokenizer else None,
                     group_size_overrides=dict(args.group_size_for))
    print(f"wrote {args.out}: {args.out.stat().st_size / 1e9:.2f} GB in "
          f"{time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
