"""LazyLLM's `deploy.lightllm` runs this engine: the real lazyllm package, on CPU.

One server, started by LazyLLM exactly as a LazyLLM user starts one, serves the module's
tests; the last test stops it and checks that no process of it is left.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import os
import shutil
import subprocess
import tempfile
import time

import pytest

if importlib.util.find_spec("lazyllm") is None:  # not importorskip: LazyLLM must load after the env below
    pytest.skip("lazyllm is not installed (pip install 'lightllm-plugin[lazyllm]')", allow_module_level=True)
import psutil  # noqa: E402

from lightllm_plugin.models.default_model import DEFAULT_MODEL_NAME, default_model_path  # noqa: E402

pytestmark = pytest.mark.slow  # LazyLLM starts its own server (and imports in seconds)

START_TIMEOUT_S = 300
CALL_TIMEOUT_S = 120
STOP_TIMEOUT_S = 20
QUESTION = "What is the capital of France?"

# A LAZYLLM_MODEL_PATH-style model root holding <root>/SmolLM2-135M-Instruct/<the .gguf>, so
# the module below names the model as LazyLLM users do. LazyLLM reads the variable when it
# is first imported, hence before `import lazyllm`.
_MODEL_ROOT = tempfile.mkdtemp(prefix="lazyllm-models-")
_MODEL_DIR = os.path.join(_MODEL_ROOT, DEFAULT_MODEL_NAME)
os.makedirs(_MODEL_DIR)
_GGUF = default_model_path()
os.symlink(_GGUF, os.path.join(_MODEL_DIR, os.path.basename(_GGUF)))
os.environ["LAZYLLM_MODEL_PATH"] = _MODEL_ROOT

import lazyllm  # noqa: E402
from lazyllm import deploy  # noqa: E402

import lightllm_plugin.adapters.lazyllm as adapter  # noqa: E402
from lightllm_plugin.server.launcher import RUN_DIR_PREFIX, remove_stale_run_dirs  # noqa: E402


def _deploy_job(module, last=False):
    launcher = module._impl._launchers["default"]["deploy"]
    jobs = launcher.all_processes[launcher._id]  # one entry per (re)start
    if not last:
        assert len(jobs) == 1
    return jobs[-1][1]


def _bounded(fn, timeout, *args, **kw):
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        return pool.submit(fn, *args, **kw).result(timeout=timeout)
    finally:
        pool.shutdown(wait=False)


@pytest.fixture(scope="module")
def served():
    """A module deployed through deploy.lightllm, and the processes its server runs as."""
    module = lazyllm.TrainableModule(DEFAULT_MODEL_NAME).deploy_method(deploy.lightllm)
    state = {"module": module, "stopped": False}
    try:
        _bounded(module.start, START_TIMEOUT_S)
        job = _deploy_job(module)
        root = psutil.Process(job.ps.pid)
        state["processes"] = [root, *root.children(recursive=True)]
        state["job"] = job
        yield state
    finally:
        if not state["stopped"]:
            try:
                module.stop()
            except RuntimeError:
                pass  # never started
        shutil.rmtree(_MODEL_ROOT, ignore_errors=True)


def test_importing_the_adapter_takes_over_deploy_lightllm():
    assert deploy.lightllm is adapter.LightllmPlugin and deploy.lightllm_plugin is adapter.LightllmPlugin
    assert issubclass(adapter.LightllmPlugin, lazyllm.LazyLLMDeployBase)
    adapter.register()  # idempotent
    adapter.unregister()
    try:
        assert deploy.lightllm is lazyllm.components.deploy.Lightllm and "lightllm_plugin" not in deploy
    finally:
        adapter.register()
    assert deploy.lightllm is adapter.LightllmPlugin


def test_lazyllm_resolved_the_model_folder_and_launched_this_engine(served):
    module, job = served["module"], served["job"]
    assert module._impl._base_model == _MODEL_DIR  # found through LAZYLLM_MODEL_PATH
    cmd = job._fixed_cmd.cmd
    assert "-m lightllm_plugin.server" in cmd and f"--model_dir={_MODEL_DIR}" in cmd
    # LazyLLM's own defaults, passed through unchanged
    for flag in ("--host=0.0.0.0", "--eos_id=2", "--data_type=float16", "--max_total_token_num=64000"):
        assert flag in cmd


def test_a_call_answers(served):
    answer = _bounded(served["module"], CALL_TIMEOUT_S, QUESTION)
    assert isinstance(answer, str) and "Paris" in answer


def test_streaming_yields_the_text_piece_by_piece(served):
    module = served["module"]
    pieces: list[str] = []

    def drain():
        for item in lazyllm.FileSystemQueue().dequeue() or []:
            pieces.append(json.loads(item)["delta"])

    with lazyllm.ThreadPoolExecutor(1) as pool:
        future = pool.submit(module, QUESTION, stream_output=True)
        deadline = time.monotonic() + CALL_TIMEOUT_S
        while not future.done():
            assert time.monotonic() < deadline, "the streamed answer did not end"
            drain()
            time.sleep(0.05)
        answer = future.result()  # the stream ended without an error
        drain()
    assert len(pieces) > 1, pieces
    assert "".join(pieces) == answer and "Paris" in answer


def test_url_reaches_a_running_server_without_launching_one(served):
    url = served["module"]._url
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    client = lazyllm.TrainableModule(DEFAULT_MODEL_NAME).deploy_method(deploy.lightllm, url=url)
    client.start()
    assert {p.pid for p in psutil.Process().children(recursive=True)} == before
    assert "Paris" in _bounded(client, CALL_TIMEOUT_S, QUESTION)


def _run_dirs(processes) -> set[str]:
    dirs = set()
    for proc in processes:
        for conn in proc.net_connections(kind="unix"):
            if conn.laddr and os.path.basename(os.path.dirname(conn.laddr)).startswith(RUN_DIR_PREFIX):
                dirs.add(os.path.dirname(conn.laddr))
    return dirs


def test_stop_leaves_no_process_behind(served):
    module, processes = served["module"], served["processes"]
    assert len(processes) >= 4 and all(p.is_running() for p in processes)  # launcher + router, detokenizer, tokenizer
    run_dirs = _run_dirs(processes)
    assert len(run_dirs) == 1
    served["stopped"] = True
    module.stop()
    _, alive = psutil.wait_procs(processes, timeout=STOP_TIMEOUT_S)
    assert not alive, f"left running: {[(p.pid, p.name()) for p in alive]}"
    # LazyLLM stops its jobs with SIGKILL, so the server could not remove its socket folder;
    # the next server start does (this is the call it makes)
    remove_stale_run_dirs()
    assert not any(os.path.exists(d) for d in run_dirs)


def test_a_bad_model_path_is_a_failed_start_not_a_hang(tmp_path):
    module = lazyllm.TrainableModule(str(tmp_path / "no-such-model")).deploy_method(deploy.lightllm)
    try:
        # LazyLLM retries a failed start 3 times, then gives up
        with pytest.raises(Exception, match="Job failed"):
            _bounded(module.start, START_TIMEOUT_S)
        job = _deploy_job(module, last=True)
        assert job.ps.wait(STOP_TIMEOUT_S) == 1
    finally:
        try:
            module.stop()
        except RuntimeError:
            pass
    # LazyLLM ends an attempt at once on a line starting "ERROR:"; the job's command prints one
    run = subprocess.run(job._fixed_cmd.cmd, shell=True, capture_output=True, text=True, timeout=START_TIMEOUT_S)
    errors = [line for line in run.stderr.splitlines() if line.lstrip().startswith("ERROR:")]
    assert run.returncode == 1 and len(errors) == 1 and "cannot serve --model_dir" in errors[0], run.stderr
