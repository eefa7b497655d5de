"""What the HTTP layer and the loader thread share: the scheduler and tokenizer once the engine
is ready, its status and the Prometheus metrics.

Deliberately light (no HTTP framework, no numpy, no CUDA): `zse-run` creates this before it starts the
loader thread, and everything imported here sits on the critical path to the first token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .protocol import Serving


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("zse_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("zse_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("zse_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("zse_time_to_first_token_seconds", "Request arrival to first token", registry=r,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.itl = Histogram("zse_inter_token_latency_seconds", "Time between tokens of a stream", registry=r,
                             buckets=(0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        self.running = Gauge("zse_requests_running", "Sequences holding a KV slot", registry=r)
        self.waiting = Gauge("zse_requests_waiting", "Sequences queued for a slot", registry=r)
        self.kv_usage = Gauge("zse_kv_cache_usage_ratio", "Fraction of KV-cache slots in use", registry=r)
        self.startup = Gauge("zse_startup_seconds", "Start-up time by stage", ["stage"], registry=r)


@dataclass
class ServerState:
    model_name: str
    api_key: str | None
    max_waiting: int
    status: str = "loading"  # loading | ready | failed
    error: str | None = None
    # set once the engine is ready
    scheduler: Serving | None = None
    tokenizer: Any = None
    max_model_len: int | None = None
    vocab_size: int | None = None
    slots: int = 1
    metrics: Metrics = field(default_factory=Metrics)
    created: int = field(default_factory=lambda: int(time.time()))

    def attach(self, engine) -> None:
        """Serve an engine opened in this process."""
        from .scheduler import Scheduler

        scheduler = Scheduler(engine, self.max_waiting, on_step=self.observe)
        self.ready(scheduler, engine.tokenizer, engine.max_model_len, engine.config.vocab_size,
                   engine.slots, engine.startup.stages)

    def ready(self, scheduler: Serving, tokenizer, max_model_len: int, vocab_size: int, slots: int,
              stages: dict[str, float]) -> None:
        """Start serving: from here on requests go to `scheduler`."""
        self.scheduler, self.tokenizer = scheduler, tokenizer
        self.max_model_len, self.vocab_size, self.slots = max_model_len, vocab_size, slots
        for stage, seconds in stages.items():
            self.metrics.startup.labels(stage).set(seconds)
        self.status = "ready"

    def observe(self, scheduler: Serving) -> None:
        """The queue gauges, after each step (in process) or each batch of events."""
        running, waiting = scheduler.counts
        self.metrics.running.set(running)
        self.metrics.waiting.set(waiting)
        self.metrics.kv_usage.set(running / self.slots)

    @property
    def healthy(self) -> bool:
        return self.status == "ready" and not (self.scheduler and self.scheduler.failed)
