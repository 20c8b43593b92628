"""A LangChain model given no base_url starts its own server (the default model) and stops it,
with every process the server started, when the program exits without closing it."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import psutil
import pytest

pytest.importorskip("langchain_core")

from support.live_server import BASE_FLAGS  # noqa: E402

PROGRAM = f"""
import json, psutil
from lightllm_plugin.adapters.langchain import ChatLightLLM, LightLLM

llm = LightLLM(temperature=0, max_tokens=8, server_args={BASE_FLAGS!r})
text = llm.invoke("The capital of France is")
server = psutil.Process(llm._server.proc.pid)
chat = ChatLightLLM(base_url=llm._server.url, temperature=0, max_tokens=8)
reply = chat.invoke("What is the capital of France?").content
pids = [server.pid] + [p.pid for p in server.children(recursive=True)]
print("RESULT " + json.dumps({{"text": text, "reply": reply, "pids": pids}}), flush=True)
# no close(): leaving the interpreter must stop the server
"""


@pytest.mark.slow  # a program that starts (and leaves) its own server
def test_an_owned_server_answers_and_is_gone_when_the_program_exits():
    done = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    result = json.loads(line[len("RESULT "):])
    assert "Paris" in result["text"] and result["reply"]
    assert len(result["pids"]) >= 3  # the server and its pipeline children
    deadline = time.monotonic() + 10
    alive = [p for p in result["pids"] if psutil.pid_exists(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in alive if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"processes {alive} outlived the program that owned the server"
