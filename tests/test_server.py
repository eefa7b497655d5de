"""`zse-run` over real HTTP on loopback, driven by the official OpenAI client."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import REPO, LiveServer
from zse_runtime.engine import Engine
from zse_runtime.tokenizer import IncrementalDecoder

MODEL = "tiny"


@pytest.fixture(scope="module")
def server(tiny_qwen2_zse):
    # --batch-invariant is accepted on every backend (the CPU's decode is batch-invariant anyway)
    live = LiveServer(tiny_qwen2_zse, "--served-model-name", MODEL, "--max-num-seqs", "4",
                      "--max-model-len", "256", "--batch-invariant").wait_ready()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def solo(tiny_qwen2_zse):
    """Greedy text of the same file generated in-process, one request at a time."""
    engine = Engine.open(tiny_qwen2_zse, device="cpu", max_model_len=256)

    def generate(prompt_ids, max_tokens):
        tokens = list(engine.generate(prompt_ids, max_tokens, ignore_eos=True))
        decoder = IncrementalDecoder(engine.tokenizer)
        return tokens, "".join(decoder.push(t) for t in tokens) + decoder.flush()
    generate.tokenizer = engine.tokenizer
    return generate


def metric(server, name: str, labels: str = "") -> float:
    text = httpx.get(f"{server.url}/metrics").text
    pattern = rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$"
    values = [float(m.group(1)) for m in re.finditer(pattern, text, re.M)]
    return sum(values)


def test_models_and_health(server, client):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ready"}
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_completion_equals_solo_greedy_and_streaming(client, solo):
    ids = list(range(10, 40))
    tokens, text = solo(ids, 12)
    result = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert result.choices[0].text == text
    assert result.choices[0].finish_reason == "length"
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (30, 12)
    pieces, finish = [], None
    for chunk in client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True}):
        pieces.append(chunk.choices[0].text)
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == text and finish == "length"


def test_chat_with_usage_chunk(client, solo):
    messages = [{"role": "user", "content": "Say something about licenses"}]
    prompt_ids = solo.tokenizer.encode_chat(messages)
    _, text = solo(prompt_ids, 10)
    result = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10,
                                            temperature=0, extra_body={"ignore_eos": True})
    assert result.choices[0].message.role == "assistant"
    assert result.choices[0].message.content == text
    assert result.usage.prompt_tokens == len(prompt_ids)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert all(c.usage is None for c in chunks[:-1])


def _boundary_stop(solo):
    """A prompt and a 2-character stop string made of the last character of one token's text
    and the first of the next token's: it exists only across the boundary."""
    for start in range(0, 280, 7):
        ids = list(range(start, start + 20))
        tokens, text = solo(ids, 16)
        for k in range(1, len(tokens)):
            boundary = len(solo.tokenizer.decode(tokens[:k]))
            stop = text[boundary - 1:boundary + 1]
            if (len(stop) == 2 and "\ufffd" not in stop and text.find(stop) == boundary - 1
                    and solo.tokenizer.decode(tokens[:k]) == text[:boundary]):
                return ids, text, stop
    raise AssertionError("no prompt gave a usable token boundary")


def test_stop_strings_across_token_boundaries(client, solo):
    ids, text, stop = _boundary_stop(solo)
    expected = text[:text.index(stop)]
    for stream in (False, True):
        response = client.completions.create(model=MODEL, prompt=ids, max_tokens=16,
                                             temperature=0, stop=[stop, "never-there"],
                                             stream=stream, extra_body={"ignore_eos": True})
        if stream:
            chunks = list(response)
            got = "".join(c.choices[0].text for c in chunks)
            finish = chunks[-1].choices[0].finish_reason
        else:
            got, finish = response.choices[0].text, response.choices[0].finish_reason
        assert got == expected and finish == "stop"


def test_seeded_sampling_is_reproducible_and_n_choices(client):
    ask = lambda seed, n=1: client.completions.create(
        model=MODEL, prompt="the license", max_tokens=12, temperature=1.0, seed=seed, n=n,
        extra_body={"ignore_eos": True})
    first, again, other = ask(7), ask(7), ask(8)
    assert first.choices[0].text == again.choices[0].text != other.choices[0].text
    pair = ask(7, n=2)
    assert [c.index for c in pair.choices] == [0, 1]
    assert pair.choices[0].text == first.choices[0].text != pair.choices[1].text
    assert pair.usage.completion_tokens == 24


