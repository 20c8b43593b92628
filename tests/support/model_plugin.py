"""Third-party plugin distributions installed for a test run, and tiny random checkpoints
served under the test-only architectures of tests/plugins/test_models_plugin."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PLUGINS_DIR = Path(__file__).resolve().parent.parent / "plugins"


def pip_install_target(source: Path, root: Path) -> str:
    """`pip install --target` of the distribution at `source` into a folder under `root`:
    with that folder on PYTHONPATH the distribution is installed, entry points and all.
    Builds without isolation where the local setuptools can (no network), with it otherwise."""
    src, target = root / "src", root / "site"
    shutil.copytree(source, src)  # the build writes egg-info next to the sources
    base = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check", "--target",
            str(target)]
    done = subprocess.run(base + ["--no-build-isolation", str(src)], capture_output=True, text=True)
    if done.returncode != 0:
        done = subprocess.run(base + [str(src)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return str(target)


def with_pythonpath(path: str, **extra: str) -> dict[str, str]:
    """Environment additions that put `path` first on a child's PYTHONPATH."""
    return {"PYTHONPATH": os.pathsep.join(p for p in (path, os.environ.get("PYTHONPATH", "")) if p), **extra}


@pytest.fixture(scope="session")
def test_models_plugin(tmp_path_factory) -> str:
    """Where the test-only architectures' plugin is installed (for PYTHONPATH)."""
    return pip_install_target(PLUGINS_DIR / "test_models_plugin", tmp_path_factory.mktemp("test_models_plugin"))


def build_tiny_checkpoint(folder: Path, architecture: str, family: str = "Llama", chat_template: str | None = None,
                          **config_fields) -> str:
    """A two-layer random model of a transformers `family` ("Llama", "Qwen2", "Qwen3Moe") with the
    default model's tokenizer (and `chat_template`, if given), declared as `architecture`;
    `config_fields` add to or override the config (a MoE family's experts)."""
    import torch
    import transformers

    from lightllm_plugin.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(None)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(folder)
    config = getattr(transformers, f"{family}Config")(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **config_fields,
    )
    torch.manual_seed(0)
    getattr(transformers, f"{family}ForCausalLM")(config).to(torch.float32).save_pretrained(folder)
    # save_pretrained names the class that saved it; the checkpoint declares `architecture`
    config_path = Path(folder) / "config.json"
    saved = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**saved, "architectures": [architecture]}, indent=2))
    return str(folder)
