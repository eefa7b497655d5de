"""Continuous batching: requests join and leave the running batch between decode steps.

One engine thread loops: admit waiting requests into free KV slots, run at most one prefill
chunk (so a long prompt stalls running streams for one chunk, not its whole length; several
short prompts share one), then one decode step for every running sequence. Tokens go back
through each request's `emit` callback (the HTTP layer hands them to its event loop). The
scheduler never touches HTTP; the engine never schedules.

While the same requests keep decoding, each step is begun before the previous one ends, its
tokens FED from that step on the device (`Engine.launches_ahead`), so the GPU runs the steps
back to back; a request that stops meanwhile has its extra row dropped. When requests join or
leave, the step in flight is ended first and the next one begun from the host's ids.

Events are handed out while the GPU runs the next decode step, not as soon as they are known:
the HTTP thread wakes on them and holds the GIL while it streams them, and the engine thread
needs the GIL to stage the next step (H200, 32 streams: a step took 1.3 ms longer in the
server than in process when the two collided). Before any other wait (a prefill forward, an
empty queue) they go out at once.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Callable

import numpy as np

from .engine import FED, PREFILL_CHUNK, Engine
from .model import Batch
from .protocol import Event, FinishEvent, QueueFull, Request, TokenEvent, check_room
from .sampling import sample

__all__ = ["Scheduler", "Request", "TokenEvent", "FinishEvent", "QueueFull"]

log = logging.getLogger("zse")


class Scheduler:
    def __init__(self, engine: Engine, max_waiting: int, on_step: Callable | None = None,
                 deliver: Callable[[list[tuple[Request, Event]]], None] | None = None):
        """`deliver` hands out a batch of held events in order (default: each request's
        `emit`); the engine process sends each batch to the HTTP process as one message."""
        self.engine = engine
        self.max_waiting = max_waiting
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.on_step = on_step or (lambda scheduler: None)
        self.deliver = deliver or _emit_each
        self.failed: str | None = None
        self._events: list[tuple[Request, Event]] = []  # not yet delivered
        self._ahead: list[Request] | None = None  # the requests of a decode step still running
        self._wake = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="zse-engine", daemon=True)
        self._thread.start()

    # -- called from other threads ----------------------------------------------------------

    def submit(self, request: Request) -> None:
        with self._wake:
            if self.failed:
                raise RuntimeError(f"the engine failed: {self.failed}")
            check_room(len(self.running) + len(self.waiting), self.engine.slots, self.max_waiting)
            self.waiting.append(request)
            self._wake.notify()

    def cancel(self, request: Request) -> None:
        request.cancelled = True  # acted on between steps, by the engine thread
        with self._wake:
            self._wake.notify()

    def stop(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout=10)

    @property
    def counts(self) -> tuple[int, int]:
        """(running, waiting)"""
        return len(self.running), len(self.waiting)

    # -- the engine thread ------------------------------------------------------------------

    def _loop(self) -> None:
        self.engine.bind_thread()  # this thread drives the device from now on
        while True:
            with self._wake:
                if not self._stop and not self.waiting and not self.running:
                    self._flush()
                while not self._stop and not self.waiting and not self.running:
                    self._wake.wait()
                if self._stop:
                    break
                self._admit()
            try:
                self._drop_cancelled()
                self._prefill_chunk()
                self._decode_step()
            except Exception as exc:  # noqa: BLE001 - a failed step fails its requests, not the server
                log.exception("engine step failed")
                self.failed = f"{type(exc).__name__}: {exc}"
                for request in self.running + list(self.waiting):
                    self._finish(request, FinishEvent("error", self.failed))
                self.running.clear()
                self.waiting.clear()
                break
            self.on_step(self)
        if not self.failed:
            self.engine.discard_steps()  # a step begun ahead of a stop
        for request in self.running + list(self.waiting):
            self._finish(request, FinishEvent("cancelled", "the server is shutting down"))
        self._flush()

    def _emit(self, request: Request, event: Event) -> None:
        self._events.append((request, event))

    def _flush(self) -> None:
        """Deliver the held events, in the order they happened."""
        events, self._events = self._events, []
        if events:
            self.deliver(events)

    def _admit(self) -> None:
        while self.waiting and self.engine.free_slots:
            request = self.waiting.popleft()
            if request.cancelled:
                self._emit(request, FinishEvent("cancelled"))
                continue
            request.slot = self.engine.acquire_slot()
            self.running.append(request)

    def _finish(self, request: Request, event: FinishEvent) -> None:
        if request.slot >= 0:
            self.engine.release_slot(request.slot)
            request.slot = -1
        self._emit(request, event)

    def _drop_cancelled(self) -> None:
        for request in [r for r in self.running if r.cancelled]:
            self.running.remove(request)
            self._finish(request, FinishEvent("cancelled"))

    def _prefill_chunk(self) -> None:
        """One prefill forward over the next PREFILL_CHUNK prompt tokens of the requests that
        have any left, in arrival order; a request whose prompt ends in the chunk samples its
        first token from it. Several prompts share a chunk (one forward instead of one each)
        unless the engine is batch-invariant: there a chunk holds one request's tokens, split
        exactly as Engine.generate splits a prompt, so the request computes as it would alone."""
        pending = [r for r in self.running if r.prefilled < len(r.prompt_ids)]
        if not pending:
            return
        if self.engine.batch_invariant:
            pending = pending[:1]
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        taken: list[tuple[Request, int]] = []
        done: list[Request] = []
        rows: list[int] = []  # each done request's last prompt token in the chunk
        for request in pending:
            room = PREFILL_CHUNK - len(tokens)
            if room == 0 or len(done) == self.engine.max_logit_rows:
                break
            start = request.prefilled
            chunk = request.prompt_ids[start:start + room]
            tokens += chunk
            positions += range(start, start + len(chunk))
            slots += [request.slot] * len(chunk)
            taken.append((request, len(chunk)))
            if start + len(chunk) == len(request.prompt_ids):
                done.append(request)
                rows.append(len(tokens) - 1)
        self._flush()  # the forward holds this thread for the whole chunk
        logits = self.engine.forward(Batch.of(tokens, positions, slots,
                                              rows or [len(tokens) - 1]))
        for request, count in taken:
            request.prefilled += count
        if done:
            self._accept(done, self._choose(done, logits))

    def _decode_step(self) -> None:
        batch = [r for r in self.running if r.prefilled == len(r.prompt_ids) and r.generated]
        current, self._ahead = self._ahead, None
        if current is None:  # no step running: begin one from the ids on the host
            if not batch:
                return
            if any(r.needs_host_logits for r in batch):
                self._flush()
                logits = self.engine.forward(Batch.of(
                    [r.generated[-1] for r in batch], [_position(r) for r in batch],
                    [r.slot for r in batch], np.arange(len(batch))))
                self._accept(batch, self._choose(batch, logits))
                return
            # the fast path: a replayed graph on a GPU, only the ids come back
            self._begin(batch, [r.generated[-1] for r in batch], 0)
            current = batch
        if self._continues(current, batch):
            self._begin(batch, [FED] * len(batch), 1)
            self._ahead = batch
        self._flush()  # the previous step's events, while the GPU runs this one
        ids = self.engine.end_step()
        self._accept(current, [TokenEvent(int(i)) for i in ids])

    def _begin(self, batch: list[Request], tokens: list[int], later: int) -> None:
        """Begin the decode step that feeds `tokens`, `later` steps after each request's last
        accepted token."""
        self.engine.begin_step(tokens, [_position(r) + later for r in batch],
                               [r.slot for r in batch], [r.params for r in batch],
                               [len(r.generated) + later for r in batch])

    def _continues(self, current: list[Request], batch: list[Request]) -> bool:
        """Whether the next step may be begun before `current` ends: the engine runs steps
        ahead, the requests are the ones decoding now (none joined or left), and none of them
        can finish at this step but by a stop id."""
        return (self.engine.launches_ahead and len(current) == len(batch)
                and all(a is b for a, b in zip(current, batch))
                and all(not r.cancelled and len(r.generated) + 1 < r.max_tokens
                        and _position(r) + 2 < self.engine.max_model_len for r in batch))

    def _choose(self, requests: list[Request], logits) -> list[TokenEvent]:
        """Sample one token per request from its logits row."""
        if not any(r.needs_host_logits for r in requests):
            ids = self.engine.sample(logits, [r.params for r in requests],
                                     [len(r.generated) for r in requests])
            return [TokenEvent(int(i)) for i in ids]
        rows = np.asarray(self.engine.ops.to_host(logits), np.float32)
        events = []
        for request, row in zip(requests, rows):
            row = _apply_penalties(row.copy(), request)
            token = sample(row, request.params, len(request.generated))
            event = TokenEvent(token)
            if request.logprobs is not None:
                logprobs = row - (row.max() + np.log(np.exp(row - row.max()).sum()))
                event.logprob = float(logprobs[token])
                if request.logprobs:
                    top = np.argpartition(-logprobs, request.logprobs)[:request.logprobs]
                    top = top[np.argsort(-logprobs[top], kind="stable")]
                    event.top_logprobs = [(int(i), float(logprobs[i])) for i in top]
            events.append(event)
        return events

    def _accept(self, requests: list[Request], events: list[TokenEvent]) -> None:
        for request, event in zip(requests, events):
            if request.cancelled or request.slot < 0:
                continue  # dropped before the next step, or stopped before a step run ahead
            request.generated.append(event.token)
            self._emit(request, event)
            length = len(request.prompt_ids) + len(request.generated)
            if event.token in request.stop_token_ids:
                reason = "stop"
            elif len(request.generated) >= request.max_tokens or length >= self.engine.max_model_len:
                reason = "length"
            else:
                continue
            self.running.remove(request)
            self._finish(request, FinishEvent(reason))


def _position(request: Request) -> int:
    """The position of a decoding request's last token, the one its next step feeds."""
    return len(request.prompt_ids) + len(request.generated) - 1


def _apply_penalties(logits: np.ndarray, request: Request) -> np.ndarray:
    """OpenAI's presence and frequency penalties over the tokens generated so far."""
    if request.generated and (request.presence_penalty or request.frequency_penalty):
        tokens, counts = np.unique(np.asarray(request.generated), return_counts=True)
        logits[tokens] -= request.frequency_penalty * counts + request.presence_penalty
    return logits


def _emit_each(events: list[tuple[Request, Event]]) -> None:
    for request, event in events:
        request.emit(event)