def test_logprobs(client):
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0,
        logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and tops[0] <= 0
        assert entry.logprob == pytest.approx(tops[0])  # greedy picks the most likely token
    completion = client.completions.create(model=MODEL, prompt="x", max_tokens=4, temperature=0,
                                           logprobs=2, extra_body={"ignore_eos": True})
    lp = completion.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(lp_ <= 0 for lp_ in lp.token_logprobs)
    assert all(1 <= len(t) <= 2 for t in lp.top_logprobs)  # keyed by text: byte tokens may collide
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_penalties_change_sampling_but_not_validity(client):
    plain = client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=20, temperature=0,
                                      extra_body={"ignore_eos": True})
    penalised = client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=20,
                                          temperature=0, frequency_penalty=2.0,
                                          presence_penalty=2.0, extra_body={"ignore_eos": True})
    assert penalised.usage.completion_tokens == 20
    assert penalised.choices[0].text != plain.choices[0].text


def _error(server, path: str, body, headers=None) -> tuple[int, dict]:
    response = httpx.post(f"{server.url}{path}", content=body if isinstance(body, (str, bytes))
                          else json.dumps(body), headers=headers or {}, timeout=30)
    return response.status_code, response.json()


@pytest.mark.parametrize("body,status,fragment", [
    ("{not json", 400, "not valid JSON"),
    ([1, 2], 400, "must be a JSON object"),
    ({"model": MODEL, "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "stream_options": {"include_usage": True}}, 400,
     "only allowed when stream"),
    ({"model": MODEL, "prompt": [999999]}, 400, "within the vocabulary"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 1000}, 400,
     "maximum context length is 256 tokens. However, you requested 1001 tokens (1 in the prompt, "
     "1000 for the completion)"),
    ({"model": "gpt-4o", "prompt": "x"}, 404, "The model `gpt-4o` does not exist"),
])
def test_errors_have_openai_shape(server, body, status, fragment):
    code, payload = _error(server, "/v1/completions", body)
    assert code == status
    assert fragment in payload["error"]["message"]
    assert set(payload["error"]) == {"message", "type", "param", "code"}


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                       max_tokens=10_000)


def test_sixteen_concurrent_streams_equal_solo_and_metrics_agree(server, client, solo):
    before = metric(server, "zse_requests_total", '{endpoint="/v1/completions",status="200"}')
    generated_before = metric(server, "zse_generation_tokens_total")
    rng = np.random.default_rng(3)
    jobs = [(rng.integers(0, 290, int(rng.integers(3, 60))).tolist(), int(rng.integers(1, 24)))
            for _ in range(16)]

    def run(job):
        ids, max_tokens = job
        text = ""
        for chunk in client.completions.create(model=MODEL, prompt=ids, max_tokens=max_tokens,
                                               temperature=0, stream=True,
                                               extra_body={"ignore_eos": True}):
            text += chunk.choices[0].text
        return text

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(run, jobs))
    for (ids, max_tokens), text in zip(jobs, results):
        assert text == solo(ids, max_tokens)[1]
    after = metric(server, "zse_requests_total", '{endpoint="/v1/completions",status="200"}')
    assert after - before == 16
    assert metric(server, "zse_generation_tokens_total") - generated_before == sum(m for _, m in jobs)
    assert metric(server, "zse_requests_running") == 0
    assert metric(server, "zse_time_to_first_token_seconds_count") >= 16


def test_disconnect_mid_stream_frees_the_slot(server, client):
    body = {"model": MODEL, "prompt": "x", "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.monotonic() + 10
    while metric(server, "zse_requests_running") > 0:
        assert time.monotonic() < deadline, "the disconnected request still holds its slot"
        time.sleep(0.05)
    assert metric(server, "zse_kv_cache_usage_ratio") == 0
    assert client.completions.create(model=MODEL, prompt="y", max_tokens=2).usage.completion_tokens >= 1


# finite floats: a JSON client cannot send NaN or Infinity (test_non_finite_numbers_are_400 sends
# them raw)
_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 3),
                    st.floats(allow_nan=False, allow_infinity=False),
                    st.text(max_size=8), st.lists(st.integers(-1, 400), max_size=4))
