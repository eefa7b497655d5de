"""Engine: open a `.zse`, own the KV-cache slots, generate tokens.

    engine = Engine.open("model.zse", device="cpu", max_model_len=2048, slots=4)
    engine = Engine.open("s3://bucket/model.zse", cache_dir="/var/cache/zse")
    for token in engine.generate("The capital of France is", max_tokens=8):
        ...
"""

from __future__ import annotations

import logging
import os
import secrets
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .config import ModelConfig
from .gpu.starter import ContextStarter, read_ahead
from .model import Batch, Decoder
from .sampling import SamplingParams
from .source import open_zse
from .zsefile import ZseFile

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

log = logging.getLogger("zse")

PREFILL_CHUNK = 512  # prompt tokens per forward pass: bounds activation memory
DEFAULT_MAX_MODEL_LEN = 4096
DEVICES = ("auto", "cpu", "cuda")
# a decode step's token that is the id its row chose in the step begun just before: a step may
# be begun before that one's ids are collected (Engine.launches_ahead)
FED = -1


@dataclass
class StartupTimes:
    """Seconds per start-up stage, in the order they ran."""

    stages: dict[str, float] = field(default_factory=dict)

    def mark(self, stage: str, since: float) -> float:
        now = time.perf_counter()
        self.stages[stage] = now - since
        return now

    @property
    def total(self) -> float:
        """Seconds on the critical path (stages marked overlapped ran beside others)."""
        return sum(v for k, v in self.stages.items() if "overlapped" not in k)

    def __str__(self) -> str:
        return ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in self.stages.items())


class EngineError(ValueError):
    pass


class DecodeStep:
    """A decode step begun by Engine.begin_step: its ids, once they are known."""

    __slots__ = ("ids",)

    def __init__(self, ids: np.ndarray | None = None):
        self.ids = ids


