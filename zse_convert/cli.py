"""`zse-convert`: a thin typer layer over convert(), ZseFile and its checks.

`zse-convert SRC --out FILE` converts (the `convert` command is the default), `zse-convert
inspect FILE` shows what a file holds, `zse-convert verify FILE` recomputes every checksum.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table
from typer.core import TyperGroup

from zse_runtime import __version__
from zse_runtime.zsefile import ZseFile, ZseFormatError

from .calibration import DEFAULT_TOKENS, WINDOW
from .convert import (DEFAULT_GROUP_SIZE_FOR, QUANTIZED_PARTS, ConvertOptions,
                      Progress as ConvertProgress, convert as run_convert,
                      parse_group_size_override)
from .source import SourceError
from .writer import TensorSpec

stdout = Console()
stderr = Console(stderr=True)


class _DefaultToConvert(TyperGroup):
    """Lets `zse-convert SRC --out F` mean `zse-convert convert SRC --out F`."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["convert", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(cls=_DefaultToConvert, add_completion=False, no_args_is_help=True,
                  help="Convert Hugging Face checkpoints into single-file INT4 .zse models.")


def _fail(message: str, code: int = 1) -> None:
    stderr.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def _version(value: bool) -> None:
    if value:
        stdout.print(f"zse-convert {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    pass


class _RichProgress(ConvertProgress):
    """Download bars (huggingface_hub's tqdm, rendered by rich), then one quantization bar."""

    def __init__(self):
        self.hub_tqdm_class = _hub_progress_class()
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=stderr, transient=True)
        self.task = None
        self.current: str | None = None

    def download_started(self, source: str) -> None:
        stderr.print(f"Fetching [bold]{source}[/] from the Hugging Face Hub (or its local cache)")

    def tensors_planned(self, specs: list[TensorSpec], total_elements: int) -> None:
        self.progress.start()  # only now: rich allows one live display, and downloads use theirs
        self.task = self.progress.add_task("quantizing", total=total_elements)

    def close(self) -> None:
        self.progress.stop()

    def tensor_written(self, spec: TensorSpec, elements: int) -> None:
        if spec.name != self.current:
            self.current = spec.name
            self.progress.update(self.task, description=f"{spec.name:<22}")
        self.progress.advance(self.task, elements)


def _group_size_overrides(values: Optional[list[str]]) -> dict[str, int]:
    """--group-size-for KIND=SIZE, repeatable, as a dict."""
    overrides: dict[str, int] = {}
    for value in values or []:
        try:
            kind, size = parse_group_size_override(value)
        except SourceError as exc:
            raise typer.BadParameter(str(exc).removeprefix("--group-size-for: ")) from None
        if kind in overrides:
            raise typer.BadParameter(f"{kind} is given twice")
        overrides[kind] = size
    return overrides


def _check_group_size_overrides(values: Optional[list[str]]) -> Optional[list[str]]:
    """The option's callback: bad values fail as usage errors, before anything is read."""
    _group_size_overrides(values)
    return values


def _hub_progress_class():
    """huggingface_hub draws its download bars with this tqdm class; render them with rich."""
    import warnings

    try:
        from tqdm import TqdmExperimentalWarning
        from tqdm.rich import tqdm as rich_tqdm
    except ImportError:
        return None
    warnings.filterwarnings("ignore", category=TqdmExperimentalWarning)
    return rich_tqdm


def _stop_handler(progress: "_RichProgress"):
    """Before quantization starts (download, planning), interrupt at once; during it, ask the
    converter to stop at the next chunk boundary: an exception raised from a signal handler
    while numba's parallel kernels run surfaces as a SystemError or a crash. A second signal
    interrupts at once."""

    def handle(signum, frame):
        if progress.task is None or progress.stop_requested:
            raise KeyboardInterrupt
        progress.stop_requested = True

    return handle