_KEYS = st.sampled_from(["model", "prompt", "messages", "max_tokens", "temperature", "top_p",
                         "top_k", "n", "seed", "stop", "stream", "logprobs", "top_logprobs",
                         "echo", "presence_penalty", "frequency_penalty", "stream_options",
                         "max_completion_tokens", "unknown"])


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
       extra=st.dictionaries(_KEYS, _VALUES, max_size=6),
       messages=st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "bot"]),
                                                "content": st.one_of(st.text(max_size=20), st.none())}),
                         max_size=2))
def test_fuzzed_requests_never_5xx(server, path, extra, messages):
    body = {"model": MODEL, "prompt": "fuzz", "messages": messages, "max_tokens": 2, **extra}
    response = httpx.post(f"{server.url}{path}", json=body, timeout=60)
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert "error" in response.json()


@pytest.mark.parametrize("field", ["temperature", "top_p", "max_tokens", "presence_penalty"])
@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_400(server, field, value):
    """Python's JSON parser accepts NaN and Infinity literals; the API must refuse them cleanly."""
    body = f'{{"model": "{MODEL}", "prompt": "x", "max_tokens": 2, "{field}": {value}}}'
    response = httpx.post(f"{server.url}/v1/completions", content=body,
                          headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == 400, response.text
    assert "error" in response.json()


def test_server_still_healthy_after_fuzzing(server, client):
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert metric(server, "zse_requests_running") == 0


def test_api_key(tiny_qwen2_zse):
    live = LiveServer(tiny_qwen2_zse, "--served-model-name", MODEL,
                      env={"ZSE_API_KEY": "s3cret"}).wait_ready()
    try:
        wrong = openai.OpenAI(base_url=f"{live.url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        assert httpx.get(f"{live.url}/v1/models").status_code == 401
        right = openai.OpenAI(base_url=f"{live.url}/v1", api_key="s3cret", max_retries=0)
        assert right.completions.create(model=MODEL, prompt="a", max_tokens=1).choices
        assert httpx.get(f"{live.url}/health").status_code == 200  # probes need no key
        assert "s3cret" not in live.output()
    finally:
        live.stop()


def test_full_queue_is_503(tiny_qwen2_zse):
    live = LiveServer(tiny_qwen2_zse, "--served-model-name", MODEL, "--max-num-seqs", "1",
                      "--max-queue", "1").wait_ready()
    try:
        body = {"model": MODEL, "prompt": "x", "max_tokens": 120, "ignore_eos": True}
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            codes = list(pool.map(lambda _: httpx.post(f"{live.url}/v1/completions", json=body,
                                                       timeout=60).status_code, range(6)))
        assert 200 in codes and 503 in codes and set(codes) <= {200, 503}
    finally:
        live.stop()


def test_sigterm_drains_in_flight_requests(tiny_qwen2_zse):
    live = LiveServer(tiny_qwen2_zse, "--served-model-name", MODEL).wait_ready()
    body = {"model": MODEL, "prompt": "x", "max_tokens": 150, "stream": True, "ignore_eos": True}
    lines = []
    with httpx.stream("POST", f"{live.url}/v1/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line and not lines:
                live.process.send_signal(signal.SIGTERM)
            if line:
                lines.append(line)
    assert lines[-1] == "data: [DONE]"
    finish = json.loads(lines[-2][6:])["choices"][0]["finish_reason"]
    assert finish == "length"
    assert live.process.wait(timeout=30) == 0
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{live.url}/health", timeout=2)
    live.stop()


def test_health_is_503_while_loading(tiny_qwen2_zse, tmp_path):
    # An empty numba cache makes the CPU backend compile its kernels at start: seconds of load.
    live = LiveServer(tiny_qwen2_zse, env={"NUMBA_CACHE_DIR": str(tmp_path)})
    try:
        seen = []
        deadline = time.monotonic() + 120
        while not seen or seen[-1] != 200:
            assert time.monotonic() < deadline, live.output()
            try:
                seen.append(httpx.get(f"{live.url}/health", timeout=1).status_code)
            except httpx.TransportError:
                time.sleep(0.02)
        assert seen[0] == 503 and set(seen) == {503, 200}
        assert "ready in" in live.output()
    finally:
        live.stop()


def test_unloadable_file_exits_non_zero(tmp_path):
    bad = tmp_path / "bad.zse"
    bad.write_bytes(b"not a model" * 100)
    live = LiveServer(bad)
    assert live.process.wait(timeout=60) == 1
    assert "bad magic" in live.output()
    live.stop()


@pytest.mark.slow
def _engine_pid(live: LiveServer) -> int:
    match = re.search(r"engine process (\d+) started", live.output())
    assert match, live.output()
    return int(match.group(1))


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _wait_for_output(live: LiveServer, pattern: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not re.search(pattern, live.output()):
        assert time.monotonic() < deadline, live.output()
        time.sleep(0.01)


def _wait_gone(pid: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        assert time.monotonic() < deadline, f"process {pid} is still running"
        time.sleep(0.05)


def _modules_loaded_after(code: str, modules: tuple[str, ...]) -> list[str]:
    """Which of `modules` a fresh interpreter has imported after running `code`."""
    code += f"\nimport sys\nprint(sorted(m for m in {modules!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1].replace("'", '"'))


def test_the_manifest_and_the_http_side_need_no_numpy(tiny_qwen2_zse):
    """zse-run's start-up order depends on it: the engine process reads the manifest and hands
    the tokenizer on before it imports numpy (0.3 s on the H200 host), the HTTP process never
    imports numpy or the engine, and the engine process's engine, which works on token ids,
    imports neither the tokenizer library nor jinja2."""
    assert _modules_loaded_after(
        "import zse_runtime.cli, zse_runtime.server, zse_runtime.engine_process, "
        "zse_runtime.tokenizer, zse_runtime.gpu.starter\n"
        "from zse_runtime.source import open_zse\n"
        f"zse, stage = open_zse({str(tiny_qwen2_zse)!r}, None)\n"
        "assert stage == 'manifest' and zse.manifest['tokenizer']['tokenizer_json']",
        ("numpy", "numba", "zse_runtime.engine")) == []
    assert _modules_loaded_after(
        "from zse_runtime.engine import Engine\n"
        f"engine = Engine.open({str(tiny_qwen2_zse)!r}, device='cpu', load_tokenizer=False)\n"
        "assert engine.tokenizer is None and list(engine.generate([5, 6], 2, ignore_eos=True))",
        ("jinja2", "tokenizers")) == []


def test_the_engine_runs_in_a_child_process_that_ends_with_the_server(tiny_qwen2_zse):
    """zse-run forks its engine into a process of its own; the two start up side by side and
    stop together: on SIGTERM after the drain, and when the HTTP process is killed outright."""
    for ending in (signal.SIGTERM, signal.SIGKILL):
        live = LiveServer(tiny_qwen2_zse, "--served-model-name", MODEL).wait_ready()
        try:
            pid = _engine_pid(live)
            with open(f"/proc/{pid}/stat") as stat:
                assert int(stat.read().rsplit(")", 1)[1].split()[1]) == live.process.pid  # ppid
            answer = httpx.post(f"{live.url}/v1/completions", timeout=30, json={
                "model": MODEL, "prompt": [5, 6, 7], "max_tokens": 3, "temperature": 0})
            assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 3
            live.process.send_signal(ending)
            assert live.process.wait(timeout=30) == (0 if ending == signal.SIGTERM else -ending)
            _wait_gone(pid)  # SIGKILL: the engine process sees its socket close and exits
        finally:
            live.stop()


def test_an_engine_process_lost_while_loading_ends_zse_run_clearly(tiny_qwen2_zse, tmp_path):
    # An empty numba cache makes the CPU backend compile its kernels at start: seconds of load.
    live = LiveServer(tiny_qwen2_zse, env={"NUMBA_CACHE_DIR": str(tmp_path)})
    try:
        _wait_for_output(live, r"engine process \d+ started")
        os.kill(_engine_pid(live), signal.SIGKILL)
        assert live.process.wait(timeout=60) == 1
        assert "the engine process exited (killed by signal 9)" in live.output()
        assert "ready in" not in live.output()
    finally:
        live.stop()


def test_without_fork_zse_run_says_it_needs_posix(tiny_qwen2_zse):
    code = ("import os, sys\ndel os.fork\nfrom zse_runtime.cli import entry\n"
            f"sys.argv = ['zse-run', {str(tiny_qwen2_zse)!r}]\nentry()")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, cwd=REPO)
    assert result.returncode == 1 and "needs a POSIX system" in result.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_killing_zse_run_while_it_loads_kills_the_engine_process(tiny_qwen2_zse, tmp_path):
    # An empty numba cache makes the CPU backend compile its kernels at start: seconds of load,
    # during which the engine process does not read its socket.
    live = LiveServer(tiny_qwen2_zse, env={"NUMBA_CACHE_DIR": str(tmp_path)})
    try:
        _wait_for_output(live, "engine modules imported")
        pid = _engine_pid(live)
        live.process.kill()
        live.process.wait(timeout=30)
        _wait_gone(pid, timeout=2)
        assert "ready in" not in live.output()
    finally:
        live.stop()


def test_a_port_in_use_ends_both_processes(tiny_qwen2_zse):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "zse_runtime.cli", str(tiny_qwen2_zse), "--port", str(port),
             "--device", "cpu"], capture_output=True, text=True, timeout=120, cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode != 0 and "address already in use" in result.stderr.lower()
    pid = int(re.search(r"engine process (\d+) started", result.stderr).group(1))
    _wait_gone(pid)


def test_a_lost_engine_process_fails_requests_and_health_clearly(tiny_qwen2_zse):
    """An engine process that dies (the OOM killer, say) ends the streams in flight with an
    error naming it, turns /health 503, and leaves the HTTP process answering."""
    live = LiveServer(tiny_qwen2_zse, "--served-model-name", MODEL).wait_ready()
    try:
        pid = _engine_pid(live)
        body = {"model": MODEL, "prompt": "x", "max_tokens": 200, "stream": True,
                "ignore_eos": True}
        lines = []
        with httpx.stream("POST", f"{live.url}/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line and not lines:
                    os.kill(pid, signal.SIGKILL)
                if line:
                    lines.append(line)
        error = json.loads(lines[-1][6:])["error"]
        assert "engine process exited (killed by signal 9)" in error["message"]
        health = httpx.get(f"{live.url}/health", timeout=5)
        assert health.status_code == 503 and "killed by signal 9" in health.json()["error"]
        again = httpx.post(f"{live.url}/v1/completions", timeout=5,
                           json={"model": MODEL, "prompt": "x", "max_tokens": 2})
        assert again.status_code == 503 and "killed by signal 9" in again.json()["error"]["message"]
        assert live.process.poll() is None
    finally:
        live.stop()


def test_smollm2_server_answers_like_the_engine(tmp_path_factory):
    from tests.gguf_fixtures import smollm2_folder
    from zse_convert.convert import convert

    out = tmp_path_factory.mktemp("smollm2_server") / "smollm2.zse"
    convert(str(smollm2_folder()), out)
    live = LiveServer(out, "--served-model-name", "smollm2", "--max-model-len", "1024").wait_ready()
    try:
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
        completion = client.completions.create(model="smollm2", prompt="The capital of France is",
                                               max_tokens=8, temperature=0)
        full = completion.choices[0].text
        assert full.startswith(" Paris")
        # a stop string taken from the greedy text itself: the same text, cut before it
        cut = full.index(" ", 1)
        stopped = client.completions.create(model="smollm2", prompt="The capital of France is",
                                            max_tokens=8, temperature=0, stop=[full[cut:cut + 4]])
        assert stopped.choices[0].text == full[:cut] and stopped.choices[0].finish_reason == "stop"
        messages = [{"role": "user", "content": "What is 2 + 2?"}]
        chat = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=24,
                                              temperature=0)
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="smollm2", messages=messages, max_tokens=24, temperature=0, stream=True))
        assert chat.choices[0].message.content == streamed and streamed.strip()
        assert chat.choices[0].finish_reason in ("stop", "length")
    finally:
        live.stop()


def test_the_engine_thread_binds_the_device(tiny_qwen2_zse, monkeypatch):
    """The scheduler drives the engine from its own thread, which must make the device current
    there first (a CUDA context is per thread: without it a logprobs request on a GPU failed
    with CUDA_ERROR_INVALID_CONTEXT)."""
    from zse_runtime.engine import Engine
    from zse_runtime.scheduler import Scheduler

    engine = Engine.open(tiny_qwen2_zse, device="cpu")
    bound = []
    monkeypatch.setattr(engine.ops, "bind_thread", lambda: bound.append(threading.current_thread().name))
    scheduler = Scheduler(engine, max_waiting=1)
    try:
        deadline = time.monotonic() + 10
        while not bound and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        scheduler.stop()
    assert bound == ["zse-engine"]


def _run_scheduler(engine, prompts, max_tokens, stops=None):
    """Submit every prompt at once (the engine thread admits them together) and return each
    request's greedy tokens. `max_tokens`: one for all, or one per prompt; `stops`: each
    prompt's stop ids."""
    from zse_runtime.scheduler import FinishEvent, Request, Scheduler
    from zse_runtime.sampling import SamplingParams

    lengths = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
    stops = stops or [()] * len(prompts)
    scheduler = Scheduler(engine, max_waiting=len(prompts))
    outputs = [[] for _ in prompts]
    finished = threading.Semaphore(0)

    def emitter(out):
        return lambda event: finished.release() if isinstance(event, FinishEvent) \
            else out.append(event.token)

    try:
        with scheduler._wake:  # held: the engine thread admits all of them in one pass
            for ids, n, stop, out in zip(prompts, lengths, stops, outputs):
                scheduler.submit(Request(ids, SamplingParams(0.0), n, emitter(out),
                                         stop_token_ids=frozenset(stop)))
        for _ in prompts:
            assert finished.acquire(timeout=60)
    finally:
        scheduler.stop()
    return outputs


def test_a_scheduler_holds_its_slots_plus_max_waiting_requests(tiny_qwen2_zse):
    """The admission rule zse-run's HTTP process also applies to its engine process: refused
    once the held (running or waiting) requests fill the slots and `max_waiting` more."""
    from zse_runtime.sampling import SamplingParams
    from zse_runtime.scheduler import QueueFull, Request, Scheduler

    engine = Engine.open(tiny_qwen2_zse, device="cpu", slots=2)
    scheduler = Scheduler(engine, max_waiting=1)
    try:
        with scheduler._wake:  # held: the engine thread cannot finish any of them meanwhile
            for _ in range(3):
                scheduler.submit(Request([5], SamplingParams(0.0), 50, emit=lambda e: None))
            with pytest.raises(QueueFull, match="3 requests are running or waiting"):
                scheduler.submit(Request([5], SamplingParams(0.0), 50, emit=lambda e: None))
    finally:
        scheduler.stop()


def _record_forwards(engine, monkeypatch) -> list:
    """The batches of every engine.forward call from now on, in order."""
    forwards = []
    forward = engine.forward
    monkeypatch.setattr(engine, "forward", lambda batch: (forwards.append(batch), forward(batch))[1])
    return forwards


def test_short_prompts_share_a_prefill_chunk(tiny_qwen2_zse, monkeypatch):
    """Unless the engine is batch-invariant, waiting prompts are prefilled together, up to one
    chunk of tokens, each from its own KV slot and position, and each request samples from its
    own last row; a batch-invariant engine prefills one request per forward."""
    engine = Engine.open(tiny_qwen2_zse, device="cpu", slots=4)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 300, n).tolist() for n in (7, 12, 5)]
    solo = [list(engine.generate(ids, 4, ignore_eos=True)) for ids in prompts]
    forwards = _record_forwards(engine, monkeypatch)
    assert engine.batch_invariant  # the CPU backend: one request per prefill
    assert _run_scheduler(engine, prompts, 4) == solo
    # prefill forwards, one prompt each (decode steps of 1-3 tokens run between them)
    assert [b.tokens.size for b in forwards if b.tokens.size > 3] == [7, 12, 5]
    forwards.clear()
    monkeypatch.setattr(Engine, "batch_invariant", property(lambda self: False))
    assert _run_scheduler(engine, prompts, 4) == solo  # the CPU's rows do not depend on the batch
    packed = forwards[0]
    assert packed.tokens.tolist() == sum(prompts, [])
    assert packed.positions.tolist() == [p for ids in prompts for p in range(len(ids))]
    assert len(set(packed.slots[:7])) == len(set(packed.slots[7:19])) == 1
    assert len(set(packed.slots.tolist())) == 3
    assert packed.logit_rows.tolist() == [6, 18, 23]
    assert all(b.tokens.size == 3 for b in forwards[1:])  # then decode steps of all three


