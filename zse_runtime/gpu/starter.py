"""The CUDA context, created on a thread from as early as the caller likes.

Creating it takes ~0.2 s on an H200 (importing cuda.bindings, cuInit, retaining the primary
context), mostly in driver calls that release the GIL, so it overlaps the caller's own imports
and the manifest read. `zse-run` starts it before it imports the engine. This module imports
nothing heavy itself.
"""

from __future__ import annotations

import threading
import time


class ContextStarter:
    def __init__(self):
        self.seconds = 0.0
        self._context = None
        self._error: str | None = None
        self._thread = threading.Thread(target=self._run, name="zse-cuda-context", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        started = time.perf_counter()
        try:
            from . import driver

            if driver.device_count() == 0:
                self._error = "no CUDA GPU is available (use --device cpu)"
            else:
                self._context = driver.Context(0)
        except ImportError as exc:
            self._error = f"the CUDA backend needs cuda-bindings: {exc}"
        except Exception as exc:  # noqa: BLE001 - reported by result()
            self._error = f"CUDA initialisation failed: {exc}"
        self.seconds = time.perf_counter() - started

    def result(self):
        """(context made current on the calling thread, None) or (None, why there is none)."""
        self._thread.join()
        if self._context is not None:
            self._context.make_current()
        return self._context, self._error
