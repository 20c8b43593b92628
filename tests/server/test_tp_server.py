"""--tp 2 through the server on CPU (gloo): the same greedy tokens as one rank, a killed rank
ends the server with its name, and so does a failed step (the ranks are out of step after it)."""

import os
import signal

import httpx
import pytest
from support.live_server import ServerProcess, free_port

from lightllm_plugin import LLM, SamplingParams

pytestmark = pytest.mark.slow  # each test starts two tensor-parallel ranks

CHATS = ["What is the capital of France?", "Write a haiku about the sea."]


def test_server_with_tp2_answers_as_one_rank_and_a_killed_rank_ends_it_with_its_name():
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    # float32: the split sums the same products in another order, exact only in float32
    llm = LLM(data_type="float32", max_total_token_num=4096, max_req_total_len=512, max_req_input_len=256,
              progress=False)
    expected = [o.outputs[0].token_ids
                for o in llm.chat([[{"role": "user", "content": c}] for c in CHATS], params, use_tqdm=False)]
    del llm
    server = ServerProcess("--tp", "2", "--nccl_port", str(free_port()), "--data_type", "float32")
    try:
        server.wait_ready()
        for chat, tokens in zip(CHATS, expected):
            body = {"messages": [{"role": "user", "content": chat}],
                    "parameters": {"max_new_tokens": 16, "do_sample": False, "ignore_eos": True,
                                   "return_details": True}}
            got = httpx.post(server.url + "/generate", json=body, timeout=120).json()
            assert [t["id"] for t in got["tokens"]] == tokens
        rank = server.child("tp_rank1")
        os.kill(rank.pid, signal.SIGKILL)
        server.wait_ended_by(f"tp_rank1 process (pid {rank.pid}) was killed by signal SIGKILL", timeout=15)
    finally:
        server.stop()
        server.reap()


def test_generate_command_with_tp2_answers_and_leaves_no_rank_behind(tmp_path):
    import subprocess
    import sys
    import time

    import psutil

    cmd = [sys.executable, "-m", "lightllm_plugin.cli", "generate", "What is the capital of France?", "--tp", "2",
           "--nccl_port", str(free_port()), "--max_new_tokens", "12", "--max_total_token_num", "2048",
           "--max_req_total_len", "512", "--max_req_input_len", "256"]
    out_path, err_path = tmp_path / "out", tmp_path / "err"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        seen: set[int] = set()  # every process the command started, collected while it runs
        deadline = time.monotonic() + 300
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    seen.update(c.pid for c in psutil.Process(proc.pid).children(recursive=True))
                except psutil.NoSuchProcess:
                    pass
                time.sleep(0.1)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, err_path.read_text()
    assert "Paris" in out_path.read_text()
    assert seen, "the rank process was never seen"
    alive = [p for p in map(psutil.Process, filter(psutil.pid_exists, seen)) if p.status() != psutil.STATUS_ZOMBIE]
    _, still = psutil.wait_procs(alive, timeout=5)
    assert not still, still