def test_a_steps_tokens_go_out_while_the_next_step_runs(tiny_qwen2_zse, monkeypatch):
    """Each decode step's tokens are emitted after the next step has been started and before
    it is waited for (the HTTP thread streams them while the GPU works); the last ones, and
    the finish, as soon as nothing is left to run."""
    from zse_runtime.sampling import SamplingParams
    from zse_runtime.scheduler import FinishEvent, Request, Scheduler

    engine = Engine.open(tiny_qwen2_zse, device="cpu")
    tokens = list(engine.generate([5, 6, 7], 4, ignore_eos=True))
    log = []
    begin, end = engine.begin_step, engine.end_step
    monkeypatch.setattr(engine, "begin_step", lambda *a: (log.append("begin"), begin(*a))[1])
    monkeypatch.setattr(engine, "end_step", lambda: (log.append("end"), end())[1])
    done = threading.Event()

    def emit(event):
        log.append("finish" if isinstance(event, FinishEvent) else event.token)
        if isinstance(event, FinishEvent):
            done.set()

    scheduler = Scheduler(engine, max_waiting=1)
    try:
        scheduler.submit(Request([5, 6, 7], SamplingParams(0.0), 4, emit))
        assert done.wait(timeout=60)
    finally:
        scheduler.stop()
    assert log == ["begin", tokens[0], "end", "begin", tokens[1], "end", "begin", tokens[2], "end",
                   tokens[3], "finish"]


