"""req_to_token: for each live request row, the KV slot of each of its token positions."""

from __future__ import annotations

import torch


class ReqTable:
    def __init__(self, max_reqs: int, max_len: int, device: torch.device):
        self.max_len = max_len
        # one row more than requests: the padding rows of a CUDA-graph decode batch read it
        self.req_to_token = torch.zeros(max_reqs + 1, max_len, dtype=torch.int32, device=device)  # [R+1, L]
        self.scratch_row = max_reqs
        self._free_rows = list(range(max_reqs - 1, -1, -1))

    @property
    def num_free_rows(self) -> int:
        return len(self._free_rows)

    def alloc_row(self) -> int:
        if not self._free_rows:
            raise MemoryError("no free request row: running_max_req_size reached")
        return self._free_rows.pop()

    def free_row(self, row: int) -> None:
        self._free_rows.append(row)
