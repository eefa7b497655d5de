"""The CPU backend against HF transformers on the same dequantized weights."""

from __future__ import annotations

import numpy as np
import pytest

from tests.checkpoints import make_checkpoint
from tests.reference import hf_greedy, hf_logits, hf_model_from_zse
from zse_convert.convert import ConvertOptions, convert
from zse_runtime.engine import Engine, EngineError
from zse_runtime.model import Batch
from zse_runtime.sampling import SamplingParams

TOLERANCE = 1e-3  # max |logit difference| relative to the largest reference logit
PROMPT_TOKENS = 150  # more than 128, and more than the BLAS threshold and one sliding window
DECODE_STEPS = 64


def _relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def _prompt(engine: Engine, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, engine.config.vocab_size, PROMPT_TOKENS).tolist()


CASES = {
    "qwen2": dict(arch="qwen2"),
    "llama_tied": dict(arch="llama", tied=True, dtype="float16"),
    "llama3_rope": dict(arch="llama", attention_bias=True, rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64, "rope_theta": 50000.0}),
    "mistral_window": dict(arch="mistral", sliding_window=48),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    settings = dict(CASES[request.param])
    checkpoint = make_checkpoint(folder / "ckpt", settings.pop("arch"), seed=3, **settings)
    out = folder / "model.zse"
    convert(str(checkpoint), out, ConvertOptions(group_size=64))
    engine = Engine.open(out, device="cpu", max_model_len=512, slots=3)
    return engine, hf_model_from_zse(out, checkpoint)


def test_prefill_logits_match_transformers(case):
    engine, reference = case
    ids = _prompt(engine)
    n = len(ids)
    ours = engine.forward(Batch.of(ids, np.arange(n), np.full(n, 1), np.arange(n)))
    assert _relative_error(ours, hf_logits(reference, ids)) <= TOLERANCE


def _near_tie(reference: np.ndarray) -> bool:
    """Top-2 reference logits closer than our error bound allows us to order reliably."""
    first, second = np.sort(reference)[-2:][::-1]
    return (first - second) <= 2 * TOLERANCE * np.abs(reference).max()


def test_greedy_decode_matches_transformers(case):
    """64 decode steps, teacher-forced with transformers' tokens so every step is compared: the
    logits agree within TOLERANCE and the greedy token is the same, except where transformers'
    own top two logits are closer than twice that bound (a tie no float ordering can settle)."""
    engine, reference = case
    ids = _prompt(engine, seed=1)
    expected_tokens, expected_logits = hf_greedy(reference, ids, DECODE_STEPS)
    slot, n = 0, len(ids)
    logits = engine.forward(Batch.of(ids, np.arange(n), np.full(n, slot), [n - 1]))[0]
    ours = []
    for step in range(DECODE_STEPS):
        assert _relative_error(logits, expected_logits[step]) <= TOLERANCE, step
        ours.append(int(logits.argmax()))
        assert ours[-1] == expected_tokens[step] or _near_tie(expected_logits[step]), step
        logits = engine.forward(Batch.of([expected_tokens[step]], [n + step], [slot], [0]))[0]
    flips = [i for i, (a, b) in enumerate(zip(ours, expected_tokens)) if a != b]
    assert len(flips) <= 1
    agree = flips[0] if flips else DECODE_STEPS
    assert list(engine.generate(ids, DECODE_STEPS, ignore_eos=True))[:agree] == expected_tokens[:agree]


def test_batched_decode_across_slots_equals_solo(case):
    """Three sequences of different lengths in one batch give each its solo logits."""
    engine, _ = case
    prompts = [_prompt(engine, seed)[:length] for seed, length in ((5, 40), (6, 7), (7, 100))]
    solo = []
    for slot, ids in enumerate(prompts):
        n = len(ids)
        solo.append(engine.forward(Batch.of(ids, np.arange(n), np.full(n, slot), [n - 1]))[0])
    # Re-prefill all three, then decode one token of each in a single mixed batch.
    for slot, ids in enumerate(prompts):
        n = len(ids) - 1
        engine.forward(Batch.of(ids[:-1], np.arange(n), np.full(n, slot), [n - 1]))
    batch = Batch.of([p[-1] for p in prompts], [len(p) - 1 for p in prompts], [0, 1, 2], [0, 1, 2])
    together = engine.forward(batch)
    for slot in range(3):
        np.testing.assert_allclose(together[slot], solo[slot], rtol=0, atol=1e-4 * np.abs(solo[slot]).max())


def test_sampling_is_seeded_and_varies(case):
    engine, _ = case
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234)
    first = list(engine.generate("the license", 12, params, ignore_eos=True))
    again = list(engine.generate("the license", 12, params, ignore_eos=True))
    other = list(engine.generate("the license", 12, SamplingParams(temperature=1.0, seed=99),
                                 ignore_eos=True))
    assert first == again and len(first) == 12
    assert first != other


