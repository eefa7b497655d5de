"""`zse-run FILE --port 8000`: serve a .zse over the OpenAI API.

FILE may also be a URL: `s3://bucket/model.zse` (or any installed fsspec protocol),
`https://...` or `hf://org/repo[@revision]/model.zse`, with `--cache-dir` to keep a verified copy.

Start-up order is the point: the engine starts loading (CUDA context, manifest, weights) on a
thread first, then the HTTP stack is imported and bound, so /health answers 503 within a
fraction of a second and flips to 200 the moment the weights are in place.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False)
log = logging.getLogger("zse")


def _load(state, path: str, open_options: dict, on_failure, imported: threading.Event) -> None:
    """Open the engine (Engine.open's keyword arguments in `open_options`) and attach it."""
    from .gpu.starter import ContextStarter

    # the context's driver calls run while the engine's modules import
    context_starter = ContextStarter() if open_options["device"] != "cpu" else None
    from .source import redact

    try:
        try:
            from .engine import Engine

            log.info("engine modules imported %.2f s since process start",
                     time.perf_counter() - _PROCESS_START)
        finally:
            imported.set()
        state.attach(Engine.open(path, context_starter=context_starter, **open_options))
        log.info("ready in %.2f s since process start (%s)",
                 time.perf_counter() - _PROCESS_START, state.engine.startup)
    except Exception as exc:  # noqa: BLE001 - any load failure ends the process, clearly
        state.status, state.error = "failed", f"{type(exc).__name__}: {exc}"
        log.error("could not load %s: %s", redact(path), exc)
        on_failure()
    finally:
        sys.setswitchinterval(_DEFAULT_SWITCH_INTERVAL_S)


_PROCESS_START = time.perf_counter()
_DEFAULT_SWITCH_INTERVAL_S = sys.getswitchinterval()
STARTUP_SWITCH_INTERVAL_S = 0.0005


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
    from .state import ServerState  # light: no HTTP stack, no engine, no CUDA

    default_name = Path(redact(file).rstrip("/").rpartition("/")[2] if is_url(file) else file).stem
    state = ServerState(served_model_name or default_name, api_key, max_waiting=max_queue)
    server_box: list = []

    def stop_server() -> None:
        while not server_box:
            time.sleep(0.01)
        server_box[0].should_exit = True

    engine_imported = threading.Event()
    # While the weights stream, the upload's reader threads need the GIL back after every read
    # and copy call, and this thread holds it importing the HTTP stack: a short switch interval
    # hands it over sooner. _load restores the default once the engine is ready.
    sys.setswitchinterval(STARTUP_SWITCH_INTERVAL_S)
    loader = threading.Thread(target=_load, name="zse-loader", daemon=True,
                              args=(state, file, dict(device=device, max_model_len=max_model_len,
                                                      slots=max_num_seqs, cache_dir=cache_dir,
                                                      batch_invariant=batch_invariant),
                                    stop_server, engine_imported))
    loader.start()
    # Imports hold the GIL: importing the HTTP stack beside the engine's imports would only slow
    # both. Once the engine's modules are in, its work (context creation, reads, copies) mostly
    # runs outside the GIL, and the HTTP stack imports while the weights stream.
    engine_imported.wait(timeout=10)

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
    server.run()
    if state.status == "failed":
        raise typer.Exit(1)


def entry() -> None:
    app(prog_name="zse-run")


if __name__ == "__main__":
    sys.exit(entry())
