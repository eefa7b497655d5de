"""The CUDA context, created on a thread from as early as the caller likes, and optionally a
local file's weights uploaded right after it.

Creating the context takes ~0.2 s on an H200 (importing cuda.bindings, cuInit, retaining the
primary context) and the upload of a 7B file's weights ~0.3-0.5 s from a warm page cache, both
mostly in calls that release the GIL, so they overlap the caller's own imports. `zse-run` starts
both before it imports the engine. This module imports nothing heavy itself.
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("zse")


class ContextStarter:
    def __init__(self, preload_path: str | None = None):
        """`preload_path`: a local .zse whose weights to upload once the context exists
        (loader.preload_local). A failed preload is dropped: the engine then uploads the file
        itself and reports whatever is wrong with it."""
        self.seconds = 0.0
        self.preload = None
        self._preload_path = preload_path
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
        if self._context is not None and self._preload_path is not None:
            try:
                from .loader import preload_local

                self.preload = preload_local(self._preload_path, self._context)
            except Exception as exc:  # noqa: BLE001 - the engine's own upload reports it
                log.info("no early upload of %s (%s); the engine uploads it", self._preload_path, exc)

    def result(self):
        """(context made current on the calling thread, None) or (None, why there is none),
        once the thread is done (the preload too, if any)."""
        self._thread.join()
        if self._context is not None:
            self._context.make_current()
        return self._context, self._error