def test_generate_limits(tiny_qwen2_zse):
    engine = Engine.open(tiny_qwen2_zse, device="cpu", max_model_len=32, slots=1)
    assert engine.free_slots == 1
    out = list(engine.generate(list(range(20)), max_tokens=100, ignore_eos=True))
    assert len(out) == 12  # 20 prompt + 12 generated = the 32-token context
    assert engine.free_slots == 1
    with pytest.raises(EngineError, match="the prompt has 40 tokens; the context length is 32"):
        list(engine.generate(list(range(40))))
    with pytest.raises(EngineError, match="outside the vocabulary"):
        list(engine.generate([0, 10**6]))
    with pytest.raises(EngineError, match="prompt is empty"):
        list(engine.generate([]))
    with pytest.raises(EngineError, match="max_model_len 4096 must be in 1..512"):
        Engine.open(tiny_qwen2_zse, device="cpu", max_model_len=4096)


def test_device_choice_without_a_gpu(tiny_qwen2_zse):
    """On a machine with no usable GPU (this one, and CI), "cuda" fails with the starter's
    reason and "auto" falls back to the CPU backend, whether Engine.open starts the context or
    is handed one that zse-run began before importing the engine."""
    from zse_runtime.gpu.starter import ContextStarter

    for starter in (None, ContextStarter()):
        with pytest.raises(EngineError, match="no CUDA GPU is available|CUDA initialisation failed"):
            Engine.open(tiny_qwen2_zse, device="cuda", context_starter=starter)
    for starter in (None, ContextStarter()):
        engine = Engine.open(tiny_qwen2_zse, device="auto", context_starter=starter)
        assert engine.device == "cpu"
        assert "context (overlapped)" not in engine.startup.stages


def test_generation_stops_at_eos(tiny_qwen2_zse):
    engine = Engine.open(tiny_qwen2_zse, device="cpu", max_model_len=256)
    free = list(engine.generate("hello", 30, ignore_eos=True))
    stop_at = free[5]
    stopped = list(engine.generate("hello", 30, stop_token_ids=[stop_at], ignore_eos=True))
    assert stopped == free[:free.index(stop_at) + 1]


def test_startup_breakdown(tiny_qwen2_zse):
    engine = Engine.open(tiny_qwen2_zse, device="cpu")
    assert list(engine.startup.stages) == ["manifest", "weights+kv_cache", "tokenizer",
                                           "kernel_load"]
    assert engine.startup.total > 0 and "manifest" in str(engine.startup)


def test_steps_begun_ahead_with_fed_tokens_generate_the_same_ids(tiny_qwen2_zse, monkeypatch):
    """With steps run ahead (as on a GPU once the embedding is mapped) generate begins each
    step with a FED token before the previous one ends: the same ids at every stop rule, no
    step left begun and the slot free afterwards, also when the caller stops early."""
    from zse_runtime.engine import FED

    engine = Engine.open(tiny_qwen2_zse, device="cpu", max_model_len=40, slots=1)
    sampled = SamplingParams(temperature=0.8, top_p=0.9, seed=7)
    runs = [([5, 6, 7], 12, SamplingParams(), ()), ([5, 6, 7], 12, sampled, ()),
            (list(range(20)), 100, SamplingParams(), ())]  # the last: 20 tokens to the context
    expected = [list(engine.generate(ids, n, p, stop_token_ids=s, ignore_eos=True))
                for ids, n, p, s in runs]
    stop = next(t for i, t in enumerate(expected[0]) if i >= 3 and t not in expected[0][:i])
    expected_stopped = list(engine.generate([5, 6, 7], 12, stop_token_ids=[stop], ignore_eos=True))
    begun = []
    begin = engine.begin_step
    monkeypatch.setattr(engine, "begin_step", lambda tokens, *a: (begun.append(list(tokens)),
                                                                   begin(tokens, *a))[1])
    monkeypatch.setattr(Engine, "launches_ahead", property(lambda self: True))
    for (ids, n, p, s), want in zip(runs, expected):
        begun.clear()
        assert list(engine.generate(ids, n, p, stop_token_ids=s, ignore_eos=True)) == want
        assert begun == [[want[0]]] + [[FED]] * (len(want) - 2)  # then every step FED
    assert len(expected[2]) == 20
    begun.clear()
    assert list(engine.generate([5, 6, 7], 12, stop_token_ids=[stop], ignore_eos=True)) \
        == expected_stopped
    assert 4 <= len(expected_stopped) < 12
    assert len(begun) == len(expected_stopped)  # one step ran ahead past the stop id
    early = engine.generate([5, 6, 7], 12, ignore_eos=True)
    assert [next(early) for _ in range(3)] == expected[0][:3]
    early.close()
    assert not engine._pending and engine.free_slots == 1


