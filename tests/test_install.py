"""The package runs from wherever it is installed: a non-editable install (a wheel built from
this checkout, installed into a folder of its own) works from a directory outside the checkout,
and so does the editable install the tests run under."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})
    assert done.returncode == 0, f"{cmd} in {cwd}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A non-editable install of this checkout, without its dependencies (they are those of the
    running environment)."""
    source, target = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("site")
    # built from a copy: a build writes build/ and egg-info beside the sources
    shutil.copytree(ROOT, source, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", ".pytest_cache"))
    run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "--target", str(target), str(source)], cwd=target)
    return target


def test_a_non_editable_install_runs_the_cli_and_the_server_module_from_another_directory(installed, tmp_path,
                                                                                           default_model_file):
    env = {"PYTHONPATH": str(installed)}
    where = run([sys.executable, "-c", "import lightllm_plugin, lightllm_plugin.kernels.rmsnorm as k, "
                 "lightllm_plugin.adapters.openai.serving_chat as a; print(lightllm_plugin.__file__, k.__file__, a.__file__)"],
                cwd=tmp_path, env=env)
    assert all(path.startswith(str(installed)) for path in where.stdout.split()), where.stdout
    listed = run([str(installed / "bin" / "lightllm-plugin"), "plugins"], cwd=tmp_path, env=env)
    assert "openai" in listed.stdout and "LlamaForCausalLM" in listed.stdout
    served = run([sys.executable, "-m", "lightllm_plugin.server", "--help"], cwd=tmp_path, env=env)
    assert "--model_dir" in served.stdout
    answer = run([str(installed / "bin" / "lightllm-plugin"), "generate", "What is the capital of France?",
                  "--max_new_tokens", "12", "--max_total_token_num", "1024", "--max_req_total_len", "512",
                  "--max_req_input_len", "256"], cwd=tmp_path, env=env)
    assert "Paris" in answer.stdout


def test_the_editable_install_runs_the_cli_from_another_directory(tmp_path):
    listed = run([sys.executable, "-m", "lightllm_plugin.cli", "plugins"], cwd=tmp_path)
    assert "openai" in listed.stdout
    served = run([sys.executable, "-m", "lightllm_plugin.server", "--help"], cwd=tmp_path)
    assert "--model_dir" in served.stdout
