"""A tensor-parallel rank other than 0 (--tp > 1), as a child process of the server. Rank 0
is the router's own runner; it plans every forward and these ranks follow."""

from __future__ import annotations

from lightllm_plugin.config import EngineConfig
from lightllm_plugin.server import child_process
from lightllm_plugin.server.protocol import Addresses


def tp_rank_role(rank: int) -> str:
    return f"tp_rank{rank}"


def run_tp_rank(config: EngineConfig, addresses: Addresses, parent_pid: int, rank: int) -> None:
    """Process entry point."""
    child_process.bootstrap(tp_rank_role(rank), parent_pid)
    from lightllm_plugin.engine.tp_worker import serve_rank  # torch is heavy: import in the child only

    serve_rank(config, rank, addresses.run_dir, lambda: child_process.parent_alive(parent_pid))