def test_decode_steps_begun_ahead_give_each_request_its_solo_tokens(tiny_qwen2_zse, monkeypatch):
    """Where the engine runs steps ahead (a GPU once the embedding is mapped), the scheduler
    begins each step with FED tokens before the previous one ends while the same requests
    decode, and falls back to host ids when one stops or joins: every request still gets its
    solo tokens, at its own length limit or stop id."""
    from zse_runtime.engine import FED

    engine = Engine.open(tiny_qwen2_zse, device="cpu", slots=3)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, 300, n).tolist() for n in (6, 9, 4, 7)]
    lengths = [3, 9, 14, 6]
    free = list(engine.generate(prompts[2], lengths[2], ignore_eos=True))
    stop = next(t for i, t in enumerate(free) if i >= 4 and t not in free[:i])
    stops = [(), (), (stop,), ()]
    solo = [list(engine.generate(ids, n, stop_token_ids=s, ignore_eos=True))
            for ids, n, s in zip(prompts, lengths, stops)]
    assert len(solo[2]) < lengths[2]  # it stops at the stop id
    monkeypatch.setattr(Engine, "launches_ahead", property(lambda self: True))
    begun = []
    begin = engine.begin_step
    monkeypatch.setattr(engine, "begin_step", lambda tokens, *a: (begun.append(list(tokens)),
                                                                   begin(tokens, *a))[1])
    # 3 slots: the fourth request joins when one ends
    assert _run_scheduler(engine, prompts, lengths, stops) == solo
    fed = [tokens for tokens in begun if tokens == [FED] * len(tokens)]
    assert len(fed) >= 5 and [FED] * 3 in fed  # most steps, and with all three decoding
    assert not engine._pending and engine.free_slots == 3


