"""`zse-run FILE --port 8000`: serve a .zse over the OpenAI API.

FILE may also be a URL: `s3://bucket/model.zse` (or any installed fsspec protocol),
`https://...` or `hf://org/repo[@revision]/model.zse`, with `--cache-dir` to keep a verified copy.

Start-up order is the point: the engine process is forked first and loads the model (manifest,
CUDA context, weights) while this process imports and binds the HTTP stack and builds the
tokenizer from the manifest the engine process hands over; /health answers 503 until both are
in place, then 200. (Building a large tokenizer holds this process's GIL for ~0.4 s, during
which the HTTP stack cannot answer at all; it starts as soon as the manifest arrives, because
building it after uvicorn was up measured no earlier answers and no earlier 200, H200.)
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False)
log = logging.getLogger("zse")


def _load(state, engine, on_failure) -> None:
    """Build the tokenizer from the manifest the engine process sends, then wait for the
    engine and start serving."""
    from .engine_process import EngineProcessError

    try:
        from .tokenizer import Tokenizer

        manifest = engine.wait_manifest()
        started = time.perf_counter()
        tokenizer = Tokenizer(manifest["tokenizer"])
        built = time.perf_counter()
        log.info("tokenizer built %.2f s since process start", built - _PROCESS_START)
        info = engine.wait_ready()
        # the tokenizer is built here while the engine process loads: it ran beside that
        stages = {**info["stages"], "tokenizer (overlapped)": built - started}
        state.ready(engine, tokenizer, info["max_model_len"], manifest["vocab_size"],
                    info["slots"], stages)
        log.info("ready in %.2f s since process start (%s)", time.perf_counter() - _PROCESS_START,
                 ", ".join(f"{stage} {seconds * 1000:.0f} ms" for stage, seconds in stages.items()))
    except Exception as exc:  # noqa: BLE001 - any load failure ends the process, clearly
        state.status, state.error = "failed", f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, EngineProcessError):  # the engine process logged its own
            log.error("could not serve: %s", exc)
        on_failure()


_PROCESS_START = time.perf_counter()


@app.command()
def main(
    file: str = typer.Argument(..., help=".zse model file, or an s3://, gs://, https:// or "
                               "hf://org/repo[@rev]/file.zse URL"),
    host: str = typer.Option("127.0.0.1", help="Bind address (0.0.0.0 to expose)."),
    port: int = typer.Option(8000, min=0, max=65535),
    device: str = typer.Option("auto", help="auto, cuda or cpu."),
    max_model_len: Optional[int] = typer.Option(None, help="Context length (default min(model, 4096))."),
    max_num_seqs: int = typer.Option(8, min=1, max=32, help="Concurrent sequences (KV-cache slots)."),
    max_queue: int = typer.Option(64, min=1, help="Requests that may wait for a slot; more get 503."),
    served_model_name: Optional[str] = typer.Option(None, help="Model id in the API (default: file stem)."),
    api_key: Optional[str] = typer.Option(None, envvar="ZSE_API_KEY",
                                          help="Require 'Authorization: Bearer KEY' (or ZSE_API_KEY)."),
    grace_period: float = typer.Option(30.0, help="Seconds in-flight requests may take after SIGTERM."),
    log_level: str = typer.Option("info", help="debug, info, warning or error."),
    cache_dir: Optional[Path] = typer.Option(
        None, help="Keep a verified copy of a remote FILE here; reused while its ETag or "
        "revision is unchanged."),
    batch_invariant: bool = typer.Option(
        False, "--batch-invariant",
        help="Give every request exactly the tokens it would get alone: each prompt is "
        "prefilled on its own, and decode batches of more than 8 sequences stay on the kernels "
        "whose per-token arithmetic does not depend on the batch (slower at high concurrency)."),
) -> None:
    """Serve FILE through an OpenAI-compatible HTTP API."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .source import is_url, redact

    if not is_url(file) and not Path(file).is_file():
        typer.echo(f"error: {file} is not a file", err=True)
        raise typer.Exit(1)
    if not hasattr(os, "fork"):
        typer.echo("error: zse-run forks its engine into a process of its own and needs a POSIX "
                   "system (Linux, macOS); `python -m zse_runtime` runs a model in one process",
                   err=True)
        raise typer.Exit(1)
    # First, before any thread exists or anything the engine does not need is imported: the
    # engine gets a process of its own (engine_process.py says why), which loads the model while
    # this one imports the HTTP stack and builds the tokenizer.
    from .engine_process import EngineProcess

    engine = EngineProcess.start(file, dict(device=device, max_model_len=max_model_len,
                                            slots=max_num_seqs, cache_dir=cache_dir,
                                            batch_invariant=batch_invariant),
                                 max_waiting=max_queue, process_start=_PROCESS_START)
    from .state import ServerState  # no HTTP stack, no engine, no CUDA

    default_name = Path(redact(file).rstrip("/").rpartition("/")[2] if is_url(file) else file).stem
    state = ServerState(served_model_name or default_name, api_key, max_waiting=max_queue)
    engine.on_step = state.observe  # before any request: the loader attaches the engine later
    server_box: list = []

    def stop_server() -> None:
        while not server_box:
            time.sleep(0.01)
        server_box[0].should_exit = True

    threading.Thread(target=_load, name="zse-loader", daemon=True,
                     args=(state, engine, stop_server)).start()

    import uvicorn

    from .server import create_app

    config = uvicorn.Config(create_app(state), host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=grace_period, access_log=False)
    log.info("HTTP stack imported %.2f s since process start", time.perf_counter() - _PROCESS_START)
    server = uvicorn.Server(config)
    server_box.append(server)
    # uvicorn drains on SIGTERM/SIGINT, restores these handlers, then re-raises the signal:
    # after a completed drain that means a clean exit, status 0.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: sys.exit(0))
    try:
        server.run()
    finally:
        if state.scheduler is None:  # never served: the lifespan did not stop the engine
            engine.stop()
    if state.status == "failed":
        raise typer.Exit(1)


def entry() -> None:
    app(prog_name="zse-run")


if __name__ == "__main__":
    sys.exit(entry())