def test_a_fed_token_needs_the_row_of_the_step_before(tiny_qwen2_zse):
    from zse_runtime.engine import FED

    engine = Engine.open(tiny_qwen2_zse, device="cpu", slots=2)
    with pytest.raises(EngineError, match="FED token in row 0"):
        engine.begin_step([FED], [0], [0], [SamplingParams()], [1])
    engine.forward(Batch.of([5, 6], [0, 0], [0, 1], [0, 1]))
    first = engine.step([5, 6], [1, 1], [0, 1], [SamplingParams()] * 2, [1, 1])
    with pytest.raises(EngineError, match="FED token in row 2"):
        engine.begin_step([FED, FED, FED], [2, 2, 2], [0, 1, 1], [SamplingParams()] * 3, [2] * 3)
    fed = engine.step([6, FED], [2, 2], [0, 1], [SamplingParams()] * 2, [2, 2])
    plain = engine.step([7, int(fed[1])], [3, 3], [0, 1], [SamplingParams()] * 2, [3, 3])
    assert fed.shape == plain.shape == first.shape == (2,)
    engine.forward(Batch.of([1, 2], [4, 4], [0, 1], [0, 1]))
    engine.sample(engine.forward(Batch.of([1], [5], [0], [0])), [SamplingParams()], [0])
    with pytest.raises(EngineError, match="FED token in row 0"):  # sampled since: not a step's
        engine.begin_step([FED], [6], [0], [SamplingParams()], [1])


def test_a_gpu_engine_holds_at_most_32_slots(tiny_qwen2_zse, monkeypatch):
    """A decode step's graphs hold at most 32 sequences: more slots on a GPU are refused at
    open, clearly, rather than failing at the 33rd concurrent sequence."""
    from zse_runtime import engine as engine_module

    monkeypatch.setattr(engine_module, "_context",
                        lambda starter, required: None if starter is None else object())
    with pytest.raises(EngineError, match="at most 32 slots on a GPU, got 33"):
        Engine.open(tiny_qwen2_zse, device="cuda", slots=33)
    assert Engine.open(tiny_qwen2_zse, device="cpu", slots=33).slots == 33  # the CPU: any


def test_interleaved_generators_each_get_their_own_tokens(tiny_qwen2_zse, monkeypatch):
    """Two generate() calls consumed in turn on one engine, with steps launched ahead: each
    step's ids go to the generator that began it, a generator whose step is no longer the
    engine's latest begins its next one from the host's ids, and neither leaves a step begun."""
    engine = Engine.open(tiny_qwen2_zse, device="cpu", max_model_len=64, slots=2)
    prompts = ([5, 6, 7], [9, 10, 11, 12])
    alone = [list(engine.generate(ids, 12, ignore_eos=True)) for ids in prompts]
    monkeypatch.setattr(Engine, "launches_ahead", property(lambda self: True))
    first, second = (engine.generate(ids, 12, ignore_eos=True) for ids in prompts)
    together = [[], []]
    for _ in range(12):
        together[0].append(next(first))
        together[1].append(next(second))
    assert together == alone
    first.close(), second.close()
    assert not engine._pending and engine.free_slots == 2


def test_device_steps_are_collected_in_launch_order_and_kept_for_their_callers(tiny_qwen2_zse):
    """On a device that runs steps ahead (two at most in flight), beginning a third collects
    the oldest first, and ending a step collects the ones launched before it: each caller gets
    its own step's ids, whichever order the steps are ended in."""
    from collections import deque

    from zse_runtime.engine import FED

    class Device:  # launch_decode's contract: ids come back in launch order
        launches_ahead, max_in_flight = True, 2

        def __init__(self):
            self.in_flight, self.previous, self.launched = deque(), None, 0

        def launch_decode(self, tokens, positions, slots, params, steps):
            assert len(self.in_flight) < self.max_in_flight
            ids = np.array([self.previous[i] if t == FED else t for i, t in enumerate(tokens)])
            self.previous = ids + 100  # what the device "samples"
            self.in_flight.append(self.previous)
            self.launched += 1

        def collect_decode(self):
            return self.in_flight.popleft()

    engine = Engine.open(tiny_qwen2_zse, device="cpu")
    engine.ops = device = Device()
    p = [SamplingParams()]
    first = engine.begin_step([5], [0], [0], p, [1])
    fed = engine.begin_step([FED], [1], [0], p, [2])
    other = engine.begin_step([7], [0], [0], p, [1])  # a third: the oldest is collected first
    assert device.launched == 3 and len(device.in_flight) == 2
    assert engine.end_step(other).tolist() == [107]
    assert engine.end_step(fed).tolist() == [205] and engine.end_step(first).tolist() == [105]
    assert not engine._pending
    with pytest.raises(EngineError, match="not begun, or was ended already"):
        engine.end_step(first)