def test_a_packed_prefill_chunk_is_bounded(tiny_qwen2_zse, monkeypatch):
    """A packed chunk stops at PREFILL_CHUNK tokens (the request it cuts continues in the next
    chunk from where it stopped) and at the logit rows a forward may ask for."""
    from zse_runtime import scheduler as scheduling

    engine = Engine.open(tiny_qwen2_zse, device="cpu", slots=4)
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, 300, n).tolist() for n in (6, 9, 4, 5)]
    solo = [list(engine.generate(ids, 3, ignore_eos=True)) for ids in prompts]
    forwards = _record_forwards(engine, monkeypatch)
    monkeypatch.setattr(Engine, "batch_invariant", property(lambda self: False))
    monkeypatch.setattr(Engine, "max_logit_rows", property(lambda self: 2))
    monkeypatch.setattr(scheduling, "PREFILL_CHUNK", 12)
    assert _run_scheduler(engine, prompts, 3) == solo
    first, second, third = [b for b in forwards if b.tokens.size > 4]  # decode steps between
    assert first.tokens.tolist() == prompts[0] + prompts[1][:6]  # 12 tokens: the second is cut
    assert first.logit_rows.tolist() == [5]
    # the rest of the second prompt, then whole prompts until two requests are done (the cap)
    assert second.tokens.tolist() == prompts[1][6:] + prompts[2]
    assert second.positions.tolist() == [6, 7, 8, 0, 1, 2, 3]
    assert second.logit_rows.tolist() == [2, 6]
    assert third.tokens.tolist() == prompts[3] and third.logit_rows.tolist() == [4]


