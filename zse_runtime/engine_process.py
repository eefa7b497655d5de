"""zse-run's engine in a process of its own, beside the HTTP process.

Why two processes: a Python process runs one thread at a time, and most of zse-run's start-up
needs the GIL: the engine's imports (numpy, the backend), the HTTP stack's, and building the
model's tokenizer (tokenizers' `from_str` holds the GIL for the whole 0.37-0.57 s that Qwen2.5's
151k-token tokenizer takes on the H200 host). In one process they ran one after another; here
the engine process imports, reads the manifest and uploads the weights while the HTTP process
imports its stack and builds the tokenizer. While serving, streaming responses no longer takes
the GIL from the thread that stages the next decode step.

The HTTP process forks this one first thing, before it starts a thread or imports anything
heavy: the child starts from a copy of the CLI's few modules, with no second interpreter start.
They talk over a socket pair, one pickled message per send:

    HTTP -> engine   ("submit", rid, request)  the Request, without its callback
                     ("cancel", rid)
                     ("stop",)                 finish what runs as cancelled, then exit
    engine -> HTTP   ("manifest", info)        the tokenizer section, vocabulary size
                     ("ready", info)           slots, device, context length, start-up stages
                     ("events", [(rid, event)...], running, waiting, failed)
                     ("failed", message)       the engine did not load; the process exits 1

The engine process ignores SIGINT and SIGTERM: the HTTP process drains its requests first and
then sends "stop". It exits by itself when the socket closes, and on Linux is killed the moment
the HTTP process dies (PR_SET_PDEATHSIG), loading or not; the HTTP process reports an engine
process that died as a failed engine (/health 503).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import signal
import socket
import threading
import time
from multiprocessing.connection import Connection
from typing import Any, Callable

from .protocol import Event, FinishEvent, Request, check_room

log = logging.getLogger("zse")


class EngineProcessError(RuntimeError):
    """The engine process could not load the model, or is gone."""


class EngineProcess:
    """The HTTP process's handle on the engine process: `protocol.Serving` (what a Scheduler
    offers the HTTP layer) over the socket, plus the two start-up messages."""

    @classmethod
    def start(cls, path: str, open_options: dict[str, Any], max_waiting: int,
              process_start: float) -> "EngineProcess":
        """Fork the engine process. Call it from the main thread before this process starts
        any other: a fork copies only the calling thread (a lock another thread held would stay
        locked), and on Linux the engine process is killed when the forking thread ends."""
        ours, theirs = socket.socketpair()
        pid = os.fork()
        if pid == 0:  # the engine process: never returns into the caller's code
            ours.close()
            _die_with_parent(os.getppid())
            status = 1
            try:
                status = _serve(Connection(theirs.detach()), path, open_options, max_waiting,
                                process_start)
            except BaseException:  # noqa: BLE001 - logged; the exit status says it failed
                log.exception("the engine process failed")
            finally:
                logging.shutdown()
                os._exit(status)
        theirs.close()
        log.info("engine process %d started", pid)
        return cls(pid, Connection(ours.detach()), max_waiting)

    def __init__(self, pid: int, conn: Connection, max_waiting: int):
        self.pid = pid
        self.max_waiting = max_waiting
        # called with this object after each batch of events (zse-run: the queue gauges)
        self.on_step: Callable[["EngineProcess"], None] = lambda process: None
        self.failed: str | None = None  # set once serving has failed; /health turns 503
        self.counts: tuple[int, int] = (0, 0)  # (running, waiting) at the last events
        self.slots = 0
        self._conn = conn
        self._send_lock = threading.Lock()
        self._ids = itertools.count()
        self._requests: dict[int, Request] = {}  # rid -> request, until its finish event
        self._rid_of: dict[int, int] = {}  # id(request) -> rid
        self._manifest: dict[str, Any] | None = None
        self._ready: dict[str, Any] | None = None
        self._load_error: str | None = None
        self._manifest_seen = threading.Event()
        self._ready_seen = threading.Event()
        self._stopping = False
        self._reader = threading.Thread(target=self._read, name="zse-engine-reader", daemon=True)
        self._reader.start()

    # -- start-up ------------------------------------------------------------------------------

    def wait_manifest(self) -> dict[str, Any]:
        """{"tokenizer": the manifest's tokenizer section, "vocab_size"}, as soon as the engine
        process has read and checked the manifest (before it imports the engine)."""
        self._manifest_seen.wait()
        if self._manifest is None:
            raise EngineProcessError(self._load_error)
        return self._manifest

    def wait_ready(self) -> dict[str, Any]:
        """{"slots", "device", "max_model_len", "stages": seconds per start-up stage}, once the
        engine serves."""
        self._ready_seen.wait()
        if self._ready is None:
            raise EngineProcessError(self._load_error)
        return self._ready

    # -- the scheduler's interface ---------------------------------------------------------------

    def submit(self, request: Request) -> None:
        """Queue `request`; its events reach `request.emit` from this object's reader thread.
        Raises QueueFull (the same rule as Scheduler.submit) or RuntimeError after a failure."""
        with self._send_lock:
            if self.failed:
                raise RuntimeError(f"the engine failed: {self.failed}")
            check_room(len(self._requests), self.slots, self.max_waiting)
            rid = next(self._ids)
            self._requests[rid] = request
            self._rid_of[id(request)] = rid
            self._conn.send(("submit", rid, dataclasses.replace(request, emit=None)))

    def cancel(self, request: Request) -> None:
        rid = self._rid_of.get(id(request))
        if rid is not None:  # not finished yet
            self._send(("cancel", rid))

    def stop(self, timeout: float = 10.0) -> None:
        """Let the engine process cancel what still runs and exit; kill it after `timeout`."""
        self._stopping = True
        self._send(("stop",))
        self._reader.join(timeout)
        if self._reader.is_alive():
            log.warning("the engine process did not stop in %.0f s; killing it", timeout)
            os.kill(self.pid, signal.SIGKILL)
            self._reader.join()

    # -- the reader thread -----------------------------------------------------------------------

    def _send(self, message: tuple) -> None:
        with self._send_lock:
            try:
                self._conn.send(message)
            except OSError:  # the engine process is gone; the reader reports why
                pass

    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "events":
                _, events, running, waiting, failed = message
                self.failed = self.failed or failed
                self.counts = (running, waiting)
                for rid, event in events:
                    self._dispatch(rid, event)
                self.on_step(self)
            elif kind == "manifest":
                self._manifest = message[1]
                self._manifest_seen.set()
            elif kind == "ready":
                self._ready = message[1]
                self.slots = self._ready["slots"]
                self._ready_seen.set()
            elif kind == "failed":
                self._load_error = message[1]
        self._conn.close()
        _, status = os.waitpid(self.pid, 0)
        if not self._stopping:
            why = self._load_error or f"the engine process exited ({_describe(status)})"
            if self._load_error is None:  # not a load failure, which it has logged itself
                log.error("%s", why)
                self._load_error = why
            self.failed = self.failed or why
            for rid in list(self._requests):
                self._dispatch(rid, FinishEvent("error", why))
        else:
            self._load_error = self._load_error or "the engine process was stopped"
        self._manifest_seen.set()
        self._ready_seen.set()

    def _dispatch(self, rid: int, event: Event) -> None:
        request = self._requests.get(rid)
        if request is None:
            return
        if isinstance(event, FinishEvent):
            del self._requests[rid]
            self._rid_of.pop(id(request), None)
        try:
            request.emit(event)
        except Exception:  # noqa: BLE001 - one broken consumer must not stop every stream
            log.exception("delivering an event of request %d failed", rid)


def _die_with_parent(parent: int) -> None:
    """Linux: be killed the moment the HTTP process dies, even in the middle of loading (the
    socket's EOF is only noticed between requests). Elsewhere the EOF alone ends this process."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):  # not Linux, or no prctl
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"status {os.waitstatus_to_exitcode(status)}"


# -- the engine process ----------------------------------------------------------------------------

def _serve(conn: Connection, path: str, open_options: dict[str, Any], max_waiting: int,
           process_start: float) -> int:
    """The engine process's whole life: load, then run the scheduler on what arrives."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    send_lock = threading.Lock()

    def send(message: tuple) -> None:
        with send_lock:
            conn.send(message)

    from .gpu.starter import ContextStarter, read_ahead
    from .source import open_zse, redact

    # the context's driver calls run while the manifest is read and the engine's modules import
    context_starter = ContextStarter() if open_options["device"] != "cpu" else None
    cache_dir = open_options.pop("cache_dir")
    try:
        # The manifest first, before the engine's imports (numpy alone is 0.3 s): the HTTP
        # process builds the tokenizer from it while this process imports and uploads.
        started = time.perf_counter()
        zse, manifest_stage = open_zse(path, cache_dir)
        manifest_seconds = time.perf_counter() - started
        if context_starter is not None:
            read_ahead(zse)
        send(("manifest", {"tokenizer": zse.manifest["tokenizer"],
                           "vocab_size": zse.model_config["vocab_size"]}))
        from .engine import Engine

        log.info("engine modules imported %.2f s since process start",
                 time.perf_counter() - process_start)
        engine = Engine.open(zse, context_starter=context_starter, load_tokenizer=False,
                             **open_options)
    except Exception as exc:  # noqa: BLE001 - any load failure ends the process, clearly
        log.error("could not load %s: %s", redact(path), exc)
        send(("failed", f"{type(exc).__name__}: {exc}"))
        return 1
    from .scheduler import Scheduler

    requests: dict[int, Request] = {}  # rid -> request, until its finish event
    rid_of: dict[int, int] = {}  # id(request) -> rid

    def deliver(events: list[tuple[Request, Event]]) -> None:
        batch = []
        for request, event in events:
            rid = rid_of[id(request)]
            if isinstance(event, FinishEvent):
                del rid_of[id(request)], requests[rid]
            batch.append((rid, event))
        running, waiting = scheduler.counts
        send(("events", batch, running, waiting, scheduler.failed))

    # The HTTP process applies the admission rule; it counts a request until its finish event
    # arrives there, so it never holds fewer than this process and never sends one too many.
    scheduler = Scheduler(engine, max_waiting, deliver=deliver)
    send(("ready", {"slots": engine.slots, "device": engine.device,
                    "max_model_len": engine.max_model_len,
                    "stages": {manifest_stage: manifest_seconds, **engine.startup.stages}}))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the HTTP process is gone
            break
        if message[0] == "submit":
            _, rid, request = message
            requests[rid], rid_of[id(request)] = request, rid
            try:
                scheduler.submit(request)
            except Exception as exc:  # noqa: BLE001 - the engine failed meanwhile
                deliver([(request, FinishEvent("error", str(exc)))])
        elif message[0] == "cancel":
            request = requests.get(message[1])
            if request is not None:
                scheduler.cancel(request)
        elif message[0] == "stop":
            break
    scheduler.stop()
    conn.close()
    return 0