@app.command("convert")
def convert_command(
    source: str = typer.Argument(..., help="Hub repo id (org/name) or local checkpoint folder."),
    out: Path = typer.Option(..., "--out", "-o", help="Output .zse file."),
    revision: Optional[str] = typer.Option(None, help="Hub branch, tag or commit (default: main)."),
    group_size: int = typer.Option(128, "--group-size", "-g",
                                   help="INT4 group size along the input dimension: 32, 64, 96 or "
                                        "128 (q/k/v: see --group-size-for)."),
    group_size_for: Optional[list[str]] = typer.Option(
        None, "--group-size-for", metavar="KIND=SIZE", callback=_check_group_size_overrides,
        help="Group size for one projection kind instead of --group-size, e.g. down_proj=32 "
             f"(repeatable; kinds: {', '.join(QUANTIZED_PARTS)}). Default: "
             f"{', '.join(f'{k}={v}' for k, v in DEFAULT_GROUP_SIZE_FOR.items())}; "
             "qkv=128 with -g 128 quantizes every kind alike. See docs/quality.md."),
    lm_head: str = typer.Option("float16", help="lm_head precision: float16 or int4 (4x smaller, "
                                "measurably worse: see the README)."),
    embedding: str = typer.Option("float16", help="Embedding table precision: float16 or int4."),
    clip_search: bool = typer.Option(True, "--clip-search/--no-clip-search",
                                     help="Search per-group clipping (default) or plain min/max "
                                          "round-to-nearest."),
    column_weights: bool = typer.Option(
        True, "--column-weights/--no-column-weights",
        help="Weight down_proj's clipping search by its inputs' mean square, estimated from the "
             "checkpoint's gate and up rows (default; no calibration text). See docs/quality.md."),
    gptq: bool = typer.Option(False, "--gptq/--no-gptq",
                              help="Quantize the decoder layers with GPTQ against calibration "
                                   "text (lower output error; slower: see docs/quality.md)."),
    awq: bool = typer.Option(False, "--awq/--no-awq",
                             help="Scale each projection's input channels by their calibration "
                                  "activations before quantizing (AWQ), folding the inverse into "
                                  "the norm or projection before; composes with --gptq. See "
                                  "docs/quality.md."),
    calibration: Optional[Path] = typer.Option(
        None, "--calibration", help="UTF-8 text file for --gptq and --awq (default: docstrings "
                                    "and source of Python standard-library modules, read from "
                                    "this interpreter)."),
    calibration_tokens: int = typer.Option(DEFAULT_TOKENS, "--calibration-tokens",
                                           help="Calibration tokens for --gptq and --awq, in "
                                                f"sequences of {WINDOW}."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
) -> None:
    """Convert a checkpoint into one .zse file (the default command)."""
    if not (gptq or awq) and (calibration is not None or calibration_tokens != DEFAULT_TOKENS):
        _fail("--calibration and --calibration-tokens apply only with --gptq or --awq")
    options = ConvertOptions(group_size=group_size,
                             group_size_overrides=_group_size_overrides(group_size_for),
                             clip_search=clip_search, column_weights=column_weights,
                             lm_head=lm_head,
                             embedding=embedding, revision=revision, gptq=gptq, awq=awq,
                             calibration=str(calibration) if calibration else None,
                             calibration_tokens=calibration_tokens)
    progress = _RichProgress()
    for signum in (signal.SIGINT, signal.SIGTERM):  # clean up the temp file on `kill` too
        signal.signal(signum, _stop_handler(progress))
    try:
        summary = run_convert(source, out, options, progress)
    except (SourceError, ValueError, OSError) as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted; no output was written", code=130)
    finally:
        progress.close()
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    table = Table(title=f"wrote {summary['output']}", show_header=False)
    rows = [
        ("source", f"{summary['source']}" + (f" @ {summary['commit']}" if summary["commit"] else "")),
        ("architecture", summary["architecture"]),
        ("parameters", f"{summary['parameters'] / 1e6:,.1f} M"),
        ("file size", f"{summary['file_bytes'] / 2**20:,.1f} MiB"),
        ("bits per weight", f"{summary['bits_per_weight']:.2f} overall, "
                            f"{summary['int4_bits_per_weight']:.2f} in INT4 tensors"),
        ("group size", str(summary["group_size"]) + "".join(
            f", {kind} {size}" for kind, size in summary["group_size_overrides"].items())),
        ("method", _method(summary)),
        ("weighted error vs RTN", str(summary["error_vs_round_to_nearest"])),
        ("time", f"{summary['seconds']:.1f} s ({summary['params_per_second'] / 1e6:.1f} M params/s)"),
    ]
    if summary["group_size_fallbacks"]:
        sizes = sorted(set(summary["group_size_fallbacks"].values()))
        rows.append(("group size fallback", f"{len(summary['group_size_fallbacks'])} tensors use "
                     f"{sizes} (input dim not divisible by the size requested)"))
    for key, value in rows:
        table.add_row(key, value)
    stdout.print(table)


def _method(summary: dict[str, Any]) -> str:
    search = "clipping search" if summary["clip_search"] else "round-to-nearest"
    if summary["search_column_weights"]:
        search += f" ({', '.join(summary['search_column_weights'])} columns weighted)"
    calibrated = summary["gptq"] or summary["awq"]
    if not calibrated:
        return search
    method = " + ".join(name for name in ("AWQ", "GPTQ") if summary[name.lower()])
    if not summary["gptq"]:
        method += f" ({search})"
    return f"{method} on {calibrated['tokens']} tokens of {calibrated['calibration']}"


def _open(file: Path) -> ZseFile:
    try:
        return ZseFile(file)
    except (ZseFormatError, OSError) as exc:
        _fail(str(exc))


def _inspect_data(zse: ZseFile) -> dict[str, Any]:
    manifest = dict(zse.manifest)
    tokenizer = dict(manifest["tokenizer"])
    tokenizer["tokenizer_json"] = f"<{len(tokenizer['tokenizer_json'].encode())} bytes>"
    manifest["tokenizer"] = tokenizer
    return {"file": str(zse.path), "header": zse.header.__dict__, "manifest": manifest}


@app.command()
def inspect(file: Path = typer.Argument(..., help=".zse file"),
            as_json: bool = typer.Option(False, "--json", help="Print header and manifest as JSON "
                                         "(tokenizer.json abbreviated).")) -> None:
    """Show a .zse file's header, model config, quantization and tensors."""
    with _open(file) as zse:
        data = _inspect_data(zse)
        if as_json:
            print(json.dumps(data, indent=2, ensure_ascii=False))
            return
        manifest = data["manifest"]
        info = Table(title=str(file), show_header=False)
        header = zse.header
        info.add_row("format", f"zse {header.version_major}.{header.version_minor}, "
                     f"{file.stat().st_size / 2**20:,.1f} MiB, data at {header.data_offset}")
        for section in ("model", "quantization", "provenance"):
            for key, value in manifest[section].items():
                info.add_row(f"{section}.{key}", json.dumps(value) if not isinstance(value, str)
                             else value)
        tok = manifest["tokenizer"]
        info.add_row("tokenizer", f"tokenizer.json {tok['tokenizer_json']}, chat template: "
                     f"{'yes' if tok['chat_template'] else 'no'}, bos {tok['bos_token_id']}, "
                     f"eos {tok['eos_token_ids']}")
        stdout.print(info)
        tensors = Table("name", "dtype", "shape", "layout", "group", "offset", "MiB",
                        title=f"{len(zse.tensors)} tensors")
        for t in sorted(zse.tensors.values(), key=lambda t: t.offset):
            tensors.add_row(t.name, t.dtype, "×".join(map(str, t.shape)), t.layout,
                            str(t.group_size or ""), str(t.offset), f"{t.nbytes / 2**20:.2f}")
        stdout.print(tensors)


@app.command()
def verify(file: Path = typer.Argument(..., help=".zse file"),
           as_json: bool = typer.Option(False, "--json", help="Print the result as JSON.")) -> None:
    """Validate the structure and recompute every tensor checksum; exit 1 on any mismatch."""
    with _open(file) as zse:
        bad = [{"tensor": info.name, "offset": zse.header.data_offset + info.offset,
                "expected": info.xxh64, "actual": actual} for info, actual in zse.iter_corrupt()]
        result = {"file": str(file), "tensors": len(zse.tensors), "corrupt": bad, "ok": not bad}
    if as_json:
        print(json.dumps(result, indent=2))
    elif bad:
        for item in bad:
            stderr.print(f"[red]checksum mismatch[/] {file}: tensor '{item['tensor']}' at byte "
                         f"{item['offset']}: expected {item['expected']}, got {item['actual']}",
                         highlight=False)
    else:
        stdout.print(f"{file}: OK ({len(zse.tensors)} tensors, all checksums match)")
    if bad:
        raise typer.Exit(1)


def entry() -> None:
    app(prog_name="zse-convert")


if __name__ == "__main__":
    sys.exit(entry())
