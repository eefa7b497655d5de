"""Calibration for GPTQ and AWQ: text -> token windows -> each linear layer's inputs, one layer at
a time.

The text is a user file (`--calibration FILE`) or, by default, text from a fixed list of
pure-Python standard-library modules read from the running interpreter: their long docstrings
(prose), then as much of their source code (nothing ships with ZSE). It is disjoint from the evaluation text of
scripts/eval_quality.py (CPython's LICENSE.txt and pydoc_data.topics): those files, and the
modules that print or hold them (pydoc, site, _sitebuiltins), are not in the list.

The forward pass is numpy float32 and follows formats/zse-v1.md §4 for every architecture the
converter accepts (llama, mistral with its sliding window, qwen2 with q/k/v biases; RoPE with
linear and llama3 scaling through the runtime's own tables). It keeps one residual stream
[tokens, hidden] and one layer's weights at a time, so memory does not grow with depth. Each
projection is quantized as soon as its Hessian H = XᵀX is known, and the rest of the layer (and
the next layer) sees the *quantized* projection's output, as the GPTQ reference does: later
weights then compensate earlier ones' errors. With AWQ (awq.py), each projection's input scales
are chosen on the same inputs just before it is quantized, and folded into the norm or the
projection that produces those inputs.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from zse_runtime.config import ModelConfig, rope_tables
from zse_runtime.zsefile import EMBED, Int4Weight, dequantize_int4, layer_tensor_name

from .awq import (AwqOptions, fold_into_norm, fold_into_up, fold_into_v, scale_columns,
                  search_scales, shared_by_kv_heads)
from .gptq import GptqOptions, gptq_quantize
from .quantize import QuantStats, quantize_int4
from .source import Checkpoint, SourceError

WINDOW = 512  # tokens per calibration sequence
MIN_TOKENS = WINDOW  # fewer gives a Hessian too poor to be worth the time
DEFAULT_TOKENS = 8192
TOKEN_CHUNK = 2048  # tokens per matmul in the MLP, bounding the [tokens, intermediate] buffers

# Pure-Python modules present in CPython 3.10-3.13, in the order their text is joined.
STDLIB_MODULES = (
    "argparse", "textwrap", "string", "difflib", "fractions", "heapq", "bisect", "calendar", "csv",
    "dataclasses", "enum", "functools", "gettext", "inspect", "logging", "pprint", "random",
    "shutil", "statistics", "subprocess", "tarfile", "email.message", "http.client",
    "json.decoder", "json.encoder", "unittest.case", "urllib.parse", "collections", "contextlib",
    "typing", "ast", "tokenize", "pickle", "threading", "queue", "sched", "smtplib", "ftplib",
    "imaplib", "mailbox", "configparser", "optparse", "getopt", "locale", "codecs", "abc",
    "numbers", "operator", "copy", "weakref", "types", "glob", "fnmatch", "tempfile", "uuid",
    "base64", "hmac", "secrets", "ipaddress", "socket", "selectors", "ssl", "asyncio.base_events",
    "concurrent.futures._base", "multiprocessing.pool", "xml.dom.minidom", "html.parser", "wave",
    "doctest", "zipfile", "gzip", "datetime", "traceback", "warnings", "netrc", "shlex", "cmd",
)
STDLIB_SOURCE = "python-stdlib"
AWQ_CONSUMERS = ("qkv", "o_proj", "gate_up", "down_proj")


@dataclass
class CalibrationText:
    text: str
    source: str  # STDLIB_SOURCE or the file's name
    sha256: str


def stdlib_text() -> CalibrationText:
    """Half prose, half code: the modules' docstrings of over 200 characters (ast), then as many
    characters of their source. On Qwen2.5-Coder-0.5B (layers 0-2, 8192 tokens, damping 0.1),
    GPTQ's output error on the evaluation text relative to the clipping search's was 0.506 with
    source alone, 0.456 with this mix and 0.436 with docstrings alone; the mix keeps code in
    the Hessian for code models."""
    docs, sources = [], []
    for module in STDLIB_MODULES:
        spec = importlib.util.find_spec(module)
        if spec is None or not (spec.origin or "").endswith(".py"):
            continue
        source = Path(spec.origin).read_text(encoding="utf-8")
        sources.append(source)
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:
                    docs.append(doc)
    prose = "\n\n".join(docs)
    text = prose + "\n\n" + "\n\n".join(sources)[:len(prose)]
    return CalibrationText(text, STDLIB_SOURCE, hashlib.sha256(text.encode()).hexdigest())


def load_text(path: str | None) -> CalibrationText:
    """The calibration text: the file at `path` (UTF-8), or the stdlib text when None."""
    if path is None:
        return stdlib_text()
    file = Path(path).expanduser()
    if not file.is_file():
        raise SourceError(f"--calibration {path}: no such file")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SourceError(f"--calibration {path}: not UTF-8 text ({exc.reason} at byte "
                          f"{exc.start})") from None
    return CalibrationText(text, file.name, hashlib.sha256(text.encode()).hexdigest())


def token_windows(tokenizer_json: str, text: CalibrationText, tokens: int) -> np.ndarray:
    """int32 [tokens // WINDOW, WINDOW]: non-overlapping windows spread evenly over the text."""
    from tokenizers import Tokenizer

    if tokens < MIN_TOKENS:
        raise SourceError(f"--calibration-tokens must be at least {MIN_TOKENS}, got {tokens}")
    ids = np.asarray(Tokenizer.from_str(tokenizer_json).encode(
        text.text, add_special_tokens=False).ids, np.int32)
    count = tokens // WINDOW
    if ids.size < count * WINDOW:
        raise SourceError(f"calibration text {text.source} holds {ids.size} tokens; "
                          f"{count * WINDOW} are needed (--calibration-tokens {tokens}): give a "
                          "longer file or ask for fewer tokens")
    starts = np.linspace(0, ids.size - WINDOW, count).astype(np.int64)
    return np.stack([ids[s:s + WINDOW] for s in starts])


def _read_matrix(ckpt: Checkpoint, names: list[str], rows_per_read: int = 4096) -> np.ndarray:
    """float32 rows of `names` concatenated (the fused tensor), read in chunks."""
    shapes = [ckpt.tensors[n].shape for n in names]
    out = np.empty((sum(s[0] for s in shapes), *shapes[0][1:]), np.float32)
    row = 0
    for name, shape in zip(names, shapes):
        for start in range(0, shape[0], rows_per_read):
            stop = min(shape[0], start + rows_per_read)
            out[row + start:row + stop] = ckpt.read_rows(name, start, stop)
        row += shape[0]
    return out


def _rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    variance = np.mean(x * x, axis=-1, keepdims=True, dtype=np.float32)
    return (x * (1.0 / np.sqrt(variance + np.float32(eps))) * weight).astype(np.float32)


def _gram(x: np.ndarray) -> np.ndarray:
    """H = XᵀX [K, K] float32, in token chunks (float32 partial sums of TOKEN_CHUNK rows)."""
    h = np.zeros((x.shape[1], x.shape[1]), np.float32)
    for start in range(0, x.shape[0], TOKEN_CHUNK):
        part = x[start:start + TOKEN_CHUNK]
        h += part.T @ part
    return h


class LayerCalibrator:
    """Quantizes one decoder layer's four projections at a time against calibration inputs: with
    GPTQ (`options`), with AWQ scales (`awq`, awq.py), or both (scales first, then GPTQ on the
    scaled weights and inputs). Without `options` each projection gets the clipping search.

    `weights(layer)` must be called for layers 0, 1, 2, ... in order: each call advances the
    residual stream through that layer (with its quantized projections). With AWQ, the layer's
    norms and qkv bias change too (the scales' inverses are folded into them): `vectors` then
    holds them, by canonical name, for the layer last calibrated.
    """

    def __init__(self, ckpt: Checkpoint, model: dict, sources: dict[str, list[str]],
                 group_sizes: dict[str, int], ids: np.ndarray, options: GptqOptions | None,
                 propagate_quantized: bool = True, awq: AwqOptions | None = None,
                 clip_search: bool = True):
        self.ckpt, self.sources, self.group_sizes = ckpt, sources, group_sizes
        self.config = ModelConfig.from_manifest(model)
        self.options = options
        self.awq = awq
        self.clip_search = options.clip_search if options else clip_search
        self.propagate_quantized = propagate_quantized
        self.sequences, self.window = ids.shape
        self.ids = ids
        self.hidden: np.ndarray | None = None  # residual stream [tokens, hidden] float32
        self.next_layer = 0
        self.cos, self.sin = rope_tables(self.config, self.window)
        self.vectors: dict[str, np.ndarray] = {}
        # per consumer ("qkv", "o_proj", "gate_up", "down_proj"): the α chosen in each layer
        # and the output error it left relative to α = 0, on the search sample
        self.awq_alphas: dict[str, list[float]] = {part: [] for part in AWQ_CONSUMERS}
        self.awq_error_ratios: dict[str, list[float]] = {part: [] for part in AWQ_CONSUMERS}

    def _embed(self) -> np.ndarray:
        """Embedding rows of the calibration tokens, read a chunk of the table at a time."""
        (name,) = self.sources[EMBED]
        flat = self.ids.reshape(-1)
        out = np.empty((flat.size, self.config.hidden_size), np.float32)
        rows = self.ckpt.tensors[name].shape[0]
        step = max(1, (1 << 24) // self.config.hidden_size)
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            hit = np.nonzero((flat >= start) & (flat < stop))[0]
            if hit.size:
                out[hit] = self.ckpt.read_rows(name, start, stop)[flat[hit] - start]
        return out

    def _vector(self, name: str) -> np.ndarray:
        """A norm or (fused) bias as float32."""
        return np.concatenate([self.ckpt.read_rows(n, 0, self.ckpt.tensors[n].shape[0]).copy()
                               for n in self.sources[name]])

    def _quantize(self, name: str, w: np.ndarray, inputs: np.ndarray
                  ) -> tuple[Int4Weight, QuantStats]:
        """GPTQ on `name` against `inputs`, or the clipping search without GPTQ options."""
        if self.options is None:
            return quantize_int4(w, self.group_sizes[name], self.clip_search, name)
        return gptq_quantize(w, _gram(inputs), self.group_sizes[name], self.options, name)

    def _used(self, w: np.ndarray, weight: Int4Weight) -> np.ndarray:
        """The weight the forward pass goes on with."""
        return dequantize_int4(weight) if self.propagate_quantized else w

    def _search(self, part: str, name: str, w: np.ndarray, inputs: np.ndarray,
                mean_abs: np.ndarray | None = None) -> np.ndarray | None:
        """AWQ's scales for consumer `part` (None when α = 0 wins: nothing to fold)."""
        choice = search_scales(w, inputs, self.group_sizes[name], self.awq, mean_abs, name)
        self.awq_alphas[part].append(choice.alpha)
        self.awq_error_ratios[part].append(round(choice.error_ratio, 4))
        return choice.scales if choice.alpha else None

    def _attention(self, qkv: np.ndarray) -> np.ndarray:
        """Causal GQA with rotate-half RoPE per sequence; qkv [tokens, q + 2 kv] -> [tokens, q]."""
        c, length = self.config, self.window
        out = np.empty((qkv.shape[0], c.q_size), np.float32)
        half = c.head_dim // 2
        cos, sin = self.cos[:, None, :], self.sin[:, None, :]

        def rotate(x):  # [L, heads, head_dim]
            first, second = x[..., :half], x[..., half:]
            return np.concatenate([first * cos - second * sin, second * cos + first * sin], -1)

        position = np.arange(length)
        allowed = position[None, :] <= position[:, None]
        if c.sliding_window:
            allowed &= position[:, None] - position[None, :] < c.sliding_window
        mask = np.where(allowed, np.float32(0), np.float32(-np.inf))
        kv_of_head = np.arange(c.num_attention_heads) // c.group_ratio
        scale = np.float32(1.0 / math.sqrt(c.head_dim))
        for s in range(self.sequences):
            rows = slice(s * length, (s + 1) * length)
            q = rotate(qkv[rows, :c.q_size].reshape(length, -1, c.head_dim)).transpose(1, 0, 2)
            k = rotate(qkv[rows, c.q_size:c.q_size + c.kv_size].reshape(length, -1, c.head_dim))
            v = qkv[rows, c.q_size + c.kv_size:].reshape(length, -1, c.head_dim)
            k, v = k.transpose(1, 0, 2)[kv_of_head], v.transpose(1, 0, 2)[kv_of_head]
            scores = (q @ k.transpose(0, 2, 1)) * scale + mask  # [heads, L, L]
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            scores /= scores.sum(-1, keepdims=True)
            out[rows] = (scores.astype(np.float32) @ v).transpose(1, 0, 2).reshape(length, -1)
        return out

    def weights(self, layer: int, stop_requested: Callable[[], bool] = lambda: False
                ) -> dict[str, tuple[Int4Weight, QuantStats]]:
        """Quantized qkv, o_proj, gate_up and down_proj of `layer`, by canonical name."""
        if layer != self.next_layer:
            raise RuntimeError(f"layers must be calibrated in order: asked for {layer}, "
                               f"expected {self.next_layer}")
        c = self.config
        name = lambda part: layer_tensor_name(layer, part)
        if self.hidden is None:
            self.hidden = self._embed()
        h, results, vectors = self.hidden, {}, {}

        def check_stop():
            if stop_requested():
                raise KeyboardInterrupt

        norm = self._vector(name("attn_norm"))
        x = _rmsnorm(h, norm, c.rms_norm_eps)
        w_qkv = _read_matrix(self.ckpt, self.sources[name("qkv")])
        bias = self._vector(name("qkv_bias")) if c.qkv_bias else None
        if self.awq and (s := self._search("qkv", name("qkv"), w_qkv, x)) is not None:
            vectors[name("attn_norm")] = norm = fold_into_norm(norm, s)
            w_qkv = scale_columns(w_qkv, s)
            x = _rmsnorm(h, norm, c.rms_norm_eps)
        results[name("qkv")] = self._quantize(name("qkv"), w_qkv, x)
        qkv = x @ self._used(w_qkv, results[name("qkv")][0]).T
        if bias is not None:
            qkv += bias
        check_stop()
        attended = self._attention(qkv)
        del qkv
        w_o = _read_matrix(self.ckpt, self.sources[name("o_proj")])
        if self.awq:
            shared = shared_by_kv_heads(np.abs(attended).mean(0, dtype=np.float64),
                                        c.num_attention_heads, c.num_key_value_heads)
            if (s := self._search("o_proj", name("o_proj"), w_o, attended, shared)) is not None:
                w_qkv, bias = fold_into_v(w_qkv, bias, s, c.q_size, c.kv_size,
                                          c.num_attention_heads, c.num_key_value_heads)
                if bias is not None:
                    vectors[name("qkv_bias")] = bias
                # v's rows shrink by s: requantize them, and take the attention output the
                # requantized qkv gives as the old one over s (exact in float; for the
                # quantized v, to within fp16 rounding of its group scales)
                results[name("qkv")] = self._quantize(name("qkv"), w_qkv, x)
                attended /= s
                w_o = scale_columns(w_o, s)
        del x, w_qkv
        results[name("o_proj")] = self._quantize(name("o_proj"), w_o, attended)
        out = attended @ self._used(w_o, results[name("o_proj")][0]).T
        if c.o_bias:
            out += self._vector(name("o_bias"))
        h += out
        del attended, out, w_o
        check_stop()

        norm = self._vector(name("mlp_norm"))
        x = _rmsnorm(h, norm, c.rms_norm_eps)
        w_gate_up = _read_matrix(self.ckpt, self.sources[name("gate_up")])
        if self.awq and (s := self._search("gate_up", name("gate_up"), w_gate_up, x)) is not None:
            vectors[name("mlp_norm")] = norm = fold_into_norm(norm, s)
            w_gate_up = scale_columns(w_gate_up, s)
            x = _rmsnorm(h, norm, c.rms_norm_eps)
        results[name("gate_up")] = self._quantize(name("gate_up"), w_gate_up, x)
        gate_up = self._used(w_gate_up, results[name("gate_up")][0])
        check_stop()
        mixed = np.empty((h.shape[0], c.intermediate_size), np.float32)
        for start in range(0, h.shape[0], TOKEN_CHUNK):
            part = x[start:start + TOKEN_CHUNK] @ gate_up.T
            gate, up = part[:, :c.intermediate_size], part[:, c.intermediate_size:]
            with np.errstate(over="ignore"):  # exp(-gate) -> inf gives silu 0, as it should
                mixed[start:start + TOKEN_CHUNK] = gate / (1.0 + np.exp(-gate)) * up
        del gate_up
        w_down = _read_matrix(self.ckpt, self.sources[name("down_proj")])
        if self.awq and (s := self._search("down_proj", name("down_proj"), w_down,
                                           mixed)) is not None:
            # up's rows shrink by s; as for v above, the MLP's output becomes the old one over s
            w_gate_up = fold_into_up(w_gate_up, s)
            results[name("gate_up")] = self._quantize(name("gate_up"), w_gate_up, x)
            mixed /= s
            w_down = scale_columns(w_down, s)
        del x, w_gate_up
        results[name("down_proj")] = self._quantize(name("down_proj"), w_down, mixed)
        down = self._used(w_down, results[name("down_proj")][0])
        for start in range(0, h.shape[0], TOKEN_CHUNK):
            h[start:start + TOKEN_CHUNK] += mixed[start:start + TOKEN_CHUNK] @ down.T
        self.vectors = vectors
        self.next_layer += 1
        if self.next_layer == c.num_hidden_layers:
            self.hidden = None
        return results
