from __future__ import annotations

import json
import os
import sys

import torch

from lightllm_plugin.models.llama import LlamaFamilyModel
from lightllm_test_models import FAULT_TOKEN_ENV, MODULES_DIR_ENV


class StepFault(RuntimeError):
    pass


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


class FaultyLlama(LlamaFamilyModel):
    def forward(self, input_ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        token = int(os.environ[FAULT_TOKEN_ENV])
        if _rank() == 0 and bool((input_ids == token).any()):
            raise StepFault(f"test fault: the step holds token {token}")
        return super().forward(input_ids, *args, **kwargs)


class ModuleRecordingLlama(LlamaFamilyModel):
    def forward(self, *args, **kwargs) -> torch.Tensor:
        modules = sorted(sys.modules)
        if len(modules) != getattr(self, "_recorded", 0):
            self._recorded = len(modules)
            with open("/proc/self/comm", encoding="utf-8") as f:
                name = f.read().strip()
            path = os.path.join(os.environ[MODULES_DIR_ENV], f"{os.getpid()}.json")
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                json.dump({"process": name, "modules": modules}, f)
            os.replace(path + ".tmp", path)
        return super().forward(*args, **kwargs)
