"""The tensor-parallel ranks: rank 0 joins from the process that steps the engine (the router,
or the process of an offline `LLM`); ranks 1..N-1 each run `serve_rank` in a process of their
own, with their part of the model, running the forwards rank 0 plans."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Callable

import torch

from lightllm_plugin.config import EngineConfig
from lightllm_plugin.engine.runner import ModelRunner, resolve_device_and_dtype
from lightllm_plugin.engine.step_plan import PlanReceiver, PlanSender, plan_address
from lightllm_plugin.models.tensor_parallel import TPGroup

PLAN_POLL_MS = 500  # how often an idle rank checks that it should go on


def _share_cpu(config: EngineConfig, device: torch.device) -> None:
    # the ranks of a CPU run share the machine's cores; more threads than cores thrash
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.tp))


def join_as_rank_zero(config: EngineConfig, run_dir: str) -> tuple[TPGroup, PlanSender]:
    """Rank 0's group membership (waits for the other ranks to join) and its plan sockets."""
    device, _ = resolve_device_and_dtype(config)
    _share_cpu(config, device)
    sender = PlanSender([plan_address(run_dir, rank) for rank in range(1, config.tp)])
    return TPGroup(0, config.tp, config.nccl_port, device), sender


def serve_rank(config: EngineConfig, rank: int, run_dir: str, keep_going: Callable[[], bool]) -> None:
    """Rank `rank` (>= 1): load this rank's part, size the pool with the others, then run every
    planned forward until `keep_going()` turns false."""
    from lightllm_plugin.models.tokenizer import resolve_model_path

    device, _ = resolve_device_and_dtype(config)
    _share_cpu(config, device)
    # bound before the model loads, so plans rank 0 sends meanwhile wait in the socket
    receiver = PlanReceiver(plan_address(run_dir, rank))
    try:
        group = TPGroup(rank, config.tp, config.nccl_port, device)
        kind, path = resolve_model_path(config.model_dir)
        runner = ModelRunner(config, kind, path, progress=False, tp_group=group)
        runner.size_kv_pool()
        while keep_going():
            if receiver.poll(PLAN_POLL_MS):
                plan = receiver.recv()
                if plan is not None:
                    runner.run_plan(plan)
    finally:
        receiver.close()


def _offline_rank_main(config: EngineConfig, rank: int, run_dir: str, parent_pid: int) -> None:
    import threading

    from tqdm import tqdm

    # tqdm's default lock is a named semaphore, reported as leaked when close() terminates us
    tqdm.set_lock(threading.RLock())
    serve_rank(config, rank, run_dir, lambda: os.getppid() == parent_pid)


class OfflineRanks:
    """Ranks 1..N-1 of an offline `LLM(tp=N)`: spawned processes, stopped by `close()` (or
    when this process exits: each checks that its parent is alive)."""

    def __init__(self, config: EngineConfig):
        self.run_dir = tempfile.mkdtemp(prefix="lightllm-plugin-tp-")
        ctx = multiprocessing.get_context("spawn")
        self.processes = [
            ctx.Process(target=_offline_rank_main, args=(config, rank, self.run_dir, os.getpid()),
                        name=f"lightllm-plugin-tp-rank{rank}", daemon=True)
            for rank in range(1, config.tp)
        ]
        for process in self.processes:
            process.start()

    def close(self) -> None:
        for process in self.processes:
            if process.exitcode is None:
                process.terminate()
        for process in self.processes:
            process.join(5)
            if process.exitcode is None:
                process.kill()
                process.join(1)
        shutil.rmtree(self.run_dir, ignore_errors=True)
