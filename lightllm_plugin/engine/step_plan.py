"""Step plans: what rank 0 sends every other tensor-parallel rank before each forward.

A plan is the packed int64 step the runner builds anyway (input ids, positions, KV slots,
req_to_token rows, per-request lengths, and the req_to_token entries to write before the
step: a cached prefix's slots) behind a four-number header, sent as raw bytes
over one ZMQ PUSH/PULL pair per rank: no pickle, and a frame of the wrong size is dropped.
The ranks then run the same forward, so their KV pools hold the same slots.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass

import torch
import zmq

from lightllm_plugin.ipc import open_socket

logger = logging.getLogger(__name__)

_HEADER = struct.Struct("<qqqq")  # tokens, requests, table writes, flags
_ALL_LOGITS = 1
_INT64 = 8


@dataclass
class StepPlan:
    packed: torch.Tensor  # int64 [4 * tokens + 5 * requests + 3 * writes], as ModelRunner packs it
    num_tokens: int
    num_requests: int
    all_logits: bool
    num_writes: int = 0  # req_to_token entries (row, position, slot) to write before the forward

    @property
    def size(self) -> int:
        return 4 * self.num_tokens + 5 * self.num_requests + 3 * self.num_writes


def plan_address(run_dir: str, rank: int) -> str:
    return f"ipc://{run_dir}/tp_plan{rank}"


class PlanSender:
    """Rank 0's end: one PUSH socket to each other rank."""

    def __init__(self, addresses: list[str]):
        self._ctx = zmq.Context()
        self._socks = [open_socket(self._ctx, zmq.PUSH, address, bind=False) for address in addresses]

    def send(self, plan: StepPlan) -> None:
        header = _HEADER.pack(plan.num_tokens, plan.num_requests, plan.num_writes, _ALL_LOGITS if plan.all_logits else 0)
        body = plan.packed.numpy().tobytes()
        for sock in self._socks:
            sock.send_multipart([header, body], copy=False)

    def close(self) -> None:
        self._ctx.destroy(linger=0)


class PlanReceiver:
    """Another rank's end: a PULL socket bound in the run directory."""

    def __init__(self, address: str):
        self._ctx = zmq.Context()
        self._sock = open_socket(self._ctx, zmq.PULL, address, bind=True)

    def poll(self, timeout_ms: int) -> bool:
        return bool(self._sock.poll(timeout_ms))

    def recv(self) -> StepPlan | None:
        """The next plan; None (and a log line) for a frame that is not one."""
        frames = self._sock.recv_multipart()
        if len(frames) != 2 or len(frames[0]) != _HEADER.size:
            logger.error("dropped a step-plan message of %d frames", len(frames))
            return None
        tokens, requests, writes, flags = _HEADER.unpack(frames[0])
        plan = StepPlan(None, tokens, requests, bool(flags & _ALL_LOGITS), writes)
        if tokens < 1 or requests < 1 or writes < 0 or len(frames[1]) != plan.size * _INT64:
            logger.error("dropped a step plan whose size does not match its header")
            return None
        plan.packed = torch.frombuffer(bytearray(frames[1]), dtype=torch.int64)
        return plan

    def close(self) -> None:
        self._ctx.destroy(linger=0)