def test_engine_failure_turns_health_503_and_requests_get_clear_errors(tiny_qwen2_zse, monkeypatch):
    """A step that raises (a lost device, say) fails the requests in flight with an error, and
    from then on /health is 503 naming the cause, so a load balancer stops routing here."""
    from starlette.testclient import TestClient

    from zse_runtime.engine import Engine
    from zse_runtime.server import create_app
    from zse_runtime.state import ServerState

    engine = Engine.open(tiny_qwen2_zse, device="cpu")
    state = ServerState(MODEL, None, max_waiting=4)
    state.attach(engine)
    try:
        with TestClient(create_app(state)) as client:
            assert client.get("/health").status_code == 200

            def lost(*_):
                raise RuntimeError("device lost")

            monkeypatch.setattr(engine, "forward", lost)
            failed = client.post("/v1/completions", json={"model": MODEL, "prompt": "x",
                                                          "max_tokens": 2})
            assert failed.status_code >= 500 and "device lost" in failed.json()["error"]["message"]
            health = client.get("/health")
            assert health.status_code == 503 and "device lost" in health.json()["error"]
            again = client.post("/v1/completions", json={"model": MODEL, "prompt": "x",
                                                         "max_tokens": 2})
            assert again.status_code == 503 and "device lost" in again.json()["error"]["message"]
    finally:
        state.scheduler.stop()