class Engine:
    def __init__(self, zse: ZseFile, ops, config: ModelConfig, tokenizer: Tokenizer | None,
                 device: str, slots: int, max_model_len: int, startup: StartupTimes):
        self.zse = zse
        self.ops = ops
        self.config = config
        self.tokenizer = tokenizer
        self.device = device
        self.max_model_len = max_model_len
        self.decoder = Decoder(config, ops)
        self.startup = startup
        self._slots = slots
        self._free_slots = list(range(slots))[::-1]
        # the steps begun and not yet ended, oldest first; a device's complete in that order
        self._pending: deque[DecodeStep] = deque()
        self.latest_step: DecodeStep | None = None  # the step a FED token refers to
        self._fed_rows = 0  # rows a FED token may name: the last step's, if nothing sampled since

    @classmethod
    def open(cls, path: str | Path | ZseFile, device: str = "auto",
             max_model_len: int | None = None, slots: int = 1,
             cache_dir: str | Path | None = None,
             context_starter: ContextStarter | None = None,
             batch_invariant: bool = False, load_tokenizer: bool = True) -> "Engine":
        """Validate the file, load it onto `device` ("cuda", "cpu", or "auto": a GPU if present)
        and get every kernel ready, so the first request runs at full speed.

        `path` may be a URL (s3://, gs://, https://, hf://...): the header and manifest come from
        one ranged read of the first MiB (a second when the manifest is longer) and the weights
        stream, verified, onto the device. With `cache_dir` a
        verified copy is kept there and reused while the object's ETag/commit is unchanged.
        `context_starter`: a CUDA context the caller began creating earlier (zse-run does, before
        it imports this module); otherwise it starts here, beside the manifest read.
        `batch_invariant`: on a GPU, decode every sequence with the same arithmetic at any batch
        size (the GEMV token tiles throughout) and let the scheduler prefill one prompt per chunk,
        so a request's tokens do not depend on what else runs; otherwise decode batches of more
        than 8 sequences multiply on tensor cores, with float16 activations, and prompts share
        prefill chunks (faster). The CPU backend is batch-invariant anyway.
        `path` may also be a ZseFile opened with `source.open_zse` (then `cache_dir` is unused
        and the manifest read is not among the start-up stages): zse-run's engine process opens
        the file before it imports this module, to hand the tokenizer to its HTTP process early.
        `load_tokenizer=False`: token ids in and out only (engine.tokenizer is None); zse-run's
        engine process, whose HTTP process tokenizes."""
        started = time.perf_counter()
        startup = StartupTimes()
        if device not in DEVICES:
            raise EngineError(f"device must be one of {DEVICES}, got {device!r}")
        if slots < 1:
            raise EngineError(f"slots must be >= 1, got {slots}")
        if device == "cpu":
            context_starter = None
        elif context_starter is None:
            context_starter = ContextStarter()  # overlaps the manifest read
        if isinstance(path, ZseFile):  # opened by the caller, with source.open_zse
            zse, t = path, started
        else:
            zse, manifest_stage = open_zse(path, cache_dir)
            t = startup.mark(manifest_stage, started)
            if context_starter is not None:
                read_ahead(zse)
        config = ModelConfig.from_manifest(zse.model_config)
        max_len = max_model_len or min(config.max_position_embeddings, DEFAULT_MAX_MODEL_LEN)
        if not 0 < max_len <= config.max_position_embeddings:
            raise EngineError(f"max_model_len {max_len} must be in 1..{config.max_position_embeddings}")
        context = _context(context_starter, required=device == "cuda")
        if context is not None:
            startup.stages["context (overlapped)"] = context_starter.seconds
            from .gpu.backend import DECODE_BUCKETS, GpuOps, OutOfDeviceMemory

            if slots > DECODE_BUCKETS[-1]:  # a decode step's graph holds at most that many
                if zse.source is not None:
                    zse.source.close()
                raise EngineError(f"at most {DECODE_BUCKETS[-1]} slots on a GPU, got {slots}")
            try:
                ops = GpuOps(context, zse, config, slots, max_len, startup, batch_invariant)
            except OutOfDeviceMemory as exc:
                raise EngineError(str(exc)) from None
            finally:
                if zse.source is not None:
                    zse.source.close()
            device = f"cuda:{context.info.ordinal} ({context.info.name})"
        else:
            from .cpu.backend import CpuOps

            if zse.source is not None:
                zse = _download_for_cpu(zse, startup)
                t = time.perf_counter()
            ops = CpuOps(zse, config, slots, max_len)
            t = startup.mark("weights+kv_cache", t)
            device = "cpu"
        # Built after the upload: Qwen2.5's tokenizer.json takes 0.37-0.57 s to build on the
        # H200 box and holds the GIL throughout (tokenizers' from_str), which would stall the
        # upload's reader threads. zse-run builds it in its HTTP process instead.
        tokenizer = None
        if load_tokenizer:
            t = time.perf_counter()
            from .tokenizer import Tokenizer  # jinja2 and tokenizers: not for an ids-only engine

            tokenizer = Tokenizer(zse.manifest["tokenizer"])
            startup.mark("tokenizer", t)
        engine = cls(zse, ops, config, tokenizer, device, slots, max_len, startup)
        t = time.perf_counter()
        if context is not None:
            ops.capture_decode_graphs(engine.decoder)
            startup.mark("graph_capture", t)
        else:
            engine._warm_up()
            startup.mark("kernel_load", t)
        log.info("ready in %.2f s on %s (%s); KV cache %.1f MiB for %d slots x %d tokens",
                 time.perf_counter() - started, device, startup, ops.kv_cache_bytes / 2**20, slots,
                 max_len)
        return engine

    def _warm_up(self) -> None:
        """CPU: compile (or load from numba's cache) every kernel before the first request."""
        slot = self._free_slots[-1]
        for tokens in (1, 16):  # the decode and the prefill paths
            batch = Batch.of(np.zeros(tokens), np.arange(tokens), np.full(tokens, slot), [tokens - 1])
            self.decoder.forward(batch)

    def bind_thread(self) -> None:
        """Make the calling thread able to drive the engine's device (a CUDA context is current
        per thread: the engine is opened on one thread and served from another)."""
        self.ops.bind_thread()

    @property
    def free_slots(self) -> int:
        return len(self._free_slots)

    @property
    def slots(self) -> int:
        return self._slots

    @property
    def batch_invariant(self) -> bool:
        """Whether a sequence's arithmetic is the same at every batch size and composition (the
        CPU backend's always is; a GPU's with Engine.open(batch_invariant=True))."""
        return getattr(self.ops, "batch_invariant", True)

    @property
    def max_logit_rows(self) -> int:
        """The most logit rows one forward may ask for."""
        return getattr(self.ops, "max_batch", self._slots)

    def acquire_slot(self) -> int:
        if not self._free_slots:
            raise EngineError("all KV-cache slots are busy")
        return self._free_slots.pop()

    def release_slot(self, slot: int) -> None:
        self._free_slots.append(slot)

    def forward(self, batch: Batch) -> np.ndarray:
        return self.decoder.forward(batch)

    def prompt_ids(self, prompt: str | list[int]) -> list[int]:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise EngineError("the prompt is empty")
        bad = [i for i in ids if not 0 <= i < self.config.vocab_size]
        if bad:
            raise EngineError(f"token ids {bad[:5]} are outside the vocabulary "
                              f"(0..{self.config.vocab_size - 1})")
        if len(ids) >= self.max_model_len:
            raise EngineError(f"the prompt has {len(ids)} tokens; the context length is "
                              f"{self.max_model_len}")
        return ids

    def sample(self, logits, params: list[SamplingParams], steps) -> np.ndarray:
        """Choose one id per logits row of an eager forward (a prompt's first token)."""
        self._fed_rows = 0  # the device's last choices are these now
        return self.ops.sample(logits, params, steps)

    @property
    def launches_ahead(self) -> bool:
        """Whether to begin a decode step with FED tokens before the previous step ends: on a
        GPU once the embedding table is mapped for the decode graphs (a background task after
        start-up), where the step then runs right behind the previous one, hiding the host's
        work between steps. Elsewhere FED steps work too, but gain nothing: each step runs when
        it is begun."""
        return getattr(self.ops, "launches_ahead", False)

    def wait_for_launches_ahead(self, timeout: float | None = None) -> bool:
        """Wait until decode steps run ahead (a GPU's background mapping of the embedding is
        done; at once elsewhere, where they never do): benchmarks and checks of the steady
        state. Whether they do."""
        mapped = getattr(self.ops, "embedding_mapped", None)
        return mapped is not None and mapped.wait(timeout)

    def step(self, tokens, positions, slots, params: list[SamplingParams], steps) -> np.ndarray:
        """One decode step for several sequences: feed one token each, return the next ids.
        On a GPU this replays a captured graph; only the chosen ids come back."""
        return self.end_step(self.begin_step(tokens, positions, slots, params, steps))

    def begin_step(self, tokens, positions, slots, params: list[SamplingParams],
                   steps) -> DecodeStep:
        """Start `step`; end_step() returns its ids. A token may be FED: the id its row chose in
        the step begun just before (`latest_step`; rows keep their order), with no sampling in
        between; then this step may be begun before that one is ended."""
        fed = [i for i, token in enumerate(tokens) if token == FED]
        if fed and fed[-1] >= self._fed_rows:
            raise EngineError(f"a FED token in row {fed[-1]} names no row of the step before")
        self._fed_rows = len(tokens)
        if hasattr(self.ops, "launch_decode"):  # a graph replay on the GPU
            while sum(s.ids is None for s in self._pending) >= self.ops.max_in_flight:
                self._collect_oldest()  # kept for the caller that began it
            self.ops.launch_decode(tokens, positions, slots, params, steps)
            step = DecodeStep()
        else:
            if fed:  # the step before ran on the CPU: its ids are here
                tokens = [self.latest_step.ids[i] if token == FED else token
                          for i, token in enumerate(tokens)]
            logits = self.forward(Batch.of(tokens, positions, slots, np.arange(len(tokens))))
            step = DecodeStep(self.ops.sample(logits, params, steps))
        self._pending.append(step)
        self.latest_step = step
        return step

    def _collect_oldest(self) -> None:
        next(s for s in self._pending if s.ids is None).ids = self.ops.collect_decode()

    def end_step(self, step: DecodeStep | None = None) -> np.ndarray:
        """The ids of `step` (default: the oldest step begun and not yet ended), waiting for
        it; steps launched before it are collected on the way and kept for their callers."""
        if step is None:
            if not self._pending:
                raise EngineError("no decode step was begun")
            step = self._pending[0]
        elif not any(s is step for s in self._pending):
            raise EngineError("that decode step was not begun, or was ended already")
        while step.ids is None:
            self._collect_oldest()
        self._pending.remove(step)  # DecodeStep compares by identity
        return step.ids

    def discard_steps(self) -> None:
        """End the steps begun and not yet ended, dropping their ids (a sequence stopped while
        its next step ran ahead)."""
        while self._pending:
            self.end_step()

    def generate(self, prompt: str | list[int], max_tokens: int = 256,
                 sampling: SamplingParams = SamplingParams(), stop_token_ids=None,
                 ignore_eos: bool = False) -> Iterator[int]:
        """Yield generated token ids until max_tokens, an EOS/stop id, or the context is full."""
        ids = self.prompt_ids(prompt)
        stops = set(stop_token_ids or ()) | (set() if ignore_eos else set(self.tokenizer.eos_token_ids))
        slot = self.acquire_slot()
        begun: list[DecodeStep] = []  # this call's decode steps, in order
        ended = 0  # how many of them were ended
        try:
            logits = None
            for start in range(0, len(ids), PREFILL_CHUNK):
                chunk = ids[start:start + PREFILL_CHUNK]
                positions = np.arange(start, start + len(chunk))
                logits = self.forward(Batch.of(chunk, positions, np.full(len(chunk), slot),
                                               [len(chunk) - 1]))
            token = int(self.sample(logits, [sampling], [0])[0])
            first = len(ids)  # decode step k feeds the position first + k - 1
            decode_steps = min(max_tokens - 1, self.max_model_len - 1 - first)
            for done in range(decode_steps + 1):
                yield token
                if done == decode_steps or token in stops:
                    return
                if len(begun) == done:  # the next step is not running yet: it takes this token
                    begun.append(self.begin_step([token], [first + done], [slot], [sampling],
                                                 [done + 1]))
                # and one more behind it, FED from it unless another caller's step came between
                if len(begun) < decode_steps and self.launches_ahead \
                        and self.latest_step is begun[-1]:
                    k = len(begun)
                    begun.append(self.begin_step([FED], [first + k], [slot], [sampling], [k + 1]))
                token = int(self.end_step(begun[done])[0])
                ended = done + 1
        finally:
            for step in begun[ended:]:  # ran ahead past a stop id, or the caller stopped early
                self.end_step(step)
            self.release_slot(slot)


def _context(starter: ContextStarter | None, required: bool):
    """The started context; None (the CPU backend) when there is none and none was required."""
    if starter is None:
        return None
    context, error = starter.result()
    if context is None:
        if required:
            raise EngineError(error)
        log.info("no usable GPU (%s); running on the CPU backend", error)
    return context


def _download_for_cpu(zse: ZseFile, startup: StartupTimes) -> ZseFile:
    """The CPU backend maps a local file: stream the remote bytes, verified, into the cache
    copy (or a temporary file unlinked as soon as it is mapped), then open that."""
    from .streaming import download_to_file

    target = zse.mirror or Path(tempfile.gettempdir()) / f"zse-{os.getpid()}-{secrets.token_hex(4)}.zse"
    started = time.perf_counter()
    try:
        stats = download_to_file(zse, target, durable=zse.mirror is not None)
    finally:
        zse.close()
    startup.mark("download+verify", started)  # including the cache copy's fsync
    stats.report(startup)
    log.info("%s: %s", zse.path, stats)
    local = ZseFile(target)
    if zse.mirror is None:
        target.unlink()  # the mapping keeps the bytes; nothing is left behind on exit
    return local
