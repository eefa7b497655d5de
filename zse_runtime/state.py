"""What the HTTP layer and the loader thread share: the engine once it is ready, its status and
the Prometheus metrics.

Deliberately light (no HTTP framework, no numpy, no CUDA): `zse-run` creates this before it starts the
loader thread, and everything imported here sits on the critical path to the first token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from .scheduler import Scheduler


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
    engine: Any = None
    scheduler: Scheduler | None = None
    metrics: Metrics = field(default_factory=Metrics)
    created: int = field(default_factory=lambda: int(time.time()))

    def attach(self, engine) -> None:
        """Called by the loader thread once the engine is ready."""
        from .scheduler import Scheduler

        self.engine = engine
        self.scheduler = Scheduler(engine, self.max_waiting, on_step=self._observe)
        for stage, seconds in engine.startup.stages.items():
            self.metrics.startup.labels(stage).set(seconds)
        self.status = "ready"

    def _observe(self, scheduler: Scheduler) -> None:
        running, waiting = scheduler.counts
        self.metrics.running.set(running)
        self.metrics.waiting.set(waiting)
        self.metrics.kv_usage.set(running / self.engine.slots)

    @property
    def healthy(self) -> bool:
        return self.status == "ready" and not (self.scheduler and self.scheduler.failed)
