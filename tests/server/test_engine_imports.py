"""The processes that run the model (the router, a tensor-parallel rank, the offline LLM) import
no HTTP stack and no adapter: read from the processes themselves, through a test-only
architecture that writes down its process's modules at every forward."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest
from lightllm_test_models import MODULE_RECORDING, MODULES_DIR_ENV
from support.live_server import free_port
from support.model_plugin import build_tiny_checkpoint, with_pythonpath

pytestmark = pytest.mark.slow
WEB = ("fastapi", "starlette", "uvicorn")


def web_or_adapter_modules(modules: list[str]) -> list[str]:
    return [m for m in modules if m.split(".")[0] in WEB or m.startswith("lightllm_plugin.adapters")]


@pytest.fixture(scope="module")
def recording_model(tmp_path_factory) -> str:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("recording"), MODULE_RECORDING)


def test_the_router_and_a_tp_rank_import_no_http_stack(launch_server, recording_model, test_models_plugin, tmp_path):
    env = with_pythonpath(test_models_plugin, **{MODULES_DIR_ENV: str(tmp_path)})
    server = launch_server("--model_dir", recording_model, "--tp", "2", "--nccl_port", str(free_port()), env=env)
    r = httpx.post(server.url + "/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 3}},
                   timeout=120)
    assert r.status_code == 200
    records = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    # each child names itself lightllm:<role>, cut to the kernel's 15 characters
    assert sorted(r["process"] for r in records) == ["lightllm:router", "lightllm:tp_rank1"[:15]]
    for record in records:
        assert "torch" in record["modules"] and "lightllm_plugin.engine.runner" in record["modules"]
        assert web_or_adapter_modules(record["modules"]) == [], record["process"]


def test_the_offline_llm_imports_no_http_stack(recording_model, test_models_plugin, tmp_path):
    program = (
        "import json, sys\n"
        "from lightllm_plugin import LLM, SamplingParams\n"
        f"llm = LLM({recording_model!r}, max_total_token_num=256, max_req_total_len=128, max_req_input_len=64)\n"
        "out = llm.generate('Hello', SamplingParams(max_new_tokens=3, ignore_eos=True), use_tqdm=False)\n"
        "assert len(out[0].outputs[0].token_ids) == 3\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    env = with_pythonpath(test_models_plugin, **{MODULES_DIR_ENV: str(tmp_path)})
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})
    assert done.returncode == 0, done.stderr[-3000:]
    modules = json.loads(done.stdout.strip().splitlines()[-1])
    assert "lightllm_plugin.engine.core" in modules
    assert web_or_adapter_modules(modules) == []
