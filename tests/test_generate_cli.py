"""`python -m zse_runtime MODEL PROMPT`, the README's first command, as a user runs it."""

from __future__ import annotations

from tests.conftest import run_module
from zse_runtime.engine import Engine


def _run(*args: str):
    return run_module("zse_runtime", *args)


def test_streams_the_greedy_completion(tiny_qwen2_zse):
    engine = Engine.open(tiny_qwen2_zse, device="cpu")
    expected = engine.tokenizer.decode(list(engine.generate("the license", 8)))
    result = _run(str(tiny_qwen2_zse), "the license", "-n", "8", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
    assert "tokens in" in result.stderr and "on cpu" in result.stderr


def test_chat_uses_the_template(tiny_qwen2_zse):
    engine = Engine.open(tiny_qwen2_zse, device="cpu")
    ids = engine.tokenizer.encode_chat([{"role": "user", "content": "hi"}])
    expected = engine.tokenizer.decode(list(engine.generate(ids, 6)))
    result = _run(str(tiny_qwen2_zse), "hi", "--chat", "-n", "6", "--device", "cpu")
    assert result.returncode == 0 and result.stdout == expected + "\n"


def test_bad_file_is_one_clear_error(tmp_path):
    bad = tmp_path / "x.zse"
    bad.write_bytes(b"nope" * 64)
    result = _run(str(bad), "hi", "--device", "cpu")
    assert result.returncode == 1 and "bad magic" in result.stderr and "Traceback" not in result.stderr