def test_request_bodies_parse_laxly_and_name_the_field():
    """api_types.parse: JSON numbers and numeric strings where an int is due are accepted (as
    pydantic's lax mode did); a wrong type, a value out of range, a missing field and a bad
    nested field each name the field."""
    from zse_runtime.api_types import ChatCompletionRequest, CompletionRequest, RequestError, parse

    body = parse({"model": MODEL, "prompt": [[5, 6]], "n": 2.0, "max_tokens": "3", "extra": 1},
                 CompletionRequest)
    assert (body.single_prompt, body.n, body.max_tokens) == ([5, 6], 2, 3)
    for bad, param in (({"model": MODEL, "prompt": "x", "top_p": 0}, "top_p"),
                       ({"model": MODEL, "prompt": "x", "seed": "s"}, "seed"),
                       ({"model": MODEL}, "prompt"),
                       ({"model": MODEL, "prompt": [1, "a"]}, None)):
        with pytest.raises(RequestError) as caught:
            parse(bad, CompletionRequest)
        assert caught.value.param == param, caught.value.message
    with pytest.raises(RequestError) as caught:
        parse({"model": MODEL, "messages": [{"role": "user"}, {"role": "bot"}]},
              ChatCompletionRequest)
    assert caught.value.param == "messages[1].role"
