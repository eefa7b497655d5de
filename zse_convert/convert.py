"""Checkpoint -> `.zse`: plan every tensor, then stream them through the quantizer into the writer.

All validation (architecture, tensor names and shapes, tokenizer, disk space) happens before the
first tensor is quantized, so bad input fails in seconds.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from zse_runtime import __version__
from zse_runtime.zsefile import (DTYPE_INT4, EMBED, FORMAT_NAME, FORMAT_VERSION_MAJOR,
                                 FORMAT_VERSION_MINOR, INT4_GROUP_SIZES, INT4_SCALE_DTYPE,
                                 INT4_ZERO_DTYPE, LAYOUT_DENSE, LAYOUT_INT4_ROWS, LM_HEAD,
                                 Int4Weight, expected_tensor_shapes, int4_section_sizes)

from .architectures import canonical_config, source_names
from .awq import ALPHAS, SEARCH_ROWS, SEARCH_TOKENS, AwqOptions
from .calibration import (AWQ_CONSUMERS, DEFAULT_TOKENS, WINDOW, LayerCalibrator, load_text,
                          token_windows)
from .gptq import ACT_ORDERS, DAMPING, SEARCH_WEIGHTS, GptqOptions
from .importance import DOWN_PROJ_ESTIMATE, down_proj_column_weight, scaled_row_energy
from .quantize import QuantStats, quantize_int4
from .source import Checkpoint, ResolvedSource, SourceError, resolve_source
from .tokenizer_meta import tokenizer_section
from .writer import TensorSpec, ZseWriter

PRECISIONS = ("int4", "float16")
CHUNK_ELEMENTS = 1 << 24  # rows are read and quantized ~64 MB of float32 at a time
HIGH_PRECISION = "float32"  # norms and biases: tiny, and read once per token
QUANTIZED_PARTS = ("qkv", "o_proj", "gate_up", "down_proj")  # the per-layer INT4 tensors
# Projection kinds quantized at their own group size unless --group-size-for says otherwise. qkv
# at 32: on Qwen2.5-Coder-0.5B it removed 27% of g128's perplexity loss (45% on a held-out text)
# for 0.05 bits per weight and no batch-1 decode time (docs/quality.md, "The default").
DEFAULT_GROUP_SIZE_FOR = {"qkv": 32}


def parse_group_size_override(text: str) -> tuple[str, int]:
    """`KIND=SIZE` (as given to --group-size-for) -> (kind, size), both validated."""
    kind, sep, size = text.partition("=")
    kind, size = kind.strip(), size.strip()
    if not sep or not kind or not size.isdigit():
        raise SourceError(f"--group-size-for: expected KIND=SIZE, e.g. down_proj=32; got {text!r}")
    _check_group_size_override(kind, int(size))
    return kind, int(size)


def _check_group_size_override(kind: Any, size: Any) -> None:
    if kind not in QUANTIZED_PARTS:
        raise SourceError(f"--group-size-for: unknown projection kind {kind!r}; the INT4 "
                          f"projections of a layer are {list(QUANTIZED_PARTS)}")
    if not isinstance(size, int) or isinstance(size, bool) or size not in INT4_GROUP_SIZES:
        raise SourceError(f"--group-size-for: {kind}'s group size must be one of "
                          f"{list(INT4_GROUP_SIZES)}, got {size!r}")


@dataclass
class ConvertOptions:
    group_size: int = 128
    # projection kind (QUANTIZED_PARTS) -> the group size requested for it instead of group_size;
    # these replace DEFAULT_GROUP_SIZE_FOR's entries (qkv=group_size: one size for every kind)
    group_size_overrides: dict[str, int] = field(default_factory=dict)
    clip_search: bool = True
    # weight down_proj's search by its inputs' mean square estimated from gate/up (importance.py)
    column_weights: bool = True
    # float16: on both real-model fixtures an INT4 lm_head cost more perplexity than every INT4
    # layer together at group 32 (scripts/eval_quality.py, README "Known gaps").
    lm_head: str = "float16"
    embedding: str = "float16"
    # GPTQ against calibration inputs (gptq.py, calibration.py) instead of the weight-only search
    gptq: bool = False
    calibration: str | None = None  # a UTF-8 text file; None: the Python standard library's source
    calibration_tokens: int = DEFAULT_TOKENS
    gptq_damping: float = DAMPING
    gptq_act_order: str = "groups"
    gptq_search_weights: str = "hessian"
    gptq_propagate_quantized: bool = True  # later layers see quantized outputs (else fp weights)
    # AWQ per-input-channel scales against the same calibration inputs (awq.py); with gptq too,
    # GPTQ then runs on the scaled weights
    awq: bool = False
    awq_alphas: tuple[float, ...] = ALPHAS
    revision: str | None = None
    token: str | None = None

    def validate(self) -> None:
        if self.gptq and not self.clip_search:
            raise SourceError("--gptq chooses each group's scale and zero with the clipping search; "
                              "it cannot be combined with --no-clip-search")
        if not self.awq_alphas or not all(0 <= a <= 1 and a == round(a, 2)
                                          for a in self.awq_alphas):
            raise SourceError(f"AWQ alphas must be a non-empty list of hundredths in [0, 1], got "
                              f"{list(self.awq_alphas)}")
        if self.gptq_act_order not in ACT_ORDERS:
            raise SourceError(f"GPTQ act order must be one of {list(ACT_ORDERS)}, got "
                              f"{self.gptq_act_order!r}")
        if self.gptq_search_weights not in SEARCH_WEIGHTS:
            raise SourceError(f"GPTQ search weights must be one of {list(SEARCH_WEIGHTS)}, got "
                              f"{self.gptq_search_weights!r}")
        if not 0 < self.gptq_damping < 1:
            raise SourceError(f"GPTQ damping must be in (0, 1), got {self.gptq_damping}")
        if self.group_size not in INT4_GROUP_SIZES:
            raise SourceError(f"--group-size must be one of {list(INT4_GROUP_SIZES)}, got "
                              f"{self.group_size}")
        for kind, size in self.group_size_overrides.items():
            _check_group_size_override(kind, size)
        for option, value in (("--lm-head", self.lm_head), ("--embedding", self.embedding)):
            if value not in PRECISIONS:
                raise SourceError(f"{option} must be one of {list(PRECISIONS)}, got {value!r}")

    @property
    def requested_group_sizes(self) -> dict[str, int]:
        """Projection kind -> the group size requested for it (before any fallback)."""
        requested = {**DEFAULT_GROUP_SIZE_FOR, **self.group_size_overrides}
        return {kind: requested.get(kind, self.group_size) for kind in QUANTIZED_PARTS}

    @property
    def search_column_weights(self) -> dict[str, str]:
        """Kind -> how its search weighted input columns (the manifest's
        quantization.search_column_weights): only the weight-only search uses the estimate."""
        weighted = self.column_weights and self.clip_search and not (self.gptq or self.awq)
        return {"down_proj": DOWN_PROJ_ESTIMATE} if weighted else {}

    @property
    def effective_group_size_overrides(self) -> dict[str, int]:
        """The kinds requested at another size than group_size, defaults included (the
        manifest's quantization.group_size_overrides)."""
        return {kind: size for kind, size in self.requested_group_sizes.items()
                if size != self.group_size}


class Progress:
    """What the converter reports while it works; the CLI renders it with rich."""

    hub_tqdm_class = None  # tqdm class huggingface_hub draws download bars with
    # Set (e.g. by a signal handler) to stop between chunks: raising from a signal handler
    # while numba's parallel kernels run can corrupt the dispatcher's state.
    stop_requested = False

    def download_started(self, source: str) -> None: ...
    def tensors_planned(self, specs: list[TensorSpec], total_elements: int) -> None: ...
    def tensor_written(self, spec: TensorSpec, elements: int) -> None: ...


def _group_size_for(cols: int, requested: int, name: str) -> int:
    """The requested group size, or the largest smaller supported one that divides `cols`
    (SmolLM2's 576 inputs at 128: 96)."""
    for size in sorted(INT4_GROUP_SIZES, reverse=True):
        if size <= requested and cols % size == 0:
            return size
    raise SourceError(f"{name}: {cols} input columns are not a multiple of any supported group "
                      f"size {list(INT4_GROUP_SIZES)}")


def _requested_group_size(name: str, options: ConvertOptions) -> int:
    return options.requested_group_sizes.get(name.rsplit(".", 1)[-1], options.group_size)


def plan_tensors(model: dict[str, Any], options: ConvertOptions) -> list[TensorSpec]:
    specs = []
    for name, shape in expected_tensor_shapes(model).items():
        part = name.rsplit(".", 1)[-1]
        precision = {EMBED: options.embedding, LM_HEAD: options.lm_head}.get(
            name, "int4" if part in QUANTIZED_PARTS else HIGH_PRECISION)
        if precision == "int4":
            group = _group_size_for(shape[1], _requested_group_size(name, options), name)
            specs.append(TensorSpec(name, DTYPE_INT4, tuple(shape), LAYOUT_INT4_ROWS, group))
        else:
            specs.append(TensorSpec(name, precision, tuple(shape), LAYOUT_DENSE))
    return specs


def _check_sources(ckpt: Checkpoint, model: dict[str, Any],
                   specs: list[TensorSpec]) -> dict[str, list[str]]:
    """Map each planned tensor to its source tensors, checking names and shapes up front."""
    available = set(ckpt.tensors)
    sources, problems = {}, []
    for spec in specs:
        names = source_names(spec.name, model, available)
        missing = [n for n in names if n not in available]
        if missing:
            problems.append(f"{spec.name}: missing {missing}")
            continue
        shapes = [ckpt.tensors[n].shape for n in names]
        rows = sum(s[0] for s in shapes)
        if rows != spec.shape[0] or any(s[1:] != spec.shape[1:] for s in shapes):
            problems.append(f"{spec.name}: sources {dict(zip(names, map(list, shapes)))} do not "
                            f"form the expected shape {list(spec.shape)}")
        sources[spec.name] = names
    if problems:
        raise SourceError(f"{ckpt.folder}: checkpoint does not match its config.json:\n  "
                          + "\n  ".join(problems[:20]))
    return sources


def _row_chunks(rows: int, cols: int):
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def _int4_views(blob: np.ndarray, spec: TensorSpec) -> Int4Weight:
    rows, cols = spec.shape
    packed, scale_bytes, _ = int4_section_sizes(rows, cols, spec.group_size)
    return Int4Weight(blob[:packed].view("<u4").reshape(rows, cols // 8),
                      blob[packed:packed + scale_bytes].view("<f2").reshape(rows, -1),
                      blob[packed + scale_bytes:].view("<f2").reshape(rows, -1), spec.group_size)


def int4_blob(spec: TensorSpec, weight: Int4Weight) -> np.ndarray:
    """The on-disk bytes of an already quantized tensor."""
    blob = np.empty(spec.nbytes, np.uint8)
    target = _int4_views(blob, spec)
    target.qweight[:], target.scales[:], target.zeros[:] = weight.qweight, weight.scales, weight.zeros
    return blob


def dense_blob(spec: TensorSpec, values: np.ndarray) -> np.ndarray:
    """The on-disk bytes of a float vector computed during conversion (an AWQ-folded norm)."""
    out = np.ascontiguousarray(values, np.dtype(spec.dtype).newbyteorder("<"))
    if out.shape != tuple(spec.shape) or out.nbytes != spec.nbytes:
        raise ValueError(f"{spec.name}: computed {out.shape}, planned {spec.shape}")
    return out.view(np.uint8).reshape(-1)


RowsObserver = Callable[[str, int, np.ndarray], None]  # (source, first row, float32 rows)


class DownProjInputs:
    """down_proj's column weights (importance.py; the manifest's
    quantization.search_column_weights), from the row energies of the same layer's gate and up
    rows, taken while gate_up is quantized (it precedes down_proj in every layer)."""

    def __init__(self, ckpt: Checkpoint, sources: dict[str, list[str]]):
        self._ckpt, self._sources = ckpt, sources
        self._energy: dict[str, np.ndarray] = {}  # gate or up source -> energy per row

    def rows_observer(self, spec: TensorSpec) -> RowsObserver | None:
        """For a gate_up tensor, what build_tensor hands each chunk of its source rows."""
        layer, _, kind = spec.name.rpartition(".")
        if kind != "gate_up":
            return None
        norm = self._sources[f"{layer}.mlp_norm"][0]
        gamma = self._ckpt.read_rows(norm, 0, self._ckpt.tensors[norm].shape[0]).copy()

        def observe(source: str, start: int, rows: np.ndarray) -> None:
            energy = self._energy.setdefault(source,
                                             np.empty(self._ckpt.tensors[source].shape[0]))
            energy[start:start + len(rows)] = scaled_row_energy(rows, gamma)
        return observe

    def column_weight(self, spec: TensorSpec) -> np.ndarray | None:
        """For a down_proj tensor, its search's column weights."""
        layer, _, kind = spec.name.rpartition(".")
        if kind != "down_proj":
            return None
        gate, up = self._sources[f"{layer}.gate_up"]
        return down_proj_column_weight(self._energy.pop(gate), self._energy.pop(up))


def build_tensor(ckpt: Checkpoint, spec: TensorSpec, sources: list[str], clip_search: bool,
                 on_rows: Callable[[int], None] = lambda n: None,
                 stop_requested: Callable[[], bool] = lambda: False,
                 column_weight: np.ndarray | None = None,
                 observe_rows: RowsObserver | None = None) -> tuple[np.ndarray, QuantStats]:
    """The tensor's exact on-disk bytes, assembled chunk by chunk from its (fused) sources.
    column_weight: the search's per-input-column error weights (None: all equal);
    observe_rows: called with each chunk of source rows read as float32."""
    blob = np.empty(spec.nbytes, np.uint8)
    stats = QuantStats(0.0, 0.0, 0)
    cols = spec.shape[1] if len(spec.shape) == 2 else 1
    if spec.layout == LAYOUT_DENSE:
        target = blob.view(np.dtype(spec.dtype).newbyteorder("<")).reshape(spec.shape)
    else:
        qweight, scales, zeros, _ = _int4_views(blob, spec)
    row = 0
    for source in sources:
        src_rows = ckpt.tensors[source].shape[0]
        for start, stop in _row_chunks(src_rows, cols):
            if stop_requested():
                raise KeyboardInterrupt
            at = slice(row + start, row + stop)
            if spec.dtype == "float16" and ckpt.tensors[source].dtype == "F16":  # copy the bits
                target[at] = ckpt.read_raw(source, start, stop).view("<f2").reshape(stop - start,
                                                                                  *spec.shape[1:])
                on_rows(stop - start)
                continue
            values = ckpt.read_rows(source, start, stop)
            if observe_rows is not None:
                observe_rows(source, start, values)
            if spec.layout == LAYOUT_DENSE:
                if spec.dtype == "float16" and np.abs(values).max(initial=0) > 65504:
                    raise SourceError(f"{source}: values exceed the float16 range; use a higher "
                                      "precision option for this tensor")
                target[at] = values
            else:
                weight, chunk_stats = quantize_int4(values, spec.group_size, clip_search, source,
                                                    column_weight)
                qweight[at], scales[at], zeros[at] = weight.qweight, weight.scales, weight.zeros
                stats.error += chunk_stats.error
                stats.rtn_error += chunk_stats.rtn_error
                stats.numel += chunk_stats.numel
            on_rows(stop - start)
        row += src_rows
    return blob, stats


def awq_text(values: list[float], decimals: int) -> str:
    return " ".join(f"{v:.{decimals}f}" for v in values)


def _record_alphas(record: dict, calibrator: LayerCalibrator, layers: int) -> None:
    """The α chosen so far into the manifest's AWQ record (layers not yet calibrated: 0)."""
    for part in AWQ_CONSUMERS:
        for key, values, decimals in (("alpha", calibrator.awq_alphas[part], 2),
                                      ("error_ratio", calibrator.awq_error_ratios[part], 4)):
            record[key][part] = awq_text(values + [0.0] * (layers - len(values)), decimals)


def _layer_of(name: str) -> int | None:
    return int(name.split(".")[1]) if name.startswith("layers.") else None


def _source_param_count(ckpt: Checkpoint) -> int:
    return sum(int(np.prod(t.shape, dtype=np.int64)) for t in ckpt.tensors.values())


def convert(source: str, out: str | os.PathLike, options: ConvertOptions | None = None,
            progress: Progress | None = None) -> dict[str, Any]:
    """Convert `source` (folder or Hub repo id) into `out`. Returns the summary dict."""
    options = options or ConvertOptions()
    progress = progress or Progress()
    options.validate()
    out = Path(out)
    if out.is_dir():
        raise SourceError(f"--out {out} is a folder; give a file name such as {out / 'model.zse'}")
    if not out.parent.is_dir():
        raise SourceError(f"output folder {out.parent} does not exist")
    started = time.perf_counter()

    if not Path(source).expanduser().is_dir():
        progress.download_started(source)
    resolved: ResolvedSource = resolve_source(source, options.revision, options.token,
                                              progress.hub_tqdm_class)
    ckpt = Checkpoint.open(resolved.folder)
    try:
        model = canonical_config(ckpt.read_json("config.json", required=True))
        tokenizer, generation = tokenizer_section(ckpt, model["vocab_size"])
        specs = plan_tensors(model, options)
        sources = _check_sources(ckpt, model, specs)
        calibrator, gptq_record, awq_record = None, None, None
        if options.gptq or options.awq:  # tokenize (and fail on bad text) before any output exists
            text = load_text(options.calibration)
            ids = token_windows(tokenizer["tokenizer_json"], text, options.calibration_tokens)
            calibrator = LayerCalibrator(
                ckpt, model, sources, {s.name: s.group_size for s in specs if s.group_size},
                ids, GptqOptions(options.gptq_damping, options.gptq_act_order, options.clip_search,
                                 options.gptq_search_weights) if options.gptq else None,
                options.gptq_propagate_quantized,
                AwqOptions(tuple(options.awq_alphas), options.clip_search) if options.awq else None,
                options.clip_search)
            calibration_record = {
                "calibration": text.source,
                "calibration_sha256": text.sha256,
                "tokens": int(ids.size),
                "window": WINDOW,
            }
            inputs = "quantized" if options.gptq_propagate_quantized else "float"
            if options.gptq:
                gptq_record = {
                    **calibration_record,
                    "damping": options.gptq_damping,
                    "act_order": options.gptq_act_order,
                    "search_weights": options.gptq_search_weights,
                    "inputs": inputs,
                }
            if options.awq:  # the chosen alphas are filled in as the layers are calibrated
                awq_record = {
                    **calibration_record,
                    "inputs": inputs,
                    "alpha_grid": [float(a) for a in options.awq_alphas],
                    "search_rows": SEARCH_ROWS,
                    "search_tokens": min(SEARCH_TOKENS, int(ids.size)),
                    # fixed-width text, so the manifest keeps its size when the writer patches
                    # it: per consumer, one α (and its output error over α = 0's) per layer
                    "alpha": {part: awq_text([0.0] * model["num_hidden_layers"], 2)
                              for part in AWQ_CONSUMERS},
                    "error_ratio": {part: awq_text([0.0] * model["num_hidden_layers"], 4)
                                    for part in AWQ_CONSUMERS},
                }
        manifest = {
            "format": FORMAT_NAME,
            "format_version": [FORMAT_VERSION_MAJOR, FORMAT_VERSION_MINOR],
            "model": model,
            "quantization": {
                "method": "int4-asymmetric-groupwise",
                "bits": 4,
                "group_size": options.group_size,
                "group_size_overrides": options.effective_group_size_overrides,
                "scale_dtype": INT4_SCALE_DTYPE,
                "zero_dtype": INT4_ZERO_DTYPE,
                "clip_search": options.clip_search,
                "search_column_weights": options.search_column_weights,
                "gptq": gptq_record,
                "awq": awq_record,
                "embedding": options.embedding,
                "lm_head": options.lm_head,
                "norms_and_biases": HIGH_PRECISION,
            },
            "tokenizer": tokenizer,
            "generation": generation,
            "provenance": {
                # a local folder is recorded by name only: the file may be shared, its path not
                "source": resolved.source if resolved.kind == "hub" else resolved.folder.name,
                "source_kind": resolved.kind,
                "revision": resolved.revision,
                "commit": resolved.commit,
                "source_files": sorted({t.file.name for t in ckpt.tensors.values()}),
                "converter": "zse-convert",
                "converter_version": __version__,
                "created_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            },
        }
        total_elements = sum(int(np.prod(s.shape)) for s in specs)
        progress.tensors_planned(specs, total_elements)
        totals = QuantStats(0.0, 0.0, 0)
        # One background thread writes and hashes tensor i while tensor i + 1 is quantized;
        # waiting before each submit keeps order and at most two tensors in memory.
        with ZseWriter(out, manifest, specs) as writer, ThreadPoolExecutor(1) as io_thread:
            pending = None
            try:
                calibrated: dict[str, tuple[Int4Weight, QuantStats]] = {}
                down_proj_inputs = (DownProjInputs(ckpt, sources)
                                    if options.search_column_weights else None)
                calibrated_layer = None
                for spec in specs:
                    cols = spec.shape[1] if len(spec.shape) == 2 else 1
                    layer = _layer_of(spec.name) if calibrator else None
                    if layer is not None and layer != calibrated_layer:  # its first tensor
                        calibrated = calibrator.weights(layer, lambda: progress.stop_requested)
                        calibrated_layer = layer
                        if awq_record is not None:
                            _record_alphas(awq_record, calibrator, model["num_hidden_layers"])
                    if layer is not None and spec.name in calibrated:
                        weight, stats = calibrated.pop(spec.name)
                        blob = int4_blob(spec, weight)
                        progress.tensor_written(spec, int(np.prod(spec.shape)))
                    elif layer is not None and spec.name in calibrator.vectors:  # AWQ-folded
                        blob = dense_blob(spec, calibrator.vectors[spec.name])
                        stats = QuantStats(0.0, 0.0, 0)
                        progress.tensor_written(spec, int(np.prod(spec.shape)))
                    else:
                        blob, stats = build_tensor(
                            ckpt, spec, sources[spec.name], options.clip_search,
                            lambda rows, spec=spec, cols=cols: progress.tensor_written(spec,
                                                                                       rows * cols),
                            lambda: progress.stop_requested,
                            down_proj_inputs and down_proj_inputs.column_weight(spec),
                            down_proj_inputs and down_proj_inputs.rows_observer(spec))
                    if pending is not None:
                        pending.result()
                    pending = io_thread.submit(writer.write, spec.name, blob)
                    del blob
                    totals.error += stats.error
                    totals.rtn_error += stats.rtn_error
                    totals.numel += stats.numel
                pending.result()
            finally:
                if pending is not None:  # never abort (close the file) under a running write
                    wait([pending])
            writer.finish()
            file_size = writer.file_size
    finally:
        ckpt.close()

    seconds = time.perf_counter() - started
    params = _source_param_count(ckpt)
    quantized = [s for s in specs if s.layout == LAYOUT_INT4_ROWS]
    quantized_elements = sum(int(np.prod(s.shape)) for s in quantized)
    return {
        "output": str(out),
        "source": resolved.source,
        "commit": resolved.commit,
        "architecture": model["architecture"],
        "parameters": params,
        "file_bytes": file_size,
        "bits_per_weight": round(file_size * 8 / params, 4),
        "int4_bits_per_weight": round(sum(s.nbytes for s in quantized) * 8
                                      / max(quantized_elements, 1), 4),
        "group_size": options.group_size,
        "group_size_overrides": manifest["quantization"]["group_size_overrides"],
        # tensors whose input dimension is not a multiple of the size requested for them
        "group_size_fallbacks": {s.name: s.group_size for s in quantized
                                 if s.group_size != _requested_group_size(s.name, options)},
        "clip_search": options.clip_search,
        "search_column_weights": manifest["quantization"]["search_column_weights"],
        "gptq": manifest["quantization"]["gptq"],
        "awq": manifest["quantization"]["awq"],
        # weighted squared error of the chosen parameters over that of round-to-nearest
        "error_vs_round_to_nearest": round(totals.error / totals.rtn_error, 4)
        if totals.rtn_error else None,
        "seconds": round(seconds, 2),
        "params_per_second": round(params / seconds),
        "options": asdict(options) | {"token": None},
    }
