"""What a generation request is and what comes back from it: the types the HTTP layer and the
scheduler exchange, in one process or across the engine process's pipe (engine_process.py).

Light on purpose (no numpy, no engine): zse-run's HTTP process imports it, and everything it
imports before /health turns 200 is start-up time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings of one request; sampling.py defines what each means."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class TokenEvent:
    token: int
    logprob: Optional[float] = None
    top_logprobs: Optional[list[tuple[int, float]]] = None


@dataclass
class FinishEvent:
    reason: str  # "stop" | "length" | "cancelled" | "error"
    message: str = ""


Event = TokenEvent | FinishEvent


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    emit: Optional[Callable[[Event], None]]
    stop_token_ids: frozenset[int] = frozenset()
    logprobs: Optional[int] = None  # None: none; k: the chosen token's and the top k
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # state, owned by the engine thread
    slot: int = -1
    prefilled: int = 0
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    arrived: float = field(default_factory=time.perf_counter)

    @property
    def needs_host_logits(self) -> bool:
        return (self.logprobs is not None or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)


class QueueFull(Exception):
    pass


def check_room(held: int, slots: int, max_waiting: int) -> None:
    """The admission rule, the same in and out of process: a request is refused when the
    requests already held (running or waiting, not yet finished) fill every KV slot and
    `max_waiting` more."""
    if held >= slots + max_waiting:
        raise QueueFull(f"{held} requests are running or waiting ({slots} slots + "
                        f"{max_waiting} waiting)")


class Serving(Protocol):
    """What the HTTP layer asks of whatever runs its requests: a Scheduler over an engine in
    the same process, or zse-run's EngineProcess over the engine process's socket."""

    failed: Optional[str]  # set once serving has failed for good (/health turns 503)

    def submit(self, request: Request) -> None:
        """Queue `request`; raises QueueFull, or RuntimeError once serving has failed."""

    def cancel(self, request: Request) -> None: ...

    def stop(self) -> None: ...

    @property
    def counts(self) -> tuple[int, int]:
        """(running, waiting)"""
