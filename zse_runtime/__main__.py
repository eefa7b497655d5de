"""`python -m zse_runtime MODEL.zse "prompt"`: stream a completion to the terminal.

    python -m zse_runtime smollm2.zse "The capital of France is" --max-tokens 32
    python -m zse_runtime smollm2.zse "Write a haiku about GPUs" --chat --temperature 0.7
    python -m zse_runtime s3://bucket/smollm2.zse "The capital of France is"
"""

from __future__ import annotations

import logging
import signal
import sys
import time

import typer

app = typer.Typer(add_completion=False)


class _StopOnSignal:
    """Ctrl-C ends generation after the current token: raising inside a running numba kernel
    (the default KeyboardInterrupt) can corrupt its dispatcher. A second Ctrl-C interrupts."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True


@app.command()
def main(
    model: str = typer.Argument(..., help=".zse file, or an s3://, https:// or hf:// URL"),
    prompt: str = typer.Argument(..., help="Prompt text (a user message with --chat)."),
    max_tokens: int = typer.Option(64, "--max-tokens", "-n", min=1),
    temperature: float = typer.Option(0.0, min=0.0, help="0 is greedy."),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0),
    top_k: int = typer.Option(0, min=0, help="0 keeps every token."),
    seed: int = typer.Option(0),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the model's chat template."),
    device: str = typer.Option("auto", help="auto, cuda or cpu."),
    max_model_len: int = typer.Option(None, help="Context length (default: min(model, 4096))."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log the start-up breakdown."),
) -> None:
    """Generate from a .zse file and print the text as it is produced."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from .engine import Engine, EngineError
    from .sampling import SamplingParams
    from .tokenizer import ChatTemplateError, IncrementalDecoder
    from .zsefile import ZseFormatError

    try:
        engine = Engine.open(model, device=device, max_model_len=max_model_len)
        ids = (engine.tokenizer.encode_chat([{"role": "user", "content": prompt}]) if chat
               else engine.tokenizer.encode(prompt))
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        decoder = IncrementalDecoder(engine.tokenizer)
        stop = _StopOnSignal()
        started, count = time.perf_counter(), 0
        for token in engine.generate(ids, max_tokens, params):
            count += 1
            sys.stdout.write(decoder.push(token))
            sys.stdout.flush()
            if stop.requested:
                break
        sys.stdout.write(decoder.flush() + "\n")
    except (EngineError, ZseFormatError, ChatTemplateError, OSError, ValueError,
            ImportError) as exc:  # ImportError: a URL whose extra is not installed
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    seconds = time.perf_counter() - started
    typer.echo(f"[{count} tokens in {seconds:.2f} s on {engine.device}, start-up "
               f"{engine.startup.total:.2f} s{', interrupted' if stop.requested else ''}]", err=True)
    if stop.requested:
        raise typer.Exit(130)


if __name__ == "__main__":
    app(prog_name="python -m zse_runtime")
